"""Ingest DRP LOGCUBEs into the archive: cubes -> Voronoi baxels -> rest-frame spectra.

The science of one cube is :func:`desomdb.pipeline.baxels.process_cube` (pure: arrays in, tables
out); carrying unchanged cubes into a new release is :mod:`desomdb.pipeline.carry`; replacing and
compacting rows are methods of the archive's writer. The job (:func:`ingest`) runs the
science over many cubes on a process pool or a Dask cluster, commits each cube's rows
atomically, skips cubes already ingested with the same checksum, records failed cubes with a
readable reason, and finally compacts the release's narrow tables and sets the paper's
release-wide quality flags.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

from desomdb._version import __version__
from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.atomic import PARQUET_OPTIONS
from desomdb.errors import InputDataError, JobInterruptedError
from desomdb.pipeline import baxels, carry
from desomdb.pipeline.jobs import IngestConfig, IngestJob
from desomdb.pipeline.jobs import load_job as load_job  # the job file's reader, re-exported
from desomdb.runtime import runner
from desomdb.science import binning, sidecar
from desomdb.survey import manga
from desomdb.survey.cube import read_cube

DRPALL_COLUMNS = ("plateifu", "mangaid", "objra", "objdec", "z", "nsa_z", "nsa_sersic_n",
                  "nsa_elpetro_ba", "nsa_elpetro_phi", "nsa_elpetro_th50_r",
                  "nsa_elpetro_mass", "drp3qual", "mngtarg1")
NARROW_TABLES = ("cubes", "baxels", "bin_map", "truth", "images")


def find_cubes(spec: str | Path) -> list[Path]:
    """LOGCUBE files under a folder (recursively) or matching a glob, sorted.

    Raises
    ------
    InputDataError
        If nothing matches.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        found = [f for f in p.rglob("manga-*-LOGCUBE.fits*") if not f.name.endswith(".tmp")]
    else:
        anchor = Path(p.anchor) if p.is_absolute() else Path()
        found = list(anchor.glob(str(p.relative_to(anchor)) if p.is_absolute() else str(p)))
    found = sorted(f for f in found if f.name.endswith((".fits", ".fits.gz")))
    if not found:
        raise InputDataError(f"no LOGCUBE files found at {spec}; pass a folder or a glob such as "
                             "'DR15/*/stack/manga-*-LOGCUBE.fits.gz'")
    return found


