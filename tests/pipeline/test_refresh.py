"""desomdb refresh: a second mock release on top of a trained, fingerprinted archive."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import ReaderLoop
from polars.testing import assert_frame_equal

from desomdb import mock
from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import LockError
from desomdb.pipeline import assign, ingest, refresh
from desomdb.products import status
from desomdb.query import views
from desomdb.som import registry


def opts(retrain: bool = False) -> refresh.RefreshOptions:
    return refresh.RefreshOptions(retrain=retrain, label_max_per_cube=3)

IGNORED = {"ingested_at", "created_at", "fit_seconds"}


@pytest.fixture(scope="module")
def releases(full_archive, labelled_archive, tmp_path_factory):
    """The fingerprinted DR15 archive (copy) and a DR17 with 1 unchanged, 1 re-processed and
    2 new cubes."""
    arch, model_id, _, d2 = full_archive
    root = tmp_path_factory.mktemp("releases")
    shutil.copytree(labelled_archive.parent / "survey" / "DR15", root / "survey" / "DR15")
    dr17 = mock.generate_survey(root / "survey", 4, "DR17", seed=4, ifu_sizes=(19,),
                                progress=False, previous="DR15", reprocess=0.5)
    shutil.copytree(arch, root / "base")
    return root, dr17, model_id, d2


def dr17_job(dr17: mock.SurveyResult) -> ingest.IngestJob:
    return ingest.IngestJob(release="DR17", cubes=str(dr17.release_dir),
                            drpall=str(dr17.drpall_path), workers=1, cubes_per_task=1,
                            config=ingest.IngestConfig(target_snr=40))


def refresh_copy(archive: Path, dr17: mock.SurveyResult, tmp_path: Path,
                 options: refresh.RefreshOptions) -> tuple[Path, refresh.RefreshReport]:
    """Refresh a copy of ``archive`` with the DR17 release; return the copy and the report."""
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    return copy, refresh.refresh(copy, dr17_job(dr17), options, progress=False)


def tables(path: Path) -> dict[str, pl.DataFrame]:
    """Every table's rows, sorted, without wall-clock columns (file names ignored)."""
    arch = Archive(path)
    out = {}
    for name in arch.manifest()["tables"]:
        df = pl.from_arrow(arch.read(name))
        assert isinstance(df, pl.DataFrame)
        df = df.select([c for c in df.columns if c not in IGNORED])
        keys = [c for c in df.columns if df[c].dtype in (pl.Utf8, pl.Int16, pl.Int32, pl.Int64)]
        out[name] = df.sort(keys)
    return out


def file_digests(path: Path, prefix: str) -> dict[str, str]:
    arch = Archive(path)
    return {rel: hashlib.sha256((path / rel).read_bytes()).hexdigest()
            for files in arch.manifest()["tables"].values() for rel in files
            if prefix in rel}


@pytest.fixture(scope="module")
def refreshed(releases):
    root, dr17, _model_id, _ = releases
    target = root / "refreshed"
    shutil.copytree(root / "base", target)
    with ReaderLoop(target, ("baxels", "labels", "assignments")) as readers:
        report = refresh.refresh(target, dr17_job(dr17), opts(),
                                 progress=False)
    READERS["refresh"] = readers
    return target, report


#: Reader loops that ran during the module's refreshes (checked by a test).
READERS: dict[str, ReaderLoop] = {}


def test_readers_during_a_refresh_never_fail_or_see_half_a_commit(refreshed) -> None:
    READERS["refresh"].check()


