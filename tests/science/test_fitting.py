"""The fit of one spectrum (science.fitting, fastfit, fitsetup) on real and constructed spectra."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from desomdb.errors import ConfigError
from desomdb.science import fastfit, fitting, spectra

DATA = Path(__file__).parents[1] / "data" / "MaNGA_test_spectra.fits.gz"


@pytest.fixture(scope="module")
def real_fits() -> list[dict]:
    with fits.open(DATA) as hdul:
        wave = hdul["WAVE"].data
        flux, ivar = hdul["FLUX"].data.astype(float), hdul["IVAR"].data.astype(float)
        mask, z = hdul["MASK"].data, hdul["Z"].data
    f, iv, m, norm = spectra.observed_to_rest(wave, flux, ivar, mask, z)
    return [fitting.fit_spectrum(f[k], iv[k], m[k], norm[k], float(z[k])) for k in range(len(z))]


def test_real_manga_spectra(real_fits) -> None:
    status = [r["status"] for r in real_fits]
    # 7815-6101's second spaxel lies off the IFU: fully masked, reported as unfittable.
    assert status.count("unfittable") == 1 and status[6 - 1] == "unfittable"
    for r in real_fits:
        if r["status"] != "ok":
            continue
        for key in ("age_mw_gyr", "mh_mw", "log_ml_r", "ebv_star", "vel", "sigma", "chi2_red"):
            assert np.isfinite(r[key]), key
        assert 0.06 < r["age_mw_gyr"] < 14.2
        assert -0.72 <= r["mh_mw"] <= 0.23
        assert -1.5 < r["log_ml_r"] < 1.5
        assert 0.2 < r["chi2_red"] < 20
        assert 0 <= r["sigma"] < 500


def test_unfittable_spectrum_is_reported() -> None:
    row = fitting.fit_spectrum(np.zeros(4544, np.float32), np.zeros(4544, np.float32),
                              np.ones(4544, np.uint8), np.nan, 0.03)
    assert row["status"] == "unfittable" and "good bins" in row["error"]


def _constructed(library: str, age_gyr: float, ew_ha_aa: float, decrement: float,
                 snr: float, seed: int, z: float = 0.03,
                 hb_residual: float = 0.0, lsf_scale: float = 1.0,
                 sigma_kms: float = 120.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rest-frame spectrum of one solar SSP at the MaNGA LSF with Balmer + [NII] lines.

    ``lsf_scale`` renders it at that multiple of the nominal MaNGA LSF (a cube of another
    resolution); ``sigma_kms`` is the stellar dispersion.

    ``hb_residual`` adds a smooth bump (fraction of the continuum, σ = 3 Å) at Hβ: the
    absorption trough made shallower than in the templates, as template mismatch leaves it.
    """
    from ppxf import ppxf_util

    from desomdb.constants import FWHM_PER_SIGMA
    from desomdb.science import dust, emission, templates
    from desomdb.survey import manga

    lib = templates.load(templates.library_path(library))
    wave = spectra.rest_wave_aa()
    tpl = lib.templates[:, int(np.argmin(abs(lib.ages_gyr - age_gyr))),
                        int(np.argmin(abs(lib.metals_mh)))].astype(float)
    target = np.hypot(lsf_scale * manga.lsf_sigma_aa(lib.lam_vac_aa * (1 + z)) / (1 + z),
                      sigma_kms / manga.C_KMS * lib.lam_vac_aa)
    kernel = np.sqrt(np.clip(target**2 - (lib.fwhm_aa / FWHM_PER_SIGMA) ** 2, 0, None))
    spec = np.interp(wave, lib.lam_vac_aa, ppxf_util.varsmooth(lib.lam_vac_aa, tpl, kernel))
    spec *= dust.calzetti_transmission(wave, 0.1)
    spec /= spec[(wave > 4050) & (wave < 4150)].mean()
    f_ha = ew_ha_aa * np.median(spec[np.abs(wave - dust.HALPHA_AA) < 60])
    for name, f in (("Halpha", f_ha), ("Hbeta", f_ha / decrement), ("NII6583", 0.3 * f_ha),
                    ("NII6548", 0.1 * f_ha), ("OIII5007", 0.5 * f_ha / decrement)):
        lam = emission.LINES_AA[name]
        s = np.hypot(60.0 / manga.C_KMS * lam,
                     lsf_scale * manga.lsf_sigma_aa(np.array(lam * (1 + z))) / (1 + z))
        spec += f * np.exp(-0.5 * ((wave - lam) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
    spec += hb_residual * np.exp(-0.5 * ((wave - dust.HBETA_AA) / 3.0) ** 2)
    rng = np.random.default_rng(seed)
    flux = spec + rng.normal(0.0, 1.0 / snr, wave.size)
    return (flux.astype(np.float32), np.full(wave.size, snr**2, np.float32),
            np.zeros(wave.size, np.uint8))


def test_the_cubes_own_lsf_removes_the_sigma_bias_of_the_nominal_one() -> None:
    # A cube whose LSF is 1.3x the nominal MaNGA model (another DRP or instrument setting),
    # an old population at σ_* = 80 km/s: fitted with the nominal LSF, the extra instrumental
    # width lands in σ_*; fitted with the cube's own LSF, it does not.
    from desomdb.survey import manga

    flux, ivar, mask = _constructed("miuscat", 8.0, 0.0, 2.86, 40.0, seed=5, lsf_scale=1.3,
                                    sigma_kms=80.0)
    cube_lsf = 1.3 * manga.lsf_sigma_aa(manga.LSF_KNOTS_AA)
    nominal = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03)
    own = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, lsf_sigma_aa=cube_lsf)
    assert nominal["lsf_source"] == "nominal" and own["lsf_source"] == "cube"
    assert nominal["sigma"] - 80.0 > 15.0  # the bias is real
    assert own["sigma"] == pytest.approx(80.0, abs=6.0)
    assert own["chi2_red"] < nominal["chi2_red"]


