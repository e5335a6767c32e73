"""Which version of a cube is current when an archive holds several releases.

A galaxy observed in DR15 and again in DR17 has one cube per release; both stay queryable
(releases are partitions, never overwritten). Model-wide products — node co-adds, node label
PDFs, fingerprints and training sets — use each plateifu once, from the newest release in
which it was ingested successfully, so a cube carried unchanged into a new release is not
counted twice. Releases are ordered by ``cubes.release_ordinal``, recorded at ingest from
:data:`desomdb.survey.manga.RELEASES` (DR15 = 15 < DR17 = 17). The rule itself lives in one place,
the SQL view ``latest_cubes``; the functions here read that view.
"""

from __future__ import annotations

import polars as pl

from desomdb.archive.store import Archive


def release_order(arch: Archive) -> list[str]:
    """Return the archive's releases, oldest first (by their recorded ordinal).

    Releases without a recorded ordinal (rows from before it was recorded) come first,
    by name — the order the ``latest_cubes`` view uses.
    """
    if not arch.has_table("cubes"):
        return []
    from desomdb.query import views

    con = views.connect(arch.root, raw=True)
    try:
        rows = con.sql(
            "select release from cubes as c group by release order by "
            "max(cast(to_json(c) ->> 'release_ordinal' as integer)) nulls first, release"
        ).fetchall()
    finally:
        con.close()
    return [str(r[0]) for r in rows]


def latest_cubes(arch: Archive) -> pl.DataFrame:
    """One row per plateifu: the newest release holding it with status ``ok``.

    Returns
    -------
    polars.DataFrame
        Columns release, plateifu (empty when nothing is ingested), sorted by plateifu.
    """
    empty = pl.DataFrame(schema={"release": pl.Utf8, "plateifu": pl.Utf8})
    if not arch.has_table("cubes"):
        return empty
    from desomdb.query import views

    con = views.connect(arch.root, raw=True)
    try:
        out = con.sql("select release, plateifu from latest_cubes order by plateifu").pl()
    finally:
        con.close()
    return out if out.height else empty


def keep_latest(arch: Archive, rows: pl.DataFrame) -> pl.DataFrame:
    """Rows (with release and plateifu columns) of the current version of each cube only."""
    return rows.join(latest_cubes(arch), on=["release", "plateifu"], how="semi")
