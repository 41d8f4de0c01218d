"""The budget chart: one numbered point per charge, each named; the budget drawn, or noted when far above the spend."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from clients.hospital_node.console.chart import ChartPoint, epsilon_svg

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _points(*epsilons: float) -> list[ChartPoint]:
    return [ChartPoint(i + 1, START + timedelta(hours=i), e, "991ca4cadddd", "41", i + 1, 0) for i, e in enumerate(epsilons)]


def test_every_charge_is_a_point_named_by_spec_run_and_round() -> None:
    svg = epsilon_svg(_points(1.0, 2.0, 2.5), budget=3.0, held=2.5, title="htn_cohort")
    assert svg.count("<circle") == 3
    tips = re.findall(r"<circle[^>]*><title>([^<]+)</title>", svg)
    assert tips[1] == "charge 2: spec 991ca4cadddd, run 41, round 2, release 0; ε 2.000 after it (2026-12-01 10:00:00 UTC)"
    assert "budget ε 3" in svg and 'stroke-dasharray="6 4"' in svg


def test_a_budget_far_above_the_spend_is_noted_not_drawn() -> None:
    svg = epsilon_svg(_points(1.0, 2.0), budget=50.0, held=2.0, title="t")
    assert "budget ε 50: above the chart" in svg and 'stroke-dasharray="6 4"' not in svg


def test_text_from_the_records_is_escaped() -> None:
    point = ChartPoint(1, START, 1.0, "<b>", "run<script>", 1, 0)
    svg = epsilon_svg([point], budget=None, held=None, title="a & b")
    assert "<script>" not in svg and "run&lt;script&gt;" in svg and "a &amp; b" in svg


def test_no_charges_says_so() -> None:
    assert "no charges yet" in epsilon_svg([], budget=8.0, held=0.0, title="t")
