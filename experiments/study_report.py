"""The report of a statistics study: its estimate records, a terminal table, CSV, PNG plots and MLflow.

The coordinator combines the sites' noisy releases (:mod:`federation.statistics`) into
:class:`Estimate` records, one per number it reports, and labels each with where it
belongs as a :class:`ReportRow`: the statistic's name in the spec, its kind, the
group-by cell and what in the cell it estimates. This module only renders rows; it
computes nothing from patient data and imports nothing of ours beyond the records it
defines (``experiments`` may import only ``privacy``), so the rows are the whole contract
between the combination and its output.

Outputs:

- :func:`render_table`: a table that reads in an 80-column terminal (rich), with the
  notes that state each interval's rule numbered below it;
- :func:`write_csv` / :func:`read_csv`: one line per row, every field, full precision;
  the group-by cell as a JSON list of its labels;
- :func:`plot_proportions`, :func:`plot_histograms`, :func:`plot_survival`: PNGs
  (matplotlib's Agg canvas, no pyplot state) of prevalence bars with interval whiskers
  by cell, merged histograms, and survival curves with their bands;
- :func:`write_report` writes all of them to a folder, :func:`log_report` records them
  as one tracked run (parameters, the scalar estimates as metrics, the files as
  artifacts) through a :class:`~experiments.tracking.Tracker`.

Display post-processing (stated on the plots): a merged histogram's noisy bins can be
negative; the histogram plot draws them as 0 while the table and CSV keep the unbiased
noisy sums.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from experiments.errors import ReportError
from experiments.tracking import Tracker

__all__ = [
    "CSV_FIELDS",
    "KINDS",
    "Estimate",
    "ReportFiles",
    "ReportRow",
    "log_report",
    "new_figure",
    "metric_key",
    "plot_histograms",
    "plot_proportions",
    "plot_survival",
    "read_csv",
    "render_table",
    "study_tables",
    "write_csv",
    "write_report",
]

#: What a row estimates; the report groups and plots by kind.
KINDS = (
    "count",  # census count of patients in the cell, over the contributing sites
    "sum",  # census total of a bounded column
    "mean",
    "variance",
    "sd",
    "proportion",  # prevalence: events over count
    "histogram",  # one row per bin, census counts; left/right are the bin's edges
    "quantile",  # quantity "q0.5" ...
    "table",  # one row per cell of a 2x2 table, census counts
    "odds_ratio",
    "survival",  # one row per time bin: S at the bin's right edge; left/right are its edges
)

#: The kinds that become MLflow metrics (one number per cell that reads alone).
METRIC_KINDS = frozenset({"count", "sum", "mean", "variance", "sd", "proportion", "quantile", "odds_ratio", "survival"})

CSV_FIELDS = (
    "statistic", "kind", "cell", "quantity", "left", "right",
    "estimate", "lower", "upper", "sites", "suppressed", "note",
)


@dataclass(frozen=True)
class Estimate:
    """One pooled estimate with its confidence interval.

    Attributes
    ----------
    estimate, lower, upper
        The point estimate and the interval's bounds (NaN where the cell is suppressed
        at every site, or the estimate is undefined; the note says which).
    sites
        How many sites contributed to it: a site that suppressed the cell is left out.
    suppressed
        True when no site contributed (the cell was suppressed everywhere).
    note
        The rule the interval follows, and any post-processing applied.
    """

    estimate: float
    lower: float
    upper: float
    sites: int
    suppressed: bool = False
    note: str = ""

    @classmethod
    def suppressed_everywhere(cls, note: str = "suppressed at every site") -> Estimate:
        """The record of a cell no site released."""
        return cls(math.nan, math.nan, math.nan, 0, True, note)


@dataclass(frozen=True)
class ReportRow:
    """An :class:`Estimate` with where it belongs in the study.

    Attributes
    ----------
    statistic
        The statistic's name in the spec.
    kind
        One of :data:`KINDS`.
    cell
        The group-by cell's labels, in the query's group-by order (empty: no group-by).
    quantity
        What in the cell the row estimates: ``"mean"``, ``"q0.5"``, ``"[10, 20)"``, ``"S(30)"``...
    value
        The estimate.
    left, right
        For a histogram bin or a survival time bin, its edges (``S`` is given at ``right``).
    """

    statistic: str
    kind: str
    cell: tuple[str, ...]
    quantity: str
    value: Estimate
    left: float | None = None
    right: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ReportError(f"row.kind must be one of {', '.join(KINDS)}; found {self.kind!r}")


# ---------------------------------------------------------------- table


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == round(value) and abs(value) < 1e7:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _cell_label(cell: tuple[str, ...]) -> str:
    return ", ".join(cell) if cell else "all"


def _notes(rows: Sequence[ReportRow]) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for row in rows:
        if row.value.note and row.value.note not in numbers:
            numbers[row.value.note] = len(numbers) + 1
    return numbers


def study_tables(rows: Sequence[ReportRow]) -> list[Table]:
    """The estimates as rich tables, one per statistic (titled by its name and kind).

    Columns: cell, quantity, estimate, 95 % interval, contributing sites, note number
    (the notes are listed by :func:`render_table`). A cell suppressed at every site
    reads "suppressed".
    """
    notes = _notes(rows)
    tables: list[Table] = []
    by_statistic: dict[tuple[str, str], list[ReportRow]] = {}
    for row in rows:
        by_statistic.setdefault((row.statistic, row.kind), []).append(row)
    for (statistic, kind), mine in by_statistic.items():
        table = Table(title=f"{statistic} ({kind.replace('_', ' ')})", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, expand=False)
        table.add_column("cell", overflow="fold", ratio=3)
        table.add_column("quantity", overflow="fold", ratio=2)
        table.add_column("estimate", justify="right", no_wrap=True)
        table.add_column("95 % interval", justify="right", no_wrap=True)
        table.add_column("sites", justify="right", no_wrap=True)
        table.add_column("note", justify="right", no_wrap=True)
        previous: tuple[str, ...] | None = None
        for row in mine:
            value = row.value
            table.add_row(
                "" if row.cell == previous else _cell_label(row.cell),
                row.quantity,
                "suppressed" if value.suppressed else _number(value.estimate),
                "" if value.suppressed else f"[{_number(value.lower)}, {_number(value.upper)}]",
                str(value.sites),
                f"[{notes[value.note]}]" if value.note else "",
            )
            previous = row.cell
        tables.append(table)
    return tables


def render_table(rows: Sequence[ReportRow], *, title: str = "Study estimates", width: int = 80) -> str:
    """The tables as plain text no wider than `width`, under `title`, with the numbered notes below."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None, soft_wrap=False)
    console.print(title)
    for table in study_tables(rows):
        console.print(table)
    lines = [line.rstrip() for line in console.export_text(styles=False).rstrip("\n").splitlines()]
    lines += ["", "notes:"]
    for note, number in _notes(rows).items():
        lines.append(textwrap.fill(note, width=width, initial_indent=f"[{number}] ", subsequent_indent="    "))
    lines.append(textwrap.fill(
        "Intervals are 95 %. sites: how many sites contributed (a site that suppressed a cell is left out).", width=width))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CSV


