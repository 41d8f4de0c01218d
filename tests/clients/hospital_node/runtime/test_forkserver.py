"""The executor fork server reads a request as data: three paths and an idle time, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital_node.runtime.forkserver import ForkedExecutor, _parse, ping


def test_a_request_names_a_home_a_runtime_api_and_a_secret_file() -> None:
    request = _parse(b'{"home": "/srv/a", "runtime_api": "127.0.0.1:9", "secret_file": "/srv/a/run/s", "idle_exit": 30}')
    assert request == {"home": "/srv/a", "runtime_api": "127.0.0.1:9", "secret_file": "/srv/a/run/s", "idle_exit": 30}


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown request field\\(s\\) module; known: home, runtime_api, secret_file, idle_exit"):
        _parse(b'{"home": "/a", "runtime_api": "x", "secret_file": "/s", "module": "os"}')


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1, 2]", "not one JSON object"),
        (b"\xff", "not one JSON object"),
        (b'{"home": "", "runtime_api": "x", "secret_file": "/s"}', "home must be a non-empty string"),
        (b'{"home": "/a", "runtime_api": "x", "secret_file": "/s", "idle_exit": -1}', "idle_exit must be a number > 0 or null; found -1"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _parse(raw)


def test_no_fork_server_is_no_executor(tmp_path: Path) -> None:
    assert not ping(tmp_path / "absent.sock", timeout=0.5)
    with pytest.raises(OSError):
        ForkedExecutor(tmp_path / "absent.sock", home=tmp_path, runtime_api="127.0.0.1:1", secret_file=tmp_path / "s", idle_exit=None)
