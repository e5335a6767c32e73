"""One cube's science, pure: a DRP LOGCUBE and its drpall row in, archive rows out.

:func:`process_cube` corrects Milky-Way extinction, Voronoi-bins to the target S/N, co-adds
each bin (Law et al. 2016 covariance correction), shifts to the rest frame, resamples onto
the 4544-bin grid and derives per-baxel geometry and quality columns. :func:`check_identity`
makes sure file name, header and drpall row name one cube of the release. The job around it
(which cubes, where the rows go) is :mod:`desomdb.pipeline.ingest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from desomdb.errors import InputDataError
from desomdb.pipeline.jobs import IngestConfig
from desomdb.science import binning, dust, geometry, sidecar, spectra
from desomdb.survey import manga
from desomdb.survey.cube import IMAGE_HDUS, Cube

#: Redshifts (exclusive, inclusive) for which the LOGCUBE's observed 3621.6-10353.8 Å
#: covers the rest-frame 3650-8950 Å grid.
Z_MIN, Z_MAX = 0.0, 10353.8 / 8950.0 - 1

@dataclass
class CubeTables:
    """The rows one cube contributes: baxels, spectra, bin_map, images (and truth for mocks)."""

    n_spaxels: int
    baxels: pa.Table
    spectra: pa.Table
    bin_map: pa.Table
    truth: pa.Table | None
    binning_method: str
    images: pa.Table | None = None


def process_cube(
    cube: Cube,
    drp: dict[str, Any],
    cfg: IngestConfig,
    spaxel_truth: pl.DataFrame | None = None,
    truth_rules: dict[str, list[Any]] | None = None,
) -> CubeTables:
    """Bin, co-add and resample one cube.

    Parameters
    ----------
    cube : Cube
    drp : dict
        The cube's drpall row (``z``, ``nsa_elpetro_phi``, ``nsa_elpetro_ba``,
        ``nsa_elpetro_th50_r``).
    cfg : IngestConfig
    spaxel_truth : polars.DataFrame, optional
        Per-spaxel truth rows of this cube (a mock survey's sidecar file).
    truth_rules : dict, optional
        How they aggregate per bin (:mod:`desomdb.science.sidecar`); required with ``spaxel_truth``.

    Returns
    -------
    CubeTables

    Raises
    ------
    InputDataError
        Redshift outside the usable range, a critical DRP3QUAL, or no spaxel with S/N ≥ 2.
    """
    z = float(drp["z"])
    if not np.isfinite(z) or not (Z_MIN < z <= Z_MAX):
        raise InputDataError(
            f"{cube.path}: drpall z = {z} is outside {Z_MIN}-{Z_MAX:.4f}, where the LOGCUBE "
            f"covers rest-frame {spectra.REST_MIN_AA:.0f}-{spectra.REST_MAX_AA:.0f} Å"
        )
    if cube.drp3qual & manga.DRP3QUAL_CRITICAL:
        raise InputDataError(f"{cube.path}: DRP3QUAL has the CRITICAL bit set; cube unusable")
    mw = dust.milky_way_transmission(cube.wave, cube.ebvgal)
    signal, noise = binning.spaxel_signal_noise(cube.flux, cube.ivar, cube.good, cube.wave,
                                                transmission=mw)
    bins = binning.voronoi_bins(signal, noise, cfg.target_snr, cfg.min_spaxel_snr, cfg.wvt)
    if bins.n_bins == 0:
        raise InputDataError(
            f"{cube.path}: no spaxel reaches S/N {cfg.min_spaxel_snr} in the g band; nothing to bin"
        )
    flat_bin = bins.bin_id.ravel()
    used = np.flatnonzero(flat_bin >= 0)
    n_wave = cube.wave.size
    # Only the binned spaxels are corrected for the foreground, in float32 (the cube's
    # precision): a 127-fibre cube in float64 would be ~200 MB per array.
    mw32 = mw.astype(np.float32)[:, None]
    flux_used = cube.flux.reshape(n_wave, -1)[:, used]
    flux_used /= mw32
    ivar_used = cube.ivar.reshape(n_wave, -1)[:, used]
    ivar_used *= mw32**2
    flux_sum, ivar_sum, good_sum, n_members = spectra.coadd(
        flux_used, ivar_used, cube.good.reshape(n_wave, -1)[:, used], flat_bin[used],
        bins.n_bins)
    ivar_sum /= binning.law_correction(n_members)[None, :] ** 2
    flux_r, ivar_r, mask_r = spectra.resample_to_rest(cube.wave, flux_sum, ivar_sum, good_sum, z)
    norm = spectra.norm_flux(flux_r, mask_r)

    dra, ddec = cube.sky_offsets()
    w = np.clip(signal.ravel()[used], 1e-30, None)
    idx = flat_bin[used]
    wsum = np.bincount(idx, weights=w, minlength=bins.n_bins)
    cx = np.bincount(idx, weights=dra.ravel()[used] * w, minlength=bins.n_bins) / wsum
    cy = np.bincount(idx, weights=ddec.ravel()[used] * w, minlength=bins.n_bins) / wsum
    radius = geometry.elliptical_radius(
        cx, cy, float(drp["nsa_elpetro_phi"]), float(drp["nsa_elpetro_ba"])
    ) / float(drp["nsa_elpetro_th50_r"])
    good_bins = mask_r == 0
    n_good_bins = good_bins.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = flux_r / norm[:, None]
        min_norm = np.where(good_bins, normed, np.inf).min(axis=1)
        off_lines = good_bins & ~spectra.emission_line_bins()[None, :]
        max_off = np.where(off_lines, normed, -np.inf).max(axis=1)
    bin_ids = np.arange(bins.n_bins, dtype=np.int32)
    ident = {
        "plateifu": pa.array([cube.plateifu] * bins.n_bins),
        "bin_id": pa.array(bin_ids),
    }
    baxels = pa.table({
        **ident,
        "mangaid": pa.array([cube.mangaid] * bins.n_bins),
        "n_spaxels": pa.array(bins.n_spaxels.astype(np.int32)),
        "x_arcsec": pa.array(cx.astype(np.float32)),
        "y_arcsec": pa.array(cy.astype(np.float32)),
        "radius_re": pa.array(radius.astype(np.float32)),
        "snr": pa.array(bins.snr.astype(np.float32)),
        "norm_flux": pa.array(norm.astype(np.float32)),
        "n_good": pa.array(n_good_bins.astype(np.int32)),
        "min_norm_flux": pa.array(np.where(np.isfinite(min_norm), min_norm, np.nan)
                                  .astype(np.float32)),
        "max_norm_flux_off_lines": pa.array(np.where(np.isfinite(max_off), max_off, np.nan)
                                            .astype(np.float32)),
        "flag_few_good": pa.array(n_good_bins < cfg.min_good_bins),
        "flag_low_snr": pa.array(bins.snr < cfg.train_min_snr),
        "flag_bad_norm": pa.array(~(np.isfinite(norm) & (norm > 0))),
    })
    spec = pa.table({
        **ident,
        "flux": spectra.to_list_column(flux_r),
        "ivar": spectra.to_list_column(ivar_r),
        "mask": spectra.to_list_column(mask_r, pa.uint8()),
    })
    covered = cube.good.any(axis=0)
    yy, xx = np.nonzero(covered)
    bin_map = pa.table({
        "plateifu": pa.array([cube.plateifu] * xx.size),
        "x": pa.array(xx.astype(np.int16)),
        "y": pa.array(yy.astype(np.int16)),
        "bin_id": pa.array(bins.bin_id[yy, xx].astype(np.int32)),
    })
    truth_table = None
    if spaxel_truth is not None and spaxel_truth.height and truth_rules:
        agg = sidecar.aggregate(spaxel_truth, pl.from_arrow(bin_map),  # type: ignore[arg-type]
                                truth_rules)
        truth_table = agg.with_columns(pl.lit(cube.plateifu).alias("plateifu")).to_arrow()
    return CubeTables(int(covered.sum()), baxels, spec, bin_map, truth_table, bins.method,
                      image_rows(cube))


def image_rows(cube: Cube) -> pa.Table | None:
    """Return the cube's broad-band images as ``images`` rows (one per band), or None.

    Columns: ``plateifu, band, n_x, n_y, image`` (float32[n_y * n_x], row-major ``[y, x]``,
    nanomaggies per spaxel, as the DRP's GIMG..ZIMG; non-finite values kept as NaN).
    """
    if not cube.images:
        return None
    bands = [b for b in IMAGE_HDUS.values() if b in cube.images]
    n_y, n_x = cube.shape
    return pa.table({
        "plateifu": pa.array([cube.plateifu] * len(bands)),
        "band": pa.array(bands),
        "n_x": pa.array([n_x] * len(bands), pa.int16()),
        "n_y": pa.array([n_y] * len(bands), pa.int16()),
        "image": pa.array([np.asarray(cube.images[b], np.float32).ravel() for b in bands],
                          pa.list_(pa.float32())),
    })


def check_identity(cube: Cube, plateifu: str, drp: dict[str, Any] | None,
                   release: str) -> None:
    """Check that a cube's file name, header and drpall row name one cube of ``release``.

    Parameters
    ----------
    cube : Cube
    plateifu : str
        The plateifu its file name gives (``manga-<plate>-<ifu>-LOGCUBE...``).
    drp : dict or None
        The drpall row found under that plateifu.
    release : str
        The release being ingested (``DR15``, ``DR17``).

    Raises
    ------
    InputDataError
        When the header's PLATEIFU or MANGAID disagrees with the file name or the drpall row,
        when the drpall has no row, or when the file declares another release's DRP version or
        layout.
    """
    path = cube.path
    if cube.plateifu != plateifu:
        raise InputDataError(
            f"{path}: header PLATEIFU {cube.plateifu} differs from the file name's {plateifu}; "
            "the file was renamed or is another cube — rename it to match its header or "
            "re-download it")
    if drp is None:
        raise InputDataError(f"{path}: plateifu {plateifu} is not in the drpall table; pass "
                             "the drpall of this release")
    drp_mangaid = str(drp.get("mangaid", "")).strip()
    if drp_mangaid and cube.mangaid and drp_mangaid != cube.mangaid:
        raise InputDataError(
            f"{path}: header MANGAID {cube.mangaid} differs from the drpall row's {drp_mangaid} "
            f"for {plateifu}; use the drpall of the cube's release")
    rel = manga.release(release)
    declared = cube.drp_version.strip()
    if declared and declared != rel.drp_version:
        owner = next((r.name for r in manga.RELEASES.values() if r.drp_version == declared),
                     None)
        raise InputDataError(
            f"{path}: the file declares DRP version {declared}"
            + (f" ({owner})" if owner else "")
            + f", not {rel.drp_version} ({rel.name}); ingest it with --release "
            + (owner if owner else "matching its DRP version"))
    if not declared and cube.lsf_hdu != rel.lsf_post:
        raise InputDataError(
            f"{path}: the file has the {cube.lsf_hdu} extension, not {rel.lsf_post} of the "
            f"{rel.name} layout; ingest it with the release it belongs to")
