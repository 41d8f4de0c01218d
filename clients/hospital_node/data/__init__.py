"""The node's data: OMOP sources, their validation, cohorts and local scoring."""
