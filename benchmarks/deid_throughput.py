"""De-identification throughput, in files per second, against baselines in the same run.

Generates a synthetic CT corpus (``imaging.synth``), then times over the same files:

- ``plain``: pydicom read + write of each file, unchanged (the floor any tool pays);
- ``medfed``: ``imaging.deid.Deidentifier.deidentify_folder`` (read, Annex E basic
  profile, keyed UIDs and pseudonyms, SHA-256 of input and output, atomic write), one
  process, one thread;
- ``dicognito``: read, ``dicognito.anonymizer.Anonymizer().anonymize``, write, if the
  package is importable (``pip install -e '.[bench]'`` installs it; this script installs
  nothing).

Besides files per second it reports each variant's CPU time per file (all threads of
the process), so that a gain from parallelism would show as such.

Goals (issue): medfed >= 0.8x plain, >= 2x dicognito. Each variant runs ``--repeats``
times in turn; the best time of each is kept. Prints a table and, with ``--json``, writes
the numbers for BENCHMARKS.md. A benchmark, not a test: nothing here asserts.

    .venv/bin/python benchmarks/deid_throughput.py --patients 10 --slices 8 --size 512
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imaging.deid import Deidentifier  # noqa: E402
from imaging.synth import write_cohort  # noqa: E402


def _plain(files: list[Path], out: Path) -> None:
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.save_as(out / f"{index}.dcm")


def _medfed(source: Path, out: Path, workers: int = 1) -> None:
    deidentifier = Deidentifier(secret=b"benchmark-secret-".ljust(32, b"0"))
    report = deidentifier.deidentify_folder(source, out, workers=workers)
    if report.excluded:
        raise RuntimeError(f"{len(report.excluded)} files were excluded; the corpus should be clean")


def _dicognito(files: list[Path], out: Path) -> None:
    from dicognito.anonymizer import Anonymizer  # type: ignore[import-not-found]

    anonymizer = Anonymizer()
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{index}.dcm")


def _timed(run: Callable[[Path], None], work: Path) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (every thread) of one run."""
    out = work / "out"
    out.mkdir()
    wall, cpu = time.perf_counter(), time.process_time()
    run(out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shutil.rmtree(out)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--hospital", default="north", choices=("north", "east", "south"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also time medfed with this many processes (0: skip); the baseline stays one process",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="medfed-deid-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        cohort = write_cohort(
            corpus,
            hospital=args.hospital,
            modality="CT",
            n_patients=args.patients,
            slices=args.slices,
            size=args.size,
            burned_in_fraction=0.0,
        )
        files = sorted(cohort.files)
        n = len(files)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        # warm the page cache and the imports before timing anything
        _plain(files[:2], work)
        variants: dict[str, Callable[[Path], None]] = {
            "plain": lambda out: _plain(files, out),
            "medfed": lambda out: _medfed(corpus, out),
        }
        if args.workers > 1:
            variants[f"medfed-{args.workers}p"] = lambda out: _medfed(corpus, out, args.workers)
        if importlib.util.find_spec("dicognito") is not None:
            variants["dicognito"] = lambda out: _dicognito(files, out)
        seconds = {name: float("inf") for name in variants}
        cpu_seconds = {name: float("inf") for name in variants}
        for _ in range(args.repeats):  # interleave, so drift hits every variant alike
            for name, run in variants.items():
                wall, cpu = _timed(run, work)
                seconds[name] = min(seconds[name], wall)
                cpu_seconds[name] = min(cpu_seconds[name], cpu)

    rates = {name: n / s for name, s in seconds.items()}
    cpu_ms = {name: 1000 * c / n for name, c in cpu_seconds.items()}
    results: dict[str, object] = {
        "files": n,
        "megabytes": round(megabytes, 2),
        "image_size": args.size,
        "hospital": args.hospital,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "machine": platform.machine(),
        "files_per_second": {k: round(v, 1) for k, v in rates.items()},
        "medfed_vs_plain": round(rates["medfed"] / rates["plain"], 3),
        "cpu_ms_per_file": {k: round(v, 3) for k, v in cpu_ms.items()},
        "medfed_vs_plain_per_cpu_second": round(cpu_ms["plain"] / cpu_ms["medfed"], 3),
        "medfed_parallel_vs_plain": (
            round(rates[f"medfed-{args.workers}p"] / rates["plain"], 3) if args.workers > 1 else None
        ),
        "cpus": os.cpu_count(),
        "medfed_vs_dicognito": round(rates["medfed"] / rates["dicognito"], 3) if "dicognito" in rates else None,
        "dicognito": "measured" if "dicognito" in rates else "not installed; skipped",
    }
    print(f"corpus: {n} CT files, {megabytes:.1f} MB, {args.size}x{args.size}, hospital {args.hospital}")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:8.1f} files/s  ({seconds[name]:.3f} s best of {args.repeats}; "
              f"{cpu_ms[name]:.2f} CPU ms per file)")
    print(f"  medfed / plain read+write: {results['medfed_vs_plain']}x (goal >= 0.8x), one process each")
    print(f"  the same per CPU second:   {results['medfed_vs_plain_per_cpu_second']}x")
    if results["medfed_parallel_vs_plain"] is not None:
        print(f"  medfed with {args.workers} processes / plain: {results['medfed_parallel_vs_plain']}x")
    if results["medfed_vs_dicognito"] is not None:
        print(f"  medfed / dicognito:        {results['medfed_vs_dicognito']}x (goal >= 2x)")
    else:
        print("  dicognito: not installed; skipped (goal >= 2x not measured)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
