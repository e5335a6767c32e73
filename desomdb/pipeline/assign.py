"""Assign every baxel to its DESOM-1 node; build ``nodes``, ``node_partials`` and ``node_labels``.

Only the encoder runs per spectrum (the authors' code also ran the decoder, ~3× slower).
``distance`` is the Euclidean latent distance to the best-matching prototype;
``is_adjacent`` says whether the runner-up node is a 4-neighbour (Manhattan distance 1).
``latent`` (float32[latent]) is the encoder's output, kept so that similarity search
(:mod:`desomdb.products.similar`) never re-encodes;
after assigning, the model's baxel index is brought up to date
(:func:`desomdb.pipeline.similar_index.update_baxel_index`).

Cubes are independent tasks (:func:`assign_cube`), run in this process, on a local process
pool (``workers``) or on a Dask cluster (``scheduler``) through :mod:`desomdb.runtime.runner`; each
writes its cube's assignments and node co-add partial sums (:mod:`desomdb.science.coadd`) into the
writer's staging area and the parent commits them in batches. Node co-adds are built from
the stored partial sums only: a cube assigned before, or carried unchanged from another
release (same spectra file), is never read again. Node co-adds, ``n_members`` and
``node_labels`` count each cube once, in its newest release (:mod:`desomdb.query.versions`).
``node_labels`` use all assigned baxels (train and test) passing the paper's label cuts —
chi2_red < 2; sSFR also Hα S/N > 2; d_BPT also all four lines at S/N > 2 — with histogram
edges fixed per label so node PDFs are comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.atomic import atomic_write, read_parquet
from desomdb.errors import ArchiveError, JobInterruptedError
from desomdb.pipeline import node_labels, similar_index
from desomdb.pipeline.node_table import beyond_p99_counts, write_nodes
from desomdb.query import versions
from desomdb.runtime import runner
from desomdb.science import coadd, spectra
from desomdb.som import registry
from desomdb.som.inference import encode_all, nearest_nodes
from desomdb.som.model import Desom
from desomdb.som.registry import load_model

#: Commit staged cubes when this many files wait, or after this many seconds.
COMMIT_FILES = 128
COMMIT_SECONDS = 10.0
#: Spectra columns assignment reads (float32 flux/ivar, uint8 mask; nothing else).
SPECTRA_COLUMNS = ("bin_id", "flux", "ivar", "mask")
#: Nodes per row group of a cube's ``node_partials`` file (rows are sorted by node). Each row
#: holds two 4544-bin float32 sums (36 kB); a reader of one node decodes one group.
PARTIALS_ROW_GROUP = 4


@dataclass(frozen=True)
class CubeTask:
    """One cube to assign (or, with ``encode=False``, only to sum into node partials).

    Attributes
    ----------
    archive, model_id : str
    release, plateifu : str
    spectra_file : str
        The cube's committed ``spectra`` part file.
    bin_id : ndarray of int, shape (n,)
        The cube's baxels, increasing.
    norm_flux : ndarray of float32, shape (n,)
        ``baxels.norm_flux`` of those baxels, flux units.
    staging : str
        Folder in which the task writes its files (``<staging>/<committed path>``).
    encode : bool
        Encode and write assignments; otherwise take each baxel's node from ``nodes_file``.
    nodes_file : str, optional
        An assignments file of the same spectra (when ``encode`` is False).
    device, precision : str
        As :func:`desomdb.som.inference.encode_all`.
    """

    archive: str
    model_id: str
    release: str
    plateifu: str
    spectra_file: str
    bin_id: np.ndarray
    norm_flux: np.ndarray
    staging: str
    encode: bool = True
    nodes_file: str | None = None
    device: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class CubeResult:
    """What :func:`assign_cube` wrote (staged paths) and the cube's partial sums."""

    release: str
    plateifu: str
    assignments: str | None
    partials_file: str
    n_encoded: int
    partials: coadd.Partials


_MODELS: dict[tuple[str, str, str], Desom] = {}


