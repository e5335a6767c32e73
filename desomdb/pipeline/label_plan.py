"""The labelling plan: which baxels to fit so that the map can label the rest.

A survey need not fit every baxel: a baxel's node gives its labels (``baxel_estimates``)
once the node has enough fitted members. :func:`plan` chooses, from the current DESOM-1
map, the baxels worth fitting under a budget, records them in the ``label_plan`` table
(partition ``model_id``), and :func:`plan_and_label` fits the planned baxels that have no
label yet and rebuilds the model's ``node_labels``. The order of a survey becomes ingest ->
a first sample (``desomdb label --label-max-per-cube``) -> train -> assign -> plan -> fit ->
node labels (``desomdb label --plan``) -> calibrate.

What the plan picks, in this order, until the budget is spent:

1. ``out_of_distribution``: every baxel farther from its node's prototype than the model's
   ``distance_p99``: the map cannot label it, so it is fitted.
2. ``node_minimum``: in every populated node, members up to :data:`MIN_FITTED` fitted ones
   (or all members of a smaller node), one level at a time over all nodes (first one per
   node, then a second ...), so a small budget still reaches every node. Within a node the
   picks alternate between galaxies (a node's members come from a few galaxies; its
   interval must hold for others), and within a galaxy they spread over its S/N range
   (median S/N first, then the extremes, then between).
3. ``wide_interval``: the rest of the budget over the nodes in proportion to their members
   times the width of their calibrated intervals (``hi68 - lo68`` over each label's
   histogram range, averaged over the labels; nodes without an interval count as the
   widest), in the same order within a node.

A baxel already labelled (any fitter) or planned before counts as fitted: a later run with
a larger budget extends the plan, never restarts it, and a rerun after an interruption
fits only what is still missing. The node PDFs (``node_labels``) are *not* re-weighted
for the plan's non-random sample: each node's members are picked across its galaxies and
S/N range, not in proportion to them.

Budget: a fraction of the model's assigned baxels (``0 < budget <= 1``) or a count
(``budget > 1``); fits made before the plan count against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.errors import ArchiveError, ConfigError
from desomdb.pipeline import labels, node_labels
from desomdb.query import views
from desomdb.science import emission, fitting, label_catalogue
from desomdb.som import registry

#: Fitted members a populated node gets before any node gets more ("too few fitted members"
#: below it: ``baxel_estimates`` gives no map value from a node with fewer).
MIN_FITTED = label_catalogue.MIN_NODE_MEMBERS
#: Reasons a baxel is planned, in the order they are served.
REASONS = ("out_of_distribution", "node_minimum", "wide_interval")
SCHEMA = pa.schema([
    ("release", pa.string()), ("plateifu", pa.string()), ("bin_id", pa.int32()),
    ("node", pa.int32()), ("reason", pa.string()), ("budget", pa.float64()),
    ("planned_at", pa.string()),
])


@dataclass
class PlanReport:
    """What a plan run chose.

    Attributes
    ----------
    model_id : str
    n_assigned : int
        Baxels assigned under the model (newest release of each cube).
    n_budget : int
        Baxels the budget allows fitted in all.
    n_fitted_before : int
        Baxels already labelled or planned before this run.
    n_new : dict
        Newly planned baxels per reason (:data:`REASONS`).
    n_nodes : int
        Populated nodes.
    n_nodes_short : int
        Populated nodes still below :data:`MIN_FITTED` fitted members after the plan (only
        when the budget ran out first, or a node has fewer members).
    label_report : LabelReport or None
        The fits of the planned baxels (:func:`plan_and_label` only).
    """

    model_id: str
    n_assigned: int = 0
    n_budget: int = 0
    n_fitted_before: int = 0
    n_new: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    n_nodes: int = 0
    n_nodes_short: int = 0
    label_report: labels.LabelReport | None = None


def budget_count(budget: float, n_assigned: int) -> int:
    """Baxels a budget allows: a fraction (0 < budget <= 1) or a count (budget > 1).

    Raises
    ------
    ConfigError
        If the budget is not positive.
    """
    if not budget > 0:
        raise ConfigError(f"--budget must be a fraction in (0, 1] or a count > 1, got {budget}")
    return round(budget * n_assigned) if budget <= 1 else int(budget)


def _spread_order(n: int) -> np.ndarray:
    """Pick rank of each of ``n`` S/N-sorted members: median first, the ends, then between.

    Returns
    -------
    ndarray of int, shape (n,)
        ``rank[i]`` is when the member at S/N position ``i`` is picked.
    """
    order: list[int] = []
    seen: set[int] = set()

    def add(i: int) -> None:
        if 0 <= i < n and i not in seen:
            seen.add(i)
            order.append(i)

    for i in (n // 2, 0, n - 1):
        add(i)
    k = 1
    while len(order) < n and k < 4 * n:  # van der Corput fractions of the range
        v, base, j = 0.0, 0.5, k
        while j:
            v += base * (j & 1)
            j >>= 1
            base /= 2
        add(int(v * n))
        k += 1
    for i in range(n):
        add(i)
    rank = np.empty(n, int)
    rank[np.asarray(order, dtype=int)] = np.arange(n)
    return rank


def candidate_order(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``pick`` to a node's (or many nodes') members: the order a plan takes them in.

    Within a node, galaxies take turns (each galaxy's first pick, then each one's second
    ...; galaxies in a seeded hash order), and a galaxy's picks spread over its S/N range.

    Parameters
    ----------
    df : polars.DataFrame
        Columns ``node``, ``plateifu``, ``snr`` (and any others).
    """
    df = df.sort(["node", "plateifu", "snr", "bin_id"])
    within = np.empty(df.height, int)
    keys = df.select("node", "plateifu").to_numpy()
    start = 0
    for end in [*np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1, df.height]:
        within[start:end] = _spread_order(end - start)
        start = end
    return (df.with_columns(pl.Series("galaxy_pick", within),
                            pl.col("plateifu").hash(seed=7).alias("galaxy_hash"))
            .sort(["node", "galaxy_pick", "galaxy_hash", "bin_id"])
            .with_columns(pl.int_range(pl.len()).over("node").alias("pick"))
            .drop("galaxy_pick", "galaxy_hash"))


