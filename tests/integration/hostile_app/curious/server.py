"""The outsider's ServerApp: two query waves to every node, and a report of what came back."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    wanted = int(context.run_config["nodes"])
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    report = []
    for wave in (1, 2):  # a second wave: the node must not log a refusal per message
        messages = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=120):
            entry = {"wave": wave, "node": reply.metadata.src_node_id}
            if reply.has_error():
                entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
            else:
                entry["loot"] = json.loads(str(reply.content["loot"]["loot"]))
            report.append(entry)
    Path(str(context.run_config["report"])).write_text(json.dumps(report, indent=1))
