"""The batched fitter (science.batchcore, batchfit, fitting.fit_spectra) against scipy and pPXF."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls
from test_fitting import _constructed

from desomdb.errors import ConfigError
from desomdb.science import batchcore, batchfit, dust, fastfit, fitting, spectra

#: Constructed spectra fitted in one batch: (library, age Gyr, EW(Hα) Å, Hα/Hβ, S/N, seed,
#: extra E(B-V)_*). The last is dusty (A_V ~1.2): its stellar stage stalled at A_V 0.6
#: before the Jacobian was projected (variable projection), where pPXF and the fast fitter
#: find 1.2.
_CASES = (("miuscat", 2.5, 10.0, 3.5, 30.0, 1, 0.0), ("bc03", 1.0, 20.0, 4.0, 25.0, 2, 0.0),
          ("miuscat", 10.0, 0.0, 2.86, 20.0, 3, 0.0), ("bc03", 0.3, 30.0, 4.0, 30.0, 4, 0.2))


def _spectrum(case: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    *args, extra_ebv = case
    flux, ivar, mask = _constructed(*args)
    att = dust.calzetti_transmission(spectra.rest_wave_aa(), extra_ebv)
    return (flux * att).astype(np.float32), (ivar / att**2).astype(np.float32), mask


@pytest.fixture(scope="module")
def both() -> list[tuple[dict, dict]]:
    spec = [_spectrum(c) for c in _CASES]
    flux, ivar, mask = (np.array([s[k] for s in spec]) for k in range(3))
    batch = fitting.fit_spectra(flux, ivar, mask, np.ones(len(spec)), 0.03, fitter="batch")
    fast = [fitting.fit_spectrum(*s, 1.0, 0.03, fitter="fast") for s in spec]
    return list(zip(batch, fast, strict=True))


def _least_squares_problems(seed: int, batch: int, rows: int, cols: int):
    """Random min ||A x − b|| problems, x ≥ 0: normal equations and scipy's solutions."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, rows, cols))
    b = rng.normal(size=(batch, rows))
    gram = torch.as_tensor(a.transpose(0, 2, 1) @ a)
    rhs = torch.as_tensor(np.einsum("bpk,bp->bk", a, b))
    return gram, rhs, np.array([scipy_nnls(a[i], b[i])[0] for i in range(batch)])


def test_nnls_is_the_exact_non_negative_solution() -> None:
    gram, rhs, expected = _least_squares_problems(0, 5, 300, 40)
    cold = batchcore.nnls(gram, rhs).numpy()
    np.testing.assert_allclose(cold, expected, atol=1e-10)
    assert 5 < (expected > 0).sum(axis=1).min() < 40  # bounds active and inactive
    # A warm start, right or wrong, changes the path, not the answer.
    for start in (torch.as_tensor(expected > 0), torch.as_tensor(expected == 0)):
        np.testing.assert_allclose(batchcore.nnls(gram, rhs, start).numpy(), expected,
                                   atol=1e-10)


def test_lawson_hanson_fallback_gives_the_same_solution(monkeypatch) -> None:
    # Block pivoting that never finishes hands every problem to Lawson-Hanson.
    gram, rhs, expected = _least_squares_problems(3, 4, 200, 30)
    monkeypatch.setattr(batchcore, "PIVOT_ROUNDS", 0)
    np.testing.assert_allclose(batchcore.nnls(gram, rhs).numpy(), expected, atol=1e-10)


def test_fft_lengths_are_fast_and_long_enough() -> None:
    for need in (1000, 4097, 4801, 4860, 5121, 8192):
        n = batchfit.fft_length(need)
        odd = n >> (n & -n).bit_length() - 1
        assert need <= n < 1.25 * need and odd in batchfit._FFT_ODD_FACTORS and n % 64 == 0
    assert batchfit.fft_length(4860) == 5120  # faster than scipy's 4860 (measured)


def test_convolution_is_ppxfs_on_the_galaxy_bins() -> None:
    # The shorter FFT length must not wrap templates onto the galaxy bins, up to the largest
    # velocity and dispersion the fitter allows. Below ~1 pixel (59 km/s) the Gaussian's
    # transform is not band-limited and the kernel depends on the FFT length at 3e-5 of the
    # template (measured at σ = 30 km/s, V = 1900 km/s), far below any spectrum's noise.
    setup = fitting.fit_setup(0.03)
    tp = batchfit._templates(setup, "cpu", 10.0)
    assert tp.npad < setup.npad
    cases = ((0.0, 120.0, 1e-9), (-1900.0, 900.0, 1e-9), (1900.0, 900.0, 1e-9),
             (-1900.0, 120.0, 1e-9), (1900.0, 30.0, 1e-4))
    vel = torch.as_tensor([c[0] for c in cases], dtype=torch.float64)
    sig = torch.as_tensor([c[1] for c in cases], dtype=torch.float64)
    ours = batchcore.convolve(tp, tp.rfft_stars, vel, sig).numpy()
    for i, (v, s, tol) in enumerate(cases):
        ref = fastfit.convolved_templates(setup, v, s, slice(0, ours.shape[1]))
        np.testing.assert_allclose(ours[i].T, ref, atol=tol * np.abs(ref).max())


