"""The imaging package's table of contents."""

from __future__ import annotations

import subprocess
import sys

import imaging


def test_exports_are_sorted_and_resolve() -> None:
    assert imaging.__all__ == sorted(imaging.__all__)
    for name in imaging.__all__:
        assert getattr(imaging, name) is not None


def test_importing_the_errors_does_not_pull_in_pydicom() -> None:
    code = "import sys, imaging.errors; print('pydicom' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
