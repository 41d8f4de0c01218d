"""The console refuses every bad input of issue 13 with a clear message and writes nothing:
wrong passwords, expired or forged sessions, missing or forged CSRF tokens, unknown or
ambiguous spec hashes, a revoked spec approved again, and an audit log that fails verification."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from starlette.testclient import TestClient

from clients.hospital_node import governance
from clients.hospital_node.console.accounts import OfficerAccounts
from clients.hospital_node.console.app import create_app
from clients.hospital_node.console.sessions import COOKIE, SessionCodec
from clients.hospital_node.errors import ConsoleError
from clients.hospital_node.home import NodeHome

from .conftest import OFFICER, PASSWORD, SPEC, Clock, form_token, log_in

DIGEST = SPEC.digest()


def _state(home: NodeHome) -> tuple[bytes, bytes]:
    """The audit log and its head as bytes: what must not change when the console refuses."""
    return home.audit_log_path.read_bytes(), Path(f"{home.audit_log_path}.head").read_bytes()


def _approve(client: TestClient, spec_hash: str = DIGEST, *, csrf: str | None = "page", **extra: str):  # type: ignore[no-untyped-def]
    fields = {"action": "approve", "spec_hash": spec_hash, "dataset": "htn_cohort", "runs": "1", "confirmed": "yes", **extra}
    if csrf == "page":
        csrf = form_token(client.get("/requests").text)
    if csrf is not None:
        fields["csrf"] = csrf
    return client.post("/decide", data=fields, follow_redirects=False)


def _message(page: str) -> str:
    import html
    import re

    found = re.search(r'id="message">(.*?)</div>', page, re.S)
    assert found, page[:2000]
    return " ".join(html.unescape(found.group(1)).split())


# ---------------------------------------------------------------- logging in


def test_a_wrong_password_is_refused_and_sets_no_session(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        refused = log_in(client, password="not the password at all")
        assert refused.status_code == 401
        assert _message(refused.text) == "wrong officer name or password"
        assert COOKIE not in refused.cookies
        assert client.get("/requests", follow_redirects=False).headers["location"].startswith("/login")


def test_an_unknown_officer_gets_the_same_answer_as_a_wrong_password(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        refused = log_in(client, officer="mallory", password=PASSWORD)
        assert refused.status_code == 401 and _message(refused.text) == "wrong officer name or password"


def test_five_wrong_passwords_lock_the_name_out_for_a_while(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        for _ in range(5):
            assert log_in(client, password="guess guess guess").status_code == 401
        locked = log_in(client)  # even the right password
        assert locked.status_code == 429
        assert _message(locked.text) == f"too many failed logins for officer {OFFICER!r}; try again in 5 minute(s)"
        clock.now += 301
        assert log_in(client).status_code == 303


def test_a_login_without_the_forms_token_is_refused(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        client.get("/login")
        refused = client.post("/login", data={"officer": OFFICER, "password": PASSWORD}, follow_redirects=False)
        assert refused.status_code == 403
        assert "security token (CSRF) is missing or does not match" in _message(refused.text)


def test_the_session_cookie_is_httponly_and_samesite_strict(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        accepted = log_in(client)
        header = accepted.headers["set-cookie"]
        assert header.startswith(f"{COOKIE}=") and "HttpOnly" in header and "SameSite=strict" in header
        page = client.get("/")
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no script runs
        assert "<script" not in page.text


def test_a_host_header_other_than_loopback_is_refused(client: TestClient) -> None:
    # A page on another site that rebinds its DNS name to 127.0.0.1 sends its own name as Host.
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400


# ---------------------------------------------------------------- sessions


def test_an_expired_session_sends_the_officer_to_log_in_again(client: TestClient, clock: Clock) -> None:
    assert client.get("/requests").status_code == 200
    clock.now += 30 * 60 + 1
    moved = client.get("/requests", follow_redirects=False)
    assert moved.status_code == 303 and moved.headers["location"] == "/login?next=%2Frequests&why=expired"
    page = client.get(moved.headers["location"])
    assert _message(page.text) == "your session expired (sessions last 30 minutes); log in again"


def test_a_decision_with_an_expired_session_writes_nothing(client: TestClient, clock: Clock, home: NodeHome) -> None:
    csrf = form_token(client.get("/requests").text)
    before = _state(home)
    clock.now += 31 * 60
    refused = _approve(client, csrf=csrf)
    assert refused.status_code == 303 and refused.headers["location"] == "/login?why=expired"
    assert _state(home) == before


def test_a_cookie_signed_with_another_key_is_no_session(home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as client:
        officer = OfficerAccounts(home.path).get(OFFICER)
        assert officer is not None
        forged, _ = SessionCodec(b"x" * 32, lifetime_s=1800, clock=clock).issue(OFFICER, officer.tag)
        client.cookies.set(COOKIE, forged)
        assert client.get("/requests", follow_redirects=False).headers["location"] == "/login?next=%2Frequests"


def test_resetting_a_password_ends_the_officers_sessions(client: TestClient, home: NodeHome) -> None:
    assert client.get("/requests").status_code == 200
    OfficerAccounts(home.path).add(OFFICER, "a brand new passphrase", replace=True)
    moved = client.get("/requests", follow_redirects=False)
    assert moved.headers["location"] == "/login?next=%2Frequests&why=account"


# ---------------------------------------------------------------- CSRF


def test_a_decision_without_a_csrf_token_is_refused_and_writes_nothing(client: TestClient, home: NodeHome) -> None:
    before = _state(home)
    refused = _approve(client, csrf=None)
    assert refused.status_code == 403
    assert _message(refused.text) == (
        "the form's security token (CSRF) is missing; nothing was written. Open the page again from the console and resend the form"
    )
    assert _state(home) == before


def test_a_decision_with_a_forged_csrf_token_is_refused_and_writes_nothing(client: TestClient, home: NodeHome) -> None:
    before = _state(home)
    refused = _approve(client, csrf="forged-token-from-another-site")
    assert refused.status_code == 403
    assert "security token (CSRF) does not match your session; nothing was written" in _message(refused.text)
    assert _state(home) == before


def test_a_csrf_token_of_another_session_is_refused(client: TestClient, home: NodeHome, clock: Clock) -> None:
    with TestClient(create_app(home.path, clock=clock), base_url="http://127.0.0.1") as other:
        log_in(other)
        stolen = form_token(other.get("/requests").text)
    before = _state(home)
    assert _approve(client, csrf=stolen).status_code == 403
    assert _state(home) == before


def test_logging_out_needs_the_token_too(client: TestClient) -> None:
    assert client.post("/logout", data={"csrf": ""}, follow_redirects=False).status_code == 403
    assert client.get("/requests").status_code == 200  # still logged in
    token = form_token(client.get("/").text)
    assert client.post("/logout", data={"csrf": token}, follow_redirects=False).headers["location"] == "/login"
    assert client.get("/requests", follow_redirects=False).status_code == 303


# ---------------------------------------------------------------- decisions the governance code refuses


def test_approving_a_hash_nobody_requested_is_refused(client: TestClient, home: NodeHome) -> None:
    before = _state(home)
    refused = _approve(client, "0123456789abcdef")
    assert refused.status_code == 400
    assert _message(refused.text) == (
        "no request or decision for a spec hash starting with '0123456789abcdef'; see `medfed node requests`; nothing was written"
    )
    assert _state(home) == before


def test_a_hash_shorter_than_eight_characters_is_refused(client: TestClient, home: NodeHome) -> None:
    refused = _approve(client, DIGEST[:6])
    assert refused.status_code == 400
    assert _message(refused.text).startswith(f"spec hash {DIGEST[:6]!r} is too short; give at least 8 hex characters")


def test_an_ambiguous_hash_prefix_is_refused(client: TestClient, home: NodeHome) -> None:
    # Two recorded requests whose digests share their first 8 characters (written as the node writes requests).
    for tail in ("a" * 56, "b" * 56):
        home.audit_log().append("request", {"spec_digest": "deadbeef" + tail, "dataset": "htn_cohort", "experiment": "twin",
                                            "signer": "test_partner", "task": "tabular-classification"})
    before = _state(home)
    for action in ("approve", "deny"):
        csrf = form_token(client.get("/requests").text)
        refused = client.post("/decide", data={"csrf": csrf, "action": action, "spec_hash": "deadbeef", "dataset": "htn_cohort",
                                               "reason": "no", "confirmed": "yes"})
        assert refused.status_code == 400
        assert _message(refused.text) == (
            "spec hash 'deadbeef' is ambiguous: deadbeefaaaaaaaa, deadbeefbbbbbbbb; give more characters; nothing was written"
        )
    assert _state(home) == before


def test_a_revoked_spec_cannot_be_approved_again(client: TestClient, home: NodeHome) -> None:
    governance.approve(home, DIGEST, dataset="htn_cohort", by=OFFICER)
    governance.revoke(home, DIGEST, dataset="htn_cohort", reason="withdrawn by the ethics board", by=OFFICER)
    before = _state(home)
    refused = _approve(client, DIGEST[:12])
    assert refused.status_code == 400
    assert _message(refused.text) == (
        f"the approval of spec {DIGEST[:12]} on dataset 'htn_cohort' was revoked; a revocation is final "
        "(the partner submits a changed spec, which is a new request); nothing was written"
    )
    assert _state(home) == before
    page = client.get(f"/requests/{DIGEST}/htn_cohort").text
    assert 'id="approve-form"' not in page and "a revocation is final" in page


def test_an_unknown_dataset_is_refused_naming_the_registered_ones(client: TestClient, home: NodeHome) -> None:
    before = _state(home)
    refused = _approve(client, DIGEST[:12], dataset="htn_cohrot")
    assert refused.status_code == 400 and "htn_cohrot" in _message(refused.text) and "htn_cohort" in _message(refused.text)
    assert _state(home) == before


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_epsilon", "lots", "max_epsilon (the ε cap) must be a number; found 'lots'"),
    ("max_epsilon", "-1", "--max-epsilon must be > 0; found -1.0; nothing was written"),
    ("runs", "two", "runs must be an integer; found 'two'"),
    ("expires", "next tuesday", "--expires 'next tuesday' is not a date; use YYYY-MM-DD or an ISO date-time; nothing was written"),
    ("expires", "2001-01-01", "--expires 2001-01-01T00:00:00+00:00 is in the past; give a future date; nothing was written"),
])
def test_bad_approval_limits_are_refused_by_field(client: TestClient, home: NodeHome, field: str, value: str, message: str) -> None:
    before = _state(home)
    refused = _approve(client, DIGEST[:12], **{field: value})
    assert refused.status_code == 400 and _message(refused.text) == message
    assert _state(home) == before


def test_the_confirmation_step_writes_nothing(client: TestClient, home: NodeHome) -> None:
    before = _state(home)
    csrf = form_token(client.get("/requests").text)
    shown = client.post("/decide", data={"csrf": csrf, "action": "approve", "spec_hash": DIGEST[:12], "dataset": "htn_cohort",
                                         "max_epsilon": "4", "runs": "2"})
    assert shown.status_code == 200 and 'id="confirm-form"' in shown.text
    assert f'name="spec_hash" value="{DIGEST}"' in shown.text  # the prefix, resolved for the officer to see
    assert 'name="confirmed" value="yes"' in shown.text
    assert _state(home) == before


# ---------------------------------------------------------------- an audit log that fails verification


def _tamper(home: NodeHome) -> None:
    lines = home.audit_log_path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["payload"]["dataset"] = "edited"
    lines[0] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    home.audit_log_path.write_text("\n".join(lines) + "\n")


def test_a_log_that_fails_verification_is_shown_and_every_decision_refused(client: TestClient, home: NodeHome) -> None:
    csrf = form_token(client.get("/requests").text)
    _tamper(home)
    before = _state(home)
    front = client.get("/").text
    assert 'id="audit-failed"' in front and "The audit log FAILS verification" in front
    assert "FAILED verification" in client.get("/audit").text
    requests_page = client.get("/requests").text
    assert "no decision can be made" in requests_page and 'action="/decide"' not in requests_page
    for action in ("approve", "deny"):
        refused = client.post("/decide", data={"csrf": csrf, "action": action, "spec_hash": DIGEST, "dataset": "htn_cohort",
                                               "reason": "no", "runs": "1", "confirmed": "yes"})
        assert refused.status_code == 409
        assert _message(refused.text) == (
            "the node's audit log fails verification, so the console refuses every decision; nothing was written. "
            "Run `medfed node audit verify` and restore the log before deciding"
        )
    assert _state(home) == before


# ---------------------------------------------------------------- no patient data


def test_no_page_shows_a_patient_id_or_a_cell_of_the_dataset(client: TestClient, home: NodeHome) -> None:
    governance.approve(home, DIGEST, dataset="htn_cohort", by=OFFICER)
    cohort = pd.read_csv(home.dataset("htn_cohort").path)
    ids = set(cohort["patient_id"].astype(str))
    pages = [client.get(path).text for path in ("/", "/requests", f"/requests/{DIGEST}/htn_cohort", "/budgets",
                                                "/budgets/htn_cohort", "/audit", "/egress")]
    import re

    tokens = {token for page in pages for token in re.findall(r"[A-Za-z0-9_-]+", page)}
    assert not ids & tokens


# ---------------------------------------------------------------- starting without accounts


def test_the_console_does_not_start_without_an_officer_account(site_copy: Callable[[str], NodeHome]) -> None:
    home = site_copy("bare")
    OfficerAccounts(home.path).path.unlink()
    with pytest.raises(ConsoleError, match="has no officer accounts; create one with `medfed node console init"):
        create_app(home.path)


def test_the_console_does_not_start_with_an_accounts_file_others_can_read(home: NodeHome) -> None:
    OfficerAccounts(home.path).path.chmod(0o644)
    with pytest.raises(ConsoleError, match=r"console_officers.json is open to other users \(mode 0644\); run `chmod 600"):
        create_app(home.path)


def test_a_node_home_that_became_unreadable_is_a_page_that_says_so(client: TestClient, home: NodeHome) -> None:
    (home.path / "node.toml").write_text("this is [not toml")
    page = client.get("/budgets")
    assert page.status_code == 500 and "the node's records cannot be read" in _message(page.text)
    assert "Traceback" not in page.text
