import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desomdb import dust, emission


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
