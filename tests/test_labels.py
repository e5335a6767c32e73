from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from click.testing import CliRunner

from desomdb import labels, spectra
from desomdb.archive import Archive
from desomdb.cli import main

DATA = Path(__file__).parent / "data" / "MaNGA_test_spectra.fits.gz"


def _frame(t) -> pl.DataFrame:
    out = pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


@pytest.fixture(scope="module")
def real_fits() -> list[dict]:
    with fits.open(DATA) as hdul:
        wave = hdul["WAVE"].data
        flux, ivar = hdul["FLUX"].data.astype(float), hdul["IVAR"].data.astype(float)
        mask, z = hdul["MASK"].data, hdul["Z"].data
    f, iv, m, norm = spectra.observed_to_rest(wave, flux, ivar, mask, z)
    return [labels.fit_spectrum(f[k], iv[k], m[k], norm[k], float(z[k])) for k in range(len(z))]


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


@pytest.fixture(scope="module")
def labelled(labelled_archive):
    # Labelling again through the CLI finds every cube done and says so.
    result = CliRunner().invoke(main, ["label", str(labelled_archive), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return labelled_archive, result.output


def test_label_job_covers_every_baxel(labelled) -> None:
    archive, output = labelled
    arch = Archive(archive)
    lab = _frame(arch.read("labels")).sort("plateifu", "bin_id")
    bax = _frame(arch.read("baxels")).sort("plateifu", "bin_id")
    assert lab.height == bax.height > 0
    assert lab.select("plateifu", "bin_id").equals(bax.select("plateifu", "bin_id"))
    assert (lab["fitter"] == labels.FITTER).all()
    ok = lab.filter(pl.col("status") == "ok")
    assert ok.height == lab.height
    assert (ok["chi2_ok"] == (ok["chi2_red"] < 2)).all()
    assert (ok["ssfr_ok"] == (ok["sn_ha"] > 2)).all()
    four = ok.select([pl.col(f"sn_{k}") > 2 for k in ("hb", "oiii5007", "ha", "nii6583")])
    assert (ok["bpt_ok"] == four.select(pl.all_horizontal(pl.all())).to_series()).all()
    assert "2 already done" in output


def test_labels_track_the_mock_truth(labelled) -> None:
    archive, _ = labelled
    arch = Archive(archive)
    lab = _frame(arch.read("labels"))
    truth = _frame(arch.read("truth"))
    both = lab.join(truth, on=["plateifu", "bin_id"], suffix="_true")
    for key, tol in (("log_ml_r", 0.25), ("mh_mw", 0.3), ("ebv_star", 0.15)):
        diff = (both[key] - both[f"{key}_true"]).to_numpy()
        assert abs(np.median(diff)) < tol, key
    # Balmer decrement: ebv_gas is measured where both lines are detected.
    measured = both.filter(pl.col("ebv_gas").is_not_nan())
    if measured.height:
        diff = (measured["ebv_gas"] - measured["ebv_gas_true"]).to_numpy()
        assert abs(np.median(diff)) < 0.3


def test_rerun_skips_labelled_cubes(labelled) -> None:
    archive, _ = labelled
    before = _frame(Archive(archive).read("labels"))
    report = labels.label(archive, workers=1, progress=False)
    assert report.n_cubes == 0 and report.n_skipped_cubes == 2
    assert _frame(Archive(archive).read("labels")).equals(before)


def test_unfittable_spectrum_is_reported() -> None:
    row = labels.fit_spectrum(np.zeros(4544, np.float32), np.zeros(4544, np.float32),
                              np.ones(4544, np.uint8), np.nan, 0.03)
    assert row["status"] == "unfittable" and "good bins" in row["error"]
