"""DuckDB access to the archive: one view per committed table, and the current model.

``connect(archive)`` returns an in-memory DuckDB connection whose views read exactly the
committed Parquet files (the manifest), with hive partition columns (``release``,
``model_id``). Derived views from ``sql/`` are added on top when present. The connection is
read-only (:class:`ReadOnlyConnection`: every statement passes
:func:`desomdb.query.guard.check_read_only`, and the connection is sandboxed to the archive folder);
``connect(archive, raw=True)`` gives the plain DuckDB connection instead.

The views also own the query cache (:data:`desomdb.archive.paths.QUERY_CACHE`): after each writer
session, ``baxel_labels`` of the archive's current model is materialised into a DuckDB file,
so the queries users run most (per-node aggregations, one galaxy's rows) skip its two
1.2 M-row joins. Readers attach it read-only and use it only while its stamp matches their own
snapshot of the manifest; otherwise (or for another model) ``baxel_labels`` is the live join.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, overload

import duckdb

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import write_text_atomic
from desomdb.errors import DesomdbError, QueryError, first_line
from desomdb.query.guard import check_read_only, sandbox, syntax_error_message
from desomdb.som.registry import current_model, resolve_model

#: Views materialised in the query cache -> the base tables they read. A cache's stamp digests
#: these tables' committed file lists, the views' SQL and the model, so any commit that could
#: change the view's rows, or a new definition of it, makes the cache stale.
CACHED_VIEWS = {"baxel_labels": ("baxels", "labels", "assignments")}
_CACHE_BASES = tuple(sorted({t for tables in CACHED_VIEWS.values() for t in tables}))
#: Bump when the cache's layout changes: older caches are then stale.
CACHE_FORMAT = 1
#: The name the query cache is attached under in every reading connection.
CACHE_ALIAS = "desomdb_cache"

#: DuckDB settings of every reading connection (and of setup.sql). Release files (ingest
#: tables, labels, label_errors) never change under their name: a commit adds new files.
#: A model's one-file tables (nodes, node_labels, fingerprints) are replaced under theirs by
#: an atomic rename; DuckDB checks a cached footer against the file's modification time
#: before using it. Reusing footers cut one galaxy's baxel_labels query from 16 to 10 ms
#: (benchmarks/bench_sql.py, 300k baxels in 6 files), as each query otherwise re-reads every
#: file's footer.
READ_SETTINGS = ("set parquet_metadata_cache = true",)


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


#: The command that writes each table, for messages about a view whose inputs are missing.
WRITTEN_BY = {
    "cubes": "desomdb ingest", "galaxies": "desomdb ingest", "baxels": "desomdb ingest",
    "spectra": "desomdb ingest", "bin_map": "desomdb ingest", "images": "desomdb ingest",
    "truth": "desomdb ingest of a mock survey", "labels": "desomdb label",
    "label_errors": "desomdb calibrate", "models": "desomdb train",
    "splits": "desomdb train", "assignments": "desomdb assign", "nodes": "desomdb assign",
    "node_partials": "desomdb assign", "node_labels": "desomdb assign",
    "fingerprints": "desomdb fingerprints", "label_plan": "desomdb label --plan",
    "map_labels": "desomdb assign",
}


def view_refs(text: str, names: Iterable[str]) -> list[str]:
    """Return the ``names`` (tables or views) that SQL ``text`` reads (``from``/``join``)."""
    return [n for n in names if re.search(rf"\b(from|join) {n}\b", text)]


def missing_inputs(view: str, present: set[str]) -> list[str]:
    """List the tables ``view`` reads (directly or through views) that are not ``present``.

    Each as ``"table (command that writes it)"``; empty when the view is not one of the
    package's or lacks nothing.
    """
    defs = view_sql()
    if view not in defs:
        return []
    seen: set[str] = set()
    todo = [view]
    while todo:
        name = todo.pop()
        for dep in view_refs(defs[name], defs):
            if dep not in seen and dep != name:
                seen.add(dep)
                todo.append(dep)
    return [f"{t} ({WRITTEN_BY.get(t, 'a pipeline stage')})"
            for t in paths.TABLES if t in seen and t not in present]


def view_sql() -> dict[str, str]:
    """Read the ``sql/`` view definitions: name -> SELECT text (one file per view).

    Read once per process (the package's files; ~0.9 ms, an eighth of a one-galaxy query,
    when every ``connect`` read them).
    """
    return dict(_package_sql(""))


def macro_sql() -> dict[str, str]:
    """Read the table macros (``sql/macros/``, e.g. ``cone``): name -> CREATE MACRO text."""
    return dict(_package_sql("macros"))


@lru_cache(maxsize=2)
def _package_sql(sub: str) -> tuple[tuple[str, str], ...]:
    folder = resources.files("desomdb.sql")
    folder = folder.joinpath(sub) if sub else folder
    return tuple(sorted((p.name[:-4], p.read_text()) for p in folder.iterdir()
                        if p.name.endswith(".sql") and p.name != "setup.sql"))


def _statements(archive: Archive, model: str | None, relative: bool,
                manifest: dict[str, Any] | None = None) -> tuple[list[str], set[str]]:
    """SET VARIABLE statements for the committed files, and the tables that have files.

    Both come from one reading of the manifest: a second reading could see a commit made in
    between, and a view would then be created over a file list that was never set (a reader
    racing a writer got ``read_parquet`` of a NULL list). ``union_<table>`` is false when the
    commits recorded one schema for all the table's files (:func:`uniform_schema`): DuckDB then
    binds the view from one footer instead of reading every file's (~0.1 ms each, times every
    view built on it; 1,000 per-cube files made ``connect`` take 1.5 s).
    """
    if manifest is None:
        manifest = archive.manifest()
    tables, records = manifest["tables"], manifest["records"]
    stmts = [f"create or replace macro current_model() as {_quote(model)}"]
    present = set()
    for table in paths.TABLES:
        files = tables.get(table, [])
        if files:
            listed = files if relative else [str(archive.root / f) for f in files]
            stmts.append(f"set variable files_{table} = {_file_list(listed)}")
            union = "false" if uniform_schema([records.get(f) for f in files]) else "true"
            stmts.append(f"set variable union_{table} = {union}")
            present.add(table)
    if "labels" in present:  # one fitter: preferred_labels needs no ranking
        fitters = {p[1] for f in tables["labels"]
                   if (p := paths.parse_label_part_name(f.rsplit("/", 1)[-1]))}
        stmts.append(f"set variable labels_one_fitter = {str(len(fitters) <= 1).lower()}")
    return stmts, present


def uniform_schema(records: list[Any]) -> bool:
    """Whether every file's commit record holds the same schema digest (none missing)."""
    digests = {getattr(r, "schema", None) for r in records}
    return len(digests) == 1 and None not in digests