def read_drpall(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read the drpall rows keyed by plateifu, with the columns the archive keeps.

    Raises
    ------
    InputDataError
        If the file cannot be read or lacks a needed column.
    """
    try:
        t = Table.read(path, hdu=1)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: cannot read drpall table ({exc})") from exc
    names = {c.lower(): c for c in t.colnames}
    missing = [c for c in DRPALL_COLUMNS if c not in names]
    if missing:
        raise InputDataError(f"{path}: drpall lacks columns {missing}")
    rows = {}
    for r in t:
        row = {c: _plain(r[names[c]]) for c in DRPALL_COLUMNS}
        rows[str(row["plateifu"]).strip()] = row
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode().strip()
    if isinstance(value, np.generic):
        return value.item()
    return value.strip() if isinstance(value, str) else value


def file_checksum(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the job
@dataclass
class IngestReport:
    """Outcome of an ingest job."""

    release: str
    n_found: int
    n_ingested: int = 0
    n_skipped: int = 0
    n_carried: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: Identical copies of a cube found under other paths, ingested once.
    n_duplicates: int = 0
    n_baxels: int = 0

    @property
    def ok(self) -> bool:
        """True when no cube failed."""
        return not self.failed


@dataclass(frozen=True)
class CubeInput:
    """One cube file of an ingest task.

    Attributes
    ----------
    path : str
        The LOGCUBE file.
    plateifu : str
        From the file name.
    drp : dict or None
        Its drpall row (None: not in drpall, refused by :func:`baxels.check_identity`).
    existing_checksum : str or None
        sha256 of the release's committed version with the same binning settings: an equal
        file is skipped.
    carry : dict or None
        Its newest earlier version, which it is carried from if byte-identical
        (:func:`desomdb.pipeline.carry.carry_sources`).
    """

    path: str
    plateifu: str
    drp: dict[str, Any] | None
    existing_checksum: str | None
    carry: dict[str, Any] | None


@dataclass(frozen=True)
class IngestTask:
    """A batch of cubes sent to one worker.

    Attributes
    ----------
    cubes : list of CubeInput
    config : IngestConfig
        The job's binning and spectra settings.
    staging : str
        The writer's staging folder.
    truth : str or None
        A mock survey's per-spaxel truth sidecar.
    release : str
    """

    cubes: list[CubeInput]
    config: IngestConfig
    staging: str
    truth: str | None
    release: str


def _cube_task(task: IngestTask) -> list[dict[str, Any]]:
    """Worker: ingest a batch of cubes into staged Parquet files; one outcome per cube."""
    truth_all, truth_rules = sidecar.read(task.truth) if task.truth else (None, None)
    out = []
    for item in task.cubes:
        outcome: dict[str, Any] = {"path": item.path, "plateifu": item.plateifu}
        try:
            _one_cube(item, task, truth_all, truth_rules, outcome)
        except Exception as exc:  # one bad cube is recorded; the batch goes on
            outcome.update(status="failed", error=_readable(exc))
        out.append(outcome)
    return out


def _one_cube(item: CubeInput, task: IngestTask, truth_all: pl.DataFrame | None,
              truth_rules: Any, outcome: dict[str, Any]) -> None:
    """Skip, carry or process one cube; record what happened in ``outcome``."""
    cfg = task.config
    path = Path(item.path)
    checksum = file_checksum(path)
    outcome["checksum"] = checksum
    if item.existing_checksum == checksum:
        outcome["status"] = "skipped"
        return
    source = item.carry
    if source and source["checksum"] == checksum and carry.same_drp(source["drp"], item.drp):
        outcome.update(status="carried", from_release=source["release"],
                       binning_config=cfg.binning_key())
        return
    cube = read_cube(path)
    baxels.check_identity(cube, item.plateifu, item.drp, task.release)
    assert item.drp is not None  # check_identity refuses a cube drpall does not list
    sp_truth = None
    if truth_all is not None:
        sp_truth = truth_all.filter(pl.col("plateifu") == cube.plateifu)
    lsf = manga.lsf_at_knots(cube.wave, cube.lsf_sigma_aa)
    outcome.update(ra=cube.objra, dec=cube.objdec, z=float(item.drp["z"]),
                   n_x=cube.shape[1], n_y=cube.shape[0],
                   wcs_header=cube.wcs.to_header_string(),
                   lsf_sigma_aa=None if lsf is None else lsf.tolist())
    tables = baxels.process_cube(cube, item.drp, cfg, sp_truth, truth_rules)
    unit = paths.staged_cube_dir(Path(task.staging), cube.plateifu, checksum)
    unit.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("baxels", "spectra", "bin_map", "truth", "images"):
        table = getattr(tables, name)
        if table is None:
            continue
        target = paths.staged_table_file(unit, name)
        pq.write_table(table, target, **PARQUET_OPTIONS)
        files[name] = str(target)
    outcome.update(status="ok", files=files, n_spaxels=tables.n_spaxels,
                   n_baxels=tables.baxels.num_rows, mangaid=cube.mangaid,
                   binning=tables.binning_method, binning_config=cfg.binning_key())


def _readable(exc: Exception) -> str:
    msg = str(exc)
    return msg if msg else type(exc).__name__


def ingest(
    archive: str | Path,
    job: IngestJob,
    progress: bool = True,
    commit_every_s: float = 30.0,
) -> IngestReport:
    """Run an ingest job into ``archive`` (created if missing).

    Parameters
    ----------
    archive : str or Path
    job : IngestJob
    progress : bool
        Show a progress bar.
    commit_every_s : float
        Commit finished cubes at least this often (and at the end).

    Returns
    -------
    IngestReport
    """
    rel = manga.release(job.release).name
    drpall = read_drpall(job.drpall)
    cube_paths = find_cubes(job.cubes)
    arch = Archive(archive, create=True)
    report = IngestReport(rel, len(cube_paths))
    truth_path = job.truth
    if truth_path is None:
        guess = Path(job.drpall).parent / paths.truth_sidecar_name(rel)
        truth_path = str(guess) if guess.exists() else None

    with arch.writer("desomdb ingest") as writer:
        existing = _existing_cubes(arch, rel)
        key = job.config.binning_key()
        sources = carry.carry_sources(arch, rel, key) if job.reuse else {}
        pending_refusals: list[dict[str, Any]] = []
        staging = writer.staging_dir("ingest")
        items: list[CubeInput] = []
        unique, refused = _one_file_per_cube(cube_paths)
        report.n_duplicates = len(cube_paths) - len(unique) - sum(len(v) for v in refused.values())
        for plateifu, (error, files) in sorted(refused.items()):
            prev = existing.get(plateifu)
            report.failed.append((plateifu, error))
            if prev is None or prev["status"] != "ok":  # never replace good rows by a refusal
                pending_refusals.append({"path": str(files[0]), "plateifu": plateifu,
                                         "status": "failed", "error": error,
                                         "reported": True})
        for path in unique:
            plateifu = manga.plateifu_from_filename(path.name)
            prev = existing.get(plateifu)
            items.append(CubeInput(
                path=str(path), plateifu=plateifu, drp=drpall.get(plateifu),
                # Re-processed when its bins were made with other settings.
                existing_checksum=(prev["checksum"] if prev and prev["status"] == "ok"
                                   and carry.same_binning(prev["binning_config"], key)
                                   else None),
                carry=sources.get(plateifu)))
        size = max(1, job.cubes_per_task)
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        tasks = [IngestTask(cubes=batch, config=job.config, staging=str(staging),
                            truth=truth_path, release=rel) for batch in batches]
        pending: list[dict[str, Any]] = list(pending_refusals)
        last = [time.monotonic()]

        def on_result(_: int, outcomes: list[dict[str, Any]]) -> None:
            pending.extend(outcomes)
            if time.monotonic() - last[0] >= commit_every_s:
                _commit_outcomes(writer, rel, pending, report)
                pending.clear()
                last[0] = time.monotonic()

        try:
            run = runner.run_tasks(
                _cube_task, tasks, workers=job.workers, scheduler=job.scheduler,
                desc=f"ingest {rel}", progress=progress,
                labels=[",".join(c.plateifu for c in batch) for batch in batches],
                on_result=on_result, setup=binning.preload,
            )
        except JobInterruptedError:
            _commit_outcomes(writer, rel, pending, report)  # the cubes already done are kept
            raise
        _commit_outcomes(writer, rel, pending, report)
        for failure in run.failures:  # a whole task died (e.g. a worker killed)
            report.failed.extend((p, failure.error) for p in failure.label.split(","))
        finalize_release(writer, rel, drpall, job.config)
    report.n_baxels = int(arch.read("baxels", columns=["bin_id"], release=rel).num_rows) \
        if arch.files("baxels", release=rel) else 0
    return report


def _one_file_per_cube(
    cube_paths: list[Path],
) -> tuple[list[Path], dict[str, tuple[str, list[Path]]]]:
    """Pick one file per plateifu: identical copies are ingested once, differing ones refused.

    Returns
    -------
    unique : list of Path
        The files to ingest (the first of identical copies).
    refused : dict
        plateifu -> (readable reason, its files) for plateifus found in several files with
        different contents (the rest of the batch still lands).
    """
    by_name: dict[str, list[Path]] = {}
    for path in cube_paths:
        by_name.setdefault(manga.plateifu_from_filename(path.name), []).append(path)
    unique: list[Path] = []
    refused: dict[str, tuple[str, list[Path]]] = {}
    for plateifu, files in by_name.items():
        if len(files) == 1:
            unique.append(files[0])
            continue
        sums = {f: file_checksum(f) for f in files}
        if len(set(sums.values())) == 1:
            unique.append(files[0])
            continue
        listed = ", ".join(str(f) for f in files)
        refused[plateifu] = (f"{plateifu} is in {len(files)} files with different contents "
                             f"({listed}); keep one of them and rerun", files)
    return sorted(unique), refused


def _existing_cubes(arch: Archive, release: str) -> dict[str, dict[str, Any]]:
    rows = carry.cube_rows(arch, release, ["plateifu", "checksum", "status", "binning_config"])
    return {r["plateifu"]: r for r in rows}


def _cube_row(row: dict[str, Any]) -> pa.Table:
    """Return one ``cubes`` row as a table, its null columns typed.

    ``carried_from`` is a string, ``lsf_sigma_aa`` a list of float32.
    """
    t = pa.Table.from_pylist([row])
    for name, kind in (("carried_from", pa.string()), ("lsf_sigma_aa", pa.list_(pa.float32()))):
        i = t.schema.get_field_index(name)
        if i >= 0:
            t = t.set_column(i, name, t.column(i).cast(kind))
    return t


def _commit_outcomes(
    writer: Writer, release: str, outcomes: list[dict[str, Any]], report: IngestReport
) -> None:
    """Commit finished cubes: new rows in, the same cube's earlier rows out, in one commit."""
    adds: list[StagedFile] = []
    replaced: set[str] = set()
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    to_carry = [o for o in outcomes if o["status"] == "carried"]  # one read per table
    carried = iter(carry.carry_cubes(writer, release, to_carry))
    for o in outcomes:
        if o["status"] == "skipped":
            report.n_skipped += 1
            continue
        plateifu = o["plateifu"]
        checksum = o.get("checksum", "0" * 12)
        name = paths.cube_part_name(plateifu, checksum)
        replaced.add(plateifu)
        if o["status"] == "carried":
            files, row = next(carried)
            adds.extend(files)
            row.update(source_path=o["path"], ingested_at=now, carried_from=o["from_release"],
                       release_ordinal=manga.release(release).ordinal,
                       binning_config=o["binning_config"])
            adds.append(writer.stage_table("cubes", _cube_row(row),
                                           paths.release_file("cubes", release, name)))
            report.n_carried += 1
            continue
        for table, staged in o.get("files", {}).items():
            adds.append(StagedFile(table, paths.release_file(table, release, name),
                                   Path(staged)))
        row = {
            "plateifu": plateifu,
            "mangaid": o.get("mangaid", ""),
            "ra": o.get("ra", float("nan")),
            "dec": o.get("dec", float("nan")),
            "z": o.get("z", float("nan")),
            "n_x": o.get("n_x", 0),
            "n_y": o.get("n_y", 0),
            "wcs_header": o.get("wcs_header", ""),
            "source_path": o["path"],
            "checksum": o.get("checksum", ""),
            "n_spaxels": o.get("n_spaxels", 0),
            "n_baxels": o.get("n_baxels", 0),
            "binning": o.get("binning", ""),
            "binning_config": o.get("binning_config", ""),
            "status": o["status"],
            "error": o.get("error", ""),
            "ingested_at": now,
            "pipeline_version": __version__,
            "release_ordinal": manga.release(release).ordinal,
            "carried_from": None,
            "lsf_sigma_aa": o.get("lsf_sigma_aa"),
        }
        cube_row = writer.stage_table(
            "cubes", _cube_row(row),
            paths.release_file("cubes", release, name),
        )
        adds.append(cube_row)
        if o["status"] == "ok":
            report.n_ingested += 1
        elif not o.get("reported"):
            report.failed.append((plateifu, o.get("error", "")))
    if not adds:
        return
    rewrites, removes = writer.replace_cube_rows(release, replaced, {a.target for a in adds})
    writer.commit(add=adds + rewrites, remove=removes)
    shutil.rmtree(writer.root / paths.STAGING / "carry", ignore_errors=True)


def finalize_release(
    writer: Writer, release: str, drpall: dict[str, dict[str, Any]], cfg: IngestConfig
) -> None:
    """Compact the release's narrow tables and set the release-wide quality flags.

    The paper's tail cuts are percentiles over the whole release: the lowest
    ``tail_fraction`` of per-baxel minimum normalised flux, and the highest ``tail_fraction``
    of maximum normalised flux away from emission lines. ``trainable`` = no flag set.
    Idempotent: rerunning gives identical tables.
    """
    arch = writer.archive
    adds: list[StagedFile] = []
    removes: list[tuple[str, str]] = []
    for table in NARROW_TABLES:
        keys = ("plateifu", "y", "x") if table == "bin_map" else paths.TABLE_KEYS[table][1:]
        transform = (lambda t: _quality_flags(t, cfg)) if table == "baxels" else None
        staged, dropped = writer.compact(table, release, keys, transform)
        adds += staged
        removes += dropped
    cubes_files = arch.files("cubes", release=release)
    if cubes_files:
        ingested = set(pl.concat([pl.read_parquet(f, columns=["plateifu"])
                                  for f in cubes_files])["plateifu"])
        rows = [drpall[p] for p in sorted(ingested) if p in drpall]
        if rows:
            galaxies = pl.DataFrame(rows).rename({"objra": "ra", "objdec": "dec"})
            target = paths.release_file("galaxies", release,
                                        paths.compact_name(arch.generation() + 1))
            adds.append(writer.stage_table("galaxies", galaxies.to_arrow(), target))
            removes.extend(
                ("galaxies", str(f.relative_to(arch.root)))
                for f in arch.files("galaxies", release=release)
            )
    if adds:
        writer.commit(add=adds, remove=removes)


def _quality_flags(table: pa.Table, cfg: IngestConfig) -> pa.Table:
    """Set the paper's release-wide tail flags and ``trainable`` on a release's baxels."""
    baxels = pl.from_arrow(table)
    assert isinstance(baxels, pl.DataFrame)
    low = baxels["min_norm_flux"].drop_nans().quantile(cfg.tail_fraction)
    high = baxels["max_norm_flux_off_lines"].drop_nans().quantile(1 - cfg.tail_fraction)
    low = -np.inf if low is None else low
    high = np.inf if high is None else high
    return baxels.with_columns(
        (pl.col("min_norm_flux").fill_nan(None) <= low).fill_null(True).alias("flag_low_min_flux"),
        (pl.col("max_norm_flux_off_lines").fill_nan(None) >= high).fill_null(True)
        .alias("flag_high_flux"),
    ).with_columns(
        ~(pl.col("flag_few_good") | pl.col("flag_low_snr") | pl.col("flag_bad_norm")
          | pl.col("flag_low_min_flux") | pl.col("flag_high_flux")).alias("trainable")
    ).to_arrow()