def test_light_weighted_labels_of_one_ssp_are_its_age_and_metallicity() -> None:
    flux, ivar, mask = _constructed("miuscat", 5.0, 0.0, 2.86, 60.0, seed=6)
    row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03)
    assert row["log_age_lw"] == pytest.approx(np.log10(5.0e9), abs=0.12)
    assert row["mh_lw"] == pytest.approx(0.0, abs=0.1)
    # Light favours the young: never older than the mass-weighted age.
    assert row["log_age_lw"] <= np.log10(row["age_mw_gyr"] * 1e9) + 1e-6


def test_mass_to_light_is_ppxfs_with_the_luminosities_computed_once() -> None:
    setup = fitting.fit_setup(0.03)
    rng = np.random.default_rng(1)
    for _ in range(3):
        weights = rng.random(setup.reg_dim) * (rng.random(setup.reg_dim) > 0.5)
        assert setup.mass_to_light_r(weights) == pytest.approx(
            setup.sps.mass_to_light(weights, band="SDSS/r", quiet=True), rel=1e-12)


def test_weak_hbeta_in_absorption_publishes_no_negative_reddening() -> None:
    # An old population whose Hβ trough is 3 % shallower than the templates', weak true
    # emission (EW(Hα) 1 Å, true decrement 2.86): pPXF fills the mismatch with "Hβ emission",
    # so the raw decrement drops below 2.86. The gate must not publish it.
    from desomdb.science.emission import GasFlag

    flux, ivar, mask = _constructed("miuscat", 10.0, 1.0, 2.86, 30.0, seed=3,
                                    hb_residual=0.03)
    row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03)
    assert row["status"] == "ok"
    assert row["ebv_gas_raw"] < 0  # the trap is real: the raw value is negative
    assert row["sn_hb"] < 3 < row["sn_ha"]  # the mismatch allowance widened Hβ's error
    assert np.isnan(row["ebv_gas"])
    assert row["ebv_gas_flags"] & GasFlag.HB_LOW_SN
    # sSFR is still given, corrected with the stellar dust, and says so.
    assert np.isfinite(row["log_ssfr"]) and row["ssfr_flags"] & GasFlag.DUST_FROM_STARS
    assert row["bpt_class"] is None and row["d_bpt_flags"] & GasFlag.HB_LOW_SN


