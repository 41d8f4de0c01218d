"""Keyed pseudonyms: valid UIDs, stable per secret, unrelated across secrets."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaging.pseudonyms import Keyring
from tests.imaging.planting import OTHER_SECRET, SECRET

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@given(st.text(alphabet="0123456789.", min_size=1, max_size=64))
def test_replacement_uids_are_valid_and_stable(original: str) -> None:
    keys = Keyring(SECRET)
    uid = keys.uid(original)
    assert UID_RE.match(uid) and len(uid) <= 64 and uid.startswith("2.25.")
    assert Keyring(SECRET).uid(original) == uid
    assert Keyring(OTHER_SECRET).uid(original) != uid


def test_patient_pseudonyms_depend_on_issuer_and_id() -> None:
    keys = Keyring(SECRET)
    assert keys.patient_pseudonym("A", "1") == keys.patient_pseudonym("A", "1")
    assert keys.patient_pseudonym("A", "1") != keys.patient_pseudonym("B", "1")
    assert re.fullmatch(r"MF-[0-9A-F]{16}", keys.patient_pseudonym("A", "1"))


@given(st.text(min_size=1, max_size=30), st.integers(min_value=1, max_value=36500))
def test_date_shifts_are_never_zero_and_stay_in_range(patient: str, max_days: int) -> None:
    days = Keyring(SECRET).date_shift_days(patient, max_days)
    assert 1 <= days <= max_days


def test_the_secret_is_never_shown() -> None:
    keys = Keyring(SECRET)
    assert SECRET.decode() not in repr(keys)
    assert repr(keys) == f"Keyring(fingerprint='{keys.fingerprint}')"
    assert keys.fingerprint != Keyring(OTHER_SECRET).fingerprint


def test_short_or_textual_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes; found 5"):
        Keyring(b"short")
    with pytest.raises(TypeError, match="secret must be bytes"):
        Keyring("x" * 40)  # type: ignore[arg-type]
