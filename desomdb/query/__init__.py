"""Reading the archive with SQL: DuckDB views, the guard and sandbox, column schema, intake.

Layer 6 of the package (see ``docs/architecture.md``): read paths only; nothing here writes tables.
"""
