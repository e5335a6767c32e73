"""The full-spectrum fit of one baxel and its labels: stellar populations, dust, gas, sSFR.

The science of one spectrum is :func:`fit_spectrum`; :func:`desomdb.pipeline.labels.label`
runs it over an archive. The fit's set-up (templates, options, constants) is
:mod:`desomdb.science.fitsetup`; the fast fitter's maths :mod:`desomdb.science.fastfit`.

Fitters (``fitter=`` / ``desomdb label --fitter``; the id is stored in every row)
---------------------------------------------------------------------------------
- ``batch`` (``batch-miuscat-v1``, the default since December 2026): the fast fitter's
  stages run on many baxels of a cube at once in torch (:mod:`desomdb.science.batchfit`),
  on CPU or GPU (``device``); the kinematic stages are damped Gauss-Newton iterations with
  the variable-projection Jacobian instead of pPXF calls. Through :func:`fit_spectra`; its
  labels equal the fast fitter's to < 0.001 dex (median per baxel) at ~2.2x its speed
  (docs/measured.md, "Labels: speed").
- ``fast`` (``fast-miuscat-v2``): stellar V, σ and A_V once with a coarse 16-
  template subset on the line-free bins, gas V, σ on the continuum-subtracted line windows,
  then the full template set at fixed kinematics as regularised linear fits (one batched
  FFT, non-negative least squares on the normal equations), and two Gauss-Newton steps in
  all five nonlinear parameters, each followed by A_V on a parabola through three linear
  fits. ~4-5x the reference's fits/s with the same accuracy on both mocks (docs/measured.md,
  "Labels: speed"). Its ``fast-miuscat-v1`` (before December 2026) chose the nonlinear
  parameters by χ² + regularisation instead; rows keep the id of the fitter that made them.
- ``ppxf`` (``ppxf-miuscat-v2``, the reference): one pPXF fit with all five nonlinear
  parameters free.
All solve the weights by χ² + regularisation over the same templates and choose the
nonlinear parameters by the data χ² alone (pPXF's ``linear_fit`` hands capfit only the data
residuals); every fit runs with one BLAS thread (``threadpoolctl``), whatever the caller's
setting.

Fit set-up and conventions
--------------------------
- Input: the archive's rest-frame spectrum (4544 log bins, 59.2 km/s each, vacuum),
  divided by ``norm_flux``; masked bins excluded via ``goodpixels``.
- Stellar templates: the bundled MIUSCAT library (every second age up to 14.1 Gyr × 4
  [M/H] = 96 SSPs), convolved to the cube's own LSF (``cubes.lsf_sigma_aa``, read from its
  DISP/LSFPOST at ingest, rounded to ``fitsetup.LSF_STEP`` of the nominal) moved to the rest
  frame of its redshift, and normalised by one scalar so pPXF weights are *mass* weights
  (initial mass). Cubes ingested before the LSF was stored are fitted with the nominal MaNGA
  LSF (``manga.lsf_sigma_aa``); ``lsf_source`` (``cube`` | ``nominal``) says which. The gas
  templates get the same LSF.
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
- ``log_age_lw`` (log10 yr) and ``mh_lw`` (dex): *light*-weighted, each template's weight
  times its mean flux in ``templates.LIGHT_WINDOW_AA`` (5070-5950 Å, pPXF's default
  normalisation range), the mean of log age and of [M/H]; dust-free (the reddening acts on
  every template alike), defined for any library (no mass table needed).
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

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from desomdb.constants import L_SUN_ERG_S, luminosity_distance_cm
from desomdb.errors import ConfigError
from desomdb.science import dust, emission, gas, spectra
from desomdb.science.fastfit import _fit_fast
from desomdb.science.fitsetup import (
    CHI2_MAX,
    DEFAULT_FITTER,
    FITTER,
    FITTER_PREFERENCE,
    FITTERS,
    LINE_KEYS,
    MIN_GOOD_PIXELS,
    SN_MIN,
    FitOptions,
    FitSetup,
    empty_row,
    fit_setup,
    lsf_key,
)
from desomdb.survey import manga

__all__ = [
    "CHI2_MAX",
    "DEFAULT_FITTER",
    "FITTER",
    "FITTERS",
    "FITTER_PREFERENCE",
    "LINE_KEYS",
    "MIN_GOOD_PIXELS",
    "SN_MIN",
    "FitModel",
    "FitOptions",
    "FitSetup",
    "empty_row",
    "fit_model",
    "fit_setup",
    "fit_spectra",
    "fit_spectrum",
    "fitter_name",
]

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



#: Fitter name -> its stages.
_FITS = {"fast": _fit_fast, "ppxf": _fit_ppxf}


def fitter_name(fitter: str | None) -> str:
    """Return the fitter name (a key of :data:`FITTERS`); None gives :data:`DEFAULT_FITTER`.

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
    fitter: str | None = None, lsf_sigma_aa: np.ndarray | None = None,
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
        ``batch`` (a batch of one, :func:`fit_spectra`), ``fast`` (staged, see
        :func:`_fit_fast`) or ``ppxf`` (the reference: one pPXF fit with every nonlinear
        parameter free); default :data:`DEFAULT_FITTER`.
    lsf_sigma_aa : ndarray, shape (64,), optional
        The cube's LSF sigma (Å) at ``manga.LSF_KNOTS_AA`` (``cubes.lsf_sigma_aa``); the
        templates are convolved to it. None: the nominal MaNGA LSF (``lsf_source`` says
        which was used).

    Returns
    -------
    dict
        One labels row (see module docstring); ``status`` is ``ok``, ``unfittable`` (too few
        good pixels or no positive normalisation) or ``failed`` (with ``error``).
    """
    gate = gate or emission.LineGate()
    options = options or FitOptions()
    name = fitter_name(fitter)
    if name == "batch":
        return fit_spectra(flux[None], ivar[None], mask[None], np.array([norm_flux]), z,
                           gate, options, name, lsf_sigma_aa)[0]
    return fit_model(flux, ivar, mask, norm_flux, z, gate, options, name, lsf_sigma_aa).row


@dataclass(frozen=True)
class FitModel:
    """One spectrum's fit as curves over the data (what the explorer draws).

    All arrays have shape (4544,) on the archive's rest-frame grid, in the fit's units: flux
    divided by ``norm_flux``.

    Attributes
    ----------
    row : dict
        The labels row (:func:`fit_spectrum`'s).
    fitter : str
        The fitter name (a key of :data:`FITTERS`).
    galaxy : ndarray
        The normalised spectrum, NaN where not fitted.
    stars : ndarray or None
        The stellar continuum (reddened templates at the fitted kinematics); None when the
        spectrum was not fitted (``row['status']`` says why).
    gas : ndarray or None
        The emission-line model (sum of the gas templates).
    good : ndarray of bool
        The bins the fit used.
    """

    row: dict[str, Any]
    fitter: str
    galaxy: np.ndarray
    stars: np.ndarray | None
    gas: np.ndarray | None
    good: np.ndarray


def fit_model(
    flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: float, z: float,
    gate: emission.LineGate | None = None, options: FitOptions | None = None,
    fitter: str | None = None, lsf_sigma_aa: np.ndarray | None = None,
) -> FitModel:
    """Fit one spectrum as :func:`fit_spectrum` does; return its labels and model curves.

    The ``batch`` fitter fits a batch of one on the CPU. Parameters as :func:`fit_spectrum`.

    Returns
    -------
    FitModel
    """
    gate = gate or emission.LineGate()
    options = options or FitOptions()
    name = fitter_name(fitter)
    if name == "batch":
        _batch_options(options)
    t0 = time.perf_counter()
    row, prepared = _prepare(flux, ivar, mask, norm_flux)
    if prepared is None:
        nothing = np.full(np.shape(flux), np.nan)
        return FitModel(row, name, nothing, None, None, np.zeros(np.shape(flux), bool))
    galaxy, noise, good = prepared
    setup = _setup_for(row, z, lsf_sigma_aa)
    # One BLAS thread on every path, for the fit and for what is derived from it (the
    # line-flux errors' SVD is evaluated lazily in gas.measure_lines: 26-41 ms with one
    # thread against 0.6-1.6 s with two under load, for direct callers such as stacks).
    with threadpool_limits(1):
        if name == "batch":
            from desomdb.science import batchfit

            with batchfit.torch_threads(1):
                pp, a_v = batchfit.fit_batch(setup, galaxy[None], noise[None], good[None],
                                             options.regul)[0]
        else:
            pp, a_v = _FITS[name](setup, galaxy, noise, good, options)
        _derive(row, pp, a_v, setup, z, norm_flux, good, galaxy, noise, gate)
    row["fit_seconds"] = time.perf_counter() - t0
    gas_model = np.asarray(pp.gas_bestfit, dtype=np.float64)
    return FitModel(row, name, np.where(good, galaxy, np.nan),
                    np.asarray(pp.bestfit, dtype=np.float64) - gas_model, gas_model, good)


def _prepare(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: float
             ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Return a new labels row and the normalised spectrum, noise and good bins (4544,).

    None instead of the spectrum when it cannot be fitted (too few good bins or no positive
    normalisation); the row then says so.
    """
    row = empty_row()
    good = (mask == 0) & (ivar > 0) & np.isfinite(flux)
    row["n_good_pix"] = int(good.sum())
    if good.sum() < MIN_GOOD_PIXELS or not (np.isfinite(norm_flux) and norm_flux > 0):
        row["status"] = "unfittable"
        row["error"] = (f"{int(good.sum())} good bins (need {MIN_GOOD_PIXELS}) "
                        f"and norm_flux {norm_flux}")
        return row, None
    galaxy = np.where(good, flux / norm_flux, 0.0)
    noise = np.where(good, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)) / norm_flux, 0.0)
    noise[~good] = np.median(noise[good]) * 1e3  # pPXF needs finite noise everywhere
    return row, (galaxy, noise, good)


