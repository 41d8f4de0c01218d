"""Packaging guards: our packages come from this checkout, and the Flower App is declared."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clients", "experiments", "federation", "imaging", "medfed", "models", "privacy")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_imports_from_this_repository(name: str) -> None:
    # Generic names like `models` or `privacy` could be shadowed by another distribution.
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_pyproject_declares_the_flower_app_and_the_pins() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "federation.server_app:app",
        "clientapp": "clients.hospital_node.client_app:app",
    }
    deps = pyproject["project"]["dependencies"]
    # The Simulation Engine (Ray) runs `medfed simulate` rehearsals at the same pinned Flower.
    assert "torch==2.13.0" in deps and "flwr[simulation]==1.39.0" in deps


def test_client_app_module_imports_without_torch() -> None:
    # Flower starts a fresh process per message: the ClientApp module must import lightly.
    code = (
        "import sys, clients.hospital_node.client_app as m; "
        "heavy = sorted({'torch', 'opacus', 'pandas', 'mlflow'} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_hospital_side_never_imports_mlflow() -> None:
    code = (
        "import sys, clients.hospital_node.rounds, clients.hospital_node.cli; "
        "print('mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_console_templates_and_stylesheet_ship_with_the_package() -> None:
    # A wheel holds non-Python files only when package-data names them; the console renders these at run time.
    from fnmatch import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["clients"]
    console = ROOT / "clients" / "hospital_node" / "console"
    files = [p for folder in ("templates", "static") for p in (console / folder).iterdir() if p.is_file()]
    assert files
    for path in files:
        relative = path.relative_to(ROOT / "clients").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in globs), f"{relative} is not in [tool.setuptools.package-data] clients"
