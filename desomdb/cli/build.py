"""Commands that build an archive.

mock, ingest, label, calibrate, train, assign, fingerprints, refresh, demo, cluster.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from desomdb.cli.base import (
    SCHEDULER_HELP,
    _friendly_errors,
    _ifu_sizes,
    _label_max_per_cube,
    main,
    model_option,
    pl_config,
)
from desomdb.errors import ConfigError


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--galaxies", "n_galaxies", type=int, default=10, show_default=True,
              help="number of galaxies (cubes) to generate")
@click.option("--release", default="DR15", show_default=True, help="release name: DR15 or DR17")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed")
@click.option("--workers", type=int, default=1, show_default=True, help="local processes")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--ifu-sizes", default="19,37,61,91,127", show_default=True,
              help="comma-separated IFU fibre counts to draw from")
@click.option("--previous", help="make this the next release of OUT/PREVIOUS (same --seed): "
              "its galaxies first, some cubes re-processed, the rest copied unchanged")
@click.option("--reprocess", type=float, default=0.25, show_default=True,
              help="with --previous: fraction of its cubes re-processed (new checksum)")
@click.option("--library", type=click.Choice(["miuscat", "bc03", "mastar"]),
              default="miuscat", show_default=True,
              help="SSP library to render from: miuscat (the one the fits use: accuracy is an "
              "upper limit), bc03 (a second library the fits never see; truth weighted by "
              "initial mass) or mastar (a third, empirical; light-weighted truth only)")
@click.option("--lsf-scale", type=float, default=1.0, show_default=True,
              help="render at this multiple of the nominal MaNGA LSF (the cube records it)")
@_friendly_errors
def mock(out: Path, n_galaxies: int, release: str, seed: int, workers: int,
         scheduler: str | None, ifu_sizes: str, previous: str | None, reprocess: float,
         library: str, lsf_scale: float) -> None:
    """Generate a mock MaNGA survey (DRP LOGCUBEs + drpall + truth) with known labels.

    \b
    Example:
      desomdb mock /tmp/survey --galaxies 20 --release DR15 --seed 1
      desomdb mock /tmp/survey --galaxies 30 --release DR17 --seed 1 --previous DR15
      desomdb mock /tmp/bc03 --galaxies 8 --release DR15 --seed 1 --library bc03
      desomdb mock /tmp/mastar --galaxies 8 --release DR15 --seed 1 --library mastar
    """
    import desomdb.mock as mock_mod
    from desomdb.archive.outputs import refuse_inside_archive

    refuse_inside_archive(out)
    result = mock_mod.generate_survey(
        out, n_galaxies=n_galaxies, release=release, seed=seed, workers=workers,
        ifu_sizes=_ifu_sizes(ifu_sizes), scheduler=scheduler, previous=previous,
        reprocess=reprocess, library=library, lsf_scale=lsf_scale,
    )
    click.echo(f"wrote {result.n_cubes} cubes to {result.release_dir}")
    click.echo(f"drpall: {result.drpall_path}")
    click.echo(f"truth:  {result.truth_path}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("jobfile", required=False, type=click.Path(path_type=Path))
@click.option("--cubes", help="folder or glob of LOGCUBE files")
@click.option("--drpall", type=click.Path(path_type=Path), help="drpall FITS table")
@click.option("--release", help="release name, e.g. DR15")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--truth", type=click.Path(path_type=Path),
              help="mock truth Parquet (default: truth-<release>.parquet beside drpall, if any)")
@click.option("--cubes-per-task", type=int, default=2, show_default=True)
@click.option("--commit-every", type=float, default=30.0, show_default=True,
              help="commit finished cubes at least this often (seconds)")
@_friendly_errors
def ingest(archive: Path, jobfile: Path | None, cubes: str | None, drpall: Path | None,
           release: str | None, workers: int, scheduler: str | None, truth: Path | None,
           cubes_per_task: int, commit_every: float) -> None:
    """Ingest DRP cubes into the archive (Voronoi-binned baxel spectra).

    Give a job file (see ingest/dr15.toml) or --cubes, --drpall and --release.
    Exit code 0 when every cube landed; 1 when some failed (they are listed and
    recorded with their reason in the cubes table).

    \b
    Example:
      desomdb ingest /tmp/archive --cubes /tmp/survey/DR15 \\
        --drpall /tmp/survey/DR15/drpall-v2_4_3.fits --release DR15
    """
    from desomdb.pipeline import ingest as ingest_mod

    job = _ingest_job(jobfile, cubes, drpall, release, workers, scheduler, truth, cubes_per_task)
    report = ingest_mod.ingest(archive, job, commit_every_s=commit_every)
    _echo_ingest(report)
    if report.failed:
        sys.exit(1)


def _ingest_job(jobfile: Path | None, cubes: str | None, drpall: Path | None,
                release: str | None, workers: int, scheduler: str | None, truth: Path | None,
                cubes_per_task: int) -> Any:
    """Build the ingest job of a command from a job file or --cubes/--drpall/--release."""
    from desomdb.pipeline import ingest as ingest_mod

    if jobfile is not None:
        job = ingest_mod.load_job(jobfile)
    elif cubes and drpall and release:
        job = ingest_mod.IngestJob(release=release, cubes=cubes, drpall=str(drpall),
                                   truth=str(truth) if truth else None, workers=workers,
                                   cubes_per_task=cubes_per_task, scheduler=scheduler)
    else:
        raise ConfigError("give a JOBFILE, or all of --cubes, --drpall and --release")
    if scheduler:
        job.scheduler = scheduler
    return job


def _echo_ingest(report: Any) -> None:
    click.echo(f"{report.release}: {report.n_found} cubes found, {report.n_ingested} ingested, "
               f"{report.n_carried} carried over unchanged from an earlier release, "
               f"{report.n_skipped} already present, {len(report.failed)} failed; "
               f"{report.n_baxels} baxels in the release")
    if report.n_duplicates:
        click.echo(f"  {report.n_duplicates} identical copies of cubes found under other paths "
                   "were ingested once")
    for plateifu, error in report.failed:
        click.echo(f"  failed {plateifu}: {error}", err=True)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--release", help="only this release")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--scheduler", help=SCHEDULER_HELP)
@_label_max_per_cube
@click.option("--line-sn", type=float, default=3.0, show_default=True,
              help="S/N an emission line needs to count as detected (published E(B-V)_gas, "
              "BPT class, clean flags)")
@click.option("--line-an", type=float, default=3.0, show_default=True,
              help="amplitude over residual noise a line needs (guards against absorption "
              "residuals from template mismatch)")
@click.option("--fitter", type=click.Choice(["fast", "batch", "ppxf"]), default=None,
              help="batch (the default): kinematics on a coarse template set, then linear "
              "fits and Gauss-Newton steps, on many baxels at once (torch, CPU or --device "
              "cuda); fast: the same stages one baxel at a time; ppxf: the reference single "
              "pPXF fit. Naming a fitter "
              "fits the cubes it has not labelled even where another fitter has (compare them "
              "in the view labels; preferred_labels keeps one row per baxel)")
@click.option("--device", default="cpu", show_default=True,
              help="torch device of --fitter batch. cpu: each of --workers processes fits "
              "its cube in batches of 8 baxels on one thread; cuda: each worker sends whole "
              "cubes to the GPU and derives the labels on its CPU core (2 workers keep one "
              "GPU busy while the other derives)")
@click.option("--plan", is_flag=True,
              help="fit only the baxels a labelling plan chooses from the current map (the "
              "map labels the rest: view baxel_estimates); extends an earlier plan")
@click.option("--budget", type=float, default=0.1, show_default=True,
              help="with --plan: baxels fitted in all, a fraction of the assigned ones "
              "(0-1] or a count (> 1); earlier fits count")
@model_option("DESOM-1 model whose map plans")
@_friendly_errors
def label(archive: Path, release: str | None, workers: int, scheduler: str | None,
          label_max_per_cube: int | None, line_sn: float, line_an: float,
          fitter: str | None, device: str, plan: bool, budget: float,
          model_id: str | None) -> None:
    """Fit baxels with pPXF and write the labels table.

    Without --plan every baxel (or --label-max-per-cube of each cube) is fitted. With --plan
    (after train and assign) only the baxels a labelling plan picks: out-of-distribution
    ones, enough members of every node from several galaxies and S/N, more where node
    intervals are wide; node labels are then rebuilt and baxel_estimates gives every baxel
    a label from its fit or its node. Cubes already labelled are skipped; a failed fit is
    recorded per baxel (status, error) without stopping the job.

    \b
    Example:
      desomdb label /tmp/archive --release DR15 --workers 2 --label-max-per-cube 20
      desomdb label /tmp/archive --plan --budget 0.1 --workers 2
      desomdb label /tmp/archive --fitter batch --workers 2
    """
    from desomdb.pipeline import labels as labels_mod
    from desomdb.science import emission

    gate = emission.LineGate(sn_min=line_sn, an_min=line_an)
    if plan:
        if label_max_per_cube is not None or release is not None:
            raise click.UsageError("--plan chooses the baxels itself: leave out "
                                   "--label-max-per-cube and --release")
        from desomdb.pipeline import label_plan

        planned = label_plan.plan_and_label(archive, budget, model_id, workers=workers,
                                            scheduler=scheduler, gate=gate, fitter=fitter)
        new = ", ".join(f"{n} {reason}" for reason, n in planned.n_new.items())
        click.echo(f"model {planned.model_id}: {planned.n_assigned} baxels assigned, budget "
                   f"{planned.n_budget}; {planned.n_fitted_before} fitted or planned before, "
                   f"planned now: {new}; {planned.n_nodes} populated nodes, "
                   f"{planned.n_nodes_short} still below "
                   f"{label_plan.MIN_FITTED} fitted members")
        report = planned.label_report or labels_mod.LabelReport()
    else:
        report = labels_mod.label(archive, release=release, workers=workers,
                                  scheduler=scheduler, max_per_cube=label_max_per_cube,
                                  gate=gate, fitter=fitter, device=device)
    rate = report.n_fits / report.fit_seconds if report.fit_seconds else 0.0
    click.echo(f"{report.n_cubes} cubes labelled, {report.n_skipped_cubes} already done; "
               f"{report.n_fits} baxels in labels by this fitter ({report.n_failed_fits} failed "
               f"fits; {rate:.2f} fits/s per core)")
    for plateifu, error in report.failed_cubes:
        click.echo(f"  failed {plateifu}: {error}", err=True)
    if report.failed_cubes:
        sys.exit(1)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--per-bin", type=int, default=8, show_default=True,
              help="calibration baxels per S/N bin and fitter")
@click.option("--refits", type=int, default=4, show_default=True,
              help="Monte-Carlo noise re-fits per calibration baxel")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--scheduler", help=SCHEDULER_HELP)
@_friendly_errors
def calibrate(archive: Path, per_bin: int, refits: int, seed: int, workers: int,
              scheduler: str | None) -> None:
    """Estimate the label fits' errors per S/N bin; add calibrated intervals to node_labels.

    Re-fits a seeded sample of labelled baxels with noise drawn from their ivar and with
    other continuum set-ups, writes the error model (table label_errors) and rebuilds
    node_labels (columns lo68/hi68) of every assigned model.

    \b
    Example:
      desomdb calibrate /tmp/archive --per-bin 8 --refits 4 --workers 2
    """
    from desomdb.pipeline import calibrate as calibrate_mod

    report = calibrate_mod.calibrate(archive, per_bin=per_bin, refits=refits, seed=seed,
                                     workers=workers, scheduler=scheduler)
    click.echo(f"{report.n_baxels} calibration baxels, {report.n_fits} fits; node_labels "
               f"rebuilt for {len(report.models)} model(s)")
    for row in report.errors.filter(report.errors["label"].is_in(["age_mw_gyr", "mh_mw"])
                                    ).iter_rows(named=True):
        click.echo(f"  {row['fitter']} {row['label']} S/N {row['snr_lo']:g}-{row['snr_hi']:g}: "
                   f"sigma {row['sigma']:.3f} (stat {row['sigma_stat']:.3f}, "
                   f"sys {row['sigma_sys']:.3f}, {row['n_baxels']} baxels)")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path),
              help="JSON file of configuration overrides (keys of DesomConfig)")
@click.option("--preset", type=click.Choice(["compact", "paper"]), default="compact",
              show_default=True, help="compact = CPU default; paper = the authors' network")
@click.option("--where", default="trainable", show_default=True,
              help="SQL filter over the baxels view selecting training spectra")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True, help="bf16: training forward passes under bfloat16 autocast")
@click.option("--gamma", type=float, default=None,
              help="SOM-loss weight γ (default: the preset's; scale-free 'relative' semantics "
                   "unless the config sets gamma_mode=raw, the paper's)")
@click.option("--use", "make_current", is_flag=True,
              help="make the new model current (otherwise: 'desomdb model use')")
@_friendly_errors
def train(archive: Path, config: Path | None, preset: str, where: str, seed: int, device: str,
          precision: str, gamma: float | None, make_current: bool) -> None:
    """Train a DESOM-1 on the archive's training baxels; prints the model id.

    \b
    Example:
      desomdb train /tmp/archive --seed 0 --use
    """
    import json

    from desomdb.archive.store import Archive
    from desomdb.pipeline import train as train_mod
    from desomdb.som import model as model_mod
    from desomdb.som import registry as registry_mod

    overrides = json.loads(config.read_text()) if config else {}
    if gamma is not None:
        overrides["gamma"] = gamma
    cfg = model_mod.CONFIGS[preset](**{**overrides, "seed": seed, "precision": precision})
    model_id = train_mod.train(archive, cfg, where=where, device=device)
    if make_current:
        registry_mod.set_current_model(Archive(archive), model_id)
    click.echo(model_id)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@model_option()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True, help="bf16 autocast: faster encoding, latents within ~0.5 %")
@click.option("--workers", type=int, default=2, show_default=True,
              help="local processes, one thread each (1: this process)")
@click.option("--scheduler", help=SCHEDULER_HELP)
@_friendly_errors
def assign(archive: Path, model_id: str | None, device: str, precision: str, workers: int,
           scheduler: str | None) -> None:
    """Assign every baxel to its best-matching node of a DESOM-1 model.

    Also writes the nodes (prototypes, decoded spectra and inverse-variance-weighted
    co-adds), node_partials (each cube's co-add partial sums) and node_labels
    (per-node label distributions) of the model.

    \b
    Example:
      desomdb assign /tmp/archive --workers 2
    """
    from desomdb.pipeline import assign as assign_mod

    out = assign_mod.assign(archive, model_id, device=device, precision=precision,
                            workers=workers, scheduler=scheduler)
    click.echo(f"{out.model_id}: {out.n_assigned} baxels in {out.n_cubes} cubes "
               f"({out.n_encoded} encoded now, {out.spectra_per_s:.0f} spectra/s)")
    if out.index is not None and (out.index.n_added or out.index.n_removed):
        ix = out.index
        click.echo(f"similarity index: {ix.n_vectors} baxels (+{ix.n_added} -{ix.n_removed}"
                   f"{', rebuilt' if ix.rebuilt else ''}, {ix.seconds:.1f} s)")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@model_option("DESOM-1 model id")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@_friendly_errors
def fingerprints(archive: Path, model_id: str | None, device: str) -> None:
    """Build per-galaxy fingerprints on a DESOM-1 map and train/assign DESOM-2.

    Prints how well DESOM-2 nodes group galaxies by Sersic n and b/a (and by
    true type on mock surveys).

    \b
    Example:
      desomdb fingerprints /tmp/archive
    """
    from desomdb.pipeline import fingerprint

    d2 = fingerprint.build(archive, model_id, device=device)
    click.echo(f"DESOM-2 model: {d2}")
    sep = fingerprint.separation_report(archive, model_id)
    for key, value in dataclasses.asdict(sep).items():
        if value is not None:
            click.echo(f"  {key}: {value:.3f}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("jobfile", required=False, type=click.Path(path_type=Path))
@click.option("--cubes", help="folder or glob of LOGCUBE files")
@click.option("--drpall", type=click.Path(path_type=Path), help="drpall FITS table")
@click.option("--release", help="release name, e.g. DR17")
@click.option("--retrain", is_flag=True,
              help="also train a new DESOM-1 warm-started from the current one (not made current)")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--truth", type=click.Path(path_type=Path),
              help="mock truth Parquet (default: truth-<release>.parquet beside drpall, if any)")
@click.option("--cubes-per-task", type=int, default=2, show_default=True)
@_label_max_per_cube
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="device for assignment/training (default: cpu or the job file's)")
@click.option("--no-fingerprints", is_flag=True, help="leave fingerprints and DESOM-2 alone")
@click.option("--budget", type=float, default=None,
              help="label through the labelling plan after assigning (fraction of the "
              "baxels fitted in all, or a count), not every new baxel")
@_friendly_errors
def refresh(archive: Path, jobfile: Path | None, cubes: str | None, drpall: Path | None,
            release: str | None, retrain: bool, workers: int, scheduler: str | None,
            truth: Path | None, cubes_per_task: int, label_max_per_cube: int | None,
            device: str | None, no_fingerprints: bool, budget: float | None) -> None:
    """Bring an archive up to date with a new release (incremental, resumable).

    Ingests only new cubes and cubes whose checksum changed (byte-identical
    cubes of an earlier release are carried over), labels them, assigns them
    with the current DESOM-1, updates fingerprints and DESOM-2 nodes, and
    reports drift (spectra beyond the model's training p99 distance). With
    --retrain it also trains a warm-started DESOM-1 and reports how far the map
    moved; switching to it is one explicit 'desomdb model use'. Give a job file
    (see ingest/dr17_refresh.toml) or --cubes, --drpall and --release.

    \b
    Example:
      desomdb refresh /tmp/archive --cubes /tmp/survey/DR17 \\
        --drpall /tmp/survey/DR17/drpall-v3_1_1.fits --release DR17
    """
    from desomdb.pipeline import refresh as refresh_mod

    job = _ingest_job(jobfile, cubes, drpall, release, workers, scheduler, truth, cubes_per_task)
    opts = refresh_mod.load_job(jobfile)[1] if jobfile else refresh_mod.RefreshOptions()
    opts.retrain = opts.retrain or retrain
    opts.fingerprints = opts.fingerprints and not no_fingerprints
    if label_max_per_cube is not None:
        opts.label_max_per_cube = label_max_per_cube
    if budget is not None:
        opts.label_budget = budget
    if device is not None:
        opts.device = device
    report = refresh_mod.refresh(archive, job, opts)
    if report.ingest is not None:
        _echo_ingest(report.ingest)
    if report.plan is not None:
        new = ", ".join(f"{n} {reason}" for reason, n in report.plan.n_new.items())
        click.echo(f"labelling plan of {report.plan.model_id}: budget {report.plan.n_budget} "
                   f"of {report.plan.n_assigned} baxels; planned now: {new}")
    if report.labels is not None:
        click.echo(f"labels: {report.labels.n_cubes} cubes fitted, "
                   f"{report.labels.n_skipped_cubes} already labelled")
    if report.assign:
        click.echo(f"assigned with {report.model_id}: {report.assign.n_encoded} spectra "
                   f"encoded now, {report.assign.n_assigned} current baxels in the map")
    if report.fingerprints:
        f = report.fingerprints
        click.echo(f"fingerprints: {f.n_galaxies} galaxies ({f.n_new} new, "
                   f"{f.n_changed} changed), DESOM-2 {f.desom2_model_id}: "
                   f"{f.n_moved} earlier galaxies changed node")
    if report.drift:
        d = report.drift
        click.echo(f"drift in {d.release}: {d.n_beyond_p99} of {d.n_baxels} baxels "
                   f"({100 * d.frac_beyond_p99:.1f} %, ~1 % expected) beyond the model's "
                   "training p99 distance (views drift, poorly_represented)")
    if report.comparison:
        c = report.comparison
        click.echo(f"retrained {report.new_model_id} (parent {report.model_id}): node changed "
                   f"for {100 * c.frac_node_changed:.1f} % of {c.n_baxels} baxels, "
                   f"{100 * c.frac_moved_beyond_neighbour:.1f} % beyond a neighbour")
        for label, shift in sorted(c.label_drift.items()):
            click.echo(f"  node-median drift of {label}: {shift:.2f} x the node's 1-sigma width")
    for note in report.notes:
        click.echo(note)
    _echo_stale_report(archive)
    if not report.ok:
        sys.exit(1)


def _echo_stale_report(archive: Path) -> None:
    """After a write: say if the archive's last report no longer shows it."""
    from desomdb.archive.store import Archive
    from desomdb.products.report_state import report_state

    rep = report_state(Archive(archive))
    if rep is not None and rep.stale:
        click.echo(f"the report {rep.index} is out of date; redraw it with 'desomdb report "
                   f"{archive} --out {Path(rep.index).parent} --overwrite'")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("desomdb-demo"),
              show_default=True)
@click.option("--galaxies", "n_galaxies", type=int, default=12, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ifu-sizes", default="19,37", show_default=True,
              help="comma-separated IFU fibre counts to draw from (as 'desomdb mock')")
@click.option("--map-size", type=int, default=6, show_default=True,
              help="DESOM-1 map is N x N nodes (train's map_rows = map_cols; the paper: 15)")
@click.option("--label-max-per-cube", type=int, default=8, show_default=True,
              help="first sample: fit this many baxels per cube, evenly spaced, before the "
              "map exists (as label/refresh)")
@click.option("--budget", type=float, default=0.25, show_default=True,
              help="labelling plan: fraction of the baxels fitted in all (the map labels the "
              "rest)")
@_friendly_errors
def demo(out: Path, n_galaxies: int, workers: int, seed: int, ifu_sizes: str, map_size: int,
         label_max_per_cube: int, budget: float) -> None:
    """Run the whole pipeline on a generated mock survey.

    mock -> ingest -> a first sample of pPXF labels -> DESOM-1 -> assign -> labelling plan
    (fits chosen from the map) -> calibrate -> fingerprints/DESOM-2, then a few SQL
    queries. Scaled to minutes on 2 cores by default: 19/37-fibre IFUs, a 6x6 map, a short
    schedule, 8 fits per cube then 25 % of the baxels fitted in all, an error model from 3
    baxels per S/N bin.

    \b
    Example:
      desomdb demo --out /tmp/desomdb-demo --galaxies 12
      desomdb demo --out /tmp/demo-big --ifu-sizes 19,37,61 --map-size 8
    """
    from desomdb import demo as demo_mod
    from desomdb.archive.outputs import refuse_inside_archive

    refuse_inside_archive(out)  # the demo writes out/survey, out/archive and out/report
    result = demo_mod.run_demo(out, n_galaxies=n_galaxies, seed=seed, workers=workers,
                               ifu_sizes=_ifu_sizes(ifu_sizes), map_size=map_size,
                               labels_per_cube=label_max_per_cube, plan_budget=budget)
    with pl_config():
        for title, df in result.queries.items():
            click.echo(f"\n-- {title}\n{df}")
    total = sum(result.seconds.values())
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    click.echo(f"\narchive: {result.archive} (model {result.model_id})")
    click.echo(f"time: {total:.0f} s ({stages})")
    click.echo(f"query it: desomdb sql {result.archive} \"select * from node_summary\"")
    if result.report is not None:
        click.echo(f"report: {result.report} (open it in a browser)")


@main.command()
@click.argument("kind", type=click.Choice(["slurm", "pbs"]))
@click.option("--jobs", type=int, default=4, show_default=True,
              help="batch jobs to submit, one single-threaded Dask worker each")
@click.option("--memory", default="4GB", show_default=True, help="memory per job")
@click.option("--walltime", default="04:00:00", show_default=True)
@click.option("--queue", help="partition (SLURM) or queue (PBS)")
@click.option("--account", help="account/project to charge")
@click.option("--prologue", multiple=True,
              help="shell line run before the worker starts, e.g. 'source ~/env/bin/activate' "
              "(repeatable)")
@click.option("--extra", multiple=True, help="extra #SBATCH/#PBS directive (repeatable)")
@click.option("--local-directory", default="$TMPDIR", show_default=True,
              help="node-local scratch for worker spill files")
@click.option("--interface", help="network interface to bind, e.g. ib0")
@click.option("--scheduler-file", type=click.Path(path_type=Path),
              default=Path("desomdb-scheduler.json"), show_default=True,
              help="where to write the scheduler address (on the shared filesystem)")
@click.option("--dry-run", is_flag=True, help="print the worker job script; submit nothing")
@_friendly_errors
def cluster(kind: str, jobs: int, memory: str, walltime: str, queue: str | None,
            account: str | None, prologue: tuple[str, ...], extra: tuple[str, ...],
            local_directory: str, interface: str | None, scheduler_file: Path,
            dry_run: bool) -> None:
    """Start a Dask cluster on SLURM or PBS (dask-jobqueue) for --scheduler.

    Runs the scheduler in this process, submits the worker jobs and waits; Ctrl-C
    cancels them. Point ingest/label/assign at it with --scheduler ADDRESS or
    --scheduler desomdb-scheduler.json. Archive, cubes and the scheduler file must
    be on a filesystem every node mounts at the same path.

    \b
    Example:
      desomdb cluster slurm --jobs 32 --account manga --prologue 'source ~/env/bin/activate'
      desomdb ingest /shared/archive ingest/dr17.toml --scheduler desomdb-scheduler.json
    """
    from desomdb.pipeline import cluster as cluster_mod

    spec = cluster_mod.ClusterSpec(kind=kind, jobs=jobs, memory=memory, walltime=walltime,
                                   queue=queue, account=account, prologue=list(prologue),
                                   extra=list(extra), local_directory=local_directory,
                                   interface=interface)
    if dry_run:
        click.echo(cluster_mod.job_script(spec))
        return
    cluster_mod.run(spec, scheduler_file)
