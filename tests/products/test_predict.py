"""predict: real spectra, spectra the network cannot judge, and files on the wrong grid."""

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from click.testing import CliRunner

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError, InputDataError
from desomdb.products import predict
from desomdb.science import spectra

DR15 = Path(__file__).parents[1] / "data" / "MaNGA_test_spectra.fits.gz"
OFF_IFU = 5  # 7815-6101, the spaxel off the IFU: every pixel masked
WINDOW = "no good pixel in the 4050-4150 Å normalisation window"


def _write_parquet(path: Path, flux: np.ndarray, mask: np.ndarray, **extra) -> Path:
    pq.write_table(pa.table({"flux": spectra.to_list_column(flux.astype(np.float32)),
                             "mask": spectra.to_list_column(mask.astype(np.uint8), pa.uint8()),
                             **extra}), path)
    return path


@pytest.fixture(scope="module")
def bad_spectra(trained_archive, tmp_path_factory) -> Path:
    """One good archive spectrum, then one of each class the network cannot judge."""
    arch_path, _, _ = trained_archive
    t = pq.read_table(sorted(Archive(arch_path).cube_files("spectra").values())[0])
    flux = spectra.from_list_column(t.column("flux"))[:1].astype(np.float64)
    mask = spectra.from_list_column(t.column("mask"))[:1].copy()
    wave = spectra.rest_wave_aa()
    window = (wave >= 4050) & (wave <= 4150)
    few = np.ones_like(mask)
    few[0, np.flatnonzero(window)[:12]] = 0
    no_window = np.zeros_like(mask)
    no_window[0, window] = 1
    rows = [
        (flux, mask),                         # 0 good
        (np.full_like(flux, np.nan), 0 * mask),  # 1 all NaN
        (0 * flux, 0 * mask),                 # 2 all zero
        (flux, np.ones_like(mask)),           # 3 fully masked
        (flux, few),                          # 4 twelve good bins, all in the window
        (flux, no_window),                    # 5 good except the normalisation window
    ]
    path = tmp_path_factory.mktemp("bad") / "bad.parquet"
    return _write_parquet(path, np.concatenate([f for f, _ in rows]),
                          np.concatenate([m for _, m in rows]))


def test_spectra_that_cannot_be_judged_get_no_node(trained_archive, bad_spectra) -> None:
    arch_path, _, cfg = trained_archive
    df = predict.predict(arch_path, bad_spectra)
    assert df["reason"].to_list() == [
        None, "only 0 good bins < min 1000",
        "mean flux in the 4050-4150 Å normalisation window is 0, not positive",
        "only 0 good bins < min 1000", "only 12 good bins < min 1000", WINDOW,
    ]
    assert df["n_good"][4] == 12
    assert 0 <= df["node"][0] < cfg.n_nodes and df["log_ml_r_median"][0] is not None
    bad = df[1:]
    for col in ("node", "row", "col", "distance", "out_of_distribution", "log_ml_r_median",
                "age_mw_gyr_p16"):
        assert bad[col].null_count() == bad.height, col
    # The minimum is an option: twelve good bins are enough when the user says so.
    loose = predict.predict(arch_path, bad_spectra, min_good_bins=10)
    assert loose["reason"][4] is None and loose["node"][4] is not None
    with pytest.raises(ConfigError, match="min_good_bins"):
        predict.predict(arch_path, bad_spectra, min_good_bins=5000)


