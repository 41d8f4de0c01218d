"""The officer's console: budgets, requests, decisions and the audit trail of one node, in a browser.

``medfed node console --home H`` serves this Starlette app with uvicorn on 127.0.0.1.
Pages are rendered on the server from Jinja2 templates and work without JavaScript:
every action is a plain HTML form.

Nothing here decides or writes on its own. The views read the node's records through
the functions the ``medfed node`` commands use (:mod:`clients.hospital_node.governance`,
:mod:`clients.hospital_node.pending_view`, :mod:`clients.hospital_node.egress_records`,
the ``doctor`` checks of :class:`~clients.hospital_node.service.NodeService`, the
evidence pack of :mod:`clients.hospital_node.report`), and a decision is written by
the very function the CLI calls (``governance.approve``, ``deny``, ``revoke``), named
for the officer who logged in. A decision takes two posts: the first shows what will be
written and asks for confirmation, the second writes it.

Security (see :mod:`.accounts` and :mod:`.sessions`): named officer accounts, signed
sessions that expire, a CSRF token checked on every post, HttpOnly SameSite=Strict
cookies, a Host-header allow-list (a page on another site cannot reach the console
through DNS rebinding), and headers that forbid framing, scripts and caching. While the
audit log fails verification, every page says so and every decision is refused.
Pages show what the audit log and ledger hold (names, hashes, counts, epsilons), never
a row of a dataset.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.hospital_node import governance
from clients.hospital_node.audit_cli import payload_lines
from clients.hospital_node.console.accounts import OfficerAccounts, session_key
from clients.hospital_node.console.chart import ChartPoint, epsilon_svg
from clients.hospital_node.console.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    Session,
    SessionCodec,
    SessionExpired,
    SessionInvalid,
    csrf_ok,
)
from clients.hospital_node.egress_records import recorded_replies, reply_kind, what_left
from clients.hospital_node.errors import ConsoleError, NodeError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.pending_view import (
    last_approved_version,
    node_checks_pass,
    request_fields,
    spec_changes,
    spec_fields,
)
from clients.hospital_node.report import epsilon_curve, write_report
from clients.hospital_node.service import NodeService
from privacy.audit import AUDIT_KINDS, AuditEntry, AuditLog
from privacy.errors import PrivacyError
from privacy.events import POISSON_GAUSSIAN
from privacy.governance import APPROVED, EXPIRED, GovernanceState
from privacy.keys import fingerprint, load_public_key
from privacy.ledger import PrivacyLedger

__all__ = ["LOOPBACK_HOSTS", "create_app"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_HERE = Path(__file__).parent
_MAX_FORM_BYTES = 16 * 1024
_LOGIN_ATTEMPTS = 5  # failed logins of one officer name ...
_LOGIN_WINDOW_S = 300.0  # ... within this long lock that name out for the rest of the window
_ACTIONS = ("approve", "deny", "revoke")
_DONE = {"approve": "approved", "deny": "denied", "revoke": "revoked"}
_MAX_AUDIT_ROWS = 1000


class _LoginNeeded(Exception):
    def __init__(self, why: str = "") -> None:
        self.why = why


class _Refused(Exception):
    """A request the console refuses: an HTTP status and a message for the officer; nothing was written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class AuditState:
    """The audit log's verification, as every page shows it."""

    ok: bool | None  # None: nothing audited yet
    count: int
    head: str
    key: str
    problems: tuple[str, ...]


def audit_state(node: NodeHome) -> AuditState:
    """Verify the node's audit log against its key, as `medfed node audit verify` does."""
    log = AuditLog(node.audit_log_path)
    if not log.path.exists() and not log.head_path.exists():
        return AuditState(None, 0, "", "", ())
    try:
        key = load_public_key(node.audit_public_key_path)
    except PrivacyError as err:
        return AuditState(False, 0, "", "", (f"the node's audit public key cannot be read: {err}",))
    result = log.verify(key)
    return AuditState(result.ok, result.count, result.last_hash or "", fingerprint(key), tuple(str(p) for p in result.problems))


