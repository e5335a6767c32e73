import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desomdb.science import spectra
from desomdb.survey import manga


def test_rest_grid() -> None:
    w = spectra.rest_wave_aa()
    assert w.size == 4544 and w[0] == pytest.approx(3650) and w[-1] == pytest.approx(8950)
    np.testing.assert_allclose(np.diff(np.log10(w)), np.log10(8950 / 3650) / 4543)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 0.15), st.integers(0, 2**31 - 1))
def test_resampling_conserves_flux(z: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    wave = manga.wave_obs_aa()
    flux = rng.uniform(0.5, 2.0, (wave.size, 1))
    ivar = np.ones_like(flux)
    good = np.ones_like(flux, dtype=bool)
    good[spectra.sky_mask(wave)] = False
    f_rest, _, mask = spectra.resample_to_rest(wave, flux, ivar, good, z)
    # Compare integrals over a rest window far from the sky masks' edges: ∫ f_rest dλ_rest
    # equals ∫ f_obs dλ_obs over the matching observed range.
    rest = spectra.rest_wave_aa()
    edges = np.exp(np.concatenate([[np.log(rest[0]) - 0.5 * np.log(rest[1] / rest[0])],
                                   0.5 * (np.log(rest[1:]) + np.log(rest[:-1])),
                                   [np.log(rest[-1]) + 0.5 * np.log(rest[-1] / rest[-2])]]))
    j0, j1 = 200, 400  # rest bins 200..399
    lo_rest, hi_rest = edges[j0], edges[j1]
    assert not mask[0, j0:j1].any()
    integral_rest = np.sum(f_rest[0, j0:j1] * np.diff(edges)[j0:j1])
    in_edges = np.exp(np.concatenate([[np.log(wave[0]) - 0.5e-4 * np.log(10)],
                                      0.5 * (np.log(wave[1:]) + np.log(wave[:-1])),
                                      [np.log(wave[-1]) + 0.5e-4 * np.log(10)]]))
    lo, hi = lo_rest * (1 + z), hi_rest * (1 + z)
    overlap = np.clip(np.minimum(in_edges[1:], hi) - np.maximum(in_edges[:-1], lo), 0, None)
    integral_obs = np.sum(flux[:, 0] * overlap)
    assert integral_rest == pytest.approx(integral_obs, rel=1e-6)


def test_constant_spectrum_and_noise_propagation() -> None:
    wave = manga.wave_obs_aa()
    z = 0.05
    flux = np.full((wave.size, 400), 3.0)
    rng = np.random.default_rng(1)
    noisy = flux + rng.normal(0, 0.5, flux.shape)
    ivar = np.full_like(flux, 4.0)
    good = np.ones_like(flux, dtype=bool)
    f_rest, iv_rest, mask = spectra.resample_to_rest(wave, noisy, ivar, good, z)
    ok = mask[0] == 0
    np.testing.assert_allclose(f_rest[:, ok].mean(axis=0), 3.0 * (1 + z), rtol=0.05)
    assert f_rest[:, ok].mean() == pytest.approx(3.0 * (1 + z), rel=1e-3)
    # The propagated variance matches the scatter across realisations.
    predicted = 1 / iv_rest[0, ok]
    measured = f_rest[:, ok].var(axis=0)
    assert np.median(measured / predicted) == pytest.approx(1.0, rel=0.1)


def test_masks_propagate() -> None:
    wave = manga.wave_obs_aa()
    flux = np.ones((wave.size, 1))
    ivar = np.ones_like(flux)
    good = np.ones_like(flux, dtype=bool)
    bad = (wave > 5000) & (wave < 5050)
    good[bad] = False
    flux[bad] = 1e6  # must never leak
    _, _, mask = spectra.resample_to_rest(wave, flux, ivar, good, 0.0)
    rest = spectra.rest_wave_aa()
    assert mask[0, (rest > 5005) & (rest < 5045)].all()
    assert not mask[0, (rest > 4000) & (rest < 4900)].any()
    # The sky lines are masked in the observed frame.
    _, _, mask_z = spectra.resample_to_rest(wave, np.ones((wave.size, 1)), ivar,
                                            np.ones_like(good), 0.1)
    assert mask_z[0, np.abs(rest - 5578.9 / 1.1) < 1].all()


def test_coadd_sums_and_corrects_for_missing_members() -> None:
    flux = np.ones((5, 4))
    ivar = np.full((5, 4), 4.0)
    good = np.ones((5, 4), dtype=bool)
    good[0, 0] = False
    good[1, :3] = False
    f, iv, g, n = spectra.coadd(flux, ivar, good, np.zeros(4, dtype=int), 1)
    assert n[0] == 4
    assert f[2, 0] == pytest.approx(4.0) and iv[2, 0] == pytest.approx(1.0)
    assert f[0, 0] == pytest.approx(4.0)  # 3 good members, scaled by 4/3
    assert not g[1, 0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_coadd_of_many_bins_equals_each_bin_alone(n_bins: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_spaxels = n_bins + 5
    bin_of = np.concatenate([np.arange(n_bins), rng.integers(0, n_bins, 5)])
    flux = rng.normal(size=(7, n_spaxels))
    ivar = rng.uniform(0.5, 2, size=(7, n_spaxels))
    good = rng.random((7, n_spaxels)) > 0.3
    f, iv, g, n = spectra.coadd(flux, ivar, good, bin_of, n_bins)
    for b in range(n_bins):
        sel = bin_of == b
        fb, ivb, gb, nb = spectra.coadd(flux[:, sel], ivar[:, sel], good[:, sel],
                                        np.zeros(sel.sum(), dtype=int), 1)
        np.testing.assert_allclose(f[:, b], fb[:, 0])
        np.testing.assert_allclose(iv[:, b], ivb[:, 0])
        assert (g[:, b] == gb[:, 0]).all() and n[b] == nb[0] == sel.sum()
        # Masked pixels never leak: the sum uses good members only.
        m = good[:, sel]
        with np.errstate(invalid="ignore", divide="ignore"):
            direct = np.where(m, flux[:, sel], 0).sum(1) * sel.sum() / m.sum(1)
        ok = m.sum(1) > 0
        # float32 sums: rounding is relative to the summed magnitudes, not to a sum that
        # cancels towards 0 (a leaked masked pixel would be off by O(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(m, np.abs(flux[:, sel]), 0).sum(1) * sel.sum() / m.sum(1)
        np.testing.assert_allclose(f[ok, b], direct[ok], rtol=1e-5, atol=1e-6 * scale[ok].max())


def test_norm_flux_window() -> None:
    rest = spectra.rest_wave_aa()
    flux = np.where((rest >= 4050) & (rest <= 4150), 2.0, 9.0)[None, :]
    mask = np.zeros_like(flux, dtype=np.uint8)
    assert spectra.norm_flux(flux, mask)[0] == pytest.approx(2.0)
    mask[:, (rest >= 4000) & (rest <= 4200)] = 1
    assert np.isnan(spectra.norm_flux(flux, mask)[0])


def test_from_list_column_accepts_variable_size_lists_of_equal_length() -> None:
    """DuckDB returns the archive's fixed-size list columns as plain lists; both give the
    same (n, width) array, and rows of unequal length are refused."""
    import pyarrow as pa

    from desomdb.science.spectra import from_list_column

    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 3)
    plain = pa.chunked_array([fixed.cast(pa.list_(pa.float32()))[:1],
                              fixed.cast(pa.list_(pa.float32()))[1:]])
    np.testing.assert_array_equal(from_list_column(fixed), values)
    np.testing.assert_array_equal(from_list_column(plain), values)
    np.testing.assert_array_equal(from_list_column(plain.combine_chunks()[2:]), values[2:])
    with pytest.raises(ValueError, match="lengths"):
        from_list_column(pa.array([[1.0, 2.0], [3.0]]))


def _coadd_float64(flux, ivar, good, bin_of, n_bins):
    """The float64 co-add that the float32 one replaced (reference for the same sums)."""
    from scipy import sparse

    member = sparse.csr_matrix((np.ones(bin_of.size), (bin_of, np.arange(bin_of.size))),
                               shape=(n_bins, bin_of.size))
    n_members = np.asarray(member.sum(axis=1)).ravel()
    n_good = (member @ good.astype(np.float64).T).T
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(good, 1.0 / np.where(ivar > 0, ivar, 1.0), 0.0)
        scale = np.where(n_good > 0, n_members[None, :] / n_good, 0.0)
        flux_sum = (member @ np.where(good, flux, 0.0).T).T * scale
        var_sum = (member @ var.T).T * scale**2
        ivar_sum = np.where(var_sum > 0, 1.0 / var_sum, 0.0)
    return flux_sum, ivar_sum, (n_good * 2 >= n_members[None, :]) & (n_good > 0), n_members


def _resample_float64(wave, flux, ivar, good, z):
    """The float64 resampling that the float32 one replaced (reference)."""
    dlog10 = float(np.log10(wave[1] / wave[0]))
    W = spectra._matrix_for(round(float(z), 10), float(wave[0]), wave.size, dlog10)
    g = (good & ~spectra.sky_mask(wave)[:, None]).astype(np.float64)
    var = np.where(g > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), 0.0)
    width = np.asarray(W.sum(axis=1)).ravel()[:, None]
    covered = W @ g
    with np.errstate(divide="ignore", invalid="ignore"):
        f_out = (W @ (g * flux)) / covered
        v_out = ((W.multiply(W)) @ var) / covered**2
    ok = covered >= spectra.MIN_GOOD_COVERAGE * width
    with np.errstate(divide="ignore"):
        ivar_rest = np.where(ok & (v_out > 0), 1.0 / (v_out * (1 + z) ** 2), 0.0).T
    return np.where(ok, f_out * (1 + z), 0.0).T, ivar_rest, (~ok).T.astype(np.uint8)


def test_float32_coadd_and_resampling_match_the_float64_ones() -> None:
    """Ingest co-adds and resamples in float32 (the cube's precision); on a cube-like
    block with masked pixels, bad ivar and bins of 1 to 40 spaxels the results are the
    float64 implementation's to float32 rounding, with the same masks."""
    rng = np.random.default_rng(3)
    wave = manga.wave_obs_aa()
    n_bins = 60
    bin_of = np.concatenate([np.arange(n_bins), rng.integers(0, 20, 400)])
    n_sp = bin_of.size
    flux = (rng.normal(1.0, 0.3, (wave.size, n_sp)) * 5).astype(np.float32)
    ivar = rng.uniform(0.5, 4, (wave.size, n_sp)).astype(np.float32)
    ivar[rng.random(ivar.shape) < 0.01] = 0
    good = rng.random((wave.size, n_sp)) > 0.05
    good[1000:1100, :30] = False  # a masked stretch in some bins
    got = spectra.coadd(flux, ivar, good, bin_of, n_bins)
    ref = _coadd_float64(flux.astype(np.float64), ivar.astype(np.float64), good, bin_of, n_bins)
    for a, b in zip(got[:2], ref[:2], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7 * np.abs(b).max())
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[3], ref[3])
    z = 0.0312
    rs = spectra.resample_to_rest(wave, got[0], got[1], got[2], z)
    rr = _resample_float64(wave, ref[0], ref[1], ref[2], z)
    np.testing.assert_array_equal(rs[2], rr[2])
    assert rs[0].dtype == np.float32 and rs[0].flags.c_contiguous
    for a, b in zip(rs[:2], rr[:2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
