"""What a manifest records about a file, how manifests are read, and the writer lock.

Shared by the archive's reader (:mod:`desomdb.archive.store`) and its writer
(:mod:`desomdb.archive.writer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from desomdb.archive import paths
from desomdb.atomic import write_error
from desomdb.errors import ArchiveError, LockError

#: A superseded file stays on disk at least this many seconds after the commit that dropped
#: it (override with the environment variable ``DESOMDB_RETAIN_SECONDS``) ...
RETAIN_SECONDS = 600.0


#: ... and at least this many commits.
RETAIN_COMMITS = 2


#: The manifest format this code writes (3: the top file records each segment's size,
#: sha256 and generation, so an edited or rolled-back manifest is detected).
FORMAT_VERSION = 3


@dataclass(frozen=True)
class StagedFile:
    """A file written under ``_staging`` and the committed path it will take."""

    table: str
    #: Relative to the archive root, in the store: "_store/baxels/release=DR15/part-...";
    #: a table-folder path given here ("baxels/release=DR15/...") is moved into the store.
    target: str
    staged: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", paths.stored(self.target))


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


def retain_seconds() -> float:
    """Seconds a superseded file is kept (``DESOMDB_RETAIN_SECONDS`` or the default)."""
    value = os.environ.get("DESOMDB_RETAIN_SECONDS")
    try:
        return float(value) if value is not None else RETAIN_SECONDS
    except ValueError:
        raise ArchiveError(f"DESOMDB_RETAIN_SECONDS={value!r} is not a number of "
                           "seconds") from None


RESTORE_HINT = ("restore it from a backup of the archive; desomdb will not guess which files "
                 "were committed ('desomdb check {root}' lists what else is wrong)")


def damaged(path: Path, root: Path, why: str) -> ArchiveError:
    """Make the one-line error for a damaged manifest file, with how to restore it."""
    return ArchiveError(f"{path}: damaged manifest ({why}); "
                        + RESTORE_HINT.format(root=root))


def load_json(path: Path, root: Path, size: int | None = None,
              sha256: str | None = None) -> dict[str, Any]:
    """Read a manifest file (``_manifest.json`` or a segment) as a JSON object, or say why not.

    With ``size`` and ``sha256`` (a segment's record in the top file), the bytes must be
    the ones committed.

    Raises
    ------
    ArchiveError
        If it is missing, unreadable, not a JSON object, or not the file that was committed
        (edited, truncated or replaced): the archive is damaged.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, root, "the file is missing") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if sha256 is not None and (len(data) != size
                               or hashlib.sha256(data).hexdigest() != sha256):
        raise damaged(path, root, f"{len(data)} bytes whose sha256 differs from what "
                                  f"{paths.MANIFEST} recorded at commit: it was edited, "
                                  "truncated or replaced")
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError as exc:
        raise damaged(path, root, f"not valid JSON: {exc.msg} at line {exc.lineno}, "
                                  "perhaps truncated") from None
    if not isinstance(parsed, dict):
        raise damaged(path, root, "not a JSON object")
    return parsed


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


def record_json(record: FileRecord) -> dict[str, Any]:
    """Return a :class:`FileRecord` as a segment stores it."""
    out: dict[str, Any] = {"size": record.size, "sha256": record.sha256}
    if record.schema is not None:
        out["schema"] = record.schema
    return out


@contextlib.contextmanager
def exclusive(lock_path: Path, root: Path, what: str, command: str) -> Iterator[None]:
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
