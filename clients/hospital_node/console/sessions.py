"""Console sessions: a signed, expiring cookie naming the officer, with the CSRF token of their forms.

The cookie holds the officer's name, the tag of their stored password hash (a reset
password ends every session of theirs), and a random CSRF token; it is signed with the
node's session key (:func:`~clients.hospital_node.console.accounts.session_key`) by
itsdangerous, stamped with the time it was issued, and refused once older than the
session lifetime. The server keeps no session table, so restarting the console keeps
officers logged in, and a signed cookie cannot be forged or extended without the key.

Every state-changing form carries the session's CSRF token in a hidden field, which the
server compares with the cookie's (:func:`csrf_ok`); the login form, which comes before
any session, uses a double-submitted random token instead (a cookie and a field that
must match). Cookies are HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

__all__ = ["COOKIE", "LOGIN_COOKIE", "Session", "SessionCodec", "SessionExpired", "SessionInvalid", "csrf_ok"]

COOKIE = "medfed_console"
LOGIN_COOKIE = "medfed_console_login"


class SessionInvalid(Exception):
    """The cookie is missing, forged or unreadable: the officer logs in."""


class SessionExpired(SessionInvalid):
    """The cookie was genuine but is older than the session lifetime."""


@dataclass(frozen=True)
class Session:
    """A logged-in officer: who, the account tag they logged in with, and their forms' CSRF token."""

    officer: str
    tag: str
    csrf: str


class SessionCodec:
    """Issues and reads session cookies signed with `key` that last `lifetime_s` seconds."""

    def __init__(self, key: bytes, *, lifetime_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._serializer = URLSafeTimedSerializer(key, salt="medfed-console-session")

        class _Signer(TimestampSigner):
            # Signing and checking read the time here: the tests age a session without waiting.
            def get_timestamp(self) -> int:
                return int(clock())

        self._serializer.signer = _Signer

    def issue(self, officer: str, tag: str) -> tuple[str, Session]:
        session = Session(officer, tag, secrets.token_urlsafe(32))
        return self._serializer.dumps([session.officer, session.tag, session.csrf]), session

    def read(self, cookie: str | None) -> Session:
        if not cookie:
            raise SessionInvalid("not logged in")
        try:
            officer, tag, csrf = self._serializer.loads(cookie, max_age=self.lifetime_s)
        except SignatureExpired:
            raise SessionExpired("the session expired") from None
        except (BadSignature, ValueError, TypeError):
            raise SessionInvalid("the session cookie is not valid") from None
        return Session(str(officer), str(tag), str(csrf))


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Whether a form's CSRF token `given` is the session's `expected` one (in constant time)."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
