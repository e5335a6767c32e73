"""Which version of a cube is current when an archive holds several releases.

A galaxy observed in DR15 and again in DR17 has one cube per release; both stay queryable
(releases are partitions, never overwritten). Model-wide products — node co-adds, node label
PDFs, fingerprints and training sets — use each plateifu once, from the newest release in
which it was ingested successfully, so a cube carried unchanged into a new release is not
counted twice. Releases are ordered as in :data:`desomdb.manga.RELEASES` (DR15 < DR17).
The SQL view ``latest_cubes`` applies the same rule.
"""

from __future__ import annotations

import polars as pl

from desomdb import manga
from desomdb.archive import Archive


def release_order(arch: Archive) -> list[str]:
    """Return the archive's releases, oldest first."""
    present = {f.split("/")[1].split("=", 1)[1]
               for f in arch.manifest()["tables"].get("cubes", [])}
    known = list(manga.RELEASES)
    return sorted(present, key=lambda r: (known.index(r) if r in known else len(known), r))


def latest_cubes(arch: Archive) -> pl.DataFrame:
    """One row per plateifu: the newest release holding it with status ``ok``.

    Returns
    -------
    polars.DataFrame
        Columns release, plateifu (empty when nothing is ingested).
    """
    rank = {r: i for i, r in enumerate(release_order(arch))}
    if not rank:
        return pl.DataFrame(schema={"release": pl.Utf8, "plateifu": pl.Utf8})
    cubes = pl.from_arrow(arch.read("cubes", columns=["release", "plateifu", "status"]))
    assert isinstance(cubes, pl.DataFrame)
    return (cubes.filter(pl.col("status") == "ok")
            .with_columns(pl.col("release").replace_strict(rank, return_dtype=pl.Int32)
                          .alias("_rank"))
            .sort("_rank").group_by("plateifu").last()
            .select("release", "plateifu").sort("plateifu"))


def keep_latest(arch: Archive, rows: pl.DataFrame) -> pl.DataFrame:
    """Rows (with release and plateifu columns) of the current version of each cube only."""
    return rows.join(latest_cubes(arch), on=["release", "plateifu"], how="semi")
