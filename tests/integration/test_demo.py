"""`medfed demo` stops every process it started when interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [str(Path(sys.executable).parent / "medfed"), "demo", "--hospitals", "2", "--rounds", "3", "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 120
        while "hospital nodes online" not in " ".join(log.read_text(errors="replace").split()):  # rich may wrap lines
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo's cluster never came up"
            time.sleep(0.2)
        assert _processes_mentioning(str(workdir)), "the node services should be running now"
        demo.send_signal(sig)
        assert demo.wait(timeout=60) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "interrupted" in log.read_text()
    assert _processes_mentioning(str(workdir)) == []


def test_the_statistics_demo_prints_each_dp_answer_beside_the_truth_and_each_sites_epsilon(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "demo", "--task", "statistics", "--hospitals", "2", "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False, env={**os.environ, "COLUMNS": "160"},
    )
    output = " ".join(done.stdout.split())  # rich may wrap lines
    assert done.returncode == 0, done.stdout + done.stderr
    for study in ("htn-prevalence-age-sex", "htn-onset-survival-by-sex"):
        assert f"{study}: DP answer beside the true value" in output
    assert "htn_prevalence" in output and "S(365)" in output
    assert output.count("ε each site's dataset was charged by this study") == 2
    assert "hospital_1 1.00" in output and "hospital_2 1.00" in output
    assert "every process stopped" in output
    assert _processes_mentioning(str(workdir)) == []
