"""Per-node label distributions (``node_labels``) of a DESOM-1 model, and calibrated intervals.

Members: every assigned baxel (train and test) of the newest release of each cube that passes
the paper's label cuts — chi2_red < 2; sSFR and E(B−V)_gas also Hα S/N > 2; d_BPT also all
four lines at S/N > 2 — with a finite value.

Columns per (node, label):

- ``n``, ``median``, ``p16``, ``p84``, ``mean`` and ``histogram`` describe the members' point
  estimates (percentiles interpolated linearly, as ``numpy.percentile``); histogram edges are
  fixed per label (:data:`label_catalogue.EDGES`; values clipped into range) so node PDFs compare.
- ``lo68``, ``hi68``: the calibrated 68 % interval, the 16th and 84th percentiles of the
  mixture ``(1/n) Σ_i N(v_i, σ_i²)`` of the members' values ``v_i`` each convolved with its
  own fit error ``σ_i``. ``σ_i`` comes from the archive's error model
  (:mod:`desomdb.pipeline.calibrate`, table ``label_errors``) for the member's fitter, label and S/N
  bin, widened in quadrature by the label's galaxy term ``sigma_galaxy``
  (:func:`galaxy_term`: a node's members come from a few galaxies, and a new galaxy's baxel
  differs from them by more than its fit error; the term is fitted, leaving one galaxy out
  at a time, so that the intervals cover 68 % of held-out galaxies' *fits* — no truth is
  used, so it applies to real surveys). The quantiles are found by bisection on the mixture
  CDF (vectorised over all nodes of a batch, to 1e-9 of the label's histogram range). Null
  where a member has no σ: no error model yet (run ``desomdb calibrate``), or labels of a
  fitter it does not cover.
- ``lo68_total``, ``hi68_total``: the same with each member's σ also widened by the
  template-library term σ_lib of its label and its fit's light-weighted age
  (:mod:`desomdb.science.library_term`, measured on mocks from other libraries and shipped
  with the package): the interval for a galaxy whose stars are not the templates'. Null
  where the statistical interval is, and for labels without a measured term (log M*/L_r:
  no other library has the same IMF and remnant masses).
- ``library_dominated``: whether the library term makes up most of the total interval
  (:func:`library_dominated`); null where either interval is.

Memory stays flat in archive size: DuckDB joins the Parquet files and streams the members
ordered by (label, node, value) in record batches; each batch's complete nodes are reduced
with segment-wise NumPy operations and only an unfinished last node is carried over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
from scipy.special import ndtr

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.query import views
from desomdb.science import label_catalogue, library_term

#: Central probability of the calibrated interval (16th to 84th percentile).
INTERVAL = (0.16, 0.84)
#: Rows per streamed record batch.
BATCH_ROWS = 1 << 17
_BISECT_STEPS = 40
#: Members per label (expected) from which the galaxy term is fitted.
GALAXY_SAMPLE = 20_000
_HASH_BINS = 1_000_000

SCHEMA = pa.schema([
    ("node", pa.int32()), ("label", pa.string()), ("n", pa.int64()), ("median", pa.float64()),
    ("p16", pa.float64()), ("p84", pa.float64()), ("mean", pa.float64()),
    ("lo68", pa.float64()), ("hi68", pa.float64()), ("sigma_galaxy", pa.float64()),
    ("lo68_total", pa.float64()), ("hi68_total", pa.float64()),
    ("library_dominated", pa.bool_()),
    ("hist_lo", pa.float64()),
    ("hist_hi", pa.float64()), ("histogram", pa.list_(pa.int64())),
])


def members_sql(model_id: str, has_errors: bool, where: str = "true") -> str:
    """Return the query of every node member: label, node, value, sigma (ordered).

    Parameters
    ----------
    model_id : str
        DESOM-1 model whose assignments define the nodes.
    has_errors : bool
        Whether the connection has a ``label_errors`` view; without it ``sigma`` is null.
    where : str
        Extra SQL condition on the members (columns of ``assignments a`` and ``labels l``),
        e.g. to leave held-out galaxies out when measuring coverage.
    """
    return (f"{_members_cte(model_id, where)} select label, node, value, "
            f"{_sigma_sql(has_errors)} as sigma, age_l from m order by label, node, value")


def sample_sql(model_id: str, where: str = "true", fraction: float = 1.0) -> str:
    """Return the query of a seeded sample of node members with their galaxy (mangaid).

    A member is kept when a hash of its key falls in the first ``fraction`` of the hash range
    (the same sample every time; streamed, so memory stays flat). Columns label, node, value,
    sigma, galaxy. The error model must exist.
    """
    keep = round(min(max(fraction, 0.0), 1.0) * _HASH_BINS)
    return (f"{_members_cte(model_id, where)} select label, node, value, "
            f"{_sigma_sql(True)} as sigma, galaxy from m where h % {_HASH_BINS} < {keep}")


def _sigma_sql(has_errors: bool) -> str:
    if not has_errors:
        return "null::double"
    return ("(select sqrt(avg(e.sigma * e.sigma)) from label_errors e "
            "where e.fitter = m.fitter and e.label = m.label "
            "and m.snr >= e.snr_lo and m.snr < e.snr_hi)")


def _members_cte(model_id: str, where: str) -> str:
    """``with ... m as (...)``: one row per member and label (label, node, value, ...)."""
    quoted = "'" + model_id.replace("'", "''") + "'"
    values = ", ".join(f"l.{label}::double as {label}" for label in label_catalogue.EDGES)
    label_cuts = label_catalogue.CUTS
    flags = ", ".join(f"l.{flag}" for flag in sorted(set(label_cuts.values())))
    cuts = " and ".join(
        f"(label not in ({', '.join(repr(k) for k, v in label_cuts.items() if v == flag)}) "
        f"or {flag})" for flag in sorted(set(label_cuts.values())))
    # One scan of each table; UNPIVOT turns the label columns into (label, value) rows.
    return (
        f"with base as (select a.node::integer as node, l.fitter, b.snr, "
        f"l.log_age_lw::double as age_l, "
        f"coalesce(b.mangaid, a.plateifu) as galaxy, hash(a.release, a.plateifu, a.bin_id) "
        f"as h, {flags}, {values} "
        f"from assignments a "
        f"semi join latest_cubes c on a.release = c.release and a.plateifu = c.plateifu "
        f"join preferred_labels l on l.release = a.release and l.plateifu = a.plateifu "
        f"and l.bin_id = a.bin_id "
        f"join baxels b on b.release = a.release and b.plateifu = a.plateifu "
        f"and b.bin_id = a.bin_id "
        f"where a.model_id = {quoted} and l.status = 'ok' and l.chi2_ok and ({where})), "
        f"long as (unpivot base on {', '.join(label_catalogue.EDGES)} "
        "into name label value value), "
        f"m as (select * from long where isfinite(value) and {cuts})")


def galaxy_term(value: np.ndarray, sigma: np.ndarray, node: np.ndarray, galaxy: np.ndarray,
                target: float = INTERVAL[1] - INTERVAL[0], max_held: int = 2000,
                max_reference: int = 400, upper: float = 1.0, seed: int = 0) -> float:
    """Spread between galaxies that the members' error model does not carry (same unit).

    Leave one galaxy out: for a held-out member ``i`` (at most ``max_held``, seeded) of node
    ``k``, its probability integral transform under the interval's mixture built from the
    members ``j`` of node ``k`` in *other* galaxies, each widened by the new fit's own error,

        PIT_i = mean_j Φ((v_i − v_j) / sqrt(σ_j² + σ_i² + τ²)),

    is in [0.16, 0.84] for a fraction of members that grows with τ. The result is the
    smallest ``τ ≥ 0`` for which that fraction reaches ``target`` (bisection). It uses fits
    only, never a truth, so it applies to real surveys: it is what a new galaxy's baxel adds
    beyond the spread of the node's other galaxies and its own fit error (with few galaxies
    per node, or galaxy-wide offsets the map does not separate, it is large; with the
    members of many galaxies per node it tends to 0).

    Parameters
    ----------
    value, sigma : ndarray, shape (n,)
        Members' fitted values and error-model σ (same unit).
    node, galaxy : ndarray, shape (n,)
        Node and galaxy (mangaid) of each member.
    target : float
        Coverage to reach (0.68).
    max_held : int
        Held-out members used (seeded sample of those with another galaxy in their node).
    max_reference : int
        Members kept per node (seeded sample), so at most ``max_held × max_reference``
        pairs are formed however the members crowd onto one node.
    upper : float
        Largest τ tried (the label's range); returned when even it falls short.
    seed : int

    Returns
    -------
    float
        τ; 0.0 when the intervals already cover ``target`` or no node has two galaxies.
    """
    rng = np.random.default_rng(seed)
    keep = np.ones(node.size, dtype=bool)
    _, inverse, counts = np.unique(node, return_inverse=True, return_counts=True)
    for k in np.flatnonzero(counts > max_reference):  # bounds the pairs (and memory)
        members = np.flatnonzero(inverse == k)
        keep[rng.choice(members, members.size - max_reference, replace=False)] = False
    value, sigma, node, galaxy = value[keep], sigma[keep], node[keep], galaxy[keep]
    order = np.lexsort((galaxy, node))
    value, sigma, node, galaxy = value[order], sigma[order], node[order], galaxy[order]
    start = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    stop = np.r_[start[1:], node.size]
    seg = np.repeat(np.arange(start.size), stop - start)
    multi = galaxy[start] != galaxy[stop - 1]  # the node holds members of two galaxies
    candidates = np.flatnonzero(multi[seg])
    if candidates.size == 0:
        return 0.0
    held = np.sort(rng.choice(candidates, min(max_held, candidates.size), replace=False))
    width = (stop - start)[seg[held]]
    i = np.repeat(held, width)
    j = np.repeat(start[seg[held]], width) + (np.arange(i.size) - np.repeat(
        np.cumsum(width) - width, width))
    other = galaxy[i] != galaxy[j]
    i, j = i[other], j[other]
    pos = np.searchsorted(held, i)
    counts = np.bincount(pos, minlength=held.size).astype(float)
    diff = value[i] - value[j]
    var = sigma[i] ** 2 + sigma[j] ** 2

    def covered(tau: float) -> float:
        pit = np.bincount(pos, weights=ndtr(diff / np.sqrt(var + tau * tau + 1e-300)),
                          minlength=held.size) / counts
        return float(np.mean((pit >= INTERVAL[0]) & (pit <= INTERVAL[1])))

    if covered(0.0) >= target:
        return 0.0
    if covered(upper) < target:
        return upper
    lo, hi = 0.0, upper
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if covered(mid) >= target else (mid, hi)
        if hi - lo < upper * 1e-4:
            break
    return hi


def galaxy_terms(con: duckdb.DuckDBPyConnection, model_id: str, where: str = "true"
                 ) -> dict[str, float]:
    """:func:`galaxy_term` of every label, on a seeded sample of members (error model needed).

    About :data:`GALAXY_SAMPLE` members per label are drawn (all of them in small archives).
    """
    quoted = "'" + model_id.replace("'", "''") + "'"
    n = con.sql(f"select count(*) from assignments where model_id = {quoted}").fetchall()
    fraction = GALAXY_SAMPLE / max(int(n[0][0]), 1)
    return terms_of_sample(con.sql(sample_sql(model_id, where, fraction)).to_arrow_table())


def terms_of_sample(rows: pa.Table) -> dict[str, float]:
    """:func:`galaxy_term` per label of a member sample (columns of :func:`sample_sql`).

    Members without a σ (labels of a fitter the error model does not cover) are left out of
    the fit; their nodes get no interval anyway. A label with no member left has no entry:
    :func:`_reduce` then adds no galaxy term.
    """
    labels = rows.column("label").to_numpy(zero_copy_only=False)
    value = rows.column("value").to_numpy(zero_copy_only=False).astype(float)
    sigma = rows.column("sigma").to_numpy(zero_copy_only=False).astype(float)
    node = rows.column("node").to_numpy(zero_copy_only=False)
    galaxy = rows.column("galaxy").to_numpy(zero_copy_only=False)
    out = {}
    for name in np.unique(labels):
        sel = (labels == name) & np.isfinite(sigma)
        if sel.any():
            lo_e, hi_e, _ = label_catalogue.EDGES[str(name)]
            out[str(name)] = galaxy_term(value[sel], sigma[sel], node[sel], galaxy[sel],
                                         upper=hi_e - lo_e)
    return out


@dataclass
class _Carry:
    """Rows of the last, possibly unfinished, (label, node) group of the previous batch."""

    label: np.ndarray
    node: np.ndarray
    value: np.ndarray
    sigma: np.ndarray
    sigma_lib: np.ndarray


def _batches(con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[pa.RecordBatch]:
    yield from con.sql(sql).to_arrow_reader(BATCH_ROWS)


def _percentile_sorted(value: np.ndarray, start: np.ndarray, n: np.ndarray,
                       q: float) -> np.ndarray:
    """Linear-interpolation percentile (``numpy.percentile``) of segments sorted by value."""
    pos = (n - 1) * q
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    return value[start + lo] * (1 - frac) + value[start + hi] * frac


def mixture_quantiles(value: np.ndarray, sigma: np.ndarray, group: np.ndarray, n_groups: int,
                      probs: tuple[float, ...], tol: float) -> np.ndarray:
    """Quantiles of per-group equal-weight Gaussian mixtures, by bisection on the mixture CDF.

    Parameters
    ----------
    value, sigma : ndarray, shape (n,)
        Member values and their standard errors (same unit); sigma 0 is a point mass.
    group : ndarray of int, shape (n,)
        Group index in ``[0, n_groups)`` of each member, sorted ascending.
    n_groups : int
    probs : tuple of float
        Cumulative probabilities in (0, 1).
    tol : float
        Bracket width (in the values' unit) below which bisection stops.

    Returns
    -------
    ndarray, shape (n_groups, len(probs))
    """
    counts = np.bincount(group, minlength=n_groups).astype(float)
    lo_g = np.full(n_groups, np.inf)
    hi_g = np.full(n_groups, -np.inf)
    np.minimum.at(lo_g, group, value - 8 * sigma)
    np.maximum.at(hi_g, group, value + 8 * sigma)
    out = np.empty((n_groups, len(probs)))
    point = sigma <= 0
    safe = np.where(point, 1.0, sigma)
    for k, p in enumerate(probs):
        lo, hi = lo_g.copy(), hi_g.copy()
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            x = mid[group]
            cdf_i = np.where(point, (x >= value).astype(float), ndtr((x - value) / safe))
            below = np.bincount(group, weights=cdf_i, minlength=n_groups) / counts < p
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
            if np.all(hi - lo < tol):
                break
        out[:, k] = 0.5 * (lo + hi)
    return out


def _library_sigma(label: np.ndarray, age_l: np.ndarray,
                   lib_terms: list[library_term.Term]) -> np.ndarray:
    """σ_lib of each member row (its label, its fit's log_age_lw); NaN without a term."""
    out = np.full(label.size, np.nan)
    for name in np.unique(label):
        rows = label == name
        out[rows] = library_term.sigma_library(lib_terms, str(name), age_l[rows])
    return out


def library_dominated(lo68: np.ndarray, hi68: np.ndarray, lo_total: np.ndarray,
                      hi_total: np.ndarray) -> np.ndarray:
    """Whether the template-library term makes up most of a node's total interval.

    True where (hi68_total − lo68_total)² > 2 (hi68 − lo68)²: for Gaussian members the
    squared widths add, so the library term's share of the total width then exceeds the
    statistical share. Such a node's label is set by which templates the fits used more
    than by the data (young populations are, measured on BC03 and MaStar mocks).

    Parameters
    ----------
    lo68, hi68, lo_total, hi_total : ndarray, shape (n,)
        A node's statistical and total intervals (NaN where unknown; then False).

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    with np.errstate(invalid="ignore"):
        return np.asarray((hi_total - lo_total) ** 2 > 2 * (hi68 - lo68) ** 2)


def _reduce(label: np.ndarray, node: np.ndarray, value: np.ndarray,
            sigma: np.ndarray, terms: dict[str, float],
            sigma_lib: np.ndarray | None = None) -> pa.Table:
    """Statistics of complete (label, node) groups of rows sorted by (label, node, value).

    ``terms`` holds each label's :func:`galaxy_term`, added in quadrature to every member's σ
    (0 for a label without one: no sampled member had a σ to fit it on). ``sigma_lib`` (per
    row, :mod:`desomdb.science.library_term`) is added in quadrature as well for the total
    interval; a node with a member without a finite one gets none.
    """
    if sigma_lib is None:
        sigma_lib = np.full(label.size, np.nan)
    new = np.ones(label.size, dtype=bool)
    new[1:] = (label[1:] != label[:-1]) | (node[1:] != node[:-1])
    start = np.flatnonzero(new)
    n = np.diff(np.append(start, label.size))
    group = np.cumsum(new) - 1
    median = _percentile_sorted(value, start, n, 0.5)
    p16 = _percentile_sorted(value, start, n, 0.16)
    p84 = _percentile_sorted(value, start, n, 0.84)
    mean = np.add.reduceat(value, start) / n
    g_label = label[start]
    lo68 = np.full(start.size, np.nan)
    hi68 = np.full(start.size, np.nan)
    lo_total = np.full(start.size, np.nan)
    hi_total = np.full(start.size, np.nan)
    tau = np.full(start.size, np.nan)
    hist_lo = np.empty(start.size)
    hist_hi = np.empty(start.size)
    hists: list[list[int]] = [[] for _ in start]
    for name in np.unique(g_label):
        lo_e, hi_e, nbins = label_catalogue.EDGES[str(name)]
        gsel = np.flatnonzero(g_label == name)
        hist_lo[gsel], hist_hi[gsel] = lo_e, hi_e
        rows = np.flatnonzero(label == name)
        local = group[rows] - gsel[0]
        width = (hi_e - lo_e) / nbins
        bins = np.clip(np.floor((np.clip(value[rows], lo_e, hi_e) - lo_e) / width), 0, nbins - 1)
        counts = np.bincount(local * nbins + bins.astype(np.int64),
                             minlength=gsel.size * nbins).reshape(gsel.size, nbins)
        for j, g in enumerate(gsel):
            hists[g] = counts[j].tolist()
        term = terms.get(str(name), 0.0)
        s = np.sqrt(sigma[rows] ** 2 + term**2)
        for s_i, lo_out, hi_out in ((s, lo68, hi68),
                                    (np.sqrt(s**2 + sigma_lib[rows] ** 2), lo_total, hi_total)):
            known = np.isfinite(s_i)
            ok_groups = np.bincount(local, weights=(~known).astype(float),
                                    minlength=gsel.size) == 0
            if ok_groups.any():
                keep = ok_groups[local]
                remap = np.cumsum(ok_groups) - 1
                q = mixture_quantiles(value[rows][keep], s_i[keep], remap[local[keep]],
                                      int(ok_groups.sum()), INTERVAL,
                                      tol=(hi_e - lo_e) * 1e-9)
                lo_out[gsel[ok_groups]] = q[:, 0]
                hi_out[gsel[ok_groups]] = q[:, 1]
                if lo_out is lo68:
                    tau[gsel[ok_groups]] = term
    return pa.table({
        "node": pa.array(node[start].astype(np.int32)), "label": pa.array(g_label.astype(str)),
        "n": pa.array(n.astype(np.int64)), "median": median, "p16": p16, "p84": p84,
        "mean": mean, "lo68": pa.array(lo68, from_pandas=True),
        "hi68": pa.array(hi68, from_pandas=True),
        "sigma_galaxy": pa.array(tau, from_pandas=True),
        "lo68_total": pa.array(lo_total, from_pandas=True),
        "hi68_total": pa.array(hi_total, from_pandas=True),
        "library_dominated": pa.array(library_dominated(lo68, hi68, lo_total, hi_total),
                                      mask=~(np.isfinite(hi68 - lo68)
                                             & np.isfinite(hi_total - lo_total))),
        "hist_lo": hist_lo, "hist_hi": hist_hi,
        "histogram": pa.array(hists, type=pa.list_(pa.int64())),
    }, schema=SCHEMA)


def node_label_table(archive: str | Archive, model_id: str, where: str = "true") -> pa.Table:
    """Per node and label: n, median, p16, p84, mean, lo68, hi68 and a fixed-edge histogram.

    Parameters
    ----------
    archive : str or Archive
        An archive with labels, baxels and the model's assignments committed.
    model_id : str
    where : str
        Extra SQL condition on the members (``a.*`` assignments, ``l.*`` labels); the stored
        table uses every member (``true``).

    Returns
    -------
    pyarrow.Table
        :data:`SCHEMA`, one row per (node, label) with at least one member, sorted by label
        then node. ``lo68``/``hi68`` are null where no error model covers the label.
    """
    arch = archive if isinstance(archive, Archive) else Archive(archive)
    con = views.connect(arch.root, raw=True)
    views.progress_bar_off(con)
    try:
        has_errors = bool(arch.files(paths.LABEL_ERRORS))
        terms = galaxy_terms(con, model_id, where) if has_errors else {}
        lib_terms = library_term.load()
        sql = members_sql(model_id, has_errors, where)
        parts: list[pa.Table] = []
        carry: _Carry | None = None
        for batch in _batches(con, sql):
            if batch.num_rows == 0:
                continue
            label = batch.column("label").to_numpy(zero_copy_only=False)
            node = batch.column("node").to_numpy()
            value = batch.column("value").to_numpy()
            sigma = batch.column("sigma").to_numpy(zero_copy_only=False).astype(float)
            sigma_lib = _library_sigma(label, batch.column("age_l").to_numpy(
                zero_copy_only=False).astype(float), lib_terms)
            if carry is not None:
                label = np.concatenate([carry.label, label])
                node = np.concatenate([carry.node, node])
                value = np.concatenate([carry.value, value])
                sigma = np.concatenate([carry.sigma, sigma])
                sigma_lib = np.concatenate([carry.sigma_lib, sigma_lib])
            last = (label == label[-1]) & (node == node[-1])
            tail = int(np.argmax(last))  # rows are grouped, so the last group is a suffix
            carry = _Carry(label[tail:], node[tail:], value[tail:], sigma[tail:],
                           sigma_lib[tail:])
            if tail > 0:
                parts.append(_reduce(label[:tail], node[:tail], value[:tail], sigma[:tail],
                                      terms, sigma_lib[:tail]))
        if carry is not None:
            parts.append(_reduce(carry.label, carry.node, carry.value, carry.sigma, terms,
                                 carry.sigma_lib))
    finally:
        con.close()
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def write_node_labels(writer: Writer, arch: Archive, model_id: str) -> None:
    """Compute and commit ``node_labels`` and ``map_labels`` of ``model_id``.

    Nothing without a labels table. ``map_labels``
    (:mod:`desomdb.pipeline.map_labels`) are rebuilt from the same fits in the same commit.
    """
    from desomdb.pipeline import map_labels

    if not arch.has_table("labels"):
        return
    table = node_label_table(arch, model_id)
    writer.commit(add=[
        writer.stage_table("node_labels", table, paths.model_file("node_labels", model_id)),
        writer.stage_table("map_labels", map_labels.map_label_table(arch, model_id),
                           paths.model_file("map_labels", model_id))])
