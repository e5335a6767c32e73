import hashlib
import shutil

import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from click.testing import CliRunner

from desomdb import mock
from desomdb.cli import main
from desomdb.errors import ConfigError
from desomdb.mock.galaxy import draw_galaxy, population_truth, spaxel_model
from desomdb.science import dust, emission, geometry, templates
from desomdb.survey import manga

HDUS = ["PRIMARY", "FLUX", "IVAR", "MASK", "DISP", "PREDISP", "WAVE", "SPECRES", "SPECRESD",
        "OBSINFO", "GIMG", "RIMG", "IIMG", "ZIMG"]
HEADER_KEYS = ["PLATEIFU", "MANGAID", "PLATEID", "IFUDSGN", "OBJRA", "OBJDEC", "IFURA",
               "IFUDEC", "DRP3QUAL", "EBVGAL", "MNGTARG1", "MNGTARG2", "MNGTARG3", "VERSDRP3"]
DRPALL = ["plateifu", "mangaid", "plate", "ifudsgn", "objra", "objdec", "ifura", "ifudec", "z",
          "nsa_z", "nsa_elpetro_ba", "nsa_elpetro_phi", "nsa_elpetro_th50_r", "nsa_sersic_n",
          "nsa_elpetro_mass", "drp3qual", "mngtarg1"]


def test_survey_layout(mock_survey, mock_cube_paths) -> None:
    assert len(mock_cube_paths) == 2
    for path in mock_cube_paths:
        plate = path.parent.parent.name
        assert path.name.startswith(f"manga-{plate}-") and path.name.endswith("-LOGCUBE.fits.gz")
    drpall = Table.read(mock_survey.drpall_path)
    assert mock_survey.drpall_path.name == "drpall-v2_4_3.fits"
    assert set(DRPALL) <= set(drpall.colnames)
    assert len(drpall) == 2


def test_cube_round_trip(mock_survey, mock_cube_paths) -> None:
    drpall = Table.read(mock_survey.drpall_path)
    with fits.open(mock_cube_paths[0]) as hdul:
        assert [h.name for h in hdul][: len(HDUS) - 4] == HDUS[:-4] or set(HDUS) <= {
            h.name for h in hdul}
        prim = hdul[0].header
        for key in HEADER_KEYS:
            assert key in prim, key
        assert prim["VERSDRP3"] == "v2_4_3"
        row = drpall[drpall["plateifu"] == prim["PLATEIFU"]][0]
        assert prim["OBJRA"] == pytest.approx(row["objra"])
        flux, ivar, mask = hdul["FLUX"].data, hdul["IVAR"].data, hdul["MASK"].data
        assert flux.shape == ivar.shape == mask.shape == (4563, 32, 32)
        assert flux.dtype == np.dtype(">f4") and mask.dtype == np.dtype(">i4")
        assert hdul["FLUX"].header["BUNIT"] == "1E-17 erg/s/cm^2/Ang/spaxel"
        assert hdul["MASK"].header["MASKNAME"] == "MANGA_DRP3PIXMASK"
        wave = hdul["WAVE"].data
        assert wave[0] == pytest.approx(3621.596, abs=1e-3)
        np.testing.assert_allclose(np.diff(np.log10(wave)), 1e-4, rtol=1e-9)
        assert hdul["DISP"].data.shape == flux.shape
        assert np.all(hdul["PREDISP"].data <= hdul["DISP"].data)
        w = WCS(hdul["FLUX"].header)
        ra, dec, lam = w.all_pix2world([15.5], [15.5], [0, 4562][:1], 0)
        assert ra[0] == pytest.approx(prim["IFURA"], abs=1e-9)
        assert dec[0] == pytest.approx(prim["IFUDEC"], abs=1e-9)
        assert lam[0] == pytest.approx(wave[0] * 1e-10, rel=1e-9)  # WCS speaks metres
        _, _, lam_end = w.all_pix2world([0], [0], [4562], 0)
        assert lam_end[0] == pytest.approx(wave[-1] * 1e-10, rel=1e-7)
        # RA decreases with x (east to the left).
        ra_right, _, _ = w.all_pix2world([20], [15.5], [0], 0)
        assert ra_right[0] < ra[0]
        assert hdul["GIMG"].data.shape == (32, 32)
        assert len(hdul["OBSINFO"].data) > 0


