"""Verify an archive: committed files, their checksums, keys, references and views.

:func:`check` reads everything the manifest lists and reports problems without changing
anything. With ``repair=True`` it fixes only what needs no guessing: files a writer that died
staged or moved in but never committed (its commit journal names them) are deleted; any
other file no commit lists is moved to ``_quarantine/<time>/`` inside the archive (outside
every table folder), never deleted. A committed row or file is never touched.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from desomdb.archive import paths
from desomdb.archive.store import Archive, holds_archive_data
from desomdb.archive.writer import (
    accounted_files,
    dead_writer_files,
    mirror_problems,
    same_file,
    sync_mirror,
)
from desomdb.errors import ArchiveError, DesomdbError
from desomdb.som import registry


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an archive.

    Attributes
    ----------
    kind : str
        ``manifest``, ``missing``, ``size``, ``checksum``, ``unreadable``, ``duplicate-key``,
        ``orphan-assignment``, ``view``, ``current-model``, ``artefact`` (a model checkpoint
        missing or changed), ``uncommitted`` (left by a writer
        that died), ``unlisted`` (no commit lists it), ``mirror`` (a table folder out of step
        with the committed files: a committed file without its name there, or a name of a
        superseded one) or ``staging``.
    path : str
        The file or table at fault (relative to the archive where possible).
    message : str
        What is wrong and what to do.
    repairable : bool
        ``desomdb check --repair`` can fix it without guessing.
    """

    kind: str
    path: str
    message: str
    repairable: bool = False


