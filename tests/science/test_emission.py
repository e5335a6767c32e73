import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desomdb.science import dust, emission


def _brute_force(x: float, y: float) -> float:
    cx = 0.05 - np.geomspace(1e-7, 8, 400_000)
    cy = emission.kauffmann03(cx)
    return float(np.sqrt((cx - x) ** 2 + (cy - y) ** 2).min())


@settings(max_examples=40, deadline=None)
@given(st.floats(-2.0, 0.8), st.floats(-1.5, 1.5))
def test_d_bpt_is_the_shortest_distance(x: float, y: float) -> None:
    d = emission.d_bpt(x, y)[0]
    assert abs(d) == pytest.approx(_brute_force(x, y), abs=2e-4)


def test_d_bpt_sign() -> None:
    x = np.array([-0.8, -0.8, 0.2, 0.2])
    y = emission.kauffmann03(np.array([-0.8, -0.8, -0.8, -0.8])) + np.array([-0.3, 0.3, 0, 0])
    d = emission.d_bpt(x, y)
    assert d[0] < 0 < d[1] and d[2] > 0
    assert np.isnan(emission.d_bpt(np.nan, 0.1)[0])
    on_curve = emission.d_bpt(-0.5, emission.kauffmann03(np.array(-0.5)))[0]
    assert abs(on_curve) < 1e-9


def test_sfr_calibration_round_trip() -> None:
    assert emission.sfr_from_halpha(emission.halpha_from_sfr(1.0)) == pytest.approx(1.0)
    assert emission.halpha_from_sfr(1.0) == pytest.approx(1.266e41, rel=1e-3)


def test_calzetti_at_v_band() -> None:
    t = dust.calzetti_transmission(np.array([5500.0]), 0.25)
    assert t[0] == pytest.approx(10 ** (-0.4 * 4.05 * 0.25), rel=1e-3)


def test_balmer_decrement_inverts_nebular_attenuation() -> None:
    ebv = np.array([0.0, 0.3, 1.1])
    tr = dust.nebular_transmission(np.array([dust.HALPHA_AA, dust.HBETA_AA]), ebv)
    ha, hb = 2.86 * tr[:, 0], 1.0 * tr[:, 1]
    np.testing.assert_allclose(dust.ebv_gas_from_balmer(ha, hb), ebv, atol=1e-10)
    assert np.isnan(dust.ebv_gas_from_balmer(1.0, 0.0))


def test_cardelli_k_values() -> None:
    k_hb, k_ha = dust.cardelli_k(np.array([dust.HBETA_AA, dust.HALPHA_AA]))
    assert k_hb == pytest.approx(3.61, abs=0.02)
    assert k_ha == pytest.approx(2.53, abs=0.02)


def test_milky_way_correction_is_bluer_stronger() -> None:
    t = dust.milky_way_transmission(np.array([3700.0, 9000.0]), 0.05)
    assert 0 < t[0] < t[1] < 1


def test_bpt_class_on_constructed_ratios() -> None:
    # (log [NII]/Hα, log [OIII]/Hβ): below Kauffmann, between the curves, above Kewley, right
    # of Kewley's asymptote, and a missing ratio.
    x = np.array([-0.6, -0.1, 0.2, 0.6, np.nan])
    y = np.array([-0.5, 0.1, 0.8, -0.5, 0.0])
    assert list(emission.bpt_class(x, y)) == ["star_forming", "composite", "agn", "agn", None]
    # The class agrees with the sign of d_BPT on either side of the Kauffmann curve.
    xs = np.linspace(-0.9, -0.1, 7)  # the two curves meet near x = -1.2
    for dy, expected in ((-0.03, "star_forming"), (0.03, "composite")):
        ys = emission.kauffmann03(xs) + dy
        assert set(emission.bpt_class(xs, ys)) == {expected}
        assert np.all(np.sign(emission.d_bpt(xs, ys)) == np.sign(dy))
    # Kewley (2001) lies above Kauffmann (2003) wherever both are defined.
    assert np.all(emission.kewley01(xs) > emission.kauffmann03(xs))


def test_line_gate_needs_both_sn_and_amplitude() -> None:
    gate = emission.LineGate(sn_min=3.0, an_min=3.0)
    assert emission.line_flags("hb", 5.0, 4.0, gate) == 0
    assert emission.line_flags("hb", 2.9, 4.0, gate) == emission.GasFlag.HB_LOW_SN
    assert emission.line_flags("ha", 8.0, 1.0, gate) == emission.GasFlag.HA_NOT_DETECTED
    assert emission.line_flags("nii6583", np.nan, np.nan, gate) == (
        emission.GasFlag.NII_LOW_SN | emission.GasFlag.NII_NOT_DETECTED)
    assert emission.line_flags("hb", 2.5, 4.0, emission.LineGate(sn_min=2.0)) == 0


def test_balmer_reddening_publishes_only_gated_and_never_negative() -> None:
    ok, bad_hb = emission.GasFlag(0), emission.GasFlag.HB_NOT_DETECTED
    dusty = emission.balmer_reddening(4.0, 0.1, 1.0, 0.05, ok, ok)
    assert dusty.published == pytest.approx(dusty.raw) and dusty.raw > 0 and dusty.flags == 0
    # The error is the propagated one (check against a finite difference in each flux).
    eps = 1e-6
    d_ha = (emission.balmer_reddening(4.0 + eps, 0, 1.0, 0, ok, ok).raw - dusty.raw) / eps
    d_hb = (emission.balmer_reddening(4.0, 0, 1.0 + eps, 0, ok, ok).raw - dusty.raw) / eps
    assert dusty.raw_err == pytest.approx(np.hypot(d_ha * 0.1, d_hb * 0.05), rel=1e-4)
    # A decrement below the case-B 2.86: raw kept negative, published as 0 with a flag.
    thin = emission.balmer_reddening(2.0, 0.05, 1.0, 0.05, ok, ok)
    assert thin.raw < 0 and thin.published == 0.0
    assert thin.flags == emission.GasFlag.DECREMENT_BELOW_INTRINSIC
    # An Hβ that fails the gate publishes nothing, whatever its decrement.
    weak = emission.balmer_reddening(2.0, 0.05, 1.0, 0.5, ok, bad_hb)
    assert np.isnan(weak.published) and weak.flags == bad_hb and weak.raw < 0
    assert np.isnan(emission.balmer_reddening(2.0, 0.1, -0.1, 0.1, ok, ok).raw)


def test_absorption_flux_of_a_gaussian_trough() -> None:
    wave = 3650.0 * np.exp(np.arange(13000) * 6.9e-5)
    depth, sigma = 0.4, 3.0
    spec = 2.0 - depth * np.exp(-0.5 * ((wave - 4862.68) / sigma) ** 2)
    expected = depth * sigma * np.sqrt(2 * np.pi)
    assert emission.absorption_flux(wave, spec, "hb") == pytest.approx(expected, rel=1e-3)
    assert emission.absorption_flux(wave, np.full(wave.size, 2.0), "ha") == 0.0
