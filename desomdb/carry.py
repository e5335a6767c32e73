"""Carrying cubes unchanged since an earlier release into a new one.

A cube of the new release byte-identical to its newest earlier version (same checksum, same
drpall inputs to the ingest) is not processed again: its rows are copied under the new
release and its spectra and labels files hard-linked (immutable files, so a link is a copy).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from desomdb import paths, versions
from desomdb.archive import Archive, StagedFile, Writer

DRP_KEYS_USED = ("z", "nsa_elpetro_phi", "nsa_elpetro_ba", "nsa_elpetro_th50_r")


def same_drp(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two drpall rows agree on every column the ingest uses."""
    if a is None or b is None:
        return False
    return all(np.isclose(float(a[k]), float(b[k]), rtol=1e-9, atol=0) for k in DRP_KEYS_USED)


def carry_sources(arch: Archive, release: str) -> dict[str, dict[str, Any]]:
    """Per plateifu, its newest successfully ingested version in another release.

    A cube of the new release with the same checksum and the same drpall inputs is carried
    over from there (rows copied, files hard-linked) instead of being processed again.
    """
    out: dict[str, dict[str, Any]] = {}
    for rel in versions.release_order(arch):
        if rel == release or not arch.files("galaxies", release=rel):
            continue
        cubes = arch.read("cubes", columns=["plateifu", "checksum", "status"], release=rel)
        gal = {r["plateifu"]: r for r in arch.read(
            "galaxies", columns=["plateifu", *DRP_KEYS_USED], release=rel).to_pylist()}
        for row in cubes.to_pylist():
            if row["status"] == "ok" and row["plateifu"] in gal:
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


def carry_files(writer: Writer, release: str, o: dict[str, Any]) -> tuple[list[StagedFile],
                                                                            dict[str, Any]]:
    """Stage an unchanged cube's rows of its source release under ``release``.

    Returns the staged files and the source ``cubes`` row.
    """
    arch = writer.archive
    src, plateifu = o["from_release"], o["plateifu"]
    name = paths.cube_part_name(plateifu, o["checksum"])
    unit = writer.staging_dir(f"carry/{plateifu}")
    staged: list[StagedFile] = []
    only = pc.field("plateifu") == plateifu
    for table in ("spectra", "labels"):
        for f in arch.files(table, release=src):
            part = paths.parse_part_name(f.name)
            if part is not None and part[0] == plateifu:
                link_or_copy(f, unit / f"{table}-{f.name}")
                staged.append(StagedFile(table, paths.release_file(table, release, f.name),
                                         unit / f"{table}-{f.name}"))
    for table in ("baxels", "bin_map", "truth"):
        if arch.files(table, release=src):
            rows = arch.read(table, filter=only, release=src).drop_columns(["release"])
            if rows.num_rows:
                staged.append(writer.stage_table(
                    table, rows, paths.release_file(table, release, name)))
    source = arch.read("cubes", filter=only, release=src).drop_columns(["release"]).to_pylist()
    return staged, source[0]
