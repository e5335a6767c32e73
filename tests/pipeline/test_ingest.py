import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.table import Table
from click.testing import CliRunner
from conftest import make_job

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError, LockError
from desomdb.pipeline import carry, ingest
from desomdb.pipeline.jobs import IngestConfig
from desomdb.survey import manga


def df(table: pa.Table) -> pl.DataFrame:
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)
    return out


def _tables(archive) -> dict[str, pl.DataFrame]:
    arch = Archive(archive)
    out = {}
    for t in ("cubes", "galaxies", "baxels", "bin_map", "truth", "spectra"):
        frame = df(arch.read(t))
        keys = [c for c in ("release", "plateifu", "bin_id", "y", "x") if c in frame.columns]
        out[t] = frame.sort(keys)
    return out


def test_ingest_writes_every_table(ingested, ingest_survey) -> None:
    archive, report = ingested
    assert report.ok and report.n_ingested == 3 and report.n_found == 3
    t = _tables(archive)
    assert t["cubes"]["status"].to_list() == ["ok"] * 3
    assert t["galaxies"].height == 3
    assert set(t["galaxies"].columns) >= {"mangaid", "nsa_z", "nsa_sersic_n", "nsa_elpetro_ba",
                                          "nsa_elpetro_phi", "nsa_elpetro_th50_r",
                                          "nsa_elpetro_mass"}
    bax = t["baxels"]
    assert bax.height == report.n_baxels > 3
    assert bax.select("plateifu", "bin_id").is_unique().all()
    for col in ("x_arcsec", "y_arcsec", "radius_re", "snr", "norm_flux", "n_good", "trainable",
                "flag_few_good", "flag_low_min_flux", "flag_high_flux", "flag_low_snr"):
        assert col in bax.columns
    # spectra: fixed-size float32[4544], one row per baxel, not normalised.
    spec = Archive(archive).read("spectra")
    flux_type = spec.schema.field("flux").type
    assert isinstance(flux_type, pa.FixedSizeListType) and flux_type.list_size == 4544
    assert flux_type.value_type == pa.float32()
    assert spec.num_rows == bax.height
    # bin_map rebuilds the binning: every baxel has spaxels, counts match n_spaxels.
    counts = t["bin_map"].filter(pl.col("bin_id") >= 0).group_by("plateifu", "bin_id").len()
    joined = bax.join(counts, on=["plateifu", "bin_id"])
    assert joined.height == bax.height
    assert (joined["len"] == joined["n_spaxels"]).all()
    # mock truth per baxel
    assert t["truth"].height == bax.height


def test_the_drp_images_are_stored_per_cube_and_band(ingested, ingest_survey) -> None:
    """GIMG..ZIMG of each file land in ``images`` on the spaxel grid of bin_map."""
    from astropy.io import fits

    archive, _ = ingested
    images = df(Archive(archive).read("images"))
    cubes = df(Archive(archive).read("cubes"))
    assert images.height == 4 * cubes.height
    for path in sorted(Path(ingest_survey.release_dir).rglob("*LOGCUBE.fits*")):
        with fits.open(path) as hdul:
            plateifu = hdul[0].header["PLATEIFU"]
            for band in "griz":
                row = images.filter((pl.col("plateifu") == plateifu) & (pl.col("band") == band))
                assert row.height == 1
                stored = np.asarray(row["image"][0], np.float32).reshape(
                    row["n_y"][0], row["n_x"][0])
                np.testing.assert_array_equal(stored, hdul[f"{band.upper()}IMG"].data)


def test_binned_snr_and_flags(ingested) -> None:
    archive, _ = ingested
    bax = _tables(archive)["baxels"]
    cubes = _tables(archive)["cubes"]
    voronoi = cubes.filter(pl.col("binning") == "voronoi")["plateifu"]
    snr = bax.filter(pl.col("plateifu").is_in(voronoi.implode()))["snr"]
    assert float(np.median(snr.to_numpy())) > 0.8 * 20
    assert (bax["flag_low_snr"] == (bax["snr"] < 10)).all()
    assert (bax["flag_few_good"] == (bax["n_good"] < 3900)).all()
    # tail flags: the lowest 0.5 % of minimum normalised flux is flagged
    assert bax["flag_low_min_flux"].sum() >= 1
    assert (bax["trainable"] == ~(bax["flag_low_snr"] | bax["flag_few_good"]
                                  | bax["flag_low_min_flux"] | bax["flag_high_flux"]
                                  | bax["flag_bad_norm"])).all()


