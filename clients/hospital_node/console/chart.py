"""A dataset's ε over time as an inline SVG, drawn on the server: the console needs no JavaScript.

Each charge is a numbered point on a step line of the dataset's cumulative ε (composed by
the ledger's accountant at the budget's delta, :func:`clients.hospital_node.report.epsilon_curve`),
with a tooltip naming its spec, run, round and release; the page lists the same points
in a table, so nothing depends on hovering. The budget is a dashed line and what live
run reservations hold on top of the spend a dotted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

__all__ = ["ChartPoint", "epsilon_svg"]

_W, _H = 760, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 24, 20, 48


@dataclass(frozen=True)
class ChartPoint:
    """One charge on the chart: when, the composed ε after it, and what it was."""

    number: int
    at: datetime
    epsilon: float
    spec: str  # short spec hash, or "-" when the audit log names none
    run: str
    round: int
    release: int


def _nice_top(value: float) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if value <= step * 5:
            return step * 5 if value > step * 4 else step * max(1, -(-value // step))
    return value


def epsilon_svg(points: Sequence[ChartPoint], *, budget: float | None, held: float | None, title: str) -> str:
    """The chart as an ``<svg>`` element (escaped text throughout), for a page to embed as is."""
    used = max([held or 0.0, *(p.epsilon for p in points), 0.0])
    # A spend far below the budget would lie flat on the axis: the chart then zooms to the spend and says
    # where the budget is, rather than drawing it.
    zoomed = budget is not None and used > 0 and budget > 4 * used
    top = _nice_top(max(used if zoomed else max(used, budget or 0.0), 0.1) * 1.15)
    if points:
        start, end = points[0].at, points[-1].at
    else:
        end = datetime.now().astimezone()
        start = end - timedelta(days=1)
    if end - start < timedelta(minutes=2):
        start, end = start - timedelta(minutes=1), end + timedelta(minutes=1)
    span = (end - start).total_seconds()
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(at: datetime) -> float:
        return _LEFT + plot_w * (at - start).total_seconds() / span

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - value / top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{escape(title)}" class="chart">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fbfbfb" stroke="#999"/>',
    ]
    for i in range(6):
        value = top * i / 5
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11">{value:g}</text>')
    # Ticks as fine as the span needs: seconds for a run watched live, days for a dataset's lifetime.
    tick = "%H:%M:%S" if span < 7200 else "%m-%d %H:%M" if span < 3 * 86400 else "%Y-%m-%d"
    for i in range(5):
        at = start + (end - start) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(f'<text x="{x(at):.1f}" y="{_TOP + plot_h + 16}" text-anchor="{anchor}" font-size="11">'
                     f"{escape(at.strftime(tick))}</text>")
    parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_H - 8}" text-anchor="middle" font-size="12">time (UTC)</text>')
    parts.append(f'<text x="14" y="{_TOP + plot_h / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {_TOP + plot_h / 2})">cumulative ε</text>')
    if budget is not None and zoomed:
        parts.append(f'<text x="{_LEFT + plot_w - 4}" y="{_TOP + 14}" text-anchor="end" font-size="11" fill="#b00">'
                     f"budget ε {budget:g}: above the chart (the spend is under a quarter of it)</text>")
    elif budget is not None:
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(budget):.1f}" y2="{y(budget):.1f}" '
                     'stroke="#b00" stroke-dasharray="6 4" stroke-width="1.5"/>')
        parts.append(f'<text x="{_LEFT + plot_w - 4}" y="{y(budget) - 5:.1f}" text-anchor="end" font-size="11" fill="#b00">'
                     f"budget ε {budget:g}</text>")
    if held is not None and points and held > points[-1].epsilon + 1e-9:
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(held):.1f}" y2="{y(held):.1f}" '
                     'stroke="#d80" stroke-dasharray="2 3" stroke-width="1.5"/>')
        parts.append(f'<text x="{_LEFT + 4}" y="{y(held) - 5:.1f}" font-size="11" fill="#a60">'
                     f"spent + reserved ε {held:.3f}</text>")
    if points:
        # A step line: ε stays flat between charges and rises at each.
        path = [f"M {x(points[0].at):.1f} {y(0):.1f}"]
        path += [f"H {x(point.at):.1f} V {y(point.epsilon):.1f}" for point in points]
        path.append(f"H {_LEFT + plot_w}")
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="#1f5fa8" stroke-width="2"/>')
        label_all = len(points) <= 40
        for point in points:
            tip = (f"charge {point.number}: spec {point.spec}, run {point.run}, round {point.round}, "
                   f"release {point.release}; ε {point.epsilon:.3f} after it ({point.at:%Y-%m-%d %H:%M:%S} UTC)")
            parts.append(f'<circle cx="{x(point.at):.1f}" cy="{y(point.epsilon):.1f}" r="4" fill="#1f5fa8">'
                         f"<title>{escape(tip)}</title></circle>")
            if label_all:
                parts.append(f'<text x="{x(point.at) + 5:.1f}" y="{y(point.epsilon) - 6:.1f}" font-size="10">{point.number}</text>')
    else:
        parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" font-size="13" '
                     'fill="#666">no charges yet</text>')
    parts.append("</svg>")
    return "\n".join(parts)
