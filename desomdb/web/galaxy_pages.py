"""What the galaxy and baxel pages read: a galaxy's cubes, fingerprint and bins; one baxel.

Reads go through the guarded connection; one cube's rows come from its own part files where
it has them (:class:`~desomdb.web.pages.CubeParts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from desomdb.products import maps
from desomdb.query.views import ReadOnlyConnection
from desomdb.science import fitsetup, label_catalogue, spectra
from desomdb.web.pages import (
    NO_PARTS,
    CubeParts,
    LabelPdf,
    ModelInfo,
    NotFoundError,
    has_view,
    node_pdfs,
)


# ----------------------------------------------------------------------------- galaxy
@dataclass(frozen=True)
class GalaxyData:
    """A galaxy (mangaid) shown through one of its cubes.

    Attributes
    ----------
    mangaid, release, plateifu : str
        The cube shown: by default the latest cube with most baxels.
    cubes : list of (release, plateifu)
        Every latest cube of the galaxy.
    drpall : dict
        The ``galaxies`` row of the cube (drpall columns).
    fingerprint : polars.DataFrame
        ``node, n_baxels`` per occupied node of the model (the galaxy's fingerprint).
    bins : polars.DataFrame
        Per baxel of the cube: ``bin_id, radius_re, snr, node`` and the labels (NaN where a
        label fails its cut, as ``desomdb maps``).
    bin_map : ndarray, shape (n_spaxels, 3), int
        ``x, y, bin_id``.
    desom2 : tuple of (str, int, int, int) or None
        ``(desom2_model_id, node, row, col)`` of the galaxy.
    images : dict of str to ndarray, shape (n_y, n_x), float32
        Band -> the cube's DRP image (``images``; empty for cubes ingested without them).
    covered : ndarray, shape (n_y, n_x), bool
        Spaxels the fibres cover (every ``bin_map`` row): the IFU footprint.
    x_right : bool
        Whether the cube is drawn with x growing to the right (east left; see
        :func:`x_grows_west`).
    """

    mangaid: str
    release: str
    plateifu: str
    cubes: list[tuple[str, str]]
    drpall: dict[str, Any]
    fingerprint: pl.DataFrame
    bins: pl.DataFrame
    bin_map: np.ndarray
    desom2: tuple[str, int, int, int] | None
    images: dict[str, np.ndarray] = field(default_factory=dict)
    covered: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    x_right: bool = True


def galaxy_data(con: ReadOnlyConnection, model: ModelInfo, mangaid: str,
                plateifu: str | None = None, parts: CubeParts = NO_PARTS) -> GalaxyData:
    """Read a galaxy's fingerprint, bin map, per-bin labels, DESOM-2 node and drpall row.

    Raises
    ------
    NotFoundError
        If no latest cube of ``mangaid`` (or the given ``plateifu`` of it) exists.
    """
    cubes = _latest_cubes_of(con, mangaid)
    if not cubes:
        raise NotFoundError(f"no galaxy {mangaid!r} (status ok) in the archive; list them "
                            "with 'select mangaid from galaxies'")
    chosen = [c for c in cubes if plateifu is None or c[1] == plateifu]
    if not chosen:
        raise NotFoundError(f"galaxy {mangaid} has no cube {plateifu!r}; its cubes: "
                            f"{', '.join(c[1] for c in cubes)}")
    release, pifu = chosen[0][0], chosen[0][1]
    key = [release, pifu]
    drpall = con.sql("select * from galaxies where release = ? and plateifu = ?",
                     params=key).pl()
    fp = _galaxy_counts(con, model, mangaid, [(c[0], c[1]) for c in cubes], parts)
    asg = parts.source("assignments", release, pifu) or "assignments"
    lab = parts.source("labels", release, pifu) or "labels"
    label_cols = ", ".join(
        f"if(l.chi2_ok{'' if flag is None else f' and l.{flag}'}, l.{lab_}, 'nan'::double) "
        f"as {lab_}" for lab_, flag in maps.LABELS.items())
    labelled = has_view(con, "labels")
    order = fitsetup.fitter_order_sql()
    label_source = ", ".join(dict.fromkeys(  # only the columns used: labels rows are wide
        ["bin_id", "chi2_ok", *maps.LABELS, *(f for f in maps.LABELS.values() if f)]))
    bins = con.sql(
        f"with a as (select bin_id, node from {asg} where plateifu = ? and "
        + ("" if asg != "assignments" else "model_id = ? and release = ? and ")
        + "true), "
        + (f"l as (select {label_source} from {lab} where plateifu = ? and status = 'ok' "
           + ("" if lab != "labels" else "and release = ? ")
           # one fit per baxel where several fitters labelled the cube (preferred_labels)
           + f"qualify row_number() over (partition by bin_id order by {order}) = 1), "
           if labelled else "")
        + f"b as (select bin_id, radius_re, snr from baxels where release = ? and plateifu = ?) "
        f"select b.bin_id, b.radius_re, b.snr, a.node{', ' + label_cols if labelled else ''} "
        "from b left join a using (bin_id) "
        + ("left join l using (bin_id) " if labelled else "")
        + "order by b.bin_id",
        params=[pifu, *([model.model_id, release] if asg == "assignments" else []),
                *([pifu, *([release] if lab == "labels" else [])] if labelled else []),
                release, pifu]).pl()
    bm = con.sql("select x, y, bin_id from bin_map where release = ? and plateifu = ?",
                 params=key).fetchnumpy()
    every = np.column_stack([bm["x"], bm["y"], bm["bin_id"]]).astype(int) if len(bm["x"]) \
        else np.zeros((0, 3), int)
    xy = every[every[:, 2] >= 0]
    grid = con.sql("select n_x, n_y, wcs_header from cubes where release = ? and plateifu = ?",
                   params=key).fetchall()
    n_x, n_y, header = grid[0] if grid else (0, 0, None)
    covered = np.zeros((int(n_y or 0), int(n_x or 0)), bool)
    inside = (every[:, 0] < covered.shape[1]) & (every[:, 1] < covered.shape[0])
    covered[every[inside, 1], every[inside, 0]] = True
    images = {}
    if has_view(con, "images"):
        for band, nx, ny, pixels in con.sql(
                "select band, n_x, n_y, image from images where release = ? and plateifu = ?",
                params=key).fetchall():
            images[str(band)] = np.asarray(pixels, np.float32).reshape(int(ny), int(nx))
    d2 = None
    if has_view(con, "fingerprints"):
        f = con.sql("select desom2_model_id, desom2_node, desom2_row, desom2_col from "
                    "fingerprints where model_id = ? and mangaid = ?",
                    params=[model.model_id, mangaid]).fetchall()
        if f and f[0][0] is not None:
            d2 = (str(f[0][0]), int(f[0][1]), int(f[0][2]), int(f[0][3]))
    return GalaxyData(mangaid, release, pifu, [(c[0], c[1]) for c in cubes],
                      drpall.row(0, named=True) if drpall.height else {}, fp, bins, xy, d2,
                      images, covered, x_grows_west(header))


def x_grows_west(wcs_header: str | None) -> bool:
    """Whether a cube's RA falls as x grows (``CD1_1`` or ``PC1_1·CDELT1`` < 0; DRP cubes).

    Such a grid is shown with x to the right for east to be on the left, as the sky is
    drawn. True when the header is missing or unreadable (the DRP's convention).
    """
    if not wcs_header:
        return True
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        scale = WCS(fits.Header.fromstring(wcs_header)).celestial.pixel_scale_matrix
    except Exception:  # a damaged header: assume the DRP's layout
        return True
    return bool(scale[0, 0] <= 0)


def _latest_cubes_of(con: ReadOnlyConnection, mangaid: str) -> list[tuple[str, str, int]]:
    """Return the galaxy's latest cubes ``(release, plateifu, n_baxels)``, most baxels first.

    ``latest_cubes`` ranks every cube of the archive unless filtered by constant plateifus
    (then DuckDB pushes the filter below its window), so the galaxy's plateifus are read
    first: ~10 ms instead of ~200 ms at 10,000 cubes.
    """
    mine = con.sql("select release, plateifu, n_baxels from cubes where mangaid = ?",
                   params=[mangaid]).fetchall()
    plateifus = sorted({str(c[1]) for c in mine})
    if not plateifus:
        return []
    latest = set(con.sql("select release, plateifu from latest_cubes where plateifu in "
                         f"({', '.join('?' * len(plateifus))})", params=plateifus).fetchall())
    return sorted(((str(r), str(p), int(n or 0)) for r, p, n in mine if (r, p) in latest),
                  key=lambda c: (-c[2], c[1]))


def _galaxy_counts(con: ReadOnlyConnection, model: ModelInfo, mangaid: str,
                   cubes: list[tuple[str, str]], parts: CubeParts = NO_PARTS) -> pl.DataFrame:
    """Return the galaxy's baxels per occupied node (``node, n_baxels``, by node).

    From its stored fingerprint; for a galaxy without one (fingerprints not built, or older
    than its cubes), counted from the assignments of its own ``cubes`` (its latest cubes, as
    the ``galaxy_fingerprint`` view counts them), each read from the cube's own files where
    it has them, so the page never reads every cube's assignment file.
    """
    if has_view(con, "fingerprints"):
        fp = con.sql("select unnest(range(len(counts))) as node, unnest(counts) as n_baxels "
                     "from (select counts from fingerprints where model_id = ? and "
                     "mangaid = ? limit 1)", params=[model.model_id, mangaid]).pl()
        if fp.height:
            return fp.filter(pl.col("n_baxels") > 0)
    return cube_node_counts(con, model, cubes, parts)


def cube_node_counts(con: ReadOnlyConnection, model: ModelInfo, cubes: list[tuple[str, str]],
                     parts: CubeParts = NO_PARTS) -> pl.DataFrame:
    """Count the baxels of ``cubes`` per node of ``model``, reading only those cubes.

    Each cube is read from its own assignment files where ``parts`` lists them, else through
    the ``assignments`` view filtered to it.

    Parameters
    ----------
    cubes : list of (release, plateifu)

    Returns
    -------
    polars.DataFrame
        ``node, n_baxels`` (int64) per occupied node, by node.
    """
    if not cubes or not has_view(con, "assignments"):
        return pl.DataFrame(schema={"node": pl.Int64, "n_baxels": pl.Int64})
    selects, params = [], []
    for release, plateifu in cubes:
        src = parts.source("assignments", release, plateifu)
        if src:
            selects.append(f"select node from {src} where plateifu = ?")
            params.append(plateifu)
        else:
            selects.append("select node from assignments where model_id = ? and release = ? "
                           "and plateifu = ?")
            params += [model.model_id, release, plateifu]
    return con.sql("select node::bigint as node, count(*) as n_baxels from ("
                   + " union all ".join(selects) + ") group by node order by node",
                   params=params).pl()


# ----------------------------------------------------------------------------- baxel
@dataclass(frozen=True)
class BaxelData:
    """One baxel: its spectrum, assignment, labels and its node's PDFs.

    Attributes
    ----------
    release, plateifu, mangaid : str
    bin_id : int
    flux : ndarray, shape (4544,), float
        Normalised flux (÷ ``norm_flux``), NaN where masked.
    x : ndarray, shape (4544,), float32
        The network's input (normalised, masked bins 0).
    baxel : dict
        The ``baxels`` row (n_spaxels, radius_re, snr, flags...).
    assignment : dict or None
        ``node, row, col, distance, second_node, is_adjacent`` under the model.
    labels : dict
        label -> value of the first ``status = 'ok'`` fit (cuts applied; NaN where failed).
    pdfs : list of LabelPdf
        Its node's PDFs.
    is_latest : bool
        Whether this is its cube's newest release (only those are searched by similarity).
    latent : ndarray, shape (latent,), float32, or None
        The encoder output stored by ``desomdb assign`` (None if assigned before latents
        were stored); the nearest-baxel search's query.
    estimates : dict
        label -> (value, lo68, hi68, source) from ``baxel_estimates`` (source ``fit``,
        ``map`` or None); empty before node labels are calibrated.
    fit : dict or None
        ``fitter, status, error, chi2_red`` of its stored fit: the preferred fitter's ``ok``
        row, else the row that says why it failed; None when no fitter has seen the baxel.
    stored : tuple of ndarray, shape (4544,) each, or None
        The ``spectra`` row as stored: flux and ivar (float32, not normalised) and mask
        (uint8), what a fit of the baxel starts from.
    """

    release: str
    plateifu: str
    mangaid: str
    bin_id: int
    flux: np.ndarray
    x: np.ndarray
    baxel: dict[str, Any]
    assignment: dict[str, Any] | None
    labels: dict[str, float]
    pdfs: list[LabelPdf]
    is_latest: bool
    latent: np.ndarray | None = None
    estimates: dict[str, tuple[Any, Any, Any, Any]] = field(default_factory=dict)
    fit: dict[str, Any] | None = None
    stored: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def baxel_data(con: ReadOnlyConnection, model: ModelInfo, release: str, plateifu: str,
               bin_id: int, parts: CubeParts = NO_PARTS) -> BaxelData:
    """Read one baxel's spectrum, assignment, labels and node PDFs.

    Raises
    ------
    NotFoundError
        If the archive has no such baxel or no spectrum for it.
    """
    key = [release, plateifu, bin_id]
    bax = con.sql("select * from baxels where release = ? and plateifu = ? and bin_id = ?",
                  params=key).pl()
    if bax.height == 0:
        raise NotFoundError(f"no baxel {release} {plateifu} bin {bin_id} in the archive")
    spec_src = parts.source("spectra", release, plateifu)
    spec = (con.sql(f"select flux, ivar, mask from {spec_src} where plateifu = ? and "
                    "bin_id = ?", params=[plateifu, bin_id]) if spec_src else
            con.sql("select flux, ivar, mask from spectra where release = ? and plateifu = ? "
                    "and bin_id = ?", params=key)).fetchall()
    if not spec:
        raise NotFoundError(f"baxel {release} {plateifu} bin {bin_id} has no spectrum")
    row = bax.row(0, named=True)
    stored = (np.asarray(spec[0][0], np.float32), np.asarray(spec[0][1], np.float32),
              np.asarray(spec[0][2], np.uint8))
    flux = stored[0].astype(np.float64)[None, :]
    mask = stored[2][None, :]
    norm = np.array([row.get("norm_flux") or np.nan], dtype=np.float64)
    x, w = spectra.normalise(flux, mask, norm)
    shown = np.where(w[0] > 0, x[0], np.nan)
    # all columns: files assigned before latents were stored have no latent column
    asg = parts.source("assignments", release, plateifu)
    assigned = (con.sql(f"select * from {asg} where plateifu = ? and bin_id = ?",
                        params=[plateifu, bin_id]) if asg else
                con.sql("select * from assignments where model_id = ? and release = ? "
                        "and plateifu = ? and bin_id = ?", params=[model.model_id, *key])).pl()
    assignment = ({c: assigned[c][0] for c in ("node", "row", "col", "distance", "second_node",
                                                "is_adjacent")} if assigned.height else None)
    kept = assigned["latent"][0] if assigned.height and "latent" in assigned.columns else None
    latent = np.asarray(kept, dtype=np.float32) if kept is not None else None
    labels: dict[str, float] = {}
    fit_row: dict[str, Any] | None = None
    if has_view(con, "labels"):
        cols = ", ".join(
            f"if(chi2_ok{'' if flag is None else f' and {flag}'}, {lab}, 'nan'::double)"
            for lab, flag in maps.LABELS.items())
        lab = parts.source("labels", release, plateifu)
        # the preferred ok fit; else the row saying why the baxel was not fitted
        order = f"status = 'ok' desc, {fitsetup.fitter_order_sql()}"
        what = f"fitter, status, error, chi2_red, {cols}"
        fit = (con.sql(f"select {what} from {lab} where plateifu = ? and bin_id = ? "
                       f"order by {order} limit 1", params=[plateifu, bin_id])
               if lab else
               con.sql(f"select {what} from labels where release = ? and plateifu = ? and "
                       f"bin_id = ? order by {order} limit 1", params=key)).fetchall()
        if fit:
            fit_row = dict(zip(("fitter", "status", "error", "chi2_red"), fit[0][:4],
                               strict=True))
            if fit_row["status"] == "ok":
                labels = {lab: float(v) if v is not None else np.nan
                          for lab, v in zip(maps.LABELS, fit[0][4:], strict=True)}
    pdfs = node_pdfs(con, model.model_id, int(assignment["node"])) if assignment else []
    latest = con.sql("select count(*) from latest_cubes where release = ? and plateifu = ?",
                     params=[release, plateifu]).fetchall()[0][0] > 0
    return BaxelData(release, plateifu, str(row.get("mangaid")), bin_id, shown, x[0], row,
                     assignment, labels, pdfs, bool(latest), latent,
                     _estimates(con, key) if latest else {}, fit_row, stored)


def _estimates(con: ReadOnlyConnection, key: list[Any]) -> dict[str, tuple[Any, Any, Any, Any]]:
    """One baxel's ``baxel_estimates``: label -> (value, lo68, hi68, source)."""
    if not has_view(con, "baxel_estimates"):
        return {}
    cols = ", ".join(f"{x}, {x}_lo68, {x}_hi68, {x}_source"
                     for x in label_catalogue.NODE_LABELS)
    rows = con.sql(f"select {cols} from baxel_estimates where release = ? and plateifu = ? "
                   "and bin_id = ?", params=key).fetchall()
    if not rows:
        return {}
    values = rows[0]
    return {x: tuple(values[4 * i:4 * i + 4])
            for i, x in enumerate(label_catalogue.NODE_LABELS)}
