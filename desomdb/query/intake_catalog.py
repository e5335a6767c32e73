"""The intake (2.x) catalog of an archive: ``catalog/desomdb.yaml``.

One entry per public view. Each entry is a ``DuckSQL`` reader over a query that reads the
archive's Parquet files with local paths (no ``file://`` URL, which would make intake's
DuckDB reader try to download the httpfs extension). Parameters live on the catalog, not on
``read()`` (intake 2 ignores ``read(param=...)``):

>>> import desomdb.query.intake_catalog as ic
>>> cat = ic.open_catalog("desomdb-demo/archive", release="DR15")    # doctest: +SKIP
>>> cat["baxel_labels"].read().pl()                                   # doctest: +SKIP

Parameters: ``archive`` (folder), ``release`` (a SQL LIKE pattern that must match one of
the archive's releases, default ``%`` = all) and ``model`` (``current`` = the archive's
current DESOM-1, or a registered model id) for the convenience views. ``read()`` returns a
DuckDB relation: ``.pl()`` gives polars, ``.df()`` pandas (if installed), ``.arrow()`` Arrow.

The entries use desomdb's reader (:class:`ArchiveSQL`), not intake's ``DuckSQL``: it checks
the parameters, binds them as DuckDB variables (``getvariable('release')``) instead of
pasting them into the SQL, runs the entry's query through
:func:`desomdb.query.guard.check_read_only` and on a connection sandboxed to the archive folder.

Like :func:`desomdb.connect`, an entry reads exactly the committed files: ``read()`` binds
each table's file list from the archive's manifest as the variable ``files_<table>``, so
neither the files of a commit a killed writer left half done nor superseded files kept for
older readers are seen.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import duckdb
from intake.readers.datatypes import SQLQuery
from intake.readers.readers import BaseReader

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.errors import ConfigError, QueryError
from desomdb.query import views
from desomdb.query.guard import sandbox
from desomdb.som import registry

CATALOG_FILE = "desomdb.yaml"


def _base_query(table: str) -> str:
    src = (f"select * from read_parquet(getvariable('files_{table}'), "
           f"hive_partitioning = true, union_by_name = true)")
    if table in paths.RELEASE_TABLES:
        return f"select * from ({src}) where release like getvariable('release')"
    return src


def _body(text: str) -> str:
    return re.sub(r"--[^\n]*\n", "\n", text).replace("current_model()",
                                                   "getvariable('model')").strip()


def _derived_query(text: str, defs: dict[str, str]) -> str:
    """Inline every table and view a view reads as CTEs (dependencies first)."""
    derived = {k: v for k, v in defs.items() if k not in paths.TABLES}
    order: list[str] = []

    def visit(name: str) -> None:
        for dep in views.view_refs(derived[name], derived):
            if dep != name and dep not in order:
                visit(dep)
        if name not in order:
            order.append(name)

    for dep in views.view_refs(text, derived):
        visit(dep)
    texts = [text, *(derived[d] for d in order)]
    used = [t for t in paths.TABLES if any(views.view_refs(x, [t]) for x in texts)]
    ctes = [f"{t} as ({_base_query(t)})" for t in used]
    ctes += [f"{d} as ({_body(derived[d])})" for d in order]
    return "with " + ",\n".join(ctes) + f"\nselect * from ({_body(text)})"


def releases(archive: Archive) -> list[str]:
    """List the releases of the archive's cubes table (empty before any ingest)."""
    if not archive.has_table("cubes"):
        return []
    return sorted(set(archive.read("cubes", columns=["release"]).column("release").to_pylist()))


def check_parameters(archive: str | Path, release: str, model: str
                     ) -> tuple[Archive, str, str | None]:
    """Validate the catalog's parameters; return the archive, release pattern and model id.

    Parameters
    ----------
    archive : str or Path
        An archive folder.
    release : str
        A SQL LIKE pattern that matches at least one of the archive's releases
        (``%`` = all).
    model : str
        ``current`` (the archive's current DESOM-1, possibly none) or a registered model id.

    Raises
    ------
    ArchiveError
        If ``archive`` is not an archive.
    ConfigError
        If ``release`` matches none of the archive's releases (the message lists them).
    ModelError
        If ``model`` is not registered (the message lists the registered ones).
    """
    arch = Archive(archive)
    release, model = str(release), str(model)
    if release != "%":
        known = releases(arch)
        with duckdb.connect(":memory:") as con:
            n = con.execute("select count(*) from unnest(?) as t(r) where r like ?",
                            [known, release]).fetchall()[0][0]
        if not n:
            raise ConfigError(f"{arch.root}: release {release!r} matches none of the archive's "
                              f"releases ({', '.join(known) or 'none'}); give one of them, a "
                              "LIKE pattern such as 'DR1%', or '%' for all")
    model_id = (registry.current_model(arch) if model == "current"
                else registry.resolve_model(arch, model))
    return arch, release, model_id


