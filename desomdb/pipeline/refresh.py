"""Bring an archive up to date with a new data release (or new cubes), incrementally.

``desomdb refresh`` chains the stages, each of which skips what is already done, so a refresh
killed at any point and run again ends in the same archive as an uninterrupted one:

1. ingest the release: cubes already in it with the same checksum are skipped, cubes that
   are byte-identical to an earlier release's (same checksum and drpall inputs) are carried
   over without processing, new and re-processed cubes are binned and resampled;
2. label the release's cubes not labelled yet (pPXF) — or, with ``label_budget`` and a
   current model, only a first sample now (``label_max_per_cube``, if given) and the rest
   through the labelling plan after step 3 (:mod:`desomdb.pipeline.label_plan`: the plan of
   the current model is extended to the budget over all releases, so the new release's
   out-of-distribution baxels and thin nodes get fits, and the map labels the rest);
3. assign them with the current DESOM-1 on the job's workers or Dask scheduler (cubes
   assigned before are not re-encoded; a carried cube's assignments and node co-add partial
   sums are copied without reading its spectra), rebuild that model's node co-adds from the
   stored per-cube partial sums (:mod:`desomdb.science.coadd`) and its node label PDFs, and update
   its baxel similarity index (:mod:`desomdb.pipeline.similar_index`: new cubes in, superseded
   versions out);
4. recompute the model's fingerprints, map new galaxies onto its existing DESOM-2, and
   rebuild its galaxy similarity index;
5. count the new release's poorly represented spectra (the ``drift`` view).

``retrain=True`` then trains a new DESOM-1 warm-started from the current one (recorded as
its parent) on every release, assigns everything under the new id, builds its fingerprints
and DESOM-2, and reports how far the map moved. The new model is never made current here:
``desomdb model use ARCHIVE MODEL_ID`` switches, and switching back is the same command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import write_json_atomic
from desomdb.pipeline import assign as assign_mod
from desomdb.pipeline import fingerprint, ingest, jobs, label_plan, labels
from desomdb.pipeline.jobs import RefreshOptions
from desomdb.query import versions, views
from desomdb.query.drift import DriftSummary, drift_summary
from desomdb.som import registry
from desomdb.som.model import DesomConfig


@dataclass
class RefreshReport:
    """Outcome of a refresh, stage by stage."""

    release: str
    ingest: ingest.IngestReport | None = None
    labels: labels.LabelReport | None = None
    plan: label_plan.PlanReport | None = None
    model_id: str | None = None
    assign: assign_mod.AssignReport | None = None
    fingerprints: fingerprint.UpdateReport | None = None
    drift: DriftSummary | None = None
    new_model_id: str | None = None
    comparison: ModelComparison | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no cube failed to ingest or label."""
        return bool((self.ingest is None or self.ingest.ok)
                    and (self.labels is None or not self.labels.failed_cubes))


#: Read a refresh job file (an ingest job plus ``[refresh]``; see ``ingest/dr17_refresh.toml``).
load_job = jobs.load_refresh_job


def refresh(archive: str | Path, job: ingest.IngestJob, options: RefreshOptions | None = None,
            progress: bool = True) -> RefreshReport:
    """Ingest, label, assign and fingerprint a new release; optionally retrain.

    Parameters
    ----------
    archive : str or Path
        The archive (created if missing: then only ingest and labels run).
    job : IngestJob
        The release's cubes and drpall.
    options : RefreshOptions, optional
    progress : bool

    Returns
    -------
    RefreshReport

    Raises
    ------
    LockError
        If another refresh of this archive is running (each stage also takes the writer
        lock, so no other writer runs during a stage).
    """
    with Archive(archive, create=True).job_lock("refresh", "desomdb refresh"):
        return _refresh(archive, job, options or RefreshOptions(), progress)


def _refresh(archive: str | Path, job: ingest.IngestJob, opts: RefreshOptions,
             progress: bool) -> RefreshReport:
    report = RefreshReport(job.release)
    report.ingest = ingest.ingest(archive, job, progress=progress)
    rel = report.ingest.release
    arch = Archive(archive)
    current = registry.current_model(arch)
    planned = opts.label_budget is not None and current is not None
    if arch.files("baxels", release=rel) and (not planned or opts.label_max_per_cube):
        report.labels = labels.label(arch.root, release=rel, workers=job.workers,
                                     scheduler=job.scheduler, progress=progress,
                                     max_per_cube=opts.label_max_per_cube)
    if current is None:
        report.notes.append("no current DESOM-1 model: train one ('desomdb train') and make "
                            "it current ('desomdb model use') to assign the new spectra")
        return report
    report.model_id = current
    report.assign = assign_mod.assign(arch.root, current, device=opts.device, progress=progress,
                                      workers=job.workers, scheduler=job.scheduler)
    if planned:
        assert opts.label_budget is not None
        report.plan = label_plan.plan_and_label(arch.root, opts.label_budget, current,
                                                workers=job.workers, scheduler=job.scheduler,
                                                progress=progress)
        report.labels = report.plan.label_report
    if opts.fingerprints:
        report.fingerprints = fingerprint.update(arch.root, current, device=opts.device)
    report.drift = drift_summary(arch, current, rel)
    if opts.retrain:
        new_id = retrain(arch, current, device=opts.device, progress=progress)
        report.new_model_id = new_id
        assign_mod.assign(arch.root, new_id, device=opts.device, progress=progress,
                          workers=job.workers, scheduler=job.scheduler)
        if opts.fingerprints and arch.files("fingerprints", model_id=current):
            fingerprint.build(arch.root, new_id, device=opts.device, progress=progress)
        report.comparison = compare_models(arch, current, new_id)
        report.notes.append(f"new model {new_id} is NOT current; switch with "
                            f"'desomdb model use {arch.root} {new_id}' (and back with "
                            f"'desomdb model use {arch.root} {current}')")
    return report


