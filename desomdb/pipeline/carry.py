"""Carrying cubes unchanged since an earlier release into a new one.

A cube of the new release byte-identical to its newest earlier version (same checksum, same
drpall inputs to the ingest) is not processed again: its rows are copied under the new
release and its spectra and labels files hard-linked (immutable files, so a link is a copy).
Each commit carries its cubes with one read per table of each source release
(:func:`carry_cubes`). Under every model, ``desomdb assign`` then copies the cube's
assignments and node co-add partial sums from the source release (same spectra file) without
reading its spectra.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.query import versions

DRP_KEYS_USED = ("z", "nsa_elpetro_phi", "nsa_elpetro_ba", "nsa_elpetro_th50_r")


def same_drp(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two drpall rows agree on every column the ingest uses."""
    if a is None or b is None:
        return False
    return all(np.isclose(float(a[k]), float(b[k]), rtol=1e-9, atol=0) for k in DRP_KEYS_USED)


def same_binning(recorded: str | None, binning_key: str) -> bool:
    """Whether a cube's recorded binning settings are the job's (unrecorded ones count as so)."""
    return recorded is None or recorded == binning_key


def cube_rows(arch: Archive, release: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Read the committed ``cubes`` rows of a release (string columns); a missing column is None.

    ``binning_config`` was added to ``cubes`` later: rows written before it read as None.
    """
    if not arch.files("cubes", release=release):
        return []
    schema = pa.schema([(c, pa.string()) for c in columns])
    return arch.read("cubes", schema=schema, release=release).to_pylist()


def carry_sources(arch: Archive, release: str, binning_key: str) -> dict[str, dict[str, Any]]:
    """Per plateifu, its newest successfully ingested version in another release.

    A cube of the new release with the same checksum, the same drpall inputs and the same
    binning settings (``binning_key``, :meth:`IngestConfig.binning_key`) is carried over from
    there (rows copied, files hard-linked) instead of being processed again. A row written
    before the settings were recorded is taken as made with the job's (as it was then):
    re-binning it would also drop its labels.
    """
    out: dict[str, dict[str, Any]] = {}
    for rel in versions.release_order(arch):
        if rel == release or not arch.files("galaxies", release=rel):
            continue
        cubes = cube_rows(arch, rel, ["plateifu", "checksum", "status", "binning_config"])
        gal = {r["plateifu"]: r for r in arch.read(
            "galaxies", columns=["plateifu", *DRP_KEYS_USED], release=rel).to_pylist()}
        for row in cubes:
            if (row["status"] == "ok" and row["plateifu"] in gal
                    and same_binning(row["binning_config"], binning_key)):
                out[row["plateifu"]] = {"release": rel, "checksum": row["checksum"],
                                        "drp": gal[row["plateifu"]]}
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an immutable committed file into staging (copy where links are refused)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def carry_cubes(writer: Writer, release: str, outcomes: Sequence[dict[str, Any]]
                ) -> list[tuple[list[StagedFile], dict[str, Any]]]:
    """Stage unchanged cubes' rows of their source releases under ``release``, in one pass.

    Per source release, each table is read once for all its carried cubes (the manifest
    listed once, one filtered read of each narrow table), then split per cube; spectra and
    labels part files are hard-linked.

    Parameters
    ----------
    writer : Writer
    release : str
        The release the cubes are carried into.
    outcomes : sequence of dict
        Ingest outcomes with ``plateifu``, ``checksum`` and ``from_release``.

    Returns
    -------
    list of (staged files, source ``cubes`` row)
        In the order of ``outcomes``.
    """
    arch = writer.archive
    out: dict[int, tuple[list[StagedFile], dict[str, Any]]] = {}
    by_source: dict[str, list[int]] = {}
    for i, o in enumerate(outcomes):
        by_source.setdefault(o["from_release"], []).append(i)
    for src, idx in by_source.items():
        wanted = sorted({outcomes[i]["plateifu"] for i in idx})
        only = pc.field("plateifu").isin(wanted)
        linked: dict[str, list[StagedFile]] = {p: [] for p in wanted}
        for table in ("spectra", "labels"):
            for f in arch.files(table, release=src):
                part = paths.parse_part_name(f.name)
                if part is None or part[0] not in linked:
                    continue
                unit = writer.staging_dir(f"carry/{part[0]}")
                link_or_copy(f, unit / f"{table}-{f.name}")
                linked[part[0]].append(StagedFile(
                    table, paths.release_file(table, release, f.name), unit / f"{table}-{f.name}"))
        narrow = {table: _split_by_cube(arch.read(table, filter=only, release=src))
                  for table in ("baxels", "bin_map", "truth", "images", "cubes")
                  if arch.files(table, release=src)}
        for i in idx:
            o = outcomes[i]
            plateifu = o["plateifu"]
            name = paths.cube_part_name(plateifu, o["checksum"])
            staged = list(linked[plateifu])
            for table in ("baxels", "bin_map", "truth", "images"):
                rows = narrow.get(table, {}).get(plateifu)
                if rows is not None and rows.num_rows:
                    staged.append(writer.stage_table(
                        table, rows, paths.release_file(table, release, name)))
            out[i] = (staged, narrow["cubes"][plateifu].to_pylist()[0])
    return [out[i] for i in range(len(outcomes))]


def _split_by_cube(rows: pa.Table) -> dict[str, pa.Table]:
    """Rows per plateifu (file order kept within a cube), without the ``release`` column."""
    rows = rows.drop_columns([c for c in ("release",) if c in rows.column_names])
    keys = np.asarray(rows.column("plateifu").to_numpy(zero_copy_only=False), dtype=object)
    order = np.argsort(keys, kind="stable")
    rows = rows.take(pa.array(order))
    values, first = np.unique(keys[order], return_index=True)
    ends = np.r_[first[1:], len(order)]
    return {str(v): rows.slice(int(a), int(b - a)) for v, a, b in zip(values, first, ends,
                                                                         strict=True)}
