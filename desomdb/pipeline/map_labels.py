"""Map labels: each baxel's labels from its nearest fitted neighbours in the map's latent space.

``map_labels`` (partition ``model_id``, one file per model) holds, for every baxel the model
assigned (newest release of each cube) and every node label ``X``
(:data:`~desomdb.science.label_catalogue.NODE_LABELS`):

- ``X``: the median of the fitted values of its :data:`K` nearest *fitted* baxels (fits that
  pass the label's cuts), by Euclidean distance between the encoder's latent vectors
  (``assignments.latent``); a fitted baxel's own fit is never among its neighbours;
- ``X_lo68``, ``X_hi68``: ``X`` ± the label's split-conformal half-width: the 68.27th
  percentile of ``|X - fit|`` over the fitted baxels, each predicted from the others
  (leave one out). The half-width is one per label (marginal coverage); it includes the
  neighbours' fit noise, so the interval covers the truth at least as often as the fits.

``baxel_estimates`` gives these as ``map`` values. Why neighbours and not the node (the
paper's way): on the 48-galaxy MIUSCAT mock with 10 % of the baxels fitted by a labelling
plan, the scatter of the unfitted baxels' labels against the truth is about half that of
their node medians (``benchmarks/bench_plan.py``, docs/measured.md, "The map carries the labels"):
an 8×8 map's node holds ~50 baxels from many galaxies, while the three nearest fitted
latents are usually the same kind of spectrum. K = 3 measured best of 1, 3, 5, 10, 20.

Search: exact (NumPy) up to :data:`EXACT_MAX` fitted baxels, the usearch HNSW index
(:mod:`desomdb.som.ann`) above, so a DR17-size plan (~280 k fits, ~2.8 M queries) stays
minutes, not days. Labels whose fitted baxels are the same share one search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from desomdb.archive.store import Archive
from desomdb.query import estimates, views
from desomdb.science import label_catalogue

#: Nearest fitted neighbours whose median is a baxel's map label.
K = 3
#: Above this many fitted baxels (per label) the search uses the HNSW index. Exact search
#: costs O(fitted × baxels): 23.7 CPU-s for 32,000 fully labelled baxels (256-dim latents)
#: against 3.1 CPU-s for the index, whose 4 nearest agree with the exact ones for 99.5 % of
#: the baxels (measured). The conformal half-width is computed from the same predictions,
#: so the intervals stay calibrated either way.
EXACT_MAX = 10_000
#: Central probability of the interval.
COVERAGE = 0.6827
#: Query rows per distance block: 256 keeps the block in cache (1.6x faster than 2,048 for
#: 8,000 fitted baxels, measured).
_QUERY_CHUNK = 256


def _exact_knn(base: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``base`` nearest each row of ``query`` (Euclidean), nearest first.

    Returns
    -------
    ndarray of int64, shape (len(query), min(k, len(base)))
    """
    k = min(k, len(base))
    b = base.astype(np.float64)
    bn = np.einsum("ij,ij->i", b, b)
    out = np.empty((len(query), k), dtype=np.int64)
    for s in range(0, len(query), _QUERY_CHUNK):
        q = query[s:s + _QUERY_CHUNK].astype(np.float64)
        d2 = bn[None, :] - 2.0 * q @ b.T
        part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < len(b) else np.tile(
            np.arange(len(b)), (len(q), 1))
        order = np.argsort(np.take_along_axis(d2, part, axis=1), axis=1, kind="stable")
        out[s:s + _QUERY_CHUNK] = np.take_along_axis(part, order, axis=1)
    return out