@dataclass(frozen=True)
class ModelComparison:
    """How far a retrained map moved from its parent (see :func:`compare_models`)."""

    old_model_id: str
    new_model_id: str
    n_baxels: int
    frac_node_changed: float
    frac_moved_beyond_neighbour: float
    label_drift: dict[str, float]
    drift_old: dict[str, float]
    drift_new: dict[str, float]


def warm_start_config(parent: DesomConfig, parent_id: str) -> DesomConfig:
    """Fine-tuning schedule for a warm start: keep the map, adapt it to the new data.

    No AE pre-training; a third of the parent's iterations; the neighbourhood radius starts
    at T = 1 (or the parent's T_max if smaller) and decays to T_min over half of them; the
    encoder's learning rate is a tenth and the prototypes' SOM step a fifth of the parent's.
    Measured on the demo archive (6x6 map, DR15 -> DR17, 6,565 baxels): with the parent's
    own rates and T = 2 the child moved 88 % of baxels to another node (63 % beyond a
    neighbour; node medians drifted 0.3-1.6 sigma), with these 36-41 % (12-14 % beyond a
    neighbour; 0.1-0.3 sigma) at the same drift fraction (~1 %).
    """
    iterations = max(parent.iterations // 3, 2 * parent.eval_every)
    return DesomConfig.from_dict({
        **parent.to_dict(), "pretrain_iters": 0, "iterations": iterations,
        "decay_iters": max(iterations // 2, 1),
        "t_max": min(parent.t_max, max(parent.t_min, 1.0)),
        "lr": parent.lr / 10, "som_lr": parent.som_lr / 5,
        "extra": {**parent.extra, "warm_start_of": parent_id},
    })


def retrain(arch: Archive, parent_id: str, device: str = "cpu", progress: bool = True) -> str:
    """Train a DESOM-1 warm-started from ``parent_id`` on every release (not made current).

    Uses the parent's training filter; the model records the parent in ``parent_model_id``.
    Idempotent: the same parent and data give the same model id, which is not trained twice.
    """
    from desomdb.pipeline import train as train_mod
    from desomdb.pipeline import training_set

    parent, _ = registry.load_model(arch, parent_id, device)
    spec = arch.read("models", columns=["data_spec"], model_id=parent_id).column(0)[0].as_py()
    where = json.loads(spec).get("where", training_set.DEFAULT_WHERE)
    cfg = warm_start_config(parent.cfg, parent_id)
    return train_mod.train(arch.root, cfg, where=where, device=device, progress=progress,
                           parent_model_id=parent_id, init_state=parent.state_dict())


def compare_models(arch: Archive, old_id: str, new_id: str, min_members: int = 5,
                   save: bool = True) -> ModelComparison:
    """How far a retrained map moved from its parent, on the baxels both assigned.

    Returns
    -------
    ModelComparison
        ``n_baxels``; ``frac_node_changed`` (best node differs); ``frac_moved_beyond_neighbour``
        (grid distance > 1); ``label_drift``: per label, the median over nodes (with
        ``min_members`` in both) of |median_new − median_old| in units of the old node's half
        16-84 % width; ``drift_old`` / ``drift_new``: fraction of each release's baxels beyond each
        model's p99 distance. With ``save`` also written to
        ``artefacts/<new_id>/comparison-<old_id>.json``.
    """
    cols = ["release", "plateifu", "bin_id", "node", "row", "col"]

    def assigned(model_id: str) -> pl.DataFrame:
        df = pl.from_arrow(arch.read("assignments", columns=cols, model_id=model_id))
        assert isinstance(df, pl.DataFrame)
        return versions.keep_latest(arch, df.drop("model_id", strict=False))

    both = assigned(old_id).join(assigned(new_id), on=["release", "plateifu", "bin_id"],
                                 suffix="_new")
    grid = (both["row"] - both["row_new"]).abs() + (both["col"] - both["col_new"]).abs()
    out: dict[str, Any] = {
        "old_model_id": old_id, "new_model_id": new_id, "n_baxels": both.height,
        "frac_node_changed": float((both["node"] != both["node_new"]).cast(pl.Float64).sum())
        / max(both.height, 1),
        "frac_moved_beyond_neighbour": float((grid > 1).cast(pl.Float64).sum())
        / max(both.height, 1),
        "label_drift": {},
    }
    if arch.files("node_labels", model_id=old_id) and arch.files("node_labels", model_id=new_id):
        nl = ["node", "label", "n", "median", "p16", "p84"]
        old = pl.from_arrow(arch.read("node_labels", columns=nl, model_id=old_id))
        new = pl.from_arrow(arch.read("node_labels", columns=nl, model_id=new_id))
        assert isinstance(old, pl.DataFrame) and isinstance(new, pl.DataFrame)
        j = old.join(new, on=["node", "label"], suffix="_new").filter(
            (pl.col("n") >= min_members) & (pl.col("n_new") >= min_members))
        for (label,), g in j.group_by("label"):
            width = np.maximum((g["p84"] - g["p16"]).to_numpy() / 2, 1e-6)
            shift = np.abs((g["median_new"] - g["median"]).to_numpy()) / width
            out["label_drift"][str(label)] = float(np.median(shift))
    con = views.connect(arch.root)
    for key, model_id in (("drift_old", old_id), ("drift_new", new_id)):
        out[key] = {r[0]: r[1] for r in con.sql(
            "select release, frac_beyond_p99 from drift where model_id = ?",
            params=[model_id]).fetchall()}
    result = ModelComparison(**out)
    if save:
        write_json_atomic(paths.comparison_path(arch.root, new_id, old_id), asdict(result))
    return result