def _members(arch: Archive, model_id: str) -> tuple[pl.DataFrame, float]:
    """Read the assigned baxels (newest cubes) with S/N, node, distance and fitted flags."""
    con = views.connect(arch.root, raw=True)
    quoted = "'" + model_id.replace("'", "''") + "'"
    fitted = ("exists (select 1 from labels l where l.release = a.release and "
              "l.plateifu = a.plateifu and l.bin_id = a.bin_id)") if arch.has_table(
                  "labels") else "false"
    planned = ("exists (select 1 from label_plan p where p.model_id = a.model_id and "
               "p.release = a.release and p.plateifu = a.plateifu and p.bin_id = a.bin_id)"
               ) if arch.files("label_plan", model_id=model_id) else "false"
    try:
        p99 = con.sql(f"select distance_p99 from model_thresholds where model_id = {quoted}"
                      ).fetchall()
        df = con.sql(
            "select a.release, a.plateifu, a.bin_id, a.node::integer as node, a.distance, "
            f"b.snr, {fitted} as fitted, {planned} as planned from assignments a "
            "semi join latest_cubes c on a.release = c.release and a.plateifu = c.plateifu "
            "join baxels b using (release, plateifu, bin_id) "
            f"where a.model_id = {quoted}").pl()
    finally:
        con.close()
    threshold = float(p99[0][0]) if p99 and p99[0][0] is not None else float("inf")
    return df, threshold


def _node_width(arch: Archive, model_id: str) -> dict[int, float]:
    """Mean calibrated interval width per node, over labels, as a fraction of each range."""
    if not arch.files("node_labels", model_id=model_id):
        return {}
    nl = pl.from_arrow(arch.read("node_labels", columns=["node", "label", "lo68", "hi68"],
                                 model_id=model_id))
    assert isinstance(nl, pl.DataFrame)
    span = {k: v[1] - v[0] for k, v in label_catalogue.EDGES.items()}
    nl = nl.filter(pl.col("label").is_in(list(span))).with_columns(
        ((pl.col("hi68") - pl.col("lo68"))
         / pl.col("label").replace_strict(span, return_dtype=pl.Float64)).alias("w"))
    widths = nl.group_by("node").agg(pl.col("w").mean()).drop_nulls()
    return dict(zip(widths["node"].to_list(), widths["w"].to_list(), strict=True))