class ReadOnlyConnection:
    """A sandboxed DuckDB connection over the archive's views that runs only read-only SQL.

    ``sql``/``query``/``execute`` pass each query through
    :func:`desomdb.query.guard.check_read_only` before DuckDB sees it, and the connection is
    confined to the archive folder (:func:`desomdb.query.guard.sandbox`). Results are the usual
    DuckDB relations (``.pl()``, ``.arrow()``, ``.fetchall()``). A sandboxed connection does
    not find Python DataFrames by name: ``con.register("t", df)`` them first. The guard covers
    SQL given to this object; a relation's own methods (``rel.query``, ``rel.to_parquet``)
    are plain DuckDB.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def sql(self, query: str, *, alias: str = "", params: object = None
            ) -> duckdb.DuckDBPyRelation:
        """Check ``query`` and return its relation (as ``DuckDBPyConnection.sql``)."""
        return self._con.sql(check_read_only(query), alias=alias, params=params)

    query = sql

    def execute(self, query: str, parameters: object = None) -> ReadOnlyConnection:
        """Check and run ``query``; fetch its rows with ``fetchall()`` and friends."""
        self._con.execute(check_read_only(query), parameters)
        return self

    def fetchall(self) -> list[Any]:
        """Return the rows of the last ``execute`` as tuples."""
        return self._con.fetchall()

    def fetchone(self) -> Any:
        """Return the next row of the last ``execute`` (None when done)."""
        return self._con.fetchone()

    def fetchmany(self, size: int = 1) -> list[Any]:
        """Return the next ``size`` rows of the last ``execute``."""
        return self._con.fetchmany(size)

    def fetchdf(self) -> Any:
        """Return the last ``execute``'s result as a pandas DataFrame."""
        return self._con.fetchdf()

    df = fetchdf

    def fetchnumpy(self) -> dict[str, Any]:
        """Return the last ``execute``'s result as a dict of numpy arrays."""
        return dict(self._con.fetchnumpy())

    @property
    def description(self) -> Any:
        """Return the DB-API column description of the last ``execute``."""
        return self._con.description

    def table(self, name: str) -> duckdb.DuckDBPyRelation:
        """Return the relation of a view (``con.table("baxels")``)."""
        return self._con.table(name)

    def register(self, view_name: str, python_object: object) -> ReadOnlyConnection:
        """Make a DataFrame or Arrow table queryable as ``view_name`` (in memory only)."""
        self._con.register(view_name, python_object)
        return self

    def unregister(self, view_name: str) -> ReadOnlyConnection:
        """Drop a name made by :meth:`register`."""
        self._con.unregister(view_name)
        return self

    def interrupt(self) -> None:
        """Stop the query running on this connection (from another thread)."""
        self._con.interrupt()

    def close(self) -> None:
        """Close the connection."""
        self._con.close()

    def __enter__(self) -> ReadOnlyConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"desomdb.connect() gives a read-only connection without {name!r}"
                             "; desomdb.connect(archive, raw=True) gives the plain DuckDB "
                             "connection (which can change the archive's files)")


