"""How a mock survey's per-spaxel truth becomes per-baxel truth (the ``truth`` table).

Conventions (DESIGN.md): age and [M/H] weighted by stellar mass; M*/L_r = ΣM / ΣL_r;
E(B-V) and kinematics weighted by r-band light; SFR and line fluxes summed; log sSFR =
log10(ΣSFR / ΣM) with the floor -14; d_BPT from the summed line fluxes. The mock stores these
rules in its truth file (:mod:`desomdb.science.sidecar`), and ingest applies them without knowing
about mocks.

Across libraries (DESIGN.md): a mock rendered from a library without living + remnant
masses (BC03) weights age and [M/H] by *initial* mass, and says so in the ``mass_weight``
column (``current`` or ``initial``); compare it with the fit's initial-mass-weighted
``age_imw_gyr`` / ``mh_imw``. Its M*/L_r and sSFR truths are NaN (no current mass). A
library with no mass at all (MaStar; ``mass_weight`` = ``none``) has light-weighted truths
only. Light-weighted ``log_age_lw`` and ``mh_lw`` (every library) are weighted by the
spaxels' dust-free light in ``templates.LIGHT_WINDOW_AA``, as within a spaxel.
"""

from __future__ import annotations

from typing import Any

from desomdb.mock.galaxy import LOG_SSFR_FLOOR

LINE_COLUMNS = ("flux_hbeta", "flux_oiii5007", "flux_halpha", "flux_nii6583")


def rules(mass_weight: str = "current") -> dict[str, list[Any]]:
    """Output column -> sidecar aggregation rule, in the truth table's column order.

    Parameters
    ----------
    mass_weight : str
        ``current`` (living + remnant mass, column ``mstar_msun``), ``initial``
        (``minit_msun``) or ``none`` (no mass known: the mass-weighted truths are NaN): the
        mass that weights age and [M/H].
    """
    weight = {"current": "mstar_msun", "initial": "minit_msun", "none": "minit_msun"}[
        mass_weight]
    return {
        "galaxy_type": ["first", "galaxy_type"],
        "library": ["first", "library"],
        "mass_weight": ["first", "mass_weight"],
        "n_spaxels": ["count"],
        "age_mw_gyr": ["wmean", "age_mw_gyr", weight],
        "mh_mw": ["wmean", "mh_mw", weight],
        "log_age_lw": ["wmean", "log_age_lw", "l_window_lsun_aa"],
        "mh_lw": ["wmean", "mh_lw", "l_window_lsun_aa"],
        "log_ml_r": ["log10_ratio", "mstar_msun", "l_r_lsun"],
        "ebv_star": ["wmean", "ebv_star", "l_r_lsun"],
        "ebv_gas": ["wmean", "ebv_gas", "l_r_lsun"],
        "vel_kms": ["wmean", "vel_kms", "l_r_lsun"],
        "sigma_kms": ["wmean", "sigma_kms", "l_r_lsun"],
        # What one Gaussian fitted to the bin's summed spectrum measures: the spaxels'
        # dispersions and the spread of their velocities across the bin.
        "sigma_bin_kms": ["wdispersion", "sigma_kms", "vel_kms", "l_r_lsun"],
        "mstar_msun": ["sum", "mstar_msun"],
        "minit_msun": ["sum", "minit_msun"],
        "sfr_msun_yr": ["sum", "sfr_msun_yr"],
        "radius_re": ["mean", "radius_re"],
        **{c: ["sum", c] for c in LINE_COLUMNS},
        "log_ssfr": ["log10_ratio", "sfr_msun_yr", "mstar_msun", LOG_SSFR_FLOOR],
        "d_bpt": ["d_bpt", "flux_nii6583", "flux_halpha", "flux_oiii5007", "flux_hbeta"],
    }


RULES: dict[str, list[Any]] = rules("current")
