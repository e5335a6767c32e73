"""The similarity indexes of a DESOM-1 model: its baxels' latents and its galaxies' fingerprints.

Two HNSW indexes (:mod:`desomdb.som.ann`) per model, kept as model artefacts under
``artefacts/<model_id>/similar/`` (names in :mod:`desomdb.archive.paths`):

- ``baxels``: the latent vector (``assignments.latent``, written by ``desomdb assign``) of
  every baxel of the current version of each cube (``latest_cubes``), so a cube carried into
  a newer release is indexed once, under its newest release. ``assign`` builds it and
  updates it after every run (``desomdb refresh`` runs assign): vectors of cubes that left
  the newest versions are removed, those of new cubes added; it is rebuilt from scratch
  when removals would leave over a quarter of the graph deleted.
- ``galaxies``: each galaxy's fingerprint as ``sqrt(fraction)`` (fraction = counts /
  n_baxels), so that the Euclidean distance / sqrt(2) is the Hellinger distance between
  the two galaxies' distributions over DESOM-1 nodes. Rebuilt by ``desomdb fingerprints``
  and by the fingerprint update of a refresh (a survey has ~10^4 galaxies: seconds).

Each index has a JSON pointer (``<kind>.json``) naming its files and the digest of the
committed files it was built from (``source``); a reader compares that digest with the
archive's manifest, so an index that no longer matches the committed data is never used
silently (:mod:`desomdb.products.similar` then searches exactly and says why).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from usearch import __version__ as usearch_version

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import atomic_write, parquet_format, write_json_atomic, write_parquet
from desomdb.errors import ModelError
from desomdb.query import versions
from desomdb.som import ann

FORMAT_VERSION = 1
#: Column of ``assignments`` part files holding each baxel's latent vector.
LATENT = "latent"
BAXEL_PARAMS = ann.HnswParams()
GALAXY_PARAMS = ann.HnswParams()
#: Rebuild instead of updating when deleted vectors would exceed this fraction of the graph.
MAX_DELETED_FRACTION = 0.25
_BAXEL_COLUMNS = ["release", "plateifu", "bin_id", "node"]


@dataclass(frozen=True)
class IndexReport:
    """What an index update did.

    Attributes
    ----------
    kind : str
        ``baxels`` or ``galaxies``.
    n_vectors : int
        Vectors searchable now.
    n_added, n_removed : int
        Vectors added and removed by this update.
    rebuilt : bool
        Built from scratch (first build, or too many deletions).
    seconds : float
    """

    kind: str
    n_vectors: int
    n_added: int
    n_removed: int
    rebuilt: bool
    seconds: float


@dataclass(frozen=True)
class IndexMeta:
    """The pointer file of an index (``<kind>.json``)."""

    kind: str
    model_id: str
    source: str
    files: dict[str, str]
    ndim: int
    params: ann.HnswParams
    n_vectors: int
    n_deleted: int
    next_key: int
    index_file: str
    keys_file: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (with the format version and the library that wrote it)."""
        return {"format_version": FORMAT_VERSION, "library": f"usearch {usearch_version}",
                "kind": self.kind, "model_id": self.model_id, "source": self.source,
                "files": self.files, "ndim": self.ndim, "params": self.params.to_dict(),
                "n_vectors": self.n_vectors, "n_deleted": self.n_deleted,
                "next_key": self.next_key, "index_file": self.index_file,
                "keys_file": self.keys_file}