def test_strong_lines_from_another_library_publish_the_decrement() -> None:
    # BC03 continuum (a library the fits do not use) with strong lines, E(B-V)_gas = 0.3.
    true_ebv = 0.3
    decrement = 2.86 * 10 ** (0.4 * true_ebv * 1.27)  # k(Hβ) - k(Hα) = 1.27, Cardelli
    flux, ivar, mask = _constructed("bc03", 2.5, 30.0, decrement, 25.0, seed=4)
    row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03)
    assert row["ebv_gas_flags"] == 0 and row["d_bpt_flags"] == 0
    assert row["ebv_gas"] == pytest.approx(true_ebv, abs=0.1)
    assert row["ebv_gas_raw"] == row["ebv_gas"]
    assert abs(row["ebv_gas_raw"] - true_ebv) < 3 * row["ebv_gas_raw_err"]
    assert row["bpt_class"] == "star_forming"  # log [NII]/Hα = -0.52, [OIII]/Hβ = -0.3
    assert row["ew_ha"] == pytest.approx(30.0, rel=0.15)
    assert row["ssfr_flags"] == 0


#: (library, age Gyr, EW(Hα) Å, Hα/Hβ, S/N, seed) of the constructed spectra the fast fitter
#: is checked on against the reference: a same-library and a second-library continuum.
_AGREEMENT_CASES = (("miuscat", 2.5, 10.0, 3.5, 30.0, 1), ("bc03", 1.0, 20.0, 4.0, 25.0, 2))


@pytest.mark.parametrize("case", _AGREEMENT_CASES, ids=[c[0] for c in _AGREEMENT_CASES])
def test_fast_fitter_agrees_with_the_reference(case) -> None:
    # A known SSP at σ = 120 km/s behind E(B-V)_* = 0.1 with Balmer, [NII] and [OIII] lines
    # (see _constructed). Tolerances: ~3x the largest difference seen on these spectra.
    library, age, ew, decrement, snr, seed = case
    flux, ivar, mask = _constructed(library, age, ew, decrement, snr, seed=seed)
    ref = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="ppxf")
    fast = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="fast")
    assert ref["status"] == fast["status"] == "ok"
    assert fast["ebv_star"] == pytest.approx(ref["ebv_star"], abs=0.01)
    assert fast["ebv_star"] == pytest.approx(0.1, abs=0.02)  # and both find the truth
    assert np.log10(fast["age_mw_gyr"] / ref["age_mw_gyr"]) == pytest.approx(0, abs=0.06)
    assert fast["mh_mw"] == pytest.approx(ref["mh_mw"], abs=0.05)
    assert fast["log_ml_r"] == pytest.approx(ref["log_ml_r"], abs=0.03)
    assert fast["vel"] == pytest.approx(ref["vel"], abs=6.0)
    assert fast["sigma"] == pytest.approx(ref["sigma"], abs=10.0)
    assert fast["sigma_gas"] == pytest.approx(ref["sigma_gas"], abs=3.0)
    for key in ("ha", "hb", "nii6583", "oiii5007"):
        assert fast[f"flux_{key}"] == pytest.approx(ref[f"flux_{key}"], rel=0.03), key
        assert fast[f"sn_{key}"] == pytest.approx(ref[f"sn_{key}"], rel=0.05), key
    assert fast["ebv_gas_raw"] == pytest.approx(ref["ebv_gas_raw"], abs=0.02)
    assert fast["chi2_red"] == pytest.approx(ref["chi2_red"], rel=0.01)
    assert fast["bpt_class"] == ref["bpt_class"]
    assert fast["log_ssfr"] == pytest.approx(ref["log_ssfr"], abs=0.05)