def test_mask_rules(mock_cube_paths) -> None:
    with fits.open(mock_cube_paths[0]) as hdul:
        flux, ivar, mask = hdul["FLUX"].data, hdul["IVAR"].data, hdul["MASK"].data
    dra, ddec = geometry.spaxel_offsets(32, 32)
    margin = geometry.hexagon_margin(dra, ddec, manga.IFU_GEOMETRY[19][1])
    outside = margin < 0
    bits = mask[0]
    assert np.all(bits[outside] == manga.NOCOV | manga.DONOTUSE)
    assert np.all(flux[:, outside] == 0) and np.all(ivar[:, outside] == 0)
    lowcov = (bits & manga.LOWCOV) > 0
    assert lowcov.any()
    assert np.all((bits[lowcov] & manga.DONOTUSE) > 0)
    assert np.all(margin[lowcov] < 0.75) and np.all(margin[lowcov] >= 0)
    # IVAR > 0 alone is not "good": the low-coverage edge has IVAR but is DONOTUSE.
    assert np.all(ivar[:, lowcov] > 0)
    inner = margin >= 0.75
    assert np.all((bits[inner] & (manga.NOCOV | manga.LOWCOV)) == 0)
    dead = (bits & manga.DEADFIBER) > 0
    assert not np.any(dead & outside)


def test_dr17_naming(tmp_path) -> None:
    p = draw_galaxy(0, 1, (19,))
    hdul, _ = mock.render_cube(p, manga.release("DR17"))
    names = {h.name for h in hdul}
    assert {"LSFPOST", "LSFPRE"} <= names and "DISP" not in names
    assert hdul[0].header["VERSDRP3"] == "v3_1_1"


