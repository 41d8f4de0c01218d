"""Keyed pseudonyms: replacement UIDs, patient pseudonyms, dummy tokens and date offsets.

Everything is an HMAC-SHA256 of the original under the node secret, with a label per use
so that one output never doubles as another. The same input gives the same output on the
node that holds the secret, across files and runs, and nowhere else: without the secret a
pseudonym cannot be recomputed from a guessed original (a plain hash could).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["Keyring", "MIN_SECRET_BYTES"]

#: Shortest node secret accepted (256 bits).
MIN_SECRET_BYTES = 32

_UID_CACHE_LIMIT = 200_000


class Keyring:
    """Derives every keyed replacement value from one node secret.

    Parameters
    ----------
    secret
        The node's de-identification secret; at least 32 bytes. It never leaves the object:
        ``repr`` shows only :attr:`fingerprint`.
    """

    __slots__ = ("_secret", "_uids", "fingerprint")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError("secret must be bytes")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"secret must be at least {MIN_SECRET_BYTES} bytes; found {len(secret)}"
            )
        self._secret = bytes(secret)
        self._uids: dict[str, str] = {}
        #: A short public identifier of the key, for audit records ("which key was used").
        self.fingerprint = self._mac(b"fingerprint", b"").hex()[:16]

    def __repr__(self) -> str:
        return f"Keyring(fingerprint={self.fingerprint!r})"

    def _mac(self, label: bytes, message: bytes) -> bytes:
        return hmac.digest(self._secret, b"medfed/" + label + b"\x00" + message, hashlib.sha256)

    def uid(self, original: str) -> str:
        """A replacement UID under the UUID-derived root ``2.25`` (at most 44 characters)."""
        cached = self._uids.get(original)
        if cached is not None:
            return cached
        digest = self._mac(b"uid", original.encode("ascii", "replace"))
        new = "2.25." + str(int.from_bytes(digest[:16], "big"))
        if len(self._uids) >= _UID_CACHE_LIMIT:
            self._uids.clear()
        self._uids[original] = new
        return new

    def patient_pseudonym(self, issuer: str, patient_id: str) -> str:
        """The patient's pseudonym, e.g. ``MF-3A0C9B17E2D45F60`` (19 characters)."""
        message = issuer.encode("utf-8", "replace") + b"\x00" + patient_id.encode("utf-8", "replace")
        return "MF-" + self._mac(b"patient", message).hex()[:16].upper()

    def token(self, domain: str, value: str, length: int) -> str:
        """An upper-case hexadecimal token of ``length`` characters (at most 64)."""
        message = domain.encode("ascii", "replace") + b"\x00" + value.encode("utf-8", "replace")
        return self._mac(b"token", message).hex()[:length].upper()

    def date_shift_days(self, patient_key: str, max_days: int) -> int:
        """Days to move a patient's dates back: in ``1..max_days``, never 0."""
        if max_days < 1:
            raise ValueError(f"max_days must be >= 1; found {max_days}")
        digest = self._mac(b"date-shift", patient_key.encode("utf-8", "replace"))
        return 1 + int.from_bytes(digest[:8], "big") % max_days