def _setup_for(row: dict[str, Any], z: float, lsf_sigma_aa: np.ndarray | None) -> FitSetup:
    """Return the templates of redshift ``z`` and the cube's LSF; set ``row['lsf_source']``.

    ``lsf_source`` is ``cube`` only for a usable LSF (64 finite positive values); anything
    else is fitted with, and labelled as, the nominal LSF.
    """
    usable = lsf_sigma_aa is not None and np.shape(lsf_sigma_aa) == manga.LSF_KNOTS_AA.shape \
        and bool(np.all(np.isfinite(lsf_sigma_aa) & (np.asarray(lsf_sigma_aa) > 0)))
    row["lsf_source"] = "cube" if usable else "nominal"
    return fit_setup(round(round(z / 0.005) * 0.005, 4), lsf_key(lsf_sigma_aa))


def fit_spectra(
    flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: np.ndarray, z: float,
    gate: emission.LineGate | None = None, options: FitOptions | None = None,
    fitter: str | None = None, lsf_sigma_aa: np.ndarray | None = None, device: str = "cpu",
) -> list[dict[str, Any]]:
    """Fit many rest-frame baxel spectra of one cube and derive their labels.

    The ``batch`` fitter fits :func:`batchfit.batch_size` spectra at a time
    (:mod:`desomdb.science.batchfit`: 8 on a CPU, a whole cube on a GPU) on ``device``; the
    others fit one by one
    (:func:`fit_spectrum`). A batch that raises is fitted again spectrum by spectrum, so only
    the spectrum at fault is recorded as failed.

    Parameters
    ----------
    flux, ivar : ndarray, shape (n, 4544), float32
        As :func:`fit_spectrum`, one row per baxel.
    mask : ndarray, shape (n, 4544), uint8
    norm_flux : ndarray, shape (n,)
    z : float
        drpall redshift of the cube.
    gate, options, fitter, lsf_sigma_aa
        As :func:`fit_spectrum`.
    device : str
        torch device of the ``batch`` fitter (``cpu``, ``cuda``); ignored by the others.

    Returns
    -------
    list of dict
        One labels row per spectrum, in order. ``fit_seconds`` of a batched fit is its
        batch's wall time divided by the spectra in it.
    """
    from desomdb.science import batchfit

    gate = gate or emission.LineGate()
    options = options or FitOptions()
    name = fitter_name(fitter)
    if name != "batch":
        return [_fit_one(flux[i], ivar[i], mask[i], float(norm_flux[i]), z, gate, options,
                         name, lsf_sigma_aa) for i in range(len(flux))]
    _batch_options(options)
    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(len(flux)):
        row, prepared = _prepare(flux[i], ivar[i], mask[i], float(norm_flux[i]))
        rows.append(row)
        if prepared is not None:
            todo.append((i, *prepared))
    if not todo:
        return rows
    source: dict[str, Any] = {}  # one cube: one template set and one lsf_source
    setup = _setup_for(source, z, lsf_sigma_aa)
    for i, *_ in todo:
        rows[i]["lsf_source"] = source["lsf_source"]
    with threadpool_limits(1), batchfit.torch_threads(1):
        size = batchfit.batch_size(device)
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            _fit_chunk(chunk, rows, setup, z, norm_flux, options, gate, device)
    return rows


