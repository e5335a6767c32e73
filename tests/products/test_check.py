"""desomdb check, and what every command does with a damaged archive (issue: integrity)."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_job

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ArchiveError
from desomdb.pipeline import ingest
from desomdb.products.check import check


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "arch"
    shutil.copytree(src, dst)
    return dst


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_lock"}


def _cli(*args: object):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _one_error_line(result) -> str:
    errors = [ln for ln in result.output.splitlines() if ln.startswith("desomdb: error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_a_healthy_archive_checks_ok(trained_archive) -> None:
    arch, _, _ = trained_archive
    report = check(arch)
    assert report.ok, report.problems
    assert report.n_files == len(Archive(arch).manifest()["records"])
    result = _cli("check", arch)
    assert result.exit_code == 0 and "ok" in result.output


def test_check_finds_missing_truncated_and_changed_files(ingested, tmp_path) -> None:
    root = _copy(ingested[0], tmp_path)
    arch = Archive(root)
    baxels, = arch.files("baxels")
    spectra = arch.files("spectra")
    spectra[0].unlink()
    baxels.write_bytes(baxels.read_bytes()[:-100])
    data = bytearray(spectra[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    spectra[1].write_bytes(bytes(data))
    report = check(root)
    kinds = {p.kind: p.path for p in report.problems}
    assert kinds["missing"] == str(spectra[0].relative_to(root))
    assert kinds["size"] == str(baxels.relative_to(root))
    assert kinds["checksum"] == str(spectra[1].relative_to(root))
    assert check(root, checksums=False).problems != ()  # sizes alone still see two
    result = _cli("check", root)
    assert result.exit_code == 1 and "3 problem(s)" in _one_error_line(result)
    # Every command on the damaged archive: one line, pointing at 'desomdb check'.
    for args in (("status", root), ("sql", root, "select count(*) from baxels")):
        result = _cli(*args)
        assert result.exit_code != 0 and "desomdb check" in _one_error_line(result)


def test_check_finds_duplicate_keys_and_orphan_assignments(trained_archive, tmp_path) -> None:
    root = _copy(trained_archive[0], tmp_path)
    arch = Archive(root)
    with arch.writer("test") as w:
        dup = arch.read("baxels", release="DR15").slice(0, 1).drop_columns(["release"])
        a = arch.read("assignments").slice(0, 1)
        model = a.column("model_id")[0].as_py()
        orphan = a.drop_columns(["model_id"]).set_column(
            a.schema.get_field_index("plateifu") - 1, "plateifu", pa.array(["9999-9999"]))
        w.commit(add=[
            w.stage_table("baxels", dup, "baxels/release=DR15/part-dup.parquet"),
            w.stage_table("assignments", orphan,
                          f"assignments/model_id={model}/release=DR15-part-orphan.parquet"),
        ])
    kinds = {p.kind for p in check(root).problems}
    assert {"duplicate-key", "orphan-assignment"} <= kinds


def test_repair_quarantines_unlisted_files_and_deletes_only_staging(ingested,
                                                                    tmp_path) -> None:
    """Seen: '--repair' deleted a user's baxels/NOTES.txt and any file no manifest listed."""
    root = _copy(ingested[0], tmp_path)
    committed = _digests(root)
    stray = root / "baxels" / "release=DR15" / "part-0000-dead.parquet"
    pq.write_table(pa.table({"x": [1]}), stray)
    notes = root / "baxels" / "NOTES.txt"
    notes.write_text("my notes")
    (root / "_staging" / "ingest").mkdir(parents=True)
    (root / "_staging" / "ingest" / "half.parquet").write_bytes(b"half")
    report = check(root)
    assert sorted(p.kind for p in report.problems) == ["staging", "unlisted", "unlisted"]
    assert all(p.repairable for p in report.problems)
    stray_bytes = stray.read_bytes()
    result = _cli("check", root, "--repair")
    assert result.exit_code == 0, result.output
    assert "repaired: moved baxels/NOTES.txt -> _quarantine/" in result.output
    assert not stray.exists() and not notes.exists()
    assert not (root / "_staging").exists()
    quarantine = root / "_quarantine"
    assert [p.read_text() for p in quarantine.rglob("NOTES.txt")] == ["my notes"]
    assert [p.read_bytes() for p in quarantine.rglob("part-0000-dead.parquet")] == [stray_bytes]
    after = _digests(root)
    rewritten = {"setup.sql", "_last_job.json"}  # every writer session rewrites them
    assert {k: v for k, v in after.items() if k not in rewritten and "_quarantine" not in k} \
        == {k: v for k, v in committed.items() if k not in rewritten}
    assert check(root).ok  # the quarantine is outside every table folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_manifest_missing_a_table_is_damaged_and_writers_delete_nothing(
        labelled_archive, tmp_path) -> None:
    """Seen: with 'labels' removed from _manifest.json, a writer session deleted every labels
    file (exit 0)."""
    root = _copy(labelled_archive, tmp_path)
    _edit_json(root / "_manifest.json", lambda d: d["segments"].pop("labels"))
    before = _digests(root)
    for args in (("label", root, "--workers", "1"), ("check", root, "--repair"),
                 ("status", root)):
        result = _cli(*args)
        assert result.exit_code != 0, (args, result.output)
        assert "damaged manifest" in result.output, result.output
    assert _digests(root) == before