def test_same_seed_same_bytes(tmp_path) -> None:
    digests = []
    for attempt in range(2):
        p = draw_galaxy(3, 11, (19,))
        hdul, _ = mock.render_cube(p, manga.release("DR15"))
        path = tmp_path / f"c{attempt}.fits.gz"
        mock.write_cube(hdul, path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other, _ = mock.render_cube(draw_galaxy(3, 12, (19,)), manga.release("DR15"))
    assert not np.array_equal(other["FLUX"].data, hdul["FLUX"].data)


def test_truth_of_a_pure_ssp_equals_the_ssp() -> None:
    lib = templates.load()
    i, j = 30, 1
    w = np.zeros((1, *lib.shape))
    w[0, i, j] = 2.5e6
    t = population_truth(w, lib)
    assert t.age_mw_gyr[0] == pytest.approx(lib.ages_gyr[i])
    assert t.mh_mw[0] == pytest.approx(lib.metals_mh[j])
    assert t.mstar[0] == pytest.approx(2.5e6 * lib.masses[i, j])
    ml = lib.masses[i, j] / lib.r_band_luminosity()[i, j]
    assert t.log_ml_r[0] == pytest.approx(np.log10(ml))


def test_bc03_truth_of_a_pure_ssp_is_weighted_by_initial_mass() -> None:
    lib = templates.load(templates.library_path("bc03"))
    assert not lib.has_current_mass and lib.shape == (10, 4)
    np.testing.assert_allclose(lib.metals_mh, [-0.699, -0.398, 0.0, 0.398], atol=1e-3)
    i, j = 7, 3  # 2.5 Gyr, [M/H] = +0.40: beyond the fitting grid's +0.22
    w = np.zeros((1, *lib.shape))
    w[0, i, j] = 2.5e6
    t = population_truth(w, lib)
    assert t.mass_weight == "initial"
    assert lib.ages_gyr[i] == pytest.approx(2.5)
    assert t.age_mw_gyr[0] == pytest.approx(lib.ages_gyr[i])
    assert t.mh_mw[0] == pytest.approx(lib.metals_mh[j])
    assert t.minit[0] == pytest.approx(2.5e6)
    # No living-mass table: M* and M*/L_r are unknown, never borrowed from another library.
    assert np.isnan(t.mstar[0]) and np.isnan(t.log_ml_r[0])


def test_light_weighted_truth_weighs_each_ssp_by_its_light_in_the_window() -> None:
    lib = templates.load()
    w = np.zeros((1, *lib.shape))
    w[0, 10, 1] = 1e6  # a young and an old SSP of equal initial mass
    w[0, 45, 1] = 1e6
    t = population_truth(w, lib)
    light = lib.light_in_window()
    young, old = light[10, 1], light[45, 1]
    expect = (young * np.log10(lib.ages_gyr[10] * 1e9) + old * np.log10(lib.ages_gyr[45] * 1e9)
              ) / (young + old)
    assert t.log_age_lw[0] == pytest.approx(expect)
    assert t.l_window[0] == pytest.approx(1e6 * (young + old))
    # The young SSP outshines the old one: light-weighted is younger than mass-weighted.
    assert t.log_age_lw[0] < np.log10(t.age_mw_gyr[0] * 1e9) - 0.5


def test_mastar_library_and_cube_have_light_weighted_truth_only() -> None:
    lib = templates.load(templates.library_path("mastar"))
    assert lib.shape == (9, 6) and lib.mass_proxy and not lib.has_current_mass
    np.testing.assert_allclose(lib.metals_mh, [-1.35, -1.0, -0.7, -0.33, 0.0, 0.35])
    assert lib.ages_gyr[0] == pytest.approx(0.003) and lib.ages_gyr[-1] == pytest.approx(14.0)
    # Per-pixel MaNGA resolution (R ~1410-2100), in vacuum over the LOGCUBE range.
    assert lib.lam_vac_aa[0] == pytest.approx(3621.6, abs=0.1)
    r = lib.lam_vac_aa / lib.fwhm_aa
    assert 1400 < r.min() < np.median(r) < 2110 and r.max() < 2500
    # Older populations give less light per unit (proxy) mass.
    assert np.all(np.diff(np.log10(lib.light_in_window()[:, 4])) < 0)
    p = draw_galaxy(2, 5, (19,))
    hdul, truth = mock.render_cube(p, manga.release("DR15"), library="mastar")
    assert hdul[0].header["MOCKLIB"] == "mastar"
    assert set(truth["mass_weight"].to_pylist()) == {"none"}
    for col in ("age_mw_gyr", "mh_mw", "mstar_msun", "minit_msun", "log_ml_r"):
        assert np.isnan(truth[col].to_numpy()).all(), col
    lw = truth["log_age_lw"].to_numpy()
    assert np.all((lw > np.log10(0.003e9)) & (lw < np.log10(14e9)))
    assert np.isfinite(truth["mh_lw"].to_numpy()).all()


def test_lsf_scale_renders_and_records_another_resolution() -> None:
    p = draw_galaxy(1, 5, (19,))
    hdul, _ = mock.render_cube(p, manga.release("DR15"), lsf_scale=1.3)
    wave = hdul["WAVE"].data
    disp = hdul["DISP"].data[:, 16, 16]
    red = wave > 6000  # where MIUSCAT's 2.5 Å is sharper than either LSF
    np.testing.assert_allclose(disp[red], 1.3 * manga.lsf_sigma_aa(wave[red]), rtol=2e-3)
    with pytest.raises(ConfigError, match="lsf-scale"):
        mock.generate_survey("/nonexistent", 1, lsf_scale=5.0)


def test_bc03_library_is_in_vacuum() -> None:
    # The absorption centroids of Hγ, Hβ and Hα in a young (A-star dominated) BC03 SSP sit at
    # the vacuum wavelengths, not the air ones 1.2-1.8 Å bluer.
    lib = templates.load(templates.library_path("bc03"))
    young = lib.templates[:, 3, 2].astype(float)  # 0.29 Gyr, solar
    air = {"Hgamma": 4340.47, "Hbeta": 4861.33, "Halpha": 6562.80}
    for line, lam_air in air.items():
        lam = emission.LINES_AA[line]
        near = np.abs(lib.lam_vac_aa - lam) < 8
        x, f = lib.lam_vac_aa[near], young[near]
        depth = np.clip(np.linspace(f[0], f[-1], f.size) - f, 0, None)
        centroid = float((x * depth).sum() / depth.sum())
        assert abs(centroid - lam) < 0.6 < abs(centroid - lam_air), line
    assert lib.fwhm_aa[0] == pytest.approx(3.0, abs=0.01)


def test_bc03_cube_records_its_library_and_effective_lsf() -> None:
    p = draw_galaxy(1, 5, (19,))
    hdul, truth = mock.render_cube(p, manga.release("DR15"), library="bc03")
    assert hdul[0].header["MOCKLIB"] == "bc03"
    assert set(truth["library"].to_pylist()) == {"bc03"}
    assert set(truth["mass_weight"].to_pylist()) == {"initial"}
    ages = truth["age_mw_gyr"].to_numpy()
    assert np.all((ages > 0.005) & (ages <= 10.0))  # BC03's oldest SSP is 10 Gyr
    assert np.isnan(truth["mstar_msun"].to_numpy()).all()
    wave = hdul["WAVE"].data
    disp = hdul["DISP"].data[:, 16, 16]
    # The LSF is MaNGA's where the library is sharper, the library's 3 Å where it is not.
    lib_sigma = 3.0 * (1 + p.z) / (2 * np.sqrt(2 * np.log(2)))
    np.testing.assert_allclose(disp, np.maximum(manga.lsf_sigma_aa(wave), lib_sigma), rtol=2e-3)
    assert (disp > manga.lsf_sigma_aa(wave) * 1.01).any()


def test_truth_table_matches_cube(mock_survey, mock_cube_paths) -> None:
    truth = pl.read_parquet(mock_survey.truth_path)
    assert set(truth["galaxy_type"]) == {"star_forming", "passive"}  # first two types
    for path in mock_cube_paths:
        with fits.open(path) as hdul:
            plateifu = hdul[0].header["PLATEIFU"]
            covered = (hdul["MASK"].data[0] & manga.NOCOV) == 0
        rows = truth.filter(pl.col("plateifu") == plateifu)
        assert rows.height == covered.sum()
        assert covered[rows["y"].to_numpy(), rows["x"].to_numpy()].all()
    assert truth["age_mw_gyr"].is_between(0.06, 14).all()
    assert truth["mh_mw"].is_between(-0.72, 0.23).all()
    medians = truth.group_by("galaxy_type").agg(pl.col("age_mw_gyr", "log_ssfr").median())
    by_type = {r["galaxy_type"]: r for r in medians.iter_rows(named=True)}
    assert by_type["passive"]["age_mw_gyr"] > 8
    assert by_type["star_forming"]["log_ssfr"] > -11


def test_balmer_decrement_matches_ebv_gas(mock_survey) -> None:
    truth = pl.read_parquet(mock_survey.truth_path)
    ebv = dust.ebv_gas_from_balmer(truth["flux_halpha"].to_numpy(), truth["flux_hbeta"].to_numpy())
    np.testing.assert_allclose(ebv, truth["ebv_gas"].to_numpy(), atol=1e-6)


def test_emission_lines_conserve_flux() -> None:
    # Each rendered line integrates to its (nebular-attenuated) flux, so line fluxes measured
    # from the cube can be compared with the truth table.
    p = draw_galaxy(0, 5, (19,))
    lib = templates.load()
    model = spaxel_model(p, lib, np.array([10, 12]), np.array([10, 11]), np.array([0.5, -1.0]),
                         np.array([0.3, 0.8]), np.random.default_rng(0))
    flux = {k: v * mock.render._line_flux_scale(p.z) for k, v in model.lines_lum.items()}
    wave = manga.wave_obs_aa()
    spec = mock.render._line_spectra(p, model, flux, wave)
    for name in ("Hbeta", "OIII5007", "Halpha"):
        lam = emission.LINES_AA[name] * (1 + p.z) * (1 + model.velocity_kms / manga.C_KMS)
        trans = dust.nebular_transmission(emission.LINES_AA[name], model.ebv_gas)[:, 0]
        for i in range(2):
            near = np.abs(wave - lam[i]) < 8
            got = np.sum(spec[i, near] * manga.pixel_width_aa(wave[near]))
            assert got == pytest.approx(flux[name][i] * trans[i], rel=0.02)


def test_correlated_noise_needs_the_law_correction() -> None:
    rng = np.random.default_rng(0)
    noise = mock.render._correlated_noise(rng, (400, 40, 40))
    assert noise[:, 10:30, 10:30].std() == pytest.approx(1.0, rel=0.05)
    block = noise[:, 10:20, 10:20].sum(axis=(1, 2))  # n = 100 spaxels
    ratio = block.std() / np.sqrt(100)
    assert ratio == pytest.approx(1 + 1.62 * np.log10(100), rel=0.2)


def test_cli_mock_and_bad_ifu(tmp_path) -> None:
    result = CliRunner().invoke(main, ["mock", str(tmp_path), "--galaxies", "1",
                                       "--ifu-sizes", "20"])
    assert result.exit_code != 0
    assert "not MaNGA bundles" in result.output
    result = CliRunner().invoke(main, ["mock", str(tmp_path), "--galaxies", "1", "--seed", "2",
                                       "--ifu-sizes", "19", "--release", "DR17"])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob("DR17/*/stack/manga-*-LOGCUBE.fits.gz"))


