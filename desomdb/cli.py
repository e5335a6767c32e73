"""The ``desomdb`` command line: thin wrappers over the Python API.

Each command parses its options, calls one API function, and prints the result. Errors
derived from :class:`desomdb.errors.DesomdbError` are printed without a traceback and end
the process with a non-zero exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from desomdb._version import __version__
from desomdb.errors import ConfigError, DesomdbError

F = TypeVar("F", bound=Callable[..., Any])
SCHEDULER_HELP = ("Dask scheduler: address tcp://HOST:PORT or a scheduler file *.json "
                  "(see 'desomdb cluster')")


def _friendly_errors(func: F) -> F:
    """Print errors as one ``desomdb: error:`` line and exit non-zero (no traceback).

    Errors desomdb raises on purpose carry their own message. Anything else (a file that
    vanished, a damaged Parquet file, a bug) still gets one line naming what failed; set
    ``DESOMDB_DEBUG=1`` to see the traceback.
    """
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DesomdbError as exc:
            click.echo(f"desomdb: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("DESOMDB_DEBUG"):
                raise
            click.echo(f"desomdb: error: {_unexpected(exc)}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _unexpected(exc: Exception) -> str:
    """One line for an error desomdb did not raise itself."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or text}"
    return (f"{text[:400]} ({type(exc).__name__}); if an archive is involved, run "
            "'desomdb check ARCHIVE'; rerun with DESOMDB_DEBUG=1 to see the traceback")


def pl_config() -> Any:
    """Polars display settings for terminal tables."""
    import polars as pl

    return pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="desomdb")
def main() -> None:
    """desomdb: MaNGA spectra on a Deep Embedded Self-Organizing Map, queried with SQL.

    \b
    Pipeline: mock/ingest -> label -> train -> assign -> fingerprints -> sql/report;
    a new release: refresh.
    Example:
      desomdb demo --out /tmp/desomdb-demo
    """


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
@click.option("--library", type=click.Choice(["miuscat", "bc03"]), default="miuscat",
              show_default=True,
              help="SSP library to render from: miuscat (the one the fits use: accuracy is an "
              "upper limit) or bc03 (a second library the fits never see; truth weighted by "
              "initial mass)")
@_friendly_errors
def mock(out: Path, n_galaxies: int, release: str, seed: int, workers: int,
         scheduler: str | None, ifu_sizes: str, previous: str | None, reprocess: float,
         library: str) -> None:
    """Generate a mock MaNGA survey (DRP LOGCUBEs + drpall + truth) with known labels.

    \b
    Example:
      desomdb mock /tmp/survey --galaxies 20 --release DR15 --seed 1
      desomdb mock /tmp/survey --galaxies 30 --release DR17 --seed 1 --previous DR15
      desomdb mock /tmp/bc03 --galaxies 8 --release DR15 --seed 1 --library bc03
    """
    import desomdb.mock as mock_mod

    result = mock_mod.generate_survey(
        out, n_galaxies=n_galaxies, release=release, seed=seed, workers=workers,
        ifu_sizes=_ifu_sizes(ifu_sizes), scheduler=scheduler, previous=previous,
        reprocess=reprocess, library=library,
    )
    click.echo(f"wrote {result.n_cubes} cubes to {result.release_dir}")
    click.echo(f"drpall: {result.drpall_path}")
    click.echo(f"truth:  {result.truth_path}")


