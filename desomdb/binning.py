"""Per-spaxel S/N and Voronoi binning (Cappellari & Copin 2003 via ``vorbin``).

Conventions
-----------
- Spaxel S/N is the mean S/N per spectral pixel in the SDSS g band: signal = g-response-
  weighted mean flux, noise = g-response-weighted mean 1σ error (the MaNGA DAP's choice).
- Binned noise is the quadrature sum times the Law et al. (2016) covariance factor
  ``1 + 1.62 log10(n)`` for n < 100 spaxels and 4.2 for n ≥ 100.
- Spaxels with S/N < ``min_snr`` (default 2) are dropped before binning, as the paper did.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LAW_ALPHA = 1.62
LAW_N_MAX = 100
LAW_LARGE_N = 4.2


def law_correction(n_spaxels: np.ndarray | int) -> np.ndarray:
    """Noise underestimate of an n-spaxel sum (Law et al. 2016, as the paper applies it).

    Parameters
    ----------
    n_spaxels : int or ndarray
        Number of spaxels combined (>= 1).

    Returns
    -------
    ndarray
        Multiply the quadrature-summed noise by this.
    """
    n = np.asarray(n_spaxels, dtype=float)
    return np.asarray(np.where(n < LAW_N_MAX, 1.0 + LAW_ALPHA * np.log10(np.maximum(n, 1)),
                               LAW_LARGE_N))


@lru_cache(maxsize=2)
def _g_response(wave_key: tuple[float, float, int]) -> np.ndarray:
    from importlib import resources

    from ppxf import ppxf_util

    lo, hi, n = wave_key
    wave = np.geomspace(lo, hi, n)
    filters = str(resources.files("ppxf").joinpath("examples", "FILTER.RES.txt"))
    lam, resp = ppxf_util.read_filter("SDSS/g", filters)
    return np.asarray(np.interp(wave, lam, resp, left=0.0, right=0.0))


def g_band_weights(wave_aa: np.ndarray) -> np.ndarray:
    """SDSS g response at each wavelength (observed frame), shape like ``wave_aa``."""
    key = (float(wave_aa[0]), float(wave_aa[-1]), int(wave_aa.size))
    return _g_response(key)


def spaxel_signal_noise(
    flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, wave_aa: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """g-band signal and noise of every spaxel.

    Parameters
    ----------
    flux, ivar : ndarray, shape (n_wave, n_y, n_x)
    good : ndarray of bool, shape (n_wave, n_y, n_x)
    wave_aa : ndarray, shape (n_wave,)
        Observed wavelength, Å.

    Returns
    -------
    signal, noise : ndarray, shape (n_y, n_x)
        Response-weighted mean flux and mean 1σ error per pixel; 0 and inf where no good
        pixel falls in the band.
    """
    w = g_band_weights(wave_aa)
    band = w > 0
    wb = w[band][:, None, None] * good[band]
    wsum = wb.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(good[band], 1.0 / np.sqrt(np.where(ivar[band] > 0, ivar[band], 1.0)), 0.0)
        signal = np.where(wsum > 0, (wb * flux[band]).sum(axis=0) / wsum, 0.0)
        noise = np.where(wsum > 0, (wb * sigma).sum(axis=0) / wsum, np.inf)
    return signal, noise


def binned_snr(signal: np.ndarray, noise: np.ndarray) -> float:
    """S/N of the sum of spaxels with the covariance correction."""
    n = signal.size
    return float(np.sum(signal) / (np.sqrt(np.sum(noise**2)) * law_correction(n)))


def _sn_func(index: np.ndarray, signal: np.ndarray, noise: np.ndarray) -> float:
    return binned_snr(signal[index], noise[index])


@dataclass
class Binning:
    """Result of :func:`voronoi_bins`.

    Attributes
    ----------
    bin_id : ndarray of int, shape (n_y, n_x)
        Bin of every spaxel, -1 for spaxels not binned (masked or S/N < min_snr).
    snr : ndarray, shape (n_bins,)
        Covariance-corrected S/N of each bin.
    n_spaxels : ndarray of int, shape (n_bins,)
    method : str
        ``voronoi``, ``unbinned`` (every spaxel above target) or ``single`` (total S/N
        below target: one bin).
    """

    bin_id: np.ndarray
    snr: np.ndarray
    n_spaxels: np.ndarray
    method: str

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(self.snr.size)


def voronoi_bins(
    signal: np.ndarray,
    noise: np.ndarray,
    target_snr: float = 20.0,
    min_snr: float = 2.0,
) -> Binning:
    """Voronoi-bin a spaxel grid to ``target_snr``.

    Parameters
    ----------
    signal, noise : ndarray, shape (n_y, n_x)
        From :func:`spaxel_signal_noise`.
    target_snr : float
        Target binned S/N (covariance-corrected).
    min_snr : float
        Spaxels below this S/N are excluded first.

    Returns
    -------
    Binning
        With no bins if no spaxel reaches ``min_snr``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        sn = np.where(np.isfinite(noise) & (noise > 0), signal / noise, 0.0)
    use = sn >= min_snr
    bin_id = np.full(signal.shape, -1, dtype=np.int32)
    yy, xx = np.nonzero(use)
    s, n = signal[use].astype(float), noise[use].astype(float)
    if s.size == 0:
        return Binning(bin_id, np.zeros(0), np.zeros(0, dtype=np.int32), "empty")
    method = "voronoi"
    if s.size == 1 or binned_snr(s, n) < target_snr:
        classes = np.zeros(s.size, dtype=int)
        method = "single"
    elif np.all(s / n >= target_snr):
        classes = np.arange(s.size)
        method = "unbinned"
    else:
        with warnings.catch_warnings():
            # vorbin >= 3.2 announces its successor at import and on every call.
            warnings.filterwarnings("ignore", message=".*PowerBin.*")
            from vorbin.voronoi_2d_binning import voronoi_2d_binning

            try:
                classes = voronoi_2d_binning(
                    xx.astype(float), yy.astype(float), s, n, target_snr,
                    plot=False, quiet=True, pixelsize=1.0, sn_func=_sn_func,
                )[0]
            except (ValueError, IndexError):
                # vorbin's edge cases: "not enough S/N in the whole set", or accretion that
                # makes no bin reach 80 % of the target (IndexError in _reassign_bad_bins).
                # Like the MaNGA DAP, fall back to a single bin.
                classes = np.zeros(s.size, dtype=int)
                method = "single"
    # Renumber bins 0..n-1 in order of first appearance along the sorted spaxels.
    _, classes = np.unique(classes, return_inverse=True)
    bin_id[yy, xx] = classes
    n_bins = int(classes.max()) + 1
    snr = np.array([binned_snr(s[classes == k], n[classes == k]) for k in range(n_bins)])
    counts = np.bincount(classes, minlength=n_bins).astype(np.int32)
    return Binning(bin_id, snr, counts, method)
