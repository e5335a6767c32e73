"""Aggregate a mock survey's per-spaxel truth into per-baxel truth (the ``truth`` table).

Conventions (DESIGN.md): age and [M/H] weighted by stellar mass; M*/L_r = ΣM / ΣL_r;
E(B-V) and kinematics weighted by r-band light; SFR and line fluxes summed; log sSFR =
log10(ΣSFR / ΣM) with the floor -14; d_BPT from the summed line fluxes.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from desomdb import emission
from desomdb.mock_galaxy import LOG_SSFR_FLOOR

LINE_COLUMNS = ("flux_hbeta", "flux_oiii5007", "flux_halpha", "flux_nii6583")


def aggregate(spaxel_truth: pl.DataFrame, bin_map: pl.DataFrame) -> pl.DataFrame:
    """Per-baxel truth of one cube.

    Parameters
    ----------
    spaxel_truth : polars.DataFrame
        Rows of the mock truth table for one cube (columns ``x``, ``y`` and the truth).
    bin_map : polars.DataFrame
        Columns ``x``, ``y``, ``bin_id`` (-1 = not binned).

    Returns
    -------
    polars.DataFrame
        One row per bin: ``bin_id``, ``galaxy_type`` and the aggregated truth columns.
    """
    joined = spaxel_truth.join(
        bin_map.filter(pl.col("bin_id") >= 0), on=["x", "y"], how="inner"
    )
    m, lr = pl.col("mstar_msun"), pl.col("l_r_lsun")
    agg = joined.group_by("bin_id").agg(
        pl.col("galaxy_type").first(),
        pl.len().alias("n_spaxels"),
        ((m * pl.col("age_mw_gyr")).sum() / m.sum()).alias("age_mw_gyr"),
        ((m * pl.col("mh_mw")).sum() / m.sum()).alias("mh_mw"),
        (m.sum() / lr.sum()).log10().alias("log_ml_r"),
        ((lr * pl.col("ebv_star")).sum() / lr.sum()).alias("ebv_star"),
        ((lr * pl.col("ebv_gas")).sum() / lr.sum()).alias("ebv_gas"),
        ((lr * pl.col("vel_kms")).sum() / lr.sum()).alias("vel_kms"),
        ((lr * pl.col("sigma_kms")).sum() / lr.sum()).alias("sigma_kms"),
        (pl.col("sfr_msun_yr").sum() / m.sum()).alias("ssfr"),
        m.sum().alias("mstar_msun"),
        pl.col("radius_re").mean().alias("radius_re"),
        *[pl.col(c).sum() for c in LINE_COLUMNS],
    )
    ssfr = agg["ssfr"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        d = emission.d_bpt(
            np.log10(agg["flux_nii6583"].to_numpy() / agg["flux_halpha"].to_numpy()),
            np.log10(agg["flux_oiii5007"].to_numpy() / agg["flux_hbeta"].to_numpy()),
        )
    return (
        agg.with_columns(
            pl.Series("log_ssfr", np.log10(np.maximum(ssfr, 10**LOG_SSFR_FLOOR))),
            pl.Series("d_bpt", d),
        )
        .drop("ssfr")
        .with_columns(pl.col("bin_id").cast(pl.Int32))
        .sort("bin_id")
    )
