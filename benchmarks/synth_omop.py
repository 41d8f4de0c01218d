"""Synthetic alliance v2 (OMOP): seconds to write and megabytes on disk, against the flat v1 alliance.

Times, over the same hospitals and seed:

- ``flat``: ``medfed.synth.write_alliance`` (one cohort CSV + Parquet per hospital: the v1
  demo's generator, the baseline);
- ``omop``: ``medfed.synth_omop.write_omop_alliance`` (seven OMOP tables and the ground
  truth per hospital).

Goal (issue 11): a default 3-hospital OMOP alliance in well under a minute and under
100 MB. Each variant runs ``--repeats`` times in turn; the best time of each is kept.
Prints a table; with ``--json`` writes the numbers. A benchmark, not a test: nothing here
asserts.

    .venv/bin/python benchmarks/synth_omop.py --hospitals 3 --scale 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medfed.synth import write_alliance  # noqa: E402
from medfed.synth_omop import write_omop_alliance  # noqa: E402


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()

    best = {"flat": float("inf"), "omop": float("inf")}
    size, patients = {}, {}
    for _ in range(args.repeats):
        for variant in best:
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch)
                start = time.perf_counter()
                if variant == "flat":
                    sites = write_alliance(out, n_hospitals=args.hospitals, seed=args.seed)
                else:
                    sites = write_omop_alliance(out, n_hospitals=args.hospitals, seed=args.seed,
                                                patients_scale=args.scale)
                best[variant] = min(best[variant], time.perf_counter() - start)
                size[variant] = _size(out)
                patients[variant] = sum(site.n_patients for site in sites)
    print(f"{args.hospitals} hospitals, seed {args.seed}, OMOP scale {args.scale}; best of {args.repeats}; "
          f"Python {platform.python_version()}")
    print(f"{'variant':8} {'patients':>9} {'seconds':>9} {'MB':>8} {'x flat':>8}")
    for variant in best:
        print(f"{variant:8} {patients[variant]:9d} {best[variant]:9.2f} {size[variant] / 1e6:8.1f} "
              f"{best[variant] / best['flat']:8.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seconds": best,
                                         "bytes": size, "patients": patients}, indent=2))


if __name__ == "__main__":
    main()
