"""The fast fitter's maths: template convolution, bounded least squares, Gauss-Newton steps.

Templates are convolved in one batched FFT, the weights solved by regularised bounded least
squares at fixed kinematics, and the nonlinear parameters moved by Gauss-Newton steps.

The stages are described in :func:`_fit_fast`; the objective is pPXF's (data χ² plus
regularisation), with the same templates (:mod:`desomdb.science.fitsetup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from desomdb.errors import ConfigError
from desomdb.science import spectra
from desomdb.science.fitsetup import AV_STEP, GN_GAS_MIN_SNR, GN_ITERATIONS, FitOptions, FitSetup


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
    full set is solved once plus 4 times per Gauss-Newton iteration (docs/measured.md,
    "Labels: speed").

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
