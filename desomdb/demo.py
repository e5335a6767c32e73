"""``desomdb demo``: the whole pipeline on a generated mock survey, in minutes on 2 cores.

Scaled down so it fits in a few minutes, and says so: small IFUs (19 and 37 fibres by
default), a map of ``map_size``² nodes instead of 15×15, a short training schedule, pPXF
labels for ``labels_per_cube`` baxels per cube (evenly spaced) instead of all of them, and an
error model (``desomdb calibrate``) from a few baxels per S/N bin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from desomdb import mock
from desomdb.archive.store import Archive
from desomdb.pipeline import assign, calibrate, fingerprint, ingest, label_plan, labels, train
from desomdb.products import report
from desomdb.query import views
from desomdb.som import model, registry


@dataclass
class DemoResult:
    """Where the demo wrote things and how long each stage took."""

    out: Path
    archive: Path
    model_id: str
    seconds: dict[str, float] = field(default_factory=dict)
    queries: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None


#: Error-model sample of the demo's ``desomdb calibrate`` (per S/N bin) and its noise re-fits:
#: enough to give every node a calibrated interval, far too few to quote the errors.
CALIBRATION_PER_BIN = 3
CALIBRATION_REFITS = 2

EXAMPLE_QUERIES = {
    "node light-weighted ages (log yr): members' p16-p84, calibrated lo68-hi68, and the "
    "total interval with the template-library term":
        "select node, n, round(median, 2) as median, round(p16, 2) as p16, round(p84, 2) as p84, "
        "round(lo68, 2) as lo68, round(hi68, 2) as hi68, round(lo68_total, 2) as lo68_total, "
        "round(hi68_total, 2) as hi68_total from node_labels "
        "where label = 'log_age_lw' and model_id = current_model() order by n desc limit 5",
    "labels for every baxel: from its fit or from the map (baxel_estimates)":
        "select coalesce(age_mw_gyr_source, 'none') as source, count(*) as n_baxels, "
        "round(median(age_mw_gyr), 2) as median_age_gyr, "
        "round(median(age_mw_gyr_hi68 - age_mw_gyr_lo68), 2) as median_interval_gyr "
        "from baxel_estimates group by all order by source",
    "median stellar age per node (first rows)":
        "select node, count(*) as n, round(median(age_mw_gyr), 2) as median_age_gyr "
        "from baxel_labels where chi2_ok group by node order by node limit 8",
    "galaxies and their most-occupied node":
        "select mangaid, arg_max(node, n_baxels) as peak_node, sum(n_baxels)::bigint as n_baxels "
        "from galaxy_fingerprint group by mangaid order by mangaid",
    "label accuracy against the mock truth (median |fit - true|)":
        "select round(median(abs(l.log_ml_r - t.log_ml_r)), 3) as log_ml_r, "
        "round(median(abs(l.mh_mw - t.mh_mw)), 3) as mh_mw, "
        "round(median(abs(l.age_mw_gyr - t.age_mw_gyr)), 2) as age_gyr, count(*) as n "
        "from preferred_labels l join truth t using (release, plateifu, bin_id) where l.chi2_ok",
}


def run_demo(out: str | Path, n_galaxies: int = 12, seed: int = 0, workers: int = 2,
             map_size: int = 6, labels_per_cube: int = 8, iterations: int = 600,
             progress: bool = True, ifu_sizes: tuple[int, ...] = (19, 37),
             plan_budget: float = 0.25) -> DemoResult:
    """Run the demo pipeline and its example queries.

    mock -> ingest -> first labels -> train -> assign -> planned labels -> calibrate
    (-> fingerprints) -> queries.

    Parameters
    ----------
    out : str or Path
        Folder for the survey and the archive (``out/survey``, ``out/archive``).
    n_galaxies : int
    seed : int
    workers : int
    map_size : int
        DESOM-1 map is ``map_size`` × ``map_size`` (the paper: 15).
    labels_per_cube : int
        pPXF fits per cube of the first sample (``desomdb demo --label-max-per-cube``).
    iterations : int
        Joint training iterations (after 150 autoencoder pre-training iterations).
    progress : bool
    ifu_sizes : tuple of int
        IFU fibre counts the mock survey draws from (small IFUs keep it fast).
    plan_budget : float
        Fraction of the baxels fitted in all after the labelling plan
        (``desomdb label --plan --budget``); the map labels the rest (``baxel_estimates``).

    Returns
    -------
    DemoResult
    """
    out = Path(out)
    archive = out / "archive"
    seconds: dict[str, float] = {}

    def stage(name: str) -> float:
        if progress:
            click.echo(f"== {name}", err=True)
        return time.perf_counter()

    t = stage(f"mock survey: {n_galaxies} galaxies")
    survey = mock.generate_survey(out / "survey", n_galaxies, "DR15", seed=seed,
                                  workers=workers, ifu_sizes=ifu_sizes, progress=progress)
    seconds["mock"] = time.perf_counter() - t

    t = stage("ingest")
    job = ingest.IngestJob(release="DR15", cubes=str(survey.release_dir),
                           drpall=str(survey.drpall_path), workers=workers)
    ingest.ingest(archive, job, progress=progress)
    seconds["ingest"] = time.perf_counter() - t

    t = stage(f"pPXF labels, first sample ({labels_per_cube} baxels per cube)")
    labels.label(archive, workers=workers, progress=progress, max_per_cube=labels_per_cube)
    seconds["label"] = time.perf_counter() - t

    t = stage(f"train DESOM-1 ({map_size}x{map_size} map)")
    cfg = model.compact_config(map_rows=map_size, map_cols=map_size, iterations=iterations,
                               decay_iters=int(iterations * 0.8), pretrain_iters=150,
                               batch_size=64, eval_every=100, seed=seed)
    model_id = train.train(archive, cfg, progress=progress)
    registry.set_current_model(Archive(archive), model_id)
    seconds["train"] = time.perf_counter() - t

    t = stage("assign every baxel")
    assign.assign(archive, model_id, progress=progress)
    seconds["assign"] = time.perf_counter() - t

    t = stage(f"labelling plan: fit {plan_budget:.0%} of the baxels, the map labels the rest")
    label_plan.plan_and_label(archive, plan_budget, model_id, workers=workers,
                              progress=progress)
    seconds["plan"] = time.perf_counter() - t

    t = stage(f"calibrate the node labels ({CALIBRATION_PER_BIN} baxels per S/N bin)")
    calibrate.calibrate(archive, per_bin=CALIBRATION_PER_BIN, refits=CALIBRATION_REFITS,
                        workers=workers, progress=progress)
    seconds["calibrate"] = time.perf_counter() - t

    t = stage("fingerprints and DESOM-2")
    fingerprint.build(archive, model_id, progress=progress)
    seconds["fingerprints"] = time.perf_counter() - t

    t = stage("report (figures + index.html)")
    index = report.build_report(archive, out / "report")
    seconds["report"] = time.perf_counter() - t

    con = views.connect(archive)
    queries = {title: con.sql(sql).pl() for title, sql in EXAMPLE_QUERIES.items()}
    return DemoResult(out, archive, model_id, seconds, queries, index)