def _model(archive: str, model_id: str, device: str) -> Desom:
    """Load a model once per process (pool and Dask workers run many cubes each)."""
    key = (archive, model_id, device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(Archive(archive), model_id, device)[0]
    return _MODELS[key]


def _norms_of(task: CubeTask, bin_id: np.ndarray) -> np.ndarray:
    """``norm_flux`` of each spectra row (``task.bin_id`` is increasing)."""
    pos = np.searchsorted(task.bin_id, bin_id)
    found = pos < len(task.bin_id)
    found[found] = task.bin_id[pos[found]] == bin_id[found]
    if not found.all():
        raise ArchiveError(f"{task.spectra_file}: spectra of {task.release} {task.plateifu} "
                           "have bins without a baxels row; re-ingest the cube "
                           "('desomdb ingest' replaces it) or run 'desomdb check'")
    return np.asarray(task.norm_flux[pos], dtype=np.float32)


def assign_rows(model: Desom, x: np.ndarray, bin_id: pa.Array | pa.ChunkedArray,
                device: str = "cpu", precision: str = "fp32") -> tuple[pa.Table, np.ndarray]:
    """Assign normalised spectra of one cube.

    Parameters
    ----------
    model : Desom
    x : ndarray, shape (n, 4544), float32
        Normalised flux, masked bins 0 (:func:`desomdb.science.coadd.weighted`).
    bin_id : pyarrow array, length n
    device, precision : str

    Returns
    -------
    rows : pyarrow.Table
        bin_id, node, row, col, second_node, distance, is_adjacent, latent.
    best : ndarray of int, shape (n,)
    """
    z = encode_all(model, x, device, precision=precision)
    found = nearest_nodes(model, z, device)
    rows = pa.table({
        "bin_id": bin_id,
        "node": pa.array(found.best.astype(np.int16)),
        "row": pa.array(found.row.astype(np.int16)),
        "col": pa.array(found.col.astype(np.int16)),
        "second_node": pa.array(found.second.astype(np.int16)),
        "distance": pa.array(found.distance),
        "is_adjacent": pa.array(found.adjacent),
        similar_index.LATENT: spectra.to_list_column(z),
    })
    return rows, found.best


def assign_cube(task: CubeTask) -> CubeResult:
    """Assign one cube and sum its node partials; write both into the staging folder.

    Reads only the ``bin_id``, ``flux``, ``ivar`` and ``mask`` columns of the cube's spectra
    once. Runs in a worker (picklable task in, picklable result out).
    """
    table = read_parquet(task.spectra_file, columns=list(SPECTRA_COLUMNS))
    bin_id = table.column("bin_id").to_numpy()
    x, w = coadd.weighted(spectra.from_list_column(table.column("flux")),
                          spectra.from_list_column(table.column("ivar")),
                          spectra.from_list_column(table.column("mask")),
                          _norms_of(task, bin_id))
    spectra_name = Path(task.spectra_file).name
    staging = Path(task.staging)
    written = None
    if task.encode:
        model = _model(task.archive, task.model_id, task.device)
        rows, best = assign_rows(model, x, table.column("bin_id"), task.device, task.precision)
        n = rows.num_rows
        rows = rows.append_column("plateifu", pa.array([task.plateifu] * n, pa.string()))
        rows = rows.append_column("release", pa.array([task.release] * n, pa.string()))
        target = paths.model_file("assignments", task.model_id,
                                  paths.assignment_part_name(task.release, spectra_name))
        _write(rows, staging / target, "zstd")
        written = str(staging / target)
    else:
        if task.nodes_file is None:
            raise ArchiveError(f"{task.spectra_file}: no assignments to sum (this is a bug)")
        best = _nodes_for(read_parquet(task.nodes_file, columns=["bin_id", "node"]), bin_id,
                          task.nodes_file)
    stored = coadd.to_table(coadd.partial_sums(x, w, best), task.release, task.plateifu)
    target = paths.node_partials_file(task.model_id, task.release, spectra_name)
    # float sums: zstd gains ~13 % at 2x the time; a few nodes per row group, so a reader
    # of some nodes (a node stack) decodes only their rows (row-group statistics on node)
    _write(stored, staging / target, "none", row_group_size=PARTIALS_ROW_GROUP)
    partials = coadd.from_table(stored)  # as stored (float32), so reruns add the same numbers
    return CubeResult(task.release, task.plateifu, written, str(staging / target),
                      len(bin_id) if task.encode else 0, partials)


def _write(table: pa.Table, path: Path, compression: str, row_group_size: int = 4096) -> None:
    """Write a cube's rows atomically; dictionary-encode only the key strings.

    Dictionary encoding of float columns (latents, partial sums) costs ~4x the write time of
    plain encoding and makes the file no smaller.
    """
    atomic_write(path, lambda tmp: pq.write_table(
        table, tmp, compression=compression, use_dictionary=["release", "plateifu"],
        row_group_size=row_group_size, write_page_checksum=True))


def _nodes_for(stored: pa.Table, bin_id: np.ndarray, source: str) -> np.ndarray:
    """Each baxel's node from stored assignments (any row order)."""
    ids = stored.column("bin_id").to_numpy()
    order = np.argsort(ids)
    pos = np.searchsorted(ids, bin_id, sorter=order)
    pos = np.minimum(pos, len(ids) - 1)
    if len(ids) != len(bin_id) or not (ids[order[pos]] == bin_id).all():
        raise ArchiveError(f"{source}: assignments do not match the cube's spectra; rerun "
                           "'desomdb assign' after 'desomdb check --repair'")
    return stored.column("node").to_numpy()[order[pos]].astype(np.int64)


@dataclass(frozen=True)
class AssignReport:
    """Outcome of :func:`assign`.

    Attributes
    ----------
    model_id : str
    n_assigned : int
        Baxels of the current version of each cube on the map (those in the node co-adds).
    n_encoded : int
        Spectra encoded by this run (0 on a rerun).
    n_cubes : int
    seconds : float
        Time of the assignment tasks and their commits (node and label tables excluded).
    spectra_per_s : float
        Encoding throughput of this run (NaN when nothing was encoded).
    n_carried : int
        Cubes whose assignments and partial sums were copied from the same spectra file in
        another release (not read, not encoded).
    n_summed : int
        Cubes whose stored assignments only needed node partial sums (archives assigned
        before partials were stored): spectra read once, not encoded.
    index : IndexReport, optional
        What the update of the model's baxel similarity index did.
    """

    model_id: str
    n_assigned: int
    n_encoded: int
    n_cubes: int
    seconds: float
    spectra_per_s: float
    index: similar_index.IndexReport | None = None
    n_carried: int = 0
    n_summed: int = 0


def assign(archive: str | Path, model_id: str | None = None, device: str = "cpu",
           progress: bool = True, precision: str = "fp32", workers: int = 1,
           scheduler: str | None = None) -> AssignReport:
    """Assign every baxel of every release with a DESOM-1 model; write its node tables.

    Resumable: cubes already assigned under this model are not re-encoded and their spectra
    are not read (their stored partial sums make the node co-adds), except the newest
    version of a cube assigned before latents were stored (encoded again, once). A cube
    whose spectra file was assigned in another release (carried over unchanged) has its
    assignments and partial sums copied without reading its spectra.

    Parameters
    ----------
    archive : str or Path
    model_id : str, optional
        Default: the archive's current model.
    device : {"cpu", "cuda"}
    progress : bool
    precision : {"fp32", "bf16"}
    workers : int
        Local worker processes (one thread each); 1 runs in this process on one thread.
    scheduler : str, optional
        Dask scheduler address ``tcp://HOST:PORT`` (workers must see the archive path).

    Returns
    -------
    AssignReport

    Raises
    ------
    DesomdbError
        If some cubes failed (the others are committed; rerun to retry the failed ones).
    """
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    model, _ = load_model(arch, model_id, device)
    files = arch.cube_files("spectra")
    current = set(versions.latest_cubes(arch).iter_rows())
    total = coadd.Accumulator(model.cfg.n_nodes)
    t0 = time.perf_counter()
    with arch.writer("desomdb assign") as writer:
        plan = _plan(arch, writer, model_id, files, current, device, precision)
        summing = _InOrder(plan.order, total)
        pending: list[StagedFile] = list(plan.staged)
        last = [time.monotonic()]
        n_encoded = [0]

        def on_result(i: int, res: CubeResult) -> None:
            if res.assignments is not None:
                pending.append(StagedFile("assignments", _committed(writer, res.assignments),
                                          Path(res.assignments)))
            pending.append(StagedFile("node_partials", _committed(writer, res.partials_file),
                                      Path(res.partials_file)))
            n_encoded[0] += res.n_encoded
            summing.done(i, res.partials)
            if len(pending) >= COMMIT_FILES or time.monotonic() - last[0] >= COMMIT_SECONDS:
                writer.commit(add=pending)
                pending.clear()
                last[0] = time.monotonic()

        try:
            run = runner.run_tasks(assign_cube, plan.tasks, workers=workers,
                                   scheduler=scheduler, desc=f"assign {model_id}",
                                   progress=progress,
                                   labels=[f"{t.release} {t.plateifu}" for t in plan.tasks],
                                   on_result=on_result, keep_results=False)
        except JobInterruptedError:
            if pending:  # the cubes assigned so far are kept; the node tables wait for a rerun
                writer.commit(add=pending)
            raise
        if pending:
            writer.commit(add=pending)
        seconds = time.perf_counter() - t0
        run.raise_if_failed(f"desomdb assign {arch.root}")
        summing.finish()
        write_nodes(writer, model, model_id, total.result(), device,
                     beyond_p99_counts(arch, model_id, model.cfg.n_nodes))
        node_labels.write_node_labels(writer, arch, model_id)
        index = similar_index.update_baxel_index(arch, model_id, model.cfg.latent)
    _MODELS.clear()
    result = total.result()
    return AssignReport(model_id, int(result.n_members.sum()), n_encoded[0], len(files),
                        seconds, n_encoded[0] / seconds if n_encoded[0] else float("nan"),
                        index, plan.n_carried, plan.n_summed)


def _committed(writer: Writer, staged: str) -> str:
    """Return the committed path of a file a task wrote as ``<staging>/<committed path>``."""
    return str(Path(staged).relative_to(writer.staging_dir("assign")))


@dataclass
class _Plan:
    """What :func:`assign` does per cube (see :func:`_plan`).

    ``order`` lists the newest version of every cube, sorted, with where its partial sums
    come from: a stored file, rows copied in memory, or the result of task number i. Adding
    them in this one order makes the co-adds the same numbers however the run was split.
    """

    tasks: list[CubeTask] = field(default_factory=list)
    order: list[Path | coadd.Partials | int] = field(default_factory=list)
    staged: list[StagedFile] = field(default_factory=list)
    n_carried: int = 0
    n_summed: int = 0


class _InOrder:
    """Add cubes' partial sums to the totals in the plan's order as task results arrive.

    Tasks finish out of order (by at most about the number of workers), so only a few
    results wait in memory.
    """

    def __init__(self, order: list[Path | coadd.Partials | int], total: coadd.Accumulator):
        self.order, self.total, self.next = order, total, 0
        self.wanted = {i for i in order if isinstance(i, int)}  # tasks of older versions: no
        self.waiting: dict[int, coadd.Partials] = {}

    def done(self, task: int, partials: coadd.Partials) -> None:
        """Take the partial sums of task number ``task``; add all that can be added."""
        if task in self.wanted:
            self.waiting[task] = partials
            self._drain()

    def finish(self) -> None:
        """Add the rest (every task has finished)."""
        self._drain()
        if self.next < len(self.order):
            raise ArchiveError("assign: a task result is missing (this is a bug)")

    def _drain(self) -> None:
        while self.next < len(self.order):
            item = self.order[self.next]
            if isinstance(item, int):
                if item not in self.waiting:
                    return
                item = self.waiting.pop(item)
            elif isinstance(item, Path):
                item = coadd.from_table(read_parquet(item))
            self.total.add(item)
            self.next += 1


def _plan(arch: Archive, writer: Writer, model_id: str, files: dict[tuple[str, str], Path],
          current: set[tuple[str, str]], device: str, precision: str) -> _Plan:
    """Decide per cube: reuse stored partials, copy a carried cube's, sum, or encode.

    Stored partial sums whose cube has no assignments any more (a re-ingested cube) are
    dropped; their old co-add contribution is gone with them.
    """
    done = {f.name: f for f in arch.files("assignments", model_id=model_id)}
    parts = {f.name: f for f in arch.files("node_partials", model_id=model_id)}
    by_content: dict[str, list[tuple[str, Path]]] = {}  # spectra name -> (release, file)
    for name, f in done.items():
        rel, spectra_name = paths.parse_assignment_part_name(name)
        by_content.setdefault(spectra_name, []).append((rel, f))
    staging = str(writer.staging_dir("assign"))
    norms = _norms_by_cube(arch)
    plan = _Plan()

    def add_task(release: str, plateifu: str, f: Path, encode: bool,
                 nodes: Path | None = None) -> None:
        ids, norm = norms.get((release, plateifu), (np.zeros(0, np.int64),
                                                    np.zeros(0, np.float32)))
        if (release, plateifu) in current:
            plan.order.append(len(plan.tasks))
        plan.tasks.append(CubeTask(str(arch.root), model_id, release, plateifu, str(f), ids,
                                   norm, staging, encode, str(nodes) if nodes else None,
                                   device, precision))
        plan.n_summed += not encode

    for (release, plateifu), f in sorted(files.items()):
        name = paths.assignment_part_name(release, f.name)
        latest = (release, plateifu) in current
        if name in done and (not latest or _has_latents(done[name])):
            if name not in parts:
                add_task(release, plateifu, f, False, done[name])
            elif latest:
                plan.order.append(parts[name])
            continue
        source = next((s for s in by_content.get(f.name, []) if s[0] != release
                       and _has_latents(s[1])), None)
        if source is None:
            add_task(release, plateifu, f, True)
            continue
        # the same spectra assigned in another release: copy, never read the spectra
        src_release, src = source
        rows = _as_release(read_parquet(src), release)
        plan.staged.append(writer.stage_table(
            "assignments", rows, paths.model_file("assignments", model_id, name)))
        src_parts = parts.get(paths.assignment_part_name(src_release, f.name))
        if src_parts is None:
            add_task(release, plateifu, f, False, src)
            continue
        copied = _as_release(read_parquet(src_parts), release)
        plan.staged.append(writer.stage_table(
            "node_partials", copied, paths.node_partials_file(model_id, release, f.name)))
        plan.n_carried += 1
        if latest:
            plan.order.append(coadd.from_table(copied))
    keep = set(done) | {paths.assignment_part_name(t.release, Path(t.spectra_file).name)
                        for t in plan.tasks}
    keep |= {Path(s.target).name for s in plan.staged}
    orphans = [("node_partials", str(f.relative_to(arch.root)))
               for name, f in parts.items() if name not in keep]
    if orphans:
        writer.commit(remove=orphans)
    return plan


def _as_release(rows: pa.Table, release: str) -> pa.Table:
    """Rows of one cube relabelled with ``release`` (hive column dropped if read with it)."""
    rows = rows.drop_columns([c for c in ("release", "model_id") if c in rows.column_names])
    return rows.append_column("release", pa.array([release] * rows.num_rows, pa.string()))


def _norms_by_cube(arch: Archive) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Per cube: its baxels' ``bin_id`` (increasing) and ``norm_flux``, from one read."""
    bax = pl.from_arrow(arch.read("baxels", columns=["release", "plateifu", "bin_id",
                                                     "norm_flux"]))
    assert isinstance(bax, pl.DataFrame)
    out = {}
    for (release, plateifu), g in bax.sort("release", "plateifu", "bin_id").group_by(
            "release", "plateifu", maintain_order=True):
        out[(str(release), str(plateifu))] = (g["bin_id"].to_numpy(),
                                              g["norm_flux"].to_numpy().astype(np.float32))
    return out


def _has_latents(part: Path) -> bool:
    """Whether an assignment part file stores latents (files from before they were don't)."""
    return similar_index.LATENT in pq.read_schema(part).names