def read_meta(root: Path, model_id: str, kind: str) -> IndexMeta | None:
    """Read the pointer of the ``kind`` index (None: absent, unreadable, other format)."""
    path = paths.index_meta_path(root, model_id, kind)
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            return None
        return IndexMeta(data["kind"], data["model_id"], data["source"], dict(data["files"]),
                         int(data["ndim"]), ann.HnswParams.from_dict(data["params"]),
                         int(data["n_vectors"]), int(data["n_deleted"]),
                         int(data["next_key"]), data["index_file"], data["keys_file"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def latest_assignment_files(arch: Archive, model_id: str) -> dict[str, str]:
    """List the assignment files of ``model_id`` for the newest version of each cube.

    Returns
    -------
    dict
        Path relative to the archive -> sha256 recorded at commit ("" if none was).
    """
    manifest = arch.manifest()
    latest = set(versions.latest_cubes(arch).iter_rows())
    prefix = paths.model_dir("assignments", model_id) + "/"
    out = {}
    for rel in manifest["tables"].get("assignments", []):
        if paths.logical(rel).startswith(prefix) and cube_of(rel) in latest:
            out[rel] = manifest["records"][rel].sha256 or ""
    return out


def fingerprint_files(arch: Archive, model_id: str) -> dict[str, str]:
    """List the committed fingerprints file(s) of ``model_id`` -> sha256."""
    records = arch.manifest()["records"]
    return {str(f.relative_to(arch.root)): records[str(f.relative_to(arch.root))].sha256 or ""
            for f in arch.files("fingerprints", model_id=model_id)}


def source_digest(kind: str, files: dict[str, str]) -> str:
    """Digest of the committed files an index is built from (what makes it current)."""
    h = hashlib.sha256(kind.encode())
    for rel, sha in sorted(files.items()):
        h.update(f"\n{rel} {sha}".encode())
    return h.hexdigest()


def current_source(arch: Archive, model_id: str, kind: str) -> str:
    """Digest of the committed files the ``kind`` index of ``model_id`` must be built from."""
    files = (latest_assignment_files(arch, model_id) if kind == "baxels"
             else fingerprint_files(arch, model_id))
    return source_digest(kind, files)


def is_current(arch: Archive, model_id: str, kind: str) -> bool:
    """Whether the ``kind`` index of ``model_id`` exists and matches the committed files."""
    meta = read_meta(arch.root, model_id, kind)
    return (meta is not None and meta.source == current_source(arch, model_id, kind)
            and (paths.index_dir(arch.root, model_id) / meta.index_file).exists())


def cube_of(rel: str) -> tuple[str, str] | None:
    """``(release, plateifu)`` of an assignment part file (None for other files)."""
    return paths.model_part_cube(Path(rel).name)


def read_latents(arch: Archive, files: list[str]) -> tuple[pl.DataFrame, np.ndarray]:
    """Keys and latent vectors stored in assignment part files.

    Returns
    -------
    rows : polars.DataFrame
        release, plateifu, bin_id, node (file order, then row order).
    latents : ndarray, shape (n, latent), float32

    Raises
    ------
    ModelError
        If a file holds no latents (assigned before they were stored): run ``desomdb assign``.
    """
    if not files:
        return pl.DataFrame(schema={"release": pl.Utf8, "plateifu": pl.Utf8,
                                    "bin_id": pl.Int32, "node": pl.Int16}), np.zeros((0, 0),
                                                                                   np.float32)
    first = pq.read_schema(arch.root / files[0])
    if LATENT not in first.names:
        raise _no_latents(arch, files[0])
    schema = pa.schema([first.field(c) for c in [*_BAXEL_COLUMNS, LATENT]])
    table = ds.dataset([str(arch.root / f) for f in files], schema=schema,
                       format=parquet_format()).to_table()
    col = table.column(LATENT)
    if col.null_count:
        bad = table.filter(col.is_null()).slice(0, 1)
        raise _no_latents(arch, f"cube {bad['release'][0]} {bad['plateifu'][0]}")
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    latents = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1)
    rows = pl.from_arrow(table.drop_columns([LATENT]))
    assert isinstance(rows, pl.DataFrame)
    return rows, latents


def _no_latents(arch: Archive, what: str) -> ModelError:
    return ModelError(f"{arch.root}: {what}: assigned before latents were stored; run "
                      f"'desomdb assign {arch.root}' to store them and build the index")


def update_baxel_index(arch: Archive, model_id: str, ndim: int,
                       params: ann.HnswParams = BAXEL_PARAMS) -> IndexReport:
    """Bring the baxel index of ``model_id`` up to date with its committed assignments.

    Call with the archive's writer lock held (``assign`` does), so no commit runs meanwhile.
    """
    t0 = time.perf_counter()
    files = latest_assignment_files(arch, model_id)
    source = source_digest("baxels", files)
    meta = read_meta(arch.root, model_id, "baxels")
    folder = paths.index_dir(arch.root, model_id)
    if meta is not None and meta.source == source and (folder / meta.index_file).exists():
        return IndexReport("baxels", meta.n_vectors, 0, 0, False, time.perf_counter() - t0)
    old = _load_for_update(folder, meta, ndim, params)
    gone = [r for r, sha in meta.files.items() if files.get(r) != sha] if meta else []
    new = [r for r in files if meta is None or meta.files.get(r) != files[r]]
    if old is not None and meta is not None:
        index, keys = old
        gone_cubes = pl.DataFrame([c for r in gone if (c := cube_of(r))],
                                  schema={"release": pl.Utf8, "plateifu": pl.Utf8}, orient="row")
        drop = keys.join(gone_cubes, on=["release", "plateifu"], how="semi")
        rows, latents = read_latents(arch, new)
        n_deleted = meta.n_deleted + drop.height
        if n_deleted <= MAX_DELETED_FRACTION * max(keys.height - drop.height + len(rows), 1):
            ann.remove(index, drop["key"].to_numpy())
            added = _with_keys(rows, meta.next_key)
            ann.add(index, added["key"].to_numpy(), latents)
            keys = pl.concat([keys.join(drop, on="key", how="anti"), added]).sort("key")
            report = IndexReport("baxels", keys.height, len(rows), drop.height, False, 0.0)
            _write(arch.root, IndexMeta("baxels", model_id, source, files, ndim, params,
                                        keys.height, n_deleted, meta.next_key + len(rows),
                                        "", ""), index, keys)
            return _timed(report, t0)
    rows, latents = read_latents(arch, list(files))
    index = ann.new_index(ndim, params)
    keys = _with_keys(rows, 0)
    ann.add(index, keys["key"].to_numpy(), latents)
    _write(arch.root, IndexMeta("baxels", model_id, source, files, ndim, params, keys.height,
                                0, keys.height, "", ""), index, keys)
    removed = meta.n_vectors if meta else 0
    return _timed(IndexReport("baxels", keys.height, keys.height, removed, True, 0.0), t0)


def update_galaxy_index(arch: Archive, model_id: str,
                        params: ann.HnswParams = GALAXY_PARAMS) -> IndexReport | None:
    """Rebuild the galaxy index of ``model_id`` from its committed fingerprints (if changed).

    Returns None when the model has no fingerprints. Call with the writer lock held.
    """
    t0 = time.perf_counter()
    files = fingerprint_files(arch, model_id)
    if not files:
        return None
    source = source_digest("galaxies", files)
    meta = read_meta(arch.root, model_id, "galaxies")
    folder = paths.index_dir(arch.root, model_id)
    if meta is not None and meta.source == source and (folder / meta.index_file).exists():
        return IndexReport("galaxies", meta.n_vectors, 0, 0, False, time.perf_counter() - t0)
    rows, vectors = galaxy_vectors(arch, model_id)
    index = ann.new_index(vectors.shape[1], params)
    keys = _with_keys(rows, 0)
    ann.add(index, keys["key"].to_numpy(), vectors)
    _write(arch.root, IndexMeta("galaxies", model_id, source, files, vectors.shape[1], params,
                                keys.height, 0, keys.height, "", ""), index, keys)
    return _timed(IndexReport("galaxies", keys.height, keys.height,
                              meta.n_vectors if meta else 0, True, 0.0), t0)


def galaxy_vectors(arch: Archive, model_id: str) -> tuple[pl.DataFrame, np.ndarray]:
    """Each galaxy's sqrt(fraction) fingerprint (Euclidean / sqrt(2) = Hellinger distance).

    Returns
    -------
    rows : polars.DataFrame
        mangaid, desom2_node, n_baxels, n_cubes (sorted by mangaid).
    vectors : ndarray, shape (n_galaxies, n_nodes), float32
    """
    t = arch.read("fingerprints", columns=["mangaid", "counts", "desom2_node", "n_baxels",
                                           "n_cubes"], model_id=model_id)
    t = t.sort_by("mangaid")
    counts = np.asarray(t.column("counts").combine_chunks().flatten().to_numpy(
        zero_copy_only=False), dtype=np.float64).reshape(t.num_rows, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    rows = pl.from_arrow(t.drop_columns(["counts"]))
    assert isinstance(rows, pl.DataFrame)
    return rows, np.sqrt(frac).astype(np.float32)


def _with_keys(rows: pl.DataFrame, first: int) -> pl.DataFrame:
    return rows.with_columns(pl.Series("key", np.arange(first, first + rows.height,
                                                        dtype=np.uint64)))


def _timed(report: IndexReport, t0: float) -> IndexReport:
    return IndexReport(report.kind, report.n_vectors, report.n_added, report.n_removed,
                       report.rebuilt, time.perf_counter() - t0)


def _load_for_update(folder: Path, meta: IndexMeta | None, ndim: int, params: ann.HnswParams
                     ) -> tuple[Any, pl.DataFrame] | None:
    """Load the current index (modifiable) and its keys, if they can be updated in place."""
    if meta is None or meta.ndim != ndim or meta.params != params:
        return None
    try:
        index = ann.load(folder / meta.index_file, params, view=False)
        keys = pl.read_parquet(folder / meta.keys_file)
    except (OSError, RuntimeError, ValueError, pl.exceptions.PolarsError):
        return None
    return index, keys


def _write(root: Path, meta: IndexMeta, index: Any, keys: pl.DataFrame) -> None:
    """Write index and keys under names of their source, then the pointer, then drop others."""
    folder = paths.index_dir(root, meta.model_id)
    folder.mkdir(parents=True, exist_ok=True)
    index_name = paths.index_file_name(meta.kind, meta.source)
    keys_name = paths.index_keys_name(meta.kind, meta.source)
    atomic_write(folder / index_name, lambda tmp: ann.save(index, tmp))
    write_parquet(keys.to_arrow(), folder / keys_name)
    done = IndexMeta(meta.kind, meta.model_id, meta.source, meta.files, meta.ndim, meta.params,
                     meta.n_vectors, meta.n_deleted, meta.next_key, index_name, keys_name)
    write_json_atomic(paths.index_meta_path(root, meta.model_id, meta.kind), done.to_json())
    for f in folder.iterdir():
        parsed = paths.parse_index_file_name(f.name)
        if parsed and parsed[0] == meta.kind and f.name not in (index_name, keys_name):
            f.unlink(missing_ok=True)
