import numpy as np
import pytest

from desomdb.science import binning


def test_law_correction_values() -> None:
    got = binning.law_correction(np.array([1, 10, 99, 100, 500]))
    np.testing.assert_allclose(got, [1.0, 2.62, 1 + 1.62 * np.log10(99), 4.2, 4.2])


def _field(n: int = 30, peak: float = 40.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - n / 2, yy - n / 2)
    signal = peak * np.exp(-r / 5) + rng.uniform(0, 0.1, (n, n))
    noise = np.ones((n, n))
    return signal, noise


def test_voronoi_bins_reach_the_target_with_the_correction() -> None:
    signal, noise = _field()
    b = binning.voronoi_bins(signal, noise, target_snr=20, min_snr=2)
    assert b.method == "voronoi"
    assert b.n_bins > 5
    used = b.bin_id >= 0
    assert np.all(signal[used] / noise[used] >= 2) and np.all(signal[~used] / noise[~used] < 2)
    # Every bin's S/N is recomputed with the correction; CVT leaves them near the target.
    for k in range(b.n_bins):
        members = b.bin_id == k
        assert b.snr[k] == pytest.approx(binning.binned_snr(signal[members], noise[members]))
        assert b.n_spaxels[k] == members.sum()
    assert np.median(b.snr) > 0.8 * 20
    # The CVT step trades S/N uniformity for compact bins: outer bins can end below target
    # once the covariance correction grows with n (as FACTS.md notes for vorbin 3.2).
    # In the S/N 2-3 outskirts no bin size reaches the target once the correction is applied.
    assert np.mean(b.snr > 0.5 * 20) > 0.7
    assert b.snr.max() > 20


def test_edge_case_all_above_target_is_unbinned() -> None:
    signal = np.full((4, 4), 50.0)
    b = binning.voronoi_bins(signal, np.ones((4, 4)), target_snr=20)
    assert b.method == "unbinned" and b.n_bins == 16


def test_edge_case_total_below_target_is_one_bin() -> None:
    signal = np.full((5, 5), 2.5)
    b = binning.voronoi_bins(signal, np.ones((5, 5)), target_snr=20)
    assert b.method == "single" and b.n_bins == 1 and b.n_spaxels[0] == 25


def test_edge_case_single_spaxel_and_empty() -> None:
    signal = np.zeros((3, 3))
    signal[1, 1] = 5.0
    b = binning.voronoi_bins(signal, np.ones((3, 3)), target_snr=20)
    assert b.n_bins == 1 and b.bin_id[1, 1] == 0 and (b.bin_id == -1).sum() == 8
    empty = binning.voronoi_bins(np.zeros((3, 3)), np.ones((3, 3)))
    assert empty.n_bins == 0 and np.all(empty.bin_id == -1)


def test_spaxel_signal_noise_uses_the_g_band() -> None:
    wave = 3621.596 * 10 ** (1e-4 * np.arange(4563))
    flux = np.ones((4563, 1, 2))
    flux[wave > 6000, 0, 1] = 100.0  # outside g: must not change the signal
    ivar = np.full_like(flux, 4.0)
    good = np.ones_like(flux, dtype=bool)
    s, n = binning.spaxel_signal_noise(flux, ivar, good, wave)
    np.testing.assert_allclose(s, 1.0)
    np.testing.assert_allclose(n, 0.5)


# --------------------------------------------------------------------------- fast == reference
# The reference below is the S/N callback ingest used before BinSnr (one binned_snr per call,
# every array rebuilt), kept here only to pin that the fast path changes nothing.
def _reference_sn_func(index, signal, noise) -> float:
    return binning.binned_snr(signal[index], noise[index])


def test_bin_snr_equals_binned_snr_to_the_bit() -> None:
    rng = np.random.default_rng(3)
    signal, noise = rng.uniform(0.5, 30, 400), rng.uniform(0.5, 3, 400)
    fast = binning.BinSnr(noise)
    for size in (1, 2, 7, 99, 100, 101, 400):
        index = rng.choice(400, size, replace=False)
        assert fast(index, signal, noise) == _reference_sn_func(index, signal, noise)
    assert fast(np.int64(17), signal, noise) == _reference_sn_func(np.int64(17), signal, noise)


@pytest.mark.parametrize("wvt", [False, True])
def test_voronoi_bins_equal_vorbin_with_the_reference_callback(wvt: bool) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*PowerBin.*")
        from vorbin.voronoi_2d_binning import voronoi_2d_binning

    signal, noise = _field(n=36, seed=5)
    got = binning.voronoi_bins(signal, noise, target_snr=20, min_snr=2, wvt=wvt)
    assert got.method == "voronoi"
    use = signal / noise >= 2
    yy, xx = np.nonzero(use)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*PowerBin.*")
        ref = voronoi_2d_binning(xx.astype(float), yy.astype(float), signal[use], noise[use],
                                 20.0, plot=False, quiet=True, pixelsize=1.0,
                                 sn_func=_reference_sn_func, wvt=wvt)[0]
    _, ref = np.unique(ref, return_inverse=True)
    np.testing.assert_array_equal(got.bin_id[yy, xx], ref)
    ref_snr = [_reference_sn_func(np.flatnonzero(ref == k), signal[use], noise[use])
               for k in range(got.n_bins)]
    np.testing.assert_array_equal(got.snr, ref_snr)


def test_transmission_on_the_band_equals_correcting_the_whole_cube() -> None:
    rng = np.random.default_rng(8)
    wave = 3621.596 * 10 ** (1e-4 * np.arange(4563))
    flux = rng.normal(1.0, 0.3, (4563, 5, 6)).astype(np.float32)
    ivar = rng.uniform(0, 4, flux.shape).astype(np.float32)
    good = rng.uniform(size=flux.shape) > 0.1
    good[:, 0, 0] = False  # a spaxel without any good pixel
    t = np.linspace(0.7, 0.95, wave.size)
    s0, n0 = binning.spaxel_signal_noise(flux / t[:, None, None], ivar * t[:, None, None] ** 2,
                                         good, wave)
    s1, n1 = binning.spaxel_signal_noise(flux, ivar, good, wave, transmission=t)
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_array_equal(n1, n0)
    assert s1[0, 0] == 0 and n1[0, 0] == np.inf
