import numpy as np
import pytest

from desomdb import binning


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