def test_batched_fits_equal_the_fast_fitters(both) -> None:
    # The same stages and objective, so the same minimum: tolerances ~5x the largest
    # difference seen on these spectra.
    for batch, fast in both:
        assert batch["status"] == fast["status"] == "ok"
        assert batch["chi2_red"] == pytest.approx(fast["chi2_red"], rel=2e-3)
        assert batch["ebv_star"] == pytest.approx(fast["ebv_star"], abs=0.01)
        assert batch["vel"] == pytest.approx(fast["vel"], abs=2.0)
        assert batch["sigma"] == pytest.approx(fast["sigma"], abs=3.0)
        assert batch["log_age_lw"] == pytest.approx(fast["log_age_lw"], abs=0.02)
        assert batch["mh_lw"] == pytest.approx(fast["mh_lw"], abs=0.02)
        assert batch["log_ml_r"] == pytest.approx(fast["log_ml_r"], abs=0.02)
        if fast["sn_ha"] > 10:
            assert batch["flux_ha"] == pytest.approx(fast["flux_ha"], rel=0.01)
            assert batch["sigma_gas"] == pytest.approx(fast["sigma_gas"], abs=2.0)
            assert batch["log_ssfr"] == pytest.approx(fast["log_ssfr"], abs=0.02)
        assert batch["fit_seconds"] > 0 and batch["lsf_source"] == "nominal"
    dusty = both[-1][0]
    assert dusty["ebv_star"] > 0.25  # 0.1 of _constructed + 0.2


def test_a_batch_that_raises_is_fitted_one_by_one(monkeypatch) -> None:
    spec = [_spectrum(c) for c in _CASES[:3]]
    flux, ivar, mask = (np.array([s[k] for s in spec]) for k in range(3))
    flux[1] = np.nan  # unfittable: no good bins; never reaches the fitter
    real = batchfit.fit_batch
    sizes: list[int] = []

    def fails_on_the_first_spectrum(setup, galaxy, *args, **kwargs):
        sizes.append(len(galaxy))
        if np.allclose(galaxy[0], flux[0]):
            raise FloatingPointError("bad spectrum")
        return real(setup, galaxy, *args, **kwargs)

    monkeypatch.setattr(batchfit, "fit_batch", fails_on_the_first_spectrum)
    rows = fitting.fit_spectra(flux, ivar, mask, np.ones(3), 0.03, fitter="batch")
    assert [r["status"] for r in rows] == ["failed", "unfittable", "ok"]
    assert "FloatingPointError: bad spectrum" in rows[0]["error"]
    assert sizes == [2, 1, 1]


def test_batch_fitter_restores_threads_and_rejects_a_polynomial() -> None:
    flux, ivar, mask = _spectrum(_CASES[0])
    before = torch.get_num_threads()
    row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter="batch")
    assert row["status"] == "ok" and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="--fitter ppxf"):
        fitting.fit_spectra(flux[None], ivar[None], mask[None], np.ones(1), 0.03,
                            fitter="batch", options=fitting.FitOptions(mdegree=4))


def test_an_unusable_cube_lsf_is_labelled_nominal() -> None:
    # Review finding: an LSF array lsf_key rejects was fitted with the nominal LSF but
    # labelled 'cube'.
    flux, ivar, mask = _spectrum(_CASES[0])
    bad = np.full(64, np.nan)
    for fitter in ("fast", "batch"):
        row = fitting.fit_spectrum(flux, ivar, mask, 1.0, 0.03, fitter=fitter,
                                   lsf_sigma_aa=bad)
        assert row["status"] == "ok" and row["lsf_source"] == "nominal", fitter


def test_the_gpu_benchmark_fits_from_saved_arrays_without_the_package(tmp_path) -> None:
    # bench_gpu.py loads batchcore.py by path (the GPU machine lacks the package's other
    # dependencies) and rebuilds the templates from arrays saved here.
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tp = batchfit._templates(fitting.fit_setup(0.03), "cpu", 10.0)
    arrays: dict = tp.to_arrays()
    np.savez(tmp_path / "templates.npz", **arrays)
    core = bench._batchcore()
    again = core.Templates.from_arrays(np.load(tmp_path / "templates.npz"), "cpu")
    spec_ = [_spectrum(c) for c in _CASES[:2]]
    galaxy = torch.as_tensor(np.array([s[0] for s in spec_]), dtype=torch.float64)
    weight = torch.as_tensor(np.array([np.sqrt(s[1]) for s in spec_]), dtype=torch.float64)
    direct, loaded = batchcore.solve(tp, galaxy, weight), core.solve(again, galaxy, weight)
    np.testing.assert_allclose(loaded.kin.numpy(), direct.kin.numpy(), rtol=1e-10)
    np.testing.assert_allclose(loaded.fit.weights.numpy(), direct.fit.weights.numpy(),
                               rtol=1e-8, atol=1e-12)
    if not torch.cuda.is_available():
        assert bench.run_fitter(tmp_path, "cuda", (8,))["batch_fitter"].startswith("not run")


def test_one_failing_fit_of_the_other_fitters_is_recorded_and_the_rest_land(monkeypatch) -> None:
    spec = [_spectrum(c) for c in _CASES[:2]]
    flux, ivar, mask = (np.array([s[k] for s in spec]) for k in range(3))
    real = fitting._fit_fast
    calls: list[int] = []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("singular")
        return real(*args, **kwargs)

    monkeypatch.setitem(fitting._FITS, "fast", first_fails)
    rows = fitting.fit_spectra(flux, ivar, mask, np.ones(2), 0.03, fitter="fast")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"] == "LinAlgError: singular"
