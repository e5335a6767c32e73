"""Nearest neighbours among vectors: an HNSW index (usearch) and the exact search it is tested by.

The similarity search (:mod:`desomdb.products.similar`) keeps one index per DESOM-1 model over the
latents of its baxels and one over its galaxies' fingerprints. Why usearch rather than
faiss-cpu (``benchmarks/bench_similar.py`` times both against exact search, faiss when
installed):

- HNSW needs no training. A faiss IVF index is built around k-means centroids fitted to the
  data it first saw; ``desomdb refresh`` adds releases whose spectra may have moved (that is
  what the ``drift`` view watches), so the centroids would need refitting. faiss's own HNSW
  cannot remove vectors, which a refresh needs (a cube carried into a newer release leaves
  the search under its older name).
- Vectors are added and removed by a 64-bit key, so a refresh updates the index in time
  proportional to the cubes it touched, not to the archive.
- One file per index, memory-mapped on load (``view=True``): a query opens a 1.2 M-baxel
  index without reading it into memory.
- Small, typed Python API on NumPy arrays, Apache-2.0, wheels for every platform we run on.

Vectors are stored as float32. float16 would halve memory and disk, but DESOM latents share
a large common offset (per-component means ~9 against a spread of ~0.5 in the test
archive), so float16 rounding of ~0.004 per component moves neighbour distances by
several per cent and reorders near neighbours (``benchmarks/bench_similar.py`` measures
both). Distances are Euclidean (not squared), as ``assignments.distance`` (DESIGN.md conventions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from usearch.index import Index


@dataclass(frozen=True)
class HnswParams:
    """HNSW settings of an index (stored beside it, so a reader uses the same).

    Attributes
    ----------
    connectivity : int
        Graph edges per node (usearch ``M``).
    expansion_add : int
        Candidate list while inserting (``efConstruction``): build time vs graph quality.
        32 builds 2.3x faster than 64 with the same recall@10 (1.000 at 120 k synthetic
        latents; ``benchmarks/bench_similar.py``).
    expansion_search : int
        Candidate list while searching (``ef``): query time vs recall; never below ``k``.
    dtype : str
        Stored scalar type (``f32``, or ``f16`` for vectors without a large common offset).
    """

    connectivity: int = 16
    expansion_add: int = 32
    expansion_search: int = 64
    dtype: str = "f32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HnswParams:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def new_index(ndim: int, params: HnswParams) -> Index:
    """Empty squared-Euclidean HNSW index of ``ndim``-dimensional vectors."""
    return Index(ndim=ndim, metric="l2sq", dtype=params.dtype,
                 connectivity=params.connectivity, expansion_add=params.expansion_add,
                 expansion_search=params.expansion_search)


def add(index: Index, keys: np.ndarray, vectors: np.ndarray, threads: int = 0) -> None:
    """Add ``vectors`` (n, ndim) under integer ``keys`` (n,); ``threads=0``: all cores."""
    if len(keys):
        index.add(np.ascontiguousarray(keys, dtype=np.uint64),
                  np.ascontiguousarray(vectors, dtype=np.float32), threads=threads)


def remove(index: Index, keys: np.ndarray) -> None:
    """Remove the vectors stored under ``keys`` (a search never returns them again)."""
    if len(keys):
        index.remove(np.ascontiguousarray(keys, dtype=np.uint64))


def save(index: Index, path: Path) -> None:
    """Write the index to ``path`` (the caller renames it into place)."""
    index.save(str(path))


def load(path: Path, params: HnswParams, view: bool = True) -> Index:
    """Open a saved index (memory-mapped with ``view``; load it to modify it).

    Raises
    ------
    OSError
        If the file is missing or not a usearch index.
    """
    index = Index.restore(str(path), view=view)
    if index is None:
        raise OSError(f"{path}: not a usearch index")
    index.expansion_search = params.expansion_search  # type: ignore[misc]  # not in the file
    return index


def search(index: Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Find the ``k`` approximate nearest stored vectors of one ``query`` (ndim,).

    Returns
    -------
    keys : ndarray of uint64, shape (m,)
        m = min(k, stored vectors), nearest first.
    distances : ndarray of float64, shape (m,)
        Euclidean.
    """
    if k > index.expansion_search:
        index.expansion_search = k  # type: ignore[misc]  # HNSW returns at most ef candidates
    found = index.search(np.ascontiguousarray(query, dtype=np.float32), k, threads=1)
    keys = np.asarray(found.keys, dtype=np.uint64)
    dist = np.sqrt(np.maximum(np.asarray(found.distances, dtype=np.float64), 0.0))
    return keys, dist


class ExactSearch:
    """Brute-force Euclidean nearest neighbours: the oracle the HNSW index is tested against.

    Parameters
    ----------
    vectors : ndarray, shape (n, ndim), float32
        Kept by reference (not copied).
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.sq_norms = np.einsum("ij,ij->i", self.vectors, self.vectors, dtype=np.float64)

    def search(self, query: np.ndarray, k: int, chunk: int = 262_144
               ) -> tuple[np.ndarray, np.ndarray]:
        """Find the ``k`` nearest rows of one ``query`` (ndim,).

        Candidates come from the squared-norm expansion (one matrix-vector product per
        chunk); the best ``k + 8`` are re-ranked with exact float64 differences, so rounding
        cannot reorder near-equal neighbours (a stored vector is its own first neighbour).

        Returns
        -------
        rows : ndarray of int64, shape (min(k, n),)
            Row numbers, nearest first (ties by row number).
        distances : ndarray of float64
            Euclidean.
        """
        q = np.asarray(query, dtype=np.float32).ravel()
        n = len(self.vectors)
        keep = min(k + 8, n)
        cand: list[np.ndarray] = []
        for s in range(0, n, chunk):
            x = self.vectors[s : s + chunk]
            d2 = self.sq_norms[s : s + chunk] - 2.0 * (x @ q)
            m = min(keep, len(x))
            part = np.argpartition(d2, m - 1)[:m] if m < len(x) else np.arange(len(x))
            cand.append(part + s)
        if not cand:
            return np.zeros(0, np.int64), np.zeros(0)
        rows = np.concatenate(cand)
        diff = self.vectors[rows].astype(np.float64) - q.astype(np.float64)
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = np.lexsort((rows, dist))[:k]
        return rows[order].astype(np.int64), dist[order]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (one query) that the approximate search found."""
    return len(set(approx.tolist()) & set(exact.tolist())) / max(len(exact), 1)
