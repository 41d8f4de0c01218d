"""Promise 2 from the coordinator's side: every number that reached it is a node's accounted release.

Walks the replies the coordinator received for a submission (``received.jsonl``,
:mod:`federation.received`) and checks each number against the signed audit log of the
node that sent it: a DP release's recorded output (with its declared post-processing),
or an accounting value the node recorded with the same reply; and each node's ledger
holds a charge for every release its log records. Under SecAgg+ a reply also carries
Flower's legacy fit result, whose weight must be the released training size and whose
arrays must be empty, and SecAgg+'s own record (keys, shares, the masked vector: random
to the coordinator), which the node's record must say left masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.hospital_node.governance import ledger_disagreement, verified_entries
from clients.hospital_node.home import NodeHome
from federation.protocol import ACCOUNTING_METRICS, SCORE_METRICS
from federation.received import read_received

__all__ = ["assert_every_number_is_accounted"]

_SECURE = {"secaggplus_configs", "fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"}


def _accounted(metrics: dict[str, float], record: dict[str, Any]) -> list[str]:
    """The metrics of a reply that `record` (one release entry of the node's audit log) does not account for."""
    releases = record.get("dp_releases") or {}
    accounting = record.get("accounting") or {}
    wrong = []
    for key, value in metrics.items():
        if key in ACCOUNTING_METRICS:
            ok = accounting.get(key) == value
        elif key == "num-examples":
            release = releases.get("num-examples")
            ok = release is not None and release["post_processing"] == "max(1, output)" and value == max(1, *release["output"])
        elif key in SCORE_METRICS:
            release = releases.get("eval-scores")
            ok = release is not None and release["post_processing"] == "none" and value == release["output"][SCORE_METRICS.index(key)]
        else:
            ok = False  # no other number may leave
        if not ok:
            wrong.append(f"{key}={value}")
    return wrong


def assert_every_number_is_accounted(received: Path, homes: dict[str, Path]) -> int:
    """Check every reply in `received` against its node's audit log (`homes`: site name -> node home); returns the numbers checked."""
    checked = 0
    entries = {site: verified_entries(NodeHome.open(home)) for site, home in homes.items()}
    for site, home in homes.items():
        assert ledger_disagreement(NodeHome.open(home), entries[site]) == [], site  # every recorded release is charged
    replies = read_received(received)
    assert replies, f"{received} holds no reply"
    # SecAgg+'s setup, share-keys and unmask replies carry only its own record: the node's
    # other replies name its site.
    sites = {r["node"]: r["records"]["node"]["values"]["site"] for r in replies if "node" in r["records"]}
    for reply in replies:
        if reply["error"] is not None:
            continue  # a refusal: a code and a reason, no number
        records = reply["records"]
        site = sites[reply["node"]]
        if set(records) == {"secaggplus_configs"}:
            continue  # keys, shares or the unmasking shares: the protocol's own, no release of ours
        metrics = dict(records.get("metrics", {}).get("values", {}))
        assert set(records) <= {"node", "metrics", "arrays", *_SECURE}, (site, sorted(records))  # nothing else
        if "fitres.parameters" in records:  # SecAgg+'s collect stage: the update left only masked
            assert records["fitres.parameters"]["shapes"] == {}, site
            assert not records.get("fitres.metrics", {}).get("values"), site
            metrics["num-examples"] = records["fitres.num_examples"]["values"]["num_examples"]  # SecAgg+'s weight
        candidates = [
            e.payload for e in entries[site]
            if e.kind == "release" and e.payload.get("run") == str(reply["flower_run"])
            and e.payload.get("message") == reply["message_type"].split(".")[0]
            and ("secaggplus_configs" not in records or e.payload.get("secure_aggregation", {}).get("masked") is True)
        ]
        problems = [_accounted(metrics, record) for record in candidates]
        assert any(not p for p in problems), (site, reply["message_type"], problems or "no release record")
        checked += len(metrics)
    return checked
