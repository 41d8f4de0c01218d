"""The people's table of the OMOP concepts medfed reads: ``docs/omop_concepts.md``, generated from CONCEPTS.

Regenerate the file after changing ``models.clinical_tasks.CONCEPTS``::

    python -c "from models.concept_docs import concepts_markdown; print(concepts_markdown(), end='')" \\
        > docs/omop_concepts.md

``tests/models/test_concept_docs.py`` keeps the committed file equal to this output.
"""

from __future__ import annotations

from models.clinical_tasks import CONCEPTS, Concept

__all__ = ["concepts_markdown"]

_HEADER = """# OMOP concepts medfed uses

Standard OMOP CDM v5.4 concepts (OHDSI Athena ids) that medfed reads from a hospital's tables:
conditions, measurements (clinic, lab, home and wearable), observations, drug ingredients,
genders, record types and units. A measurement's value must carry the unit named here
(`unit_concept_id` = that unit's concept id) and lie in the plausible range, or the node's
validation drops the row (see `clients/hospital_node/data/validation.py`).

The last column says where each id comes from: `Athena`, OHDSI's standard vocabulary as
public ETLs with checked concept tables use it; `unconfirmed`, the standard id we believe it
is, to check in Athena before production; `local`, an id in the range OHDSI reserves for
local concepts (above 2,000,000,000), used where the standard id could not be confirmed
(`steps`, `sleep_hours`, the per-day unit, the device record type). A hospital whose ETL
wrote the standard id for one of these maps it to medfed's id before registering the source.

Generated from `models/clinical_tasks.py` (`CONCEPTS`) by `models/concept_docs.py`; do not edit by hand.
"""


def _number(value: float) -> str:
    return f"{value:g}"


def _row(concept: Concept) -> str:
    unit = f"{concept.unit} ({CONCEPTS[concept.unit].concept_id})" if concept.unit else ""
    plausible = (f"{_number(concept.plausible[0])} to {_number(concept.plausible[1])}"
                 if concept.plausible is not None else "")
    cells = (concept.name, str(concept.concept_id), concept.domain, concept.vocabulary, concept.label, unit, plausible,
             concept.confirmed)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def concepts_markdown() -> str:
    """``docs/omop_concepts.md``: one table of every concept in CONCEPTS, in catalogue order."""
    lines = [
        _HEADER,
        "| name | concept_id | domain | vocabulary code | concept name | unit (concept_id) | plausible range | id |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(concept) for concept in CONCEPTS.values()),
    ]
    return "\n".join(lines) + "\n"
