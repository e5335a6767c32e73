"""The writer session of an archive: staging, commits, compaction, garbage collection.

A :class:`Writer` comes from :meth:`desomdb.archive.store.Archive.writer`, which holds the
archive's writer lock for the session; the commit protocol is described in
:mod:`desomdb.archive.store`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from desomdb.archive import paths
from desomdb.archive.records import (
    FORMAT_VERSION,
    RETAIN_COMMITS,
    FileRecord,
    StagedFile,
    file_record,
    record_json,
    retain_seconds,
)
from desomdb.atomic import read_parquet, write_error, write_json_atomic, write_parquet
from desomdb.errors import ArchiveError

if TYPE_CHECKING:  # the archive makes writers; a writer only calls its methods
    from desomdb.archive.store import Archive


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
        generation = top.generation + 1
        # The journal names every file this commit may leave behind, before any is moved:
        # the next writer deletes those (and only those) if this one dies before the end.
        journal = self.root / paths.commit_journal(generation)
        write_json_atomic(journal, {
            "targets": sorted(a.target for a in add),
            "segments": sorted(paths.manifest_segment(t, generation) for t in touched)})
        added = self._move_in(add, segs)
        dropped: list[str] = []
        for table, rel in sorted(set(remove)):
            if rel not in segs[table]:  # a table-folder name of a stored file
                rel = paths.stored(rel)
            if rel in added:
                continue
            if segs[table].pop(rel, None) is not None:
                dropped.append(rel)
        segments = {t: {"path": name, **self._segment_record(top, t, name)}
                    for t, name in top.segments.items() if t not in touched}
        for table in sorted(touched):
            old = top.segments.get(table)
            if old is not None:
                dropped.append(old)
            if segs[table]:
                name = paths.manifest_segment(table, generation)
                write_json_atomic(self.root / name, {
                    "table": table,
                    "files": {rel: record_json(r) for rel, r in sorted(segs[table].items())},
                })
                rec = file_record(self.root / name)
                segments[table] = {"path": name, "size": rec.size, "sha256": rec.sha256,
                                   "generation": generation}
        superseded, expired = _retained(top.superseded, added, dropped, generation)
        write_json_atomic(self.root / paths.MANIFEST, {
            "format_version": FORMAT_VERSION, "generation": generation,
            "segments": dict(sorted(segments.items())), "superseded": superseded,
        })
        # Committed. The table folders follow: links to the files added, none to those
        # dropped (a crash before the journal goes leaves it for the next writer, which
        # brings every table folder in step: sync_mirror).
        for rel in sorted(added):
            _link_mirror(self.root, rel)
        for rel in dropped:
            _unlink_mirror(self.root, rel)
        journal.unlink(missing_ok=True)
        for rel in expired:
            _unlink_mirror(self.root, rel)
            (self.root / rel).unlink(missing_ok=True)
        # an older layout's file may share its name with a committed stored file: relink it
        renamed = [paths.stored(r) for r in expired
                   if paths.mirror(r) is None and (self.root / paths.stored(r)).exists()]
        if renamed:
            records = self.archive.manifest()["records"]
            for rel in renamed:
                if rel in records:
                    _link_mirror(self.root, rel)
        return generation

    def _segment_record(self, top: Any, table: str, name: str) -> dict[str, Any]:
        """Return the size, sha256 and generation of a segment this commit keeps as it is."""
        kept = top.segment_records.get(table)
        if kept is not None:
            return {"size": kept[0], "sha256": kept[1], "generation": kept[2]}
        rec = file_record(self.root / name)  # an earlier format kept no record: make one
        parsed = paths.parse_manifest_segment(name)
        return {"size": rec.size, "sha256": rec.sha256,
                "generation": parsed[1] if parsed else top.generation}

    def _move_in(self, add: Sequence[StagedFile],
                 segs: dict[str, dict[str, FileRecord]]) -> set[str]:
        """Move staged files to their committed paths and record them in ``segs``.

        Also records files that format version 1 committed without a record. Returns the
        committed paths added.
        """
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
        return added

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
        parts = [read_parquet(f) for f in files]
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
                rows = read_parquet(f)
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
        """Delete what a writer that died left, and nothing else.

        That is: the files its commit journal names that no manifest lists, segments of the
        next generation (only a commit in progress writes those), and the staging area.
        Any other file the manifest does not list is left alone (``desomdb check`` reports
        it; ``--repair`` moves it to the quarantine folder). A writer that died after its
        commit but before its table folders followed leaves a journal: the table folders
        are brought in step (:func:`sync_mirror`).
        """
        died = any((self.root / paths.STAGING).glob("commit-*.json"))
        removed = [self.root / rel for rel in dead_writer_files(self.archive)
                   if _unlink(self.root / rel)]
        if died:
            sync_mirror(self.archive)
        return removed + _clear_staging(self.root)


def dead_writer_files(archive: Archive) -> list[str]:
    """Files (relative paths) a writer that died mid-commit left and no manifest lists.

    Read from its commit journals (:func:`desomdb.archive.paths.commit_journal`), plus any
    segment of the generation after the committed one. Call only without a live writer.
    """
    keep = accounted_files(archive)
    root = archive.root
    found: set[str] = set()
    for journal in sorted((root / paths.STAGING).glob("commit-*.json")):
        try:
            data = json.loads(journal.read_text())
        except (OSError, ValueError):
            continue  # a journal cut short by the crash named nothing yet
        for rel in [*data.get("targets", []), *data.get("segments", [])]:
            if (isinstance(rel, str) and rel not in keep and ".." not in Path(rel).parts
                    and (root / rel).is_file()):
                found.add(rel)
    nxt = archive.generation() + 1
    seg_dir = root / paths.MANIFEST_DIR
    for path in seg_dir.glob("*.json") if seg_dir.is_dir() else []:
        rel = f"{paths.MANIFEST_DIR}/{path.name}"
        parsed = paths.parse_manifest_segment(path.name)
        if parsed is not None and parsed[1] == nxt and rel not in keep:
            found.add(rel)
    return sorted(found)


def _link_mirror(root: Path, rel: str) -> None:
    """Give the stored file ``rel`` its table-folder name.

    A hard link (a symlink where the filesystem has none). Files of the older layout are
    their own table-folder name.
    """
    name = paths.mirror(rel)
    if name is None:
        return
    dest, src = root / name, root / rel
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and dest.samefile(src):
            return
        if dest.is_symlink() or dest.exists():
            dest.unlink()  # a stale name or a copy: the stored file is what was committed
        try:
            os.link(src, dest)
        except OSError:
            dest.symlink_to(os.path.relpath(src, dest.parent))
    except OSError as exc:
        raise write_error(dest, exc) from exc


def _unlink_mirror(root: Path, rel: str) -> bool:
    """Remove a stored file's table-folder name if it still names that file."""
    name = paths.mirror(rel)
    if name is None:
        return False
    dest = root / name
    if (dest.is_symlink() or dest.exists()) and same_file(dest, root / rel):
        dest.unlink()
        return True
    return False