def choose(df: pl.DataFrame, threshold: float, n_budget: int,
           widths: dict[int, float] | None = None) -> pl.DataFrame:
    """Choose the baxels to plan (see the module docstring); the pure part of :func:`plan`.

    Parameters
    ----------
    df : polars.DataFrame
        One row per assigned baxel: ``release``, ``plateifu``, ``bin_id``, ``node``,
        ``distance``, ``snr``, ``fitted`` and ``planned`` (booleans).
    threshold : float
        The model's ``distance_p99``; baxels beyond it are out of distribution.
    n_budget : int
        Baxels fitted in all after the plan (fitted and planned ones included).
    widths : dict, optional
        Node -> mean relative interval width (:func:`_node_width`).

    Returns
    -------
    polars.DataFrame
        The newly planned rows: ``release``, ``plateifu``, ``bin_id``, ``node``, ``reason``.
    """
    widths = widths or {}
    df = df.with_columns((pl.col("fitted") | pl.col("planned")).alias("chosen"),
                         (pl.col("distance") > threshold).alias("ood"))
    left = n_budget - int(df["chosen"].sum())
    picks: list[pl.DataFrame] = []

    def take(rows: pl.DataFrame, reason: str) -> None:
        nonlocal left
        rows = rows.head(max(left, 0))
        if rows.height:
            picks.append(rows.select("release", "plateifu", "bin_id", "node")
                         .with_columns(pl.lit(reason).alias("reason")))
            left -= rows.height

    take(df.filter(pl.col("ood") & ~pl.col("chosen")).sort("distance", descending=True),
         "out_of_distribution")
    inside = candidate_order(df.filter(~pl.col("ood")))
    # node_minimum, one level at a time: a candidate's level is the number of chosen
    # members its node has once it is taken.
    todo = inside.with_columns(pl.col("chosen").cast(pl.Int64).sum().over("node")
                               .alias("have")).filter(~pl.col("chosen")).sort(["node", "pick"])
    todo = todo.with_columns(
        (pl.col("have") + pl.int_range(1, pl.len() + 1).over("node")).alias("level"))
    minimum = todo.filter(pl.col("level") <= MIN_FITTED).sort(["level", "node", "pick"])
    take(minimum, "node_minimum")
    if left > 0:
        rest = todo.filter(pl.col("level") > MIN_FITTED)
        take(_proportional(rest, inside, widths, left), "wide_interval")
    if not picks:
        return pl.DataFrame(schema={"release": pl.String, "plateifu": pl.String,
                                    "bin_id": pl.Int32, "node": pl.Int32,
                                    "reason": pl.String})
    return pl.concat([p.with_columns(pl.col("bin_id").cast(pl.Int32),
                                     pl.col("node").cast(pl.Int32)) for p in picks])


def _proportional(rest: pl.DataFrame, inside: pl.DataFrame, widths: dict[int, float],
                  n: int) -> pl.DataFrame:
    """Take ``n`` of ``rest``, per node in proportion to members x interval width."""
    if rest.height == 0 or n <= 0:
        return rest.head(0)
    size = inside.group_by("node").len()
    widest = max(widths.values(), default=1.0)
    weight = {int(k): int(v) * widths.get(int(k), widest)
              for k, v in zip(size["node"], size["len"], strict=True)}
    avail = rest.group_by("node").len()
    nodes = avail["node"].to_list()
    cap = np.asarray(avail["len"].to_list(), dtype=float)
    w = np.asarray([weight[int(k)] for k in nodes], dtype=float)
    alloc = np.zeros(len(nodes))
    remaining = float(min(n, cap.sum()))
    while remaining > 0.5:  # water-filling: proportional shares, capped at what a node has
        open_ = alloc < cap
        share = w * open_ / max((w * open_).sum(), 1e-30) * remaining
        alloc = np.minimum(alloc + share, cap)
        remaining = float(min(n, cap.sum()) - alloc.sum())
        if not (alloc < cap).any():
            break
    count = np.floor(alloc).astype(int)
    short = int(min(n, cap.sum())) - int(count.sum())
    for i in np.argsort(-(alloc - count))[:max(short, 0)]:
        count[i] += 1
    quota = pl.DataFrame({"node": nodes, "quota": count}, schema={"node": rest["node"].dtype,
                                                                 "quota": pl.Int64})
    return (rest.join(quota, on="node").sort(["node", "pick"])
            .filter(pl.int_range(pl.len()).over("node") < pl.col("quota"))
            .sort(["pick", "node"]).drop("quota"))


