import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from astropy import units as u
from astropy.coordinates import SkyCoord
from click.testing import CliRunner

from desomdb.cli import main
from desomdb.errors import QueryError
from desomdb.query import views

SQL = Path(__file__).parents[2] / "sql"
PUBLIC = ["cubes", "galaxies", "baxels", "spectra", "bin_map", "images", "labels", "models",
          "nodes",
          "assignments", "node_partials", "node_labels", "fingerprints", "splits", "truth",
          "baxel_labels", "preferred_labels",
          "node_summary", "galaxy_fingerprint", "latest_cubes", "poorly_represented", "drift",
          "model_thresholds", "galaxy_summary", "baxel_outliers", "galaxy_outliers",
          "label_errors", "baxel_estimates", "label_plan", "map_labels"]
#: Views of tables the full_archive fixture does not have, with the test that checks them.
CHECKED_ELSEWHERE = {"label_errors": "tests/pipeline/test_node_labels.py",
                     "baxel_estimates": "tests/pipeline/test_label_plan.py",
                     "label_plan": "tests/pipeline/test_label_plan.py"}


@pytest.fixture(scope="module")
def schema() -> dict:
    return yaml.safe_load((SQL / "schema.yml").read_text())["views"]


def test_one_file_per_view_and_all_documented(schema) -> None:
    files = {p.stem for p in SQL.glob("*.sql")}
    assert files == set(PUBLIC)
    assert set(schema) == set(PUBLIC)
    for text in (SQL / f"{v}.sql" for v in PUBLIC):
        assert text.read_text().rstrip().splitlines()[-1].startswith("select * from final")


def test_every_documented_column_exists(full_archive, schema) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    for view, spec in schema.items():
        if view in CHECKED_ELSEWHERE:
            continue
        cols = {r[0] for r in con.sql(f"describe {view}").fetchall()}
        missing = set(spec["columns"]) - cols
        assert not missing, f"{view}: documented but absent: {missing}"


def test_read_only_and_helpful_errors(full_archive) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    for stmt in ("drop view baxels", "insert into baxels values (1)", "copy baxels to 'x.csv'",
                 "create table t as select 1"):
        with pytest.raises(QueryError, match="only read-only"):
            views.query(con, stmt)
    with pytest.raises(QueryError, match="snr"):
        views.query(con, "select snrr from baxels")
    with pytest.raises(QueryError, match=r"available views: .*baxels"):
        views.query(con, "select * from baxel")


def test_current_model_is_explicit_and_changeable(full_archive) -> None:
    arch, model_id, _, _ = full_archive
    con = views.connect(arch)
    assert con.sql("select current_model()").fetchall()[0][0] == model_id
    n = con.sql("select count(node) from baxel_labels").fetchall()[0][0]
    assert n > 0
    views.use_model(con, "desom1-other")
    assert con.sql("select count(node) from baxel_labels").fetchall()[0][0] == 0


def test_spectra_to_numpy_without_copies(full_archive) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    table = con.sql("select flux from spectra order by plateifu, bin_id").arrow().read_all()
    col = table.column("flux").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=True)
    flux = flat.reshape(-1, 4544)
    assert flux.dtype == np.float32 and flux.shape[0] == table.num_rows
    assert np.shares_memory(flux, flat)