def test_second_release_is_added_incrementally(releases, refreshed) -> None:
    root, dr17, model_id, _d2 = releases
    target, report = refreshed
    assert report.ok and report.model_id == model_id
    # What changed on disk: exactly one cube byte-identical to DR15, one re-processed, two new.
    old = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in (root / "survey" / "DR15").glob("*/stack/*.gz")}
    new = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in dr17.release_dir.glob("*/stack/*.gz")}
    same = {n for n in new if old.get(n) == new[n]}
    assert len(same) == 1 and len(new) == 4 and len(old) == 2
    assert report.ingest is not None
    assert (report.ingest.n_carried, report.ingest.n_ingested) == (1, 3)
    con = views.connect(target)
    cubes = con.sql("select plateifu, carried_from from cubes where release = 'DR17'").pl()
    carried = set(cubes.filter(pl.col("carried_from") == "DR15")["plateifu"])
    assert carried == {"-".join(n.split("-")[1:3]) for n in same}
    (pifu,) = carried
    # The mock's truth of the copied cube is the earlier release's.
    t15, t17 = (pl.read_parquet(d / f"truth-{d.name}.parquet").filter(pl.col("plateifu") == pifu)
                .drop("release") for d in (root / "survey" / "DR15", dr17.release_dir))
    assert t15.height > 0 and t15.equals(t17)
    # Carried rows equal the DR15 rows; the spectra file is a hard link, not a copy.
    a = Archive(target)
    f15 = [f for f in a.files("spectra", release="DR15") if pifu in f.name]
    f17 = [f for f in a.files("spectra", release="DR17") if pifu in f.name]
    assert f15[0].name == f17[0].name and f15[0].stat().st_ino == f17[0].stat().st_ino
    for view in ("labels", "bin_map"):
        rows = [con.sql(f"select * exclude (release) from {view} where plateifu = ? "
                        f"and release = ? order by all", params=[pifu, r]).pl()
                for r in ("DR15", "DR17")]
        assert rows[0].height > 0 and rows[0].equals(rows[1]), view
    # Nothing of DR15 changed: its files, and its rows under the model, are untouched.
    base = file_digests(root / "base", "release=DR15")
    assert base and all(file_digests(target, "release=DR15").get(k) == v
                        for k, v in base.items())
    before = tables(root / "base")["assignments"]
    after = tables(target)["assignments"].filter(pl.col("release") == "DR15")
    assert before.equals(after)


def test_new_release_is_assigned_once_per_cube(refreshed) -> None:
    target, report = refreshed
    con = views.connect(target)
    n17 = con.sql("select count(*) from baxels where release = 'DR17'").fetchall()[0][0]
    assigned = con.sql("select count(*) from assignments where release = 'DR17' and "
                       "model_id = current_model()").fetchall()[0][0]
    assert assigned == n17
    fresh = con.sql("select count(*) from baxels join cubes using (release, plateifu) "
                    "where release = 'DR17' and carried_from is null").fetchall()[0][0]
    assert report.assign.n_encoded == fresh  # the carried cube was not re-encoded
    # Node sizes count each cube once, in its newest release.
    latest = con.sql("select count(*) from baxels join latest_cubes using (release, plateifu)"
                     ).fetchall()[0][0]
    members = con.sql("select sum(n_members) from nodes where model_id = current_model()"
                      ).fetchall()[0][0]
    assert members == latest < con.sql("select count(*) from baxels").fetchall()[0][0]


def test_carried_cube_reuses_assignments_and_partials_without_its_spectra(refreshed,
                                                                          tmp_path) -> None:
    from test_assign import _same_result

    target, report = refreshed
    assert report.assign is not None
    assert (report.assign.n_carried, report.assign.n_summed) == (1, 0)
    copy = tmp_path / "arch"
    shutil.copytree(target, copy)
    arch = Archive(copy)
    model_id = registry.current_model(arch)
    assert model_id is not None
    (pifu,) = views.connect(copy).sql("select plateifu from cubes where release = 'DR17' "
                                      "and carried_from = 'DR15'").fetchall()[0]
    parts = {}
    drop = []
    for table in ("assignments", "node_partials"):
        for f in arch.files(table, model_id=model_id):
            release, spectra_name = paths.parse_assignment_part_name(f.name)
            if (paths.parse_part_name(spectra_name) or ("",))[0] == pifu:
                parts[(table, release)] = pq.read_table(f).drop_columns(["release"])
                if release == "DR17":
                    drop.append((table, str(f.relative_to(copy))))
    assert parts[("node_partials", "DR15")].equals(parts[("node_partials", "DR17")])
    with arch.writer("test") as w:  # forget the DR17 copies: assign must carry them again
        w.commit(remove=drop)
    for f in arch.files("spectra"):  # same schema, no rows: reading any would show
        empty = pq.read_table(f).slice(0, 0)
        f.unlink()
        pq.write_table(empty, f)
    out = assign.assign(copy, progress=False)
    assert (out.n_carried, out.n_encoded, out.n_summed) == (1, 0, 0)
    _same_result(target, copy, model_id)


