"""Emission lines, the BPT distance d_BPT and the Hα star-formation calibration.

Conventions
-----------
- Vacuum rest wavelengths, Å (pPXF ``emission_lines(vacuum=True)`` values).
- SFR from Hα: Kennicutt (1998), SFR [M_sun/yr] = 7.9e-42 L(Hα) [erg/s], for a Salpeter IMF,
  matching the Salpeter-like (unimodal 1.30) MIUSCAT templates. It traces star formation over
  the last ~10 Myr; the mock survey ties Hα to the instantaneous SFR of its analytic SFH.
- d_BPT: signed shortest distance (dex) in the log([NII]6583/Hα) - log([OIII]5007/Hβ) plane
  from the Kauffmann et al. (2003) curve y = 0.61 / (x - 0.05) + 1.3; negative below/left
  (star-forming), positive above/right (composite, then AGN/LINER at d_BPT ≳ 0.3).
- BPT class (:func:`bpt_class`): ``star_forming`` below Kauffmann et al. (2003),
  ``composite`` between it and Kewley et al. (2001) y = 0.61 / (x - 0.47) + 1.19, ``agn``
  above Kewley (Seyferts and LINERs alike: the [NII] diagram alone does not split them).
- Line gate (:class:`LineGate`, :func:`line_flags`): a line counts as detected when its flux
  S/N ≥ ``sn_min`` (3) *and* its amplitude over the local residual noise A/N ≥ ``an_min``.
  The residual noise (robust rms of data − best fit within ±50 Å of the line) includes
  template mismatch, so a weak Hβ "emission" that only fills a badly matched Balmer
  absorption trough fails A/N even when its formal S/N passes.
- Published E(B-V)_gas (:func:`balmer_reddening`): only where Hα and Hβ both pass the gate.
  A decrement below the case-B 2.86 (Osterbrock & Ferland 2006; dust cannot lower Hα/Hβ)
  is published as 0 with :attr:`GasFlag.DECREMENT_BELOW_INTRINSIC`; the unclipped value
  and its error stay in ``ebv_gas_raw`` / ``ebv_gas_raw_err`` for every fit with positive
  Hα and Hβ.
- Flags (:class:`GasFlag`, an integer bit mask per derived quantity): each quantity carries
  the bits of the lines and corrections it was built from, so ``ebv_gas_flags = 0``,
  ``ssfr_flags = 0``, ``d_bpt_flags = 0`` mean "built from gated detections only".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

#: Vacuum rest wavelengths (Å) of the lines the mock emits and the labels fit.
LINES_AA: dict[str, float] = {
    "OII3726": 3727.09,
    "OII3729": 3729.88,
    "Hdelta": 4102.89,
    "Hgamma": 4341.69,
    "Hbeta": 4862.68,
    "OIII4959": 4960.30,
    "OIII5007": 5008.24,
    "OI6300": 6302.05,
    "NII6548": 6549.86,
    "Halpha": 6564.61,
    "NII6583": 6585.27,
    "SII6716": 6718.29,
    "SII6731": 6732.67,
}

#: Case-B Balmer ratios relative to Hβ (T = 10^4 K, n_e = 100 cm^-3).
BALMER_TO_HBETA = {"Hdelta": 0.259, "Hgamma": 0.468, "Hbeta": 1.0, "Halpha": 2.86}

KENNICUTT98_SFR_PER_LHA = 7.9e-42  # M_sun/yr per erg/s, Salpeter IMF

_KAUFFMANN_X_MAX = 0.05
_KEWLEY_X_MAX = 0.47


class GasFlag(enum.IntFlag):
    """Why an emission-line quantity is less than a clean measurement (bit mask)."""

    HB_LOW_SN = 1
    HB_NOT_DETECTED = 2  # amplitude over residual noise below LineGate.an_min
    HA_LOW_SN = 4
    HA_NOT_DETECTED = 8
    OIII_LOW_SN = 16
    OIII_NOT_DETECTED = 32
    NII_LOW_SN = 64
    NII_NOT_DETECTED = 128
    DECREMENT_BELOW_INTRINSIC = 256  # Hα/Hβ < 2.86: E(B-V)_gas published as 0
    DUST_FROM_STARS = 512  # Hα corrected with E(B-V)_* / 0.44 (Balmer decrement unusable)


#: Line key (as in labels: hb, oiii5007, ha, nii6583) -> its (low S/N, not detected) bits.
LINE_BITS: dict[str, tuple[GasFlag, GasFlag]] = {
    "hb": (GasFlag.HB_LOW_SN, GasFlag.HB_NOT_DETECTED),
    "oiii5007": (GasFlag.OIII_LOW_SN, GasFlag.OIII_NOT_DETECTED),
    "ha": (GasFlag.HA_LOW_SN, GasFlag.HA_NOT_DETECTED),
    "nii6583": (GasFlag.NII_LOW_SN, GasFlag.NII_NOT_DETECTED),
}


@dataclass(frozen=True)
class LineGate:
    """When an emission line counts as detected (see the module docstring).

    Attributes
    ----------
    sn_min : float
        Minimum flux S/N (flux over its error).
    an_min : float
        Minimum peak amplitude over the robust rms of the fit residuals near the line.
    """

    sn_min: float = 3.0
    an_min: float = 3.0


def line_flags(key: str, sn: float, an: float, gate: LineGate) -> GasFlag:
    """Return one line's flags: low S/N and/or not detected (NaN counts as failing)."""
    low, undetected = LINE_BITS[key]
    flags = GasFlag(0)
    if not sn >= gate.sn_min:
        flags |= low
    if not an >= gate.an_min:
        flags |= undetected
    return flags


