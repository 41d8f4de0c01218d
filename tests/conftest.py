"""Suite-wide: under pytest-xdist, the files that start real processes are handed out first.

`make test` runs two workers that take one test file at a time (``--dist loadfile``), in
collection order. A long integration file collected late keeps one worker busy after the
other has run out of files; handing out the files with integration tests first, then
those with slow tests, lets the many short files fill in around them. Within a file the
order is unchanged, and a run without workers keeps the order it collects.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        mark = 0 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 2
        rank[module] = min(rank.get(module, 2), mark)
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable: files stay whole and in order
