"""The Annex E table as data: loading, checking, option columns and their conflicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaging.errors import ProfileError
from imaging.profile import (
    TABLE_PATH,
    ProfileOption,
    TagKind,
    load_profile_table,
    parse_options,
    parse_profile_table,
)

TABLE = load_profile_table()


def _row(tag: str):
    return next(r for r in TABLE.rows if r.tag == tag)


def test_the_table_names_its_edition_and_profile() -> None:
    assert TABLE.standard == "DICOM PS3.15"
    assert TABLE.edition == "2026d"
    assert TABLE.title == "DICOM PS3.15 2026d Table E.1-1"
    assert TABLE.profile_code == ("113100", "DCM", "Basic Application Confidentiality Profile")
    assert TABLE.option_codes[ProfileOption.RETAIN_UIDS] == ("113110", "Retain UIDs Option")


@pytest.mark.parametrize(
    ("tag", "name", "basic", "options"),
    [
        ("(0010,0010)", "Patient's Name", "Z", {}),
        ("(0010,0020)", "Patient ID", "Z/D", {}),
        ("(0020,000D)", "Study Instance UID", "U", {ProfileOption.RETAIN_UIDS: "K"}),
        ("(0008,103E)", "Series Description", "X", {ProfileOption.CLEAN_DESCRIPTORS: "C"}),
        (
            "(0008,0020)",
            "Study Date",
            "Z",
            {
                ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: "K",
                ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: "C",
            },
        ),
        ("(0010,1010)", "Patient's Age", "X", {ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: "K"}),
        ("(0008,1140)", "Referenced Image Sequence", "X/Z/U*", {ProfileOption.RETAIN_UIDS: "K"}),
        ("(0018,1000)", "Device Serial Number", "X/Z/D", {ProfileOption.RETAIN_DEVICE_IDENTITY: "K"}),
        ("(0008,0080)", "Institution Name", "X/Z/D", {ProfileOption.RETAIN_INSTITUTION_IDENTITY: "K"}),
        ("(0040,A730)", "Content Sequence", "D", {ProfileOption.CLEAN_STRUCTURED_CONTENT: "C"}),
    ],
)
def test_rows_hold_the_standard_s_actions(tag: str, name: str, basic: str, options: dict) -> None:
    row = _row(tag)
    assert (row.name, row.basic, dict(row.options)) == (name, basic, options)


def test_the_repeating_and_private_rows_are_patterns() -> None:
    assert TABLE.by_kind(TagKind.PRIVATE).options == {ProfileOption.RETAIN_SAFE_PRIVATE: "C"}
    assert TABLE.by_kind(TagKind.CURVE).tag == "(50xx,xxxx)"
    assert TABLE.by_kind(TagKind.OVERLAY_DATA).basic == "X"


def test_tags_are_unique_and_every_code_is_known() -> None:
    tags = [r.tag for r in TABLE.rows]
    assert len(tags) == len(set(tags))
    assert {r.basic for r in TABLE.rows} == {"D", "Z", "X", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    assert {c for r in TABLE.rows for c in r.options.values()} == {"K", "C"}


def test_an_option_overrides_the_basic_action_and_c_wins_a_conflict() -> None:
    calibration = _row("(0018,1200)")  # Date of Last Calibration
    assert calibration.action(frozenset()) == "X"
    assert calibration.action(frozenset({ProfileOption.RETAIN_DEVICE_IDENTITY})) == "K"
    both = frozenset({ProfileOption.RETAIN_DEVICE_IDENTITY, ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES})
    assert calibration.action(both) == "C"
    conflicts = [r for r in TABLE.rows if len({r.options[o] for o in both if o in r.options}) > 1]
    assert len(conflicts) == 11


def test_options_are_parsed_with_a_suggestion_and_the_date_clash_is_refused() -> None:
    assert parse_options(["retain_uids"]) == {ProfileOption.RETAIN_UIDS}
    with pytest.raises(ProfileError) as info:
        parse_options(["retain_uid", "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])
    assert str(info.value) == (
        "options[0] 'retain_uid' is not a PS3.15 option; did you mean 'retain_uids'?; "
        "options: retain_longitudinal_full_dates and retain_longitudinal_modified_dates are mutually "
        "exclusive (PS3.15 E.3.6); pick one"
    )
    with pytest.raises(ProfileError, match="must be a list of option names"):
        parse_options("retain_uids")


def test_a_malformed_table_is_refused_with_every_problem() -> None:
    document = json.loads(TABLE_PATH.read_text())
    document["edition"] = ""
    document["rows"][0]["basic"] = "Q"
    document["rows"][1]["options"] = {"retain_uid": "K"}
    document["rows"][2]["tag"] = "(10,10)"
    with pytest.raises(ProfileError) as info:
        parse_profile_table(document)
    message = str(info.value)
    assert "edition must be a non-empty string" in message
    assert "rows[0].basic 'Q' is not one of" in message
    assert "rows[1].options has unknown option 'retain_uid'; did you mean 'retain_uids'?" in message
    assert "rows[2].tag '(10,10)' is not (GGGG,EEEE)" in message


def test_the_table_round_trips_through_its_document() -> None:
    again = parse_profile_table(TABLE.to_document())
    assert again.rows == TABLE.rows and again.edition == TABLE.edition


def test_an_unreadable_table_file_is_a_profile_error(tmp_path: Path) -> None:
    (tmp_path / "table.json").write_text("{ not json")
    with pytest.raises(ProfileError, match="cannot be read: JSONDecodeError"):
        load_profile_table(tmp_path / "table.json")
