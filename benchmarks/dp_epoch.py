"""DP-SGD local epoch against a plain epoch of the same model and data.

A hospital node trains one local epoch per round: ``ceil(1 / sample_rate)`` Poisson
steps over 1000-2500 patients with 16 features. This measures, for each tabular model,
the time per epoch (median of ``--repeats`` after ``--warmup`` untimed epochs; printed
in milliseconds, in seconds in the JSON) of

- ``plain``: `models.training.train_plain`, the baseline every ratio is taken against;
- ``train_dp``: `models.training.train_dp`;
- ``opacus-default``: ``PrivacyEngine().make_private`` over ``DataLoader(TensorDataset)``
  with Poisson sampling, as Opacus's tutorials write it (grad_sample_mode "hooks");
- variants over in-memory tensors, each through Opacus's own classes: the grad-sample
  modes ``hooks``, ``functorch``, ``ew`` (expanded weights: the previous `train_dp`)
  and ``ghost`` (ghost clipping), and torch's default thread count against one thread.

Every variant includes its per-call setup (wrapping the model, building the optimizer),
as a node pays it every round. Variants are interleaved round-robin so that load from
other processes spreads over all of them, one-thread variants in one block and
multi-threaded ones in another (see `Variant`). ``--phases`` splits a plain and a DP
step into their parts; ``--cold-repeats`` adds the first epoch in a fresh process,
imports included, which is what a Flower ClientApp pays per round.

Run from the repository root: ``python benchmarks/dp_epoch.py [--json results.json]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from models.tabular import build_tabular_model
from models.training import train_dp, train_plain

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class Workload:
    """One benchmarked configuration: a model kind on a synthetic cohort."""

    model: str
    n: int
    features: int
    sample_rate: float

    @property
    def steps(self) -> int:
        return math.ceil(1 / self.sample_rate)

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.n))


@dataclass(frozen=True)
class Result:
    model: str
    n: int
    variant: str
    description: str
    seconds_median: float
    seconds: list[float]
    ratio_to_plain: float


# A variant runs one epoch of `workload` on `model` (which it must leave unwrapped).
Epoch = Callable[[nn.Module, torch.Tensor, torch.Tensor, Workload], None]


# Torch's intra-op thread count for this machine, read before anything changes it.
DEFAULT_THREADS = torch.get_num_threads()


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads; None keeps torch's default for this machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload) -> None:
    train_plain(model, x, y, sample_rate=w.sample_rate, steps=w.steps, learning_rate=LEARNING_RATE)


def plain_default_threads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload) -> None:
    """Plain SGD on the same schedule, written out to run on torch's default threads."""
    sgd = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    with threads(None):
        for _ in range(w.steps):
            batch = (torch.rand(w.n) < w.sample_rate).nonzero().squeeze(1)
            sgd.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(x[batch]), y[batch], reduction="sum")
            (loss / w.expected_batch_size).backward()
            sgd.step()


def dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload) -> None:
    train_dp(
        model,
        x,
        y,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        sample_rate=w.sample_rate,
        steps=w.steps,
        learning_rate=LEARNING_RATE,
    )


