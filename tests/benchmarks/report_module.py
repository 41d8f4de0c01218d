"""Benchmark scripts imported once by the tests (benchmarks/ is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def benchmark_module(script: str, name: str | None = None) -> ModuleType:
    """``benchmarks/<script>.py`` as the module `name` (default: `script`), loaded on first use."""
    name = name or script
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def clinical_report() -> ModuleType:
    """``benchmarks/clinical_report.py`` as a module."""
    return benchmark_module("clinical_report")
