"""Cleaning free text of identifying content (the "C" action on descriptions).

A :class:`TextScrubber` is built per data set from the values of the attributes the
profile removes or replaces there (names, IDs, dates, institutions...). It deletes every
occurrence of those values (and of each part of a person name) from a text, then every
run that looks like an identifier whoever it belongs to: dates, long numbers, e-mail
addresses, phone numbers. What is left ("CT CHEST W CONTRAST") keeps its meaning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["TextScrubber", "identifier_variants"]

_GENERIC = re.compile(
    r"""
    [\w.+-]+@[\w-]+(?:\.[\w-]+)+                     # e-mail addresses
  | \b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b              # dates with separators
  | \b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b   # YYYYMMDD
  | \+?\d[\d ()-]{6,}\d                              # phone numbers
  | \b[A-Za-z]{0,3}\d{5,}[A-Za-z]{0,3}\b             # long numbers and IDs
    """,
    re.VERBOSE,
)
_SPACES = re.compile(r"\s{2,}")
_EMPTY_BRACKETS = re.compile(r"[(\[]\s*[)\]]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,;:.])")
_SPLIT = re.compile(r"[\s^=\\,;:/]+")


def identifier_variants(value: str) -> set[str]:
    """The strings to remove for one identifying value: itself and its parts.

    Parts are the components of a person name and the words of a value, from two
    characters on; dates in ``YYYYMMDD`` also yield their common written forms.
    """
    value = value.strip()
    if not value:
        return set()
    out = {value}
    for part in _SPLIT.split(value):
        part = part.strip(" .-_'\"()")
        if len(part) >= 2:
            out.add(part)
    if re.fullmatch(r"\d{8}", value):
        y, m, d = value[:4], value[4:6], value[6:]
        out |= {f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{y}/{m}/{d}"}
    return out


class TextScrubber:
    """Removes known identifiers and identifier-like runs from free text."""

    __slots__ = ("_known",)

    def __init__(self, identifiers: Iterable[str] = ()) -> None:
        variants: set[str] = set()
        for value in identifiers:
            variants |= identifier_variants(value)
        ordered = sorted(variants, key=len, reverse=True)
        self._known = (
            re.compile(
                r"(?<![0-9A-Za-z])(?:" + "|".join(re.escape(v) for v in ordered) + r")(?![0-9A-Za-z])",
                re.IGNORECASE,
            )
            if ordered
            else None
        )

    def scrub(self, text: str) -> str:
        """``text`` without identifiers; runs of spaces left behind are collapsed."""
        if self._known is not None:
            text = self._known.sub(" ", text)
        text = _GENERIC.sub(" ", text)
        text = _EMPTY_BRACKETS.sub(" ", text)
        text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", text))
        return _SPACES.sub(" ", text).strip(" ,;:-")
