"""desomdb similar: nearest baxels in latent space, nearest galaxies by fingerprint, outliers."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError, InputDataError, ModelError, QueryError
from desomdb.pipeline import assign, similar_index
from desomdb.products import similar
from desomdb.query import views
from desomdb.science import spectra
from desomdb.som import ann

DR15 = Path(__file__).parents[1] / "data" / "MaNGA_test_spectra.fits.gz"


def latest_baxels(arch: Path, model_id: str) -> pl.DataFrame:
    return views.connect(arch).sql(
        "select release, plateifu, bin_id from assignments join latest_cubes "
        "using (release, plateifu) where model_id = ? order by plateifu, bin_id",
        params=[model_id]).pl()


def test_exact_search_and_hnsw_recall_on_clustered_vectors() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 32)) * 3
    x = (centres[rng.integers(0, 30, 3000)] + rng.normal(size=(3000, 32))).astype(np.float32)
    exact = ann.ExactSearch(x)
    index = ann.new_index(32, ann.HnswParams())
    ann.add(index, np.arange(3000), x)
    recalls = []
    for q in rng.integers(0, 3000, 40):
        rows, dist = exact.search(x[q], 10)
        brute = np.sqrt(((x.astype(np.float64) - x[q]) ** 2).sum(axis=1))
        assert rows[0] == q and dist[0] == 0.0
        np.testing.assert_allclose(dist, np.sort(brute)[:10], rtol=1e-9)
        keys, _ = ann.search(index, x[q], 10)
        recalls.append(ann.recall_at_k(keys.astype(np.int64), rows))
    assert np.mean(recalls) >= 0.95


def test_a_baxel_is_its_own_first_neighbour(trained_archive) -> None:
    arch, model_id, _ = trained_archive
    rows = latest_baxels(arch, model_id)
    for release, plateifu, bin_id in rows[:: max(rows.height // 6, 1)].iter_rows():
        found = similar.similar(arch, baxel=f"{plateifu}:{bin_id}", k=5)
        assert (found.method, found.note, found.model_id) == ("usearch HNSW", None, model_id)
        first = found.table.row(0, named=True)
        assert (first["rank"], first["release"], first["plateifu"], first["bin_id"]) == \
            (1, release, plateifu, bin_id)
        assert found.table.height == 5 and found.table["distance"].is_sorted()


def test_hnsw_agrees_with_exact_search_on_the_archive(trained_archive) -> None:
    arch, model_id, _ = trained_archive
    rows = latest_baxels(arch, model_id)
    recalls = []
    k = max(rows.height // 2, 1)  # a real choice among the few baxels of the tiny archive
    for _, plateifu, bin_id in rows.iter_rows():
        a = similar.similar(arch, baxel=f"{plateifu}:{bin_id}", k=k)
        e = similar.similar(arch, baxel=f"{plateifu}:{bin_id}", k=k, exact=True)
        assert e.method == "exact" and e.table["distance"][0] == 0.0
        key = ["release", "plateifu", "bin_id"]
        recalls.append(a.table.join(e.table, on=key).height / e.table.height)
        both = a.table.join(e.table, on=key, suffix="_exact")
        np.testing.assert_allclose(both["distance"], both["distance_exact"], rtol=2e-3,
                                   atol=2e-3 * e.table["distance"].to_numpy().max())
    assert np.mean(recalls) >= 0.95
    # Only current versions are indexed, each baxel once.
    meta = similar_index.read_meta(Archive(arch).root, model_id, "baxels")
    assert meta is not None and meta.n_vectors == rows.height


def _archive_spectra_file(arch: Path, path: Path, n: int = 3) -> tuple[Path, pl.DataFrame]:
    """The first n spectra of one cube, as a Parquet file that predict reads."""
    a = Archive(arch)
    (release, plateifu), f = max(a.cube_files("spectra").items(),
                                 key=lambda kv: pq.read_metadata(kv[1]).num_rows)
    t = pq.read_table(f).slice(0, n)
    bax = pl.from_arrow(a.read("baxels", columns=["plateifu", "bin_id", "norm_flux"],
                               release=release))
    assert isinstance(bax, pl.DataFrame)
    ids = pl.DataFrame({"bin_id": t.column("bin_id").to_numpy()})
    norm = ids.join(bax.filter(pl.col("plateifu") == plateifu), on="bin_id", how="left")
    pq.write_table(pa.table({"flux": t.column("flux"), "mask": t.column("mask"),
                             "norm_flux": norm["norm_flux"].to_numpy()}), path)
    return path, ids.with_columns(pl.lit(release).alias("release"),
                                  pl.lit(plateifu).alias("plateifu"))


def test_a_spectrum_from_a_file_finds_its_baxel(trained_archive, tmp_path) -> None:
    arch, _, _ = trained_archive
    path, ids = _archive_spectra_file(arch, tmp_path / "q.parquet")
    for i in range(ids.height):
        found = similar.similar(arch, spectra_file=path, index=i, k=3)
        first = found.table.row(0, named=True)
        assert (first["release"], first["plateifu"], first["bin_id"]) == \
            (ids["release"][i], ids["plateifu"][i], ids["bin_id"][i])
        assert found.query == f"spectrum {i} of q.parquet"
    with pytest.raises(ConfigError, match=f"has spectra 0-{ids.height - 1}"):
        similar.similar(arch, spectra_file=path, index=ids.height)
    blank = tmp_path / "blank.parquet"
    t = pq.read_table(path).slice(0, 1)
    ones = pc.list_value_length(t.column("mask")).to_numpy()[0]
    pq.write_table(t.set_column(1, "mask", spectra.to_list_column(
        np.ones((1, ones), np.uint8), pa.uint8())), blank)
    with pytest.raises(InputDataError, match="spectrum 0 cannot be searched: only 0 good"):
        similar.similar(arch, spectra_file=blank)


def test_cli(trained_archive, tmp_path) -> None:
    arch, model_id, _ = trained_archive
    _, plateifu, bin_id = latest_baxels(arch, model_id).row(0)
    run = CliRunner().invoke
    out = run(main, ["similar", str(arch), "--baxel", f"{plateifu}:{bin_id}", "-k", "3"])
    assert out.exit_code == 0, out.output
    assert plateifu in out.output and "usearch HNSW search" in out.output
    out = run(main, ["similar", str(arch), "--spectra", str(DR15), "--index", "0", "-k", "2"])
    assert out.exit_code == 0, out.output
    assert "spectrum 0 of MaNGA_test_spectra.fits.gz" in out.output
    for args, message in ((["--baxel", "9999-1:0"], "no cube 9999-1"),
                          (["--baxel", f"{plateifu}:9999"], "has no bin 9999"),
                          (["--baxel", "oops"], "expected PLATEIFU:BIN"),
                          ([], "give exactly one of"),
                          (["--baxel", f"{plateifu}:0", "--galaxy", "x"], "got 2"),
                          # 'has no fingerprints', or (once the session's full_archive
                          # fixture fingerprinted this archive) 'no fingerprint of galaxy'
                          (["--galaxy", "1-1"], "fingerprint")):
        out = run(main, ["similar", str(arch), *args])
        assert out.exit_code != 0 and message in out.output, (args, out.output)
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


def test_nearest_galaxies_by_hellinger_distance(full_archive) -> None:
    arch, model_id, _, _ = full_archive
    fp = pl.from_arrow(Archive(arch).read("fingerprints", columns=["mangaid", "counts"],
                                          model_id=model_id))
    assert isinstance(fp, pl.DataFrame)
    p = {m: np.asarray(c, float) / np.sum(c) for m, c in fp.iter_rows()}
    for mangaid in p:
        found = similar.similar(arch, galaxy=mangaid, k=10)
        assert (found.method, found.note) == ("usearch HNSW", None)
        assert found.table["mangaid"][0] == mangaid and found.table["hellinger"][0] < 1e-3
        assert found.table.height == len(p)
        for other, h in found.table.select("mangaid", "hellinger").iter_rows():
            expect = np.sqrt(max(1 - np.sum(np.sqrt(p[mangaid] * p[other])), 0))
            assert h == pytest.approx(expect, abs=1e-3)
    with pytest.raises(QueryError, match="no fingerprint of galaxy 'nope'"):
        similar.similar_galaxies(arch, "nope")


def test_outlier_views_rank_by_distance_to_the_node(full_archive) -> None:
    arch, model_id, _, _ = full_archive
    con = views.connect(arch, model=model_id)
    bax = con.sql("select * from baxel_outliers where model_id = ? order by outlier_rank",
                  params=[model_id]).pl()
    assert bax.height == latest_baxels(arch, model_id).height
    assert bax["distance"].is_sorted(descending=True)
    assert bax["outlier_rank"].to_list() == list(range(1, bax.height + 1))
    poor = con.sql("select count(*) from poorly_represented join latest_cubes "
                   "using (release, plateifu) where model_id = ?", params=[model_id]).fetchall()[0]
    assert int(bax["beyond_p99"].sum()) == poor[0]
    gal = con.sql("select * from galaxy_outliers where model_id = ? order by outlier_rank",
                  params=[model_id]).pl()
    fp = con.sql("select count(distinct mangaid) from fingerprints where model_id = ?",
                 params=[model_id]).fetchall()[0]
    assert gal.height == fp[0] and gal["desom2_distance"].is_sorted(descending=True)
    assert gal["frac_beyond_p99"].is_between(0, 1).all()
    # The assignments view holds the latents the search reads.
    lat = con.sql("select release, plateifu, bin_id, latent from assignments "
                  "where model_id = ? order by release, plateifu, bin_id", params=[model_id]).pl()
    files = similar_index.latest_assignment_files(Archive(arch), model_id)
    rows, z = similar_index.read_latents(Archive(arch), sorted(files))
    order = np.lexsort((rows["bin_id"].to_numpy(), rows["plateifu"].to_numpy()))
    np.testing.assert_array_equal(np.stack(lat["latent"].to_numpy()), z[order])


def test_missing_or_stale_index_is_searched_exactly_and_assign_repairs_it(
        trained_archive, tmp_path, monkeypatch) -> None:
    src, model_id, _ = trained_archive
    arch = tmp_path / "arch"
    shutil.copytree(src, arch)
    _, plateifu, bin_id = latest_baxels(arch, model_id).row(0)
    query = f"{plateifu}:{bin_id}"
    shutil.rmtree(paths.index_dir(Archive(arch).root, model_id))
    found = similar.similar(arch, baxel=query)
    assert found.method == "exact" and "no baxels index" in (found.note or "")
    report = assign.assign(arch, progress=False)
    assert report.n_encoded == 0 and report.index is not None and report.index.rebuilt
    assert similar.similar(arch, baxel=query).method == "usearch HNSW"
    # A cube assigned before latents were stored: the search says to run assign, which
    # encodes that cube again (only it) and updates the index in place.
    a = Archive(arch)
    part = next(a.root / rel for rel in similar_index.latest_assignment_files(a, model_id)
                if plateifu in rel)
    old = pq.read_table(part).drop_columns([similar_index.LATENT])
    with a.writer("test") as w:
        w.commit(add=[w.stage_table("assignments", old, str(part.relative_to(a.root)))])
    with pytest.raises(ModelError, match="assigned before latents were stored"):
        similar.similar(arch, baxel=query)
    report = assign.assign(arch, progress=False)
    assert report.n_encoded == old.num_rows
    assert similar.similar(arch, baxel=query).method == "usearch HNSW"
    # An index built from another version of that cube's file is updated in place: its rows
    # removed, the file's rows added (one cube of two is over the rebuild threshold, so
    # allow the deletions).
    monkeypatch.setattr(similar_index, "MAX_DELETED_FRACTION", 1.0)
    meta_path = paths.index_meta_path(a.root, model_id, "baxels")
    meta = json.loads(meta_path.read_text())
    meta["files"][str(part.relative_to(a.root))] = "an older version"
    meta["source"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert similar.similar(arch, baxel=query).method == "exact"
    with a.writer("test"):
        index = similar_index.update_baxel_index(a, model_id, meta["ndim"])
    assert not index.rebuilt and index.n_added == index.n_removed == old.num_rows
    assert index.n_vectors == latest_baxels(arch, model_id).height
    found = similar.similar(arch, baxel=query, k=10)
    exact = similar.similar(arch, baxel=query, k=10, exact=True)
    assert found.method == "usearch HNSW" and found.table["plateifu"][0] == plateifu
    assert set(found.table["bin_id"]) == set(exact.table["bin_id"])
