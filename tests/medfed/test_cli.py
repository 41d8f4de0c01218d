"""The `medfed` command at the terminal: a disk that refuses writes gives one line naming
the path and what to do, never a traceback; library warnings stay off the terminal."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clients.hospital_node.home import NodeHome
from medfed.synth import FEATURES, ID_COLUMN, LABEL
from privacy.keys import generate_keypair
from tests.clients.hospital_node.conftest import example_spec, governed_home

ROOT = Path(__file__).resolve().parents[2]
MEDFED = str(Path(sys.executable).parent / "medfed")
EXAMPLE = ROOT / "experiments" / "examples" / "hypertension.toml"

_PR_CAPBSET_DROP = 24
# Root passes permission bits by these capabilities; without them a 0500 folder is read-only to root too.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    """A governed node home with a dataset, a budget, a trusted partner, a pending request and a ledger."""
    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from clients.hospital_node.rounds import answer
    from tests.clients.hospital_node.conftest import signed_message

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 1, 1
    home = governed_home(tmp_path, "hospital_6")
    answer("query", signed_message(MessageType.QUERY, example_spec()), {"home": str(home.path)})
    return home


def _walk(root: Path) -> Iterator[Path]:
    yield root
    yield from root.rglob("*")


@pytest.fixture
def read_only(node: NodeHome) -> Iterator[Callable[[], None]]:
    """Makes the node home read-only for the commands under test (restored afterwards)."""
    paths = list(_walk(node.path))
    for path in reversed(paths):
        path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        yield _drop_root_overrides if os.geteuid() == 0 else (lambda: None)
    finally:
        for path in paths:
            path.chmod(0o700 if path.is_dir() else 0o600)


def _drop_root_overrides() -> None:
    """In the child, before exec: as root, give up the capabilities that ignore permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)


def _no_room() -> None:
    """In the child: no file may grow (RLIMIT_FSIZE 0), and the kernel says so with EFBIG, not a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _medfed(args: list[str], preexec: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [MEDFED, *args], capture_output=True, text=True, check=False, cwd=ROOT, preexec_fn=preexec, timeout=120
    )
    if done.returncode == 97:
        pytest.skip("cannot drop root's permission overrides here (no CAP_SETPCAP)")
    return done


def _writes(node: NodeHome, tmp_path: Path) -> list[list[str]]:
    """Every `medfed node` command that writes to the home."""
    home = ["--home", str(node.path)]
    partner = generate_keypair(tmp_path / "partner", "other_partner")
    digest = example_spec().digest()
    return [
        ["node", "budget", "set", "htn_cohort", "--epsilon", "5", "--delta", "1e-5", *home],
        ["node", "policy", "set", "min_cohort_size=50", *home],
        ["node", "partners", "add", "other_partner", str(partner.public_key_path), *home],
        ["node", "partners", "remove", "test_partner", *home],
        ["node", "approve", digest[:12], "--dataset", "htn_cohort", *home],
        ["node", "deny", digest[:12], "--reason", "not now", *home],
        ["node", "dataset", "add", "again", "--file", str(node.dataset("htn_cohort").path), "--id-column", ID_COLUMN,
         "--label-column", LABEL, "--features", ",".join(FEATURES), *home],
        ["node", "init", "--home", str(node.path / "inner"), "--name", "inner"],
    ]


def _reads(node: NodeHome, tmp_path: Path) -> list[list[str]]:
    """`medfed node` commands that only read: they work, or fail in one line."""
    home = ["--home", str(node.path)]
    return [
        ["node", "budget", *home], ["node", "requests", *home], ["node", "audit", "show", *home],
        ["node", "audit", "verify", *home], ["node", "egress", *home], ["node", "dataset", "list", *home],
        ["node", "policy", "show", *home], ["node", "partners", "list", *home], ["node", "status", *home],
        ["node", "doctor", *home], ["node", "report", "--out", str(tmp_path / "pack"), *home],
    ]


def _one_clear_line(done: subprocess.CompletedProcess[str], node: NodeHome, hint: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(node.path) in line and hint in line, line


def test_every_writing_node_command_on_a_read_only_home_says_so_in_one_line(
    node: NodeHome, tmp_path: Path, read_only: Callable[[], None]
) -> None:
    for args in _writes(node, tmp_path):
        done = _medfed(args, read_only)
        _one_clear_line(done, node, "run medfed as the user that owns")


def test_reading_node_commands_on_a_read_only_home_never_show_a_traceback(
    node: NodeHome, tmp_path: Path, read_only: Callable[[], None]
) -> None:
    for args in _reads(node, tmp_path):
        done = _medfed(args, read_only)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        if done.returncode == 2:
            _one_clear_line(done, node, "")


def test_every_writing_node_command_on_a_full_disk_says_so_in_one_line(node: NodeHome, tmp_path: Path) -> None:
    for args in _writes(node, tmp_path):
        done = _medfed(args, _no_room)
        _one_clear_line(done, node, "free space")


def test_cost_prints_no_library_warning_and_its_json_is_the_whole_stdout() -> None:
    done = subprocess.run([MEDFED, "experiment", "cost", str(EXAMPLE), "--json"], capture_output=True, text=True,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # Opacus's "Optimal order is the largest alpha" stays off the terminal
    assert json.loads(done.stdout)["epsilon_per_site"] > 0


def test_every_json_output_is_one_document(node: NodeHome) -> None:
    home = ["--home", str(node.path)]
    for args in (["node", "audit", "show", "--json", *home], ["node", "egress", "--json", *home],
                 ["node", "policy", "show", "--json", *home]):
        done = subprocess.run([MEDFED, *args], capture_output=True, text=True, check=False, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        json.loads(done.stdout)
        assert done.stderr == ""
