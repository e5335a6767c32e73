"""Full-spectrum-fit labels for every baxel: stellar populations, dust, gas, sSFR, d_BPT.

The science of one spectrum is :func:`fit_spectrum`; :func:`label` runs it over an archive.

Fitters (``fitter=`` / ``desomdb label --fitter``; the id is stored in every row)
---------------------------------------------------------------------------------
- ``fast`` (``fast-miuscat-v2``, the default): stellar V, σ and A_V once with a coarse 16-
  template subset on the line-free bins, gas V, σ on the continuum-subtracted line windows,
  then the full template set at fixed kinematics as regularised linear fits (one batched
  FFT, non-negative least squares on the normal equations), and two Gauss-Newton steps in
  all five nonlinear parameters, each followed by A_V on a parabola through three linear
  fits. ~4-5x the reference's fits/s with the same accuracy on both mocks (README,
  "Labels: speed"). Its ``fast-miuscat-v1`` (before December 2026) chose the nonlinear
  parameters by χ² + regularisation instead; rows keep the id of the fitter that made them.
- ``ppxf`` (``ppxf-miuscat-v2``, the reference): one pPXF fit with all five nonlinear
  parameters free.
Both solve the weights by χ² + regularisation over the same templates and choose the
nonlinear parameters by the data χ² alone (pPXF's ``linear_fit`` hands capfit only the data
residuals); every fit runs with one BLAS thread (``threadpoolctl``), whatever the caller's
setting.

Fit set-up and conventions
--------------------------
- Input: the archive's rest-frame spectrum (4544 log bins, 59.2 km/s each, vacuum),
  divided by ``norm_flux``; masked bins excluded via ``goodpixels``.
- Stellar templates: the bundled MIUSCAT library (every second age up to 14.1 Gyr × 4
  [M/H] = 96 SSPs), convolved to the MaNGA LSF of the cube's redshift moved to the rest
  frame, and normalised by one scalar so pPXF weights are *mass* weights (initial mass).
- Stellar dust: pPXF's ``dust`` with the Calzetti (2000) curve (1 parameter, A_V), no
  additive and no multiplicative polynomial (``degree=-1, mdegree=0``): reddening and a
  multiplicative polynomial are degenerate and are never combined. E(B-V)_* = A_V / 4.05.
- Regularisation: ``regul = 10`` over the (age, [M/H]) weight grid by default
  (:class:`FitOptions`; measured against a second library).
- Gas: pPXF ``emission_lines(vacuum=True, tie_balmer=False)`` (Balmer lines free; [OII],
  [OIII], [OI], [NII], [SII]) in one kinematic component, not attenuated in the fit, so
  the measured fluxes are the observed (attenuated) ones.
- ``age_mw_gyr`` and ``mh_mw``: weighted by current stellar mass (living + remnants),
  linear in Gyr and dex — the mock truth's convention. ``age_imw_gyr`` and ``mh_imw``: the
  same weighted by initial mass (the pPXF weights themselves), to compare with a mock
  rendered from a library without living masses (BC03; ``truth.mass_weight = 'initial'``).
- ``log_ml_r``: log10 M*/L_r, SDSS r, living + remnant mass, dust-free
  (``sps_lib.mass_to_light``).
- ``ebv_gas_raw`` ± ``ebv_gas_raw_err``: Balmer decrement, Cardelli (1989), intrinsic
  Hα/Hβ = 2.86, unclipped, wherever both fitted fluxes are positive. ``ebv_gas``: the
  published value, only where Hα and Hβ both pass the line gate
  (:class:`desomdb.science.emission.LineGate`: S/N ≥ 3 and amplitude over residual noise ≥ 3);
  a decrement below 2.86 is published as 0 and flagged (``ebv_gas_flags``; conventions in
  :mod:`desomdb.science.emission`).
- ``log_ssfr``: SFR from the dust-corrected Hα luminosity, Kennicutt (1998, Salpeter, as
  the templates), divided by the stellar mass of the same fit (pPXF mass weights times the
  flux scale; the distance cancels in the ratio). The Hα correction uses the published
  ``ebv_gas`` when there is one; where Hβ fails the gate it uses E(B-V)_* / 0.44 (Calzetti
  2000), never below 0, and sets ``DUST_FROM_STARS`` in ``ssfr_flags``, which also carries
  the Hα bits and those of ``ebv_gas_flags`` when it was used. Valid where ``ssfr_ok``.
- ``d_bpt``: :func:`desomdb.science.emission.d_bpt` of the four measured fluxes; valid where
  ``bpt_ok``; ``d_bpt_flags`` holds the gate bits of the four lines. ``bpt_class``
  (:func:`desomdb.science.emission.bpt_class`) only where all four pass the gate, else null.
- ``ew_ha``: rest-frame equivalent width of Hα emission (Å, positive = emission) against the
  stellar model's median within ±60 Å; with log [NII]/Hα it places a baxel on the WHAN
  diagram (Cid Fernandes et al. 2011: EW < 3 Å retired, > 3 Å star-forming or AGN).
- Line fluxes: 1e-17 erg/s/cm^2 (pPXF ``gas_flux`` × pixel width in Å × norm_flux; the
  [OIII] and [NII] doublet templates are split 1 : 0.33). Errors are formal errors scaled by
  the larger of sqrt(chi2_red) and the local residual rms / noise within ±50 Å of the line;
  for Hβ and Hα a template-mismatch allowance (:data:`MISMATCH_FRACTION` of the stellar
  Balmer absorption under the line) is added in quadrature: a weak line sitting in a deep
  absorption trough is only as certain as the trough's depth.
  ``an_*``: peak amplitude of the fitted line over the robust rms of the residuals there.
- ``vel``: stellar velocity (km/s) relative to the drpall redshift; ``sigma``: stellar
  dispersion (km/s), instrumental broadening removed by the template convolution.
- Selection flags (stored, never deletions): ``chi2_ok`` = chi2_red < 2; ``ssfr_ok`` =
  Hα S/N > 2; ``bpt_ok`` = Hβ, [OIII]5007, Hα, [NII]6583 all at S/N > 2.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from desomdb.archive import paths
from desomdb.archive.store import Archive, StagedFile
from desomdb.constants import COSMOLOGY, FWHM_PER_SIGMA, L_SUN_ERG_S, MPC_CM
from desomdb.errors import ArchiveError, ConfigError
from desomdb.runtime import runner
from desomdb.science import dust, emission, gas, spectra, templates
from desomdb.survey import manga

#: Fitter name (``--fitter``) -> the fitter id stored in the labels rows (a partition key).
FITTERS = {"fast": "fast-miuscat-v2", "ppxf": "ppxf-miuscat-v2"}
DEFAULT_FITTER = "fast"
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
#: one does not lower the data χ². Two reach pPXF's own minimum (README, "Labels: speed").
GN_ITERATIONS = 2
#: Below this S/N of the fitted lines together (√Σ (gas model / noise)² over the fitted bins)
#: the Gauss-Newton step leaves the gas V, σ of stage 2 alone.
GN_GAS_MIN_SNR = 5.0


@dataclass(frozen=True)
class FitOptions:
    """How the stellar continuum is fitted.

    The default, second-order regularisation with ``regul = 10`` and no polynomial, is the
    measured best compromise (README, "Labels on data the project did not make"): on a BC03
    mock it halves the cross-library [M/H] bias of the unregularised fit (-0.094 -> -0.040
    dex) and the age scatter, while on the same-library mock all biases stay below 0.03 dex;
    ``regul = 100`` removes the cross-library [M/H] bias but biases same-library ages and
    M*/L_r by -0.07 dex; a multiplicative polynomial with the dust fixed is worse on both.

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