def opacus_default(count: int | None) -> Epoch:
    """PrivacyEngine + DataLoader(TensorDataset), Poisson sampling, grad_sample_mode hooks."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    def epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload) -> None:
        with threads(count):
            module = copy.deepcopy(model)  # make_private wraps it; keep `model` clean
            optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
            loader = DataLoader(TensorDataset(x, y), batch_size=w.expected_batch_size)
            module, optimizer, loader = PrivacyEngine().make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=True,
            )
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(module(xb), yb).backward()
                optimizer.step()
            module._close()

    return epoch


def tensors_mode(mode: str, count: int | None) -> Epoch:
    """Opacus's per-sample machinery of `mode` driven over in-memory tensors."""
    from opacus.grad_sample import (
        GradSampleModule,
        GradSampleModuleExpandedWeights,
        GradSampleModuleFastGradientClipping,
    )
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    def epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload) -> None:
        with threads(count):
            sgd = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
            dp_args = dict(
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                expected_batch_size=w.expected_batch_size,
                loss_reduction="mean",
            )
            if mode == "ghost":
                gsm = GradSampleModuleFastGradientClipping(
                    model, loss_reduction="mean", max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True
                )
                optimizer = DPOptimizerFastGradientClipping(sgd, **dp_args)
                criterion = DPLossFastGradientClipping(gsm, optimizer, nn.BCEWithLogitsLoss(), loss_reduction="mean")
            elif mode == "ew":
                gsm = GradSampleModuleExpandedWeights(model, loss_reduction="sum")
                optimizer = DPOptimizer(sgd, **dp_args)
            else:
                gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
                optimizer = DPOptimizer(sgd, **dp_args)
            for _ in range(w.steps):
                batch = (torch.rand(w.n) < w.sample_rate).nonzero().squeeze(1)
                optimizer.zero_grad(set_to_none=True)
                if mode == "ghost":
                    criterion(gsm(x[batch]), y[batch]).backward()
                elif len(batch) or mode != "ew":  # expanded weights refuse an empty batch
                    F.binary_cross_entropy_with_logits(gsm(x[batch]), y[batch], reduction="sum").backward()
                else:
                    for p in model.parameters():
                        p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
            gsm._close()

    return epoch


def phases(w: Workload, *, repeats: int, seed: int) -> dict[str, dict[str, float]]:
    """Milliseconds per epoch spent in each part of a plain and a DP step (one thread).

    The DP step is `train_dp`'s for these models (one flat parameter, closed-form
    per-sample gradients), driven piece by piece through Opacus's public ``DPOptimizer``
    methods so each can be timed.
    """
    from models.training import _flat_chain_step

    x, y = cohort(w, seed)
    model = build_tabular_model(w.model, w.features)
    totals: dict[str, dict[str, float]] = {"plain": {}, "dp": {}}
    with threads(1):
        for kind, parts in totals.items():
            for round_ in range(repeats + 1):
                laps: dict[str, float] = {}

                def lap(part: str, since: float) -> float:
                    now = time.perf_counter()
                    laps[part] = laps.get(part, 0.0) + now - since
                    return now

                t = time.perf_counter()
                if kind == "dp":
                    private = _flat_chain_step(
                        model.linear_chain(),
                        learning_rate=LEARNING_RATE,
                        noise_multiplier=NOISE_MULTIPLIER,
                        max_grad_norm=MAX_GRAD_NORM,
                        expected_batch_size=w.expected_batch_size,
                    )
                    optimizer = private.optimizer
                    sgd = optimizer.original_optimizer
                    t = lap("setup", t)
                else:
                    sgd = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
                for _ in range(w.steps):
                    batch = (torch.rand(w.n) < w.sample_rate).nonzero().squeeze(1)
                    xb, yb = x[batch], y[batch]
                    t = lap("sample", t)
                    if kind == "dp":
                        optimizer.zero_grad(set_to_none=True)
                        t = lap("zero_grad", t)
                        private.backward(xb, yb)
                        t = lap("per-sample gradients", t)
                        optimizer.clip_and_accumulate()
                        t = lap("opacus clip", t)
                        optimizer.add_noise()
                        t = lap("opacus noise", t)
                        optimizer.scale_grad()
                        t = lap("opacus scale", t)
                    else:
                        sgd.zero_grad(set_to_none=True)
                        t = lap("zero_grad", t)
                        loss = F.binary_cross_entropy_with_logits(model(xb), yb, reduction="sum")
                        t = lap("forward", t)
                        (loss / w.expected_batch_size).backward()
                        t = lap("backward", t)
                    sgd.step()
                    t = lap("sgd step", t)
                if kind == "dp":
                    private.summed_loss()
                    private.close()
                    lap("loss and close", t)
                if round_:  # the first round warms up
                    for part, seconds in laps.items():
                        parts[part] = parts.get(part, 0.0) + seconds * 1e3 / repeats
    return totals


