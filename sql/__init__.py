"""Package data: the DuckDB views of the archive, one file per view (see DESIGN.md)."""
