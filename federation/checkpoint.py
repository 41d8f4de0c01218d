"""The coordinator's checkpoint of one submission: what a restarted coordinator continues from.

After every completed round the ServerApp writes, into the submission's output folder
(``<output-dir>/<submission id>/``):

``round-<r>.npz``     the global model after round r (the arrays of an ``ArrayRecord``);
``checkpoint.json``   the round, the per-round metric history, each site's per-round
                      metrics by site name (node ids may change when a SuperLink restarts
                      without node authentication), the MLflow run id, the Flower runs of
                      the submission so far, whether the submission finished, and
                      whether it is held between rounds (the operator's ``HOLD`` file);
                      with node sampling, the submission's schedule (by node id, as
                      the nodes recorded it) and each site's late and refused rounds.

``checkpoint.json`` is replaced atomically (files 0600 in a 0700 folder: the
coordinator's state is its operator's alone) and only after its arrays file is complete,
so a coordinator killed at any moment leaves the previous checkpoint or the new one,
never half of one. Older arrays files are removed once a newer checkpoint stands.
Nothing in it is patient data: the model, aggregate and per-site metrics, and ids.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord

from federation.errors import FederationError
from privacy.private_files import make_private_folder, publish

__all__ = ["CHECKPOINT_FILE", "Checkpoint"]

CHECKPOINT_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    """Where a submission stands on the coordinator."""

    submission_id: str
    spec_digest: str
    round: int  # the last completed round (0: none yet)
    tracking_run_id: str
    arrays: ArrayRecord | None = None
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    site_rounds: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    flower_runs: list[int] = field(default_factory=list)
    finished: bool = False
    held: bool = False  # waiting between rounds on the operator's HOLD file
    schedule: dict[str, Any] | None = None  # federation.schedule.RoundSchedule.to_mapping()
    site_late: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # replied after the deadline
    site_refused: dict[str, dict[int, str]] = field(default_factory=dict)  # refused or failed rounds, with the reason
    site_sent: dict[str, list[int]] = field(default_factory=dict)  # the rounds a train message went to each site

    def save(self, folder: Path) -> Path:
        """Write the checkpoint into `folder` (0700; files 0600), atomically (see the module docstring)."""
        make_private_folder(folder)
        arrays_file = None
        if self.arrays is not None:
            arrays_file = f"round-{self.round}.npz"
            publish(folder / arrays_file, _arrays_bytes(self.arrays))
        state = {
            "submission_id": self.submission_id,
            "spec_digest": self.spec_digest,
            "round": self.round,
            "tracking_run_id": self.tracking_run_id,
            "arrays_file": arrays_file,
            "history": {str(k): v for k, v in self.history.items()},
            "site_rounds": {site: {str(r): m for r, m in rounds.items()} for site, rounds in self.site_rounds.items()},
            "flower_runs": [str(run) for run in self.flower_runs],
            "finished": self.finished,
            "held": self.held,
            "schedule": self.schedule,
            "site_late": {site: {str(r): m for r, m in rounds.items()} for site, rounds in self.site_late.items()},
            "site_refused": {site: {str(r): why for r, why in rounds.items()} for site, rounds in self.site_refused.items()},
            "site_sent": self.site_sent,
        }
        path = folder / CHECKPOINT_FILE
        publish(path, json.dumps(state, indent=1, sort_keys=True))
        for old in folder.glob("round-*.npz"):
            if old.name != arrays_file:
                old.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in `folder`, or None if there is none.

        Raises
        ------
        FederationError
            The checkpoint is unreadable or its arrays file is missing.
        """
        path = folder / CHECKPOINT_FILE
        try:
            state: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise FederationError(f"the checkpoint {path} is unreadable ({err}); move it away to start the submission afresh") from None
        arrays = None
        if state.get("arrays_file"):
            try:
                arrays = _load_arrays(folder / str(state["arrays_file"]))
            except (OSError, ValueError) as err:
                raise FederationError(f"the checkpoint's model {folder / str(state['arrays_file'])} is unreadable ({err})") from None
        return cls(
            submission_id=str(state["submission_id"]),
            spec_digest=str(state["spec_digest"]),
            round=int(state["round"]),
            tracking_run_id=str(state["tracking_run_id"]),
            arrays=arrays,
            history={int(k): dict(v) for k, v in state.get("history", {}).items()},
            site_rounds={site: {int(r): dict(m) for r, m in rounds.items()} for site, rounds in state.get("site_rounds", {}).items()},
            flower_runs=[int(run) for run in state.get("flower_runs", [])],
            finished=bool(state.get("finished", False)),
            held=bool(state.get("held", False)),
            schedule=state.get("schedule"),
            site_late={site: {int(r): dict(m) for r, m in rounds.items()} for site, rounds in state.get("site_late", {}).items()},
            site_refused={site: {int(r): str(why) for r, why in rounds.items()} for site, rounds in state.get("site_refused", {}).items()},
            site_sent={site: [int(r) for r in rounds] for site, rounds in state.get("site_sent", {}).items()},
        )


def _arrays_bytes(arrays: ArrayRecord) -> bytes:
    import numpy as np

    names = list(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, __names__=np.array(names), **{f"a{i}": arrays[name].numpy() for i, name in enumerate(names)})
    return buffer.getvalue()


def _load_arrays(path: Path) -> ArrayRecord:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        names = [str(name) for name in data["__names__"]]
        return ArrayRecord({name: Array(data[f"a{i}"]) for i, name in enumerate(names)})
