"""``desomdb status``: what an archive holds and what is left to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from desomdb.archive.store import Archive
from desomdb.products.report_state import ReportState, report_state
from desomdb.query import views
from desomdb.query.drift import DriftSummary, drift_rows
from desomdb.som import registry


@dataclass(frozen=True)
class ModelEntry:
    """A registered model as ``status`` lists it."""

    model_id: str
    kind: str
    parent: str | None
    created_at: str
    current: bool


@dataclass(frozen=True)
class StatusReport:
    """What an archive holds and what is left to do (:func:`status`).

    Attributes
    ----------
    archive : str
    current : str or None
        The current DESOM-1 model.
    releases : dict
        Per release: ``cubes_<status>``, ``baxels``, ``labelled``, ``failed_fits`` counts.
    failed_cubes : list of (release, plateifu, error)
    models : list of ModelEntry
    unassigned : int or None
        Baxels without a node under the current model (None without one).
    unlabelled_cubes : int
        Cubes with baxels but no labels.
    drift : list of DriftSummary
        Per release, baxels beyond the current model's training p99 distance.
    report : ReportState or None
        The last ``desomdb report`` and whether it is stale.
    last_job : dict or None
        The last writer session (``command``, ``state``: running, finished, failed,
        interrupted or killed, ``error``, ``at``).
    """

    archive: str
    current: str | None
    releases: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_cubes: list[tuple[str, str, str]] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    unassigned: int | None = None
    unlabelled_cubes: int = 0
    drift: list[DriftSummary] = field(default_factory=list)
    report: ReportState | None = None
    last_job: dict[str, object] | None = None


def status(archive: str | Path) -> StatusReport:
    """Summarise releases, cube outcomes, pending labels/assignments, models and the report."""
    arch = Archive(archive)
    con = views.connect(arch.root)
    existing = {r[0] for r in con.sql("select view_name from duckdb_views()").fetchall()}
    current = registry.current_model(arch)
    releases: dict[str, dict[str, int]] = {}
    failed: list[tuple[str, str, str]] = []
    if "cubes" in existing:
        for release, stat, n in con.sql(
                "select release, status, count(*) from cubes group by all order by all"
        ).fetchall():
            releases.setdefault(release, {})[f"cubes_{stat}"] = n
        failed = [tuple(r) for r in con.sql(
            "select release, plateifu, error from cubes where status = 'failed' order by all"
        ).fetchall()]
    if "baxels" in existing:
        for release, n in con.sql("select release, count(*) from baxels group by 1").fetchall():
            releases.setdefault(release, {})["baxels"] = n
    if "labels" in existing:
        for release, n, n_failed in con.sql(
                "select release, count(*), count(*) filter (where status = 'failed') "
                "from labels group by 1").fetchall():
            releases.setdefault(release, {}).update(labelled=n, failed_fits=n_failed)
    models: list[ModelEntry] = []
    if "models" in existing:
        currents = {registry.current_model(arch, k) for k in ("desom1", "desom2")}
        models = [ModelEntry(m, k, p, c, m in currents)
                  for m, k, p, c in con.sql("select model_id, kind, parent_model_id, created_at "
                                            "from models order by created_at").fetchall()]
    unassigned = None
    if "baxel_labels" in existing and current:
        unassigned = int(con.sql(
            "select count(*) from baxel_labels where node is null").fetchall()[0][0])
    unlabelled = 0
    if "baxels" in existing:
        cubes = "(select distinct release, plateifu from baxels)"
        if "labels" in existing:
            cubes += " anti join (select distinct release, plateifu from labels) " \
                     "using (release, plateifu)"
        unlabelled = int(con.sql(f"select count(*) from {cubes}").fetchall()[0][0])
    drift: list[DriftSummary] = []
    if "drift" in existing and current:
        drift = drift_rows(con, current)
    return StatusReport(str(arch.root), current, releases, failed, models, unassigned,
                        unlabelled, drift, report_state(arch), arch.last_job())