def _rest_fwhm(z: float) -> Any:
    """MaNGA FWHM (Å) in the rest frame of redshift ``z``, as a function of rest λ."""

    def fwhm(lam_rest: np.ndarray) -> np.ndarray:
        lam_obs = np.asarray(lam_rest) * (1 + z)
        return np.asarray(FWHM_PER_SIGMA * manga.lsf_sigma_aa(lam_obs) / (1 + z))

    return fwhm


@lru_cache(maxsize=8)
def fit_setup(z_bucket: float) -> FitSetup:
    """Prepare stellar and gas templates for redshifts near ``z_bucket`` (cached).

    Parameters
    ----------
    z_bucket : float
        Redshift rounded to 0.005; the LSF changes by < 1 % within a bucket.
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
    fwhm_gal = {"lam": lam_fwhm, "fwhm": _rest_fwhm(z_bucket)(lam_fwhm)}
    sps = lib.sps_lib(velscale, fwhm_gal=fwhm_gal,
                      lam_range=[wave[0] / 1.02, wave[-1] * 1.02])
    reg_dim = sps.templates.shape[1:]
    stars = sps.templates.reshape(sps.templates.shape[0], -1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the line list
        gas, names, _ = ppxf_util.emission_lines(
            sps.ln_lam_temp, [wave[0], wave[-1]], _rest_fwhm(z_bucket), tie_balmer=False,
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
        ("age_mw_gyr", "mh_mw", "age_imw_gyr", "mh_imw", "log_ml_r", "log_mstar", "ebv_star",
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
               status="failed", error="", fit_seconds=0.0)
    return row


@dataclass
class LinearFit:
    """A fit at fixed kinematics and dust: the attributes of a pPXF fit the labels read.

    Attributes
    ----------
    weights : ndarray, shape (n_stars + n_gas,)
        Template weights (stars first).
    bestfit, gas_bestfit : ndarray, shape (n_pix,)
        Model and its gas part, normalised galaxy units.
    gas_bestfit_templates : ndarray, shape (n_pix, n_gas)
        Each gas template times its weight.
    gas_flux, gas_flux_error : ndarray, shape (n_gas,)
        Integrated line fluxes (galaxy units × pixels) and formal errors, as pPXF defines
        them; NaN for a line with no flux in the fitted bins. The errors are computed on first
        use (an SVD of the gas columns): the fast fitter's trial fits never need them.
    gas_names : ndarray, shape (n_gas,)
    gas_component : ndarray of bool, shape (n_stars + n_gas,)
    chi2 : float
        χ² per degree of freedom over the fitted bins (5 nonlinear parameters counted).
    sol : list of list of float
        ``[[V, σ], [V_gas, σ_gas]]``, km/s.
    objective : float
        χ² plus the regularisation penalty (what the weights minimise). The nonlinear
        parameters minimise ``chi2`` alone, as pPXF's do: its ``linear_fit`` hands capfit the
        data residuals only, the regularisation shapes the weights.
    a_v : float
        Stellar A_V of the fit, mag.
    """

    weights: np.ndarray
    bestfit: np.ndarray
    gas_bestfit: np.ndarray
    gas_bestfit_templates: np.ndarray
    gas_flux: np.ndarray
    gas_names: np.ndarray
    gas_component: np.ndarray
    chi2: float
    sol: list[list[float]]
    objective: float
    a_v: float
    #: The gas templates as fitted (n_pix, n_gas) and the noise of the fit (n_pix,).
    gas_design: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    noise: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @cached_property
    def gas_flux_error(self) -> np.ndarray:
        """Formal 1σ errors of :attr:`gas_flux`, as pPXF's ``gas_flux_error``; shape (n_gas,)."""
        from capfit.capfit import cov_err

        integ = np.abs(self.gas_design.sum(axis=0))
        empty = np.isnan(self.gas_flux)  # no flux in the fitted bins (linear_fit)
        err = np.full(empty.size, np.nan)
        err[~empty] = integ[~empty] * cov_err(self.gas_design[:, ~empty]
                                              / self.noise[:, None])[1]
        return err