def test_cli_reports_why_a_spectrum_got_no_node(trained_archive, bad_spectra) -> None:
    arch_path, _, _ = trained_archive
    out = bad_spectra.with_name("pred.parquet")
    result = CliRunner().invoke(main, ["predict", str(arch_path), str(bad_spectra),
                                       "--output", str(out), "--min-good-bins", "10"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "spectrum 1: no node (only 0 good bins < min 10)",
        "spectrum 2: no node (mean flux in the 4050-4150 Å normalisation window is 0, not "
        "positive)",
        "spectrum 3: no node (only 0 good bins < min 10)",
        f"spectrum 5: no node ({WINDOW})",
    ]  # spectrum 4's twelve good bins pass --min-good-bins 10
    df = pl.read_parquet(out)
    assert df["node"].is_null().to_list() == [False, True, True, True, False, True]
    help_text = CliRunner().invoke(main, ["predict", "--help"]).output
    assert f"[default: {predict.MIN_GOOD_BINS}]" in help_text


def test_real_dr15_spectra_and_the_off_ifu_one(trained_archive) -> None:
    arch_path, _, cfg = trained_archive
    out = arch_path.parent / "pred.parquet"
    result = CliRunner().invoke(main, ["predict", str(arch_path), str(DR15), "--output",
                                       str(out)])
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df.height == 8 and "ms per spectrum" in result.output
    judged = df.filter(pl.col("index") != OFF_IFU)
    assert judged["node"].is_between(0, cfg.n_nodes - 1).all()
    assert judged["reason"].null_count() == 7 and "log_ml_r_median" in df.columns
    off = df.row(OFF_IFU, named=True)
    assert off["n_good"] == 0 and off["node"] is None and off["log_ml_r_median"] is None
    assert off["reason"] == "only 0 good bins < min 1000"
    assert f"spectrum {OFF_IFU}: no node (only 0 good bins < min 1000)" in result.stderr


def test_bad_observed_frame_spectra_get_no_node(trained_archive, tmp_path) -> None:
    """The same classes in the FITS (observed-frame) format: NaN, zero, masked, no ivar."""
    arch_path, _, _ = trained_archive
    with fits.open(DR15) as hdul:
        hdul["FLUX"].data[0] = np.nan
        hdul["FLUX"].data[1] = 0.0
        hdul["MASK"].data[2] |= 1 << 10  # DONOTUSE
        hdul["IVAR"].data[3] = 0.0
        hdul.writeto(tmp_path / "bad.fits")
    df = predict.predict(arch_path, tmp_path / "bad.fits")
    assert df["reason"].to_list()[:6] == [
        "only 0 good bins < min 1000",
        "mean flux in the 4050-4150 Å normalisation window is 0, not positive",
        "only 0 good bins < min 1000", "only 0 good bins < min 1000", None,
        "only 0 good bins < min 1000",
    ]
    assert df["node"].is_null().to_list() == [True] * 4 + [False, True, False, False]


def _fits(path: Path, wave: np.ndarray, n_pix: int | None = None) -> Path:
    with fits.open(DR15) as hdul:
        flux, ivar, mask, z = (hdul[k].data for k in ("FLUX", "IVAR", "MASK", "Z"))
    n_pix = n_pix or wave.size
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(wave, name="WAVE"),
                  fits.ImageHDU(flux[:, :n_pix], name="FLUX"),
                  fits.ImageHDU(ivar[:, :n_pix], name="IVAR"),
                  fits.ImageHDU(mask[:, :n_pix], name="MASK"),
                  fits.ImageHDU(z, name="Z")]).writeto(path)
    return path


