"""The node executor: serves the SuperNode's tasks with the medfed ClientApp its hospital installed.

By default a Flower SuperNode starts a SuperExec that installs each run's app bundle and
imports the ClientApp inside it: whoever can submit a run chooses the code a hospital
executes. A medfed node starts ``flower-supernode --isolation process`` instead, which
runs no app at all, and this long-lived executor beside it (started and supervised by
:mod:`clients.hospital_node.runtime.supervisor`). For each task the SuperNode holds it:

1. acquires the task through the SuperNode's runtime API (``AcquireTask``, signed with
   the SuperExec auth secret only the node's own processes hold);
2. pulls the run, its app bundle and the message *header*, and checks the run's app
   identity (:func:`federation.release.bundle_identity`: id, version, content digest,
   read from the bundle as data) against the node's allow-list
   (:mod:`clients.hospital_node.runtime.allowed_apps`). A run that is not allowed is
   refused with ``REFUSED_APP`` before the message's content is pulled, any data is
   read or any key is used; the refusal is one signed audit entry per run, not per
   message, so a flood of messages cannot fill the log;
3. otherwise pulls the message and calls the installed ClientApp
   (``clients.hospital_node.client_app.app``) in this process, with the node config this
   executor was started with (never the one in the task's context);
4. pushes the reply (every task gets one: the SuperNode waits for it before it takes the
   next message) and the context back (SecAgg+ keeps its per-run state there), sending
   task heartbeats while the handler runs.

Torch, Opacus and the rest stay imported between messages (warmed up at start, on a
background thread), so a round costs its training, not a process start and a 4 s import.

The runtime API is internal to Flower: this module is written against flwr 1.39.0, which
medfed pins, and refuses to start under any other version (a test fails loudly too).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.supercore.runtime import RuntimeHttpClient

__all__ = ["FLWR_VERSION", "SUPEREXEC_METHODS", "NodeExecutor", "main", "run", "warm_up"]

logger = logging.getLogger(__name__)

#: The Flower release whose internal runtime API this executor speaks.
FLWR_VERSION = "1.39.0"
# The runtime API methods the SuperNode guards with the SuperExec auth secret.
SUPEREXEC_METHODS = frozenset(
    {"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks", "/flwr.proto.Runtime/ClaimTask"}
)
_HEARTBEAT_SECONDS = 15.0  # Flower expires a task token after about 2 x 30 s without one
# Right after a task the next message of a wave (SecAgg+ sends four) comes soon: ask often,
# then back off, so an idle node costs its SuperNode a few requests a second.
_POLL_SECONDS = (0.02, 0.25)


def check_flower_version() -> None:
    """Refuse to run against a Flower whose internal runtime API this module was not written for."""
    import flwr

    if flwr.__version__ != FLWR_VERSION:
        raise SystemExit(
            f"medfed's node executor speaks Flower {FLWR_VERSION}'s internal runtime API; "
            f"this environment has flwr {flwr.__version__}. Install flwr=={FLWR_VERSION}."
        )


@dataclass(frozen=True)
class Verdict:
    """Whether a run may be served; `reason` says why not, for the researcher and the audit log."""

    allowed: bool
    reason: str
    app: dict[str, str]


class _Heartbeat:
    """Task heartbeats on a thread; a refused heartbeat marks the task lost (no SIGINT, unlike Flower's)."""

    def __init__(self, client: RuntimeHttpClient) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        self._client, self._request = client, SendTaskHeartbeatRequest()
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(_HEARTBEAT_SECONDS):
            try:
                if not self._client.SendTaskHeartbeat(self._request).success:
                    self.lost = True
                    logger.warning("the SuperNode no longer knows the task in progress (its token expired)")
                    return
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is retried at the next beat
                logger.debug("task heartbeat failed: %s", err)


class NodeExecutor:
    """Serves the SuperNode's tasks for one node home (see the module docstring).

    Parameters
    ----------
    home
        The node home: allow-list, audit log, and the ``home`` node config the ClientApp gets.
    runtime_address
        The SuperNode's runtime API, ``127.0.0.1:<port>``.
    secret
        The SuperExec auth secret the SuperNode was started with.
    idle_exit
        Stop serving after this many seconds without a task (the on-demand mode of the
        node service, which starts the executor again for the next task); None: never.
    """

    def __init__(
        self,
        home: Path,
        runtime_address: str,
        secret: bytes,
        *,
        poll: tuple[float, float] = _POLL_SECONDS,
        idle_exit: float | None = None,
    ) -> None:
        self.home = home
        self.runtime_address = runtime_address
        self.secret = secret
        self.poll = poll
        self.idle_exit = idle_exit
        self._refused_runs: set[int] = set()
        self._identities: dict[str, Any] = {}  # fab hash -> AppIdentity | BundleError text

    # ------------------------------------------------------------------ the loop
    def serve(self, stop: threading.Event) -> None:
        """Acquire and serve tasks until `stop` is set (or, with `idle_exit`, until idle that long)."""
        import time

        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self._seed_refused_runs()
        self._check_node_state()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,  # loopback; the secret authenticates us, the task token each task
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods=SUPEREXEC_METHODS),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        # Agent tasks are acquired too, only to be refused: the SuperNode would wait forever.
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP, TaskType.AGENT_APP])
        logger.info("node executor serving %s for node home %s", self.runtime_address, self.home)
        shortest, longest = self.poll
        wait = shortest
        last_task = time.monotonic()
        try:
            while not stop.is_set():
                answer = client.AcquireTask(request)
                if answer.HasField("task") and answer.token:
                    self.serve_task(answer.token, answer.task)
                    wait, last_task = shortest, time.monotonic()
                elif self.idle_exit is not None and time.monotonic() - last_task >= self.idle_exit:
                    logger.info("no task for %g s: stopping until the next one", self.idle_exit)
                    return
                else:
                    stop.wait(wait)
                    wait = min(wait * 1.5, longest)
        finally:
            client.close()

    def serve_task(self, token: str, task: Any) -> None:
        """Serve one acquired task: refuse it, or run the installed ClientApp; always reply."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, message_from_proto, run_from_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest, PushTaskOutputRequest
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message

        from federation.protocol import REFUSED_APP, refusal_reason

        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        context: Context | None = None
        header: Message | None = None
        replied = False
        sub_status, details = SubStatus.FAILED, "the node executor could not serve the task"
        try:
            with _Heartbeat(client) as heartbeat:
                task_input = client.PullTaskInput(PullTaskInputRequest())
                context = context_from_proto(task_input.context)
                run = run_from_proto(task_input.run)
                pulled = client.PullMessages(PullAppMessagesRequest())
                if not pulled.messages_list:
                    details = "the SuperNode had no message for the task"
                    return
                tree = pulled.message_object_trees[0]
                header = message_from_proto(pulled.messages_list[0])  # metadata only: no content pulled yet
                header.metadata.__dict__["_message_id"] = tree.object_id
                verdict = self.judge(str(task.type), run, fab_from_proto(task_input.fab))
                if not verdict.allowed:
                    self._record_refusal(run.run_id, header.metadata.message_type, verdict)
                    self._discard(client, tree.object_id, context)
                    reply = Message(Error(code=REFUSED_APP, reason=refusal_reason(self._site(), verdict.reason)), reply_to=header)
                    sub_status, details = SubStatus.COMPLETED, "refused: app not on the node's allow-list"
                else:
                    message = self._pull_message(client, tree, context)
                    reply, sub_status, details = self._handle(message, context)
                if heartbeat.lost:
                    details = "the task's token expired while it ran; the reply was not sent"
                    return
                push_message(client, reply, context)
                replied = True
        except Exception as err:  # noqa: BLE001 - one task's failure must not stop the node
            logger.error("serving task %s failed: %s", getattr(task, "task_id", "?"), type(err).__name__)
            logger.debug("%s", "".join(traceback.format_tb(err.__traceback__)))
            if header is not None and context is not None and not replied:
                # The SuperNode takes no next message before this one has a reply.
                reason = "the node executor could not serve this message; the hospital's IT finds why in the node's log"
                try:
                    push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=header), context)
                except Exception as again:  # noqa: BLE001
                    logger.error("could not send the error reply either: %s", type(again).__name__)
        finally:
            try:
                client.PushTaskOutput(
                    PushTaskOutputRequest(
                        context=context_to_proto(context) if context is not None else None,
                        sub_status=sub_status,
                        details=details,
                    )
                )
            except Exception as err:  # noqa: BLE001
                logger.error("could not report the task's end to the SuperNode: %s", type(err).__name__)
            client.close()

    @staticmethod
    def _discard(client: RuntimeHttpClient, message_object_id: str, context: Context) -> None:
        """Let the SuperNode drop a refused message's content unread (a flood must not fill its memory)."""
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
        from flwr.proto.node_pb2 import Node

        client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=Node(node_id=context.node_id), run_id=context.run_id, message_object_id=message_object_id)
        )

    # ------------------------------------------------------------------ the gate
    def judge(self, task_type: str, run: Any, fab: Any) -> Verdict:
        """May this node serve `run` (a Flower Run) with bundle `fab`? Reads the bundle as data only."""
        import hashlib

        from flwr.supercore.constant import TaskType

        from clients.hospital_node.errors import NodeError
        from clients.hospital_node.runtime.allowed_apps import AllowedApps
        from federation.release import BundleError, bundle_identity

        claimed = {"app_id": str(run.fab_id), "version": str(run.fab_version), "fab_hash": str(run.fab_hash)}
        if task_type != TaskType.CLIENT_APP:
            return Verdict(False, f"this node serves ClientApp tasks only; the run asks for {task_type!r}", claimed)
        if hashlib.sha256(fab.content).hexdigest() != run.fab_hash:
            return Verdict(False, "the run's app bundle does not match the hash the run declares", claimed)
        known = self._identities.get(run.fab_hash)
        if known is None:
            try:
                known = bundle_identity(run.fab_id, run.fab_version, fab.content)
            except BundleError as err:
                known = str(err)
            self._identities[run.fab_hash] = known
        if isinstance(known, str):
            return Verdict(False, known, claimed)
        app = {**claimed, "digest": known.digest}
        try:
            allowed = AllowedApps(self.home).allows(known)
        except NodeError as err:
            return Verdict(False, f"the node's allow-list is unreadable ({err})", app)
        if not allowed:
            return Verdict(
                False,
                f"this node runs only the medfed releases its hospital installed and allowed; the run's app "
                f"{known} is not on its allow-list",
                app,
            )
        return Verdict(True, "", app)

    def _record_refusal(self, run_id: int, message_type: str, verdict: Verdict) -> None:
        """One signed audit entry per refused run (a flood of messages adds nothing)."""
        from federation.protocol import REFUSED_APP

        if run_id in self._refused_runs:
            return
        logger.warning("refused run %s: %s", run_id, verdict.reason)
        try:
            self._home().audit_log().append(
                "refusal",
                {"run": str(run_id), "message": message_type, "code": REFUSED_APP, "reason": verdict.reason, "app": verdict.app},
            )
        except Exception as err:  # noqa: BLE001 - the refusal stands; the log says why it is silent
            logger.error("could not record the refusal of run %s in the audit log: %s", run_id, err)
            return
        self._refused_runs.add(run_id)

    def _check_node_state(self) -> None:
        """The full verification at start (audit log, ledger, running composition), which records the
        checkpoint every message then checks from; a failure removes it, so each message is refused."""
        from clients.hospital_node.governance import Refusal, full_check

        try:
            full_check(self._home())
        except Refusal as err:
            logger.error("the node's state failed its full check at start; every message will be refused: %s", err.reason)
        except Exception as err:  # noqa: BLE001 - each message checks again and says why it refuses
            logger.error("could not run the node's full check at start: %s", err)
        else:
            logger.info("node state verified in full; audit checkpoint recorded")

    def _seed_refused_runs(self) -> None:
        from federation.protocol import REFUSED_APP

        try:
            entries = self._home().audit_log().entries()
        except Exception as err:  # noqa: BLE001 - admission reports an unreadable log per message
            logger.warning("could not read the audit log for earlier refusals: %s", err)
            return
        for entry in entries:
            if entry.kind == "refusal" and entry.payload.get("code") == REFUSED_APP:
                try:
                    self._refused_runs.add(int(entry.payload.get("run", "")))
                except ValueError:
                    continue

    # ------------------------------------------------------------------ serving
    def _pull_message(self, client: RuntimeHttpClient, tree: Any, context: Context) -> Message:
        from flwr.app import Message
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        node = Node(node_id=context.node_id)
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id
        return message

    def _handle(self, message: Message, context: Context) -> tuple[Message, str, str]:
        """Run the installed ClientApp on `message`; an unexpected failure becomes an error reply."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus

        from clients.hospital_node.client_app import app

        context.node_config = {"home": str(self.home)}  # ours, not what the task carried
        try:
            return app(message=message, context=context), SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - answer the coordinator; the details stay on the node
            name = type(err).__name__
            logger.error("the ClientApp raised %s on a %s message", name, message.metadata.message_type)
            logger.debug("%s", "".join(traceback.format_tb(err.__traceback__)))
            reason = f"the node's ClientApp failed ({name}); the hospital's IT finds the details in the node's log"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), SubStatus.FAILED, name

    def _home(self):  # type: ignore[no-untyped-def]
        from clients.hospital_node.home import NodeHome

        return NodeHome.open(self.home)

    def _site(self) -> str:
        try:
            return str(self._home().name)
        except Exception:  # noqa: BLE001
            return "unconfigured node"


def warm_up() -> None:
    """Import what training needs once, off the serving thread."""
    try:
        import models.training  # noqa: F401
        import clients.hospital_node.rounds  # noqa: F401
        import clients.hospital_node.connectors  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a handler will import (and report) it again
        logger.warning("warming up the executor failed: %s", err)


def main(argv: list[str] | None = None) -> int:
    """``python -m clients.hospital_node.runtime.executor --home H --runtime-api ADDR --secret-file F``."""
    parser = argparse.ArgumentParser(prog="medfed-node-executor", description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's runtime API, HOST:PORT")
    parser.add_argument("--secret-file", required=True, type=Path, help="the SuperExec auth secret (0600)")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit (code 0) after this many seconds without a task")
    args = parser.parse_args(argv)
    return run(args.home, args.runtime_api, args.secret_file, idle_exit=args.idle_exit)


def run(home: Path, runtime_api: str, secret_file: Path, *, idle_exit: float | None = None, warm_up: bool = True) -> int:
    """Serve the node home `home` until SIGTERM or SIGINT (or `idle_exit` seconds without a task); the exit code.

    The executor's process, or a child forked from a pre-imported parent
    (:mod:`clients.hospital_node.runtime.forkserver`, which has warmed up already).

    Raises
    ------
    SystemExit
        With the reason, if the home is a rehearsal home or the secret is empty.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s medfed-executor: %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API request otherwise
    check_flower_version()
    from clients.hospital_node.errors import NodeError
    from clients.hospital_node.runtime.rehearsal import refuse_rehearsal_home

    try:
        refuse_rehearsal_home(home.resolve())
    except NodeError as err:
        raise SystemExit(str(err)) from None
    secret = secret_file.read_bytes()
    if not secret:
        raise SystemExit(f"the SuperExec auth secret {secret_file} is empty")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("stopping on signal %d", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if warm_up:
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    NodeExecutor(home.resolve(), runtime_api, secret, idle_exit=idle_exit).serve(stop)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
