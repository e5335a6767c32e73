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
later commit once they have been superseded for at least :data:`RETAIN_SECONDS` and
:data:`RETAIN_COMMITS` commits. So readers never see half a unit of work, and a rerun never
duplicates rows.

One writer at a time: :meth:`Archive.writer` takes an exclusive ``flock`` on ``_lock``; the
kernel releases it if the process dies, so there are no stale locks.

A folder that holds archive data but no valid manifest is *damaged*, never new: writers
refuse it, and nothing is deleted (see ``desomdb check``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from desomdb.archive import hooks, paths
from desomdb.atomic import write_error, write_json_atomic, write_parquet
from desomdb.errors import ArchiveError, LockError, first_line

FORMAT_VERSION = 2
#: Versions this code reads (version 1 kept every table's file list inline, without
#: checksums; the first commit rewrites it as version 2).
READABLE_VERSIONS = (1, 2)
#: A superseded file stays on disk at least this many seconds after the commit that dropped
#: it (override with the environment variable ``DESOMDB_RETAIN_SECONDS``) ...
RETAIN_SECONDS = 600.0
#: ... and at least this many commits.
RETAIN_COMMITS = 2


@dataclass(frozen=True)
class StagedFile:
    """A file written under ``_staging`` and the committed path it will take."""

    table: str
    target: str  # relative to the archive root, e.g. "baxels/release=DR15/part-....parquet"
    staged: Path


@dataclass(frozen=True)
class FileRecord:
    """What a commit recorded about one file: its size (bytes), sha256 (hex) and schema.

    ``size`` and ``sha256`` are None for files committed by format version 1 (no record was
    kept). ``schema`` is a digest of a Parquet file's column names and types
    (:func:`schema_digest`), None for other files and for files committed before it was kept:
    readers bind a table's view without reading every file's footer when all its files share
    one schema.
    """

    size: int | None
    sha256: str | None
    schema: str | None = None


@dataclass
class _Top:
    """The parsed ``_manifest.json``."""

    version: int
    generation: int
    segments: dict[str, str] = field(default_factory=dict)
    superseded: list[dict[str, Any]] = field(default_factory=list)
    inline: dict[str, list[str]] | None = None  # format version 1


def retain_seconds() -> float:
    """Seconds a superseded file is kept (``DESOMDB_RETAIN_SECONDS`` or the default)."""
    value = os.environ.get("DESOMDB_RETAIN_SECONDS")
    try:
        return float(value) if value is not None else RETAIN_SECONDS
    except ValueError:
        raise ArchiveError(f"DESOMDB_RETAIN_SECONDS={value!r} is not a number of "
                           "seconds") from None


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
        path = self.root / paths.MANIFEST
        data = _load_json(path, self.root)
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ArchiveError(
                f"{path}: format_version {version!r} is not one this desomdb reads "
                f"({READABLE_VERSIONS}); "
                + ("upgrade desomdb" if newer else _RESTORE_HINT.format(root=self.root))
            )
        generation = data.get("generation")
        if not isinstance(generation, int) or generation < 0:
            raise _damaged(path, self.root, "'generation' is not a non-negative integer")
        if version == 1:
            tables = data.get("tables")
            if not isinstance(tables, dict) or not all(
                    isinstance(v, list) and all(isinstance(f, str) for f in v)
                    for v in tables.values()):
                raise _damaged(path, self.root, "'tables' is not a mapping of file lists")
            return _Top(1, generation, inline={str(k): list(v) for k, v in tables.items()})
        segments = data.get("segments")
        superseded = data.get("superseded")
        if not isinstance(segments, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in segments.items()):
            raise _damaged(path, self.root, "'segments' is not a mapping of table -> file")
        if not isinstance(superseded, list) or not all(
                isinstance(s, dict) and isinstance(s.get("path"), str) for s in superseded):
            raise _damaged(path, self.root, "'superseded' is not a list of files")
        return _Top(2, generation, dict(segments), list(superseded))

    def _segment(self, top: _Top, table: str) -> dict[str, FileRecord]:
        """Return the committed files of one table with their records."""
        if top.inline is not None:
            return {rel: FileRecord(None, None) for rel in top.inline.get(table, [])}
        name = top.segments.get(table)
        if name is None:
            return {}
        path = self.root / name
        data = _load_json(path, self.root)
        files = data.get("files")
        if not isinstance(files, dict):
            raise _damaged(path, self.root, "'files' is not a mapping")
        out = {}
        for rel, rec in files.items():
            if not isinstance(rec, dict):
                raise _damaged(path, self.root, f"the record of {rel} is not a mapping")
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
            rel = [r for r in rel if r.startswith(prefix)]
        return [self.root / r for r in rel]

    def has_table(self, table: str) -> bool:
        """Whether ``table`` has any committed file."""
        return bool(self._segment(self._top(), table))

    def cube_files(self, table: str) -> dict[tuple[str, str], Path]:
        """Per-cube part files of a release table: ``(release, plateifu) -> file``."""
        out = {}
        for f in self.files(table):
            part = paths.parse_part_name(f.name)
            if part is not None:
                out[(paths.parse_partition(str(f.relative_to(self.root)))[2], part[0])] = f
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
            return ds.dataset(
                [str(f) for f in files],
                format="parquet",
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
        with _exclusive(self.root / paths.LOCK, self.root, "written", command):
            writer = Writer(self)
            writer.collect_garbage()
            yield writer
            shutil.rmtree(self.root / paths.STAGING, ignore_errors=True)
            _after_commit(self)

    @contextlib.contextmanager
    def job_lock(self, job: str, command: str = "") -> Iterator[None]:
        """Hold a lock for a multi-stage job (e.g. a refresh) between its writer sessions.

        Raises
        ------
        LockError
            If another process runs the same job on this archive.
        """
        with _exclusive(self.root / f"{paths.LOCK}.{job}", self.root, f"{job}ed", command):
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


def _after_commit(archive: Archive) -> None:
    for hook in hooks.POST_COMMIT:
        hook(archive)


class Writer:
    """Stage files and commit them atomically (only inside :meth:`Archive.writer`)."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self.root = archive.root

    def staging_dir(self, unit: str) -> Path:
        """Create a fresh folder under ``_staging`` for one unit of work."""
        path = self.root / paths.STAGING / unit
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from exc
        return path

    def stage_table(self, table: str, data: pa.Table, target: str) -> StagedFile:
        """Write ``data`` to a staged Parquet file that will commit to ``target``."""
        staged = self.staging_dir("tables") / target  # unique per target
        write_parquet(data, staged)
        return StagedFile(table, target, staged)

    def commit(
        self,
        add: Sequence[StagedFile] = (),
        remove: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Atomically add staged files and supersede committed ones.

        Parameters
        ----------
        add : sequence of StagedFile
        remove : sequence of (table, relative path)

        Returns
        -------
        int
            The new manifest generation.
        """
        arch = self.archive
        top = arch._top()
        touched = {a.table for a in add} | {t for t, _ in remove}
        if top.inline is not None:  # format 1: rewrite every table as a segment
            touched |= set(top.inline)
        segs = {t: arch._segment(top, t) for t in touched}
        added = {a.target for a in add}
        if len(added) != len(add):
            dupes = sorted({a.target for a in add if [b.target for b in add].count(a.target) > 1})
            raise ArchiveError(f"{self.root}: one commit adds {dupes[0]} twice; nothing was "
                               "committed (this is a bug in the calling stage)")
        for item in add:
            record = file_record(item.staged)
            dest = self.root / item.target
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                item.staged.replace(dest)
            except OSError as exc:
                raise write_error(dest, exc) from exc
            segs[item.table][item.target] = record
        for table in segs:  # records missing since format 1
            for rel, rec in segs[table].items():
                if rec.sha256 is None and (self.root / rel).exists():
                    segs[table][rel] = file_record(self.root / rel)
        dropped: list[str] = []
        for table, rel in sorted(set(remove)):
            if rel in added:
                continue
            if segs[table].pop(rel, None) is not None:
                dropped.append(rel)
        generation = top.generation + 1
        segments = dict(top.segments)
        for table in sorted(touched):
            old = segments.pop(table, None)
            if old is not None:
                dropped.append(old)
            if segs[table]:
                name = paths.manifest_segment(table, generation)
                write_json_atomic(self.root / name, {
                    "table": table,
                    "files": {rel: _record_json(r) for rel, r in sorted(segs[table].items())},
                })
                segments[table] = name
        now = time.time()
        keep_for = retain_seconds()
        superseded: list[dict[str, Any]] = []
        expired: list[str] = []
        for entry in top.superseded:
            if entry["path"] in added:
                continue  # re-committed under the same name
            if (now - float(entry.get("time", 0)) >= keep_for
                    and generation - int(entry.get("generation", 0)) >= RETAIN_COMMITS):
                expired.append(str(entry["path"]))
            else:
                superseded.append(entry)
        superseded.extend({"path": rel, "generation": generation, "time": now}
                          for rel in dropped)
        write_json_atomic(self.root / paths.MANIFEST, {
            "format_version": FORMAT_VERSION, "generation": generation,
            "segments": segments, "superseded": superseded,
        })
        for rel in expired:
            (self.root / rel).unlink(missing_ok=True)
        return generation

    def compact(
        self,
        table: str,
        release: str,
        sort_by: Sequence[str],
        transform: Callable[[pa.Table], pa.Table] | None = None,
    ) -> tuple[list[StagedFile], list[tuple[str, str]]]:
        """Stage one file holding every committed row of a release partition.

        Parameters
        ----------
        table, release : str
            The partition.
        sort_by : sequence of str
            Row order of the compacted file.
        transform : callable, optional
            Applied to the concatenated rows (e.g. release-wide quality flags).

        Returns
        -------
        add, remove : list
            Pass both to :meth:`commit` (one commit may compact several tables).
        """
        files = self.archive.files(table, release=release)
        if not files:
            return [], []
        parts = [pq.read_table(f) for f in files]
        data = pa.concat_tables(parts, promote_options="permissive")
        data = data.sort_by([(c, "ascending") for c in sort_by if c in data.column_names])
        if transform is not None:
            data = transform(data)
        name = paths.compact_name(self.archive.generation() + 1)
        staged = self.stage_table(table, data, paths.release_file(table, release, name))
        return [staged], [(table, str(f.relative_to(self.root))) for f in files]

    def replace_cube_rows(
        self, release: str, plateifus: set[str], keep: set[str]
    ) -> tuple[list[StagedFile], list[tuple[str, str]]]:
        """Earlier rows of re-ingested cubes of ``release``, in every table that holds them.

        Per-cube part files of those cubes are dropped; compacted files are rewritten
        without their rows; their assignments under every model are dropped (the current
        model assigns the new version again).

        Parameters
        ----------
        release : str
        plateifus : set of str
            The cubes being replaced.
        keep : set of str
            Relative paths the same commit adds (never dropped).

        Returns
        -------
        add, remove : list
            Rewritten compacted files to add, and files to drop, for :meth:`commit`.
        """
        arch = self.archive
        adds: list[StagedFile] = []
        removes: list[tuple[str, str]] = []
        name = paths.compact_name(arch.generation() + 1)
        values = pa.array(sorted(plateifus), pa.string())
        for table in paths.RELEASE_TABLES:
            for f in arch.files(table, release=release):
                rel = str(f.relative_to(self.root))
                if rel in keep:
                    continue
                part = paths.parse_part_name(f.name)
                if part is not None:
                    if part[0] in plateifus:
                        removes.append((table, rel))
                    continue
                if table == "galaxies":
                    continue  # rebuilt from the drpall when the release is finalised
                rows = pq.read_table(f)
                hit = pc.is_in(rows.column("plateifu"), value_set=values)
                if pc.any(hit).as_py():
                    removes.append((table, rel))
                    adds.append(self.stage_table(table, rows.filter(pc.invert(hit)),
                                                 paths.release_file(table, release, name)))
        for f in arch.files("assignments"):
            rel = str(f.relative_to(self.root))
            try:
                of_release, spectra_name = paths.parse_assignment_part_name(f.name)
            except ValueError:
                continue
            part = paths.parse_part_name(spectra_name)
            if rel not in keep and of_release == release and part and part[0] in plateifus:
                removes.append(("assignments", rel))
        return adds, removes

    def collect_garbage(self) -> list[Path]:
        """Delete files no commit lists (left by killed writers) and the staging area.

        Committed and superseded files, and the manifest's segments, are kept.
        """
        keep = accounted_files(self.archive)
        removed = []
        for folder in (*paths.TABLES, paths.MANIFEST_DIR):
            base = self.root / folder
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                if path.is_file() and str(path.relative_to(self.root)) not in keep:
                    path.unlink()
                    removed.append(path)
        shutil.rmtree(self.root / paths.STAGING, ignore_errors=True)
        return removed


def accounted_files(archive: Archive) -> set[str]:
    """Relative paths the manifest accounts for: committed, superseded and its segments."""
    m = archive.manifest()
    return {*m["records"], *m["superseded"], *m["segments"]}


def holds_archive_data(root: Path) -> list[str]:
    """Names of archive data found in ``root`` (tables, artefacts, manifest segments)."""
    names = (*paths.TABLES, paths.MANIFEST_DIR, paths.MODELS_DIR, paths.CURRENT_MODEL)
    if not root.is_dir():
        return []
    found = []
    for name in names:
        p = root / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


_RESTORE_HINT = ("restore it from a backup of the archive; desomdb will not guess which files "
                 "were committed ('desomdb check {root}' lists what else is wrong)")


def _damaged(path: Path, root: Path, why: str) -> ArchiveError:
    return ArchiveError(f"{path}: damaged manifest ({why}); "
                        + _RESTORE_HINT.format(root=root))


def _load_json(path: Path, root: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _damaged(path, root, "the file is missing") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _damaged(path, root, f"not valid JSON: {exc.msg} at line {exc.lineno}, "
                                   "perhaps truncated") from None
    if not isinstance(data, dict):
        raise _damaged(path, root, "not a JSON object")
    return data


def file_record(path: Path) -> FileRecord:
    """Size, sha256 and (for Parquet) schema digest of a file."""
    try:
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        size = path.stat().st_size
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read a file being committed ({exc.strerror or exc})"
                           ) from exc
    return FileRecord(size, digest, schema_digest(path) if path.suffix == ".parquet" else None)


def schema_digest(path: Path) -> str | None:
    """Digest of a Parquet file's column names and Arrow types (None if it has no footer).

    Order-free: DuckDB matches the columns of a multi-file scan by name, so files that hold
    the same columns in another order still share one view without ``union_by_name``.
    """
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid):
        return None
    text = ";".join(sorted(f"{f.name}:{f.type}" for f in schema))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record_json(record: FileRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"size": record.size, "sha256": record.sha256}
    if record.schema is not None:
        out["schema"] = record.schema
    return out


@contextlib.contextmanager
def _exclusive(lock_path: Path, root: Path, what: str, command: str) -> Iterator[None]:
    """Take an exclusive ``flock`` on ``lock_path`` (released by the kernel if we die)."""
    try:
        fh = lock_path.open("a+")
    except OSError as exc:
        raise write_error(lock_path, exc) from exc
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown process"
        fh.close()
        raise LockError(
            f"{root} is being {what} by another desomdb process ({holder}); wait "
            "for it to finish (the lock is released automatically when it exits)"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, '{command or ' '.join(sys.argv)}', since "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%S')}")
        fh.flush()
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
