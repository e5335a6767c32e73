from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from desomdb import mock
from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import read_parquet
from desomdb.cli import main
from desomdb.pipeline import ingest, labels
from desomdb.query import views
from desomdb.science import fitting


def _frame(t) -> pl.DataFrame:
    out = pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


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
    assert (lab["fitter"] == fitting.FITTER).all()
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


def test_a_sampled_cube_gets_its_missing_baxels(labelled_archive, tmp_path) -> None:
    """A cube labelled from a sample (the demo's --label-max-per-cube) is not "done" for a
    full run: its other baxels are fitted and merged; the rows it had are kept as they were
    (the old code skipped the cube and labelled nothing)."""
    import shutil

    import pyarrow.parquet as pq

    root = tmp_path / "arch"
    shutil.copytree(labelled_archive, root)
    arch = Archive(root)
    with arch.writer("test") as w:
        for f in arch.files("labels"):  # keep each cube's first row only
            first = pq.read_table(f).slice(0, 1)
            w.commit(add=[w.stage_table("labels", first, str(f.relative_to(root)))])
    kept = _frame(arch.read("labels")).sort("plateifu", "bin_id")
    sizes = _frame(arch.read("baxels")).group_by("plateifu").len()
    extendable = int((sizes["len"] > 1).sum())  # a one-baxel cube is still complete
    assert extendable >= 1
    before = {f.name for f in arch.files("labels")}
    report = labels.label(root, workers=1, progress=False)
    assert report.n_cubes == extendable and report.n_skipped_cubes == 2 - extendable
    # The merged rows are committed under a new name (a committed file never changes under
    # its name: readers cache Parquet footers by path) and the old file is dropped.
    after = {f.name for f in arch.files("labels")}
    assert len(after) == len(before) and len(after - before) == extendable
    assert {paths.parse_label_part_name(n) for n in after} == \
        {paths.parse_label_part_name(n) for n in before}
    lab = _frame(arch.read("labels")).sort("plateifu", "bin_id")
    bax = _frame(arch.read("baxels")).sort("plateifu", "bin_id")
    assert lab.select("plateifu", "bin_id").equals(bax.select("plateifu", "bin_id"))
    old = lab.join(kept.select("plateifu", "bin_id"), on=["plateifu", "bin_id"])
    assert old.select(kept.columns).equals(kept)
    again = labels.label(root, workers=1, progress=False)
    assert again.n_cubes == 0 and again.n_skipped_cubes == 2


@pytest.mark.slow
def test_bench_labels_runs_three_libraries(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util
    import sys

    path = Path(__file__).parents[2] / "benchmarks" / "bench_labels.py"
    spec = importlib.util.spec_from_file_location("bench_labels", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_labels", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    out = bench.main(["--galaxies", "1", "--max-per-cube", "2", "--ifu-sizes", "19",
                      "--workers", "1", "--out", str(tmp_path)])
    assert list(out) == ["bc03", "mastar", "miuscat"]  # cross-library tables first
    assert set(out["bc03"]) == {"default:batch", "default:ppxf"}
    assert set(out["bc03"]["default:batch"]["mass_weight_true"]) == {"initial"}
    assert set(out["mastar"]["default:batch"]["mass_weight_true"]) == {"none"}
    assert set(out["miuscat"]["default:ppxf"]["mass_weight_true"]) == {"current"}
    assert out["mastar"]["default:batch"]["log_age_lw_true"].is_finite().all()
    text = capsys.readouterr().out
    assert "initial-mass-weighted" in text and "current-mass-weighted" in text
    assert text.count("log age (light-weighted)") >= 6  # every library, inside/outside grid
    assert "mass-weighted" not in text.split("== mastar")[1].split("== miuscat")[0]
    side = text.split("all libraries side by side")[1]
    assert "| label | bin S/N | bc03 | mastar | miuscat |" in side and "σ_*" in side
    assert "log M*/L_r" in text.split("== miuscat")[1].split("side by side")[0]
    assert "log M*/L_r" not in text.split("== miuscat")[0]  # not compared across libraries
    assert "truth outside the fitting grid" in text
    assert text.count("batch vs ppxf (same run, interleaved)") == 3
    assert "fits/s ratio" in text