def test_spectra_normalise_and_mask(ingested) -> None:
    archive, _ = ingested
    arch = Archive(archive)
    spec = arch.read("spectra")
    flux = spec.column("flux").combine_chunks().values.to_numpy(zero_copy_only=True)
    flux = flux.reshape(-1, 4544)
    mask = spec.column("mask").combine_chunks().values.to_numpy().reshape(-1, 4544)
    bax = df(arch.read("baxels")).sort("plateifu", "bin_id")
    order = df(spec.select(["plateifu", "bin_id"])).with_row_index()
    order = order.join(bax, on=["plateifu", "bin_id"]).sort("index")
    rest = np.geomspace(3650, 8950, 4544)
    win = (rest >= 4050) & (rest <= 4150)
    norm = np.array([flux[i, win][mask[i, win] == 0].mean() for i in range(len(flux))])
    np.testing.assert_allclose(norm, order["norm_flux"].to_numpy(), rtol=1e-5)
    assert np.all(flux[mask == 1] == 0)
    # sky line at 5578.9 Å (observed) is masked in every baxel
    z = dict(zip(*[df(arch.read("galaxies"))[c] for c in ("plateifu", "z")],
                 strict=True))
    for i, p in enumerate(order["plateifu"]):
        j = int(np.argmin(np.abs(rest - 5578.9 / (1 + z[p]))))
        assert mask[i, j] == 1


def test_truth_matches_the_binning(ingested, ingest_survey) -> None:
    archive, _ = ingested
    t = _tables(archive)
    spaxel_truth = pl.read_parquet(ingest_survey.truth_path)
    bm = t["bin_map"].filter(pl.col("bin_id") >= 0)
    joined = bm.join(spaxel_truth, on=["plateifu", "x", "y"])
    direct = joined.group_by("plateifu", "bin_id").agg(
        (pl.col("mstar_msun") * pl.col("age_mw_gyr")).sum() / pl.col("mstar_msun").sum()
    ).sort("plateifu", "bin_id")
    np.testing.assert_allclose(t["truth"]["age_mw_gyr"].to_numpy(),
                               direct["mstar_msun"].to_numpy(), rtol=1e-9)


def test_rerun_is_idempotent(ingested, ingest_survey, tmp_path) -> None:
    archive, _ = ingested
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    before = _tables(copy)
    report = ingest.ingest(copy, make_job(ingest_survey), progress=False)
    assert report.n_skipped == 3 and report.n_ingested == 0 and report.ok
    after = _tables(copy)
    for name in before:
        assert before[name].equals(after[name]), name


def test_other_binning_settings_reprocess_and_are_not_carried(ingested, ingest_survey,
                                                              tmp_path) -> None:
    archive, _ = ingested
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    default = IngestConfig()
    assert set(_tables(copy)["cubes"]["binning_config"]) == {default.binning_key()}
    # Another release would carry these cubes over only with the same binning settings.
    wvt = IngestConfig(wvt=True)
    assert wvt.binning_key() != default.binning_key()
    assert len(carry.carry_sources(Archive(copy), "DR17", default.binning_key())) == 3
    assert carry.carry_sources(Archive(copy), "DR17", wvt.binning_key()) == {}
    # The same release re-run with other settings re-bins every cube (not "already done").
    report = ingest.ingest(copy, make_job(ingest_survey, config=IngestConfig(target_snr=15)),
                           progress=False)
    assert (report.n_ingested, report.n_skipped) == (3, 0)
    cubes = _tables(copy)["cubes"]
    assert cubes.height == 3
    assert set(cubes["binning_config"]) == {IngestConfig(target_snr=15).binning_key()}


