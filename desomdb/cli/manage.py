"""Commands that look after an archive: check, status, model use, model list."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from desomdb.cli.base import (
    _friendly_errors,
    main,
)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True,
              help="delete what a writer that died left (its uncommitted and staged files); "
                   "move any other file no commit lists to _quarantine/; committed files and "
                   "rows are never touched")
@click.option("--no-checksums", is_flag=True,
              help="compare file sizes only (skip reading every byte for sha256)")
@_friendly_errors
def check(archive: Path, repair: bool, no_checksums: bool) -> None:
    """Verify an archive: committed files, checksums, keys, assignments and views.

    Exits 1 and lists the problems when anything is wrong.

    \b
    Example:
      desomdb check /data/manga-desom
      desomdb check /data/manga-desom --repair
    """
    from desomdb.products.check import check as run_check

    report = run_check(archive, repair=repair, checksums=not no_checksums)
    for rel in report.repaired:
        click.echo(f"repaired: {'moved' if ' -> ' in rel else 'deleted'} {rel}")
    for problem in report.problems:
        click.echo(f"{problem.kind}: {problem.message}")
    if not report.ok:
        click.echo(f"desomdb: error: {report.root}: {len(report.problems)} problem(s) found",
                   err=True)
        sys.exit(1)
    click.echo(f"{report.root}: ok ({report.n_files} committed files verified"
               + (", sha256 compared" if not no_checksums else ", sizes only") + ")")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@_friendly_errors
def status(archive: Path) -> None:
    """Show releases, cube counts by status, pending work, models, and the last report.

    Says when the last 'desomdb report' no longer shows the archive (a
    refresh, label or model switch since) and how to redraw it.

    \b
    Example:
      desomdb status /tmp/archive
    """
    from desomdb.products import status as status_mod

    info = status_mod.status(archive)
    click.echo(f"archive: {info.archive}")
    job = info.last_job or {}
    state, command = job.get("state"), job.get("command") or "the last command"
    if state in ("interrupted", "killed"):
        how = "was interrupted" if state == "interrupted" else "was killed"
        click.echo(f"the last job, '{command}', {how} ({job.get('at')}): what it committed is "
                   "kept; run the same command again to finish (done work is skipped)")
    elif state == "failed":
        click.echo(f"the last job, '{command}', failed ({job.get('at')}): {job.get('error')}")
    elif state == "running":
        click.echo(f"running now: '{command}' (pid {job.get('pid')}, since {job.get('at')})")
    for release, counts in sorted(info.releases.items()):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        click.echo(f"  {release}: {parts}")
    for release, plateifu, error in info.failed_cubes:
        click.echo(f"  failed {release} {plateifu}: {error}")
    for m in info.models:
        mark = "*" if m.current else " "
        click.echo(f"{mark} {m.model_id} ({m.kind}, parent {m.parent}, {m.created_at})")
    if info.unassigned is not None:
        click.echo(f"baxels without a node under the current model: {info.unassigned}")
    elif not info.models:
        click.echo("no models yet: 'desomdb train ARCHIVE --use'")
    if info.unlabelled_cubes:
        click.echo(f"cubes without labels: {info.unlabelled_cubes} ('desomdb label ARCHIVE')")
    for d in info.drift:
        click.echo(f"drift {d.release}: {d.n_beyond_p99} of {d.n_baxels} baxels "
                   f"({100 * d.frac_beyond_p99:.1f} %, ~1 % expected) beyond the current "
                   "model's training p99 distance")
    rep = info.report
    if rep is None and info.current:
        click.echo("no report yet: 'desomdb report ARCHIVE --out DIR'")
    elif rep is not None:
        rerun = f"desomdb report {info.archive} --out {Path(rep.index).parent} --overwrite"
        click.echo(f"report: {rep.index} ({rep.drawn_at}): "
                   + (f"STALE, {rep.stale}; rerun '{rerun}'" if rep.stale else "current"))


@main.group()
def model() -> None:
    """Manage registered models (list, switch the current one).

    \b
    Example:
      desomdb model use /tmp/archive desom1-3f2a9c
    """


@model.command("use")
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("model_id")
@click.option("--kind", type=click.Choice(["desom1", "desom2"]), default="desom1",
              show_default=True)
@_friendly_errors
def model_use(archive: Path, model_id: str, kind: str) -> None:
    """Make MODEL_ID the current model of the archive (reversible).

    \b
    Example:
      desomdb model use /tmp/archive desom1-3f2a9c
    """
    from desomdb.archive.store import Archive
    from desomdb.som import registry as registry_mod

    arch = Archive(archive)
    before = registry_mod.current_model(arch, kind)
    registry_mod.set_current_model(arch, model_id, kind)
    click.echo(f"current {kind} model: {model_id} (was {before})")


@model.command("list")
@click.argument("archive", type=click.Path(path_type=Path))
@_friendly_errors
def model_list(archive: Path) -> None:
    """List registered models and mark the current one.

    \b
    Example:
      desomdb model list /tmp/archive
    """
    from desomdb.query import views as views_mod
    from desomdb.som import registry as registry_mod

    arch = views_mod.Archive(archive)
    current = {registry_mod.current_model(arch, k) for k in ("desom1", "desom2")}
    rows = []
    if arch.has_table("models"):
        con = views_mod.connect(archive)
        rows = con.sql("select model_id, kind, created_at, parent_model_id, recon_mse, pca_mse,"
                       " qe, te4, te8 from models order by created_at").fetchall()
    if not rows:
        click.echo("no models registered; train one with 'desomdb train'")
        return
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}"

    for r in rows:
        mark = "*" if r[0] in current else " "
        click.echo(f"{mark} {r[0]}  {r[1]}  {r[2]}  parent={r[3]}  mse={fmt(r[4])} "
                   f"pca={fmt(r[5])} qe={fmt(r[6])} te4={fmt(r[7])} te8={fmt(r[8])}")
