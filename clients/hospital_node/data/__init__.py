"""The node's data: OMOP CDM sources read as one consistent snapshot, their validation, cohorts and scoring.

``omop_tables`` (the OMOP CDM v5.4 subset medfed reads: tables, columns, DuckDB types),
``sources`` (OmopSource, open_snapshot, OmopSnapshot: a folder, SQLite file or PostgreSQL
database as DuckDB views), ``validation`` (the cleaning rules and the ValidationReport),
``cohorts`` (build_cohort: one row per unit of privacy from those views).
Import-light: nothing here imports duckdb, pyarrow or psycopg at package import.
"""

__all__ = ["cohorts", "omop_tables", "sources", "validation"]