@dataclass(frozen=True)
class BalmerReddening:
    """Nebular E(B-V) from one Balmer decrement (mag); see :func:`balmer_reddening`."""

    raw: float
    raw_err: float
    published: float
    flags: GasFlag


def balmer_reddening(ha: float, ha_err: float, hb: float, hb_err: float,
                     flags_ha: GasFlag, flags_hb: GasFlag) -> BalmerReddening:
    """Raw and published nebular E(B-V) from Hα and Hβ (Cardelli 1989, intrinsic 2.86).

    Parameters
    ----------
    ha, ha_err, hb, hb_err : float
        Observed line fluxes and their errors, any common unit.
    flags_ha, flags_hb : GasFlag
        :func:`line_flags` of the two lines.

    Returns
    -------
    BalmerReddening
        ``raw`` (NaN unless both fluxes > 0) with its propagated error; ``published`` = raw
        where both lines pass the gate, 0 where that raw value is negative (flag
        ``DECREMENT_BELOW_INTRINSIC``), NaN where a line fails.
    """
    from desomdb.science import dust

    raw = float(dust.ebv_gas_from_balmer(ha, hb))
    dk = float(dust.cardelli_k(dust.HBETA_AA) - dust.cardelli_k(dust.HALPHA_AA))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.hypot(ha_err / ha, hb_err / hb) if ha > 0 and hb > 0 else np.nan
    raw_err = float(2.5 / (dk * np.log(10)) * rel)
    flags = flags_ha | flags_hb
    published = np.nan
    if flags == 0 and np.isfinite(raw):
        published = max(raw, 0.0)
        if raw < 0:
            flags |= GasFlag.DECREMENT_BELOW_INTRINSIC
    return BalmerReddening(raw, raw_err, float(published), flags)


#: Pseudo-continuum bands (blue, central, red; vacuum Å) that measure the stellar Balmer
#: absorption under a line: Lick Hβ (Worthey et al. 1994, air + 1.36 Å) and, for Hα, bands
#: of the same design clear of [NII] and [SII].
BALMER_ABSORPTION_BANDS_AA: dict[str, tuple[tuple[float, float], ...]] = {
    "hb": ((4829.2, 4849.2), (4849.2, 4878.0), (4878.0, 4893.0)),
    "ha": ((6490.0, 6530.0), (6545.0, 6585.0), (6600.0, 6640.0)),
}


def absorption_flux(wave_aa: np.ndarray, stellar: np.ndarray, key: str) -> float:
    """Flux missing from a stellar spectrum under a Balmer line, against its pseudo-continuum.

    Parameters
    ----------
    wave_aa : ndarray, shape (n_pix,)
        Rest-frame vacuum wavelength, Å (log-spaced).
    stellar : ndarray, shape (n_pix,)
        Stellar model (no emission), any flux-density unit.
    key : str
        ``hb`` or ``ha``.

    Returns
    -------
    float
        Integrated absorption (flux-density unit × Å; positive = absorption), 0 if none.
    """
    (b0, b1), (c0, c1), (r0, r1) = BALMER_ABSORPTION_BANDS_AA[key]
    blue = (wave_aa >= b0) & (wave_aa < b1)
    red = (wave_aa >= r0) & (wave_aa < r1)
    cen = (wave_aa >= c0) & (wave_aa < c1)
    if not (blue.any() and red.any() and cen.any()):
        return np.nan
    xb, xr = 0.5 * (b0 + b1), 0.5 * (r0 + r1)
    yb, yr = float(np.mean(stellar[blue])), float(np.mean(stellar[red]))
    cont = yb + (yr - yb) * (wave_aa[cen] - xb) / (xr - xb)
    dlam = wave_aa[cen] * np.log(wave_aa[1] / wave_aa[0])
    return float(max(np.sum((cont - stellar[cen]) * dlam), 0.0))