def _wrong_files(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Files on the wrong grid or of the wrong length, and what their error must say."""
    n = spectra.N_REST
    rest = "expected 4544 log-spaced bins 3650-8950 Å rest frame, vacuum"
    observed = "expected observed-frame vacuum Å on a log-uniform grid"
    with fits.open(DR15) as hdul:
        wave = hdul["WAVE"].data.astype(np.float64)
    linear = np.linspace(spectra.REST_MIN_AA, spectra.REST_MAX_AA, n)
    return {
        "parquet_length": (_write_parquet(folder / "long.parquet", np.ones((2, 4563)),
                                          np.zeros((2, 4563))),
                           ("column flux has 4563 values in row 0 (2 of 2 rows have another "
                            "length)", rest)),
        "parquet_grid": (_write_parquet(folder / "linear.parquet", np.ones((1, n)),
                                        np.zeros((1, n)),
                                        wave_rest_aa=spectra.to_list_column(linear[None, :])),
                         ("column wave_rest_aa is not the archive's wavelength grid", rest)),
        "parquet_variable": (folder / "lists.parquet",
                             ("column flux has 100 values in row 1", rest)),
        "fits_grid": (_fits(folder / "linear.fits",
                            np.linspace(wave[0], wave[-1], wave.size)),
                      ("WAVE is not log-uniform (Δlog10 λ from ", observed,
                       "resampled to the archive's 4544 log-spaced bins")),
        # Seen: WAVE in nm (log-uniform, so it passed) gave "mean flux ... is nan".
        "fits_units": (_fits(folder / "nm.fits", wave / 10.0),
                       ("WAVE spans 362.2-1035 (rest frame", "no spectrum reaches the 4050-4150 "
                        "Å normalisation window", observed, "(is WAVE in Å?)")),
        "fits_length": (_fits(folder / "short.fits", wave, n_pix=4000),
                        ("FLUX has shape (8, 4000), not (8, 4563) as WAVE (4563 pixels) and Z "
                         "(8 redshifts) imply", observed)),
    }


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    folder = tmp_path_factory.mktemp("wrong")
    pq.write_table(pa.table({"flux": [[1.0] * spectra.N_REST, [1.0] * 100],
                             "mask": [[0] * spectra.N_REST, [0] * 100]}),
                   folder / "lists.parquet")
    return _wrong_files(folder)


@pytest.mark.parametrize("case", ["parquet_length", "parquet_grid", "parquet_variable",
                                  "fits_grid", "fits_units", "fits_length"])
def test_wrong_grid_or_length_is_refused(trained_archive, wrong_files, case: str) -> None:
    arch_path, _, _ = trained_archive
    path, parts = wrong_files[case]
    with pytest.raises(InputDataError) as info:
        predict.predict(arch_path, path)
    assert str(info.value).startswith(f"{path}: {parts[0]}")
    assert all(part in str(info.value) for part in parts[1:])
    result = CliRunner().invoke(main, ["predict", str(arch_path), str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"desomdb: error: {info.value}\n"
    assert "\n" not in str(info.value) and "Traceback" not in result.output


def test_predict_returns_the_calibrated_interval(trained_archive, bad_spectra, tmp_path) -> None:
    """With an error model (here a constructed one: σ = 2 Gyr) predict gives lo68/hi68."""
    import shutil
    from itertools import pairwise

    from desomdb.archive import paths
    from desomdb.pipeline import node_labels
    from desomdb.pipeline.calibrate import SNR_EDGES
    from desomdb.query import views
    from desomdb.science.label_catalogue import NODE_LABELS as LABELS

    arch_path, model_id, _ = trained_archive
    uncalibrated = predict.predict(arch_path, bad_spectra)
    assert uncalibrated["age_mw_gyr_lo68"].null_count() == uncalibrated.height
    copy = tmp_path / "arch"
    shutil.copytree(arch_path, copy)
    arch = Archive(copy)
    fitters = views.connect(copy, raw=True).sql("select distinct fitter from labels").fetchall()
    with arch.writer("test") as w:
        for (fitter,) in fitters:
            err = pl.DataFrame([{"fitter": fitter, "label": label, "snr_lo": lo, "snr_hi": hi,
                                 "n_baxels": 1, "sigma_stat": 2.0, "sigma_sys": 0.0,
                                 "sigma": 2.0}
                                for label in LABELS
                                for lo, hi in pairwise(SNR_EDGES)])
            w.commit(add=[w.stage_table(paths.LABEL_ERRORS, err.to_arrow(), paths.release_file(
                paths.LABEL_ERRORS, "DR15", paths.label_errors_name(fitter)))])
        node_labels.write_node_labels(w, arch, model_id)
    df = predict.predict(copy, bad_spectra)
    node = df["node"][0]
    nl = views.connect(copy, raw=True).sql(
        "select lo68, hi68, p16, p84 from node_labels where label = 'age_mw_gyr' "
        f"and node = {node}").pl()
    if nl.height:  # the good spectrum's node has labelled members
        assert df["age_mw_gyr_lo68"][0] == nl["lo68"][0]
        assert df["age_mw_gyr_hi68"][0] == nl["hi68"][0]
        # every member blurred by 2 Gyr: wider than the members' own spread
        assert nl["hi68"][0] - nl["lo68"][0] > nl["p84"][0] - nl["p16"][0]
    assert df[1:]["age_mw_gyr_lo68"].null_count() == df.height - 1