def test_reference_fitter_and_thread_limits_with_one_worker(ingested, tmp_path,
                                                             monkeypatch) -> None:
    # `--fitter ppxf --workers 1` labels in this process: every pPXF evaluation must see one
    # BLAS thread although the caller allows two, and the caller's limit comes back after.
    import shutil

    from ppxf.ppxf import ppxf
    from threadpoolctl import threadpool_info, threadpool_limits

    archive = tmp_path / "arch"
    shutil.copytree(ingested[0], archive)
    seen: list[int] = []
    real_linear_fit = ppxf.linear_fit

    def spy(self, pars):
        seen.extend(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        return real_linear_fit(self, pars)

    monkeypatch.setattr(ppxf, "linear_fit", spy)
    with threadpool_limits(2, user_api="blas"):
        result = CliRunner().invoke(main, ["label", str(archive), "--workers", "1",
                                           "--fitter", "ppxf", "--label-max-per-cube", "1"])
        after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {1}
    assert set(after) == {2}
    lab = _frame(Archive(archive).read("labels"))
    assert lab.height == len(set(lab["plateifu"])) > 0
    assert (lab["fitter"] == fitting.FITTERS["ppxf"]).all() and (lab["status"] == "ok").all()


def test_label_max_per_cube_is_at_most_after_an_earlier_sample(ingested, tmp_path) -> None:
    """Seen: '--label-max-per-cube 40' after the demo's 20 left 52-54 labels per cube."""
    import shutil

    root = tmp_path / "arch"
    shutil.copytree(ingested[0], root)
    labels.label(root, workers=1, progress=False, max_per_cube=3)
    labels.label(root, workers=1, progress=False, max_per_cube=4)
    arch = Archive(root)
    n_baxels = _frame(arch.read("baxels")).group_by("plateifu").len()
    n_labels = _frame(arch.read("labels")).group_by("plateifu").len()
    got = dict(zip(n_labels["plateifu"], n_labels["len"], strict=True))
    for pifu, n in zip(n_baxels["plateifu"], n_baxels["len"], strict=True):
        assert got[pifu] == min(4, n), pifu


def _sigma_offsets(tmp_path: Path, lsf_scale: float) -> tuple[float, float, set[str]]:
    """Median fitted − true σ_* (km/s) of 4 baxels of one galaxy rendered at ``lsf_scale`` x
    the nominal LSF: with the cube's stored LSF (the pipeline) and with the nominal one."""
    from desomdb.survey import manga

    survey = mock.generate_survey(tmp_path / "survey", n_galaxies=1, release="DR15", seed=4,
                                  ifu_sizes=(37,), progress=False, lsf_scale=lsf_scale)
    job = ingest.IngestJob(release="DR15", cubes=str(survey.release_dir),
                           drpall=str(survey.drpall_path), workers=1,
                           config=ingest.IngestConfig(target_snr=25))
    root = tmp_path / "arch"
    ingest.ingest(root, job, progress=False)
    labels.label(root, workers=1, progress=False, max_per_cube=4)
    con = views.connect(root)
    stored, z = con.sql("select lsf_sigma_aa, z from cubes").fetchall()[0]
    rows = con.sql("select l.bin_id, l.sigma, l.lsf_source, t.sigma_kms, b.norm_flux "
                   "from labels l join truth t using (release, plateifu, bin_id) join baxels b "
                   "using (release, plateifu, bin_id) where l.status = 'ok' order by bin_id").pl()
    con.close()
    # Redwards of the library's own resolution the stored LSF is the rendered one.
    ratio = np.asarray(stored) / manga.lsf_sigma_aa(manga.LSF_KNOTS_AA)
    assert np.allclose(ratio[20:], lsf_scale, rtol=0.02)
    spec = read_parquet(Archive(root).files("spectra")[0])
    ids = spec.column("bin_id").to_pylist()
    nominal = []
    for b, norm in zip(rows["bin_id"], rows["norm_flux"], strict=True):
        i = ids.index(b)
        flux, ivar, mask = (np.asarray(spec.column(c)[i].as_py(), dtype=t) for c, t in
                            (("flux", np.float32), ("ivar", np.float32), ("mask", np.uint8)))
        nominal.append(fitting.fit_spectrum(flux, ivar, mask, norm, z)["sigma"])
    truth = rows["sigma_kms"].to_numpy()
    return (float(np.median(rows["sigma"].to_numpy() - truth)),
            float(np.median(np.array(nominal) - truth)), set(rows["lsf_source"]))


def test_a_cube_of_another_resolution_is_fitted_with_its_own_lsf(tmp_path) -> None:
    # The same galaxy rendered at the nominal MaNGA LSF and at 1.3x it: ingest stores each
    # cube's LSF and the fits use it, so σ_* − truth (which includes the bins' rotation
    # smearing) stays what it is at the nominal resolution, while fitting the broader cube
    # with the nominal LSF biases σ_* upwards.
    same_own, same_nominal, _ = _sigma_offsets(tmp_path / "nominal", 1.0)
    own, nominal, sources = _sigma_offsets(tmp_path / "broad", 1.3)
    assert sources == {"cube"}
    assert abs(same_own - same_nominal) < 2.0  # on a nominal cube the two agree
    assert nominal - same_nominal > 12.0  # the bias of the nominal LSF is real
    assert abs(own - same_own) < 5.0  # and the cube's own LSF removes it


def test_a_second_fitter_labels_the_same_baxels_and_views_count_each_once(labelled_archive,
                                                                         tmp_path) -> None:
    """Seen: 'desomdb label --fitter ppxf' on an archive labelled by the default fitter
    skipped every cube ('already done'), so the default could not be checked against the
    reference on one's own data. Named, a fitter labels what it has not; the views keep one
    row per baxel (preferred_labels, FITTER_PREFERENCE), labels has both."""
    import shutil

    root = tmp_path / "arch"
    shutil.copytree(labelled_archive, root)
    first = fitting.DEFAULT_FITTER
    other = next(f for f in ("fast", "batch") if f != first)
    fast_rows = _frame(Archive(root).read("labels"))
    n_first = fast_rows.height
    n_new = sum(min(2, n) for n in fast_rows.group_by("plateifu").len()["len"])
    result = CliRunner().invoke(main, ["label", str(root), "--workers", "1", "--fitter",
                                       other, "--label-max-per-cube", "2"])
    assert result.exit_code == 0, result.output
    assert "2 cubes labelled, 0 already done" in result.output
    assert f"{n_new} baxels in labels by this fitter" in result.output  # not the other's
    raw = _frame(Archive(root).read("labels"))
    counts = dict(raw.group_by("fitter").len().iter_rows())
    assert counts == {fitting.FITTERS[first]: n_first, fitting.FITTERS[other]: n_new}
    preferred = min((first, other), key=fitting.FITTER_PREFERENCE.index)
    con = views.connect(root)
    try:
        one = dict(con.sql("select fitter, count(*) from preferred_labels group by 1")
                   .fetchall())
        assert sum(one.values()) == n_first  # one row per baxel
        assert one[fitting.FITTERS[preferred]] == (n_new if preferred == other else n_first)
        assert con.sql("select count(*) from labels").fetchall() == [(n_first + n_new,)]
        pairs = con.sql(
            "select b.sigma - f.sigma, b.log_age_lw - f.log_age_lw from labels b "
            "join labels f using (release, plateifu, bin_id) "
            "where b.fitter like 'batch%' and f.fitter like 'fast%'").fetchall()
        assert len(pairs) == n_new
        assert all(abs(ds) < 3 and abs(da) < 0.03 for ds, da in pairs), pairs
    finally:
        con.close()
    # The intake catalog's entries read the same way (they inline the views' SQL).
    from desomdb.query import intake_catalog

    cat = intake_catalog.open_catalog(root)
    assert cat["preferred_labels"].read().pl().height == n_first
    assert cat["labels"].read().pl().height == n_first + n_new
    # The default fitter counts any fitter's labels; the named one only its own.
    assert labels.label(root, workers=1, progress=False).n_cubes == 0
    again = labels.label(root, workers=1, progress=False, fitter=other, max_per_cube=2)
    assert again.n_cubes == 0 and again.n_skipped_cubes == 2


def test_a_cuda_device_without_a_gpu_is_one_line(labelled_archive) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, ["label", str(labelled_archive), "--fitter", "batch",
                                       "--device", "cuda"])
    assert result.exit_code != 0
    assert "device 'cuda' is not available here" in result.output
    assert "Traceback" not in result.output
