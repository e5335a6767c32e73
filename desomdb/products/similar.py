"""Find spectra and galaxies like this one (``desomdb similar``).

- **Baxels**: nearest neighbours in a DESOM-1 model's latent space (Euclidean, the space its
  SOM and ``assignments.distance`` live in), among the baxels of the current version of each
  cube (``latest_cubes``), so a cube carried unchanged into a newer release is found once
  and never matches itself. The query is a baxel of the archive (``PLATEIFU:BIN``, in the
  cube's newest release; it comes back first, at distance 0) or a spectrum from a file that
  ``desomdb predict`` reads (encoded by the model first).
- **Galaxies**: nearest neighbours by fingerprint, with the Hellinger distance between the
  galaxies' distributions over DESOM-1 nodes (``fingerprints.fraction``):
  H(p, q) = sqrt(1 - sum_i sqrt(p_i q_i)), from 0 (same distribution) to 1 (no shared node).
  Why not DESOM-2's latent space: that network is small and trained on few galaxies, and its
  input is the paper's normalisation (per-node 99.9 % clip and 0-1 scaling over the
  galaxies it was trained on, then per-galaxy 0-1 scaling), which depends on the population
  and loses the fractions; its latent distances are not comparable across DESOM-2 models.
  Hellinger compares the measured distributions themselves: a metric on probability
  vectors, bounded, insensitive to how many baxels a galaxy has, with the square root
  keeping one dominant node from swamping the rest; and it needs no training, so it does
  not move when a refresh adds galaxies. It is Euclidean between sqrt(p) vectors (/ sqrt 2),
  so the same HNSW index serves it. It ignores the map's topology (two neighbouring nodes
  count as different as two distant ones).

Searches use the model's HNSW indexes (:mod:`desomdb.pipeline.similar_index`, built by
``assign`` and ``fingerprints``); when an index is missing or no longer matches the committed
data, the search is exact and :attr:`Neighbours.note` says why (``exact=True`` asks for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.errors import ConfigError, InputDataError, QueryError
from desomdb.pipeline import similar_index as sx
from desomdb.products import predict
from desomdb.query import versions
from desomdb.science import spectra
from desomdb.som import ann, registry
from desomdb.som.inference import encode_all
from desomdb.som.registry import load_model

BAXEL_METRIC = "Euclidean distance in the DESOM-1 latent space"
GALAXY_METRIC = "Hellinger distance between fingerprints: fractions over DESOM-1 nodes"


@dataclass(frozen=True)
class Neighbours:
    """The result of a similarity search.

    Attributes
    ----------
    query : str
        What was searched for.
    kind : str
        ``baxels`` or ``galaxies``.
    model_id : str
        The DESOM-1 model.
    metric : str
    method : str
        ``usearch HNSW`` or ``exact``.
    table : polars.DataFrame
        Nearest first. Baxels: ``rank, release, plateifu, bin_id, node, distance``.
        Galaxies: ``rank, mangaid, hellinger, desom2_node, n_baxels, n_cubes``.
    seconds : float
        Search time (excluding reading the query and opening the index).
    note : str or None
        Why the search was exact although no exact search was asked for.
    """

    query: str
    kind: str
    model_id: str
    metric: str
    method: str
    table: pl.DataFrame
    seconds: float
    note: str | None = None


def similar(archive: str | Path, *, baxel: str | None = None,
            spectra_file: str | Path | None = None, index: int = 0, galaxy: str | None = None,
            k: int = 10, model_id: str | None = None, exact: bool = False,
            device: str = "cpu") -> Neighbours:
    """Nearest baxels to a baxel or a spectrum, or nearest galaxies to a galaxy.

    Give exactly one of ``baxel`` (``"PLATEIFU:BIN"``), ``spectra_file`` (with ``index``,
    the spectrum's row in the file, 0-based) or ``galaxy`` (a mangaid).

    Raises
    ------
    ConfigError
        None or several queries, or ``k`` < 1.
    QueryError
        An unknown baxel or galaxy.
    InputDataError
        An unreadable spectra file, or a spectrum that cannot be judged (too few good bins).
    ModelError
        No such model, or baxels assigned before latents were stored (run ``desomdb assign``).
    """
    given = [q for q in (baxel, spectra_file, galaxy) if q is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --baxel PLATEIFU:BIN, --spectra FILE or "
                          f"--galaxy MANGAID (got {len(given)})")
    if galaxy is not None:
        return similar_galaxies(archive, galaxy, k=k, model_id=model_id, exact=exact)
    return similar_baxels(archive, baxel=baxel, spectra_file=spectra_file, index=index, k=k,
                          model_id=model_id, exact=exact, device=device)


def similar_baxels(archive: str | Path, *, baxel: str | None = None,
                   spectra_file: str | Path | None = None, index: int = 0, k: int = 10,
                   model_id: str | None = None, exact: bool = False, device: str = "cpu"
                   ) -> Neighbours:
    """Find the ``k`` baxels nearest a baxel of the archive or a spectrum from a file.

    See :func:`similar` for the parameters. A query baxel is taken from its cube's newest
    release and comes back first (distance 0).
    """
    _check_k(k)
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    files = sx.latest_assignment_files(arch, model_id)
    if baxel is not None:
        query, label = _baxel_latent(arch, files, baxel)
    elif spectra_file is not None:
        query, label = _spectrum_latent(arch, model_id, spectra_file, index, device)
    else:
        raise ConfigError("give a baxel (PLATEIFU:BIN) or a spectra file")
    rows, dist, seconds, method, note = nearest(
        arch, model_id, "baxels", files, query, k, exact,
        lambda: sx.read_latents(arch, sorted(files)))
    return Neighbours(label, "baxels", model_id, BAXEL_METRIC, method,
                      baxel_table(rows, dist), seconds, note)


def baxel_table(rows: pl.DataFrame, dist: np.ndarray) -> pl.DataFrame:
    """Rank, key, node and latent distance of neighbour baxels (nearest first)."""
    return rows.select("release", "plateifu", "bin_id", "node").with_columns(
        pl.Series("distance", dist)).with_row_index("rank", offset=1)


def galaxy_table(rows: pl.DataFrame, dist: np.ndarray) -> pl.DataFrame:
    """Rank, mangaid, Hellinger distance and fingerprint facts of neighbour galaxies.

    ``dist`` is the Euclidean distance between square-root fingerprints; Hellinger is that
    over √2, clipped to 1.
    """
    return rows.select("mangaid").with_columns(
        pl.Series("hellinger", np.minimum(dist / np.sqrt(2.0), 1.0)),
        *(rows[c] for c in ("desom2_node", "n_baxels", "n_cubes"))
    ).with_row_index("rank", offset=1)


def index_rows(keys: pl.DataFrame, found: np.ndarray) -> pl.DataFrame:
    """Rows of ``keys`` (sorted by ``key``) for the keys an index search returned."""
    return keys[np.searchsorted(keys["key"].to_numpy(), found)]


def nearest(
    arch: Archive, model_id: str, kind: str, files: Any, query: np.ndarray, k: int,
    exact: bool, load_exact: Callable[[], tuple[pl.DataFrame, np.ndarray]],
) -> tuple[pl.DataFrame, np.ndarray, float, str, str | None]:
    """Search the model's index of ``kind`` if it is current, else exactly.

    Returns
    -------
    rows, distances, seconds, method, note
        The neighbours' rows (nearest first), their distances, the search time (s), which
        search ran, and why the index was not used (None if it was or ``exact`` was asked).
    """
    opened, note = (None, None) if exact else open_index(arch, model_id, kind,
                                                    sx.source_digest(kind, files))
    if opened is not None:
        idx, keys = opened
        t0 = time.perf_counter()
        found, dist = ann.search(idx, query, k)
        seconds = time.perf_counter() - t0
        return index_rows(keys, found), dist, seconds, "usearch HNSW", note
    rows_all, vectors = load_exact()
    t0 = time.perf_counter()
    pos, dist = ann.ExactSearch(vectors).search(query, k)
    return rows_all[pos], dist, time.perf_counter() - t0, "exact", note


def similar_galaxies(archive: str | Path, mangaid: str, k: int = 10,
                     model_id: str | None = None, exact: bool = False) -> Neighbours:
    """Find the ``k`` galaxies whose fingerprints are nearest (Hellinger) to ``mangaid``'s.

    The galaxy itself comes back first (distance 0).

    Raises
    ------
    QueryError
        If the model has no fingerprints or none for ``mangaid``.
    """
    _check_k(k)
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    files = sx.fingerprint_files(arch, model_id)
    if not files:
        raise QueryError(f"{arch.root}: model {model_id} has no fingerprints; build them with "
                         f"'desomdb fingerprints {arch.root}'")
    rows_all, vectors = sx.galaxy_vectors(arch, model_id)
    hit = np.flatnonzero(rows_all["mangaid"].to_numpy() == mangaid)
    if hit.size == 0:
        sample = ", ".join(rows_all["mangaid"].head(3).to_list())
        raise QueryError(f"{arch.root}: no fingerprint of galaxy {mangaid!r} under model "
                         f"{model_id} ({rows_all.height} galaxies, e.g. {sample})")
    query = vectors[hit[0]]
    rows, dist, seconds, method, note = nearest(
        arch, model_id, "galaxies", files, query, k, exact, lambda: (rows_all, vectors))
    return Neighbours(f"galaxy {mangaid}", "galaxies", model_id, GALAXY_METRIC, method,
                      galaxy_table(rows, dist), seconds, note)


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")


def open_index(arch: Archive, model_id: str, kind: str, source: str
          ) -> tuple[tuple[Any, pl.DataFrame] | None, str | None]:
    """Open the index of ``kind`` and its keys if current; else None and why not."""
    fix = ("'desomdb assign ARCHIVE' rebuilds it" if kind == "baxels"
           else "'desomdb fingerprints ARCHIVE' rebuilds it")
    for _ in range(2):  # a writer may replace the files between reading the pointer and them
        meta = sx.read_meta(arch.root, model_id, kind)
        if meta is None:
            return None, f"no {kind} index for model {model_id} ({fix}); searched exactly"
        if meta.source != source:
            return None, (f"the {kind} index of model {model_id} predates the committed data "
                          f"({fix}); searched exactly")
        folder = paths.index_dir(arch.root, model_id)
        try:
            index = ann.load(folder / meta.index_file, meta.params, view=True)
            keys = pl.read_parquet(folder / meta.keys_file)
        except (OSError, RuntimeError, ValueError, pl.exceptions.PolarsError):
            continue
        return (index, keys), None
    return None, f"the {kind} index of model {model_id} cannot be read ({fix}); searched exactly"


def parse_baxel(text: str) -> tuple[str, int]:
    """``"8485-1901:12"`` -> ``("8485-1901", 12)``.

    Raises
    ------
    ConfigError
        If ``text`` is not PLATEIFU:BIN with an integer BIN.
    """
    plateifu, sep, bin_text = text.rpartition(":")
    try:
        bin_id = int(bin_text)
    except ValueError:
        bin_id = -1
    if not sep or not plateifu or bin_id < 0:
        raise ConfigError(f"--baxel {text!r}: expected PLATEIFU:BIN, e.g. 8485-1901:12")
    return plateifu, bin_id


def _baxel_latent(arch: Archive, files: dict[str, str], text: str) -> tuple[np.ndarray, str]:
    """Read the stored latent of a baxel in its cube's newest release."""
    plateifu, bin_id = parse_baxel(text)
    latest = versions.latest_cubes(arch).filter(pl.col("plateifu") == plateifu)
    if latest.height == 0:
        raise QueryError(f"{arch.root}: no cube {plateifu} (status ok) in any release")
    release = str(latest["release"][0])
    part = [rel for rel in files if sx.cube_of(rel) == (release, plateifu)]
    if not part:
        raise QueryError(f"{arch.root}: {release} {plateifu} is not assigned under this "
                         f"model; run 'desomdb assign {arch.root}'")
    rows, latents = sx.read_latents(arch, part)
    hit = np.flatnonzero(rows["bin_id"].to_numpy() == bin_id)
    if hit.size == 0:
        ids = rows["bin_id"].to_numpy()
        raise QueryError(f"{arch.root}: {release} {plateifu} has no bin {bin_id} (bins "
                         f"{int(ids.min())}-{int(ids.max())})")
    return latents[hit[0]], f"baxel {release} {plateifu}:{bin_id}"


def _spectrum_latent(arch: Archive, model_id: str, path: str | Path, index: int,
                     device: str) -> tuple[np.ndarray, str]:
    """Encode spectrum ``index`` of a spectra file (formats of :mod:`desomdb.products.predict`)."""
    spec = predict.read_spectra_file(path)
    n = len(spec.norm)
    if not 0 <= index < n:
        rows = f"spectra 0-{n - 1}" if n else "no spectra"
        raise ConfigError(f"--index {index}: {path} has {rows}")
    one = predict.RestSpectra(spec.flux[index : index + 1], spec.mask[index : index + 1],
                              spec.norm[index : index + 1])
    _, reasons = predict.screen(one)
    if reasons[0] is not None:
        raise InputDataError(f"{path}: spectrum {index} cannot be searched: {reasons[0]}")
    model, _ = load_model(arch, model_id, device)
    x, _ = spectra.normalise(one.flux, one.mask, one.norm)
    return encode_all(model, x, device)[0], f"spectrum {index} of {Path(path).name}"
