"""A decision made in the console is the decision the CLI makes: the same audit entries, from the same
functions (governance.approve, deny, revoke), differing only in the officer's name and the time."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from clients.hospital_node.cli import app as node_cli
from clients.hospital_node.console.app import create_app
from clients.hospital_node.home import NodeHome

from .conftest import OFFICER, SPEC, Clock, form_token, log_in

DIGEST = SPEC.digest()
CLI_OFFICER = "cli-officer"


def _new_entries(home: NodeHome, before: int) -> list[tuple[str, dict[str, Any]]]:
    return [(e.kind, dict(e.payload)) for e in home.audit_log().entries()[before:]]


def _console_decides(home: NodeHome, clock: Clock, fields: dict[str, str]) -> None:
    """Review, then confirm, one decision in the console, as an officer's browser posts it."""
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        log_in(client)
        csrf = form_token(client.get("/requests").text)
        review = client.post("/decide", data={"csrf": csrf, **fields})
        assert review.status_code == 200, review.text
        confirm = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', review.text.split('id="confirm-form"')[1]))
        done = client.post("/decide", data=confirm, follow_redirects=False)
        assert done.status_code == 303, done.text
        assert done.headers["location"] == f"/requests/{DIGEST}/htn_cohort?done={fields['action']}"


def _cli(home: NodeHome, *args: str) -> None:
    result = CliRunner().invoke(node_cli, [*args, "--home", str(home.path), "--by", CLI_OFFICER])
    assert result.exit_code == 0, result.output


def _same_but_officer(console: list[tuple[str, dict[str, Any]]], cli: list[tuple[str, dict[str, Any]]]) -> None:
    assert [kind for kind, _ in console] == [kind for kind, _ in cli]
    for (_, mine), (_, theirs) in zip(console, cli, strict=True):
        assert mine.pop("by") == OFFICER and theirs.pop("by") == CLI_OFFICER
        assert mine == theirs


@pytest.mark.parametrize(("fields", "args"), [
    ({"action": "approve", "spec_hash": DIGEST[:12], "dataset": "htn_cohort", "max_epsilon": "4.5", "expires": "2031-06-30", "runs": "3"},
     ("approve", DIGEST[:12], "--dataset", "htn_cohort", "--max-epsilon", "4.5", "--expires", "2031-06-30", "--runs", "3")),
    ({"action": "approve", "spec_hash": DIGEST[:12], "dataset": "htn_cohort", "max_epsilon": "", "expires": "", "runs": "1"},
     ("approve", DIGEST[:12], "--dataset", "htn_cohort")),
    ({"action": "deny", "spec_hash": DIGEST[:12], "dataset": "", "reason": "the cohort is too young for this question"},
     ("deny", DIGEST[:12], "--reason", "the cohort is too young for this question")),
], ids=["approve-with-limits", "approve-plain", "deny"])
def test_the_console_and_the_cli_write_the_same_decision(
    site_copy: Callable[[str], NodeHome], clock: Clock, fields: dict[str, str], args: tuple[str, ...]
) -> None:
    by_console, by_cli = site_copy("console"), site_copy("cli")
    start = len(by_console.audit_log().entries())
    _console_decides(by_console, clock, fields)
    _cli(by_cli, *args)
    console, cli = _new_entries(by_console, start), _new_entries(by_cli, start)
    assert [kind for kind, _ in console] == ["approval" if fields["action"] == "approve" else "denial"]
    _same_but_officer(console, cli)


def test_a_revocation_in_the_console_is_the_clis(site_copy: Callable[[str], NodeHome], clock: Clock) -> None:
    by_console, by_cli = site_copy("console"), site_copy("cli")
    _cli(by_console, "approve", DIGEST, "--dataset", "htn_cohort")
    _cli(by_cli, "approve", DIGEST, "--dataset", "htn_cohort")
    start = len(by_console.audit_log().entries())
    _console_decides(by_console, clock, {"action": "revoke", "spec_hash": DIGEST, "dataset": "htn_cohort",
                                         "reason": "consent withdrawn"})
    _cli(by_cli, "revoke", DIGEST, "--dataset", "htn_cohort", "--reason", "consent withdrawn")
    console, cli = _new_entries(by_console, start), _new_entries(by_cli, start)
    assert [kind for kind, _ in console] == ["revocation"]
    _same_but_officer(console, cli)


def test_the_request_page_shows_the_change_from_the_last_approved_version(client: TestClient, home: NodeHome) -> None:
    from clients.hospital_node import governance

    from ..conftest import example_spec
    from .conftest import ask

    governance.approve(home, DIGEST, dataset="htn_cohort", by=OFFICER)
    changed = example_spec(federation={"rounds": 4}, privacy={"noise_multiplier": 1.3})
    ask(home, spec=changed)
    page = client.get(f"/requests/{changed.digest()}/htn_cohort").text
    assert "Against spec" in page and DIGEST[:16] in page and "2 field(s) differ" in page
    rows = re.findall(r"<tr><td><code>([^<]+)</code></td><td>[^<]*</td><td><del>([^<]+)</del></td>\s*<td><ins>([^<]+)</ins>", page)
    assert rows == [("federation.rounds", "2", "4"), ("privacy.noise_multiplier", "1.0", "1.3")]
