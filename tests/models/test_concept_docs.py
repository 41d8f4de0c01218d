"""docs/omop_concepts.md is the generated table of models.clinical_tasks.CONCEPTS."""

from __future__ import annotations

from pathlib import Path

from models.clinical_tasks import CONCEPTS
from models.concept_docs import concepts_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "omop_concepts.md"


def test_the_committed_file_equals_the_generated_one() -> None:
    assert DOC.read_text(encoding="utf-8") == concepts_markdown(), (
        "docs/omop_concepts.md is stale; regenerate it as models/concept_docs.py says"
    )


def test_one_row_per_concept_with_its_unit_and_range() -> None:
    rows = [line for line in concepts_markdown().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(CONCEPTS)
    assert "| sbp | 3004249 | measurement | LOINC 8480-6 | Systolic blood pressure | mmHg (8876) | 40 to 300 | Athena |" in rows
    assert "| pregnancy | 4299535 | condition | SNOMED 77386006 | Pregnant |  |  | unconfirmed |" in rows