@dataclass(frozen=True)
class Variant:
    description: str
    epoch: Epoch
    # Runs with more than one intra-op thread. Such variants are timed in a block of
    # their own: OpenMP workers still spinning after one delay whatever runs next
    # (measured here: +15-70% on the following one-thread epoch).
    multithreaded: bool = False


def variants() -> dict[str, Variant]:
    many = DEFAULT_THREADS > 1
    return {
        "plain": Variant("train_plain (baseline)", plain),
        "train_dp": Variant("models.training.train_dp", dp),
        "plain-default-threads": Variant(
            f"plain SGD loop, torch default threads ({DEFAULT_THREADS})", plain_default_threads, many
        ),
        "opacus-default": Variant(
            f"PrivacyEngine + DataLoader, hooks, {DEFAULT_THREADS} threads", opacus_default(None), many
        ),
        "opacus-default-1t": Variant("PrivacyEngine + DataLoader, hooks, 1 thread", opacus_default(1)),
        "hooks": Variant(
            f"tensors, GradSampleModule hooks, {DEFAULT_THREADS} threads",
            tensors_mode("hooks", None),
            many,
        ),
        "hooks-1t": Variant("tensors, GradSampleModule hooks, 1 thread", tensors_mode("hooks", 1)),
        "functorch-1t": Variant("tensors, GradSampleModule functorch, 1 thread", tensors_mode("functorch", 1)),
        "ew-1t": Variant("tensors, expanded weights, 1 thread (the previous train_dp)", tensors_mode("ew", 1)),
        "ghost-1t": Variant("tensors, ghost clipping, 1 thread", tensors_mode("ghost", 1)),
    }