class _SecurityHeaders:
    """Headers on every response: no framing, no scripts, no caching, no referrer."""

    _HEADERS = (
        (b"content-security-policy",
         b"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._HEADERS]
            await send(message)

        await self.app(scope, receive, sending)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _number(text: str, field: str, *, kind: Callable[[str], Any] = float) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise _Refused(400, f"{field} must be {'an integer' if kind is int else 'a number'}; found {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused(400, f"{field} must be a finite number; found {text!r}")
    return value


class Console:
    """The console of the node at `home`: its accounts, its session codec, and the pages."""

    def __init__(self, home: Path, *, session_minutes: float, clock: Callable[[], float]) -> None:
        self.home_path = Path(home)
        NodeHome.open(self.home_path)  # a bad home fails at start, not on the first page
        self.accounts = OfficerAccounts(self.home_path)
        if not self.accounts.names():
            raise ConsoleError(f"node home {self.home_path} has no officer accounts; create one with "
                               f"`medfed node console init --home {self.home_path} --officer NAME`")
        if not session_minutes > 0:
            raise ConsoleError(f"--session-minutes must be > 0; found {session_minutes:g}")
        self.codec = SessionCodec(session_key(self.home_path), lifetime_s=session_minutes * 60, clock=clock)
        self.session_minutes = session_minutes
        self.clock = clock
        self.templates = Jinja2Templates(directory=str(_HERE / "templates"))
        self._failures: dict[str, list[float]] = {}

    # ---------------------------------------------------------------- plumbing

    def node(self) -> NodeHome:
        return NodeHome.open(self.home_path)

    def session(self, request: Request) -> Session:
        try:
            session = self.codec.read(request.cookies.get(COOKIE))
        except SessionExpired:
            raise _LoginNeeded("expired") from None
        except SessionInvalid:
            raise _LoginNeeded() from None
        officer = self.accounts.get(session.officer)
        if officer is None or officer.tag != session.tag:
            raise _LoginNeeded("account")  # removed, or its password was reset
        return session

    def render(self, request: Request, name: str, code: int = 200, session: Session | None = None, **context: Any) -> Response:
        audit = context.pop("audit", None)
        try:
            node = self.node()
            node_name, audit = node.name, audit or audit_state(node)
        except (NodeError, PrivacyError):  # the page says why; the header cannot name the node
            node_name, audit = self.home_path.name, audit or AuditState(None, 0, "", "", ())
        context |= {"node": node_name, "audit": audit, "session": session, "nav": request.url.path}
        return self.templates.TemplateResponse(request, name, context, status_code=code)

    def refuse(self, request: Request, err: _Refused, session: Session | None) -> Response:
        return self.render(request, "message.html", code=err.status, session=session, title="Refused", message=err.message)

    async def form(self, request: Request) -> dict[str, str]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise _Refused(415, "the console takes plain HTML form posts (application/x-www-form-urlencoded)")
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            raise _Refused(413, f"the form is larger than {_MAX_FORM_BYTES} bytes")
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise _Refused(400, "the form is not UTF-8") from None
        return {key: values[0] for key, values in fields.items()}

    def checked(self, request: Request, fields: Mapping[str, str]) -> Session:
        """The session of a post whose CSRF token matches; refused otherwise (nothing is written)."""
        session = self.session(request)
        if not csrf_ok(session.csrf, fields.get("csrf")):
            given = "is missing" if not fields.get("csrf") else "does not match your session"
            raise _Refused(403, f"the form's security token (CSRF) {given}; nothing was written. "
                                "Open the page again from the console and resend the form")
        return session

    # ---------------------------------------------------------------- login

    def login_page(self, request: Request, *, message: str = "", status: int = 200) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or _token()
        why = request.query_params.get("why", "")
        if not message and why == "expired":
            message = f"your session expired (sessions last {self.session_minutes:g} minutes); log in again"
        elif not message and why == "account":
            message = "your account was changed or removed; log in again"
        response = self.render(request, "login.html", code=status, login_token=token, message=message)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", max_age=3600, path="/")
        return response

    async def login(self, request: Request) -> Response:
        try:
            fields = await self.form(request)
        except _Refused as err:
            return self.refuse(request, err, None)
        if not csrf_ok(request.cookies.get(LOGIN_COOKIE), fields.get("csrf")):
            return self.login_page(request, status=403, message="the login form's security token (CSRF) is missing or "
                                                                "does not match; log in from this page")
        name, password = fields.get("officer", "").strip(), fields.get("password", "")
        now = self.clock()
        recent = [t for t in self._failures.get(name, []) if now - t < _LOGIN_WINDOW_S]
        if len(recent) >= _LOGIN_ATTEMPTS:
            wait = math.ceil((_LOGIN_WINDOW_S - (now - recent[0])) / 60)
            return self.login_page(request, status=429, message=f"too many failed logins for officer {name!r}; "
                                                                f"try again in {wait} minute(s)")
        officer = await run_in_threadpool(self.accounts.check, name, password)
        if officer is None:
            self._failures[name] = [*recent, now]
            logger.warning("console: failed login for officer name %r", name)
            return self.login_page(request, status=401, message="wrong officer name or password")
        self._failures.pop(name, None)
        cookie, _ = self.codec.issue(officer.name, officer.tag)
        logger.info("console: officer %r logged in", officer.name)
        response = RedirectResponse(_safe_next(request.query_params.get("next", "/")), status_code=303)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        try:
            fields = await self.form(request)
            self.checked(request, fields)
        except _Refused as err:
            return self.refuse(request, err, None)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # ---------------------------------------------------------------- pages

    def front(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        connect = request.query_params.get("connect") == "1"
        checks = list(NodeService(node).checks(connect=connect))
        audit = audit_state(node)
        pending: int | None = None
        if audit.ok is not False:
            pending = len(GovernanceState.from_entries(governance.verified_entries(node)).pending())
        return self.render(request, "front.html", session=session, audit=audit, checks=checks, connect=connect,
                           pending=pending, failed=sum(c.level == "fail" for c in checks))

    def budgets(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        audit = audit_state(node)
        if audit.ok is False:
            return self.render(request, "budgets.html", session=session, audit=audit, rows=None, missing=[])
        entries = governance.verified_entries(node)
        rows = governance.budget_status(node, entries)
        missing = governance.ledger_disagreement(node, entries)
        return self.render(request, "budgets.html", session=session, audit=audit, rows=rows, missing=missing, fmt=_fmt)

    def budget(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        dataset = request.path_params["dataset"]
        audit = audit_state(node)
        if audit.ok is False:
            return self.render(request, "budget.html", session=session, audit=audit, dataset=dataset, row=None)
        entries = governance.verified_entries(node)
        rows = {row.dataset: row for row in governance.budget_status(node, entries)}
        if dataset not in rows:
            raise _Refused(404, f"no dataset {dataset!r} on node {node.name!r}; known: {', '.join(sorted(rows)) or 'none'}")
        row = rows[dataset]
        missing = governance.ledger_disagreement(node, entries)
        state = GovernanceState.from_entries(entries)
        spec_of_submission = {use.submission_id: use.spec_digest for use in state.submissions.values()}
        spec_of_run = {
            str(e.payload.get("run")): str(e.payload.get("spec_digest"))
            for e in entries if e.kind == "release" and e.payload.get("dataset") == dataset and e.payload.get("spec_digest")
        }
        delta = row.budget.delta if row.budget is not None else 1e-5
        with PrivacyLedger.open(node.ledger_path) as ledger:
            charges = sorted(ledger.charges(dataset), key=lambda c: c.charged_at)
        curve = epsilon_curve(charges, delta=delta)
        points = []
        for number, (charge, (at, value)) in enumerate(zip(charges, curve, strict=True), start=1):
            digest = spec_of_submission.get(charge.submission or "") or spec_of_run.get(charge.run_id, "")
            points.append(ChartPoint(number, at, value, digest[:12] or "-", charge.run_id, charge.round, charge.release))
        title = f"dataset {dataset}: cumulative ε at δ {delta:g} (PLD), every charge numbered"
        svg = epsilon_svg(points, budget=row.budget.epsilon if row.budget else None, held=row.held, title=title)
        details = [(p, c.event) for p, c in zip(points, charges, strict=True)]
        # Runs with DP-SGD rounds here: the ones the empirical privacy check can re-train.
        checkable = sorted({c.run_id for c in charges if c.event.mechanism == POISSON_GAUSSIAN and c.round >= 1}, key=_run_order)
        spec_links = {p.spec: d for d in {*spec_of_submission.values(), *spec_of_run.values()} for p in points if d[:12] == p.spec}
        return self.render(request, "budget.html", session=session, audit=audit, dataset=dataset, row=row, missing=missing,
                           svg=svg, details=details, spec_links=spec_links, checkable=checkable, fmt=_fmt)

    def requests(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        audit = audit_state(node)
        if audit.ok is False:
            return self.render(request, "requests.html", session=session, audit=audit, pending=None)
        entries = governance.verified_entries(node)
        state = GovernanceState.from_entries(entries)
        pending = governance.pending_requests(node)
        missing = governance.ledger_disagreement(node, entries)
        now = datetime.now(UTC)
        decided = sorted(state.decisions.values(), key=lambda d: d.seq, reverse=True)
        return self.render(
            request, "requests.html", session=session, audit=audit, pending=pending, missing=missing, fmt=_fmt,
            decided=[(d, d.status_at(now), state.requests.get((d.spec_digest, d.dataset))) for d in decided],
            datasets=sorted(node.datasets()),
        )

    def request_detail(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        digest, dataset = request.path_params["digest"], request.path_params["dataset"]
        audit = audit_state(node)
        if audit.ok is False:
            return self.render(request, "request.html", session=session, audit=audit, digest=digest, dataset=dataset, req=None)
        entries = governance.verified_entries(node)
        state = GovernanceState.from_entries(entries)
        recorded = state.requests.get((digest, dataset))
        decision = state.decision(digest, dataset)
        if recorded is None and decision is None:
            raise _Refused(404, f"no request or decision for spec {digest[:16]} on dataset {dataset!r} on this node")
        missing = governance.ledger_disagreement(node, entries)
        item = next((p for p in governance.pending_requests(node)
                     if p.request.spec_digest == digest and p.request.dataset == dataset), None)
        facts: list[tuple[str, str]] = []
        foreseen: list[str] = []
        if item is not None:
            facts = request_fields(item, ledger_incomplete=bool(missing))
            foreseen = governance.foreseen_refusals(node, digest, dataset)
        elif recorded is not None:
            payload = recorded.payload
            facts = [
                ("experiment", recorded.experiment),
                ("description", str(payload.get("description", ""))),
                ("signed by", f"{recorded.signer} ({payload.get('signer_fingerprint', '')})"),
                ("asked at (UTC)", recorded.at.isoformat()),
                ("task, model", f"{payload.get('task', '')}, {payload.get('model', '')}"),
                ("dataset", dataset),
                ("cost when requested", f"ε {_fmt(payload.get('cost_epsilon'))} at δ {payload.get('delta', '')}"),
            ]
        spec = recorded.payload.get("spec") if recorded is not None else None
        earlier = last_approved_version(state, recorded) if recorded is not None else None
        changes = spec_changes(earlier.payload.get("spec") or {}, spec or {}) if earlier is not None else None
        status = state.status(digest, dataset)
        return self.render(
            request, "request.html", session=session, audit=audit, digest=digest, dataset=dataset, req=recorded,
            decision=decision, status=status, facts=facts, foreseen=foreseen, checks_pass=node_checks_pass(item) if item else "",
            fields=spec_fields(spec) if isinstance(spec, Mapping) else [], earlier=earlier, changes=changes,
            revocable=status in (APPROVED, EXPIRED), pending=item is not None, done=_DONE.get(request.query_params.get("done", ""), ""),
        )

    async def decide(self, request: Request) -> Response:
        session: Session | None = None
        try:
            fields = await self.form(request)
            session = self.checked(request, fields)
            return await run_in_threadpool(self._decide, request, session, fields)
        except _Refused as err:
            return self.refuse(request, err, session)

    def _decide(self, request: Request, session: Session, fields: Mapping[str, str]) -> Response:
        node = self.node()
        action = fields.get("action", "")
        if action not in _ACTIONS:
            raise _Refused(400, f"action must be one of {', '.join(_ACTIONS)}; found {action!r}")
        audit = audit_state(node)
        if audit.ok is False:
            raise _Refused(409, "the node's audit log fails verification, so the console refuses every decision; nothing "
                                "was written. Run `medfed node audit verify` and restore the log before deciding")
        spec_hash = fields.get("spec_hash", "").strip()
        dataset = fields.get("dataset", "").strip()
        if not spec_hash:
            raise _Refused(400, "spec_hash is empty; give at least 8 hex characters of a request's spec hash")
        limits: dict[str, Any] = {}
        reason = ""
        try:
            if action == "approve":
                if not dataset:
                    raise _Refused(400, "dataset is empty; an approval names the dataset it covers")
                limits = {
                    "max_epsilon": _number(fields.get("max_epsilon", ""), "max_epsilon (the ε cap)"),
                    "expires": governance.parse_expiry(fields.get("expires") or None),
                    "runs": _number(fields.get("runs", "") or "1", "runs", kind=int),
                    "not_yet_requested": fields.get("not_yet_requested") == "yes",
                }
            else:
                reason = fields.get("reason", "")
                dataset = governance.decision_dataset(node, spec_hash, dataset or None)
            if fields.get("confirmed") != "yes":
                return self._confirm(request, session, node, action, spec_hash, dataset, limits, reason, fields)
            if action == "approve":
                digest = governance.approve(node, spec_hash, dataset=dataset, by=session.officer, **limits)
            else:
                decide = governance.deny if action == "deny" else governance.revoke
                digest = decide(node, spec_hash, dataset=dataset, reason=reason, by=session.officer)
        except NodeError as err:
            raise _Refused(400, f"{err}; nothing was written") from None
        except governance.Refusal as err:
            raise _Refused(409, f"{err.reason}; nothing was written") from None
        except PrivacyError as err:
            raise _Refused(400, f"{err}; nothing was written") from None
        logger.info("console: officer %r: %s spec %s on dataset %r", session.officer, action, digest[:12], dataset)
        return RedirectResponse(f"/requests/{digest}/{quote(dataset, safe='')}?done={action}", status_code=303)

    def _confirm(self, request: Request, session: Session, node: NodeHome, action: str, spec_hash: str, dataset: str,
                 limits: Mapping[str, Any], reason: str, fields: Mapping[str, str]) -> Response:
        """The confirmation step: what exactly would be written, and the node's own warnings; nothing written yet."""
        state = governance.governance_state(node)
        text = spec_hash.lower()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            digest = text
        else:
            try:
                digest = state.resolve(text)
            except ValueError as err:
                raise _Refused(400, f"{err}; nothing was written") from None
        node.dataset(dataset)  # an unknown dataset is refused here, naming the registered ones
        foreseen = governance.foreseen_refusals(node, digest, dataset, max_epsilon=limits.get("max_epsilon")) if action == "approve" else []
        recorded = state.requests.get((digest, dataset))
        carried = {k: fields.get(k, "") for k in ("action", "dataset", "max_epsilon", "expires", "runs", "reason", "not_yet_requested")}
        carried["spec_hash"] = digest
        return self.render(request, "confirm.html", session=session, action=action, digest=digest, dataset=dataset,
                           limits=limits, reason=reason, foreseen=foreseen, carried=carried, recorded=recorded)

    async def privacy_check(self, request: Request) -> Response:
        session: Session | None = None
        try:
            fields = await self.form(request)
            session = self.checked(request, fields)
            return await run_in_threadpool(self._privacy_check, request, session, fields)
        except _Refused as err:
            return self.refuse(request, err, session)

    def _privacy_check(self, request: Request, session: Session, fields: Mapping[str, str]) -> Response:
        """The empirical privacy check of one run, as `medfed node privacy-check` runs it, named for the officer."""
        from clients.hospital_node.privacy_check import run_privacy_check
        from clients.hospital_node.privacy_check_cli import report_lines

        node = self.node()
        if audit_state(node).ok is False:
            raise _Refused(409, "the node's audit log fails verification, so the console runs no check; nothing was written. "
                                "Run `medfed node audit verify` and restore the log first")
        run, dataset = fields.get("run", "").strip(), fields.get("dataset", "").strip() or None
        if not run:
            raise _Refused(400, "run is empty; name the run to check (the budget page lists the runs that trained here)")
        try:
            result = run_privacy_check(node, run, dataset=dataset, by=session.officer)
        except NodeError as err:  # PrivacyCheckError among them: unknown run, no DP-SGD, a home that does not verify
            raise _Refused(400, f"{err}; nothing was written") from None
        logger.info("console: officer %r: privacy check of run %s (entry %d)", session.officer, run, result.audit_seq)
        return self.render(request, "privacy_check.html", session=session, result=result, lines=report_lines(result))

    def audit(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        audit = audit_state(node)
        log = AuditLog(node.audit_log_path)
        entries: Sequence[AuditEntry] = log.entries() if log.path.exists() else ()
        kind = request.query_params.get("kind", "")
        run = request.query_params.get("run", "").strip()
        dataset = request.query_params.get("dataset", "").strip()
        if kind and kind not in AUDIT_KINDS:
            raise _Refused(400, f"kind {kind!r} is not an audit kind; kinds: {', '.join(AUDIT_KINDS)}")
        chosen = [
            e for e in entries
            if (not kind or e.kind == kind)
            and (not run or str(e.payload.get("run", e.payload.get("first_run", ""))) == run)
            and (not dataset or str(e.payload.get("dataset", "")) == dataset)
        ]
        shown = chosen[-_MAX_AUDIT_ROWS:]
        rows = [(e, payload_lines(e.payload)[0]) for e in shown]
        return self.render(request, "audit.html", session=session, audit=audit, rows=rows, kinds=AUDIT_KINDS, kind=kind,
                           run=run, dataset=dataset, total=len(entries), matched=len(chosen), cut=len(chosen) - len(shown))

    def egress(self, request: Request) -> Response:
        session = self.session(request)
        node = self.node()
        audit = audit_state(node)
        log = AuditLog(node.audit_log_path)
        entries = log.entries() if log.path.exists() else ()
        run = request.query_params.get("run", "").strip()
        state = GovernanceState.from_entries(entries)
        rows = []
        for entry in recorded_replies(entries, run=run or None):
            payload = entry.payload
            digest = str(payload.get("spec_digest", ""))
            asked = state.requests.get((digest, str(payload.get("dataset", ""))))
            secure = payload.get("secure_aggregation")
            masked = "-" if entry.kind != "release" else (
                "masked (SecAgg+)" if isinstance(secure, Mapping) and secure.get("masked") else "plain")
            rows.append({
                "time": entry.time, "run": payload.get("run", payload.get("first_run", "")), "round": payload.get("round", ""),
                "spec": digest, "partner": asked.signer if asked is not None else "", "reply": reply_kind(entry),
                "masked": masked, "what": what_left(entry),
            })
        return self.render(request, "egress.html", session=session, audit=audit, rows=rows, run=run)

    def evidence(self, request: Request) -> Response:
        self.session(request)
        node = self.node()
        with tempfile.TemporaryDirectory(prefix="medfed-evidence-") as folder:
            pack = write_report(node, Path(folder) / "pack")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in pack.files:
                    archive.write(path, f"evidence-{node.name}/{path.name}")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"content-disposition": f'attachment; filename="evidence-{node.name}-{stamp}.zip"'})


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _run_order(run: str) -> tuple[int, str]:
    """Flower run ids are numbers; order them as numbers, anything else after them."""
    return (int(run), "") if run.isdigit() else (2**63, run)


def _safe_next(target: str) -> str:
    """Only a path of this console (never another site) is a place to return to after logging in."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def create_app(
    home: Path,
    *,
    session_minutes: float = 30.0,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The console app for the node at `home`, whose sessions last `session_minutes`.

    Raises
    ------
    NodeHomeError
        `home` is not a node home.
    ConsoleError
        The home has no officer account, or its accounts or session key are open to other users.
    """
    console = Console(home, session_minutes=session_minutes, clock=clock)

    def page(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(handler, request)
            except _LoginNeeded as err:
                query = {"next": request.url.path} | ({"why": err.why} if err.why else {})
                return RedirectResponse("/login?" + urlencode(query), status_code=303)
            except _Refused as err:
                try:
                    session = console.session(request)
                except _LoginNeeded:
                    session = None
                return console.refuse(request, err, session)
            except governance.Refusal as err:  # the audit log failed verification between two reads
                return console.refuse(request, _Refused(409, err.reason), None)
            except (NodeError, PrivacyError) as err:  # the node home or its ledger cannot be read
                return console.refuse(request, _Refused(500, f"the node's records cannot be read: {err}"), None)

        return endpoint

    async def login_page(request: Request) -> Response:
        return await run_in_threadpool(console.login_page, request)

    async def logout(request: Request) -> Response:
        try:
            return await console.logout(request)
        except _LoginNeeded:
            return RedirectResponse("/login", status_code=303)

    def posted(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except _LoginNeeded as err:
                return RedirectResponse("/login?" + urlencode({"why": err.why} if err.why else {}), status_code=303)

        return endpoint

    routes = [
        Route("/", page(console.front)),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/budgets", page(console.budgets)),
        Route("/budgets/{dataset}", page(console.budget)),
        Route("/requests", page(console.requests)),
        Route("/requests/{digest}/{dataset}", page(console.request_detail)),
        Route("/decide", posted(console.decide), methods=["POST"]),
        Route("/privacy-check", posted(console.privacy_check), methods=["POST"]),
        Route("/audit", page(console.audit)),
        Route("/egress", page(console.egress)),
        Route("/evidence.zip", page(console.evidence)),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