def test_empty_segments_are_damaged_and_repair_deletes_nothing(labelled_archive,
                                                               tmp_path) -> None:
    """Seen: with "segments": {}, 'status' exited 0 and '--repair' deleted 28 of 30 files."""
    root = _copy(labelled_archive, tmp_path)
    _edit_json(root / "_manifest.json", lambda d: d.update(segments={}))
    before = _digests(root)
    assert _cli("status", root).exit_code != 0
    result = _cli("check", root, "--repair")
    assert result.exit_code == 1 and "damaged manifest" in result.output
    assert _digests(root) == before


def test_an_edited_segment_is_damaged_for_readers_and_writers(labelled_archive,
                                                              tmp_path) -> None:
    """Seen: two entries removed from a labels segment: 'sql' showed 16 of 32 labels."""
    root = _copy(labelled_archive, tmp_path)
    top = json.loads((root / "_manifest.json").read_text())
    segment = root / top["segments"]["labels"]["path"]
    _edit_json(segment, lambda d: d["files"].pop(sorted(d["files"])[0]))
    before = _digests(root)
    result = _cli("sql", root, "select count(*) from labels")
    assert result.exit_code != 0
    assert "edited, truncated or replaced" in _one_error_line(result)
    assert _cli("check", root, "--repair").exit_code == 1
    assert _digests(root) == before


def test_a_rolled_back_manifest_is_damaged(labelled_archive, tmp_path) -> None:
    root = _copy(labelled_archive, tmp_path)
    old = (root / "_manifest.json").read_text()
    arch = Archive(root)
    for _ in range(2):  # two commits after the copy of the manifest was taken
        with arch.writer("test") as w:
            rows = arch.read("galaxies").drop_columns(["release"])
            target = f"galaxies/release=DR15/part-x{arch.generation()}.parquet"
            w.commit(add=[w.stage_table("galaxies", rows, target)])
    (root / "_manifest.json").write_text(old)  # restored from an older backup
    with pytest.raises(ArchiveError, match="rolled back"):
        Archive(root).manifest()


def test_deleted_manifest_makes_writers_refuse(ingested, ingest_survey, tmp_path) -> None:
    """Seen: 'desomdb ingest' after deleting _manifest.json deleted committed files, exit 0."""
    root = _copy(ingested[0], tmp_path)
    (root / "_manifest.json").unlink()
    before = _digests(root)
    result = _cli("ingest", root, "--cubes", ingest_survey.release_dir, "--drpall",
                  ingest_survey.drpall_path, "--release", "DR15", "--workers", "1")
    assert result.exit_code != 0
    assert "damaged archive" in _one_error_line(result)
    assert _digests(root) == before
    report = check(root)
    assert [p.kind for p in report.problems] == ["manifest"]
    assert _cli("check", root).exit_code == 1


