import pyarrow as pa
import pytest

from desomdb.archive.store import Archive
from desomdb.errors import ArchiveError, LockError


def test_missing_archive_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ArchiveError, match="not a desomdb archive"):
        Archive(tmp_path / "none")


def test_commit_is_what_readers_see(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("test") as w:
        staged = w.stage_table("cubes", pa.table({"plateifu": ["1-1"]}),
                               "cubes/release=DR15/part-1-1-abc.parquet")
        # Written and moved but not committed yet: invisible.
        assert not arch.files("cubes")
        w.commit(add=[staged])
    t = arch.read("cubes")
    assert t.column("plateifu").to_pylist() == ["1-1"]
    assert t.column("release").to_pylist() == ["DR15"]  # from the hive partition


def test_a_writer_that_died_mid_commit_leaves_only_its_own_files_deleted(tmp_path,
                                                                         monkeypatch) -> None:
    """The next writer deletes what the dead one moved in, and no file it did not create."""
    from desomdb.archive import paths
    from desomdb.archive import writer as writer_mod

    arch = Archive(tmp_path / "a", create=True)
    notes = arch.root / "cubes" / "NOTES.txt"  # a user's file inside a table folder
    stray = arch.root / "cubes" / "release=DR15" / "part-9-9-old.parquet"  # no journal names it
    stray.parent.mkdir(parents=True)
    notes.write_text("mine")
    stray.write_bytes(b"half")
    real = writer_mod.write_json_atomic

    def dies_at_the_commit_point(path, data):
        if path.name == paths.MANIFEST:
            raise KeyboardInterrupt  # killed after moving files in, before the commit
        real(path, data)

    monkeypatch.setattr(writer_mod, "write_json_atomic", dies_at_the_commit_point)
    with pytest.raises(KeyboardInterrupt), arch.writer("dies") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "part-1-1-aaa.parquet")])
    monkeypatch.undo()
    moved = arch.root / paths.STORE / "cubes" / "release=DR15" / "part-1-1-aaa.parquet"
    assert moved.exists() and list((arch.root / paths.MANIFEST_DIR).glob("cubes-1.json"))
    assert not (arch.root / "cubes" / "release=DR15" / moved.name).exists()  # no glob sees it
    assert arch.generation() == 0 and not arch.files("cubes")  # readers never saw it
    with arch.writer("next"):
        pass
    assert not moved.exists() and not list((arch.root / paths.MANIFEST_DIR).glob("*.json"))
    assert notes.read_text() == "mine" and stray.read_bytes() == b"half"


def test_lock_refuses_a_second_writer(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with (arch.writer("first job"), pytest.raises(LockError, match="first job"),
          Archive(tmp_path / "a").writer("second")):
        pass
    with arch.writer("after"):
        pass


def _stage(w, table: str, rows: list[str], name: str):
    return w.stage_table(table, pa.table({"plateifu": rows}), f"{table}/release=DR15/{name}")


def test_commit_records_size_and_checksum_per_table_segment(tmp_path) -> None:
    import hashlib

    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("test") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "a.parquet"),
                      _stage(w, "galaxies", ["1-1"], "g.parquet")])
        galaxies_segment = arch.manifest()["segments"]
        w.commit(add=[_stage(w, "cubes", ["1-2"], "b.parquet")])
    m = arch.manifest()
    rec = m["records"]["_store/cubes/release=DR15/b.parquet"]
    data = (arch.root / "_store/cubes/release=DR15/b.parquet").read_bytes()
    assert rec.size == len(data) and rec.sha256 == hashlib.sha256(data).hexdigest()
    # The second commit touched only cubes: the galaxies segment is the same file.
    assert [s for s in m["segments"] if "galaxies" in s] == \
        [s for s in galaxies_segment if "galaxies" in s]


def test_superseded_files_outlive_the_commit_for_readers(tmp_path, monkeypatch) -> None:
    import desomdb

    arch = Archive(tmp_path / "a", create=True)
    stored = arch.root / "_store/cubes/release=DR15/a.parquet"
    with arch.writer("test") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "a.parquet")])
    con = desomdb.connect(arch.root)  # plans its files from this manifest
    with arch.writer("test") as w:  # a compaction replaces a.parquet
        w.commit(add=[_stage(w, "cubes", ["1-1"], "compact-2.parquet")],
                 remove=[("cubes", "cubes/release=DR15/a.parquet")])
    assert con.sql("select count(*) from cubes").fetchall() == [(1,)]
    assert stored.exists()
    # Deleted once superseded for RETAIN_COMMITS commits and DESOMDB_RETAIN_SECONDS.
    monkeypatch.setenv("DESOMDB_RETAIN_SECONDS", "0")
    with arch.writer("test") as w:
        w.commit(add=[_stage(w, "galaxies", ["1-1"], "g.parquet")])
        assert stored.exists()  # 1 commit only
        w.commit(add=[_stage(w, "galaxies", ["1-1"], "g2.parquet")])
    assert not stored.exists()
    assert arch.read("cubes").num_rows == 1