def test_cube_rows_without_binning_settings_are_skipped_and_carried_as_before(
        ingested, ingest_survey, tmp_path) -> None:
    """Rows written before cubes.binning_config existed keep their bins (and so their labels):
    an upgrade must not re-bin a whole release on the next ingest."""
    archive, _ = ingested
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    (compacted,) = Archive(copy).files("cubes")
    pq.write_table(pq.read_table(compacted).drop_columns(["binning_config"]), compacted)
    key = IngestConfig().binning_key()
    assert len(carry.carry_sources(Archive(copy), "DR17", key)) == 3
    report = ingest.ingest(copy, make_job(ingest_survey), progress=False)
    assert (report.n_ingested, report.n_skipped) == (0, 3)
    report = ingest.ingest(copy, make_job(ingest_survey, config=IngestConfig(target_snr=15)),
                           progress=False)
    assert (report.n_ingested, report.n_skipped) == (0, 3)  # unrecorded: kept as they were
    # Beside unrecorded rows, a recorded one with other settings is re-binned.
    (compacted,) = Archive(copy).files("cubes")  # compacted again by each ingest
    t = pq.read_table(compacted)
    t = t.append_column("binning_config", pa.array([key, None, None], pa.string()))
    pq.write_table(t, compacted)
    report = ingest.ingest(copy, make_job(ingest_survey, config=IngestConfig(target_snr=15)),
                           progress=False)
    assert (report.n_ingested, report.n_skipped) == (1, 2)


def test_changed_cube_is_replaced_atomically(ingested, ingest_survey, tmp_path) -> None:
    archive, _ = ingested
    survey = tmp_path / "survey"
    shutil.copytree(ingest_survey.release_dir, survey / "DR15")
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    gz = sorted((survey / "DR15").glob("*/stack/*.fits.gz"))[0]
    plateifu = gz.name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    from desomdb import mock
    from desomdb.mock.galaxy import draw_galaxy
    # Re-process: same galaxy, different noise realisation (new checksum).
    params = next(p for p in (draw_galaxy(i, 21, (19, 37)) for i in range(3))
                  if p.plateifu == plateifu)
    hdul, _ = mock.render_cube(params, manga.release("DR15"))
    hdul["FLUX"].data = hdul["FLUX"].data * np.float32(1.01)
    mock.write_cube(hdul, gz)
    job = make_job(ingest_survey, cubes=survey / "DR15")
    report = ingest.ingest(copy, job, progress=False)
    assert report.n_ingested == 1 and report.n_skipped == 2
    t = _tables(copy)
    assert t["cubes"].height == 3
    assert t["cubes"].filter(pl.col("plateifu") == plateifu)["checksum"][0] == \
        ingest.file_checksum(gz)
    assert t["baxels"].select("plateifu", "bin_id").is_unique().all()
    assert t["spectra"].height == t["baxels"].height


def test_bad_inputs_fail_alone(ingest_survey, tmp_path) -> None:
    survey = tmp_path / "DR15"
    shutil.copytree(ingest_survey.release_dir, survey)
    cubes = sorted(survey.glob("*/stack/*LOGCUBE.fits*"))
    # 1: truncated gzip; 2: a cube not in drpall; 3 stays good.
    gz = next(c for c in cubes if c.name.endswith(".gz"))
    gz.write_bytes(gz.read_bytes()[:100000])
    stray = gz.parent / "manga-9999-1901-LOGCUBE.fits.gz"
    good_gz = [c for c in cubes if c.name.endswith(".gz")][1]
    shutil.copy(good_gz, stray)
    # 4: redshift out of range for the plain-fits cube.
    plain = next(c for c in cubes if c.name.endswith(".fits"))
    drpall = Table.read(survey / "drpall-v2_4_3.fits")
    pifu = plain.name.split("-", 1)[1].removesuffix("-LOGCUBE.fits")
    drpall["z"][drpall["plateifu"] == pifu] = 0.3
    drpall.write(survey / "drpall-v2_4_3.fits", overwrite=True)
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "arch"), "--cubes", str(survey),
                                       "--drpall", str(survey / "drpall-v2_4_3.fits"),
                                       "--release", "DR15", "--workers", "1"])
    assert result.exit_code == 1
    cubes_t = df(Archive(tmp_path / "arch").read("cubes")).sort("plateifu")
    status = dict(zip(cubes_t["plateifu"], cubes_t["status"], strict=True))
    errors = dict(zip(cubes_t["plateifu"], cubes_t["error"], strict=True))
    # The stray is another cube's file renamed: its header disagrees with its name.
    assert status["9999-1901"] == "failed" and "header PLATEIFU" in errors["9999-1901"]
    bad_pifu = gz.name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    assert status[bad_pifu] == "failed" and "truncated or corrupt" in errors[bad_pifu]
    assert status[pifu] == "failed" and "outside" in errors[pifu]
    good_pifu = good_gz.name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    assert status[good_pifu] == "ok"
    assert "failed" in result.output and bad_pifu in result.output