def same_file(a: Path, b: Path) -> bool:
    """Whether table-folder name ``a`` stands for stored file ``b``.

    The same file (a hard link or a symlink to it), or a copy of it: a copy of the archive
    made without keeping hard links (``shutil.copytree``, ``cp -r``, ``rsync`` without
    ``-H``) holds the two names as two equal files.
    """
    try:
        if a.samefile(b):
            return True
        if a.is_symlink():
            return a.resolve() == b.resolve()
        return a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size
    except OSError:  # a dangling symlink, or the stored file is gone
        return a.is_symlink() and a.resolve(strict=False) == b.resolve(strict=False)


def mirror_problems(archive: Archive) -> tuple[list[str], list[str]]:
    """Where the table folders differ from the committed files.

    Returns
    -------
    missing : list of str
        Stored files (relative paths) that are committed but have no table-folder name.
    stale : list of str
        Table-folder names (relative paths) of stored files no longer committed.
    """
    m = archive.manifest()
    committed = {rel for rel in m["records"] if paths.mirror(rel) is not None}
    root = archive.root
    missing = sorted(rel for rel in committed
                     if not same_file(root / str(paths.mirror(rel)), root / rel))
    stale = []
    for table in paths.TABLES:
        base = root / table
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            if not (path.is_file() or path.is_symlink()):
                continue
            name = str(path.relative_to(root))
            twin = root / paths.stored(name)
            if paths.stored(name) in committed:
                continue
            if (twin.exists() and same_file(path, twin)) or (path.is_symlink()
                                                              and not path.exists()):
                stale.append(name)  # names a superseded file, or dangles: it is gone
    return missing, sorted(stale)


def sync_mirror(archive: Archive) -> tuple[list[str], list[str]]:
    """Bring every table folder in step with the committed files (call as the writer).

    Links committed files that lack their table-folder name and removes names of files no
    longer committed; a user's own file in a table folder is left alone.

    Returns
    -------
    linked, removed : list of str
        Relative paths of the names made and removed.
    """
    missing, stale = mirror_problems(archive)
    for rel in missing:
        _link_mirror(archive.root, rel)
    for name in stale:
        (archive.root / name).unlink(missing_ok=True)
    return [str(paths.mirror(r)) for r in missing], stale


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _clear_staging(root: Path) -> list[Path]:
    staging = root / paths.STAGING
    removed = sorted(p for p in staging.rglob("*") if p.is_file()) if staging.is_dir() else []
    shutil.rmtree(staging, ignore_errors=True)
    return removed


def accounted_files(archive: Archive) -> set[str]:
    """Relative paths the manifest accounts for: committed, superseded and its segments."""
    m = archive.manifest()
    return {*m["records"], *m["superseded"], *m["segments"]}


def _retained(previous: list[dict[str, Any]], added: set[str], dropped: list[str],
              generation: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Split superseded files into those still kept and those whose retention has passed.

    Parameters
    ----------
    previous : list of dict
        The manifest's superseded entries (``path``, ``generation``, ``time``).
    added : set of str
        Paths this commit adds (a path re-committed under its name is no longer superseded).
    dropped : list of str
        Paths this commit supersedes.
    generation : int
        The new manifest generation.

    Returns
    -------
    superseded : list of dict
        Entries of the new manifest.
    expired : list of str
        Paths to delete once the new manifest is committed.
    """
    now = time.time()
    keep_for = retain_seconds()
    superseded: list[dict[str, Any]] = []
    expired: list[str] = []
    for entry in previous:
        if entry["path"] in added:
            continue  # re-committed under the same name
        if (now - float(entry.get("time", 0)) >= keep_for
                and generation - int(entry.get("generation", 0)) >= RETAIN_COMMITS):
            expired.append(str(entry["path"]))
        else:
            superseded.append(entry)
    superseded.extend({"path": rel, "generation": generation, "time": now} for rel in dropped)
    return superseded, expired