def _float_text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def write_csv(rows: Iterable[ReportRow], path: Path) -> Path:
    """Write `rows` to `path` (one line per row, fields :data:`CSV_FIELDS`); returns `path`."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        handle.write(_csv_text(rows))
    return path


def _csv_text(rows: Iterable[ReportRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        v = row.value
        writer.writerow([
            row.statistic, row.kind, json.dumps(list(row.cell), ensure_ascii=False), row.quantity,
            _float_text(row.left), _float_text(row.right),
            _float_text(v.estimate), _float_text(v.lower), _float_text(v.upper),
            str(v.sites), "true" if v.suppressed else "false", v.note,
        ])
    return buffer.getvalue()


def read_csv(path: Path) -> list[ReportRow]:
    """Read rows written by :func:`write_csv`.

    Raises
    ------
    ReportError
        The header is not :data:`CSV_FIELDS`, or a line has a field that does not parse
        (the message names the line and the field).
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_FIELDS:
            raise ReportError(f"{path}: the header must be {','.join(CSV_FIELDS)}; found {header}")
        rows = []
        for number, line in enumerate(reader, start=2):
            record = dict(zip(CSV_FIELDS, line, strict=False))
            try:
                rows.append(_row_from_record(record))
            except (ValueError, KeyError, TypeError) as error:
                raise ReportError(f"{path}, line {number}: {error}") from None
    return rows


def _field(record: Mapping[str, str], name: str, parse: Any) -> Any:
    try:
        return parse(record[name])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"field {name!r} does not parse; found {record.get(name)!r}") from None


def _optional_float(text: str) -> float | None:
    return None if text == "" else float(text)


def _cell(text: str) -> tuple[str, ...]:
    cell = json.loads(text)
    if not isinstance(cell, list) or not all(isinstance(label, str) for label in cell):
        raise ValueError("not a JSON list of labels")
    return tuple(cell)


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("not true/false")
    return text == "true"


def _row_from_record(record: Mapping[str, str]) -> ReportRow:
    value = Estimate(
        estimate=_field(record, "estimate", float),
        lower=_field(record, "lower", float),
        upper=_field(record, "upper", float),
        sites=_field(record, "sites", int),
        suppressed=_field(record, "suppressed", _flag),
        note=record.get("note", ""),
    )
    return ReportRow(
        statistic=_field(record, "statistic", str),
        kind=_field(record, "kind", str),
        cell=_field(record, "cell", _cell),
        quantity=_field(record, "quantity", str),
        value=value,
        left=_field(record, "left", _optional_float),
        right=_field(record, "right", _optional_float),
    )