def cohort(w: Workload, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded synthetic cohort whose labels follow a logistic model of the features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(w.n, w.features, generator=g)
    logits = x @ torch.randn(w.features, generator=g)
    y = (torch.rand(w.n, generator=g) < torch.sigmoid(logits)).float()
    return x, y


def measure(w: Workload, chosen: dict[str, Variant], *, repeats: int, warmup: int, seed: int) -> list[Result]:
    """Median seconds per epoch of each variant, round-robin within each thread block."""
    x, y = cohort(w, seed)
    model = build_tabular_model(w.model, w.features)
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for multithreaded in (False, True):
        block = {name: v for name, v in chosen.items() if v.multithreaded is multithreaded}
        for round_ in range(warmup + repeats):
            for name, variant in block.items():
                start = time.perf_counter()
                variant.epoch(model, x, y, w)
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[name].append(elapsed)
    base = statistics.median(times["plain"])
    return [
        Result(
            model=w.model,
            n=w.n,
            variant=name,
            description=variant.description,
            seconds_median=statistics.median(times[name]),
            seconds=times[name],
            ratio_to_plain=statistics.median(times[name]) / base,
        )
        for name, variant in chosen.items()
    ]


COLD_SNIPPET = """
import time
start = time.perf_counter()
import torch
from models.tabular import build_tabular_model
from models.training import train_dp, train_plain
g = torch.Generator().manual_seed(0)
x = torch.randn({n}, {features}, generator=g)
y = (x[:, 0] > 0).float()
model = build_tabular_model({model!r}, {features})
imported = time.perf_counter()
if {private}:
    import opacus  # what train_dp imports on its first call
    imported = time.perf_counter()
    train_dp(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate={q}, steps={steps}, learning_rate=0.1)
else:
    train_plain(model, x, y, sample_rate={q}, steps={steps}, learning_rate=0.1)
done = time.perf_counter()
print(imported - start, done - imported)
"""


def cold(w: Workload, *, private: bool) -> tuple[float, float]:
    """(imports, first epoch) seconds in a fresh interpreter."""
    code = COLD_SNIPPET.format(
        n=w.n, features=w.features, model=w.model, private=private, q=w.sample_rate, steps=w.steps
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    imports, first = (float(v) for v in out.stdout.split())
    return imports, first


def machine() -> dict[str, object]:
    import opacus

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_default_threads": DEFAULT_THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = list(variants())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["logistic", "mlp"], choices=["logistic", "mlp"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 2500], help="patients per hospital")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--sample-rate", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant first")
    parser.add_argument("--variants", nargs="+", default=names, choices=names, help="'plain' is always run")
    parser.add_argument("--cold-repeats", type=int, default=1, help="fresh-process first epochs per model (0: skip)")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the parts of a plain and a DP step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.cold_repeats < 0:
        parser.error("--repeats must be >= 1 and --warmup, --cold-repeats >= 0")
    if not 0 < args.sample_rate <= 1:
        parser.error("--sample-rate must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Hooks on a first layer whose input needs no gradient make torch warn once per
    # process; it says nothing about speed.
    warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
    # PrivacyEngine's reminder that secure_mode is off; train_dp does not use it either.
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    every = variants()
    chosen = {name: every[name] for name in ["plain", *[v for v in args.variants if v != "plain"]]}
    results: list[Result] = []
    for kind in args.models:
        for n in args.sizes:
            w = Workload(model=kind, n=n, features=args.features, sample_rate=args.sample_rate)
            print(f"\n{kind}, n={n}, {w.features} features, q={w.sample_rate}, {w.steps} steps/epoch, "
                  f"expected batch {w.expected_batch_size}, median of {args.repeats}")
            print(f"  {'variant':22s} {'ms/epoch':>9s} {'x plain':>8s}  description")
            for r in measure(w, chosen, repeats=args.repeats, warmup=args.warmup, seed=args.seed):
                results.append(r)
                print(f"  {r.variant:22s} {r.seconds_median * 1e3:9.2f} {r.ratio_to_plain:8.2f}  {r.description}")
    phase_rows: list[dict[str, object]] = []
    if args.phases:
        n = max(args.sizes)
        print(f"\nwhere an epoch goes, n={n}, 1 thread (ms per epoch; mean of {args.repeats})")
        for kind in args.models:
            w = Workload(model=kind, n=n, features=args.features, sample_rate=args.sample_rate)
            for loop, parts in phases(w, repeats=args.repeats, seed=args.seed).items():
                phase_rows.append({"model": kind, "n": n, "loop": loop, "ms_per_epoch": parts})
                total = sum(parts.values())
                shown = "  ".join(f"{part} {ms:.2f}" for part, ms in parts.items())
                print(f"  {kind:9s} {loop:6s} total {total:6.2f}:  {shown}")
    cold_rows: list[dict[str, object]] = []
    if args.cold_repeats:
        n = max(args.sizes)
        print(f"\nfresh process, n={n}: imports, first epoch (seconds; median of {args.cold_repeats})")
        for kind in args.models:
            w = Workload(model=kind, n=n, features=args.features, sample_rate=args.sample_rate)
            for private in (False, True):
                runs = [cold(w, private=private) for _ in range(args.cold_repeats)]
                imports = statistics.median(r[0] for r in runs)
                first = statistics.median(r[1] for r in runs)
                label = "train_dp (+ import opacus)" if private else "train_plain"
                cold_rows.append({"model": kind, "n": n, "variant": label, "imports_s": imports, "first_epoch_s": first})
                print(f"  {kind:9s} {label:28s} imports {imports:7.3f}  first epoch {first:7.4f}")
    if args.json:
        payload = {
            "benchmark": "dp_epoch",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "hyperparameters": {
                "noise_multiplier": NOISE_MULTIPLIER,
                "max_grad_norm": MAX_GRAD_NORM,
                "learning_rate": LEARNING_RATE,
            },
            "results": [asdict(r) for r in results],
            "phases": phase_rows,
            "cold": cold_rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