@pytest.mark.parametrize("damage", ["truncated", "not-json", "wrong-structure"])
def test_damaged_manifest_or_current_model_is_one_line(trained_archive, tmp_path,
                                                       damage) -> None:
    root = _copy(trained_archive[0], tmp_path)
    manifest = root / "_manifest.json"
    current = root / "_current_model.json"
    text = {"truncated": manifest.read_text()[:40], "not-json": "}{",
            "wrong-structure": json.dumps({"format_version": 2, "generation": 3,
                                           "segments": {"cubes": 7}, "superseded": []})}[damage]
    manifest.write_text(text)
    for args in (("status", root), ("sql", root, "select 1"), ("label", root)):
        result = _cli(*args)
        assert result.exit_code != 0 and "damaged manifest" in _one_error_line(result)
    shutil.rmtree(root)
    root = _copy(trained_archive[0], tmp_path)
    current.write_text({"truncated": current.read_text()[:5], "not-json": "}{",
                        "wrong-structure": "[3]"}[damage])
    result = _cli("sql", root, "select count(*) from assignments")
    assert result.exit_code != 0 and "model use" in _one_error_line(result)
    assert any(p.kind == "current-model" for p in check(root).problems)


def test_ingest_on_a_read_only_filesystem_is_one_line(ingest_survey, tmp_path,
                                                      monkeypatch) -> None:
    """The write helper fails with EROFS (root ignores permission bits, so no chmod test)."""
    import errno

    import desomdb.atomic as atomic_mod

    root = tmp_path / "arch"
    Archive(root, create=True)
    real = atomic_mod.atomic_write

    def read_only(path, write, fsync=False):
        if "_staging" in str(path) or path.suffix == ".json":
            try:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            except OSError as exc:
                raise atomic_mod.write_error(path, exc) from exc
        return real(path, write, fsync)

    monkeypatch.setattr(atomic_mod, "atomic_write", read_only)
    result = _cli("ingest", root, "--cubes", ingest_survey.release_dir, "--drpall",
                  ingest_survey.drpall_path, "--release", "DR15", "--workers", "1")
    assert result.exit_code != 0
    assert "read-only filesystem" in _one_error_line(result)


def test_readers_never_fail_or_see_half_a_commit(ingest_survey, tmp_path) -> None:
    """A reader loop during ingest and compaction: no error, only committed row counts."""
    from conftest import ReaderLoop

    root = tmp_path / "arch"
    Archive(root, create=True)
    with ReaderLoop(root, ("baxels", "spectra")) as readers:
        ingest.ingest(root, make_job(ingest_survey), progress=False, commit_every_s=0)
        ingest.ingest(root, make_job(ingest_survey), progress=False)  # compaction again
    readers.check()
    assert readers.seen["baxels"] and max(readers.committed["baxels"]) > 0


def test_readers_during_assign_never_fail_or_see_half_a_commit(trained_archive,
                                                              tmp_path) -> None:
    """Assign again from scratch (its files dropped first) with a reader loop running."""
    from conftest import ReaderLoop

    from desomdb.pipeline import assign

    root = _copy(trained_archive[0], tmp_path)
    arch = Archive(root)
    with arch.writer("test") as w:  # forget the assignments, so assign writes them again
        w.commit(remove=[("assignments", str(f.relative_to(root)))
                         for f in arch.files("assignments")])
    with ReaderLoop(root, ("assignments", "nodes")) as readers:
        assign.assign(root, progress=False)
    readers.check()
    assert max(readers.committed["assignments"]) > 0


def test_check_finds_a_missing_or_changed_model_checkpoint(trained_archive, tmp_path) -> None:
    """Seen: 'check' said ok with the current model's artefact deleted."""
    root = _copy(trained_archive[0], tmp_path)
    assert check(root, checksums=True).ok
    rel = Archive(root).read("models", columns=["artefact_path"]).column(0)[0].as_py()
    (root / rel).write_bytes((root / rel).read_bytes() + b"x")
    assert [p.kind for p in check(root).problems] == ["artefact"]
    (root / rel).unlink()
    problems = check(root).problems
    assert [p.kind for p in problems] == ["artefact"] and "missing" in problems[0].message
    assert _cli("check", root).exit_code == 1