def test_lock_refuses_concurrent_ingest(ingest_survey, tmp_path) -> None:
    arch = Archive(tmp_path / "arch", create=True)
    with arch.writer("other ingest"), pytest.raises(LockError, match="other ingest"):
        ingest.ingest(tmp_path / "arch", make_job(ingest_survey), progress=False)


@pytest.mark.slow
def test_kill_and_resume_ends_like_an_uninterrupted_run(ingested, ingest_survey, tmp_path) -> None:
    archive, _ = ingested
    target = tmp_path / "arch"
    cmd = [sys.executable, "-m", "desomdb.cli", "ingest", str(target), "--cubes",
           str(ingest_survey.release_dir), "--drpall", str(ingest_survey.drpall_path),
           "--release", "DR15", "--workers", "1", "--cubes-per-task", "1",
           "--commit-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    manifest = target / "_manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and '"generation": 1' in manifest.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Archive(target).read("cubes").num_rows
    assert 1 <= partial < 3
    report = ingest.ingest(target, make_job(ingest_survey), progress=False)
    assert report.n_skipped == partial
    a, b = _tables(archive), _tables(target)
    for name in a:
        cols = [c for c in a[name].columns if c != "ingested_at"]
        assert a[name].select(cols).equals(b[name].select(cols)), name
    assert not list((target / "_staging").glob("**/*.parquet"))


def test_dask_scheduler(ingest_survey, tmp_path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        one = sorted(ingest_survey.release_dir.glob("*/stack/*.fits.gz"))[0]
        job = make_job(ingest_survey, cubes=one, scheduler=cluster.scheduler_address)
        report = ingest.ingest(tmp_path / "arch", job, progress=False)
    assert report.ok and report.n_ingested == 1


def test_job_file(tmp_path, ingest_survey) -> None:
    job = tmp_path / "dr15.toml"
    job.write_text(f'[job]\nrelease = "DR15"\ncubes = "{ingest_survey.release_dir}"\n'
                   f'drpall = "{ingest_survey.drpall_path}"\n[binning]\ntarget_snr = 15\n')
    loaded = ingest.load_job(job)
    assert loaded.config.target_snr == 15 and loaded.release == "DR15"
    job.write_text('[job]\nrelease = "DR15"\ncubes = "x"\ndrpall = "y"\n[binning]\ntarget = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['target'\] in \[binning\]"):
        ingest.load_job(job)
    shipped = ingest.load_job(Path(ingest.__file__).parents[2] / "ingest" / "dr15.toml")
    assert shipped.release == "DR15" and shipped.config.min_good_bins == 3900


def test_spectra_files_are_compact(ingested) -> None:
    archive, _ = ingested
    arch = Archive(archive)
    assert len(arch.files("baxels")) == 1  # narrow tables compacted per release
    for f in arch.files("spectra"):
        assert pq.ParquetFile(f).metadata.num_rows > 0


def _set_header(path: Path, **cards: str | float) -> None:
    """Rewrite primary-header cards of a gzipped mock cube."""
    from astropy.io import fits

    from desomdb import mock

    with fits.open(path) as hdul:
        hdul.verify("silentfix")
        for key, value in cards.items():
            hdul[0].header[key] = value
        copy = fits.HDUList([h.copy() for h in hdul])
    mock.write_cube(copy, path)


def _survey_copy(ingest_survey, tmp_path) -> tuple[Path, list[Path]]:
    survey = tmp_path / "DR15"
    shutil.copytree(ingest_survey.release_dir, survey)
    return survey, sorted(survey.glob("*/stack/*LOGCUBE.fits.gz"))


def _cli_ingest(archive: Path, cubes: Path, drpall: Path, release: str = "DR15"):
    return CliRunner().invoke(main, ["ingest", str(archive), "--cubes", str(cubes),
                                     "--drpall", str(drpall), "--release", release,
                                     "--workers", "1"])


def _status(archive: Path) -> dict[str, tuple[str, str]]:
    t = df(Archive(archive).read("cubes"))
    return {r["plateifu"]: (r["status"], r["error"]) for r in t.iter_rows(named=True)}


def test_header_and_drpall_must_agree_with_the_file_name(ingest_survey, tmp_path) -> None:
    survey, gzs = _survey_copy(ingest_survey, tmp_path)
    drpall = survey / "drpall-v2_4_3.fits"
    # A cube not in the drpall whose header agrees with its name.
    stray = gzs[0].parent / "manga-9999-1901-LOGCUBE.fits.gz"
    shutil.copy(gzs[0], stray)
    _set_header(stray, PLATEIFU="9999-1901")
    # A cube whose header names another plateifu than its file (seen: rows keyed by the
    # header, the cube row by the file name — a duplicate key and a row owning nothing).
    renamed_pifu = gzs[1].name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    _set_header(gzs[1], PLATEIFU="9999-1902")
    result = _cli_ingest(tmp_path / "arch", survey, drpall)
    assert result.exit_code == 1 and "Traceback" not in result.output
    status = _status(tmp_path / "arch")
    assert status["9999-1901"][0] == "failed" and "not in the drpall" in status["9999-1901"][1]
    assert status[renamed_pifu][0] == "failed"
    assert "header PLATEIFU 9999-1902 differs" in status[renamed_pifu][1]
    assert "9999-1902" not in status
    bax = df(Archive(tmp_path / "arch").read("baxels"))
    assert set(bax["plateifu"]) == {p for p, (st, _) in status.items() if st == "ok"}


def test_mangaid_must_agree_with_the_drpall(ingest_survey, tmp_path) -> None:
    survey, gzs = _survey_copy(ingest_survey, tmp_path)
    _set_header(gzs[0], MANGAID="1-999999")
    result = _cli_ingest(tmp_path / "arch", survey, survey / "drpall-v2_4_3.fits")
    assert result.exit_code == 1
    pifu = gzs[0].name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    assert "MANGAID 1-999999 differs" in _status(tmp_path / "arch")[pifu][1]


def test_one_cube_in_two_folders(ingest_survey, tmp_path) -> None:
    survey, gzs = _survey_copy(ingest_survey, tmp_path)
    drpall = survey / "drpall-v2_4_3.fits"
    same = survey / "copy" / gzs[0].name
    same.parent.mkdir()
    shutil.copy(gzs[0], same)
    report = ingest.ingest(tmp_path / "a", make_job(ingest_survey, cubes=survey),
                           progress=False)
    assert report.ok and report.n_ingested == 3 and report.n_duplicates == 1
    assert df(Archive(tmp_path / "a").read("cubes")).height == 3

    # Different contents under one plateifu: both refused, the rest lands, nothing stray.
    _set_header(same, EBVGAL=0.5)
    result = _cli_ingest(tmp_path / "b", survey, drpall)
    assert result.exit_code == 1 and "Traceback" not in result.output
    pifu = gzs[0].name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    status = _status(tmp_path / "b")
    assert status[pifu][0] == "failed" and "different contents" in status[pifu][1]
    assert sorted(st for st, _ in status.values()) == ["failed", "ok", "ok"]
    from desomdb.products.check import check

    assert check(tmp_path / "b").ok

    # Into an archive that already holds the cube: the good rows stay.
    before = df(Archive(tmp_path / "a").read("baxels")).height
    result = _cli_ingest(tmp_path / "a", survey, drpall)
    assert result.exit_code == 1 and "different contents" in result.output
    assert _status(tmp_path / "a")[pifu][0] == "ok"
    assert df(Archive(tmp_path / "a").read("baxels")).height == before


def test_a_cube_of_another_release_is_refused(ingest_survey, tmp_path) -> None:
    from desomdb import mock
    from desomdb.mock.galaxy import draw_galaxy

    survey, gzs = _survey_copy(ingest_survey, tmp_path)
    pifu = gzs[0].name.split("-", 1)[1].removesuffix("-LOGCUBE.fits.gz")
    params = next(p for p in (draw_galaxy(i, 21, (19, 37)) for i in range(3))
                  if p.plateifu == pifu)
    hdul, _ = mock.render_cube(params, manga.release("DR17"))
    mock.write_cube(hdul, gzs[0])
    result = _cli_ingest(tmp_path / "arch", survey, survey / "drpall-v2_4_3.fits")
    assert result.exit_code == 1
    status, error = _status(tmp_path / "arch")[pifu]
    assert status == "failed" and "v3_1_1" in error and "DR17" in error
    # No version card: the layout (LSFPOST) still gives it away.
    with_card = gzs[0]
    _set_header(with_card, VERSDRP3="")
    result = _cli_ingest(tmp_path / "arch2", survey, survey / "drpall-v2_4_3.fits")
    status, error = _status(tmp_path / "arch2")[pifu]
    assert status == "failed" and "LSFPOST" in error


def test_float32_coadd_equals_the_float64_path(mock_survey, mock_cube_paths) -> None:
    """Ingest corrects and co-adds only the binned spaxels in float32; the spectra equal the
    former whole-cube float64 path (kept here as the reference) to float32 precision."""
    from desomdb.pipeline import baxels
    from desomdb.pipeline.jobs import IngestConfig
    from desomdb.science import binning, dust, spectra
    from desomdb.survey.cube import read_cube

    cube = read_cube(mock_cube_paths[0])
    drp = ingest.read_drpall(mock_survey.drpall_path)[cube.plateifu]
    cfg = IngestConfig()
    got = baxels.process_cube(cube, drp, cfg)

    mw = dust.milky_way_transmission(cube.wave, cube.ebvgal)[:, None, None]
    flux, ivar = cube.flux / mw, cube.ivar * mw**2
    bins = binning.voronoi_bins(*binning.spaxel_signal_noise(flux, ivar, cube.good, cube.wave),
                                cfg.target_snr, cfg.min_spaxel_snr)
    flat = bins.bin_id.ravel()
    used = np.flatnonzero(flat >= 0)
    n_wave = cube.wave.size
    f_sum, i_sum, g_sum, n_mem = spectra.coadd(
        flux.reshape(n_wave, -1)[:, used].astype(np.float64),
        ivar.reshape(n_wave, -1)[:, used].astype(np.float64),
        cube.good.reshape(n_wave, -1)[:, used], flat[used], bins.n_bins)
    i_sum /= binning.law_correction(n_mem)[None, :] ** 2
    ref_f, ref_i, ref_m = spectra.resample_to_rest(cube.wave, f_sum, i_sum, g_sum, float(drp["z"]))

    assert bins.n_bins > 1 and got.baxels.num_rows == bins.n_bins
    np.testing.assert_array_equal(df(got.bin_map)["bin_id"].to_numpy(),
                                  bins.bin_id[df(got.bin_map)["y"].to_numpy(),
                                              df(got.bin_map)["x"].to_numpy()])
    np.testing.assert_array_equal(df(got.baxels)["snr"].to_numpy(), bins.snr.astype(np.float32))
    np.testing.assert_array_equal(spectra.from_list_column(got.spectra["mask"]), ref_m)
    np.testing.assert_allclose(spectra.from_list_column(got.spectra["flux"]), ref_f,
                               rtol=1e-5, atol=1e-6 * np.abs(ref_f).max())
    np.testing.assert_allclose(spectra.from_list_column(got.spectra["ivar"]), ref_i,
                               rtol=1e-5, atol=1e-6 * np.abs(ref_i).max())