def progress_bar_off(con: duckdb.DuckDBPyConnection) -> None:
    """Turn DuckDB's progress bar off on ``con`` (it would draw on the caller's terminal).

    Inside Jupyter DuckDB keeps it off already, and refuses to change the setting at all
    without ipywidgets ("Could not change the progress bar setting"): that refusal is ignored,
    so pipeline stages run from a notebook.
    """
    try:
        con.execute("set enable_progress_bar = false")
    except duckdb.InvalidInputException:
        if con.sql("select current_setting('enable_progress_bar')").fetchall()[0][0]:
            raise


@overload
def connect(archive: str | Path, model: str | None = None, raw: Literal[False] = False,
            cached: bool = True) -> ReadOnlyConnection: ...


@overload
def connect(archive: str | Path, model: str | None = None, *, raw: Literal[True],
            cached: bool = True) -> duckdb.DuckDBPyConnection: ...


def connect(archive: str | Path, model: str | None = None, raw: bool = False,
            cached: bool = True) -> ReadOnlyConnection | duckdb.DuckDBPyConnection:
    """Open a DuckDB connection with a view for every table of the archive.

    Parameters
    ----------
    archive : str or Path
    model : str, optional
        The DESOM-1 model that model-dependent convenience views use (default: the
        archive's current model); it must be registered. Change it later with
        :func:`use_model`.
    raw : bool
        Return the plain DuckDB connection: no statement check, no sandbox. You can damage
        the archive with it (``COPY ... TO`` a committed file, say); for debugging only.
    cached : bool
        Read ``baxel_labels`` from the query cache where it matches this connection's
        snapshot (the same rows, without the joins). False: always the live join (what
        ``desomdb check`` verifies).

    Returns
    -------
    ReadOnlyConnection or duckdb.DuckDBPyConnection
        In-memory, holding only views. By default a :class:`ReadOnlyConnection`: one
        read-only statement per call; files outside the archive folder, extensions, ATTACH
        and settings are refused.

    Raises
    ------
    ModelError
        If ``model`` is given and not registered (the message lists the registered ones).
    """
    arch = Archive(archive)
    chosen = resolve_model(arch, model) if model is not None else current_model(arch)
    con = duckdb.connect(":memory:")
    manifest = arch.manifest()  # one snapshot for the file lists and the cache's stamp
    stmts, present = _statements(arch, chosen, relative=False, manifest=manifest)
    for stmt in (*READ_SETTINGS, *stmts):  # the footer cache first: binding a view over
        con.execute(stmt)                 # per-cube files reads each footer (~0.3 ms)
    defs = view_sql()
    if cached:
        defs |= _attach_cache(con, arch, manifest, defs)
    _create_views(con, present, defs)
    if raw:
        return con
    sandbox(con, [arch.root])
    return ReadOnlyConnection(con)


def use_model(con: ReadOnlyConnection | duckdb.DuckDBPyConnection, model_id: str | None) -> None:
    """Set the DESOM-1 model that convenience views (``baxel_labels`` ...) use."""
    raw = con._con if isinstance(con, ReadOnlyConnection) else con
    raw.execute(f"create or replace macro current_model() as {_quote(model_id)}")


