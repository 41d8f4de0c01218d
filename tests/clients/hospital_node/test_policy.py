"""The node policy: defaults, the reservation hold time, and files of earlier releases."""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from clients.hospital_node.errors import NodeHomeError
from clients.hospital_node.policy import NodePolicy


def test_a_missing_file_is_the_defaults_with_a_day_of_reservation_hold(tmp_path: Path) -> None:
    policy = NodePolicy.read(tmp_path / "policy.toml")
    assert policy == NodePolicy()
    assert (policy.reservation_hold_hours, policy.reservation_hold) == (24.0, timedelta(hours=24))
    assert policy.ignored_accountant is None


def test_the_rendered_file_reads_back_as_the_same_policy(tmp_path: Path) -> None:
    policy = NodePolicy(min_cohort_size=50, reservation_hold_hours=6.5)
    path = tmp_path / "policy.toml"
    path.write_text(policy.render())
    assert NodePolicy.read(path) == policy
    assert "accountant" not in tomllib.loads(policy.render())["policy"]


@pytest.mark.parametrize("hours", [0, -1, float("inf"), 24 * 366, True, "24"])
def test_a_bad_reservation_hold_is_named(hours: object) -> None:
    with pytest.raises(NodeHomeError, match=r"policy.reservation_hold_hours must be a number of hours in \(0, 8760\]; found "):
        NodePolicy.from_mapping({"policy": {"reservation_hold_hours": hours}}, source="policy.toml")


@pytest.mark.parametrize("accountant", ["prv", "rdp", "pld"])
def test_an_older_file_naming_an_accountant_is_read_and_its_accountant_ignored(accountant: str) -> None:
    policy = NodePolicy.from_mapping({"policy": {"accountant": accountant, "min_cohort_size": 20}}, source="policy.toml")
    assert policy == NodePolicy(min_cohort_size=20)
    assert policy.ignored_accountant == accountant


def test_an_accountant_that_never_was_one_is_refused() -> None:
    with pytest.raises(NodeHomeError, match="policy.accountant is no longer a setting \\(the ledger composes with PLD\\); remove it; found 'gdp'"):
        NodePolicy.from_mapping({"policy": {"accountant": "gdp"}}, source="policy.toml")
