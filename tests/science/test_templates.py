import numpy as np
import pytest

from desomdb.errors import TemplateLibraryError
from desomdb.science import templates


@pytest.fixture(scope="module")
def lib() -> templates.TemplateLibrary:
    return templates.load()


def test_grid_is_complete(lib: templates.TemplateLibrary) -> None:
    n_age, n_metal = lib.shape
    assert (n_age, n_metal) == (50, 4)
    assert lib.templates.shape == (lib.lam_vac_aa.size, n_age, n_metal)
    assert lib.templates.dtype == np.float32
    assert np.all(np.isfinite(lib.templates))
    assert np.all(lib.templates.mean(axis=0) > 0)
    assert np.all(np.diff(lib.ages_gyr) > 0) and np.all(np.diff(lib.metals_mh) > 0)
    np.testing.assert_allclose(lib.metals_mh, [-0.71, -0.40, 0.0, 0.22])


def test_covers_the_rest_frame_window(lib: templates.TemplateLibrary) -> None:
    assert lib.lam_vac_aa[0] < 3650 and lib.lam_vac_aa[-1] > 8950


def test_masses_are_living_plus_remnant_fractions(lib: templates.TemplateLibrary) -> None:
    assert np.all((lib.masses > 0) & (lib.masses <= 1))
    # Older populations have lost more mass to winds and supernovae.
    assert np.all(np.diff(lib.masses, axis=0) <= 1e-6)


def test_wavelengths_are_vacuum(lib: templates.TemplateLibrary) -> None:
    # The Hα absorption of an A-star-dominated (0.5 Gyr) population sits at 6564.6 Å in
    # vacuum (6562.8 Å in air).
    i_age = int(np.argmin(np.abs(lib.ages_gyr - 0.5)))
    spec = lib.templates[:, i_age, 2]
    window = (lib.lam_vac_aa > 6540) & (lib.lam_vac_aa < 6590)
    lam_min = lib.lam_vac_aa[window][np.argmin(spec[window])]
    assert abs(lam_min - 6564.6) < 1.0
    assert np.all(lib.fwhm_aa > 2.51) and np.all(lib.fwhm_aa < 2.52)


def test_ml_r_matches_vazdekis_table(lib: templates.TemplateLibrary) -> None:
    i_age = int(np.argmin(np.abs(lib.ages_gyr - 10.0)))
    j_met = int(np.argmin(np.abs(lib.metals_mh)))
    table = lib.ml_r_table[i_age, j_met]
    assert table == pytest.approx(5.16, abs=0.01)
    ml_ours = lib.masses[i_age, j_met] / lib.r_band_luminosity()[i_age, j_met]
    assert ml_ours == pytest.approx(table, rel=0.10)
    # pPXF's own sps_lib reads the same file and agrees.
    sps = lib.sps_lib(velscale=70.0)
    weights = np.zeros(lib.shape)
    weights[i_age, j_met] = 1.0
    assert sps.mass_to_light(weights, band="SDSS/r", quiet=True) == pytest.approx(ml_ours, rel=0.01)


def test_ml_r_over_the_whole_grid_tracks_the_table(lib: templates.TemplateLibrary) -> None:
    ml = lib.masses / lib.r_band_luminosity()
    ratio = ml / lib.ml_r_table
    assert np.median(np.abs(ratio - 1)) < 0.05


def test_missing_library_names_the_file_and_fix(tmp_path) -> None:
    with pytest.raises(TemplateLibraryError, match=r"nothere\.npz.*templates_build"):
        templates.load(tmp_path / "nothere.npz")


def test_library_lacking_arrays_is_refused(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, lam=np.arange(3.0))
    with pytest.raises(TemplateLibraryError, match="missing arrays"):
        templates.load(bad)
