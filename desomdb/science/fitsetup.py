"""How a baxel is fitted: fitters, options, constants, templates per redshift bucket.

Conventions: :mod:`desomdb.science.fitting`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from desomdb.constants import FWHM_PER_SIGMA
from desomdb.science import emission, gas, spectra, templates
from desomdb.survey import manga

#: Fitter name (``--fitter``) -> the fitter id stored in the labels rows (a partition key).
FITTERS = {"fast": "fast-miuscat-v2", "ppxf": "ppxf-miuscat-v2", "batch": "batch-miuscat-v1"}
DEFAULT_FITTER = "batch"
#: Which fitter's row the ``preferred_labels`` view keeps when several labelled a baxel
#: (successful fits first): the reference, then the others (sql/preferred_labels.sql spells
#: the same order).
FITTER_PREFERENCE = ("ppxf", "batch", "fast")


def fitter_order_sql(column: str = "fitter") -> str:
    """Return the SQL ORDER BY terms that rank one baxel's fits by :data:`FITTER_PREFERENCE`.

    For queries over label files that cannot use the ``preferred_labels`` view (the
    explorer reads one cube's files); the rows must already be ``status = 'ok'``.
    """
    ranks = " ".join(f"when '{name}' then {k}" for k, name in enumerate(FITTER_PREFERENCE))
    return (f"case split_part({column}, '-', 1) {ranks} else {len(FITTER_PREFERENCE)} end, "
            f"{column} desc")
#: Id of the default fitter.
FITTER = FITTERS[DEFAULT_FITTER]
SN_MIN = 2.0
CHI2_MAX = 2.0
MIN_GOOD_PIXELS = 1000
LINE_KEYS = gas.LINE_KEYS
#: Ages (every n-th of the fitting grid's 24) and [M/H] (of its 4) whose templates fit the
#: fast fitter's stellar kinematics and first A_V.
COARSE_AGES = slice(0, None, 3)
COARSE_METALS = slice(1, None, 2)
#: Half-width of the emission-line windows (km/s): masked in the fast fitter's stellar
#: stage, the only bins of its gas stage.
LINE_WINDOW_KMS = 800.0
#: Step in A_V (mag) of the fast fitter's parabolic refinement of the stellar dust.
AV_STEP = 0.05
#: Gauss-Newton steps of the fast fitter's last stage (each: one step in stellar V, σ, A_V
#: and gas V, σ at fixed weights, then A_V on a parabola of linear fits); stops early when
#: one does not lower the data χ². Two reach pPXF's own minimum (docs/measured.md, "Labels: speed").
GN_ITERATIONS = 2
#: Step, as a fraction of the nominal MaNGA LSF, that a cube's LSF is rounded to before the
#: templates are prepared for it: cubes within one step share a template set (2 % of an
#: instrumental σ of ~70 km/s moves σ_* by < 1 km/s at σ_* ≥ 100 km/s).
LSF_STEP = 0.02
#: Below this S/N of the fitted lines together (√Σ (gas model / noise)² over the fitted bins)
#: the Gauss-Newton step leaves the gas V, σ of stage 2 alone.
GN_GAS_MIN_SNR = 5.0


@dataclass(frozen=True)
class FitOptions:
    """How the stellar continuum is fitted.

    The default, second-order regularisation with ``regul = 10`` and no polynomial, is the
    measured best compromise (docs/measured.md, "Labels on data the project did not
    make"): on a BC03 mock it halves the cross-library [M/H] bias of the unregularised fit
    (-0.094 -> -0.040 dex) and the age scatter, while on the same-library mock all biases
    stay below 0.03 dex; ``regul = 100`` removes the cross-library [M/H] bias but biases
    same-library ages and M*/L_r by -0.07 dex; a multiplicative polynomial with the dust
    fixed is worse on both.

    Attributes
    ----------
    regul : float
        pPXF linear regularisation of the stellar weights over the (age, [M/H]) grid
        (``reg_ord = 2``); 0 = none.
    mdegree : int
        > 0: a second fit with a multiplicative Legendre polynomial of this degree and the
        stellar dust fixed at the first fit's value (reddening and a polynomial are
        degenerate when both are free); populations come from the second fit, E(B-V)_* from
        the first.
    """

    regul: float = 10.0
    mdegree: int = 0


@dataclass
class FitSetup:
    """Templates prepared once per (worker, redshift bucket)."""

    sps: Any
    stars: np.ndarray  # (n_pix_temp, n_stars)
    gas: np.ndarray  # (n_pix_temp, n_gas)
    gas_names: np.ndarray
    reg_dim: tuple[int, int]
    ln_lam_temp: np.ndarray
    lam_temp: np.ndarray
    velscale: float
    mass_scale: float = field(default=1.0)
    #: Columns of ``stars`` the fast fitter's kinematics stage uses (see :data:`COARSE_AGES`).
    coarse: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    #: Galaxy bins (4544,) within :data:`LINE_WINDOW_KMS` of an emission line.
    line_bins: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    #: Fourier transforms of ``[stars, gas]`` as pPXF pads them, shape (n_freq, n_templates).
    templates_rfft: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), complex))
    #: FFT length and the template-to-galaxy velocity offset (pixels) pPXF uses.
    npad: int = 0
    vsyst: float = 0.0
    #: Mean flux of each column of ``stars`` in ``templates.LIGHT_WINDOW_AA`` (light weights).
    light: np.ndarray = field(default_factory=lambda: np.zeros(0))
    @cached_property
    def _lum_r(self) -> np.ndarray:
        """Per template (``reg_dim``): r-band luminosity (L_sun) per unit weight."""
        from importlib import resources

        from ppxf import ppxf_util

        sps = self.sps
        band = "SDSS/r"
        p1 = ppxf_util.synthetic_photometry(sps.lam_temp_full, sps.templates_full, band,
                                            redshift=0, quiet=True)
        sun = np.load(str(resources.files("ppxf") / "sps_models/spectra_sun_vega.npz"))
        p2 = ppxf_util.synthetic_photometry(sun["lam"], sun["flux_sun"], band, redshift=0,
                                            quiet=True)
        ten_pc_cm = 3.085677581491367e19
        l_sun_erg_s = 3.828e33  # pPXF's (IAU 2015)
        return np.asarray(p1.flux / (4 * np.pi * ten_pc_cm**2) * l_sun_erg_s / p2.flux)

    def mass_to_light_r(self, weights: np.ndarray) -> float:
        """Return M*/L in the SDSS r band (solar units, living stars and remnants) of a fit.

        The same as ``self.sps.mass_to_light(weights, band="SDSS/r")`` of pPXF, which
        reads the filter curve and integrates every template's photometry again at each
        call (6 ms per fit, measured); here the templates' luminosities are computed once
        per set-up.

        Parameters
        ----------
        weights : ndarray, shape ``reg_dim``
            The stellar weights of a fit.
        """
        return float(np.sum(weights / self.sps.flux * self.sps.mass_no_gas_grid)
                     / np.sum(weights * self._lum_r))


def lsf_key(lsf_sigma_aa: np.ndarray | None) -> tuple[int, ...] | None:
    """Return a cube's LSF as the key of its template set (multiples of :data:`LSF_STEP`).

    Parameters
    ----------
    lsf_sigma_aa : ndarray, shape (64,), or None
        The cube's LSF sigma (Å) at ``manga.LSF_KNOTS_AA`` (``cubes.lsf_sigma_aa``).

    Returns
    -------
    tuple of int, or None
        None (the nominal LSF) when no LSF is given or it rounds to the nominal one.
    """
    if lsf_sigma_aa is None:
        return None
    ratio = np.asarray(lsf_sigma_aa, dtype=float) / manga.lsf_sigma_aa(manga.LSF_KNOTS_AA)
    if ratio.shape != manga.LSF_KNOTS_AA.shape or not np.all(np.isfinite(ratio) & (ratio > 0)):
        return None
    key = tuple(int(k) for k in np.rint(ratio / LSF_STEP))
    return None if set(key) == {round(1 / LSF_STEP)} else key


def _rest_fwhm(z: float, key: tuple[int, ...] | None = None) -> Any:
    """LSF FWHM (Å) in the rest frame of redshift ``z``, as a function of rest λ.

    The nominal MaNGA LSF, or the cube's (``key`` from :func:`lsf_key`) where given.
    """
    scale = None if key is None else np.asarray(key, dtype=float) * LSF_STEP

    def fwhm(lam_rest: np.ndarray) -> np.ndarray:
        lam_obs = np.asarray(lam_rest) * (1 + z)
        sigma = manga.lsf_sigma_aa(lam_obs)
        if scale is not None:
            sigma = sigma * np.interp(lam_obs, manga.LSF_KNOTS_AA, scale)
        return np.asarray(FWHM_PER_SIGMA * sigma / (1 + z))

    return fwhm


@lru_cache(maxsize=8)
def fit_setup(z_bucket: float, lsf: tuple[int, ...] | None = None) -> FitSetup:
    """Prepare stellar and gas templates for redshifts near ``z_bucket`` (cached).

    Parameters
    ----------
    z_bucket : float
        Redshift rounded to 0.005; the LSF changes by < 1 % within a bucket.
    lsf : tuple of int, optional
        The cube's LSF (:func:`lsf_key`); None: the nominal MaNGA LSF.
    """
    from ppxf import ppxf_util
    from ppxf.ppxf import ppxf

    full = templates.load()
    wave = spectra.rest_wave_aa()
    velscale = manga.C_KMS * np.log(wave[1] / wave[0])
    # Every second age up to 14.2 Gyr (96 templates): pPXF cost grows with the template count.
    young_enough = np.flatnonzero(full.ages_gyr <= 14.2)
    keep = np.zeros(full.ages_gyr.size, dtype=bool)
    keep[young_enough[::2]] = True
    lib = full.with_ages(keep)
    lam_fwhm = lib.lam_vac_aa
    fwhm_gal = {"lam": lam_fwhm, "fwhm": _rest_fwhm(z_bucket, lsf)(lam_fwhm)}
    sps = lib.sps_lib(velscale, fwhm_gal=fwhm_gal,
                      lam_range=[wave[0] / 1.02, wave[-1] * 1.02])
    reg_dim = sps.templates.shape[1:]
    stars = sps.templates.reshape(sps.templates.shape[0], -1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the line list
        gas, names, _ = ppxf_util.emission_lines(
            sps.ln_lam_temp, [wave[0], wave[-1]], _rest_fwhm(z_bucket, lsf), tie_balmer=False,
            vacuum=True,
        )
    age_idx = np.arange(reg_dim[0])[COARSE_AGES]
    metal_idx = np.arange(reg_dim[1])[COARSE_METALS]
    coarse = np.ravel_multi_index(np.ix_(age_idx, metal_idx), reg_dim).ravel()
    setup = FitSetup(sps, stars, gas, np.asarray(names), reg_dim, sps.ln_lam_temp,
                     sps.lam_temp, velscale, float(np.ravel(sps.flux)[0]), coarse,
                     _line_bins(gas, sps.lam_temp, wave))
    # pPXF's own padding, trimming and velocity zero point, computed once (fit=False).
    n_stars, n_gas = stars.shape[1], gas.shape[1]
    component = np.array([0] * n_stars + [1] * n_gas)
    prep = ppxf(np.column_stack([stars, gas]), np.ones(wave.size), np.ones(wave.size),
                velscale, start=[[0.0, 100.0], [0.0, 60.0]], moments=[2, 2], degree=-1,
                component=component, gas_component=component > 0, gas_names=names,
                lam=wave, lam_temp=sps.lam_temp, fit=False, quiet=True)
    setup.templates_rfft, setup.npad, setup.vsyst = prep.templates_rfft, prep.npad, prep.vsyst
    setup.light = templates.light_in_window(sps.lam_temp, stars)
    return setup


def _line_bins(gas_templates: np.ndarray, lam_temp: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Galaxy bins within :data:`LINE_WINDOW_KMS` of any line of the gas templates.

    Parameters
    ----------
    gas_templates : ndarray, shape (n_pix_temp, n_gas)
    lam_temp : ndarray, shape (n_pix_temp,)
        Template wavelengths, Å.
    wave : ndarray, shape (n_pix,)
        Galaxy wavelengths, Å.

    Returns
    -------
    ndarray of bool, shape (n_pix,)
    """
    peak = np.abs(gas_templates) > 0.05 * np.abs(gas_templates).max(axis=0)
    centres = lam_temp[peak.any(axis=1)]
    dist_kms = manga.C_KMS * np.abs(np.log(wave[:, None] / centres[None, :])).min(axis=1)
    return np.asarray(dist_kms < LINE_WINDOW_KMS)


def empty_row() -> dict[str, Any]:
    """Return a labels row with every quantity missing."""
    row: dict[str, Any] = dict.fromkeys(
        ("age_mw_gyr", "mh_mw", "age_imw_gyr", "mh_imw", "log_age_lw", "mh_lw", "log_ml_r",
         "log_mstar", "ebv_star",
         "ebv_gas", "ebv_gas_raw", "ebv_gas_raw_err", "log_ssfr", "d_bpt", "ew_ha", "vel",
         "sigma", "vel_gas", "sigma_gas", "chi2_red"), np.nan)
    for key in LINE_KEYS:
        row[f"flux_{key}"] = np.nan
        row[f"flux_{key}_err"] = np.nan
        row[f"sn_{key}"] = np.nan
        row[f"an_{key}"] = np.nan
    all_bits = int(~emission.GasFlag(0))
    row.update(ebv_gas_flags=all_bits, ssfr_flags=all_bits, d_bpt_flags=all_bits,
               bpt_class=None, n_good_pix=0, chi2_ok=False, ssfr_ok=False, bpt_ok=False,
               status="failed", error="", fit_seconds=0.0, lsf_source="nominal")
    return row
