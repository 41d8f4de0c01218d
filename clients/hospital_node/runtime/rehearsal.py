"""Rehearsal homes: how the installed ClientApp finds its virtual hospital's home on Flower's simulation engine.

On a real node the executor hands the ClientApp ``node_config = {"home": <its home>}``
(:mod:`clients.hospital_node.runtime.executor`) and nothing here is used. Flower's
simulation engine gives each virtual node only ``partition-id`` and ``num-partitions``;
which home a partition is stays a node-side decision: the environment of the process
running the ClientApp names a folder of rehearsal homes (:data:`HOMES_ENV`), whose
manifest (:data:`MANIFEST`) lists the homes in partition order. The coordinator's run
config never names a home.

Only homes created as rehearsal homes (``[node] rehearsal = true``) are served this
way, so a simulation can never charge a real node's ledger, and a real node's executor
refuses a rehearsal home (:func:`refuse_rehearsal_home`), so the rehearsal keys and
approvals such a home accepts never reach real data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clients.hospital_node.errors import NodeError

__all__ = ["HOMES_ENV", "MANIFEST", "node_config", "refuse_rehearsal_home", "write_manifest"]

#: The environment variable naming the folder of a rehearsal's node homes.
HOMES_ENV = "MEDFED_REHEARSAL_HOMES"
#: The file in that folder listing the home folders in partition order (JSON: {"homes": [...]}).
MANIFEST = "rehearsal.json"
# Flower's simulation node config keys (flwr.common.constant PARTITION_ID_KEY, NUM_PARTITIONS_KEY).
_PARTITION_ID = "partition-id"
_NUM_PARTITIONS = "num-partitions"


def write_manifest(folder: Path, homes: list[str]) -> Path:
    """Record the home folders (names inside `folder`) of a rehearsal, partition i being ``homes[i]``."""
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"homes": homes}, indent=0) + "\n")
    tmp.replace(path)
    return path


def _manifest(folder: Path) -> list[str]:
    path = folder / MANIFEST
    try:
        homes = json.loads(path.read_text()).get("homes")
    except (OSError, ValueError, AttributeError) as err:
        raise NodeError(f"{HOMES_ENV}={folder} has no readable {MANIFEST} ({err}); prepare it with `medfed simulate`") from None
    if not isinstance(homes, list) or not all(isinstance(h, str) and h and "/" not in h for h in homes):
        raise NodeError(f"{path} must hold {{\"homes\": [<home folder name>, ...]}}")
    return homes


def node_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The node config the handlers get: a real node's as it is; a virtual node's with its rehearsal home.

    A config with ``home`` is a real node's (the executor sets it) and is returned
    unchanged. One with Flower's ``partition-id`` and no ``home`` is a simulation's: the
    home is entry ``partition-id`` of the manifest in ``$MEDFED_REHEARSAL_HOMES``, and it
    must be a rehearsal home.

    Raises
    ------
    NodeError
        No home can be found, the partition is outside the manifest, or the home is a real one.
    """
    if "home" in config or _PARTITION_ID not in config:
        return config
    folder = os.environ.get(HOMES_ENV, "")
    if not folder:
        raise NodeError(
            f"this virtual node (partition {config[_PARTITION_ID]}) has no home: set {HOMES_ENV} to the folder "
            "of rehearsal homes in the environment of the Ray workers (`medfed simulate` does)"
        )
    homes = _manifest(Path(folder))
    partition = config[_PARTITION_ID]
    if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < len(homes):
        raise NodeError(f"partition {partition!r} is outside the {len(homes)} rehearsal homes in {folder}")
    if config.get(_NUM_PARTITIONS) not in (None, len(homes)):
        raise NodeError(
            f"the simulation runs {config.get(_NUM_PARTITIONS)} virtual nodes but {folder} holds {len(homes)} "
            "rehearsal homes; run as many virtual nodes as homes"
        )
    home = Path(folder) / homes[partition]
    from clients.hospital_node.home import NodeHome

    if not NodeHome.open(home).rehearsal:
        raise NodeError(f"{home} is a real node's home; a simulation serves rehearsal homes only")
    return {"home": str(home), "rehearsal": True}


def refuse_rehearsal_home(home: Path) -> None:
    """A real node's runtime refuses to serve a rehearsal home (it would accept rehearsal keys and approvals).

    Raises
    ------
    NodeError
        If `home` is a rehearsal home.
    """
    from clients.hospital_node.home import NodeHome

    if NodeHome.open(home).rehearsal:
        raise NodeError(f"{home} is a rehearsal home (a virtual hospital of `medfed simulate`); no SuperNode serves it")