def _quote(value: str | None) -> str:
    return "null" if value is None else "'" + value.replace("'", "''") + "'"


def _create_views(con: duckdb.DuckDBPyConnection, present: set[str],
                  defs: dict[str, str] | None = None) -> list[str]:
    """Create base views for present tables, derived views and macros whose inputs exist.

    ``defs`` gives the view texts by name (default :func:`view_sql`; :func:`connect` passes
    the query cache's versions of the cached views).
    """
    if defs is None:
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
    for name, text in macro_sql().items():  # table macros bind their views when created
        try:
            con.execute(text)
        except (duckdb.CatalogException, duckdb.BinderException):
            continue
        created.append(name)
    return created


def setup_sql(archive: str | Path) -> str:
    """Write a script for the plain DuckDB CLI, run from inside the archive folder.

    ``cd ARCHIVE && duckdb -cmd ".read setup.sql"`` gives the same views as
    :func:`connect` (paths are relative to the archive folder).
    """
    arch = Archive(archive)
    lines = ["-- desomdb views for the DuckDB CLI; regenerate with 'desomdb sql ARCHIVE --setup'.",
             "-- Run from inside the archive folder (file paths are relative to it)."]
    model = current_model(arch)
    committed = arch.manifest()
    relative, present = _statements(arch, model, relative=True, manifest=committed)
    lines += [s + ";" for s in READ_SETTINGS]
    lines += [s + ";" for s in relative]
    defs = view_sql()
    con = duckdb.connect(":memory:")
    absolute, _ = _statements(arch, model, relative=False, manifest=committed)
    for stmt in absolute:
        con.execute(stmt)
    made = _create_views(con, present)
    macros = macro_sql()
    lines += [macros[name].strip() + ";" if name in macros
              else f"create or replace view {name} as {defs[name].strip()};" for name in made]
    return "\n".join(lines) + "\n"


def write_setup_sql(archive: Archive) -> None:
    """Regenerate ``setup.sql`` (views for the plain DuckDB CLI) after a writer's commits."""
    write_text_atomic(archive.root / paths.SETUP_SQL, setup_sql(archive.root))


