"""Cleaning free text of known identifiers and identifier-like runs."""

from __future__ import annotations

from imaging.scrub import TextScrubber, identifier_variants


def test_names_ids_dates_and_contacts_are_removed_and_the_rest_kept() -> None:
    scrubber = TextScrubber(["DOE^JANE", "MRN99", "19470312"])
    text = "CT chest for Jane DOE (MRN99) born 12/03/1947, call +1 555 0100200 or jd@example.org; id 1234567"
    assert scrubber.scrub(text) == "CT chest for born, call or; id"


def test_parts_of_words_are_not_mistaken_for_names() -> None:
    scrubber = TextScrubber(["LI^WEI"])
    assert scrubber.scrub("LIVER lesion, Li reviewed") == "LIVER lesion, reviewed"


def test_identifier_variants_cover_name_parts_and_date_forms() -> None:
    assert identifier_variants("DOE^JANE") == {"DOE^JANE", "DOE", "JANE"}
    assert {"1947-03-12", "12/03/1947", "03/12/1947", "12.03.1947"} <= identifier_variants("19470312")
    assert identifier_variants("  ") == set()
