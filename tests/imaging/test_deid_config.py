"""Site de-identification settings: parsed once, every problem at once, with hints."""

from __future__ import annotations

import pytest

from imaging.deid_config import DeidConfig, SafePrivateTag
from imaging.errors import ImagingConfigError
from imaging.pixels import BurnedInMode, CleaningRule, Region
from imaging.profile import ProfileOption


def test_a_valid_mapping_builds_the_config() -> None:
    config = DeidConfig.from_mapping(
        {
            "options": ["retain_longitudinal_modified_dates", "clean_descriptors"],
            "max_date_shift_days": 365,
            "burned_in": {
                "mode": "clean",
                "rules": [{"manufacturer": "ACME", "rows": 512, "regions": [{"top": 0, "left": 0, "bottom": 40, "right": 512}]}],
            },
            "safe_private": [{"creator": "ACME 1.1", "group": 0x0019, "element": 0x10}],
        }
    )
    assert config.options == {ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES, ProfileOption.CLEAN_DESCRIPTORS}
    assert config.option_names == ("retain_longitudinal_modified_dates", "clean_descriptors")
    assert config.max_date_shift_days == 365
    assert config.burned_in.mode is BurnedInMode.CLEAN
    assert config.burned_in.rules == (
        CleaningRule(regions=(Region(0, 0, 40, 512),), manufacturer="ACME", rows=512),
    )
    assert config.safe_private == {SafePrivateTag("ACME 1.1", 0x0019, 0x10)}


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ImagingConfigError) as info:
        DeidConfig.from_mapping(
            {
                "option": [],
                "options": ["retain_uid"],
                "max_date_shift_days": 0,
                "burned_in": {
                    "mode": "scrub",
                    "rules": [{"regions": [{"top": 5, "left": 0, "bottom": 2, "right": 9}], "modle": "X"}],
                },
                "safe_private": [{"creator": "", "group": 0x0010, "element": 300}],
            }
        )
    assert info.value.problems == (
        "deid.option is not a setting; did you mean 'options'?",
        "deid.options[0] 'retain_uid' is not a PS3.15 option; did you mean 'retain_uids'?",
        "deid.max_date_shift_days must be an integer in 1..36500; found 0",
        "deid.burned_in.mode must be 'clean' or 'exclude'; found 'scrub'",
        "deid.burned_in.rules[0].modle is not a setting; did you mean 'model'?",
        "deid.burned_in.rules[0].regions[0]: bottom must exceed top and right must exceed left",
        "deid.safe_private[0].creator must be a non-empty string",
        "deid.safe_private[0].group must be an odd group number above 0x0008; found 16",
        "deid.safe_private[0].element must be the element byte 0x00..0xFF; found 300",
    )


def test_cleaning_needs_at_least_one_rule() -> None:
    with pytest.raises(ImagingConfigError, match="rules must list at least one rule when mode is 'clean'"):
        DeidConfig.from_mapping({"burned_in": {"mode": "clean"}})


def test_both_longitudinal_options_cannot_be_built_in_code_either() -> None:
    with pytest.raises(ImagingConfigError, match="mutually exclusive"):
        DeidConfig(
            options=frozenset(
                {ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES, ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES}
            )
        )


def test_the_defaults_are_the_basic_profile_excluding_suspect_images() -> None:
    config = DeidConfig.from_mapping({})
    assert config == DeidConfig()
    assert config.options == frozenset() and config.burned_in.mode is BurnedInMode.EXCLUDE
