"""The empirical privacy check: its bounds over many audits, and its time against training the run once.

For runs of the example spec's mechanism on a synthetic hospital's cohort (site 2 of the
seed-7 alliance, the example's 16 features standardised; clipping norm 1, learning rate
0.5, sampling rate 0.05, ``--steps`` DP-SGD steps, delta 1e-5), with the noise multiplier
that the ledger's accountant sets for epsilon 1, 3 and 8, and the same schedule without
DP, this runs ``--seeds`` one-run audits each
(:func:`clients.hospital_node.privacy_check.audit_mechanism`: ``--canaries`` Dirac
canaries, 95 % confidence) and prints, per mechanism, the median, lowest and highest
lower bound, and how many audits put the bound above the epsilon charged (at 95 %
confidence at most 5 % should, if the accounting is right).

The time of one check is compared with the baseline of the same run's training:
`models.training.train_dp` over the same rows for the same steps in one call (what the
node's rounds cost in arithmetic), in the same process, interleaved.

Run from the repository root: ``python benchmarks/privacy_check.py [--seeds 20] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.hospital_node.privacy_check import MechanismPhase, audit_mechanism  # noqa: E402
from medfed.synth import FEATURES, LABEL, generate_cohort  # noqa: E402
from models.tabular import build_tabular_model  # noqa: E402
from models.training import train_dp  # noqa: E402
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon, noise_for_target  # noqa: E402
from privacy.events import DPEvent  # noqa: E402

DELTA, RATE, CLIP, LR = 1e-5, 0.05, 1.0, 0.5


def _rows() -> tuple[np.ndarray, np.ndarray]:
    frame = generate_cohort(2, n_hospitals=3, seed=7)
    x = frame[list(FEATURES)].to_numpy(np.float32)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    return x.astype(np.float32), frame[LABEL].to_numpy(np.float32)


def _train_once(x: np.ndarray, y: np.ndarray, sigma: float, steps: int) -> float:
    model = build_tabular_model("logistic", x.shape[1])
    start = time.perf_counter()
    train_dp(
        model, torch.from_numpy(x), torch.from_numpy(y), noise_multiplier=sigma, max_grad_norm=CLIP,
        sample_rate=RATE, steps=steps, learning_rate=LR, generator=torch.Generator().manual_seed(0),
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    x, y = _rows()
    results = []
    for target in (1.0, 3.0, 8.0, None):
        sigma = noise_for_target(target_epsilon=target or 8.0, delta=DELTA, sample_rate=RATE, steps=args.steps)
        charged = epsilon([DPEvent(sigma, RATE, args.steps)], delta=DELTA, accountant=LEDGER_ACCOUNTANT) if target else None
        phases = [MechanismPhase(sigma, RATE, args.steps)]
        bounds, check_times, train_times = [], [], []
        for seed in range(1, args.seeds + 1):
            train_times.append(_train_once(x, y, sigma, args.steps))
            start = time.perf_counter()
            bound = audit_mechanism(
                x, y, phases=phases, max_grad_norm=CLIP, learning_rate=LR, delta=DELTA, private=target is not None,
                canaries=args.canaries, seed=seed,
            )
            check_times.append(time.perf_counter() - start)
            bounds.append(bound.epsilon)
        row = {
            "mechanism": f"DP-SGD charged eps {charged:.3f} (sigma {sigma:.3f})" if target else "same schedule without DP",
            "charged": charged,
            "bound_median": statistics.median(bounds),
            "bound_min": min(bounds),
            "bound_max": max(bounds),
            "above_charge": sum(b > charged for b in bounds) if charged is not None else None,
            "check_seconds": statistics.median(check_times),
            "train_seconds": statistics.median(train_times),
        }
        results.append(row)
        above = f"{row['above_charge']}/{args.seeds} above the charge" if charged is not None else "-"
        print(
            f"{row['mechanism']:<42} bound median {row['bound_median']:.3f} [{row['bound_min']:.3f}, {row['bound_max']:.3f}]"
            f"  {above}  check {row['check_seconds']:.2f}s vs training once {row['train_seconds'] * 1000:.0f}ms"
            f" ({row['check_seconds'] / row['train_seconds']:.0f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "canaries": args.canaries, "results": results}, indent=2))


if __name__ == "__main__":
    main()