#: Nonlinear parameters of every fitter (V, σ, V_gas, σ_gas, A_V): the χ² degrees of freedom.
N_NONLINEAR = 5


@lru_cache(maxsize=16)
def _regularisation_rows(reg_dim: tuple[int, int], n_cols: int, regul: float) -> np.ndarray:
    """Build pPXF's second-order regularisation rows over the stellar weight grid.

    Returns
    -------
    ndarray, shape (n_age × n_metal, n_cols)
        Rows appended to the noise-weighted design matrix (right-hand side 0); empty when
        ``regul`` is 0.
    """
    from ppxf.ppxf import regularization

    if regul <= 0:
        return np.zeros((0, n_cols))
    rows = np.zeros((int(np.prod(reg_dim)), n_cols))
    regularization(rows, 0, 0, np.asarray(reg_dim), 2, [np.ones(d - 1) for d in reg_dim], regul)
    return rows


def convolved_templates(setup: FitSetup, vel: float, sigma: float,
                        columns: slice | np.ndarray) -> np.ndarray:
    """Convolve templates with a Gaussian LOSVD in one batched inverse FFT.

    Parameters
    ----------
    setup : FitSetup
    vel, sigma : float
        Velocity and dispersion, km/s.
    columns : slice or ndarray of int
        Which of ``[stars, gas]`` to convolve.

    Returns
    -------
    ndarray, shape (4544, n_columns)
        The templates on the galaxy bins, as pPXF's ``linear_fit`` builds them.
    """
    from ppxf.ppxf import losvd_rfft

    n_freq = setup.templates_rfft.shape[0]
    kernel = losvd_rfft(np.array([vel, sigma]) / setup.velscale, 1, np.array([2]), n_freq, 1,
                        setup.vsyst, 1, 0.0)[:, 0, 0]
    n_pix = spectra.rest_wave_aa().size
    conv = np.fft.irfft(setup.templates_rfft[:, columns] * kernel[:, None], setup.npad, axis=0)
    return np.asarray(conv[:n_pix])


