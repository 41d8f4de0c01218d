"""What the console's pages show, from the node's own records: the doctor checks, a budget with every
charge, the audit log filtered, what left and for whom, and the evidence pack as a download."""

from __future__ import annotations

import html
import io
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from clients.hospital_node import governance
from clients.hospital_node.console.app import create_app
from clients.hospital_node.home import NodeHome
from clients.hospital_node.service import NodeService

from .conftest import OFFICER, SPEC, ask, log_in

DIGEST = SPEC.digest()


@pytest.fixture(scope="module")
def trained(_pending_site: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeHome:
    """The pending site after the officer approved SPEC and the node trained (and charged) one round of it."""
    target = tmp_path_factory.mktemp("trained") / "site"
    shutil.copytree(_pending_site, target)
    home = NodeHome.open(target / "home")
    governance.approve(home, DIGEST, dataset="htn_cohort", by=OFFICER, max_epsilon=5.0)
    assert not ask(home, "train").has_error()
    return home


@pytest.fixture(scope="module")
def browser(trained: NodeHome) -> Iterator[TestClient]:
    with TestClient(create_app(trained.path), base_url="http://127.0.0.1") as client:
        log_in(client)
        yield client


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _table(page: str, table_id: str) -> list[list[str]]:
    body = page.split(f'id="{table_id}"')[1].split("</table>")[0]
    return [[_text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_the_front_page_shows_the_doctor_checks(browser: TestClient, trained: NodeHome) -> None:
    rows = [row for row in _table(browser.get("/").text, "checks") if row]
    expected = [[c.level, c.what, c.detail] for c in NodeService(trained).checks(connect=False) if c.what != "disk"]
    assert [row for row in rows if row[1] != "disk"] == expected


def test_the_budget_page_shows_every_charge_with_its_spec_run_and_round(browser: TestClient, trained: NodeHome) -> None:
    page = browser.get("/budgets/htn_cohort").text
    [row] = governance.budget_status(trained)
    assert _text(page.split('id="spent">')[1].split("</td>")[0]) == f"ε {row.spent:.3f}"
    assert _text(page.split('id="remaining">')[1].split("</td>")[0]) == f"ε {row.remaining:.3f}"
    charges = [r[:6] for r in _table(page, "charges") if r]
    assert charges == [["1", charges[0][1], DIGEST[:12], "41", "0", "1"], ["2", charges[1][1], DIGEST[:12], "41", "1", "0"]]
    assert page.count("<circle") == 2


def test_the_audit_page_filters_by_kind_run_and_dataset(browser: TestClient, trained: NodeHome) -> None:
    entries = trained.audit_log().entries()
    page = browser.get("/audit").text
    assert f'id="head">{entries[-1].hash}<' in page
    approvals = [r for r in _table(browser.get("/audit?kind=approval").text, "entries") if r]
    assert len(approvals) == 1 and f"by = {OFFICER}" in approvals[0][3] and "max_epsilon = 5.0" in approvals[0][3]
    of_run = [r for r in _table(browser.get("/audit?run=41").text, "entries") if r]
    assert [r[2] for r in of_run] == [e.kind for e in entries if str(e.payload.get("run", e.payload.get("first_run"))) == "41"]
    assert [r for r in _table(browser.get("/audit?dataset=another").text, "entries") if r] == [["no entries"]]
    assert browser.get("/audit?kind=aproval").status_code == 400


def test_the_egress_page_lists_every_reply_for_whom_and_whether_masked(browser: TestClient) -> None:
    rows = [r for r in _table(browser.get("/egress").text, "egress") if r]
    assert [(r[3], r[4]) for r in rows] == [("query refused", "-"), ("train", "plain")]
    assert all(r[2] == f"{DIGEST[:12]} test_partner" for r in rows)
    assert "2 arrays, 17 values, plain" in rows[1][5]


def test_the_evidence_pack_downloads_as_a_zip(browser: TestClient) -> None:
    got = browser.get("/evidence.zip")
    assert got.headers["content-type"] == "application/zip"
    assert re.fullmatch(r'attachment; filename="evidence-hospital_5-\d{8}T\d{6}Z\.zip"', got.headers["content-disposition"])
    names = zipfile.ZipFile(io.BytesIO(got.content)).namelist()
    assert sorted(names) == [f"evidence-hospital_5/{n}" for n in ("audit_verification.txt", "epsilon.png", "evidence.json", "report.html")]


def test_the_privacy_check_button_runs_the_check_for_the_run_and_records_it_under_the_officer(
    trained: NodeHome, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    shutil.copytree(trained.path.parent, target)
    home = NodeHome.open(target / "home")
    with TestClient(create_app(home.path), base_url="http://127.0.0.1") as client:
        log_in(client)
        budget = client.get("/budgets/htn_cohort").text
        assert _table(budget, "privacy-check") == [[], ["41", "Check run 41"]]
        token = re.search(r'name="csrf" value="([^"]+)"', budget.split('id="privacy-check"')[1]).group(1)  # type: ignore[union-attr]
        before = len(home.audit_log().entries())

        forged = client.post("/privacy-check", data={"csrf": "forged", "run": "41", "dataset": "htn_cohort"})
        unknown = client.post("/privacy-check", data={"csrf": token, "run": "999", "dataset": "htn_cohort"})
        assert forged.status_code == 403 and unknown.status_code == 400
        assert "nothing was written" in unknown.text and len(home.audit_log().entries()) == before

        page = client.post("/privacy-check", data={"csrf": token, "run": "41", "dataset": "htn_cohort"})
    assert page.status_code == 200, page.text
    body = page.text.split('id="check-facts"')[1].split("</table>")[0]
    facts = {_text(k): _text(v) for k, v in re.findall(r"<th>(.*?)</th><td[^>]*>(.*?)</td>", body, re.S)}
    bound = float(facts["empirical ε lower bound"].split()[0])
    charged = float(facts["ε charged for this run's DP-SGD"])
    assert 0.0 <= bound < charged and 'id="finding"' not in page.text
    [entry] = home.audit_log().entries()[before:]
    assert entry.kind == "privacy_check" and entry.payload["by"] == OFFICER and entry.payload["run"] == "41"
    assert entry.payload["epsilon_lower_bound"] == pytest.approx(bound, abs=1e-3)