def cache_stamp(manifest: dict[str, Any], model_id: str, defs: dict[str, str]) -> str:
    """Digest of what the cached views' rows depend on (hex sha256).

    The names, sizes and sha256 of the base tables' committed files (a file re-committed
    under its name with other rows changes the stamp), the model and the view texts.

    Parameters
    ----------
    manifest : dict
        A snapshot of the archive's manifest (:meth:`desomdb.archive.store.Archive.manifest`).
    model_id : str
        The model whose assignments the cache holds.
    defs : dict
        The view texts (:func:`view_sql`).
    """
    records = manifest["records"]
    # each file by name and content: a commit may replace a file under the same name
    payload = {"format": CACHE_FORMAT, "model": model_id,
               "files": {t: [[f, records[f].sha256 if f in records else None,
                              records[f].size if f in records else None]
                             for f in manifest["tables"].get(t, [])] for t in _CACHE_BASES},
               "sql": {name: defs.get(name) for name in (*CACHED_VIEWS, *_CACHE_BASES)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _attach_cache(con: duckdb.DuckDBPyConnection, arch: Archive, manifest: dict[str, Any],
                  defs: dict[str, str]) -> dict[str, str]:
    """Attach the query cache read-only if it matches ``manifest``; the views to override.

    A missing, stale, damaged or unreadable cache is not an error: the views stay the live
    joins (the cache only saves time). The cached view still answers for any other model
    than the cache's through the live join, so :func:`use_model` needs no rebuild.
    """
    path = arch.root / paths.QUERY_CACHE
    if not path.is_file():
        return {}
    try:
        con.execute(f"attach {_quote(str(path))} as {CACHE_ALIAS} (read_only)")
    except duckdb.Error:
        return {}
    try:
        rows = con.execute(f"select model_id, stamp from {CACHE_ALIAS}.stamp").fetchall()
    except duckdb.Error:
        rows = []
    if len(rows) != 1 or rows[0][1] != cache_stamp(manifest, rows[0][0], defs):
        con.execute(f"detach {CACHE_ALIAS}")
        return {}
    model = _quote(rows[0][0])
    return {name: f"select * from {CACHE_ALIAS}.{name} where current_model() = {model}\n"
                  f"union all\nselect * from ({defs[name].strip()})\n"
                  f"where current_model() is distinct from {model}"
            for name in CACHED_VIEWS}


def write_query_cache(archive: Archive) -> None:
    """Rebuild the query cache after a writer session (skipped when it is up to date).

    Materialises each of :data:`CACHED_VIEWS` for the archive's current DESOM-1 model into
    :data:`desomdb.archive.paths.QUERY_CACHE`, sorted by (release, plateifu, bin_id) so one galaxy's
    rows are a few row groups. Written in the staging folder and moved into place, so a
    reader sees the old file or the new one. Without a current model (or without the
    tables) there is no cache. A failure leaves no cache and says so on stderr: the commit
    itself has landed, and readers fall back to the live joins.
    """
    target = archive.root / paths.QUERY_CACHE
    try:
        model = current_model(archive)
    except DesomdbError:
        model = None
    manifest = archive.manifest()  # stable: the hook runs inside the writer lock
    if model is None or any(not manifest["tables"].get(t) for t in _CACHE_BASES):
        target.unlink(missing_ok=True)
        return
    stamp = cache_stamp(manifest, model, view_sql())
    if _stamp_of(target) == (model, stamp):
        return
    tmp = archive.root / paths.STAGING / f"{paths.QUERY_CACHE}.{os.getpid()}"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        con = connect(archive.root, raw=True, cached=False)  # the current model's views
        try:
            con.execute(f"attach {_quote(str(tmp))} as {CACHE_ALIAS}")
            for name in CACHED_VIEWS:
                con.execute(f"create table {CACHE_ALIAS}.{name} as select * from {name} "
                            "order by release, plateifu, bin_id")
            con.execute(f"create table {CACHE_ALIAS}.stamp as select ? as model_id, "
                        "? as stamp", [model, stamp])
            con.execute(f"detach {CACHE_ALIAS}")
        finally:
            con.close()
        tmp.replace(target)
    except (DesomdbError, duckdb.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        print(f"desomdb: {target}: query cache not rebuilt ({first_line(exc)}); queries use "
              "the live joins (slower, same rows)", file=sys.stderr)


def _stamp_of(path: Path) -> tuple[str, str] | None:
    """(model_id, stamp) recorded in the query cache at ``path`` (None if unreadable)."""
    if not path.is_file():
        return None
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            rows = con.execute("select model_id, stamp from stamp").fetchall()
    except duckdb.Error:
        return None
    return (rows[0][0], rows[0][1]) if len(rows) == 1 else None



def query(con: ReadOnlyConnection | duckdb.DuckDBPyConnection, sql: str
          ) -> duckdb.DuckDBPyRelation:
    """Run one read-only query; refuse anything else and explain unknown names.

    Raises
    ------
    QueryError
        If :func:`desomdb.query.guard.check_read_only` refuses ``sql`` (a syntax error, more than
        one statement, anything but a SELECT or an EXPLAIN of one), if it reads a file
        outside the archive, or when DuckDB reports an unknown table or column (the message
        lists what exists).
    """
    check_read_only(sql)
    try:
        return con.sql(sql)
    except duckdb.PermissionException as exc:
        raise QueryError(f"{str(exc).splitlines()[0]} (desomdb queries read only the "
                         "archive's files, through its views)") from exc
    except duckdb.CatalogException as exc:
        views = sorted(r[0] for r in con.sql(
            "select view_name from duckdb_views() where not internal").fetchall())
        named = re.search(r"Table with name (\w+) does not exist", str(exc))
        view = named.group(1) if named else ""
        needs = missing_inputs(view, set(views)) if view else []
        if needs:  # one of the package's views, before the stage that feeds it has run
            raise QueryError(f"view {view!r} is not available yet: it needs "
                             f"{', '.join(needs)}") from exc
        raise QueryError(f"{exc}\navailable views: {', '.join(views)}") from exc
    except duckdb.BinderException as exc:
        raise QueryError(f"{exc}\n(use 'describe <view>' to list a view's columns)") from exc
    except duckdb.ParserException as exc:
        raise QueryError(syntax_error_message(exc)) from exc