def test_fingerprints_follow_without_retraining(releases, refreshed) -> None:
    root, _, _model_id, d2 = releases
    target, report = refreshed
    f = report.fingerprints
    assert f is not None
    assert f.desom2_model_id == d2 and f.n_galaxies == 4 and f.n_new == 2
    assert set(registry.registered_models(Archive(target))) == \
        set(registry.registered_models(Archive(root / "base")))  # no model trained
    old = tables(root / "base")["fingerprints"]
    new = tables(target)["fingerprints"]
    assert new.height == 4 and set(old["mangaid"]) < set(new["mangaid"])
    # A galaxy whose cube did not change keeps its row exactly; the re-processed one is
    # recounted from its DR17 cube.
    con = views.connect(target)
    carried = con.sql("select distinct mangaid from cubes where carried_from is not null"
                      ).fetchall()[0][0]
    assert old.filter(pl.col("mangaid") == carried).equals(
        new.filter(pl.col("mangaid") == carried))
    counts = new.select("mangaid", pl.col("counts").arr.sum().alias("n"), "n_baxels")
    assert (counts["n"] == counts["n_baxels"]).all()
    n17 = con.sql("select mangaid, count(*) as n from baxels where release = 'DR17' "
                  "group by 1").pl()
    assert n17.join(counts, on="mangaid").select((pl.col("n") == pl.col("n_baxels")).all()
                                                 ).item()


def test_drift_counts_spectra_beyond_the_training_p99(refreshed) -> None:
    target, report = refreshed
    con = views.connect(target)
    p99, = con.sql("select cast(metrics ->> '$.distance_p99' as double) from models "
                   "where model_id = current_model()").fetchall()[0]
    d = con.sql("select distance from assignments where model_id = current_model() and "
                "release = 'DR17'").pl()["distance"].to_numpy()
    assert report.drift.n_baxels == d.size
    assert report.drift.n_beyond_p99 == int((d > p99).sum())
    listed = con.sql("select count(*) from poorly_represented where release = 'DR17' and "
                     "model_id = current_model()").fetchall()[0][0]
    assert listed == report.drift.n_beyond_p99
    assert np.isclose(report.drift.frac_beyond_p99, (d > p99).mean())


def test_rerun_changes_nothing_and_status_reports_both_releases(releases, refreshed,
                                                                 tmp_path) -> None:
    _root, dr17, _, _ = releases
    target, _ = refreshed
    copy, again = refresh_copy(target, dr17, tmp_path, opts())
    assert again.ingest is not None and again.ingest.n_skipped == 4
    assert again.assign is not None and again.fingerprints is not None
    assert again.assign.n_encoded == 0 and again.fingerprints.n_changed == 0
    a, b = tables(target), tables(copy)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equals(b[name]), name
    st = status.status(copy)
    assert set(st.releases) == {"DR15", "DR17"}
    assert st.releases["DR17"]["cubes_ok"] == 4
    assert st.drift and st.unlabelled_cubes == 0


def test_concurrent_refresh_is_refused(releases, tmp_path) -> None:
    root, dr17, _, _ = releases
    copy = tmp_path / "arch"
    shutil.copytree(root / "base", copy)
    with Archive(copy).writer("another writer"), pytest.raises(LockError, match="another"):
        refresh.refresh(copy, dr17_job(dr17), opts(), progress=False)
    # A refresh between two of its stages (no writer lock held) still excludes another one.
    with Archive(copy).job_lock("refresh", "first refresh"), \
            pytest.raises(LockError, match="refreshed by another desomdb process"):
        refresh.refresh(copy, dr17_job(dr17), opts(), progress=False)
    assert not Archive(copy).files("cubes", release="DR17")  # nothing was written


