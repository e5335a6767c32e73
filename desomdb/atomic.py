"""Atomic file writes: the content goes to a temporary name, then one rename.

A reader sees the old file or the new one, never a half-written one. The archive's commit
protocol (:mod:`desomdb.archive.store`), the template builder and the mock survey all write
this way; this module knows nothing of archives.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from desomdb.errors import ArchiveError


def write_error(path: Path, exc: OSError) -> ArchiveError:
    """Make a one-line error for a failed write, naming the file and the fix."""
    if exc.errno == errno.EROFS:
        fix = ("it is on a read-only filesystem (an archive there can still be queried with "
               "'desomdb sql'); copy it to a writable disk to change it")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "no permission to write there; ask for write access or copy the archive"
    elif exc.errno == errno.ENOSPC:
        fix = "the disk is full; free space and rerun (committed data is unchanged)"
    else:
        fix = "nothing was committed; fix the cause and rerun"
    return ArchiveError(f"{path}: cannot write ({exc.strerror or exc}); {fix}")


def atomic_write(path: Path, write: Callable[[Path], None], fsync: bool = False) -> None:
    """Write a file atomically: ``write(tmp)`` to a temporary name, then rename.

    Parameters
    ----------
    path : Path
        Final file name.
    write : callable
        Writes the content to the path it is given.
    fsync : bool
        Flush the temporary file to disk before the rename (for commit points).

    Raises
    ------
    ArchiveError
        If the write fails (read-only filesystem, permissions, full disk); the temporary
        file is removed.
    """
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if fsync:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc


#: How desomdb writes Parquet: zstd, and a CRC32 per data page (``write_page_checksum``),
#: which :func:`read_parquet` and the archive's datasets verify. DuckDB 2.0 does not check
#: page CRCs (a file with zeroed bytes inside a page sums wrong without an error), so for
#: queries through the views the guard is ``desomdb check`` (sha256 of every file).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically (temporary name, then rename)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=4096,
                                                   **PARQUET_OPTIONS))


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, verifying each page's CRC where the file has one.

    Raises
    ------
    OSError
        pyarrow's ``could not verify page integrity`` when a page's bytes changed since it was
        written (files written before checksums were kept read as before).
    """
    return pq.read_table(path, columns=columns, page_checksum_verification=True)


def parquet_format() -> Any:
    """Return a pyarrow dataset format that verifies page CRCs (see :func:`read_parquet`)."""
    import pyarrow.dataset as ds

    return ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (fsync'ed temporary file, then rename)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: _write_text(tmp, text), fsync=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes atomically (temporary name, then rename)."""
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (temporary name, then rename)."""
    atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