def _bounded_lsq(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Solve min ||a x - b|| with x ≥ 0 on the Cholesky factor of the normal equations.

    With R the Cholesky factor of aᵀa and y = R⁻ᵀ aᵀb, ||a x - b||² = ||R x - y||² + bᵀb - yᵀy,
    so the non-negative problem shrinks from m × n to n × n (~8x faster than pPXF's cold
    ``lsq_box`` here). A matrix too ill-conditioned for Cholesky falls back to its QR factor.

    Parameters
    ----------
    a : ndarray, shape (m, n), m > n
    b : ndarray, shape (m,)

    Returns
    -------
    x : ndarray, shape (n,)
    objective : float
        ||a x - b||² at the solution.
    """
    from scipy.linalg import LinAlgError, cholesky, qr, solve_triangular
    from scipy.optimize import nnls

    n = a.shape[1]
    try:
        r = cholesky(a.T @ a, check_finite=False)
        y = solve_triangular(r, a.T @ b, trans="T", check_finite=False)
        rest = float(b @ b - y @ y)
    except LinAlgError:
        rb = qr(np.column_stack([a, b]), mode="r", check_finite=False)[0]
        r, y, rest = rb[:n, :n], rb[:n, n], float(rb[n, n] ** 2)
    x, rnorm = nnls(r, y, maxiter=50 * n)
    return np.asarray(x), float(rnorm**2 + max(rest, 0.0))


def linear_fit(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray, good: np.ndarray,
               kinematics: tuple[float, float, float, float], a_v: float,
               regul: float, conv: np.ndarray | None = None) -> LinearFit:
    """Fit every stellar and gas template at fixed kinematics and stellar dust.

    The same objective as pPXF's ``linear_fit`` (non-negative weights, Calzetti attenuation of
    the convolved stellar templates on the galaxy bins, second-order regularisation), solved
    as a non-negative least-squares problem on its QR factor.

    Parameters
    ----------
    setup : FitSetup
    galaxy, noise : ndarray, shape (4544,)
        Normalised spectrum and its 1σ noise.
    good : ndarray of bool, shape (4544,)
    kinematics : tuple of float
        Stellar V, σ and gas V, σ, km/s.
    a_v : float
        Stellar A_V, mag.
    regul : float
        Regularisation strength (0 = none).
    conv : ndarray, shape (4544, n_stars + n_gas), optional
        The convolved templates at ``kinematics``, if already computed.

    Returns
    -------
    LinearFit
    """
    from ppxf.ppxf import attenuation

    n_stars, n_gas = setup.stars.shape[1], setup.gas.shape[1]
    vel, sig, vel_gas, sig_gas = kinematics
    if conv is None:
        conv = np.column_stack([
            convolved_templates(setup, vel, sig, slice(0, n_stars)),
            convolved_templates(setup, vel_gas, sig_gas, slice(n_stars, n_stars + n_gas))])
    wave = spectra.rest_wave_aa()
    design = conv.copy()
    design[:, :n_stars] *= attenuation(wave, a_v)[:, None]
    reg = _regularisation_rows(setup.reg_dim, n_stars + n_gas, float(regul))
    a = np.vstack([design[good] / noise[good, None], reg])
    b = np.concatenate([galaxy[good] / noise[good], np.zeros(reg.shape[0])])
    weights, objective = _bounded_lsq(a, b)
    bestfit = design @ weights
    resid = ((galaxy - bestfit) / noise)[good]
    gas_cols = design[:, n_stars:]
    integ = np.abs(gas_cols.sum(axis=0))
    empty = ~np.any(gas_cols[good] != 0, axis=0)
    gas_flux = integ * weights[n_stars:]
    gas_flux[empty] = np.nan
    gas_templates = gas_cols * weights[n_stars:]
    return LinearFit(
        weights=weights, bestfit=bestfit, gas_bestfit=gas_templates.sum(axis=1),
        gas_bestfit_templates=gas_templates, gas_flux=gas_flux,
        gas_names=setup.gas_names, gas_component=np.arange(n_stars + n_gas) >= n_stars,
        chi2=float(resid @ resid) / max(resid.size - N_NONLINEAR, 1),
        sol=[[vel, sig], [vel_gas, sig_gas]],
        gas_design=gas_cols, noise=noise,
        objective=objective, a_v=float(a_v))


def _gauss_newton_step(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray,
                       good: np.ndarray, fit: LinearFit,
                       params: tuple[float, float, float, float, float]
                       ) -> tuple[float, float, float, float, float]:
    """One Gauss-Newton step in all five nonlinear parameters at fixed weights.

    The parameters are pPXF's: stellar V, σ, A_V and gas V, σ. The stellar model is
    att(λ; A_V) × IFFT(T_w K), with T_w the weighted sum of the stellar template transforms
    and K = exp(-i v ω - σ² ω² / 2) pPXF's Gaussian LOSVD transform (v, σ in pixels), so
    ∂/∂v = IFFT(-i ω T_w K), ∂/∂σ = IFFT(-σ ω² T_w K) and ∂/∂A_V = model × ∂ ln att/∂A_V: one
    FFT column each. The gas model IFFT(G_w K_gas) (no attenuation) gives its two columns the
    same way. When the fitted lines together have S/N below :data:`GN_GAS_MIN_SNR` the gas
    kinematics are left alone: their columns would be noise, and the step a random walk.

    Parameters
    ----------
    setup : FitSetup
    galaxy, noise : ndarray, shape (4544,)
    good : ndarray of bool, shape (4544,)
    fit : LinearFit
        The fit at ``params``.
    params : tuple of float
        Stellar V (km/s), σ (km/s), A_V (mag), gas V (km/s), gas σ (km/s).

    Returns
    -------
    tuple of float
        The stepped parameters, in the same order: a step of at most 50 km/s in every V and σ,
        stellar σ ≥ 10 km/s, gas σ ≥ 1 km/s, A_V in [0, 4].
    """
    from ppxf.ppxf import attenuation

    vel, sig, a_v, vel_gas, sig_gas = params
    n_stars = setup.stars.shape[1]
    n_freq = setup.templates_rfft.shape[0]
    n_pix = galaxy.size
    wave = spectra.rest_wave_aa()
    omega = np.linspace(0, np.pi, n_freq)

    def columns(v_kms: float, s_kms: float, t_w: np.ndarray) -> list[np.ndarray]:
        v_pix, s_pix = v_kms / setup.velscale + setup.vsyst, s_kms / setup.velscale
        shaped = t_w * np.exp(-1j * v_pix * omega - 0.5 * (s_pix * omega) ** 2)
        return [shaped, -1j * omega * shaped, -s_pix * omega**2 * shaped]

    stars = columns(vel, sig, setup.templates_rfft[:, :n_stars] @ fit.weights[:n_stars])
    gas = columns(vel_gas, sig_gas, setup.templates_rfft[:, n_stars:] @ fit.weights[n_stars:])
    conv = np.fft.irfft(np.stack([*stars, *gas[1:]], axis=1), setup.npad, axis=0)[:n_pix]
    att = attenuation(wave, a_v)
    d_ln_att = np.log(attenuation(wave, 1.0))  # ln att is linear in A_V
    jac = np.column_stack([conv[:, 1] * att / setup.velscale,
                           conv[:, 2] * att / setup.velscale, conv[:, 0] * att * d_ln_att,
                           conv[:, 3] / setup.velscale, conv[:, 4] / setup.velscale])
    gas_snr = float(np.sqrt(np.sum((fit.gas_bestfit / noise)[good] ** 2)))
    if gas_snr < GN_GAS_MIN_SNR:
        jac = jac[:, :3]
    resid = (galaxy - fit.bestfit) / noise
    step = np.linalg.lstsq(jac[good] / noise[good, None], resid[good], rcond=None)[0]
    full = np.zeros(5)
    full[:step.size] = step  # no gas step below the line S/N cut
    d_vel, d_sig, d_av, d_vel_gas, d_sig_gas = (float(d) for d in full)
    d_vel, d_sig, d_vel_gas, d_sig_gas = np.clip([d_vel, d_sig, d_vel_gas, d_sig_gas],
                                                 -50.0, 50.0)
    return (vel + float(d_vel), max(sig + float(d_sig), 10.0),
            float(np.clip(a_v + d_av, 0.0, 4.0)),
            vel_gas + float(d_vel_gas), max(sig_gas + float(d_sig_gas), 1.0))


def _fit_ppxf(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray, good: np.ndarray,
              options: FitOptions) -> tuple[Any, float]:
    """Fit stars, dust and gas in one pPXF call (the reference fitter).

    Parameters
    ----------
    setup : FitSetup
    galaxy, noise : ndarray, shape (4544,)
        Normalised spectrum and its 1σ noise (finite everywhere).
    good : ndarray of bool, shape (4544,)
        Bins to fit.
    options : FitOptions

    Returns
    -------
    pp : ppxf.ppxf.ppxf
        The final fit (stars = component 0, gas = component 1).
    a_v : float
        Stellar A_V, mag (Calzetti 2000).
    """
    from ppxf.ppxf import ppxf

    n_stars = setup.stars.shape[1]
    n_gas = setup.gas.shape[1]
    component = np.array([0] * n_stars + [1] * n_gas)
    gas_component = component > 0
    stellar_dust = {"start": [0.3], "bounds": [[0.0, 4.0]], "component": ~gas_component}
    common: dict[str, Any] = {
        "templates": np.column_stack([setup.stars, setup.gas]), "galaxy": galaxy,
        "noise": noise, "velscale": setup.velscale, "moments": [2, 2], "degree": -1,
        "component": component, "gas_component": gas_component,
        "gas_names": setup.gas_names, "lam": spectra.rest_wave_aa(),
        "lam_temp": setup.lam_temp, "goodpixels": np.flatnonzero(good), "quiet": True,
        "linear_method": "lsq_box",
    }
    if options.regul > 0:
        common.update(regul=options.regul, reg_dim=setup.reg_dim)
    pp = ppxf(start=[[0.0, 100.0], [0.0, 60.0]], mdegree=0, dust=[stellar_dust], **common)
    a_v = float(pp.dust[0]["sol"][0])
    if options.mdegree > 0:
        fixed_dust = {"start": [a_v], "fixed": [True], "component": ~gas_component}
        pp = ppxf(start=[list(pp.sol[0][:2]), list(pp.sol[1][:2])], mdegree=options.mdegree,
                  dust=[fixed_dust], **common)
    return pp, a_v


def _fit_fast(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray, good: np.ndarray,
              options: FitOptions) -> tuple[Any, float]:
    """Fit stars, dust and gas in three cheap stages (the fast fitter).

    1. Stellar V, σ and A_V (pPXF) with the coarse template subset :attr:`FitSetup.coarse`
       (16 of 96, no regularisation) on the bins outside the emission-line windows.
    2. Gas V, σ (pPXF) from the gas templates alone, on the spectrum minus stage 1's stellar
       model, within the line windows.
    3. Every stellar and gas template at the kinematics of stages 1-2, convolved once in one
       batched FFT, solved by :func:`linear_fit` (regularised, the reference's objective).
       Then :data:`GN_ITERATIONS` times: one Gauss-Newton step in all five nonlinear
       parameters at fixed weights (:func:`_gauss_newton_step`), the templates convolved
       again, and :func:`linear_fit` at three A_V around the stepped one and at the vertex of
       the parabola through them, kept if the data χ² drops (the quantity pPXF's nonlinear
       optimiser minimises; the regularisation only shapes the weights): the weights, line
       fluxes, χ² and A_V of the labels.

    The reference spends ~30 evaluations of all 115 templates on a finite-difference
    Jacobian over 5 parameters; here the nonlinear stages see 16 or 19 templates and the
    full set is solved once plus 4 times per Gauss-Newton iteration (README, "Labels: speed").

    Parameters and returns as :func:`_fit_ppxf`.
    """
    from ppxf.ppxf import ppxf

    if options.mdegree > 0:
        raise ConfigError(f"FitOptions(mdegree={options.mdegree}) needs the reference fitter: "
                          "use --fitter ppxf (fitter='ppxf')")
    wave = spectra.rest_wave_aa()
    # lam and lam_temp on every stage: they set the velocity zero point (templates start
    # bluer than the galaxy).
    base: dict[str, Any] = {"galaxy": galaxy, "noise": noise, "velscale": setup.velscale,
                            "degree": -1, "quiet": True, "linear_method": "lsq_box",
                            "lam": wave, "lam_temp": setup.lam_temp}
    # Stage 1: stars on the line-free bins.
    coarse = setup.stars[:, setup.coarse]
    n_coarse = coarse.shape[1]
    dust_1 = {"start": [0.3], "bounds": [[0.0, 4.0]], "component": np.ones(n_coarse, bool)}
    stars = ppxf(coarse, start=[0.0, 100.0], moments=2, dust=[dust_1],
                 goodpixels=np.flatnonzero(good & ~setup.line_bins),
                 **base)
    vel, sig = (float(v) for v in stars.sol[:2])
    a_v = float(stars.dust[0]["sol"][0])
    # Stage 2: gas kinematics on the continuum-subtracted spectrum.
    n_gas = setup.gas.shape[1]
    gas_fit = ppxf(setup.gas, **{**base, "galaxy": galaxy - stars.bestfit},
                   start=[vel, 60.0], moments=2,
                   goodpixels=np.flatnonzero(good & setup.line_bins),
                   component=np.zeros(n_gas, int), gas_component=np.ones(n_gas, bool),
                   gas_names=setup.gas_names)
    vel_gas, sig_gas = (float(v) for v in gas_fit.sol[:2])
    # Stage 3: every template at fixed kinematics. One Gauss-Newton step moves the stellar
    # V, σ, A_V and the gas V, σ towards the full set's optimum (weights held), then A_V is
    # refined on a parabola through three linear fits.
    n_stars = setup.stars.shape[1]
    gas_conv = convolved_templates(setup, vel_gas, sig_gas, slice(n_stars, n_stars + n_gas))
    conv = np.column_stack([convolved_templates(setup, vel, sig, slice(0, n_stars)), gas_conv])
    first = linear_fit(setup, galaxy, noise, good, (vel, sig, vel_gas, sig_gas), a_v,
                       options.regul, conv)
    best, kin = first, (vel, sig, vel_gas, sig_gas)
    for _ in range(GN_ITERATIONS):
        vel, sig, a_v, vel_gas, sig_gas = _gauss_newton_step(
            setup, galaxy, noise, good, best, (kin[0], kin[1], best.a_v, kin[2], kin[3]))
        conv[:, :n_stars] = convolved_templates(setup, vel, sig, slice(0, n_stars))
        conv[:, n_stars:] = convolved_templates(setup, vel_gas, sig_gas,
                                                slice(n_stars, n_stars + n_gas))
        step = _refine_av(setup, galaxy, noise, good, (vel, sig, vel_gas, sig_gas), a_v,
                          options.regul, conv)
        if step.chi2 >= best.chi2:  # no improvement: keep the previous parameters
            break
        best, kin = step, (vel, sig, vel_gas, sig_gas)
    return best, float(best.a_v)


def _refine_av(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray, good: np.ndarray,
               kin: tuple[float, float, float, float], a_v: float, regul: float,
               conv: np.ndarray) -> LinearFit:
    """Best linear fit over A_V by data χ²: three fits around ``a_v`` and the parabola's vertex."""

    def at(av: float) -> LinearFit:
        return linear_fit(setup, galaxy, noise, good, kin, av, regul, conv)

    trial = [max(a_v, AV_STEP) + d * AV_STEP for d in (-1, 0, 1)]
    fits = [at(av) for av in trial]
    obj = np.array([f.chi2 for f in fits])
    best = fits[int(np.argmin(obj))]
    curvature = obj[0] - 2 * obj[1] + obj[2]
    if curvature > 0:  # the parabola's vertex (at most 3 steps out), kept if it does better
        shift = float(np.clip(0.5 * (obj[0] - obj[2]) / curvature, -3.0, 3.0))
        refined = at(max(trial[1] + shift * AV_STEP, 0.0))
        if refined.chi2 < best.chi2:
            best = refined
    return best


#: Fitter name -> its stages.
_FITS = {"fast": _fit_fast, "ppxf": _fit_ppxf}


def fitter_name(fitter: str | None) -> str:
    """Return the fitter name (``fast`` or ``ppxf``); None gives :data:`DEFAULT_FITTER`.

    Raises
    ------
    ConfigError
        If ``fitter`` is not a known fitter.
    """
    name = DEFAULT_FITTER if fitter is None else fitter
    if name not in FITTERS:
        raise ConfigError(f"unknown fitter {fitter!r}; choose one of {sorted(FITTERS)}")
    return name


def fit_spectrum(
    flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: float, z: float,
    gate: emission.LineGate | None = None, options: FitOptions | None = None,
    fitter: str | None = None,
) -> dict[str, Any]:
    """Fit one rest-frame baxel spectrum and derive its labels.

    Parameters
    ----------
    flux, ivar : ndarray, shape (4544,), float32
        Rest-frame flux density (1e-17 erg/s/cm^2/Å, not normalised) and inverse variance.
    mask : ndarray, shape (4544,), uint8
        1 = masked bin.
    norm_flux : float
        Mean flux in 4050-4150 Å (``baxels.norm_flux``).
    z : float
        drpall redshift (sets the LSF and the luminosity distance).
    gate : LineGate, optional
        When a line counts as detected (default S/N ≥ 3 and A/N ≥ 3).
    options : FitOptions, optional
        Continuum fit set-up (default: :class:`FitOptions`, regul = 10, no polynomial).
    fitter : str, optional
        ``fast`` (staged, see :func:`_fit_fast`) or ``ppxf`` (the reference: one pPXF fit
        with every nonlinear parameter free); default :data:`DEFAULT_FITTER`.

    Returns
    -------
    dict
        One labels row (see module docstring); ``status`` is ``ok``, ``unfittable`` (too few
        good pixels or no positive normalisation) or ``failed`` (with ``error``).
    """
    gate = gate or emission.LineGate()
    options = options or FitOptions()
    fit_stages = _FITS[fitter_name(fitter)]
    row = empty_row()
    t0 = time.perf_counter()
    good = (mask == 0) & (ivar > 0) & np.isfinite(flux)
    row["n_good_pix"] = int(good.sum())
    if good.sum() < MIN_GOOD_PIXELS or not (np.isfinite(norm_flux) and norm_flux > 0):
        row["status"] = "unfittable"
        row["error"] = (f"{int(good.sum())} good bins (need {MIN_GOOD_PIXELS}) "
                        f"and norm_flux {norm_flux}")
        return row
    setup = fit_setup(round(round(z / 0.005) * 0.005, 4))
    wave = spectra.rest_wave_aa()
    galaxy = np.where(good, flux / norm_flux, 0.0)
    noise = np.where(good, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)) / norm_flux, 0.0)
    noise[~good] = np.median(noise[good]) * 1e3  # pPXF needs finite noise everywhere
    with threadpool_limits(1):  # one fit is fastest on one BLAS thread, on every path
        pp, a_v = fit_stages(setup, galaxy, noise, good, options)
    gas_component = np.asarray(pp.gas_component, dtype=bool)
    weights = pp.weights[~gas_component].reshape(setup.reg_dim)
    chi2 = float(pp.chi2)
    row["chi2_red"] = chi2
    row["vel"], row["sigma"] = float(pp.sol[0][0]), float(pp.sol[0][1])
    row["vel_gas"], row["sigma_gas"] = float(pp.sol[1][0]), float(pp.sol[1][1])
    row["ebv_star"] = a_v / dust.CALZETTI_RV

    sps = setup.sps
    current = weights * sps.mass_no_gas_grid
    if current.sum() > 0:
        row["age_mw_gyr"] = float((current * sps.age_grid).sum() / current.sum())
        row["mh_mw"] = float((current * sps.metal_grid).sum() / current.sum())
        row["age_imw_gyr"] = float((weights * sps.age_grid).sum() / weights.sum())
        row["mh_imw"] = float((weights * sps.metal_grid).sum() / weights.sum())
        row["log_ml_r"] = float(np.log10(sps.mass_to_light(weights, band="SDSS/r", quiet=True)))
    # Initial mass per unit weight: galaxy units × norm_flux × 1e-17 × 4π D_L² / L_sun.
    d_l = COSMOLOGY.luminosity_distance(z).value * MPC_CM
    flux_to_lum = norm_flux * 1e-17 * 4 * np.pi * d_l**2  # erg/s per (galaxy unit × Å)
    mstar = current.sum() / setup.mass_scale * flux_to_lum / L_SUN_ERG_S
    row["log_mstar"] = float(np.log10(mstar)) if mstar > 0 else np.nan

    residual = np.where(good, galaxy - pp.bestfit, np.nan)
    stellar = pp.bestfit - pp.gas_bestfit
    row.update(gas.measure_lines(pp, wave, residual, noise, stellar, good, norm_flux, chi2))
    row.update(gas.derive(row, gate, lum_per_flux=1e-17 * 4 * np.pi * d_l**2, mstar=mstar))
    row["chi2_ok"] = bool(chi2 < CHI2_MAX)
    row["ssfr_ok"] = bool(row["sn_ha"] > SN_MIN)
    row["bpt_ok"] = bool(all(row[f"sn_{k}"] > SN_MIN for k in LINE_KEYS))
    row["status"] = "ok"
    row["fit_seconds"] = time.perf_counter() - t0
    return row


