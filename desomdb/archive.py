"""The archive directory: committed Parquet files, atomic commits, and the writer lock.

A query sees exactly the files listed in ``_manifest.json``. A writer stages new files,
moves them into their hive partition, then replaces the manifest in one ``os.replace`` — the
commit. Files moved in but never committed (a killed job) are invisible and are deleted the
next time a writer opens the archive; files a commit removes are deleted after it. So readers
never see half a unit of work, and a rerun never duplicates rows.

One writer at a time: :meth:`Archive.writer` takes an exclusive ``flock`` on ``_lock``; the
kernel releases it if the process dies, so there are no stale locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from desomdb import paths
from desomdb.errors import ArchiveError, LockError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StagedFile:
    """A file written under ``_staging`` and the committed path it will take."""

    table: str
    target: str  # relative to the archive root, e.g. "baxels/release=DR15/part-....parquet"
    staged: Path


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
        If ``root`` holds no archive and ``create`` is False.
    """

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root).expanduser().resolve()
        if not (self.root / paths.MANIFEST).exists():
            if not create:
                raise ArchiveError(
                    f"{self.root}: not a desomdb archive (no {paths.MANIFEST}); create one with "
                    "'desomdb ingest' or check the path"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.root / paths.MANIFEST).exists():
                write_json_atomic(
                    self.root / paths.MANIFEST,
                    {"format_version": FORMAT_VERSION, "generation": 0, "tables": {}},
                )

    # ---------------------------------------------------------------- reading
    def manifest(self) -> dict[str, Any]:
        """Return the committed manifest (format_version, generation, tables -> relative paths)."""
        with (self.root / paths.MANIFEST).open() as fh:
            data: dict[str, Any] = json.load(fh)
        if data.get("format_version") != FORMAT_VERSION:
            raise ArchiveError(
                f"{self.root / paths.MANIFEST}: format_version {data.get('format_version')} "
                f"is not {FORMAT_VERSION}; upgrade desomdb"
            )
        return data

    def files(self, table: str, **partition: str) -> list[Path]:
        """List the committed files of ``table``, optionally of one partition (release="DR15")."""
        rel = self.manifest()["tables"].get(table, [])
        if partition:
            (key, value), = partition.items()
            prefix = paths.partition_dir(table, key, value) + "/"
            rel = [r for r in rel if r.startswith(prefix)]
        return [self.root / r for r in rel]

    def has_table(self, table: str) -> bool:
        """Whether ``table`` has any committed file."""
        return bool(self.manifest()["tables"].get(table))

    def dataset(self, table: str, **partition: str) -> ds.Dataset:
        """Open a pyarrow dataset over the committed files (hive partition columns included)."""
        files = self.files(table, **partition)
        if not files:
            raise ArchiveError(
                f"{self.root}: table {table!r} has no committed data"
                + (f" for {partition}" if partition else "")
                + "; run the stage that writes it first (see 'desomdb --help')"
            )
        return ds.dataset(
            [str(f) for f in files],
            format="parquet",
            partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
            partition_base_dir=str(self.root / table),
        )

    def read(
        self,
        table: str,
        columns: Sequence[str] | None = None,
        filter: ds.Expression | None = None,
        **partition: str,
    ) -> pa.Table:
        """Read committed rows of ``table`` as a pyarrow Table."""
        return self.dataset(table, **partition).to_table(
            columns=list(columns) if columns is not None else None, filter=filter
        )

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
            self._write_setup_sql()

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

    def _write_setup_sql(self) -> None:
        """Regenerate ``setup.sql`` (views for the plain DuckDB CLI) after a writer's commits."""
        from desomdb import views

        text = views.setup_sql(self.root)
        path = self.root / paths.SETUP_SQL
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)


class Writer:
    """Stage files and commit them atomically (only inside :meth:`Archive.writer`)."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self.root = archive.root

    def staging_dir(self, unit: str) -> Path:
        """Create a fresh folder under ``_staging`` for one unit of work."""
        path = self.root / paths.STAGING / unit
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_table(self, table: str, data: pa.Table, target: str) -> StagedFile:
        """Write ``data`` to a staged Parquet file that will commit to ``target``."""
        staged = self.staging_dir(table) / Path(target).name
        write_parquet(data, staged)
        return StagedFile(table, target, staged)

    def commit(
        self,
        add: Sequence[StagedFile] = (),
        remove: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Atomically add staged files and remove committed ones.

        Parameters
        ----------
        add : sequence of StagedFile
        remove : sequence of (table, relative path)

        Returns
        -------
        int
            The new manifest generation.
        """
        manifest = self.archive.manifest()
        tables: dict[str, list[str]] = manifest["tables"]
        for item in add:
            dest = self.root / item.target
            dest.parent.mkdir(parents=True, exist_ok=True)
            item.staged.replace(dest)
        removed = set(remove)
        for table, rel in removed:
            if rel in tables.get(table, []):
                tables[table].remove(rel)
        for item in add:
            listed = tables.setdefault(item.table, [])
            if item.target not in listed:
                listed.append(item.target)
        for table in list(tables):
            tables[table] = sorted(tables[table])
            if not tables[table]:
                del tables[table]
        manifest["generation"] = int(manifest["generation"]) + 1
        write_json_atomic(self.root / paths.MANIFEST, manifest)
        keep = {item.target for item in add}
        for _, rel in removed:
            if rel not in keep:
                (self.root / rel).unlink(missing_ok=True)
        return int(manifest["generation"])

    def collect_garbage(self) -> list[Path]:
        """Delete data files no commit lists (left by killed writers) and the staging area."""
        committed = {f for files in self.archive.manifest()["tables"].values() for f in files}
        removed = []
        for table in paths.TABLES:
            base = self.root / table
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                if path.is_file() and str(path.relative_to(self.root)) not in committed:
                    path.unlink()
                    removed.append(path)
        shutil.rmtree(self.root / paths.STAGING, ignore_errors=True)
        return removed


@contextlib.contextmanager
def _exclusive(lock_path: Path, root: Path, what: str, command: str) -> Iterator[None]:
    """Take an exclusive ``flock`` on ``lock_path`` (released by the kernel if we die)."""
    fh = lock_path.open("a+")
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


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=4096)
    tmp.replace(path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (fsync'ed temporary file, then rename)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