def test_retrain_records_parent_reports_movement_and_never_switches(releases, refreshed,
                                                                    tmp_path) -> None:
    _root, dr17, model_id, _ = releases
    target, _ = refreshed
    copy, rep = refresh_copy(target, dr17, tmp_path, opts(retrain=True))
    new_id = rep.new_model_id
    assert new_id and new_id != model_id
    arch = Archive(copy)
    assert registry.current_model(arch) == model_id  # never switched silently
    con = views.connect(copy)
    parent, spec = con.sql("select parent_model_id, config from models where model_id = ?",
                           params=[new_id]).fetchall()[0]
    assert parent == model_id and json.loads(spec)["extra"]["warm_start_of"] == model_id
    c = rep.comparison
    assert c is not None
    assert c.n_baxels == con.sql("select count(*) from baxels join latest_cubes "
                                    "using (release, plateifu)").fetchall()[0][0]
    assert 0 <= c.frac_moved_beyond_neighbour <= c.frac_node_changed <= 1
    # The measures are zero for a model against itself and positive for the child.
    same = refresh.compare_models(arch, model_id, model_id, min_members=1, save=False)
    assert same.frac_node_changed == 0 and same.label_drift
    assert all(v == 0 for v in same.label_drift.values())
    moved = refresh.compare_models(arch, model_id, new_id, min_members=1, save=False)
    assert moved.frac_node_changed == c.frac_node_changed > 0
    assert all(v >= 0 for v in moved.label_drift.values())
    # The drift of one label, recomputed from the two node_labels tables.
    nl = con.sql("select o.median as m_old, n.median as m_new, (o.p84 - o.p16) / 2 as half "
                 "from node_labels o join node_labels n using (node, label) "
                 "where o.model_id = ? and n.model_id = ? and label = 'log_ml_r'",
                 params=[model_id, new_id]).pl()
    expect = np.median(np.abs(nl["m_new"] - nl["m_old"]) / np.maximum(nl["half"], 1e-6))
    assert np.isclose(moved.label_drift["log_ml_r"], expect)
    saved = json.loads((copy / "artefacts" / new_id / f"comparison-{model_id}.json").read_text())
    assert saved["frac_node_changed"] == c.frac_node_changed
    n_all = con.sql("select count(*) from baxels").fetchall()[0][0]
    assert con.sql("select count(*) from assignments where model_id = ?",
                   params=[new_id]).fetchall()[0][0] == n_all
    assert arch.files("fingerprints", model_id=new_id)  # its own fingerprints and DESOM-2
    # Switching is one explicit, reversible step.
    assert CliRunner().invoke(main, ["model", "use", str(copy), new_id]).exit_code == 0
    assert registry.current_model(arch) == new_id
    assert CliRunner().invoke(main, ["model", "use", str(copy), model_id]).exit_code == 0
    assert registry.current_model(arch) == model_id


def test_refresh_job_file(tmp_path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nrelease = "DR17"\ncubes = "cubes"\ndrpall = "drpall.fits"\n'
                   '[run]\nworkers = 1\nreuse = false\n'
                   '[refresh]\nretrain = true\nlabel_max_per_cube = 7\n')
    ij, opts = refresh.load_job(job)
    assert ij.release == "DR17" and ij.cubes == str(tmp_path / "cubes") and not ij.reuse
    assert opts.retrain and opts.label_max_per_cube == 7 and opts.fingerprints
    shipped, _ = refresh.load_job(Path(__file__).parents[2] / "ingest" / "dr17_refresh.toml")
    assert shipped.release == "DR17"


