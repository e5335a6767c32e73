"""The training set of a DESOM-1: which baxels, the galaxy train/test split, batches.

The training set is a SQL filter over ``baxels`` (default: ``trainable``), each cube in its
newest release only. Galaxies (mangaid) are split train/test with a seeded hash, so no galaxy
is in both. :class:`BatchStream` streams shuffled batches from the per-cube Parquet files and
can be fast-forwarded without reading data, which is how a killed training resumes
(:mod:`desomdb.pipeline.train`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from desomdb.archive.store import Archive
from desomdb.atomic import read_parquet
from desomdb.errors import ArchiveError
from desomdb.query import views
from desomdb.som import inference

DEFAULT_WHERE = "trainable"


TEST_FRACTION = 0.2


@dataclass
class Selection:
    """The training data: which baxels, and how galaxies split."""

    rows: pl.DataFrame  # release, plateifu, bin_id, mangaid, norm_flux, split
    where: str
    seed: int

    def spec(self) -> dict[str, Any]:
        """JSON-ready description stored with the model."""
        counts = self.rows.group_by("split").len().to_dicts()
        return {"where": self.where, "seed": self.seed, "test_fraction": TEST_FRACTION,
                "split_by": "mangaid", "counts": {c["split"]: c["len"] for c in counts},
                "releases": sorted(self.rows["release"].unique().to_list())}


def galaxy_test_split(mangaids: list[str], salt: str, fraction: float) -> np.ndarray:
    """Seeded hash split by galaxy: True for test galaxies.

    A galaxy is in the test set when sha256(salt + mangaid) maps below ``fraction``; with
    more than one galaxy at least one is always held out.
    """
    u = np.array([int(hashlib.sha256(f"{salt}{m}".encode()).hexdigest()[:8], 16) / 2**32
                  for m in mangaids])
    test = u < fraction
    if len(u) > 1 and not test.any():
        test[np.argmin(u)] = True  # tiny archives: keep one galaxy out for evaluation
    return test


def select_training(arch: Archive, where: str = DEFAULT_WHERE, seed: int = 0) -> Selection:
    """Evaluate the training filter and split galaxies train/test by a seeded hash.

    Raises
    ------
    QueryError
        If ``where`` is not valid SQL over the ``baxels`` view (the message lists columns).
    ArchiveError
        If nothing is selected.
    """
    con = views.connect(arch.root)
    rel = views.query(
        con, "select release, plateifu, bin_id, mangaid, norm_flux from baxels "
        f"semi join latest_cubes using (release, plateifu) where {where}"
    )
    df = rel.pl()
    if df.height == 0:
        raise ArchiveError(f"{arch.root}: no baxel matches the training filter {where!r}")
    gal = df.select("mangaid").unique().sort("mangaid")
    test = galaxy_test_split(gal["mangaid"].to_list(), f"{seed}:", TEST_FRACTION)
    gal = gal.with_columns(pl.Series("split", np.where(test, "test", "train")))
    return Selection(df.join(gal, on="mangaid"), where, seed)


def _cube_rows(file: Path, group: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectra and weights of one cube's selected baxels, in ``group`` order."""
    t = read_parquet(file)
    pos = {int(b): i for i, b in enumerate(t.column("bin_id").to_numpy())}
    return inference.normalised(t.take([pos[int(b)] for b in group["bin_id"]]),
                      group["norm_flux"].to_numpy())


def load_rows(arch: Archive, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectra and weights of the given rows, in their order."""
    files = arch.cube_files("spectra")
    xs, ws, order = [], [], []
    for (release, plateifu), group in rows.with_row_index("_i").group_by(
        "release", "plateifu", maintain_order=True
    ):
        x, w = _cube_rows(files[(str(release), str(plateifu))], group)
        xs.append(x)
        ws.append(w)
        order.append(group["_i"].to_numpy())
    idx = np.argsort(np.concatenate(order))
    return np.concatenate(xs)[idx], np.concatenate(ws)[idx]


def _shuffle_plan(sizes: Sequence[int], batch_size: int, rng: np.random.Generator,
                  buffer_rows: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Draw the shuffle of an endless batch stream, without the data.

    Each epoch visits the groups in a random order, buffering groups until ``buffer_rows``
    rows, and cuts a random permutation of each buffer into batches.

    Yields
    ------
    groups : tuple of int
        Indices into ``sizes`` of the groups in the current buffer, in buffer order.
    rows : ndarray of int, shape (<= batch_size,)
        Row indices into that buffer forming one batch.
    """
    while True:
        order = rng.permutation(len(sizes))
        buf: list[int] = []
        n_buf = 0
        for j, k in enumerate(order):
            buf.append(int(k))
            n_buf += int(sizes[k])
            if n_buf >= buffer_rows or j == len(order) - 1:
                perm = rng.permutation(n_buf)
                for s in range(0, max(n_buf - batch_size, 0) + 1, batch_size):
                    yield tuple(buf), perm[s : s + batch_size]
                buf, n_buf = [], 0


class BatchStream:
    """Endless shuffled batches ``(x, w)`` that a resumed training can fast-forward.

    The shuffle depends only on ``rng`` and the group sizes, so :meth:`skip` replays the
    draws of ``n`` batches without reading any data, leaving the stream (and ``rng``) exactly
    where an uninterrupted run had them.

    Parameters
    ----------
    sizes : sequence of int
        Rows per group (e.g. per cube).
    load : callable
        ``load(groups)`` returns ``(x, w)`` of those groups' rows concatenated in that order,
        each shape (n_rows, ...), float32.
    batch_size : int
    rng : numpy.random.Generator
        Drawn from by this stream only.
    buffer_rows : int
        Rows shuffled together (bounds memory).
    """

    def __init__(self, sizes: Sequence[int],
                 load: Callable[[tuple[int, ...]], tuple[np.ndarray, np.ndarray]],
                 batch_size: int, rng: np.random.Generator, buffer_rows: int = 8192):
        self.rng = rng
        #: Number of batches drawn (or skipped) so far.
        self.position = 0
        self._plan = _shuffle_plan(sizes, batch_size, rng, buffer_rows)
        self._load = load
        self._groups: tuple[int, ...] | None = None
        self._x = self._w = np.zeros((0, 0), np.float32)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        groups, rows = next(self._plan)
        if groups != self._groups:
            self._x, self._w = self._load(groups)
            self._groups = groups
        self.position += 1
        return self._x[rows], self._w[rows]

    def skip(self, n: int) -> None:
        """Draw ``n`` batches' worth of shuffling without loading data."""
        for _ in range(n):
            next(self._plan)
        self.position += n
        self._groups = None


def stream_batches(arch: Archive, rows: pl.DataFrame, batch_size: int, rng: np.random.Generator,
                   buffer_rows: int = 8192) -> BatchStream:
    """Endless shuffled batches, reading a few cubes at a time (memory ~ buffer_rows)."""
    files = arch.cube_files("spectra")
    groups = dict(rows.group_by("release", "plateifu"))
    keys = list(groups)

    def load(which: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_cube_rows(files[(str(keys[k][0]), str(keys[k][1]))], groups[keys[k]])
                 for k in which]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return BatchStream([groups[k].height for k in keys], load, batch_size, rng, buffer_rows)