@dataclass(frozen=True)
class CheckReport:
    """Outcome of :func:`check`."""

    root: Path
    n_files: int
    problems: tuple[Problem, ...]
    repaired: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (after any repair)."""
        return not self.problems


def check(archive: str | Path, repair: bool = False, checksums: bool = True) -> CheckReport:
    """Verify an archive; optionally repair what a killed writer left behind.

    Parameters
    ----------
    archive : str or Path
    repair : bool
        Delete uncommitted files and the staging area of a writer that died (under the
        writer lock, so never those of a running writer). Committed files are never touched.
    checksums : bool
        Compare every committed file's sha256 with the one recorded at commit (reads every
        byte); otherwise sizes only.

    Returns
    -------
    CheckReport
        ``problems`` lists what is still wrong (after the repair, when asked).
    """
    root = Path(archive).expanduser().resolve()
    try:
        arch = Archive(root)
        manifest = arch.manifest()
    except ArchiveError as exc:
        found = holds_archive_data(root)
        if not found and not (root / paths.MANIFEST).exists():
            raise
        return CheckReport(root, 0, (Problem("manifest", paths.MANIFEST, str(exc)),))

    problems: list[Problem] = []
    records = manifest["records"]
    for rel, rec in sorted(records.items()):
        problems.extend(_check_file(root, rel, rec.size, rec.sha256, checksums))
    damaged = {p.path for p in problems}
    problems.extend(_stray_files(arch, damaged))

    repaired: list[str] = []
    if repair and any(p.repairable for p in problems):
        repaired = _repair(arch, problems)
        problems = [p for p in problems if not p.repairable] + list(_stray_files(arch,
                                                                                 damaged))

    if not any(p.kind in ("missing", "size", "checksum") for p in problems):
        problems.extend(_check_through_views(arch, manifest["tables"]))
    problems.extend(_check_current_model(arch))
    problems.extend(_check_artefacts(arch, checksums))
    return CheckReport(root, len(records), tuple(problems), tuple(repaired))


def _check_file(root: Path, rel: str, size: int | None, sha256: str | None,
                checksums: bool) -> list[Problem]:
    path = root / rel
    if not path.is_file():
        return [Problem("missing", rel, f"{path}: committed file is missing; restore it from "
                                        "a backup (its rows are lost until then)")]
    actual = path.stat().st_size
    if size is not None and actual != size:
        return [Problem("size", rel, f"{path}: {actual} bytes, {size} recorded at commit "
                                     "(truncated or overwritten); restore it from a backup")]
    if checksums and sha256 is not None and _sha256(path) != sha256:
        return [Problem("checksum", rel, f"{path}: sha256 differs from the one recorded at "
                                         "commit (the file was changed); restore it from "
                                         "a backup")]
    return []


def _stray_files(arch: Archive, damaged: set[str] | frozenset[str] = frozenset()
                 ) -> list[Problem]:
    """Files the manifest does not list, in the table and manifest folders, and staging.

    Those a writer that died mid-commit left (its journal names them) are ``uncommitted``:
    repair deletes them, as the next writer would. Any other is ``unlisted`` (a user's
    file, or one a damaged manifest forgot): repair moves it to the quarantine folder and
    never deletes it. Table folders out of step with the committed files are ``mirror``
    problems, except where the stored file itself is ``damaged`` (reported already: restore
    it, and its table-folder name with it).
    """
    if arch.writer_is_running():
        return []  # a live writer's staged files are not garbage
    keep = accounted_files(arch)
    dead = set(dead_writer_files(arch))
    missing, stale = mirror_problems(arch)
    missing = [rel for rel in missing if rel not in damaged]
    out = [Problem("mirror", str(paths.mirror(rel)),
                   f"{arch.root / str(paths.mirror(rel))}: committed (as {rel}) but missing "
                   "from its table folder, so a glob of the folder misses its rows; 'desomdb "
                   "check --repair' links it", repairable=True) for rel in missing]
    out += [Problem("mirror", name,
                    f"{arch.root / name}: names a superseded file, so a glob of the table "
                    "folder counts its rows twice; 'desomdb check --repair' removes the "
                    "name (the stored file stays for older readers)", repairable=True)
            for name in stale]
    for folder in (*paths.TABLES, paths.STORE, paths.MANIFEST_DIR):
        base = arch.root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = str(path.relative_to(arch.root))
            if not (path.is_file() or path.is_symlink()) or rel in keep or rel in stale:
                continue
            twin = paths.stored(rel)
            if folder != paths.STORE and twin in keep and (twin in damaged
                                                           or same_file(path, arch.root / twin)):
                continue  # a table-folder name of a stored file
            if rel in dead:
                out.append(Problem("uncommitted", rel,
                                   f"{path}: not committed (left by a writer that died); "
                                   "'desomdb check --repair' deletes it", repairable=True))
            else:
                out.append(Problem("unlisted", rel,
                                   f"{path}: no commit lists it (a file desomdb did not "
                                   "write, or one an edited manifest forgot); 'desomdb check "
                                   f"--repair' moves it to {paths.QUARANTINE}/",
                                   repairable=True))
    staging = arch.root / paths.STAGING
    if staging.is_dir() and any(f.is_file() for f in staging.rglob("*")):
        out.append(Problem("staging", paths.STAGING,
                           f"{staging}: staged files of a writer that died; "
                           "'desomdb check --repair' deletes them", repairable=True))
    return out


def _repair(arch: Archive, problems: list[Problem]) -> list[str]:
    """Delete a dead writer's own files; move every other unlisted file to the quarantine.

    Returns what was done, one line per file (``path`` or ``path -> quarantine path``).
    """
    done = []
    with arch.writer("desomdb check --repair"):  # opening it deletes a dead writer's files
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        if any(p.kind == "mirror" for p in problems):
            linked, removed = sync_mirror(arch)
            done += [f"{name} (linked)" for name in linked]
            done += [f"{name} (removed)" for name in removed]
        for p in problems:
            if p.kind != "unlisted":
                continue
            src = arch.root / p.path
            dst = arch.root / paths.QUARANTINE / stamp / p.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.replace(dst)
            done.append(f"{p.path} -> {dst.relative_to(arch.root)}")
    done += [p.path for p in problems if p.repairable and p.kind not in ("unlisted", "mirror")
             and not (arch.root / p.path).exists()]
    return done


def _check_through_views(arch: Archive, tables: dict[str, list[str]]) -> list[Problem]:
    """Open every view; check unique keys per table and that assignments name baxels.

    The base views read exactly the committed files (``sql/<table>.sql``), so the key and
    reference checks query them.
    """
    from desomdb.query import views

    try:
        con = views.connect(arch.root, raw=True, cached=False)  # the files, not the cache
    except (DesomdbError, duckdb.Error) as exc:
        return [Problem("view", "views", f"the views cannot be created ({exc})")]
    try:
        return _check_tables(con, tables) + _check_views(con)
    finally:
        con.close()


def _check_tables(con: duckdb.DuckDBPyConnection, tables: dict[str, list[str]]
                  ) -> list[Problem]:
    """Check unique keys per table and that assignments point at existing baxels."""
    out: list[Problem] = []
    for table, files in sorted(tables.items()):
        keys = paths.TABLE_KEYS.get(table)
        if not keys or not files:
            continue
        try:
            cols = {r[0] for r in con.sql(f"describe {table}").fetchall()}
            present = [k for k in keys if k in cols]
            row = con.sql(
                f"select count(*), sum(n - 1) from (select count(*) n from {table} "
                f"group by {', '.join(present)} having n > 1)").fetchall()[0]
        except duckdb.Error as exc:
            out.append(Problem("unreadable", table, f"table {table}: cannot read its "
                               f"files ({str(exc).splitlines()[0]}); restore them from "
                               "a backup"))
            continue
        if row and row[0]:
            out.append(Problem(
                "duplicate-key", table,
                f"table {table}: {row[0]} key(s) ({', '.join(present)}) appear more than "
                f"once ({row[1]} extra rows); rerun the stage that writes {table} "
                "(its rows are replaced as a unit)"))
    if tables.get("assignments") and tables.get("baxels"):
        try:
            row = con.sql("select count(*) from assignments a anti join baxels b "
                          "using (release, plateifu, bin_id)").fetchall()[0]
        except duckdb.Error as exc:
            row = (0,)
            out.append(Problem("unreadable", "assignments",
                               f"cannot join assignments to baxels ({exc})"))
        if row[0]:
            out.append(Problem(
                "orphan-assignment", "assignments",
                f"{row[0]} assignment(s) name a baxel the archive does not hold; rerun "
                "'desomdb assign' for the model(s) concerned"))
    return out


def _check_views(con: duckdb.DuckDBPyConnection) -> list[Problem]:
    """Check that every view the archive defines opens."""
    out: list[Problem] = []
    names = [r[0] for r in con.sql(
        "select view_name from duckdb_views() where not internal order by 1").fetchall()]
    for name in names:
        try:
            con.sql(f"select * from {name} limit 0").fetchall()
        except duckdb.Error as exc:
            out.append(Problem("view", name, f"view {name} does not open "
                                             f"({str(exc).splitlines()[0]})"))
    return out


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_artefacts(arch: Archive, checksums: bool) -> list[Problem]:
    """Every registered model's checkpoint exists and has the sha256 its row records."""
    if not arch.has_table("models"):
        return []
    out = []
    rows = arch.read("models", columns=["model_id", "artefact_path", "artefact_sha256"])
    for model_id, rel, sha in zip(*(rows.column(c).to_pylist() for c in rows.column_names),
                                  strict=True):
        path = arch.root / str(rel)
        if not path.is_file():
            out.append(Problem("artefact", str(rel), f"{path}: the checkpoint of model "
                               f"{model_id} is missing; restore it from a backup, or train "
                               "the model again ('desomdb train')"))
        elif checksums and sha and _sha256(path) != sha:
            out.append(Problem("artefact", str(rel), f"{path}: sha256 differs from the one "
                               f"registered for model {model_id}; restore it from a backup"))
    return out


def _check_current_model(arch: Archive) -> list[Problem]:
    """Check that the current model of each kind is a registered one."""
    try:
        for kind in ("desom1", "desom2"):
            model_id = registry.current_model(arch, kind)
            if model_id is not None and model_id not in registry.registered_models(arch):
                return [Problem("current-model", paths.CURRENT_MODEL,
                                f"{arch.root / paths.CURRENT_MODEL}: current {kind} model "
                                f"{model_id!r} is not registered; pick one with 'desomdb "
                                "model use ID'")]
    except DesomdbError as exc:
        return [Problem("current-model", paths.CURRENT_MODEL, str(exc))]
    return []