def test_next_release_needs_the_previous_release_and_seed(mock_survey, tmp_path) -> None:
    shutil.copytree(mock_survey.release_dir, tmp_path / "DR15")
    with pytest.raises(ConfigError, match="--seed"):
        mock.generate_survey(tmp_path, 3, "DR17", seed=8, ifu_sizes=(19,), progress=False,
                             previous="DR15")
    with pytest.raises(ConfigError, match="no earlier mock release"):
        mock.generate_survey(tmp_path / "empty", 3, "DR17", seed=7, progress=False,
                             previous="DR15")
    with pytest.raises(ConfigError, match="fraction"):
        mock.generate_survey(tmp_path, 3, "DR17", seed=7, ifu_sizes=(19,), progress=False,
                             previous="DR15", reprocess=2.0)


def test_a_velocity_shift_keeps_the_line_width() -> None:
    # A line of σ = 1.2 pixels on a sloped continuum, shifted by 0.5 and by 3 pixels: its
    # centroid moves by the shift and its width stays. Linear interpolation would add
    # f(1 - f) = 0.25 pixels² of variance at f = 0.5.
    from desomdb.mock import render

    x = np.arange(200.0)
    line = np.exp(-0.5 * ((x - 100.0) / 1.2) ** 2)
    spec = np.vstack([line + 5.0 + 0.01 * x] * 2)
    moved = render.shift_pixels(spec, np.array([0.5, 3.0]))
    for row, s in zip(moved, (0.5, 3.0), strict=True):
        flux = row - (5.0 + 0.01 * (x - s))
        centre = (flux * x).sum() / flux.sum()
        var = (flux * (x - centre) ** 2).sum() / flux.sum()
        assert centre == pytest.approx(100.0 + s, abs=1e-4)
        assert var == pytest.approx(1.2**2, abs=1e-3)
    interp = np.interp(x - 0.5, x, line)
    centre = (interp * x).sum() / interp.sum()
    assert (interp * (x - centre) ** 2).sum() / interp.sum() == pytest.approx(1.44 + 0.25,
                                                                            abs=1e-3)
