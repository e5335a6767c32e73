"""Dust laws used by the mock survey, ingest and the labels (one place for all three).

Conventions
-----------
- Stellar continuum: Calzetti et al. (2000) attenuation, R_V = 4.05, as implemented by pPXF
  (``ppxf.ppxf.attenuation``) so the mock and the pPXF fits use the same curve.
- Nebular lines: Cardelli, Clayton & Mathis (1989), R_V = 3.1 (``dust_extinction.CCM89``);
  the Balmer decrement assumes case B, intrinsic Hα/Hβ = 2.86.
- Milky-Way foreground: Fitzpatrick (1999), R_V = 3.1 (``dust_extinction.F99``), with the
  cube header's EBVGAL.
All wavelengths are vacuum Å; ``k(λ) = A_λ / E(B-V)``.
"""

from __future__ import annotations

from functools import lru_cache

import astropy.units as u
import numpy as np
from dust_extinction.parameter_averages import CCM89, F99

CALZETTI_RV = 4.05
BALMER_INTRINSIC = 2.86
HALPHA_AA = 6564.61
HBETA_AA = 4862.68


def calzetti_transmission(lam_rest_aa: np.ndarray, ebv_star: float | np.ndarray) -> np.ndarray:
    """Fraction of stellar light transmitted through Calzetti (2000) dust.

    Parameters
    ----------
    lam_rest_aa : ndarray, shape (n_pix,)
        Rest-frame wavelength, Å.
    ebv_star : float or ndarray, shape (n,)
        Stellar colour excess E(B-V)_*, mag.

    Returns
    -------
    ndarray, shape (n_pix,) or (n, n_pix)
        Multiplicative transmission in (0, 1].
    """
    from ppxf.ppxf import attenuation

    # pPXF parametrises by A_V; A_V = R_V gives E(B-V) = 1, hence k(λ) directly.
    k = -2.5 * np.log10(attenuation(np.asarray(lam_rest_aa, float), CALZETTI_RV))
    ebv = np.asarray(ebv_star, dtype=float)
    return np.asarray(10.0 ** (-0.4 * np.multiply.outer(ebv, k)))


def cardelli_k(lam_aa: np.ndarray | float) -> np.ndarray:
    """Cardelli et al. (1989) k(λ) = A_λ/E(B-V) for R_V = 3.1.

    Parameters
    ----------
    lam_aa : float or ndarray
        Vacuum wavelength, Å (1000-33000 Å).

    Returns
    -------
    ndarray
        k(λ), same shape as ``lam_aa``.
    """
    lam = np.atleast_1d(np.asarray(lam_aa, dtype=float))
    if lam.size <= _FEW_LINES:  # a few line wavelengths, asked for in every labels fit
        return np.asarray(_cardelli_k_lines(tuple(lam.ravel().tolist()))).reshape(
            np.shape(lam_aa))
    return np.asarray(3.1 * CCM89(Rv=3.1)(lam * u.AA)).reshape(np.shape(lam_aa))


_FEW_LINES = 16


@lru_cache(maxsize=256)
def _cardelli_k_lines(lam_aa: tuple[float, ...]) -> tuple[float, ...]:
    """Cardelli k(λ) of a few wavelengths (Å), cached: astropy units cost ~1 ms a call."""
    k = 3.1 * CCM89(Rv=3.1)(np.asarray(lam_aa) * u.AA)
    return tuple(float(v) for v in np.atleast_1d(k))


def ebv_gas_from_balmer(
    halpha: np.ndarray | float, hbeta: np.ndarray | float
) -> np.ndarray:
    """Nebular E(B-V) from the Balmer decrement (Cardelli 1989, intrinsic Hα/Hβ = 2.86).

    Parameters
    ----------
    halpha, hbeta : float or ndarray
        Observed (attenuated) Hα and Hβ fluxes, any common unit.

    Returns
    -------
    ndarray
        E(B-V)_gas in mag; NaN where either flux is not positive. Negative values (decrement
        below 2.86, i.e. noise) are kept, not clipped.
    """
    ha = np.asarray(halpha, dtype=float)
    hb = np.asarray(hbeta, dtype=float)
    dk = float(cardelli_k(HBETA_AA) - cardelli_k(HALPHA_AA))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((ha > 0) & (hb > 0), ha / hb, np.nan)
        return np.asarray(2.5 / dk * np.log10(ratio / BALMER_INTRINSIC))


def nebular_transmission(lam_aa: np.ndarray | float, ebv_gas: float | np.ndarray) -> np.ndarray:
    """Transmission of nebular line flux through Cardelli (1989) dust.

    Parameters
    ----------
    lam_aa : float or ndarray, shape (n_lines,)
        Rest-frame vacuum wavelength of each line, Å.
    ebv_gas : float or ndarray, shape (n,)
        Nebular colour excess, mag.

    Returns
    -------
    ndarray, shape (n_lines,) or (n, n_lines)
    """
    k = cardelli_k(np.atleast_1d(np.asarray(lam_aa, dtype=float)))
    return np.asarray(10.0 ** (-0.4 * np.multiply.outer(np.asarray(ebv_gas, float), k)))


def milky_way_transmission(lam_obs_aa: np.ndarray, ebv_gal: float) -> np.ndarray:
    """Milky-Way foreground transmission, Fitzpatrick (1999), R_V = 3.1.

    Parameters
    ----------
    lam_obs_aa : ndarray, shape (n_pix,)
        Observed-frame vacuum wavelength, Å.
    ebv_gal : float
        Foreground colour excess (cube header EBVGAL), mag.

    Returns
    -------
    ndarray, shape (n_pix,)
        Divide observed fluxes by this to correct for the foreground.
    """
    lam = np.asarray(lam_obs_aa, dtype=float)
    a_over_ebv = 3.1 * np.asarray(F99(Rv=3.1)(lam * u.AA))
    return np.asarray(10.0 ** (-0.4 * ebv_gal * a_over_ebv))
