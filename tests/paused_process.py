"""A real process paused inside a chosen call and killed there: crash tests without sleeps.

The child runs `code` after wrapping `target` (``"module:Class.method"``): its `at`-th
call prints ``paused`` and waits on stdin, which nobody writes. The test reads that line,
so it knows exactly how far the child got, and SIGKILLs it, as a power cut or the OOM
killer would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["kill_when_paused"]

ROOT = Path(__file__).resolve().parents[1]

_HOOK = """
import importlib, sys
_path = {path!r}
_owner = importlib.import_module({module!r})
for _name in _path[:-1]:
    _owner = getattr(_owner, _name)
_original = getattr(_owner, _path[-1])
_calls = 0
def _paused(*args, **kwargs):
    global _calls
    _calls += 1
    if _calls == {at}:
        print("paused", flush=True)
        sys.stdin.read()
    return _original(*args, **kwargs)
setattr(_owner, _path[-1], _paused)
"""


def kill_when_paused(target: str, at: int, code: str, args: Sequence[str] = ()) -> None:
    """Run `code` (``sys.argv[1:]`` is `args`) with `target` paused at its `at`-th call, then SIGKILL it there."""
    module, _, path = target.partition(":")
    script = _HOOK.format(module=module, path=tuple(path.split(".")), at=at) + code
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line == "paused\n", process.stderr.read() if process.stderr else "no output"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
