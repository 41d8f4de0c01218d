"""A node home with a pending request, its officer's account, and a console client logged in as them."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from starlette.testclient import TestClient

from clients.hospital_node.console.accounts import OfficerAccounts, session_key
from clients.hospital_node.console.app import create_app
from clients.hospital_node.home import NodeHome
from clients.hospital_node.rounds import answer
from medfed.synth import FEATURES
from models.tabular import build_tabular_model

from ..conftest import example_spec, governed_home, signed_message

SPEC = example_spec(federation={"rounds": 2})
OFFICER = "dana.officer"
PASSWORD = "correct horse battery staple"


def ask(home: NodeHome, kind: str = "query", spec=SPEC, server_round: int = 1) -> Message:  # type: ignore[no-untyped-def]
    """What the coordinator's message of `kind` for `spec` gets from the node: a query records the request,
    a train message (once approved) trains one DP-SGD round and charges the ledger."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 41, 1, 1
    arrays = ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict()) if kind != "query" else None
    kinds = {"query": MessageType.QUERY, "train": MessageType.TRAIN}
    return answer(kind, signed_message(kinds[kind], spec, server_round=server_round, arrays=arrays), {"home": str(home.path)})


@pytest.fixture(scope="session")
def _pending_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once: a governed node home whose officer has an account and one pending request (SPEC on htn_cohort)."""
    folder = tmp_path_factory.mktemp("console") / "site"
    home = governed_home(folder, "hospital_5")
    ask(home)
    OfficerAccounts(home.path).add(OFFICER, PASSWORD)
    session_key(home.path, create=True)
    return folder


@pytest.fixture
def site_copy(_pending_site: Path, tmp_path: Path) -> Callable[[str], NodeHome]:
    """A fresh copy of the pending site per call (each test changes its own)."""

    def copy(name: str = "site") -> NodeHome:
        target = tmp_path / name
        shutil.copytree(_pending_site, target)
        return NodeHome.open(target / "home")

    return copy


@pytest.fixture
def home(site_copy: Callable[[str], NodeHome]) -> NodeHome:
    return site_copy("site")


class Clock:
    """The console's clock, moved by hand: sessions age without waiting."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def form_token(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


def log_in(client: TestClient, officer: str = OFFICER, password: str = PASSWORD):  # type: ignore[no-untyped-def]
    token = form_token(client.get("/login").text)
    return client.post("/login", data={"csrf": token, "officer": officer, "password": password}, follow_redirects=False)


@pytest.fixture
def client(home: NodeHome, clock: Clock) -> Iterator[TestClient]:
    """A browser of the console, logged in as OFFICER (sessions of 30 minutes)."""
    app = create_app(home.path, session_minutes=30, clock=clock)
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        assert log_in(test_client).status_code == 303
        yield test_client