class ArchiveSQL(BaseReader):
    """intake reader: an entry's query over the archive, parameters bound, guarded, sandboxed.

    ``read()`` validates ``archive``, ``release`` and ``model`` (:func:`check_parameters`),
    sets them as DuckDB variables, and runs the entry's SQL on a fresh in-memory connection
    confined to the archive folder, after :func:`desomdb.query.guard.check_read_only`.
    """

    imports: ClassVar[set[str]] = {"duckdb"}
    implements: ClassVar[set[Any]] = {SQLQuery}
    output_instance = "duckdb:DuckDBPyRelation"

    # The keyword names differ from the catalog's parameter names on purpose: intake treats
    # a reader keyword named like a parameter as that parameter's value and drops it.
    def _read(self, data: SQLQuery, archive_path: str = ".", release_pattern: str = "%",
              model_choice: str = "current", **kwargs: Any) -> duckdb.DuckDBPyRelation:
        arch, release, model_id = check_parameters(archive_path, release_pattern, model_choice)
        committed = arch.manifest()["tables"]  # one reading: a commit may land meanwhile
        absent = [t for t in paths.TABLES
                  if f"'files_{t}'" in data.query and not committed.get(t)]
        if absent:
            raise QueryError(f"{arch.root}: no {', '.join(absent)} table in this archive yet "
                             "(a later stage writes it: 'desomdb status' lists what has run)")
        con = duckdb.connect(":memory:")
        con.execute("set variable archive = ?", [str(arch.root)])
        con.execute("set variable release = ?", [release])
        con.execute("set variable model = ?", [model_id])
        for table in paths.TABLES:
            files = [str(arch.root / f) for f in committed.get(table, [])]
            if files:
                con.execute(f"set variable files_{table} = ?", [files])
        # One row per baxel even with several fitters' labels (preferred_labels ranks them).
        con.execute("set variable labels_one_fitter = false")
        sandbox(con, [arch.root])
        return views.ReadOnlyConnection(con).sql(data.query)


def build_catalog() -> Any:
    """Build the intake catalog object (entries for every view in ``sql/``)."""
    import intake
    from intake.readers.user_parameters import SimpleUserParameter

    cat = intake.Catalog(
        user_parameters={
            "archive": SimpleUserParameter(default=".", description="archive folder"),
            "release": SimpleUserParameter(default="%",
                                           description="release: one of the archive's, "
                                                       "or a SQL LIKE pattern (% = all)"),
            "model": SimpleUserParameter(default="current",
                                         description="DESOM-1 model id for the convenience "
                                                     "views (registered), or 'current'"),
        },
        metadata={"description": "desomdb archive: MaNGA baxels, pPXF labels, DESOM maps",
                  "columns": "sql/schema.yml"},
    )
    defs = views.view_sql()
    for name, text in sorted(defs.items()):
        query = _base_query(name) if name in paths.TABLES else _derived_query(text, defs)
        cat[name] = ArchiveSQL(SQLQuery(conn=":memory:", query=query),
                               archive_path="{archive}", release_pattern="{release}",
                               model_choice="{model}")
    return cat


def catalog_path() -> Path:
    """Return the path of the catalog YAML shipped in the package (catalog/desomdb.yaml)."""
    return Path(str(resources.files("desomdb.catalog").joinpath(CATALOG_FILE)))


def open_catalog(archive: str | Path, release: str = "%", model: str = "current") -> Any:
    """Open the shipped catalog with its parameters set for ``archive``.

    The parameters are checked here already (:func:`check_parameters`), and again by every
    ``read()``.
    """
    import intake

    arch, _, _ = check_parameters(archive, release, model)
    cat = intake.from_yaml_file(str(catalog_path()))
    return cat(archive=str(arch.root), release=release, model=model)


def main() -> None:
    """Regenerate ``catalog/desomdb.yaml`` from the ``sql/`` views."""
    # the importable module, so entries name desomdb.query.intake_catalog:ArchiveSQL, not __main__
    from desomdb.query import intake_catalog

    out = Path(__file__).parents[2] / "catalog" / CATALOG_FILE
    intake_catalog.build_catalog().to_yaml_file(str(out))
    print(out)


if __name__ == "__main__":
    main()
