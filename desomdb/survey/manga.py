"""The MaNGA survey adapter: wavelength grid, resolution, mask bits, HDU and file names.

Everything instrument-specific lives here; the archive and the network know nothing of
MaNGA. Facts from the SDSS data model (``mangaCube``, ``drpall``) for DR15 (DRP v2_4_3) and
DR17 (DRP v3_1_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from desomdb import constants
from desomdb.errors import ConfigError

#: LOGCUBE spectral grid: vacuum Å, log10-spaced.
N_WAVE = 4563
WAVE0_AA = 3621.59598486
DLOG10 = 1e-4
C_KMS = constants.C_KMS
SPAXEL_ARCSEC = 0.5
FLUX_UNIT = "1E-17 erg/s/cm^2/Ang/spaxel"

#: MANGA_DRP3PIXMASK bits.
NOCOV = 1 << 0
LOWCOV = 1 << 1
DEADFIBER = 1 << 2
FORESTAR = 1 << 3
DONOTUSE = 1 << 10
#: Bits that make a pixel unusable for science (the DAP drops DONOTUSE and FORESTAR; the
#: archive is stricter and also drops dead-fibre and low-coverage pixels).
BAD_PIXEL_BITS = NOCOV | LOWCOV | DEADFIBER | FORESTAR | DONOTUSE
#: DRP3QUAL bit 30: the whole cube is unusable.
DRP3QUAL_CRITICAL = 1 << 30

#: IFU bundle size (fibres) -> (cube grid size in spaxels, hexagon flat-to-flat diameter ").
IFU_GEOMETRY: dict[int, tuple[int, float]] = {
    19: (32, 12.5),
    37: (42, 17.5),
    61: (52, 22.5),
    91: (64, 27.5),
    127: (74, 32.5),
}


@dataclass(frozen=True)
class Release:
    """A MaNGA data release: its DRP version and HDU naming."""

    name: str
    drp_version: str
    lsf_post: str
    lsf_pre: str
    #: Position in the survey's sequence (later releases are larger). Recorded with every
    #: ``cubes`` row, so "newest release" never depends on how names sort ("DR9" > "DR17").
    ordinal: int

    @property
    def drpall_name(self) -> str:
        """File name of the release's drpall summary table."""
        return f"drpall-{self.drp_version}.fits"


RELEASES: dict[str, Release] = {
    "DR15": Release("DR15", "v2_4_3", "DISP", "PREDISP", 15),
    "DR17": Release("DR17", "v3_1_1", "LSFPOST", "LSFPRE", 17),
}


def release(name: str) -> Release:
    """Look up a release by name (``DR15`` or ``DR17``).

    Raises
    ------
    ConfigError
        For an unknown release name.
    """
    try:
        return RELEASES[name.upper()]
    except KeyError:
        raise ConfigError(
            f"unknown release {name!r}; known releases: {', '.join(RELEASES)}"
        ) from None


def wave_obs_aa() -> np.ndarray:
    """LOGCUBE wavelength of every pixel (vacuum Å), shape (4563,), float64."""
    return np.asarray(WAVE0_AA * 10.0 ** (DLOG10 * np.arange(N_WAVE)))


def spectral_resolution(wave_aa: np.ndarray) -> np.ndarray:
    """Median MaNGA spectral resolution R = λ/Δλ(FWHM) at each wavelength.

    A smooth fit to the DRP SPECRES curve: R ≈ 1450 at 3620 Å rising to ≈ 2600 at 10350 Å
    (the BOSS spectrographs' blue and red arms).

    Parameters
    ----------
    wave_aa : ndarray
        Observed vacuum wavelength, Å.
    """
    w = np.asarray(wave_aa, dtype=float)
    return np.asarray(1450.0 + 1150.0 * (w - 3620.0) / (10350.0 - 3620.0))


def lsf_sigma_aa(wave_aa: np.ndarray) -> np.ndarray:
    """Gaussian sigma of the MaNGA line-spread function (post-pixelisation), Å."""
    w = np.asarray(wave_aa, dtype=float)
    return np.asarray(w / spectral_resolution(w) / (2.0 * np.sqrt(2.0 * np.log(2.0))))


#: Observed vacuum wavelengths (Å) at which a cube's LSF is stored (``cubes.lsf_sigma_aa``):
#: 64 knots log-spaced over the LOGCUBE range (3.2 % apart; the LSF is smooth in λ).
LSF_KNOTS_AA = np.geomspace(3622.0, 10350.0, 64)


def lsf_at_knots(wave_aa: np.ndarray, sigma_aa: np.ndarray) -> np.ndarray | None:
    """Return a cube's LSF sigma at :data:`LSF_KNOTS_AA`, interpolated over its valid pixels.

    Parameters
    ----------
    wave_aa : ndarray, shape (n,)
        Observed vacuum wavelengths, Å.
    sigma_aa : ndarray, shape (n,)
        LSF sigma, Å (DISP or LSFPOST, the cube's median over spaxels).

    Returns
    -------
    ndarray, shape (64,), float32, or None
        None when fewer than half the pixels hold a finite, positive sigma.
    """
    wave = np.asarray(wave_aa, dtype=float)
    sigma = np.asarray(sigma_aa, dtype=float)
    valid = np.isfinite(sigma) & (sigma > 0)
    if sigma.shape != wave.shape or valid.sum() < wave.size / 2:
        return None
    return np.interp(LSF_KNOTS_AA, wave[valid], sigma[valid]).astype(np.float32)


def rest_lsf_fwhm_aa(lam_rest_aa: np.ndarray, z: float) -> np.ndarray:
    """FWHM (Å) of the MaNGA LSF in the rest frame of redshift ``z``, at rest wavelengths.

    The observed LSF at ``λ_rest (1 + z)`` divided by ``1 + z``.

    Parameters
    ----------
    lam_rest_aa : ndarray, shape (n,)
        Rest-frame vacuum wavelengths, Å.
    z : float

    Returns
    -------
    ndarray, shape (n,)
    """
    lam_obs = np.asarray(lam_rest_aa, dtype=float) * (1 + z)
    return np.asarray(constants.FWHM_PER_SIGMA * lsf_sigma_aa(lam_obs) / (1 + z))


def pixel_width_aa(wave_aa: np.ndarray) -> np.ndarray:
    """Width of a log-spaced LOGCUBE pixel, Å."""
    return np.asarray(np.asarray(wave_aa, dtype=float) * np.log(10.0) * DLOG10)


def cube_filename(plate: int, ifudsgn: int) -> str:
    """``manga-<plate>-<ifudsgn>-LOGCUBE.fits.gz``."""
    return f"manga-{plate}-{ifudsgn}-LOGCUBE.fits.gz"


def plateifu_from_filename(name: str) -> str:
    """Return the ``<plate>-<ifudsgn>`` of a LOGCUBE file name (inverse of cube_filename).

    A name that is not ``manga-...`` is returned whole, so a stray file fails under its own
    name.
    """
    parts = name.split("-")
    if len(parts) < 4 or parts[0] != "manga":
        return name
    return f"{parts[1]}-{parts[2]}"
