"""The intake (2.x) catalog of an archive: ``catalog/desomdb.yaml``.

One entry per public view. Each entry is a ``DuckSQL`` reader over a query that reads the
archive's Parquet files with local paths (no ``file://`` URL, which would make intake's
DuckDB reader try to download the httpfs extension). Parameters live on the catalog, not on
``read()`` (intake 2 ignores ``read(param=...)``):

>>> import desomdb.intake_catalog as ic
>>> cat = ic.open_catalog("desomdb-demo/archive", release="DR15")    # doctest: +SKIP
>>> cat["baxel_labels"].read().pl()                                   # doctest: +SKIP

Parameters: ``archive`` (folder), ``release`` (a SQL LIKE pattern, default ``%`` = all)
and ``model`` (``current`` = the archive's current DESOM-1, or a model id) for the
convenience views. ``read()`` returns a DuckDB relation: ``.pl()`` gives polars, ``.df()``
pandas (if installed), ``.arrow()`` Arrow.

The catalog reads by glob, so unlike :func:`desomdb.connect` (which reads exactly the
committed files) it can also see the files of a commit that a killed writer left half
done, until the next ``desomdb`` writer cleans them up.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from desomdb import paths, views

CATALOG_FILE = "desomdb.yaml"


def _base_query(table: str) -> str:
    src = (f"select * from read_parquet('{{archive}}/{table}/*/*.parquet', "
           f"hive_partitioning = true, union_by_name = true)")
    if table in paths.RELEASE_TABLES:
        return f"select * from ({src}) where release like '{{release}}'"
    return src


_CURRENT = ("coalesce(nullif('{model}', 'current'), (select desom1 from "
            "read_json_auto('{archive}/_current_model.json')))")


def _derived_query(text: str) -> str:
    used = [t for t in paths.TABLES if re.search(rf"\bfrom {t}\b|\bjoin {t}\b", text)]
    ctes = ",\n".join(f"{t} as ({_base_query(t)})" for t in used)
    body = re.sub(r"--[^\n]*\n", "\n", text).replace("current_model()", _CURRENT)
    return f"with {ctes}\nselect * from ({body.strip()})"


def build_catalog() -> Any:
    """Build the intake catalog object (entries for every view in ``sql/``)."""
    import intake
    from intake.readers.datatypes import SQLQuery
    from intake.readers.readers import DuckSQL
    from intake.readers.user_parameters import SimpleUserParameter

    cat = intake.Catalog(
        user_parameters={
            "archive": SimpleUserParameter(default=".", description="archive folder"),
            "release": SimpleUserParameter(default="%",
                                           description="release, SQL LIKE pattern (% = all)"),
            "model": SimpleUserParameter(default="current",
                                         description="DESOM-1 model id for the convenience "
                                                     "views, or 'current'"),
        },
        metadata={"description": "desomdb archive: MaNGA baxels, pPXF labels, DESOM maps",
                  "columns": "sql/schema.yml"},
    )
    for name, text in sorted(views.view_sql().items()):
        query = _base_query(name) if name in paths.TABLES else _derived_query(text)
        cat[name] = DuckSQL(SQLQuery(conn=":memory:", query=query))
    return cat


def catalog_path() -> Path:
    """Return the path of the catalog YAML shipped in the package (catalog/desomdb.yaml)."""
    return Path(str(resources.files("desomdb.catalog").joinpath(CATALOG_FILE)))


def open_catalog(archive: str | Path, release: str = "%", model: str = "current") -> Any:
    """Open the shipped catalog with its parameters set for ``archive``."""
    import intake

    cat = intake.from_yaml_file(str(catalog_path()))
    return cat(archive=str(Path(archive).resolve()), release=release, model=model)


def main() -> None:
    """Regenerate ``catalog/desomdb.yaml`` from the ``sql/`` views."""
    out = Path(__file__).parent.parent / "catalog" / CATALOG_FILE
    build_catalog().to_yaml_file(str(out))
    print(out)


if __name__ == "__main__":
    main()