def kewley01(log_nii_ha: np.ndarray) -> np.ndarray:
    """Kewley et al. (2001) maximum-starburst line, log([OIII]/Hβ) vs log([NII]/Hα).

    Defined for ``log_nii_ha < 0.47``; NaN elsewhere.
    """
    x = np.asarray(log_nii_ha, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < _KEWLEY_X_MAX, 0.61 / (x - _KEWLEY_X_MAX) + 1.19, np.nan)


def bpt_class(log_nii_ha: np.ndarray | float, log_oiii_hb: np.ndarray | float) -> np.ndarray:
    """Classify points of the [NII] BPT diagram (Kauffmann 2003 and Kewley 2001 lines).

    Parameters
    ----------
    log_nii_ha, log_oiii_hb : float or ndarray, shape (n,)
        log10([NII]6583/Hα) and log10([OIII]5007/Hβ).

    Returns
    -------
    ndarray of object, shape (n,)
        ``star_forming``, ``composite``, ``agn``, or None where a ratio is not finite.
    """
    x, y = np.broadcast_arrays(np.atleast_1d(np.asarray(log_nii_ha, dtype=float)),
                               np.atleast_1d(np.asarray(log_oiii_hb, dtype=float)))
    out = np.full(x.shape, None, dtype=object)
    ok = np.isfinite(x) & np.isfinite(y)
    below_k03 = (x < _KAUFFMANN_X_MAX) & (y < np.nan_to_num(kauffmann03(x), nan=np.inf))
    below_k01 = (x < _KEWLEY_X_MAX) & (y < np.nan_to_num(kewley01(x), nan=np.inf))
    out[ok & below_k03] = "star_forming"
    out[ok & ~below_k03 & below_k01] = "composite"
    out[ok & ~below_k01] = "agn"
    return out


def kauffmann03(log_nii_ha: np.ndarray) -> np.ndarray:
    """Kauffmann et al. (2003) demarcation, log([OIII]/Hβ) as a function of log([NII]/Hα).

    Defined for ``log_nii_ha < 0.05``; NaN elsewhere.
    """
    x = np.asarray(log_nii_ha, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < _KAUFFMANN_X_MAX, 0.61 / (x - _KAUFFMANN_X_MAX) + 1.3, np.nan)


def d_bpt(log_nii_ha: np.ndarray | float, log_oiii_hb: np.ndarray | float) -> np.ndarray:
    """Signed perpendicular distance from the Kauffmann et al. (2003) curve.

    With u = x - 0.05 and v = y - 1.3, the curve is v = 0.61/t at t = u_curve < 0, and the
    foot of the perpendicular solves t^4 - u t^3 + 0.61 v t - 0.61^2 = 0. The real negative
    roots (batched companion-matrix eigenvalues) give the exact shortest distance.

    Parameters
    ----------
    log_nii_ha : float or ndarray, shape (n,)
        log10([NII]6583 / Hα).
    log_oiii_hb : float or ndarray, shape (n,)
        log10([OIII]5007 / Hβ).

    Returns
    -------
    ndarray, shape (n,)
        d_BPT in dex: < 0 star-forming side, > 0 above/right of the curve. NaN where either
        ratio is not finite.
    """
    x, y = np.broadcast_arrays(
        np.atleast_1d(np.asarray(log_nii_ha, dtype=float)),
        np.atleast_1d(np.asarray(log_oiii_hb, dtype=float)),
    )
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    u = x[ok] - _KAUFFMANN_X_MAX
    v = y[ok] - 1.3
    a = 0.61
    companion = np.zeros((u.size, 4, 4))
    companion[:, 0, 0] = u
    companion[:, 0, 2] = -a * v
    companion[:, 0, 3] = a**2
    companion[:, 1, 0] = companion[:, 2, 1] = companion[:, 3, 2] = 1.0
    roots = np.linalg.eigvals(companion) if u.size else np.zeros((0, 4), complex)
    t = roots.real
    usable = (np.abs(roots.imag) <= 1e-7 * (1 + np.abs(t))) & (t < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist2 = np.where(usable, (u[:, None] - t) ** 2 + (v[:, None] - a / t) ** 2, np.inf)
    dist = np.sqrt(dist2.min(axis=1))
    above = (u >= 0) | (v > a / np.minimum(u, -1e-12))
    out[ok] = np.where(above, dist, -dist)
    return out


def sfr_from_halpha(l_halpha_erg_s: np.ndarray | float) -> np.ndarray:
    """Star formation rate (M_sun/yr) from a dust-corrected Hα luminosity (Kennicutt 1998)."""
    return np.asarray(l_halpha_erg_s, dtype=float) * KENNICUTT98_SFR_PER_LHA


def halpha_from_sfr(sfr_msun_yr: np.ndarray | float) -> np.ndarray:
    """Intrinsic Hα luminosity (erg/s) of a star formation rate (M_sun/yr), Kennicutt 1998."""
    return np.asarray(sfr_msun_yr, dtype=float) / KENNICUTT98_SFR_PER_LHA