def _ifu_sizes(text: str) -> tuple[int, ...]:
    """Parse --ifu-sizes ("19,37") into fibre counts."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes:
        raise ConfigError(f"--ifu-sizes takes comma-separated fibre counts, e.g. 19,37; "
                          f"got {text!r}")
    return sizes


#: The per-cube pPXF limit, one option for label, refresh and demo.
_label_max_per_cube = click.option(
    "--label-max-per-cube", type=int,
    help="fit at most this many baxels per cube, evenly spaced (quick looks; default: all)")


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
@click.option("--fitter", type=click.Choice(["fast", "ppxf"]), default="fast",
              show_default=True,
              help="fast: kinematics once on a coarse template set, then linear fits with the "
              "kinematics fixed (~5x faster, same accuracy on the mocks); ppxf: the reference "
              "single pPXF fit with every nonlinear parameter free")
@_friendly_errors
def label(archive: Path, release: str | None, workers: int, scheduler: str | None,
          label_max_per_cube: int | None, line_sn: float, line_an: float, fitter: str) -> None:
    """Fit every baxel with pPXF and write the labels table.

    Cubes already labelled are skipped; a failed fit is recorded per baxel
    (status, error) without stopping the job.

    \b
    Example:
      desomdb label /tmp/archive --release DR15 --workers 2 --label-max-per-cube 20
    """
    from desomdb.pipeline import labels as labels_mod
    from desomdb.science import emission

    report = labels_mod.label(archive, release=release, workers=workers, scheduler=scheduler,
                              max_per_cube=label_max_per_cube,
                              gate=emission.LineGate(sn_min=line_sn, an_min=line_an),
                              fitter=fitter)
    rate = report.n_fits / report.fit_seconds if report.fit_seconds else 0.0
    click.echo(f"{report.n_cubes} cubes labelled, {report.n_skipped_cubes} already done; "
               f"{report.n_fits} baxels in labels ({report.n_failed_fits} failed fits; "
               f"{rate:.2f} fits/s per core)")
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
@click.option("--model", "model_id", help="model id (default: the current model)")
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
@click.argument("spectra_file", type=click.Path(path_type=Path))
@click.option("--model", "model_id", help="model id (default: the current model)")
@click.option("--output", type=click.Path(path_type=Path),
              help="write all columns to this .parquet or .csv file")
@click.option("--min-good-bins", type=int,
              help="spectra with fewer good rest-frame bins (of 4544) get no node; the "
                   "reason column says why  [default: 1000]")
@_friendly_errors
def predict(archive: Path, spectra_file: Path, model_id: str | None,
            output: Path | None, min_good_bins: int | None) -> None:
    """Predict node and label distributions for new spectra.

    SPECTRA_FILE is a FITS file in the MaNGA DAP test-spectra layout (WAVE,
    FLUX, IVAR, MASK, Z; observed frame, log-spaced vacuum grid) or a Parquet
    file with the archive's spectra columns (flux, mask[, ivar, norm_flux,
    wave_rest_aa]; rest frame, 4544 log-spaced bins 3650-8950 Å, vacuum).
    Spectra with too few good bins, or none in the 4050-4150 Å normalisation
    window, get no node and a reason.

    \b
    Example:
      desomdb predict /tmp/archive tests/data/MaNGA_test_spectra.fits.gz
    """
    import polars as pl

    from desomdb.products import predict as predict_mod

    df = predict_mod.predict(archive, spectra_file, model_id,
                             min_good_bins=predict_mod.MIN_GOOD_BINS if min_good_bins is None
                             else min_good_bins)
    if output is not None:
        if output.suffix == ".csv":
            df.drop([c for c, t in df.schema.items() if t.is_nested()]).write_csv(output)
        else:
            df.write_parquet(output)
        click.echo(f"wrote {df.height} predictions to {output}")
    show = [c for c in ("index", "node", "row", "col", "distance", "out_of_distribution",
                        "age_mw_gyr_median", "log_ml_r_median", "log_ssfr_median",
                        "d_bpt_median", "reason") if c in df.columns]
    with pl_config():
        click.echo(df.select(show))
    for index, reason in df.filter(pl.col("reason").is_not_null()).select(
            "index", "reason").iter_rows():
        click.echo(f"spectrum {index}: no node ({reason})", err=True)
    click.echo(f"{df['seconds_per_spectrum'][0] * 1e3:.2f} ms per spectrum (encode + assign)")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--baxel", help="a baxel of the archive, PLATEIFU:BIN (its cube's newest release)")
@click.option("--spectra", "spectra_file", type=click.Path(path_type=Path),
              help="a spectra file as 'desomdb predict' reads it (FITS or Parquet)")
@click.option("--index", "index", type=int, default=0, show_default=True,
              help="which spectrum of --spectra (0-based row)")
@click.option("--galaxy", help="a galaxy (mangaid): nearest galaxies by fingerprint")
@click.option("-k", "k", type=int, default=10, show_default=True, help="neighbours to list")
@click.option("--model", "model_id", help="DESOM-1 model id (default: the current model)")
@click.option("--exact", is_flag=True, help="exact search instead of the HNSW index")
@_friendly_errors
def similar(archive: Path, baxel: str | None, spectra_file: Path | None, index: int,
            galaxy: str | None, k: int, model_id: str | None, exact: bool) -> None:
    """Find the spectra (baxels) or galaxies most like a given one.

    Baxels: nearest in the DESOM-1 latent space (Euclidean), among the
    current version of each cube (latest_cubes); the query baxel itself comes
    first. Galaxies: nearest by the Hellinger distance between their
    fingerprints (distributions over DESOM-1 nodes). Uses the model's HNSW
    indexes (built by assign and fingerprints); searches exactly, and says so,
    when an index is missing or out of date.

    \b
    Examples:
      desomdb similar /tmp/archive --baxel 8485-1901:12 -k 5
      desomdb similar /tmp/archive --spectra tests/data/MaNGA_test_spectra.fits.gz --index 2
      desomdb similar /tmp/archive --galaxy 1-209232
    """
    from desomdb.products import similar as similar_mod

    found = similar_mod.similar(archive, baxel=baxel, spectra_file=spectra_file, index=index,
                                galaxy=galaxy, k=k, model_id=model_id, exact=exact)
    click.echo(f"{found.query}: {found.kind} nearest under {found.model_id} "
               f"({found.metric})")
    with pl_config():
        click.echo(found.table)
    click.echo(f"{found.method} search: {found.seconds * 1e3:.2f} ms")
    if found.note:
        click.echo(f"note: {found.note}", err=True)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--model", "model_id", help="DESOM-1 model id (default: the current model)")
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
@_friendly_errors
def refresh(archive: Path, jobfile: Path | None, cubes: str | None, drpall: Path | None,
            release: str | None, retrain: bool, workers: int, scheduler: str | None,
            truth: Path | None, cubes_per_task: int, label_max_per_cube: int | None,
            device: str | None, no_fingerprints: bool) -> None:
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
    if device is not None:
        opts.device = device
    report = refresh_mod.refresh(archive, job, opts)
    if report.ingest is not None:
        _echo_ingest(report.ingest)
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
    from desomdb.products.report import report_state

    rep = report_state(Archive(archive))
    if rep is not None and rep.stale:
        click.echo(f"the report {rep.index} is out of date; redraw it with 'desomdb report "
                   f"{archive} --out {Path(rep.index).parent}'")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet", "fits",
                                                   "votable"]),
              default="table", show_default=True,
              help="parquet, fits and votable (need --output) carry units, descriptions "
                   "and provenance")
@click.option("--output", type=click.Path(path_type=Path), help="write to this file")
@click.option("--model", "model_id", help="model for the convenience views (default: current)")
@click.option("--setup", is_flag=True, help="print the DuckDB CLI setup script instead")
@_friendly_errors
def sql(archive: Path, query: str | None, fmt: str, output: Path | None, model_id: str | None,
        setup: bool) -> None:
    """Run a read-only SQL query over the archive's views.

    Views: cubes, galaxies, baxels, spectra, bin_map, labels, truth, models,
    nodes, assignments, node_labels, fingerprints, splits, and baxel_labels,
    node_summary, galaxy_fingerprint, galaxy_summary, latest_cubes, drift,
    poorly_represented (columns in sql/schema.yml). QUERY must be one SELECT (or EXPLAIN of one);
    anything else, and reading files outside the archive, is refused. --model
    must be a registered model. For the plain DuckDB CLI:
    cd ARCHIVE && duckdb -cmd ".read setup.sql". cone(ra_deg, dec_deg,
    radius_arcsec) lists the galaxies within a radius.

    \b
    Example:
      desomdb sql /tmp/archive "select node, median(age_mw_gyr) from baxel_labels group by node"
      desomdb sql /tmp/archive "select * from galaxy_summary" --format fits --output gal.fits
    """
    from desomdb.query import views as views_mod

    if setup:
        click.echo(views_mod.setup_sql(archive), nl=False)
        return
    if not query:
        raise ConfigError("give a QUERY (or --setup)")
    if fmt in ("parquet", "fits", "votable"):
        from desomdb.products import export

        if output is None:
            raise ConfigError(f"--format {fmt} needs --output FILE")
        done = export.export_query(archive, query, output, fmt, model_id)
        click.echo(f"wrote {done.n_rows} rows to {output}")
        if done.dropped:
            click.echo(f"left out (nested columns {fmt} cannot hold): {', '.join(done.dropped)}")
        return
    con = views_mod.connect(archive, model=model_id)
    rel = views_mod.query(con, query)
    df = rel.pl()
    if fmt == "table":
        with pl_config():
            text = str(df)
    elif fmt == "csv":
        flat = df.drop([c for c, t in df.schema.items() if t.is_nested()])
        text = flat.write_csv()
    elif fmt == "json":
        text = df.write_json()
    if output is not None:
        output.write_text(text)
        click.echo(f"wrote {df.height} rows to {output}")
    else:
        click.echo(text)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to bind (loopback: only this machine can connect)")
@click.option("--port", type=int, default=8765, show_default=True)
@_friendly_errors
def serve(archive: Path, host: str, port: int) -> None:
    """Explore the archive in a browser: map, nodes, galaxies, baxels, SQL (read only).

    Then open http://localhost:8765/ (the port given). Only this machine can connect
    unless --host names another interface.

    \b
    Example:
      desomdb serve /tmp/desomdb-demo/archive --port 8765
    """
    from desomdb.web import serve as serve_app

    serve_app(archive, host=host, port=port)


@main.command("export-hats")
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_id", help="DESOM-1 model of the node columns (default: current)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@_friendly_errors
def export_hats(archive: Path, out: Path, model_id: str | None, overwrite: bool) -> None:
    """Write the galaxies as a HATS catalog (hats-import) for LSDB cross-matches.

    One row per cube in its newest release: RA/Dec, redshift, drpall columns,
    median labels, fingerprint peak node and DESOM-2 node (the galaxy_summary
    view), with units in the Parquet metadata and provenance in
    hats.properties. Needs the 'hats' extra: pip install "desomdb[hats]".

    \b
    Example:
      desomdb export-hats /tmp/archive /tmp/desomdb_galaxies
      python -c "import lsdb; print(lsdb.open_catalog('/tmp/desomdb_galaxies'))"
    """
    from desomdb.products import export_hats as hats_mod

    done = hats_mod.export_hats(archive, out, model=model_id, overwrite=overwrite)
    click.echo(f"wrote {done.n_rows} galaxies to {done.path} (HATS; model "
               f"{done.provenance.model_id})")
    if done.n_without_position:
        click.echo(f"left out {done.n_without_position} galaxies without RA/Dec")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("plateifu")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="output FITS file (overwritten)")
@click.option("--release", help="data release (default: the cube's newest)")
@click.option("--model", "model_id", help="DESOM-1 model of the NODE image (default: current)")
@_friendly_errors
def maps(archive: Path, plateifu: str, out: Path, release: str | None,
         model_id: str | None) -> None:
    """Write one galaxy's label maps as FITS images with the cube's WCS.

    Extensions BIN_ID, SNR, NODE, CHI2_RED and one per label (AGE_MW_GYR,
    MH_MW, LOG_ML_R, EBV_STAR, EBV_GAS, LOG_SSFR, D_BPT, VEL, SIGMA; NaN where
    the fit fails the label's cut) on the cube's spaxel grid, each with the
    cube's celestial WCS and BUNIT, so they overlay the cube in DS9.

    \b
    Example:
      desomdb maps /tmp/archive 8131-6102 --out manga-8131-6102-DESOM-MAPS.fits
      ds9 -multiframe manga-8131-6102-DESOM-MAPS.fits
    """
    from desomdb.products import maps as maps_mod

    done = maps_mod.write_maps(archive, plateifu, out, release=release, model=model_id)
    click.echo(f"wrote {done.path}: {done.plateifu} ({done.release}), "
               f"{len(done.extensions)} images: {', '.join(done.extensions)}")


def _node_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nodes takes comma-separated node numbers, e.g. 3,17; got {text!r}"
                          ) from None


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="folder for the figures (PNG + PDF) and index.html")
@click.option("--model", "model_id", help="DESOM-1 model (default: current)")
@click.option("--nodes", help="comma-separated nodes for Fig. 3/4/6 (default: youngest, "
              "oldest and most populated)")
@click.option("--galaxy", help="mangaid for Fig. 7 (default: the one with most baxels)")
@_friendly_errors
def report(archive: Path, out: Path, model_id: str | None, nodes: str | None,
           galaxy: str | None) -> None:
    """Write the paper's figures (PNG + PDF) and a static HTML page.

    Figures: 3 (decoded prototypes), 4 (node templates), 5 (per-node median
    labels), 6 (node label PDFs), 7 (a galaxy's fingerprint and bin map), 9/10/14
    (DESOM-2 occupancy, decoded fingerprints, Sersic n and b/a), training curves,
    and label accuracy against the truth of a mock survey. Open OUT/index.html in
    a browser (no server needed).

    \b
    Example:
      desomdb report /tmp/archive --out /tmp/report
    """
    from desomdb.products import report as report_mod

    index = report_mod.build_report(archive, out, model_id, _node_list(nodes), galaxy)
    click.echo(f"report: {index}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("figure")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="output file; the suffix (.png, .pdf, .svg) sets the format")
@click.option("--model", "model_id", help="DESOM-1 model (default: current)")
@click.option("--nodes", help="comma-separated nodes for Fig. 3/4/6")
@click.option("--galaxy", help="mangaid for Fig. 7")
@click.option("--stack", "stack_file", type=click.Path(path_type=Path),
              help="for FIGURE 'stack': a file written by 'desomdb stack --out'")
@_friendly_errors
def plot(archive: Path, figure: str, out: Path, model_id: str | None, nodes: str | None,
         galaxy: str | None, stack_file: Path | None) -> None:
    """Draw one figure of the report, or stacked spectra.

    FIGURE is one of fig3_prototypes, fig4_templates, fig5_node_medians,
    fig6_node_pdfs, fig7_fingerprint, fig9_desom2, fig10_desom2_protos,
    fig14_morphology, training, accuracy, or stack (with --stack FILE).

    \b
    Example:
      desomdb plot /tmp/archive fig6_node_pdfs --nodes 3,17 --out node_pdfs.pdf
    """
    if figure == "stack":
        from desomdb.products import stack as stack_mod

        if stack_file is None:
            raise ConfigError("FIGURE stack needs --stack FILE (written by 'desomdb stack "
                              "ARCHIVE --where ... --out FILE.parquet')")
        click.echo(f"wrote {stack_mod.plot(stack_mod.read(stack_file), out)}")
        return
    from desomdb.products import report as report_mod

    path = report_mod.plot(archive, figure, out, model_id, _node_list(nodes), galaxy)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--where", default="true", show_default=True,
              help="SQL condition over the baxel_labels view selecting the baxels")
@click.option("--by", type=click.Choice(["none", "node", "mangaid"]), default="none",
              show_default=True, help="one stack, or one per node or per galaxy")
@click.option("--model", "model_id", help="DESOM-1 model for 'node' (default: current)")
@click.option("--out", type=click.Path(path_type=Path),
              help="write the stacks to a .parquet or .fits file")
@click.option("--no-fit", is_flag=True, help="skip the pPXF fit of each stack")
@click.option("--shift-velocity", is_flag=True,
              help="shift each member to its own stellar rest frame by its fitted vel "
                   "(members without a fit are left out)")
@_friendly_errors
def stack(archive: Path, where: str, by: str, model_id: str | None, out: Path | None,
          no_fit: bool, shift_velocity: bool) -> None:
    """Stack the spectra of a selection (inverse-variance weighted) and fit each stack.

    Each cube counts once (its newest release). Stacked: flux/norm_flux with weights
    ivar*norm_flux^2. Plot the result with 'desomdb plot ARCHIVE stack --stack FILE'.

    \b
    Example:
      desomdb stack /tmp/archive --where "node = 3" --by node --out node3.fits
      desomdb stack /tmp/archive --where "radius_re < 0.5 and chi2_ok" --by mangaid
    """
    from desomdb.products import stack as stack_mod

    result = stack_mod.stack(archive, where=where, by=by, model_id=model_id, fit=not no_fit,
                             shift_velocity=shift_velocity)
    table = stack_mod.to_table(result)
    cols = [c for c in (by, "n_members", "n_cubes", "mean_snr", "snr_stack", "z_eff",
                        "age_mw_gyr", "mh_mw", "log_ml_r", "ebv_star", "ebv_gas", "chi2_red")
            if c in table.column_names]
    import polars as pl

    frame = pl.from_arrow(table.select(cols))
    with pl_config():
        click.echo(frame)
    left_out = (f"; {result.n_without_velocity} baxel(s) without a fitted vel left out"
                if result.n_without_velocity else "")
    click.echo(f"{len(result.stacks)} stack(s) in {result.seconds:.2f} s"
               f"{f', fitted in {result.fit_seconds:.1f} s' if not no_fit else ''}{left_out}",
               err=True)
    if out is not None:
        click.echo(f"wrote {stack_mod.write(result, archive, out)}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True,
              help="delete what a killed writer left (uncommitted and staged files); committed "
                   "files and rows are never touched")
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
        click.echo(f"repaired: deleted {rel}")
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
        rerun = f"desomdb report {info.archive} --out {Path(rep.index).parent}"
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
@click.option("--label-max-per-cube", type=int, default=20, show_default=True,
              help="fit at most this many baxels per cube, evenly spaced (as label/refresh)")
@_friendly_errors
def demo(out: Path, n_galaxies: int, workers: int, seed: int, ifu_sizes: str, map_size: int,
         label_max_per_cube: int) -> None:
    """Run the whole pipeline on a generated mock survey.

    mock -> ingest -> pPXF labels -> DESOM-1 -> assign -> calibrate ->
    fingerprints/DESOM-2, then a few SQL queries. Scaled to minutes on 2 cores by
    default: 19/37-fibre IFUs, a 6x6 map, a short schedule, 20 pPXF fits per cube,
    an error model from 3 baxels per S/N bin.

    \b
    Example:
      desomdb demo --out /tmp/desomdb-demo --galaxies 12
      desomdb demo --out /tmp/demo-big --ifu-sizes 19,37,61 --map-size 8
    """
    from desomdb import demo as demo_mod

    result = demo_mod.run_demo(out, n_galaxies=n_galaxies, seed=seed, workers=workers,
                               ifu_sizes=_ifu_sizes(ifu_sizes), map_size=map_size,
                               labels_per_cube=label_max_per_cube)
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


if __name__ == "__main__":
    main()