def test_cli_sql_formats(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    q = "select plateifu, bin_id, snr from baxels order by 1, 2 limit 3"
    table = CliRunner().invoke(main, ["sql", str(arch), q])
    assert table.exit_code == 0 and "snr" in table.output
    csv = CliRunner().invoke(main, ["sql", str(arch), q, "--format", "csv"])
    assert csv.output.splitlines()[0] == "plateifu,bin_id,snr"
    out = tmp_path / "x.parquet"
    pq = CliRunner().invoke(main, ["sql", str(arch), q, "--format", "parquet", "--output",
                                   str(out)])
    assert pq.exit_code == 0 and pl.read_parquet(out).height == 3
    js = CliRunner().invoke(main, ["sql", str(arch), q, "--format", "json"])
    assert js.exit_code == 0 and js.output.lstrip().startswith("[")
    bad = CliRunner().invoke(main, ["sql", str(arch), "delete from baxels"])
    assert bad.exit_code != 0 and "only read-only" in bad.output


def test_cli_sql_unknown_model_lists_the_registered_ones(full_archive) -> None:
    arch, model_id, _, d2 = full_archive
    result = CliRunner().invoke(main, ["sql", str(arch), "select count(node) from baxel_labels",
                                       "--model", "desom1-typo"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("desomdb: error: ") and "'desom1-typo' is not registered" in line
    assert f"registered: {', '.join(sorted([model_id, d2]))} " in line
    ok = CliRunner().invoke(main, ["sql", str(arch), "select count(node) from baxel_labels",
                                   "--model", model_id])
    assert ok.exit_code == 0, ok.output


def test_plain_duckdb_cli(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    exe = shutil.which("duckdb")
    if exe is None:
        pytest.skip("duckdb CLI not installed (pip install duckdb-cli)")
    setup = arch / "setup.sql"
    assert setup.exists()  # regenerated after every writer
    moved = tmp_path / "moved"
    shutil.copytree(arch, moved)  # relative paths: the archive can move
    ra, dec = views.connect(arch).sql("select ra, dec from galaxies limit 1").fetchall()[0]
    out = subprocess.run([exe, "-csv", "-noheader", "-c", ".read setup.sql", "-c",
                          "select count(*) from baxel_labels", "-c",
                          f"select count(*) from cone({ra!r}, {dec!r}, 1)"], cwd=moved,
                         capture_output=True, text=True, check=True)
    n = views.connect(arch).sql("select count(*) from baxel_labels").fetchall()[0][0]
    assert out.stdout.strip().splitlines()[-2:] == [str(n), "1"]


def _separation_arcsec(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    return SkyCoord(ra0, dec0, unit="deg").separation(SkyCoord(ra, dec, unit="deg")).arcsec


@pytest.mark.parametrize(("ra0", "dec0", "radius"), [
    (15.0, 0.0, 5.0), (0.0005, 10.0, 60.0), (359.9995, -20.0, 60.0), (120.0, 89.99, 90.0),
    (200.0, -45.0, 3600.0),
])
def test_cone_returns_what_astropy_separation_returns(ra0, dec0, radius) -> None:
    # the macro's own SQL over synthetic galaxies around the centre (RA wrap, pole included)
    rng = np.random.default_rng(int(ra0 * 7 + dec0))
    n = 400
    r = radius * 2 * np.sqrt(rng.uniform(0, 1, n)) / 3600
    theta = rng.uniform(0, 2 * np.pi, n)
    centre = SkyCoord(ra0, dec0, unit="deg")
    points = centre.directional_offset_by(theta * u.rad, r * u.deg)
    ra, dec = points.ra.deg, points.dec.deg
    con = duckdb.connect()
    con.register("points", pa.table({"id": np.arange(n), "ra": ra, "dec": dec}))
    con.execute("create view galaxies as select * from points")
    con.execute(views.macro_sql()["cone"])
    got = con.sql(f"select id, sep_arcsec from cone({ra0!r}, {dec0!r}, {radius!r})").fetchall()
    sep = _separation_arcsec(ra0, dec0, ra, dec)
    clear = np.abs(sep - radius) > 1e-6  # a point on the rim may fall either side
    assert {i for i, _ in got if clear[i]} == set(np.flatnonzero((sep <= radius) & clear))
    assert np.allclose([s for _, s in got], sep[[i for i, _ in got]], rtol=0, atol=1e-6)
    assert [s for _, s in got] == sorted(s for _, s in got)  # nearest first
    assert 0 < len(got) < n


def test_cone_is_defined_by_connect(full_archive) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    rows = con.sql("select plateifu, ra, dec from galaxies order by plateifu").fetchall()
    plateifu, ra, dec = rows[0]
    got = con.sql(f"select plateifu, sep_arcsec from cone({ra!r}, {dec!r} + 2 / 3600, 5)"
                  ).fetchall()
    assert [p for p, _ in got] == [plateifu]
    assert got[0][1] == pytest.approx(2.0, abs=1e-6)
    seps = _separation_arcsec(ra, dec, np.array([r[1] for r in rows]),
                           np.array([r[2] for r in rows]))
    radius = float(seps.max()) + 1
    everything = con.sql(f"select count(*) from cone({ra!r}, {dec!r}, {radius!r})"
                         ).fetchall()[0][0]
    assert everything == len(rows)


def test_readers_cache_parquet_footers(ingested) -> None:
    """Every reading connection (and the CLI's setup.sql) reuses Parquet footers across
    queries; committed files never change under their name, so the cache stays valid."""
    archive, _ = ingested
    with views.connect(archive) as con:
        setting = con.sql("select current_setting('parquet_metadata_cache')").fetchall()
        assert setting == [(True,)]
        first = con.sql("select plateifu, bin_id, snr from baxels order by all").fetchall()
        again = con.sql("select plateifu, bin_id, snr from baxels order by all").fetchall()
        assert first == again and len(first) > 0
    assert "set parquet_metadata_cache = true;" in views.setup_sql(archive).splitlines()


def test_connect_reads_the_manifest_once(trained_archive, tmp_path) -> None:
    """A commit landing while connect() builds its views must not leave a view over an
    unset file list (CI saw ``read_parquet cannot take NULL list`` from a reader racing
    ``desomdb assign``): the views are those of one committed state."""
    from desomdb.archive.store import Archive

    root = tmp_path / "arch"
    shutil.copytree(trained_archive[0], root)
    arch = Archive(root)
    kept = arch.read("assignments")
    with arch.writer("test") as w:
        w.commit(remove=[("assignments", str(f.relative_to(root)))
                         for f in arch.files("assignments")])
    real = Archive.manifest
    landed: list[int] = []

    def manifest_then_commit(self):  # the writer commits right after the reader's snapshot
        state = real(self)
        if not landed:
            landed.append(-1)  # commit() reads the manifest too
            with Archive(root).writer("test") as w:
                landed.append(w.commit(add=[w.stage_table(
                    "assignments", kept, "assignments/model_id=x/part-race.parquet")]))
        return state

    Archive.manifest = manifest_then_commit  # type: ignore[method-assign]
    try:
        con = views.connect(root)
    finally:
        Archive.manifest = real  # type: ignore[method-assign]
    assert len(landed) == 2
    names = {r[0] for r in con.sql("select view_name from duckdb_views()").fetchall()}
    assert "assignments" not in names  # the snapshot had none; the next connect sees them
    con.close()
    with views.connect(root) as con:
        assert con.sql("select count(*) from assignments").fetchall() == [(kept.num_rows,)]


def test_views_read_every_footer_only_when_schemas_differ(trained_archive, tmp_path) -> None:
    """A table whose commits recorded one schema binds its view from one footer
    (``union_by_name`` off); a file with another schema, or a record from before schemas
    were kept, turns ``union_by_name`` back on, so no column is lost."""
    import json

    import pyarrow.compute as pc

    from desomdb.archive import paths
    from desomdb.archive.store import Archive

    root = tmp_path / "arch"  # a commit before schemas were kept: the baxels below
    shutil.copytree(trained_archive[0], root)
    arch = Archive(root)

    def union(table: str) -> bool:
        with views.connect(root) as con:
            return con.sql(f"select getvariable('union_{table}')").fetchall()[0][0]

    records = arch.manifest()["records"]
    assert all(records[str(f.relative_to(root))].schema for f in arch.files("assignments"))
    assert union("assignments") is False and union("baxels") is False
    n = arch.read("assignments").num_rows
    one = arch.files("assignments")[0]
    extra = pq.read_table(one)
    extra = extra.append_column("extra", pc.add(extra.column("node"), 1000))
    with arch.writer("test") as w:
        w.commit(add=[w.stage_table("assignments", extra,
                                    str(one.parent.relative_to(root) / "part-extra.parquet"))])
    assert union("assignments") is True
    with views.connect(root) as con:
        rows = con.sql("select count(*), count(extra) from assignments").fetchall()
    assert rows == [(n + extra.num_rows, extra.num_rows)]
    import hashlib

    top = json.loads((root / paths.MANIFEST).read_text())
    seg = root / top["segments"]["baxels"]["path"]  # as an archive from before schema digests
    data = json.loads(seg.read_text())
    for rec in data["files"].values():
        rec.pop("schema", None)
    seg.write_text(json.dumps(data))
    top["segments"]["baxels"].update(size=seg.stat().st_size,
                                     sha256=hashlib.sha256(seg.read_bytes()).hexdigest())
    (root / paths.MANIFEST).write_text(json.dumps(top))
    assert union("baxels") is True
    with views.connect(root) as con:
        assert con.sql("select count(*) from baxels").fetchall()[0][0] > 0


def _cache_in_use(con) -> bool:
    names = {r[0] for r in con.sql("select database_name from duckdb_databases()").fetchall()}
    return views.CACHE_ALIAS in names


def _baxel_labels(con) -> pl.DataFrame:
    return con.sql("select * from baxel_labels order by release, plateifu, bin_id").pl()


def _same(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    return a.height > 0 and a.equals(b)  # NaN equals NaN, as null equals null


def test_query_cache_gives_the_rows_of_the_live_join(trained_archive, tmp_path) -> None:
    """The writer's session end materialises baxel_labels of the current model; readers get
    exactly the live join's rows from it, for the current model and (live) for any other."""
    from desomdb.archive import paths

    root = tmp_path / "arch"
    shutil.copytree(trained_archive[0], root)
    assert (root / paths.QUERY_CACHE).is_file()
    with views.connect(root) as cached, views.connect(root, cached=False) as live:
        assert _cache_in_use(cached) and not _cache_in_use(live)
        assert _same(_baxel_labels(cached), _baxel_labels(live))
        assert "desomdb_cache" in cached.sql(
            "explain select count(*) from baxel_labels").fetchall()[0][1]
        agg = ("select node, count(*), median(age_mw_gyr) from baxel_labels "
               "group by node order by node")
        assert cached.sql(agg).fetchall() == live.sql(agg).fetchall()
        for con in (cached, live):
            views.use_model(con, "desom1-other")  # not the cache's model: the live join
        assert _same(_baxel_labels(cached), _baxel_labels(live))
        assert cached.sql("select count(node) from baxel_labels").fetchall() == [(0,)]


def test_a_stale_or_damaged_query_cache_is_not_read(trained_archive, tmp_path) -> None:
    """A cache left from before a commit (the writer was killed before rebuilding it) or a
    damaged one is ignored: readers get the live join of their snapshot."""
    from desomdb.archive import paths

    root, arch, first, old = _archive_and_cache(trained_archive, tmp_path)
    cache = root / paths.QUERY_CACHE
    with arch.writer("test") as w:
        w.commit(remove=[("labels", str(first.relative_to(root)))])
    cache.write_bytes(old)  # as if the session had died between its commit and the rebuild
    _assert_live_join_only(root)
    cache.write_bytes(b"not a duckdb file" * 100)
    _assert_live_join_only(root)
    with arch.writer("test"):
        pass  # the next session end rebuilds it
    with views.connect(root) as con, views.connect(root, cached=False) as live:
        assert _cache_in_use(con) and _same(_baxel_labels(con), _baxel_labels(live))


def test_a_file_recommitted_under_its_name_makes_the_cache_stale(trained_archive,
                                                                  tmp_path) -> None:
    """Seen: the cache's stamp hashed file names only, so a commit that replaced a file
    under the same name left readers on the old cached rows."""
    import pyarrow.parquet as pq

    from desomdb.archive import paths

    root, arch, first, old = _archive_and_cache(trained_archive, tmp_path)
    rows = pq.read_table(first)
    with arch.writer("test") as w:  # the same name, one row fewer
        w.commit(add=[w.stage_table("labels", rows.slice(1), str(first.relative_to(root)))])
    (root / paths.QUERY_CACHE).write_bytes(old)  # as if the session had died before the rebuild
    _assert_live_join_only(root)


def _archive_and_cache(trained_archive, tmp_path):
    """A copy of the trained archive, its first labels file and its query cache's bytes."""
    from desomdb.archive import paths
    from desomdb.archive.store import Archive

    root = tmp_path / "arch"
    shutil.copytree(trained_archive[0], root)
    arch = Archive(root)
    return root, arch, arch.files("labels")[0], (root / paths.QUERY_CACHE).read_bytes()


def _assert_live_join_only(root) -> None:
    """The cache is not attached, and readers get the live join's rows."""
    with views.connect(root) as con, views.connect(root, cached=False) as live:
        assert not _cache_in_use(con)
        assert _same(_baxel_labels(con), _baxel_labels(live))


def test_an_open_reader_keeps_its_snapshot_across_a_rebuild(trained_archive, tmp_path) -> None:
    from desomdb.archive import paths
    from desomdb.archive.store import Archive

    root = tmp_path / "arch"
    shutil.copytree(trained_archive[0], root)
    arch = Archive(root)
    with views.connect(root) as con:
        before = _baxel_labels(con)
        assert _cache_in_use(con)
        with arch.writer("test") as w:
            w.commit(remove=[("assignments", str(f.relative_to(root)))
                             for f in arch.files("assignments")])
        assert _same(_baxel_labels(con), before)  # the old cache file, still open
    assert not (root / paths.QUERY_CACHE).exists()  # no assignments: no cache
    with views.connect(root) as con:
        assert not _cache_in_use(con)


def test_model_use_regenerates_setup_sql_and_the_query_cache(trained_archive, tmp_path) -> None:
    """Changing the current model is a writer session: what follows the current model
    (setup.sql's current_model(), the query cache) is regenerated."""
    from desomdb.archive import paths
    from desomdb.archive.store import Archive
    from desomdb.som import registry

    root = tmp_path / "arch"
    shutil.copytree(trained_archive[0], root)
    model_id = trained_archive[1]
    (root / paths.QUERY_CACHE).unlink()
    (root / paths.SETUP_SQL).unlink()
    registry.set_current_model(Archive(root), model_id)
    assert f"current_model() as '{model_id}'" in (root / paths.SETUP_SQL).read_text()
    with views.connect(root) as con:
        assert _cache_in_use(con)


def test_a_view_before_its_stage_has_run_says_which_command_feeds_it(ingested) -> None:
    """Seen: 'sql ... galaxy_summary' before fingerprints gave DuckDB's raw 'does not exist'."""
    from desomdb.errors import QueryError

    con = views.connect(ingested[0])
    with pytest.raises(QueryError) as info:
        views.query(con, "select * from galaxy_summary")
    text = str(info.value)
    assert text.startswith("view 'galaxy_summary' is not available yet: it needs ")
    assert "labels (desomdb label)" in text and "fingerprints (desomdb fingerprints)" in text
    assert "galaxies" not in text.split("needs ")[1]  # ingest has run: not asked for again
    with pytest.raises(QueryError, match="available views"):  # a name that is no view
        views.query(con, "select * from no_such_view")


def test_labels_written_before_the_lsf_column_read_as_nominal(tmp_path) -> None:
    # The labels view over files from before lsf_source / log_age_lw existed (one old, one
    # new, and old alone): the old rows read as 'nominal' and null light-weighted labels.
    old = tmp_path / "old.parquet"
    new = tmp_path / "new.parquet"
    pq.write_table(pa.table({"plateifu": ["1-1"], "bin_id": [0], "age_mw_gyr": [5.0]}), old)
    pq.write_table(pa.table({"plateifu": ["1-2"], "bin_id": [0], "age_mw_gyr": [6.0],
                             "lsf_source": ["cube"], "log_age_lw": [9.5], "mh_lw": [0.0]}),
                   new)
    text = views.view_sql()["labels"]
    con = duckdb.connect()
    for files, union in (([old, new], "true"), ([old], "false")):
        con.execute(f"set variable files_labels = {[str(f) for f in files]}")
        con.execute(f"set variable union_labels = {union}")
        rows = dict(con.sql(f"select plateifu, lsf_source from ({text})").fetchall())
        assert rows["1-1"] == "nominal"
        assert rows.get("1-2", "cube") == "cube"
        assert con.sql(f"select log_age_lw from ({text}) where plateifu = '1-1'"
                       ).fetchall() == [(None,)]


def test_the_labels_view_prefers_fitters_in_the_documented_order(tmp_path) -> None:
    from desomdb.science import fitsetup

    # Three fitters' rows of one baxel, and a failed reference fit of another.
    rows = [("ppxf-miuscat-v2", 0, "ok"), ("batch-miuscat-v1", 0, "ok"),
            ("fast-miuscat-v2", 0, "ok"), ("fast-miuscat-v1", 0, "ok"),
            ("ppxf-miuscat-v2", 1, "failed"), ("fast-miuscat-v1", 1, "ok"),
            ("fast-miuscat-v2", 1, "ok"), ("fast-miuscat-v2", 2, "ok")]
    files = []
    for k, (fitter, bin_id, status) in enumerate(rows):
        files.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(pa.table({"release": ["DR15"], "plateifu": ["1-1"], "bin_id": [bin_id],
                                 "fitter": [fitter], "status": [status]}), files[-1])
    defs = views.view_sql()
    con = duckdb.connect()
    con.execute(f"set variable files_labels = {files}")
    con.execute("set variable union_labels = true")
    con.execute(f"create view labels as {defs['labels']}")
    con.execute("set variable labels_one_fitter = false")
    kept = con.sql(f"select bin_id, fitter from ({defs['preferred_labels']}) order by 1"
                   ).fetchall()
    assert kept == [(0, "ppxf-miuscat-v2"), (1, "fast-miuscat-v2"), (2, "fast-miuscat-v2")]

    text = views.view_sql()["preferred_labels"]
    assert f"order by status = 'ok' desc, {fitsetup.fitter_order_sql()}" in text
    assert set(fitsetup.FITTER_PREFERENCE) == set(fitsetup.FITTERS)