def _batch_options(options: FitOptions) -> None:
    """Refuse options the batched fitter cannot honour (a multiplicative polynomial)."""
    if options.mdegree > 0:
        raise ConfigError(f"FitOptions(mdegree={options.mdegree}) needs the reference fitter: "
                          "use --fitter ppxf (fitter='ppxf')")


def _fit_one(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: float, z: float,
             gate: emission.LineGate, options: FitOptions, fitter: str,
             lsf_sigma_aa: np.ndarray | None) -> dict[str, Any]:
    """Return :func:`fit_spectrum`'s row, or a failed row saying why: one bad fit is recorded."""
    try:
        return fit_spectrum(flux, ivar, mask, norm_flux, z, gate, options, fitter, lsf_sigma_aa)
    except ConfigError:
        raise
    except Exception as exc:
        row = empty_row()
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row


def _fit_chunk(chunk: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
               rows: list[dict[str, Any]], setup: FitSetup, z: float, norm_flux: np.ndarray,
               options: FitOptions, gate: emission.LineGate, device: str) -> None:
    """Fit one batch and fill its rows; a batch that raises is refitted one by one."""
    from desomdb.science import batchfit

    t0 = time.perf_counter()
    try:
        fits = batchfit.fit_batch(setup, np.array([c[1] for c in chunk]),
                                  np.array([c[2] for c in chunk]),
                                  np.array([c[3] for c in chunk]), options.regul, device)
    except Exception as exc:
        if len(chunk) == 1:
            rows[chunk[0][0]]["error"] = f"{type(exc).__name__}: {exc}"
            return
        for one in chunk:
            _fit_chunk([one], rows, setup, z, norm_flux, options, gate, device)
        return
    seconds = (time.perf_counter() - t0) / len(chunk)
    for (i, galaxy, noise, good), (fit, a_v) in zip(chunk, fits, strict=True):
        t1 = time.perf_counter()
        try:
            _derive(rows[i], fit, a_v, setup, z, float(norm_flux[i]), good, galaxy, noise,
                    gate)
        except Exception as exc:  # one bad spectrum is recorded, the rest go on
            rows[i]["status"], rows[i]["error"] = "failed", f"{type(exc).__name__}: {exc}"
        rows[i]["fit_seconds"] = seconds + time.perf_counter() - t1


def _derive(row: dict[str, Any], pp: Any, a_v: float, setup: FitSetup, z: float,
            norm_flux: float, good: np.ndarray, galaxy: np.ndarray, noise: np.ndarray,
            gate: emission.LineGate) -> None:
    """Fill ``row`` with the labels of a finished fit (see the module docstring)."""
    wave = spectra.rest_wave_aa()
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
        row["log_ml_r"] = float(np.log10(setup.mass_to_light_r(weights)))
    light = weights * setup.light.reshape(setup.reg_dim)
    if light.sum() > 0:
        row["log_age_lw"] = float((light * np.log10(sps.age_grid * 1e9)).sum() / light.sum())
        row["mh_lw"] = float((light * sps.metal_grid).sum() / light.sum())
    # Initial mass per unit weight: galaxy units × norm_flux × 1e-17 × 4π D_L² / L_sun.
    d_l = luminosity_distance_cm(z)
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
