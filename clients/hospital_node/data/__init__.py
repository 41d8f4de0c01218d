"""The node's data: OMOP sources, cohort builders and local risk scoring (``scoring``)."""

__all__: list[str] = []
