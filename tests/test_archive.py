import pyarrow as pa
import pytest

from desomdb.archive import Archive
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


def test_orphans_of_a_killed_writer_are_removed(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    orphan = arch.root / "baxels" / "release=DR15" / "part-9-9-dead.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half")
    with arch.writer("test"):
        pass
    assert not orphan.exists()


def test_lock_refuses_a_second_writer(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with (arch.writer("first job"), pytest.raises(LockError, match="first job"),
          Archive(tmp_path / "a").writer("second")):
        pass
    with arch.writer("after"):
        pass