def _generation(path: Path) -> int:
    try:
        return int(json.loads((path / "_manifest.json").read_text())["generation"])
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
def test_killed_refresh_reruns_to_the_same_archive(releases, refreshed, tmp_path) -> None:
    """SIGKILL the CLI right after its 1st, middle and last-but-one commit, then rerun."""
    root, dr17, _, _ = releases
    target, _ = refreshed
    start = _generation(root / "base")
    total = _generation(target) - start
    job = tmp_path / "refresh.toml"
    job.write_text(f'[job]\nrelease = "DR17"\ncubes = "{dr17.release_dir}"\n'
                   f'drpall = "{dr17.drpall_path}"\n[binning]\ntarget_snr = 40.0\n'
                   '[run]\nworkers = 1\ncubes_per_task = 1\n'
                   '[refresh]\nlabel_max_per_cube = 3\n')
    cmd = [sys.executable, "-m", "desomdb.cli", "refresh", "", str(job)]
    points = sorted({1, total // 2, total - 1})
    assert len(points) == 3, f"a refresh of {total} commits is too short to test"
    expected = tables(target)
    for k in points:
        copy = tmp_path / f"kill{k}"
        shutil.copytree(root / "base", copy)
        cmd[4] = str(copy)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        deadline = time.monotonic() + 300
        while _generation(copy) < start + k and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"refresh ended before kill point {k}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert start + k <= _generation(copy) < start + total, f"kill point {k} missed"
        report = refresh.refresh(copy, *refresh.load_job(job), progress=False)
        assert report.ok
        got = tables(copy)
        assert got.keys() == expected.keys(), k
        for name in expected:
            # Same rows; floats to 1e-5 (encoders run with different thread counts in the
            # killed CLI and here, and BLAS sums in a different order).
            assert_frame_equal(got[name], expected[name], check_exact=False, rel_tol=1e-5,
                               abs_tol=1e-6)
        for name in ("baxels", "labels", "assignments"):
            df = got[name]
            keys = [c for c in ("model_id", "release", "plateifu", "bin_id") if c in df.columns]
            assert df.select(keys).is_duplicated().sum() == 0, name
        assert not list((copy / "_staging").glob("**/*.parquet"))


def test_galaxy_fingerprint_view_agrees_with_the_fingerprints_table(refreshed) -> None:
    """Both mean: each plateifu in its newest release, summed over a galaxy's plateifus."""
    target, _ = refreshed
    con = views.connect(target)
    view = con.sql("select mangaid, node, n_baxels from galaxy_fingerprint").pl()
    table = con.sql("select mangaid, counts from fingerprints "
                    "where model_id = current_model()").pl()
    from_table = {(r["mangaid"], node): n for r in table.iter_rows(named=True)
                  for node, n in enumerate(r["counts"]) if n}
    from_view = {(r["mangaid"], r["node"]): r["n_baxels"] for r in view.iter_rows(named=True)}
    assert from_view == from_table
    # The carried cube is in both releases: counted once.
    both = con.sql("select count(*) from (select plateifu from cubes where status = 'ok' "
                   "group by plateifu having count(*) > 1)").fetchall()[0][0]
    assert both >= 1


def test_similarity_indexes_follow_the_refresh(refreshed) -> None:
    """The baxel and galaxy indexes match the refreshed archive; a carried cube is found once."""
    from desomdb.pipeline import similar_index
    from desomdb.products import similar

    target, report = refreshed
    arch = Archive(target)
    model_id = report.model_id
    assert report.assign is not None and report.assign.index is not None
    assert report.assign.index.n_added > 0
    assert similar_index.is_current(arch, model_id, "baxels")
    assert similar_index.is_current(arch, model_id, "galaxies")
    con = views.connect(target)
    latest = con.sql("select count(*) from baxels join latest_cubes using (release, plateifu)"
                     ).fetchall()[0][0]
    meta = similar_index.read_meta(arch.root, model_id, "baxels")
    assert meta is not None and meta.n_vectors == latest
    pifu, bin_id = con.sql("select plateifu, min(bin_id) from cubes join baxels "
                           "using (release, plateifu) where carried_from is not null "
                           "group by plateifu").fetchall()[0]
    found = similar.similar(target, baxel=f"{pifu}:{bin_id}", k=5)
    exact = similar.similar(target, baxel=f"{pifu}:{bin_id}", k=5, exact=True)
    assert found.method == "usearch HNSW" and found.note is None
    assert found.table.row(0)[1:4] == ("DR17", pifu, bin_id)
    assert not found.table.filter(pl.col("release") == "DR15").height  # no DR15 twin
    assert found.table.select("release", "plateifu", "bin_id").equals(
        exact.table.select("release", "plateifu", "bin_id"))
    mangaid = con.sql("select mangaid from fingerprints where model_id = current_model() "
                      "limit 1").fetchall()[0][0]
    galaxies = similar.similar(target, galaxy=mangaid, k=10)
    assert galaxies.method == "usearch HNSW" and galaxies.table.height == 4


@pytest.mark.slow
def test_refresh_with_a_budget_labels_through_the_plan(releases, tmp_path) -> None:
    # --budget: no full labelling of the new release; after assignment the current model's
    # plan is extended to the budget, its planned baxels fitted, node and map labels rebuilt.
    root, dr17, model_id, _ = releases
    options = refresh.RefreshOptions(label_budget=0.5)
    copy, report = refresh_copy(root / "base", dr17, tmp_path, options)
    assert report.plan is not None and report.plan.model_id == model_id
    arch = Archive(copy)
    con = views.connect(copy)
    n_new = con.sql("select count(*) from baxels where release = 'DR17'").fetchall()[0][0]
    fitted_new = con.sql("select count(*) from labels where release = 'DR17'").fetchall()[0][0]
    planned = con.sql("select count(*) from label_plan").fetchall()[0][0]
    con.close()
    assert 0 < fitted_new < n_new  # some of the new release fitted, not all
    assert planned == sum(report.plan.n_new.values()) > 0
    assert arch.files("map_labels", model_id=model_id)
    job = tmp_path / "refresh.toml"
    job.write_text(f'[job]\nrelease = "DR17"\ncubes = "{dr17.release_dir}"\n'
                   f'drpall = "{dr17.drpall_path}"\n[refresh]\nlabel_budget = 0.2\n')
    assert refresh.load_job(job)[1].label_budget == 0.2
