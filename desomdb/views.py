"""DuckDB access to the archive: one view per committed table, and the current model.

``connect(archive)`` returns an in-memory DuckDB connection whose views read exactly the
committed Parquet files (the manifest), with hive partition columns (``release``,
``model_id``). Derived views from ``sql/`` are added on top when present.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from desomdb import paths
from desomdb.archive import Archive, write_json_atomic
from desomdb.errors import ModelError, QueryError


def current_model(archive: Archive, kind: str = "desom1") -> str | None:
    """Return the archive's current model id of ``kind`` (None if none was made current)."""
    path = archive.root / paths.CURRENT_MODEL
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    value = data.get(kind)
    return str(value) if value else None


def set_current_model(archive: Archive, model_id: str, kind: str = "desom1") -> None:
    """Make ``model_id`` the current model of ``kind`` (explicit, reversible)."""
    known = registered_models(archive)
    if model_id not in known:
        raise ModelError(f"{archive.root}: no registered model {model_id!r}; registered: "
                         f"{sorted(known) or 'none'} (see 'desomdb model list')")
    if known[model_id] != kind:
        raise ModelError(f"{model_id} is a {known[model_id]} model, not {kind}")
    path = archive.root / paths.CURRENT_MODEL
    data = json.loads(path.read_text()) if path.exists() else {}
    data[kind] = model_id
    write_json_atomic(path, data)


def registered_models(archive: Archive) -> dict[str, str]:
    """model_id -> kind of every registered model."""
    if not archive.has_table("models"):
        return {}
    t = archive.read("models", columns=["model_id", "kind"])
    return dict(zip(t.column("model_id").to_pylist(), t.column("kind").to_pylist(), strict=True))


def resolve_model(archive: Archive, model_id: str | None, kind: str = "desom1") -> str:
    """``model_id`` if given (and registered), else the current model; clear errors."""
    if model_id is None:
        model_id = current_model(archive, kind)
        if model_id is None:
            raise ModelError(f"{archive.root}: no current {kind} model; train one with "
                             "'desomdb train' or pick one with --model")
    if model_id not in registered_models(archive):
        raise ModelError(f"{archive.root}: model {model_id!r} is not registered; see "
                         "'desomdb model list'")
    return model_id


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def view_sql() -> dict[str, str]:
    """Read the ``sql/`` view definitions: name -> SELECT text (one file per view)."""
    folder = resources.files("desomdb.sql")
    return {p.name[:-4]: p.read_text() for p in folder.iterdir()
            if p.name.endswith(".sql") and p.name != "setup.sql"}


def _statements(archive: Archive, model: str | None, relative: bool) -> list[str]:
    """SET VARIABLE + CREATE VIEW statements for every table and derived view."""
    tables = archive.manifest()["tables"]
    stmts = [f"create or replace macro current_model() as {_quote(model)}"]
    for table in paths.TABLES:
        files = tables.get(table, [])
        if files:
            listed = files if relative else [str(archive.root / f) for f in files]
            stmts.append(f"set variable files_{table} = {_file_list(listed)}")
    return stmts


def connect(archive: str | Path, model: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB connection with a view for every table of the archive.

    Parameters
    ----------
    archive : str or Path
    model : str, optional
        The DESOM-1 model that model-dependent convenience views use (default: the
        archive's current model). Change it later with :func:`use_model`.

    Returns
    -------
    duckdb.DuckDBPyConnection
        In-memory; it holds only views, so the archive's files cannot be changed
        through it.
    """
    arch = Archive(archive)
    con = duckdb.connect(":memory:")
    chosen = model if model is not None else current_model(arch)
    for stmt in _statements(arch, chosen, relative=False):
        con.execute(stmt)
    present = {t for t in paths.TABLES if arch.files(t)}
    _create_views(con, present)
    return con


def use_model(con: duckdb.DuckDBPyConnection, model_id: str | None) -> None:
    """Set the DESOM-1 model that convenience views (``baxel_labels`` ...) use."""
    con.execute(f"create or replace macro current_model() as {_quote(model_id)}")


def _quote(value: str | None) -> str:
    return "null" if value is None else "'" + value.replace("'", "''") + "'"


def _create_views(con: duckdb.DuckDBPyConnection, present: set[str]) -> list[str]:
    """Create base views for present tables, then derived views whose inputs exist."""
    defs = view_sql()
    created = []
    for table in paths.TABLES:
        if table in present and table in defs:
            con.execute(f"create or replace view {table} as {defs[table]}")
            created.append(table)
    pending = {k: v for k, v in defs.items() if k not in paths.TABLES}
    while pending:
        progressed = False
        for name, text in list(pending.items()):
            try:
                con.execute(f"create or replace view {name} as {text}")
            except (duckdb.CatalogException, duckdb.BinderException):
                continue  # an input table (or a column of it) is not there (yet)
            created.append(name)
            pending.pop(name)
            progressed = True
        if not progressed:
            break
    return created


def setup_sql(archive: str | Path) -> str:
    """Write a script for the plain DuckDB CLI, run from inside the archive folder.

    ``cd ARCHIVE && duckdb -cmd ".read setup.sql"`` gives the same views as
    :func:`connect` (paths are relative to the archive folder).
    """
    arch = Archive(archive)
    lines = ["-- desomdb views for the DuckDB CLI; regenerate with 'desomdb sql ARCHIVE --setup'.",
             "-- Run from inside the archive folder (file paths are relative to it)."]
    lines += [s + ";" for s in _statements(arch, current_model(arch), relative=True)]
    defs = view_sql()
    con = duckdb.connect(":memory:")
    for stmt in _statements(arch, current_model(arch), relative=False):
        con.execute(stmt)
    made = _create_views(con, {t for t in paths.TABLES if arch.files(t)})
    lines += [f"create or replace view {name} as {defs[name].strip()};" for name in made]
    return "\n".join(lines) + "\n"


def query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Run a read-only query; refuse DDL/DML and explain unknown names.

    Raises
    ------
    QueryError
        For statements other than SELECT/WITH/DESCRIBE/SHOW/EXPLAIN/SUMMARIZE/PRAGMA,
        or when DuckDB reports an unknown table or column (the message lists what exists).
    """
    stripped = sql.strip().rstrip(";").lstrip("(").lower()
    first = stripped.split(None, 1)[0] if stripped else ""
    if first not in {"select", "with", "describe", "show", "explain", "summarize", "from",
                     "values", "table"}:
        raise QueryError(f"only read-only queries are allowed (got {first.upper() or 'nothing'}"
                         "); the archive is changed only by desomdb commands")
    try:
        return con.sql(sql)
    except duckdb.CatalogException as exc:
        views = sorted(r[0] for r in con.sql(
            "select view_name from duckdb_views() where not internal").fetchall())
        raise QueryError(f"{exc}\navailable views: {', '.join(views)}") from exc
    except duckdb.BinderException as exc:
        raise QueryError(f"{exc}\n(use 'describe <view>' to list a view's columns)") from exc
    except duckdb.ParserException as exc:
        raise QueryError(str(exc)) from exc