def test_gauss_newton_step_moves_the_gas_kinematics_towards_the_truth() -> None:
    # Constructed: stars at V = 0, σ = 120 km/s, A_V = 0.405 (E(B-V)_* 0.1); lines at V = 0,
    # σ = 60 km/s. Started with the gas 30 km/s off in V and 20 km/s low in σ, one step (the
    # weights held) must bring both most of the way back and leave the stars where they are.
    # Without lines the gas columns are zero and the gas kinematics must not move.
    setup = fitting.fit_setup(0.03)
    for ew, moves in ((20.0, True), (0.0, False)):
        flux, ivar, _ = _constructed("miuscat", 2.5, ew, 3.5, 30.0, seed=1)
        galaxy, noise = flux.astype(float), 1 / np.sqrt(ivar.astype(float))
        good = np.ones(flux.size, bool)
        start = (0.0, 120.0, 30.0, 40.0)
        fit = fastfit.linear_fit(setup, galaxy, noise, good, start, 0.405, 10.0)
        vel, sig, a_v, vel_gas, sig_gas = fastfit._gauss_newton_step(
            setup, galaxy, noise, good, fit, (0.0, 120.0, 0.405, 30.0, 40.0))
        assert abs(vel) < 5 and abs(sig - 120) < 10 and abs(a_v - 0.405) < 0.05
        if moves:
            assert abs(vel_gas) < 10, vel_gas
            assert abs(sig_gas - 60) < 10, sig_gas
        else:
            assert (vel_gas, sig_gas) == pytest.approx((30.0, 40.0), abs=1e-6)


def test_fast_linear_fit_matches_pixels_of_ppxf() -> None:
    # The batched convolution and the Cholesky-NNLS solve rebuild pPXF's own model: at the
    # reference fit's kinematics and A_V, the same objective gives the same best fit.
    from ppxf.ppxf import ppxf

    flux, ivar, _ = _constructed("miuscat", 2.5, 10.0, 3.5, 30.0, seed=1)
    setup = fitting.fit_setup(0.03)
    good = np.ones(flux.size, bool)
    galaxy, noise = flux.astype(float), 1 / np.sqrt(ivar.astype(float))
    n_stars, n_gas = setup.stars.shape[1], setup.gas.shape[1]
    component = np.array([0] * n_stars + [1] * n_gas)
    kin = (10.0, 130.0, 5.0, 70.0)
    ref = ppxf(np.column_stack([setup.stars, setup.gas]), galaxy, noise, setup.velscale,
               start=[list(kin[:2]), list(kin[2:])], moments=[-2, -2], degree=-1,
               component=component, gas_component=component > 0, gas_names=setup.gas_names,
               lam=spectra.rest_wave_aa(), lam_temp=setup.lam_temp, regul=10.0,
               reg_dim=setup.reg_dim, quiet=True)
    ours = fastfit.linear_fit(setup, galaxy, noise, good, kin, 0.0, 10.0)
    assert np.max(np.abs(ours.bestfit - ref.bestfit)) < 1e-3 * np.max(ref.bestfit)
    np.testing.assert_allclose(ours.gas_flux, ref.gas_flux, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ours.gas_flux_error, ref.gas_flux_error, rtol=1e-6)


def test_fast_and_batch_fitters_limit_threads_and_reject_a_polynomial(monkeypatch) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    flux, ivar, mask = _constructed("miuscat", 2.5, 10.0, 3.5, 30.0, seed=1)
    seen: list[int] = []
    real = fastfit.linear_fit

    def spy(*args, **kwargs):
        seen.extend(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        return real(*args, **kwargs)

    monkeypatch.setattr(fastfit, "linear_fit", spy)
    # The line-flux errors (an SVD evaluated when the lines are measured, after the fit) too:
    # seen with 2 threads under load, 0.6-1.6 s per stack fit against 26-41 ms with one.
    from desomdb.science import gas

    in_lines: list[int] = []
    real_lines = gas.measure_lines

    def lines_spy(*args, **kwargs):
        in_lines.extend(lib["num_threads"] for lib in threadpool_info()
                        if lib["user_api"] == "blas")
        return real_lines(*args, **kwargs)

    monkeypatch.setattr(gas, "measure_lines", lines_spy)
    with threadpool_limits(2, user_api="blas"):
        row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="fast")
    assert row["status"] == "ok" and seen and set(seen) == {1}
    assert in_lines and set(in_lines) == {1}
    in_lines.clear()
    with threadpool_limits(2, user_api="blas"):  # the batched fitter derives its lines so too
        row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="batch")
    assert row["status"] == "ok" and in_lines and set(in_lines) == {1}
    for fitter in ("fast", "batch"):
        with pytest.raises(ConfigError, match="--fitter ppxf"):
            fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter=fitter,
                                 options=fitting.FitOptions(mdegree=4))
    with pytest.raises(ConfigError, match="unknown fitter"):
        fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="nope")