def test_a_plain_glob_of_a_table_folder_sees_exactly_the_committed_rows(tmp_path) -> None:
    """Seen: polars and pandas read 5,586 rows for 2,793 committed baxels right after a
    compaction (the superseded part files sat beside the file that replaced them)."""
    import pandas as pd
    import polars as pl

    import desomdb
    from desomdb.archive import paths

    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("ingest") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "part-1-1-a.parquet"),
                      _stage(w, "cubes", ["1-2"], "part-1-2-b.parquet")])
    before = desomdb.connect(arch.root)  # an older snapshot, reading on
    with arch.writer("ingest") as w:  # the release's compaction, as ingest does it
        adds, removes = w.compact("cubes", "DR15", ["plateifu"])
        w.commit(add=adds, remove=removes)
    folder = arch.root / "cubes"
    assert sorted(p.name for p in folder.rglob("*.parquet")) == ["compact-2.parquet"]
    assert pl.scan_parquet(str(folder / "**/*.parquet")).collect().height == 2
    assert len(pd.read_parquet(folder)) == 2
    assert pl.read_parquet(str(folder / "**/*.parquet"), hive_partitioning=True)[
        "release"].to_list() == ["DR15", "DR15"]
    assert before.sql("select count(*) from cubes").fetchall() == [(2,)]
    assert len(list((arch.root / paths.STORE / "cubes").rglob("*.parquet"))) == 3  # kept
    # a killed writer's files and a copy of the archive made without hard links
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(arch.root, copy)
    with Archive(copy).writer("ingest") as w:
        w.commit(add=[_stage(w, "cubes", ["1-3"], "compact-3.parquet")],
                 remove=[("cubes", "cubes/release=DR15/compact-2.parquet")])
    assert pl.scan_parquet(str(copy / "cubes/**/*.parquet")).collect().height == 1


def test_a_table_folder_out_of_step_is_found_and_repaired(tmp_path) -> None:
    """A writer killed between its commit and the table-folder links is caught up."""
    from desomdb.archive import paths
    from desomdb.products.check import check

    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("ingest") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "a.parquet")])
        w.commit(add=[_stage(w, "cubes", ["1-2"], "b.parquet")],
                 remove=[("cubes", "cubes/release=DR15/a.parquet")])
    name_b = arch.root / "cubes/release=DR15/b.parquet"
    name_b.unlink()  # as if killed before linking b
    (arch.root / "cubes/release=DR15/a.parquet").hardlink_to(
        arch.root / paths.STORE / "cubes/release=DR15/a.parquet")  # ... and unlinking a
    report = check(arch.root)
    assert sorted(p.path for p in report.problems if p.kind == "mirror") == [
        "cubes/release=DR15/a.parquet", "cubes/release=DR15/b.parquet"]
    fixed = check(arch.root, repair=True)
    assert fixed.ok, fixed.problems
    assert sorted(p.name for p in (arch.root / "cubes").rglob("*.parquet")) == ["b.parquet"]
    assert name_b.samefile(arch.root / paths.STORE / "cubes/release=DR15/b.parquet")
    # the next writer after a crash does the same on its own (the journal says it died)
    name_b.unlink()
    (arch.root / paths.STAGING).mkdir(exist_ok=True)
    (arch.root / paths.commit_journal(3)).write_text("{}")
    with arch.writer("next"):
        pass
    assert name_b.exists()


def test_format_1_manifest_is_read_and_upgraded(tmp_path) -> None:
    import json

    root = tmp_path / "a"
    (root / "cubes/release=DR15").mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"plateifu": ["1-1"]}), root / "cubes/release=DR15/a.parquet")
    (root / "_manifest.json").write_text(json.dumps(
        {"format_version": 1, "generation": 3,
         "tables": {"cubes": ["cubes/release=DR15/a.parquet"]}}))
    arch = Archive(root)
    assert arch.read("cubes").num_rows == 1
    with arch.writer("test") as w:
        w.commit(add=[_stage(w, "galaxies", ["1-1"], "g.parquet")])
    m = arch.manifest()
    assert m["format_version"] == 3 and m["generation"] == 4
    assert m["records"]["cubes/release=DR15/a.parquet"].sha256 is not None
    # its files stay where they are until rewritten; then the table folder holds links only
    import os

    import polars as pl

    os.environ["DESOMDB_RETAIN_SECONDS"] = "0"
    try:
        with arch.writer("compaction") as w:
            adds, removes = w.compact("cubes", "DR15", ["plateifu"])
            w.commit(add=adds, remove=removes)
            w.commit(add=[_stage(w, "galaxies", ["1-1"], "g2.parquet")])
            w.commit(add=[_stage(w, "galaxies", ["1-1"], "g3.parquet")])
    finally:
        del os.environ["DESOMDB_RETAIN_SECONDS"]
    assert not (root / "cubes/release=DR15/a.parquet").exists()
    assert [p.name for p in (root / "cubes").rglob("*.parquet")] == ["compact-5.parquet"]
    assert pl.scan_parquet(str(root / "cubes/**/*.parquet")).collect().height == 1


