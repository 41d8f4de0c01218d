"""The executor's gate, and the Flower-internal runtime API it is written against."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run, RunStatus

from clients.hospital_node.home import NodeHome
from clients.hospital_node.runtime.executor import FLWR_VERSION, NodeExecutor
from clients.hospital_node.runtime.allowed_apps import remove_app
from federation.release import APP_ID, installed_identity, stage_release

ROOT = Path(__file__).resolve().parents[4]
HOSTILE_APP = ROOT / "tests" / "integration" / "hostile_app"


@pytest.fixture(scope="module")
def release_fab(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_fab_from_disk(stage_release(tmp_path_factory.mktemp("stage")))


@pytest.fixture
def executor(tmp_path: Path) -> NodeExecutor:
    home = NodeHome.create(tmp_path / "node", name="hospital_1")
    return NodeExecutor(home.path, "127.0.0.1:9", b"secret")


def _run(fab_id: str, version: str, content: bytes, *, fab_hash: str | None = None) -> tuple[Run, Fab]:
    digest = fab_hash or hashlib.sha256(content).hexdigest()
    run = Run(
        run_id=7, fab_id=fab_id, fab_version=version, fab_hash=digest, override_config={}, pending_at="", starting_at="",
        running_at="", finished_at="", status=RunStatus("running", "", ""), flwr_aid="", federation_id="",
        primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0,
    )
    return run, Fab(digest, content, {})


def test_the_installed_release_is_served(executor: NodeExecutor, release_fab: bytes) -> None:
    verdict = executor.judge("flwr-clientapp", *_run(APP_ID, installed_identity().version, release_fab))
    assert verdict.allowed, verdict.reason
    assert verdict.app["digest"] == installed_identity().digest


def test_an_outsiders_app_is_refused_with_its_identity(executor: NodeExecutor) -> None:
    fab = build_fab_from_disk(HOSTILE_APP)
    verdict = executor.judge("flwr-clientapp", *_run("outsider/curious", "1.0.0", fab))
    assert not verdict.allowed
    assert "outsider/curious 1.0.0" in verdict.reason and "is not on its allow-list" in verdict.reason
    assert verdict.app["app_id"] == "outsider/curious" and len(verdict.app["digest"]) == 64


def test_our_name_and_version_on_other_code_is_refused(executor: NodeExecutor, release_fab: bytes) -> None:
    fab = build_fab_from_disk(HOSTILE_APP)
    verdict = executor.judge("flwr-clientapp", *_run(APP_ID, installed_identity().version, fab))
    assert not verdict.allowed and "is not on its allow-list" in verdict.reason


def test_a_bundle_that_does_not_match_the_runs_hash_is_refused(executor: NodeExecutor, release_fab: bytes) -> None:
    verdict = executor.judge("flwr-clientapp", *_run(APP_ID, installed_identity().version, release_fab, fab_hash="0" * 64))
    assert not verdict.allowed and "does not match the hash the run declares" in verdict.reason


def test_agent_tasks_are_refused(executor: NodeExecutor, release_fab: bytes) -> None:
    verdict = executor.judge("flwr-agentapp", *_run(APP_ID, installed_identity().version, release_fab))
    assert not verdict.allowed and "serves ClientApp tasks only" in verdict.reason


def test_a_release_hospital_it_removed_is_refused_from_the_next_message(executor: NodeExecutor, release_fab: bytes) -> None:
    run = _run(APP_ID, installed_identity().version, release_fab)
    assert executor.judge("flwr-clientapp", *run).allowed
    remove_app(NodeHome.open(executor.home), installed_identity().digest[:12], by="it-admin")
    assert not executor.judge("flwr-clientapp", *run).allowed


# ---------------------------------------------------------------- the pin


def test_flower_is_the_release_whose_runtime_api_the_executor_speaks() -> None:
    import flwr

    pinned = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("flwr")]
    assert pinned == [f"flwr[simulation]=={FLWR_VERSION}"]  # the simulation extra adds Ray, not another Flower
    assert flwr.__version__ == FLWR_VERSION, (
        f"the node executor speaks flwr {FLWR_VERSION}'s internal runtime API; flwr {flwr.__version__} is installed. "
        "Re-read flwr/supernode/runtime/run_clientapp.py and the runtime handlers before changing the pin."
    )


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("flwr.proto.runtime_pb2", ["AcquireTaskRequest", "PullTaskInputRequest", "PullAppMessagesRequest", "PushTaskOutputRequest", "SendTaskHeartbeatRequest"]),
        ("flwr.supercore.runtime", ["RuntimeHttpClient"]),
        ("flwr.supercore.interceptors", ["RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor", "SuperExecAuthHttpInterceptor"]),
        ("flwr.supercore.retry", ["make_simple_http_retry_invoker"]),
        ("flwr.supercore.inflatable.inflatable_utils", ["pull_and_inflate_object_from_tree"]),
        ("flwr.supercore.inflatable.inflatable_protobuf_utils", ["make_pull_object_fn_protobuf", "make_confirm_message_received_fn_protobuf"]),
        ("flwr.supernode.runtime.run_clientapp", ["push_message"]),
        ("flwr.common.serde", ["context_from_proto", "context_to_proto", "fab_from_proto", "message_from_proto", "run_from_proto"]),
    ],
)
def test_the_runtime_api_the_executor_uses_is_there(module: str, names: list[str]) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in names if not hasattr(loaded, name)]
    assert not missing, f"{module} no longer has {missing}: the node executor must be re-checked against this Flower"


def test_the_supernode_still_guards_task_acquisition_with_the_superexec_secret() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec

    source = inspect.getsource(run_superexec)
    assert re.search(r'"/flwr\.proto\.Runtime/AcquireTask"', source), "the SuperExec auth method names changed"
    assert {TaskType.CLIENT_APP.value, TaskType.AGENT_APP.value} == {"flwr-clientapp", "flwr-agentapp"}
