"""The node service's settings: when the node executor runs is the hospital's choice, checked at the edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital_node.runtime.supervisor import SupervisorConfig, main, supervisor_argv


def _config(**changes: object) -> SupervisorConfig:
    return SupervisorConfig(home=Path("/srv/node"), superlink="127.0.0.1:9092", insecure=True, **changes)  # type: ignore[arg-type]


def test_a_warm_executor_is_the_default_and_adds_no_arguments() -> None:
    argv = supervisor_argv(_config())
    assert "--executor" not in argv and "--executor-idle" not in argv


def test_an_on_demand_executor_is_passed_with_its_idle_time() -> None:
    argv = supervisor_argv(_config(executor="on-demand", executor_idle_seconds=45.0))
    assert argv[argv.index("--executor") + 1] == "on-demand"
    assert argv[argv.index("--executor-idle") + 1] == "45"


def test_an_unknown_executor_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="executor must be one of warm, on-demand; found 'lazy'"):
        _config(executor="lazy")


def test_a_non_positive_idle_time_is_refused() -> None:
    with pytest.raises(ValueError, match="idle time must be > 0 seconds; found 0"):
        _config(executor="on-demand", executor_idle_seconds=0)


def test_the_service_says_why_it_will_not_start_with_a_bad_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["--home", str(tmp_path), "--superlink", "127.0.0.1:9092", "--insecure", "--executor", "sometimes"])
    assert code == 2
    assert "medfed node service: executor must be one of warm, on-demand; found 'sometimes'" in capsys.readouterr().out