def test_a_folder_with_data_but_no_manifest_is_damaged(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("test") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1"], "a.parquet")])
    (arch.root / "_manifest.json").unlink()
    with pytest.raises(ArchiveError, match="damaged archive"):
        Archive(arch.root, create=True)
    assert (arch.root / "_store/cubes/release=DR15/a.parquet").exists()


@pytest.mark.parametrize("text, why", [
    ('{"format_version": 2, "generation": 1, "segm', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"format_version": 2, "generation": "x", "segments": {}, "superseded": []}',
     "generation"),
    ('{"format_version": 2, "generation": 1, "segments": [], "superseded": []}', "segments"),
    ('{"format_version": 99, "generation": 1}', "upgrade desomdb"),
])
def test_a_damaged_manifest_is_a_clear_error(tmp_path, text, why) -> None:
    arch = Archive(tmp_path / "a", create=True)
    (arch.root / "_manifest.json").write_text(text)
    with pytest.raises(ArchiveError, match=why):
        Archive(arch.root)


def test_a_read_only_filesystem_is_a_clear_error(tmp_path, monkeypatch) -> None:
    """CI runs as root, where permission bits are not enforced: make the write itself fail."""
    import errno

    import pyarrow.parquet as pq

    arch = Archive(tmp_path / "a", create=True)

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(pq, "write_table", erofs)
    with arch.writer("test") as w, pytest.raises(ArchiveError, match="read-only filesystem"):
        _stage(w, "cubes", ["1-1"], "a.parquet")
    assert not arch.files("cubes")


def test_a_changed_page_in_a_committed_parquet_file_fails_the_read(tmp_path) -> None:
    """Seen: 64 zeroed bytes inside a committed Parquet file were read silently."""
    import numpy as np

    from desomdb.atomic import read_parquet

    arch = Archive(tmp_path / "a", create=True)
    x = np.random.default_rng(0).random(50_000)  # incompressible: zstd stores it raw
    with arch.writer("test") as w:
        w.commit(add=[w.stage_table("cubes", pa.table({"plateifu": ["1-1"] * x.size, "x": x}),
                                    "cubes/release=DR15/a.parquet")])
    assert arch.read("cubes").column("x").to_numpy().sum() == pytest.approx(x.sum())
    f = arch.files("cubes")[0]
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    f.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="desomdb check"):
        arch.read("cubes")
    with pytest.raises(OSError, match="page integrity"):
        read_parquet(f)


def test_an_older_layout_file_replaced_under_its_own_name(tmp_path, monkeypatch) -> None:
    """The name of a file of the older layout, re-committed into the store, stays linked
    to the new file after the old one's retention ends."""
    import json

    import polars as pl
    import pyarrow.parquet as pq

    root = tmp_path / "a"
    (root / "cubes/release=DR15").mkdir(parents=True)
    pq.write_table(pa.table({"plateifu": ["1-1"]}), root / "cubes/release=DR15/a.parquet")
    (root / "_manifest.json").write_text(json.dumps(
        {"format_version": 1, "generation": 1,
         "tables": {"cubes": ["cubes/release=DR15/a.parquet"]}}))
    arch = Archive(root)
    monkeypatch.setenv("DESOMDB_RETAIN_SECONDS", "0")
    with arch.writer("re-ingest") as w:
        w.commit(add=[_stage(w, "cubes", ["1-1", "1-2"], "a.parquet")],
                 remove=[("cubes", "cubes/release=DR15/a.parquet")])
        for name in ("g1", "g2"):
            w.commit(add=[_stage(w, "galaxies", ["1-1"], f"{name}.parquet")])
    rows = pl.scan_parquet(str(root / "cubes/**/*.parquet")).collect()
    assert sorted(rows["plateifu"]) == ["1-1", "1-2"]
    assert (root / "cubes/release=DR15/a.parquet").samefile(
        root / "_store/cubes/release=DR15/a.parquet")
    assert arch.read("cubes").num_rows == 2