def plan(archive: str | Path, budget: float, model_id: str | None = None) -> PlanReport:
    """Choose baxels to fit under ``budget`` and commit them to ``label_plan``.

    Parameters
    ----------
    archive : str or Path
    budget : float
        Fraction of the model's assigned baxels (0 < budget <= 1) or a count (> 1).
    model_id : str, optional
        DESOM-1 model whose map plans (default: the current one).

    Returns
    -------
    PlanReport

    Raises
    ------
    ArchiveError
        If the model has assigned no baxel yet.
    """
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    df, threshold = _members(arch, model_id)
    if df.height == 0:
        raise ArchiveError(f"{arch.root}: model {model_id} has assigned no baxel; run "
                           f"'desomdb assign {arch.root}' first")
    report = PlanReport(model_id, n_assigned=df.height,
                        n_budget=budget_count(budget, df.height),
                        n_fitted_before=int((df["fitted"] | df["planned"]).sum()))
    new = choose(df, threshold, report.n_budget, _node_width(arch, model_id))
    for reason, n in new.group_by("reason").len().iter_rows():
        report.n_new[reason] = int(n)
    chosen = df.join(new.select("release", "plateifu", "bin_id").with_columns(
        pl.lit(True).alias("new")), on=["release", "plateifu", "bin_id"], how="left")
    per_node = chosen.filter(pl.col("distance") <= threshold).group_by("node").agg(
        (pl.col("fitted") | pl.col("planned") | pl.col("new").fill_null(False)).sum()
        .alias("have"), pl.len().alias("n"))
    report.n_nodes = per_node.height
    report.n_nodes_short = int((per_node["have"] < np.minimum(per_node["n"], MIN_FITTED)).sum())
    if new.height:
        table = new.with_columns(pl.lit(float(budget)).alias("budget"),
                                 pl.lit(time.strftime("%Y-%m-%dT%H:%M:%S")).alias("planned_at")
                                 ).to_arrow().cast(SCHEMA)
        with arch.writer("desomdb label --plan") as writer:
            name = paths.plan_part_name(arch.generation() + 1)
            writer.commit(add=[writer.stage_table(
                "label_plan", table, paths.model_file("label_plan", model_id, name))])
    return report


def planned_todo(arch: Archive, model_id: str) -> dict[tuple[str, str], set[int]]:
    """Planned baxels of ``model_id`` that have no label yet, per (release, plateifu)."""
    if not arch.files("label_plan", model_id=model_id):
        return {}
    con = views.connect(arch.root, raw=True)
    quoted = "'" + model_id.replace("'", "''") + "'"
    unlabelled = ("and not exists (select 1 from labels l where l.release = p.release and "
                  "l.plateifu = p.plateifu and l.bin_id = p.bin_id)"
                  if arch.has_table("labels") else "")
    try:
        rows = con.sql(f"select release, plateifu, bin_id from label_plan p where "
                       f"p.model_id = {quoted} {unlabelled}").fetchall()
    finally:
        con.close()
    out: dict[tuple[str, str], set[int]] = {}
    for release, plateifu, bin_id in rows:
        out.setdefault((release, plateifu), set()).add(int(bin_id))
    return out


def plan_and_label(archive: str | Path, budget: float, model_id: str | None = None,
                   workers: int = 2, scheduler: str | None = None, progress: bool = True,
                   gate: emission.LineGate | None = None,
                   options: fitting.FitOptions | None = None, fitter: str | None = None,
                   ) -> PlanReport:
    """Plan (:func:`plan`), fit the planned baxels without a label, rebuild ``node_labels``.

    Parameters are those of :func:`plan` and :func:`desomdb.pipeline.labels.label`.

    Returns
    -------
    PlanReport
        With ``label_report`` set.
    """
    arch = Archive(archive)
    report = plan(arch.root, budget, model_id)
    todo = planned_todo(arch, report.model_id)
    report.label_report = labels.label(
        arch.root, workers=workers, scheduler=scheduler, progress=progress, only=todo,
        gate=gate, options=options, fitter=fitter) if todo else labels.LabelReport()
    with arch.writer("desomdb label --plan") as writer:
        node_labels.write_node_labels(writer, arch, report.model_id)
    return report