def _label_task(task: dict[str, Any]) -> str:
    """Worker: fit the given baxels of one cube; write the rows to a staged Parquet file.

    When the task extends a sampled cube, ``merge_with`` names its committed label file,
    whose rows are written unchanged beside the new ones.
    """
    table = pq.read_table(task["spectra_file"])
    bax = {r["bin_id"]: r for r in task["baxels"]}
    ids = table.column("bin_id").to_numpy()
    flux = spectra.from_list_column(table.column("flux"))
    ivar = spectra.from_list_column(table.column("ivar"))
    mask = spectra.from_list_column(table.column("mask"))
    name = fitter_name(task.get("fitter"))
    rows = []
    for i, bin_id in enumerate(ids):
        if int(bin_id) not in bax:
            continue
        try:
            row = fit_spectrum(flux[i], ivar[i], mask[i], bax[int(bin_id)]["norm_flux"],
                               task["z"], gate=task.get("gate"), options=task.get("options"),
                               fitter=name)
        except Exception as exc:  # one bad fit is recorded, the cube goes on
            row = empty_row()
            row["error"] = f"{type(exc).__name__}: {exc}"
        row.update(plateifu=task["plateifu"], bin_id=int(bin_id), fitter=FITTERS[name])
        rows.append(row)
    out = Path(task["staged"])
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    # A cube without a single classified baxel would otherwise write a null-typed column.
    table = table.set_column(table.schema.get_field_index("bpt_class"), "bpt_class",
                             table.column("bpt_class").cast(pa.string()))
    if task.get("merge_with"):  # the cube's committed rows, unchanged, and the new ones
        table = pa.concat_tables([pq.read_table(task["merge_with"]), table],
                                 promote_options="permissive").sort_by("bin_id")
    pq.write_table(table, out, compression="zstd")
    return str(out)


