"""The archive directory: committed Parquet files, atomic commits, and the writer lock.

A query sees exactly the files the manifest lists. The manifest is a small top-level file,
``_manifest.json`` (format version, generation, the segment of each table, superseded
files), plus one immutable *segment* per table under ``_manifest.d/`` that lists the table's
committed files with their size and sha256 recorded at commit. A writer stages new files,
moves them into their hive partition, writes new segments for the tables it changed, then
replaces ``_manifest.json`` in one ``os.replace`` — the commit. A commit therefore costs in
proportion to the tables it touches, not to the archive.

Files moved in but never committed (a killed job) are invisible and are deleted the next
time a writer opens the archive. Files a commit drops are *superseded*, not deleted: a reader
that planned its file list from an older manifest can still open them. They are deleted by a
later commit once they have been superseded for at least ``RETAIN_SECONDS`` and
``RETAIN_COMMITS`` commits (:mod:`desomdb.archive.records`). So readers never see half a unit
of work, and a rerun never duplicates rows.

One writer at a time: :meth:`Archive.writer` takes an exclusive ``flock`` on ``_lock``; the
kernel releases it if the process dies, so there are no stale locks.

A folder that holds archive data but no valid manifest is *damaged*, never new: writers
refuse it, and nothing is deleted (see ``desomdb check``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from desomdb.archive import hooks, paths
from desomdb.archive.records import (
    FORMAT_VERSION,
    RESTORE_HINT,
    FileRecord,
    damaged,
    exclusive,
    load_json,
)
from desomdb.archive.writer import Writer
from desomdb.atomic import parquet_format, write_error, write_json_atomic
from desomdb.errors import ArchiveError, JobInterruptedError, first_line

if TYPE_CHECKING:  # pyarrow.dataset (and pandas with it) only when a table is read
    import pyarrow.dataset as ds

#: Versions this code reads (version 1 kept every table's file list inline, without
#: checksums; version 2 kept no record of its segments; the first commit rewrites either as
#: the current version).
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class _Top:
    """The parsed ``_manifest.json``."""

    version: int
    generation: int
    segments: dict[str, str] = field(default_factory=dict)
    superseded: list[dict[str, Any]] = field(default_factory=list)
    inline: dict[str, list[str]] | None = None  # format version 1
    #: table -> (size, sha256, generation) of its segment (format version 3)
    segment_records: dict[str, tuple[int, str, int]] = field(default_factory=dict)


class Archive:
    """An archive directory (local path).

    Parameters
    ----------
    root : str or Path
        The archive folder.
    create : bool
        Create an empty archive if the folder has none.

    Raises
    ------
    ArchiveError
        If ``root`` holds no archive and ``create`` is False, or holds archive data without a
        valid manifest (damaged), or its manifest cannot be read.
    """

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root).expanduser().resolve()
        manifest = self.root / paths.MANIFEST
        if not manifest.exists():
            found = holds_archive_data(self.root)
            if found:
                raise ArchiveError(
                    f"{self.root}: damaged archive: it holds archive data ({', '.join(found)}) "
                    f"but no {paths.MANIFEST}, so desomdb cannot tell which files were "
                    f"committed and will not write to it; restore {paths.MANIFEST} from a "
                    "backup, or ingest into a new folder ('desomdb check ARCHIVE' lists "
                    "what it finds)"
                )
            if not create:
                raise ArchiveError(
                    f"{self.root}: not a desomdb archive (no {paths.MANIFEST}); create one with "
                    "'desomdb ingest' or check the path"
                )
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise write_error(self.root, exc) from exc
            write_json_atomic(manifest, {"format_version": FORMAT_VERSION, "generation": 0,
                                         "segments": {}, "superseded": []})
        self._top()  # fail early on a damaged manifest

    # ---------------------------------------------------------------- reading
    def _top(self) -> _Top:
        """Read ``_manifest.json`` and check it against the segments on disk.

        A segment the manifest neither lists nor keeps as superseded, from its own or an
        earlier generation, or any segment from a generation past the next one, means the
        manifest was edited, rolled back or partly restored: the archive is damaged (a
        writer that died mid-commit leaves only segments of the next generation).
        """
        problem = ""
        for _ in range(3):  # a writer may commit between reading the file and the folder
            top = self._read_top()
            found = self._unaccounted_segment(top)
            if found is None:
                return top
            problem = found
            if self._read_top().generation == top.generation:
                break
        raise damaged(self.root / paths.MANIFEST, self.root, problem)

    def _unaccounted_segment(self, top: _Top) -> str | None:
        if top.version < 2:
            return None  # format 1 kept its file lists inline, without segments
        try:
            names = [p.name for p in (self.root / paths.MANIFEST_DIR).iterdir()]
        except FileNotFoundError:
            names = []
        listed = set(top.segments.values()) | {s["path"] for s in top.superseded}
        for name in sorted(names):
            parsed = paths.parse_manifest_segment(name)
            rel = f"{paths.MANIFEST_DIR}/{name}"
            if parsed is None or rel in listed or parsed[1] == top.generation + 1:
                continue
            return (f"it does not list {rel}, committed at generation {parsed[1]} while the "
                    f"manifest is at generation {top.generation}: it was edited, rolled back "
                    "or partly restored")
        return None

    def _read_top(self) -> _Top:
        path = self.root / paths.MANIFEST
        data = load_json(path, self.root)
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ArchiveError(
                f"{path}: format_version {version!r} is not one this desomdb reads "
                f"({READABLE_VERSIONS}); "
                + ("upgrade desomdb" if newer else RESTORE_HINT.format(root=self.root))
            )
        generation = data.get("generation")
        if not isinstance(generation, int) or generation < 0:
            raise damaged(path, self.root, "'generation' is not a non-negative integer")
        if version == 1:
            tables = data.get("tables")
            if not isinstance(tables, dict) or not all(
                    isinstance(v, list) and all(isinstance(f, str) for f in v)
                    for v in tables.values()):
                raise damaged(path, self.root, "'tables' is not a mapping of file lists")
            return _Top(1, generation, inline={str(k): list(v) for k, v in tables.items()})
        segments = data.get("segments")
        superseded = data.get("superseded")
        if not isinstance(superseded, list) or not all(
                isinstance(s, dict) and isinstance(s.get("path"), str) for s in superseded):
            raise damaged(path, self.root, "'superseded' is not a list of files")
        if version == 2:
            if not isinstance(segments, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in segments.items()):
                raise damaged(path, self.root, "'segments' is not a mapping of table -> file")
            return _Top(2, generation, dict(segments), list(superseded))
        records = _segment_records(segments)
        if records is None:
            raise damaged(path, self.root, "'segments' is not a mapping of table -> "
                                           "{path, size, sha256, generation}")
        return _Top(3, generation, {t: r[0] for t, r in records.items()}, list(superseded),
                    segment_records={t: r[1:] for t, r in records.items()})

    def _segment(self, top: _Top, table: str) -> dict[str, FileRecord]:
        """Return the committed files of one table with their records."""
        if top.inline is not None:
            return {rel: FileRecord(None, None) for rel in top.inline.get(table, [])}
        name = top.segments.get(table)
        if name is None:
            return {}
        path = self.root / name
        record = top.segment_records.get(table)
        data = (load_json(path, self.root) if record is None
                else load_json(path, self.root, record[0], record[1]))
        files = data.get("files")
        if not isinstance(files, dict):
            raise damaged(path, self.root, "'files' is not a mapping")
        out = {}
        for rel, rec in files.items():
            if not isinstance(rec, dict):
                raise damaged(path, self.root, f"the record of {rel} is not a mapping")
            out[rel] = FileRecord(rec.get("size"), rec.get("sha256"), rec.get("schema"))
        return out

    def _tables(self, top: _Top) -> list[str]:
        return sorted(top.inline if top.inline is not None else top.segments)

    def manifest(self) -> dict[str, Any]:
        """Return the committed state.

        Returns
        -------
        dict
            ``format_version``, ``generation``, ``tables`` (table -> sorted relative paths),
            ``records`` (relative path -> :class:`FileRecord`), ``superseded`` (relative
            paths kept for readers of older manifests) and ``segments`` (manifest files).
        """
        top = self._top()
        tables: dict[str, list[str]] = {}
        records: dict[str, FileRecord] = {}
        for table in self._tables(top):
            seg = self._segment(top, table)
            if seg:
                tables[table] = sorted(seg)
                records.update(seg)
        return {"format_version": top.version, "generation": top.generation,
                "tables": tables, "records": records,
                "superseded": [s["path"] for s in top.superseded],
                "segments": sorted(top.segments.values())}

    def generation(self) -> int:
        """Return the manifest generation (number of commits so far)."""
        return self._top().generation

    def files(self, table: str, **partition: str) -> list[Path]:
        """List the committed files of ``table``, optionally of one partition (release="DR15")."""
        rel = sorted(self._segment(self._top(), table))
        if partition:
            (key, value), = partition.items()
            prefix = paths.partition_dir(table, key, value) + "/"
            rel = [r for r in rel if paths.logical(r).startswith(prefix)]
        return [self.root / r for r in rel]

    def has_table(self, table: str) -> bool:
        """Whether ``table`` has any committed file."""
        return bool(self._segment(self._top(), table))

    def cube_files(self, table: str) -> dict[tuple[str, str], Path]:
        """Per-cube part files of a release table: ``(release, plateifu) -> file``.

        One file per cube (the last listed, as :meth:`cube_parts` orders them).
        """
        return {cube: files[-1] for cube, files in self.cube_parts(table).items()}

    def cube_parts(self, table: str, **partition: str) -> dict[tuple[str, str], list[Path]]:
        """Return the committed per-cube part files of a table: ``(release, plateifu) -> files``.

        ``spectra`` and ``labels`` (one file per cube, and per fitter for labels) take the
        release from their partition; a model's ``assignments`` (``model_id=...``) from the
        file name. Files holding many cubes (compacted ones) are left out.
        """
        out: dict[tuple[str, str], list[Path]] = {}
        for f in self.files(table, **partition):
            cube: tuple[str, str] | None
            if table == "assignments":
                cube = paths.model_part_cube(f.name)
            else:
                part = paths.parse_part_name(f.name)
                cube = None if part is None else (
                    paths.parse_partition(str(f.relative_to(self.root)))[2], part[0])
            if cube is not None:
                out.setdefault(cube, []).append(f)
        return out

    def dataset(self, table: str, schema: pa.Schema | None = None, **partition: str
                ) -> ds.Dataset:
        """Open a pyarrow dataset over the committed files (hive partition columns included).

        With ``schema``, rows are read with exactly those columns: one a file lacks (a
        column added to the table later) reads as null.
        """
        files = self.files(table, **partition)
        if not files:
            raise ArchiveError(
                f"{self.root}: table {table!r} has no committed data"
                + (f" for {partition}" if partition else "")
                + "; run the stage that writes it first (see 'desomdb --help')"
            )
        try:
            import pyarrow.dataset as ds

            return ds.dataset(
                [str(f) for f in files],
                format=parquet_format(),
                partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
                partition_base_dir=str(self.root / table),
                schema=schema,
            )
        except (OSError, pa.ArrowException) as exc:
            raise self._read_error(table, exc) from exc

    def read(
        self,
        table: str,
        columns: Sequence[str] | None = None,
        filter: ds.Expression | None = None,
        schema: pa.Schema | None = None,
        **partition: str,
    ) -> pa.Table:
        """Read committed rows of ``table`` as a pyarrow Table (``schema``: see :meth:`dataset`)."""
        dataset = self.dataset(table, schema, **partition)
        try:
            return dataset.to_table(
                columns=list(columns) if columns is not None else None, filter=filter
            )
        except (OSError, pa.ArrowException) as exc:
            raise self._read_error(table, exc) from exc

    def _read_error(self, table: str, exc: BaseException) -> ArchiveError:
        return ArchiveError(f"{self.root}: cannot read committed table {table!r} "
                            f"({first_line(exc)}); "
                            f"run 'desomdb check {self.root}' to find the damaged file")

    # ---------------------------------------------------------------- writing
    @contextlib.contextmanager
    def writer(self, command: str = "") -> Iterator[Writer]:
        """Hold the archive's writer lock; clean up after killed writers first.

        Raises
        ------
        LockError
            If another process holds the lock.
        """
        with exclusive(self.root / paths.LOCK, self.root, "written", command):
            writer = Writer(self)
            writer.collect_garbage()
            job = _job_record(command)
            self._record_job(job, "running")
            try:
                yield writer
            except BaseException as exc:
                interrupted = isinstance(exc, KeyboardInterrupt | JobInterruptedError)
                self._record_job(job, "interrupted" if interrupted else "failed",
                                 error="" if interrupted else first_line(exc))
                raise
            self._record_job(job, "finished")
            shutil.rmtree(self.root / paths.STAGING, ignore_errors=True)
            hooks.run_post_commit(self)

    def _record_job(self, job: dict[str, Any], state: str, error: str = "") -> None:
        """Write :data:`paths.LAST_JOB` (best effort: a full disk must not hide the error)."""
        with contextlib.suppress(OSError):
            write_json_atomic(self.root / paths.LAST_JOB, {
                **job, "state": state, "error": error,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def last_job(self) -> dict[str, Any] | None:
        """Return the last writer session's record (:data:`paths.LAST_JOB`), if any.

        ``state`` ``running`` reads as ``killed`` when no process holds the writer lock.
        """
        try:
            job = json.loads((self.root / paths.LAST_JOB).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(job, dict):
            return None
        if job.get("state") == "running" and not self.writer_is_running():
            job["state"] = "killed"
        return job

    @contextlib.contextmanager
    def job_lock(self, job: str, command: str = "") -> Iterator[None]:
        """Hold a lock for a multi-stage job (e.g. a refresh) between its writer sessions.

        Raises
        ------
        LockError
            If another process runs the same job on this archive.
        """
        with exclusive(self.root / f"{paths.LOCK}.{job}", self.root, f"{job}ed", command):
            yield

    def writer_is_running(self) -> bool:
        """Whether another process holds the writer lock right now."""
        try:
            fh = (self.root / paths.LOCK).open("a+")
        except OSError:
            return False
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False


def _segment_records(segments: Any) -> dict[str, tuple[str, int, str, int]] | None:
    """Parse format 3's ``segments``: table -> (path, size, sha256, generation); None if bad."""
    if not isinstance(segments, dict):
        return None
    out = {}
    for table, rec in segments.items():
        if not (isinstance(table, str) and isinstance(rec, dict)
                and isinstance(rec.get("path"), str) and isinstance(rec.get("size"), int)
                and isinstance(rec.get("sha256"), str)
                and isinstance(rec.get("generation"), int)):
            return None
        out[table] = (rec["path"], rec["size"], rec["sha256"], rec["generation"])
    return out


def holds_archive_data(root: Path) -> list[str]:
    """Names of archive data found in ``root`` (tables, artefacts, manifest segments)."""
    names = (*paths.TABLES, paths.STORE, paths.MANIFEST_DIR, paths.MODELS_DIR,
             paths.CURRENT_MODEL)
    if not root.is_dir():
        return []
    found = []
    for name in names:
        p = root / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _job_record(command: str) -> dict[str, Any]:
    """Return what a writer session records of itself (the command line, from the CLI)."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    line = (" ".join(["desomdb", *map(shlex.quote, sys.argv[1:])])
            if argv0 in ("desomdb", "__main__.py") else "")
    return {"command": line or command, "pid": os.getpid()}