def _knn(base: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Exact search for small ``base``, the HNSW index for large (see the module notes)."""
    if len(base) <= EXACT_MAX:
        return _exact_knn(base, query, k)
    from desomdb.som import ann

    params = ann.HnswParams(expansion_search=max(64, 4 * k))
    index = ann.new_index(base.shape[1], params)
    ann.add(index, np.arange(len(base)), base)
    found = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
    return np.asarray(found.keys, dtype=np.int64).reshape(len(query), -1)[:, :k]


@dataclass(frozen=True)
class Neighbours:
    """Each baxel's :data:`K` nearest fitted baxels, other than itself.

    Attributes
    ----------
    rows : ndarray of int, shape (m,)
        The fitted baxels (indices into the query's rows).
    near : ndarray of int, shape (n, k + 1)
        Per baxel, positions in ``rows`` of its nearest fitted baxels, nearest first.
    keep : ndarray of bool, shape (n, k + 1)
        Which of them count: the baxel itself where found, else the farthest, is left out.
    """

    rows: np.ndarray
    near: np.ndarray
    keep: np.ndarray


def neighbours(latent: np.ndarray, fitted: np.ndarray, k: int = K) -> Neighbours | None:
    """Find every baxel's ``k`` nearest fitted baxels (None when ``k`` or fewer are fitted).

    Parameters
    ----------
    latent : ndarray, shape (n, d)
        Every baxel's latent vector.
    fitted : ndarray of bool, shape (n,)
        Baxels whose value may be a neighbour's.
    """
    rows = np.flatnonzero(fitted)
    if len(rows) <= k:
        return None
    near = _knn(latent[rows], latent, k + 1)  # one more: a fitted baxel finds itself
    own = rows[near] == np.arange(len(latent))[:, None]
    keep = np.where(own.any(axis=1, keepdims=True), ~own,
                    np.arange(near.shape[1])[None, :] < k)
    return Neighbours(rows, near, keep)


def predict(latent: np.ndarray, values: np.ndarray, fitted: np.ndarray, k: int = K,
            found: Neighbours | None = None) -> tuple[np.ndarray, float]:
    """Neighbour medians of one label for every baxel, and the conformal half-width.

    Parameters
    ----------
    latent : ndarray, shape (n, d)
        Every baxel's latent vector.
    values : ndarray, shape (n,)
        The label's fitted value (NaN where not fitted or failing the cuts).
    fitted : ndarray of bool, shape (n,)
        Baxels whose value may be a neighbour's.
    k : int
    found : Neighbours, optional
        :func:`neighbours` of the same ``latent``, ``fitted`` and ``k``, when known (labels
        with the same fitted baxels share one search).

    Returns
    -------
    pred : ndarray, shape (n,)
        NaN when fewer than ``k + 1`` baxels are fitted.
    half_width : float
        The 68.27th percentile of the leave-one-out ``|pred - value|`` over fitted baxels.
    """
    found = found if found is not None else neighbours(latent, fitted, k)
    if found is None:
        return np.full(len(latent), np.nan), float("nan")
    rows = found.rows
    chosen = np.where(found.keep, values[rows][found.near], np.nan)
    pred = np.nanmedian(chosen, axis=1)
    residual = np.abs(pred[rows] - values[rows])
    return pred, float(np.quantile(residual, COVERAGE))


def _search_key(fitted: np.ndarray) -> bytes:
    """Labels whose fitted baxels give the same key share one neighbour search."""
    return np.packbits(fitted).tobytes()


def map_label_table(arch: Archive, model_id: str) -> pa.Table:
    """Compute ``map_labels`` of ``model_id`` (see the module docstring)."""
    con = views.connect(arch.root, raw=True)
    quoted = "'" + model_id.replace("'", "''") + "'"
    cols = ", ".join(f"l.{x}" for x in label_catalogue.NODE_LABELS)
    try:
        df = con.sql(
            f"select a.release, a.plateifu, a.bin_id, a.latent, l.chi2_ok, l.ssfr_ok, "
            f"l.bpt_ok, {cols} from assignments a "
            "semi join latest_cubes c on a.release = c.release and a.plateifu = c.plateifu "
            f"left join ({estimates.FITS_SQL}) l using (release, plateifu, bin_id) "
            f"where a.model_id = {quoted} order by a.release, a.plateifu, a.bin_id").pl()
    finally:
        con.close()
    out = df.select("release", "plateifu", "bin_id")
    columns = []
    usable = df.height > 0 and not df["latent"].null_count()  # else assigned before latents
    latent = np.asarray(df["latent"].to_list(), dtype=np.float32) if usable else None
    # Labels with the same fitted baxels (most pass the same χ² cut) share one search: on
    # 8,000 fitted baxels the searches were 2/3 of an assign call, one per label.
    searched: dict[bytes, Neighbours | None] = {}
    for x in label_catalogue.NODE_LABELS:
        if latent is None:
            columns += [pl.Series(c, [None] * df.height, dtype=pl.Float64)
                        for c in (x, f"{x}_lo68", f"{x}_hi68")]
            continue
        flag = label_catalogue.CUTS.get(x)
        ok = df["chi2_ok"].fill_null(False)
        if flag:
            ok = ok & df[flag].fill_null(False)
        values = df[x].cast(pl.Float64).fill_null(np.nan).to_numpy()
        fitted = ok.to_numpy() & np.isfinite(values)
        key = _search_key(fitted)
        if key not in searched:
            searched[key] = neighbours(latent, fitted)
        pred, half = predict(latent, values, fitted, found=searched[key])
        columns += [pl.Series(x, pred), pl.Series(f"{x}_lo68", pred - half),
                    pl.Series(f"{x}_hi68", pred + half)]
    return out.with_columns(columns).fill_nan(None).to_arrow()

