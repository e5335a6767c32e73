"""``desomdb status``: what an archive holds and what is left to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from desomdb import registry, views
from desomdb.archive import Archive


def status(archive: str | Path) -> dict[str, Any]:
    """Summarise releases, cube outcomes, pending labels/assignments and models.

    Returns
    -------
    dict
        ``releases``: per release, cubes by status, baxels, labelled baxels, failed fits;
        ``failed_cubes``: (release, plateifu, error) rows; ``models``: registered models with
        kind, parent and whether current; ``unassigned``: baxels without a node under the
        current DESOM-1 model; ``pending``: failed cubes, cubes without labels and
        unassigned baxels; ``drift``: per release, baxels beyond the current model's
        training p99 distance (the ``drift`` view); ``report``: the last ``desomdb report``
        (:func:`desomdb.report.report_state`: where it is and why it is stale, if it is),
        or None.
    """
    from desomdb.report import report_state

    arch = Archive(archive)
    con = views.connect(arch.root)
    existing = {r[0] for r in con.sql("select view_name from duckdb_views()").fetchall()}
    out: dict[str, Any] = {"archive": str(arch.root), "releases": {}, "failed_cubes": [],
                           "models": [], "unassigned": None,
                           "current": registry.current_model(arch)}
    if "cubes" in existing:
        for release, stat, n in con.sql(
                "select release, status, count(*) from cubes group by all order by all"
        ).fetchall():
            out["releases"].setdefault(release, {})[f"cubes_{stat}"] = n
        out["failed_cubes"] = con.sql(
            "select release, plateifu, error from cubes where status = 'failed' order by all"
        ).fetchall()
    if "baxels" in existing:
        for release, n in con.sql("select release, count(*) from baxels group by 1").fetchall():
            out["releases"].setdefault(release, {})["baxels"] = n
    if "labels" in existing:
        for release, n, failed in con.sql(
                "select release, count(*), count(*) filter (where status = 'failed') "
                "from labels group by 1").fetchall():
            out["releases"][release]["labelled"] = n
            out["releases"][release]["failed_fits"] = failed
    if "models" in existing:
        current = {registry.current_model(arch, k) for k in ("desom1", "desom2")}
        out["models"] = [
            {"model_id": m, "kind": k, "parent": p, "created_at": c, "current": m in current}
            for m, k, p, c in con.sql("select model_id, kind, parent_model_id, created_at "
                                      "from models order by created_at").fetchall()]
    if "baxel_labels" in existing and out["current"]:
        out["unassigned"] = con.sql(
            "select count(*) from baxel_labels where node is null").fetchall()[0][0]
    pending: dict[str, Any] = {"failed_cubes": len(out["failed_cubes"]),
                               "unassigned_baxels": out["unassigned"]}
    if "baxels" in existing:
        cubes = "(select distinct release, plateifu from baxels)"
        if "labels" in existing:
            cubes += " anti join (select distinct release, plateifu from labels) " \
                     "using (release, plateifu)"
        pending["unlabelled_cubes"] = con.sql(f"select count(*) from {cubes}").fetchall()[0][0]
    out["pending"] = pending
    out["drift"] = []
    if "drift" in existing and out["current"]:
        out["drift"] = con.sql(
            "select release, n_baxels, n_beyond_p99, frac_beyond_p99 from drift "
            "where model_id = current_model() order by release").pl().to_dicts()
    out["report"] = report_state(arch)
    return out
