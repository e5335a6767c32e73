"""Emission-line labels of one pPXF fit: line fluxes, S/N, A/N, EW(Hα) and what they give.

:func:`measure_lines` reads the four lines the labels keep (Hβ, [OIII]5007, Hα, [NII]6583)
off a finished pPXF fit; :func:`derive` turns them into E(B-V)_gas (raw and published),
log sSFR, d_BPT, the BPT class and their flags. The conventions (line gate, flags, the
decrement floor) are in :mod:`desomdb.science.emission`; the column meanings in
:mod:`desomdb.pipeline.labels`.

Why errors are more than pPXF's formal ones
-------------------------------------------
- Local residuals: the formal error is scaled by the larger of sqrt(χ²_red) and the robust
  rms of (data − model) / noise within ±50 Å of the line, so a badly matched stretch of
  continuum widens the error of the lines in it.
- Template mismatch under Balmer lines: a weak Balmer emission line measured inside a deep
  stellar absorption trough is only as certain as that trough's depth in the templates.
  :data:`MISMATCH_FRACTION` of the absorption flux under the line (Lick-style
  pseudo-continuum, :func:`desomdb.science.emission.absorption_flux`) is added in quadrature. Its
  size was measured with a second real library: fitting the 10 pure BC03 SSPs (0.29-10 Gyr,
  [M/H] -0.4 and 0; S/N 150, no emission) with the MIUSCAT fitting templates leaves spurious
  "emission" of rms 0.21 (Hβ) and 0.04 (Hα) of the absorption flux, up to 0.52 for Hβ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from desomdb.science import dust, emission

#: Label key -> emission.LINES_AA name of the four lines stored in the labels table.
LINE_KEYS = {"hb": "Hbeta", "oiii5007": "OIII5007", "ha": "Halpha", "nii6583": "NII6583"}
_PPXF_NAMES = {"hb": "Hbeta", "oiii5007": "[OIII]5007_d", "ha": "Halpha",
               "nii6583": "[NII]6583_d"}
_DOUBLET_STRONG = 1 / 1.33  # pPXF's [OIII], [NII] doublet templates: weak line at 0.33
LINE_WINDOW_AA = 50.0  # half-width of the window for a line's local residual noise
LINE_CORE_AA = 5.0  # half-width in which a line's fitted peak amplitude is read
EW_WINDOW_AA = 60.0  # half-width of the stellar-continuum window for EW(Hα)
#: Fraction of the stellar Balmer absorption flux under a line added (in quadrature) to the
#: line's flux error (see the module docstring).
MISMATCH_FRACTION = {"hb": 0.2, "ha": 0.04}
#: E(B-V)_* -> E(B-V)_gas when the Balmer decrement is unusable (Calzetti et al. 2000).
STARS_TO_GAS = 1 / 0.44


def measure_lines(pp: Any, wave: np.ndarray, residual: np.ndarray, noise: np.ndarray,
                  stellar: np.ndarray, good: np.ndarray, norm_flux: float,
                  chi2: float) -> dict[str, Any]:
    """Measure fluxes, errors, S/N and A/N of the four lines, and EW(Hα), from a pPXF fit.

    Parameters
    ----------
    pp : ppxf.ppxf.ppxf
        The finished fit (its ``gas_flux``, ``gas_flux_error``, ``gas_bestfit_templates``).
    wave : ndarray, shape (4544,)
        Rest-frame vacuum wavelength, Å.
    residual : ndarray, shape (4544,)
        Data − best fit in normalised units, NaN on masked bins.
    noise : ndarray, shape (4544,)
        The noise given to pPXF (normalised units).
    stellar : ndarray, shape (4544,)
        The stellar part of the best fit (normalised units).
    good : ndarray of bool, shape (4544,)
        Bins the fit used.
    norm_flux : float
        Normalisation of the spectrum, 1e-17 erg/s/cm^2/Å.
    chi2 : float
        Reduced χ² of the fit.

    Returns
    -------
    dict
        ``flux_<k>``, ``flux_<k>_err`` (1e-17 erg/s/cm^2), ``sn_<k>``, ``an_<k>`` for the
        four keys of :data:`LINE_KEYS`, and ``ew_ha`` (Å).
    """
    out: dict[str, Any] = {}
    dlnlam = np.log(wave[1] / wave[0])
    names = list(pp.gas_names)
    for key, pname in _PPXF_NAMES.items():
        j = names.index(pname)
        lam = emission.LINES_AA[LINE_KEYS[key]]
        near = good & (np.abs(wave - lam) < LINE_WINDOW_AA)
        rms = floor = np.nan
        if near.any():
            resid = residual[near]
            rms = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
            floor = float(np.median(noise[near]))
        err_scale = float(np.nanmax([1.0, np.sqrt(chi2), rms / floor]))
        share = _DOUBLET_STRONG if pname.endswith("_d") else 1.0
        f = float(pp.gas_flux[j]) * lam * dlnlam * norm_flux * share
        e = float(pp.gas_flux_error[j]) * lam * dlnlam * norm_flux * share * err_scale
        if key in MISMATCH_FRACTION:
            absorbed = emission.absorption_flux(wave, stellar, key) * norm_flux
            e = float(np.hypot(e, MISMATCH_FRACTION[key] * absorbed))
        core = np.abs(wave - lam) < LINE_CORE_AA
        amp = float(pp.gas_bestfit_templates[core, j].max())
        out[f"flux_{key}"], out[f"flux_{key}_err"] = f, e
        out[f"sn_{key}"] = f / e if e > 0 else np.nan
        level = np.nanmax([rms, floor])
        out[f"an_{key}"] = amp / level if level > 0 else np.nan
    ha_cont = np.abs(wave - dust.HALPHA_AA) < EW_WINDOW_AA
    cont = float(np.median(stellar[ha_cont])) * norm_flux
    out["ew_ha"] = out["flux_ha"] / cont if cont > 0 else np.nan
    return out


def derive(row: dict[str, Any], gate: emission.LineGate, lum_per_flux: float,
           mstar: float) -> dict[str, Any]:
    """Derive E(B-V)_gas, log sSFR, d_BPT, the BPT class and their flags.

    Parameters
    ----------
    row : dict
        The line measurements of :func:`measure_lines` and ``ebv_star`` (mag).
    gate : LineGate
        When a line counts as detected.
    lum_per_flux : float
        4π D_L² × 1e-17: erg/s per unit of line flux.
    mstar : float
        Stellar mass of the fit, M_sun (living + remnants).

    Returns
    -------
    dict
        ``ebv_gas_raw``, ``ebv_gas_raw_err``, ``ebv_gas``, ``ebv_gas_flags``, ``log_ssfr``,
        ``ssfr_flags``, ``d_bpt``, ``d_bpt_flags``, ``bpt_class``.
    """
    flags = {k: emission.line_flags(k, row[f"sn_{k}"], row[f"an_{k}"], gate) for k in LINE_KEYS}
    balmer = emission.balmer_reddening(row["flux_ha"], row["flux_ha_err"], row["flux_hb"],
                                       row["flux_hb_err"], flags["ha"], flags["hb"])
    out: dict[str, Any] = {"ebv_gas_raw": balmer.raw, "ebv_gas_raw_err": balmer.raw_err,
                           "ebv_gas": balmer.published, "ebv_gas_flags": int(balmer.flags)}
    if np.isfinite(balmer.published):
        ebv_corr, ssfr_flags = balmer.published, flags["ha"] | balmer.flags
    else:
        ebv_corr = max(row["ebv_star"] * STARS_TO_GAS, 0.0)
        ssfr_flags = flags["ha"] | emission.GasFlag.DUST_FROM_STARS
    ha_corr = row["flux_ha"] / float(dust.nebular_transmission(dust.HALPHA_AA, ebv_corr)[0])
    sfr = float(emission.sfr_from_halpha(ha_corr * lum_per_flux))
    out["log_ssfr"] = float(np.log10(sfr / mstar)) if sfr > 0 and mstar > 0 else np.nan
    out["ssfr_flags"] = int(ssfr_flags)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log10(row["flux_nii6583"] / row["flux_ha"])
        y = np.log10(row["flux_oiii5007"] / row["flux_hb"])
    out["d_bpt"] = float(emission.d_bpt(x, y)[0])
    bpt_flags = flags["hb"] | flags["oiii5007"] | flags["ha"] | flags["nii6583"]
    out["d_bpt_flags"] = int(bpt_flags)
    out["bpt_class"] = emission.bpt_class(x, y)[0] if bpt_flags == 0 else None
    return out