@dataclass
class LabelReport:
    """Outcome of a labelling job."""

    n_cubes: int = 0
    n_skipped_cubes: int = 0
    n_fits: int = 0
    n_failed_fits: int = 0
    failed_cubes: list[tuple[str, str]] = field(default_factory=list)
    fit_seconds: float = 0.0


def label(
    archive: str | Path,
    release: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress: bool = True,
    plateifus: list[str] | None = None,
    max_per_cube: int | None = None,
    gate: emission.LineGate | None = None,
    options: FitOptions | None = None,
    fitter: str | None = None,
) -> LabelReport:
    """Fit every not-yet-labelled baxel of the archive (one task per cube).

    A cube is done when every baxel asked for (all of them, or the ``max_per_cube`` sample)
    has a label. A cube labelled from a smaller sample by the same fitter (``desomdb demo``
    labels 20 per cube) gets only its missing baxels fitted, merged into its label file; the
    rows it had are kept as they were. A cube with labels of the other fitter counts as done.

    Parameters
    ----------
    archive : str or Path
    release : str, optional
        Only this release (default: all).
    workers : int
        Local processes (single-threaded BLAS each).
    scheduler : str, optional
        Dask scheduler address.
    progress : bool
    plateifus : list of str, optional
        Only these cubes.
    max_per_cube : int, optional
        Fit at most this many baxels per cube (evenly spaced in bin_id) — for quick looks
        such as the demo; the default fits every baxel.
    gate : LineGate, optional
        When an emission line counts as detected (default S/N ≥ 3, A/N ≥ 3).
    options : FitOptions, optional
        Continuum fit set-up (default: the measured better one, see :class:`FitOptions`).
    fitter : str, optional
        ``fast`` or ``ppxf`` (default :data:`DEFAULT_FITTER`); the rows carry its id from
        :data:`FITTERS`. A cube labelled by either fitter counts as done.

    Returns
    -------
    LabelReport
    """
    name_of_fitter = fitter_name(fitter)
    if name_of_fitter == "fast" and options is not None and options.mdegree > 0:
        raise ConfigError(f"mdegree = {options.mdegree} needs the reference fitter: "
                          "use --fitter ppxf")
    arch = Archive(archive)
    manifest_tables = arch.manifest()["tables"]
    releases = sorted({paths.parse_partition(f)[2] for f in manifest_tables.get("baxels", [])})
    if release is not None:
        release = manga.release(release).name
        if release not in releases:
            raise ConfigError(f"{arch.root}: no release {release!r}; it has {releases}")
        releases = [release]
    if not releases:
        raise ArchiveError(f"{arch.root}: no baxels yet; run 'desomdb ingest' first")
    report = LabelReport()
    with arch.writer("desomdb label") as writer:
        staging = writer.staging_dir("labels")
        tasks: list[dict[str, Any]] = []
        targets: list[str] = []
        replaced: list[str | None] = []
        names: list[str] = []
        generation = arch.generation() + 1
        for rel in releases:
            labelled: dict[str, tuple[set[int], set[str]]] = {}
            label_files = {paths.parse_label_part_name(f.name): f
                           for f in arch.files("labels", release=rel)}
            if label_files:
                lab = pl.from_arrow(arch.read("labels", columns=["plateifu", "bin_id", "fitter"],
                                              release=rel))
                for (pifu_l,), g in lab.group_by("plateifu"):  # type: ignore[union-attr]
                    labelled[str(pifu_l)] = (set(g["bin_id"].to_list()), set(g["fitter"]))
            bax = pl.from_arrow(arch.read("baxels", columns=["plateifu", "bin_id", "norm_flux"],
                                          release=rel))
            gal = pl.from_arrow(arch.read("galaxies", columns=["plateifu", "z"], release=rel))
            z_of = dict(zip(gal["plateifu"], gal["z"], strict=True))  # type: ignore[index]
            spec_files = {f.name.split("-", 1)[1].rsplit("-", 1)[0]: f
                          for f in arch.files("spectra", release=rel)}
            for plateifu, group in bax.group_by("plateifu", maintain_order=True):  # type: ignore[union-attr]
                pifu = str(plateifu[0])
                if plateifus is not None and pifu not in plateifus:
                    continue
                if max_per_cube is not None and group.height > max_per_cube:
                    keep = np.linspace(0, group.height - 1, max_per_cube).round().astype(int)
                    group = group[np.unique(keep)]
                key = (pifu, FITTERS[name_of_fitter])
                have, fitters = labelled.get(pifu, (set(), set()))
                old_file = label_files.get(key) if have else None
                if have:
                    group = group.filter(~pl.col("bin_id").is_in(list(have)))
                    if (group.height == 0 or fitters != {FITTERS[name_of_fitter]}
                            or old_file is None):
                        report.n_skipped_cubes += 1
                        continue
                # The merged rows get a new name; the old file is dropped in the same commit.
                name = paths.label_part_name(*key, generation if old_file else None)
                tasks.append({
                    "merge_with": str(old_file) if old_file else None,
                    "plateifu": pifu, "z": float(z_of[pifu]),
                    "spectra_file": str(spec_files[pifu]),
                    "baxels": group.select("bin_id", "norm_flux").to_dicts(),
                    "staged": str(staging / rel / name),
                    "gate": gate, "options": options, "fitter": name_of_fitter,
                })
                targets.append(f"{paths.release_dir('labels', rel)}/{name}")
                replaced.append(str(old_file.relative_to(arch.root)) if old_file else None)
                names.append(pifu)

        def on_result(i: int, staged: str) -> None:
            old = replaced[i]
            writer.commit(add=[StagedFile("labels", targets[i], Path(staged))],
                          remove=[("labels", old)] if old else [])

        run = runner.run_tasks(_label_task, tasks, workers=workers, scheduler=scheduler,
                               desc=f"{name_of_fitter} labels (cubes)", progress=progress,
                               labels=names, on_result=on_result)
        report.n_cubes = len(tasks) - len(run.failures)
        report.failed_cubes = [(f.label, f.error) for f in run.failures]
    for rel in releases:
        if not arch.files("labels", release=rel):
            continue
        lab = pl.from_arrow(arch.read("labels", columns=["status", "fit_seconds"], release=rel))
        report.n_fits += lab.height  # type: ignore[union-attr]
        report.n_failed_fits += int((lab["status"] == "failed").sum())  # type: ignore[index]
        report.fit_seconds += float(lab["fit_seconds"].sum())  # type: ignore[index]
    return report