# ---------------------------------------------------------------- plots


def _by_statistic(rows: Iterable[ReportRow], kind: str) -> dict[str, list[ReportRow]]:
    out: dict[str, list[ReportRow]] = {}
    for row in rows:
        if row.kind == kind:
            out.setdefault(row.statistic, []).append(row)
    return out


def _by_cell(rows: Iterable[ReportRow]) -> dict[tuple[str, ...], list[ReportRow]]:
    out: dict[tuple[str, ...], list[ReportRow]] = {}
    for row in rows:
        out.setdefault(row.cell, []).append(row)
    return out


def _file_name(prefix: str, statistic: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', statistic)}.png"


def new_figure(width: float, height: float) -> Any:
    """A Matplotlib figure on the Agg canvas, outside pyplot (`width` x `height` inches)."""
    # A bare Figure renders on the Agg canvas and leaves pyplot's global state alone:
    # the coordinator is a long-lived process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_proportions(rows: Sequence[ReportRow], directory: Path) -> list[Path]:
    """One PNG per proportion statistic: a bar per cell with its interval as whiskers.

    A cell suppressed at every site has no bar and is labelled "suppressed". The y axis
    runs from 0 to a little above the highest interval bound (at most 1).
    """
    written = []
    for statistic, mine in _by_statistic(rows, "proportion").items():
        figure = new_figure(max(5.0, 0.7 * len(mine) + 2), 4.0)
        axes = figure.add_subplot()
        xs = list(range(len(mine)))
        shown = [r for r in mine if not r.value.suppressed]
        at = [xs[i] for i, r in enumerate(mine) if not r.value.suppressed]
        heights = [r.value.estimate for r in shown]
        below = [max(r.value.estimate - r.value.lower, 0.0) for r in shown]
        above = [max(r.value.upper - r.value.estimate, 0.0) for r in shown]
        axes.bar(at, heights, color="C0", alpha=0.8)
        axes.errorbar(at, heights, yerr=[below, above], fmt="none", ecolor="black", capsize=3, linewidth=1)
        for i, r in enumerate(mine):
            if r.value.suppressed:
                axes.text(xs[i], 0.02, "suppressed", rotation=90, ha="center", va="bottom", fontsize="small")
        axes.set_xticks(xs, [_cell_label(r.cell) for r in mine], rotation=45, ha="right", fontsize="small")
        axes.set_xlim(-0.6, len(mine) - 0.4)
        tops = [r.value.upper for r in shown if math.isfinite(r.value.upper)]
        axes.set_ylim(0, min(1.0, 1.15 * max(tops)) if tops and max(tops) > 0 else 1.0)
        axes.set_ylabel("proportion (95 % interval)")
        axes.set_title(statistic)
        path = Path(directory) / _file_name("prevalence", statistic)
        figure.savefig(path, format="png")
        written.append(path)
    return written


def _grid(count: int) -> tuple[int, int]:
    columns = min(3, max(count, 1))
    return math.ceil(max(count, 1) / columns), columns


def plot_histograms(rows: Sequence[ReportRow], directory: Path) -> list[Path]:
    """One PNG per histogram statistic, a panel per cell: merged noisy bins with interval whiskers.

    Display post-processing: bins (and interval bounds) below 0 are drawn at 0.
    """
    written = []
    for statistic, mine in _by_statistic(rows, "histogram").items():
        cells = _by_cell(mine)
        nrows, ncols = _grid(len(cells))
        figure = new_figure(4.0 * ncols, 3.2 * nrows)
        for index, (cell, bins) in enumerate(cells.items()):
            axes = figure.add_subplot(nrows, ncols, index + 1)
            axes.set_title(_cell_label(cell), fontsize="small")
            if all(b.value.suppressed for b in bins) or any(b.left is None or b.right is None for b in bins):
                axes.text(0.5, 0.5, "suppressed", transform=axes.transAxes, ha="center")
                continue
            lefts = [float(b.left) for b in bins]  # type: ignore[arg-type]
            widths = [float(b.right) - float(b.left) for b in bins]  # type: ignore[arg-type]
            heights = [max(b.value.estimate, 0.0) for b in bins]
            centres = [lo + w / 2 for lo, w in zip(lefts, widths, strict=True)]
            below = [h - max(b.value.lower, 0.0) for h, b in zip(heights, bins, strict=True)]
            above = [max(max(b.value.upper, 0.0) - h, 0.0) for h, b in zip(heights, bins, strict=True)]
            axes.bar(lefts, heights, width=widths, align="edge", color="C0", alpha=0.7, edgecolor="white")
            axes.errorbar(centres, heights, yerr=[[max(x, 0.0) for x in below], above], fmt="none", ecolor="black",
                          capsize=2, linewidth=0.8)
            axes.set_ylim(bottom=0)
        figure.suptitle(f"{statistic} (noisy bins below 0 drawn at 0)", fontsize="medium")
        path = Path(directory) / _file_name("histogram", statistic)
        figure.savefig(path, format="png")
        written.append(path)
    return written


def plot_survival(rows: Sequence[ReportRow], directory: Path) -> list[Path]:
    """One PNG per survival statistic: a step curve per cell from S = 1 at the first edge, with its band."""
    written = []
    for statistic, mine in _by_statistic(rows, "survival").items():
        figure = new_figure(7.0, 4.5)
        axes = figure.add_subplot()
        for index, (cell, points) in enumerate(_by_cell(mine).items()):
            colour = f"C{index % 10}"
            kept = [p for p in points if p.left is not None and p.right is not None and not math.isnan(p.value.estimate)]
            if not kept:
                continue
            times = [float(kept[0].left)] + [float(p.right) for p in kept]  # type: ignore[arg-type]
            values = [1.0] + [p.value.estimate for p in kept]
            lower = [1.0] + [p.value.lower for p in kept]
            upper = [1.0] + [p.value.upper for p in kept]
            axes.step(times, values, where="post", color=colour, label=_cell_label(cell))
            axes.fill_between(times, lower, upper, step="post", color=colour, alpha=0.2, linewidth=0)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("time")
        axes.set_ylabel("survival (95 % band)")
        axes.set_title(statistic)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        path = Path(directory) / _file_name("survival", statistic)
        figure.savefig(path, format="png")
        written.append(path)
    return written


# ---------------------------------------------------------------- files and MLflow


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    table: Path
    csv: Path
    plots: tuple[Path, ...] = field(default=())

    def all(self) -> tuple[Path, ...]:
        return (self.table, self.csv, *self.plots)


TABLE_FILE = "estimates.txt"
CSV_FILE = "estimates.csv"


def write_report(rows: Sequence[ReportRow], directory: Path, *, title: str = "Study estimates") -> ReportFiles:
    """Write the table (text), the CSV and every plot the rows call for into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / TABLE_FILE
    table.write_text(render_table(rows, title=title), encoding="utf-8")
    plots = [*plot_proportions(rows, directory), *plot_histograms(rows, directory), *plot_survival(rows, directory)]
    return ReportFiles(table, write_csv(rows, directory / CSV_FILE), tuple(plots))


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]+")


def metric_key(row: ReportRow) -> str:
    """The MLflow metric name of a row: ``statistic/cell/quantity``, characters MLflow refuses as ``_``."""
    parts = (row.statistic, ".".join(row.cell) if row.cell else "all", row.quantity)
    return "/".join(_METRIC_NAME.sub("_", part).strip() or "_" for part in parts)


def _metrics(rows: Iterable[ReportRow]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for row in rows:
        if row.kind not in METRIC_KINDS or row.value.suppressed:
            continue
        key = metric_key(row)
        metrics[key] = row.value.estimate
        metrics[f"{key}/lower"] = row.value.lower
        metrics[f"{key}/upper"] = row.value.upper
        metrics[f"{key}/sites"] = float(row.value.sites)
    return metrics  # the tracker drops non-finite values


ARTIFACT_DIR = "study"


def log_report(
    tracker: Tracker,
    rows: Sequence[ReportRow],
    directory: Path,
    *,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    title: str = "Study estimates",
) -> str:
    """Record the study as one tracked run; returns its run id.

    Parameters: `params` (flattened, e.g. the spec and each site's ε). Metrics (step 0):
    each estimate of the kinds in :data:`METRIC_KINDS` as ``statistic/cell/quantity``
    with ``/lower``, ``/upper`` and ``/sites``; suppressed cells and histogram bins are
    not metrics (the CSV has them). Artifacts under ``study/``: the table, the CSV and
    the plots, written to `directory` first. A failure after the run starts marks it
    FAILED with the reason, then re-raises.
    """
    run_id = tracker.start(experiment=experiment, run_name=run_name, params=params, tags=dict(tags or {}))
    try:
        files = write_report(rows, directory, title=title)
        tracker.log_metrics(_metrics(rows), step=0)
        for path in files.all():
            tracker.log_artifact(path, ARTIFACT_DIR)
    except BaseException as error:
        tracker.finish(failed=True, reason=f"{type(error).__name__}: {error}")
        raise
    tracker.finish()
    return run_id
