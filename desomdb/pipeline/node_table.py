"""A model's ``nodes`` table: prototypes, decoded spectra, co-adds and member counts.

Written by :mod:`desomdb.pipeline.assign` after every assignment job.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.science import coadd, spectra
from desomdb.som.model import Desom


def beyond_p99_counts(arch: Archive, model_id: str, n_nodes: int) -> np.ndarray | None:
    """Count each node's members beyond the model's p99 latent distance (``nodes.n_beyond_p99``).

    Members are the committed assignments of the newest version of each cube (as
    ``n_members``); the threshold is ``model_thresholds.distance_p99`` (the training p99,
    ``models.metrics``). Read once per ``desomdb assign``, so the explorer's "beyond p99"
    map reads one small file instead of every cube's assignments.

    Parameters
    ----------
    arch : Archive
    model_id : str
    n_nodes : int

    Returns
    -------
    ndarray, shape (n_nodes,), int64, or None
        Members with ``distance > distance_p99`` per node; None if the model records no
        p99 (models trained before it was stored).
    """
    from desomdb.query import views

    con = views.connect(arch.root, raw=True)
    views.progress_bar_off(con)
    try:
        found = con.sql("select distance_p99 from model_thresholds where model_id = ?",
                        params=[model_id]).fetchall()
        if not found or found[0][0] is None:
            return None
        rows = con.sql(
            "select a.node, count(*) as n from assignments a semi join latest_cubes c "
            "on a.release = c.release and a.plateifu = c.plateifu "
            "where a.model_id = ? and a.distance > ? group by a.node",
            params=[model_id, float(found[0][0])]).fetchnumpy()
    finally:
        con.close()
    counts = np.zeros(n_nodes, np.int64)
    np.add.at(counts, rows["node"].astype(np.int64), rows["n"].astype(np.int64))
    return counts


def write_nodes(writer: Writer, model: Desom, model_id: str, total: coadd.Coadd,
                device: str, n_beyond_p99: np.ndarray | None = None) -> None:
    """Commit a model's ``nodes`` table (one file), replacing the one it had.

    Parameters
    ----------
    writer : Writer
    model : Desom
    model_id : str
    total : Coadd
        The co-add of every node's members (newest cube versions).
    device : str
        Where the decoder runs (``cpu`` or ``cuda``).
    n_beyond_p99 : ndarray, shape (n_nodes,), int64, optional
        Members beyond the training p99 latent distance (:func:`beyond_p99_counts`).
    """
    cfg = model.cfg
    with torch.no_grad():
        protos = model.prototypes.detach()
        decoded = model.decode(protos.to(device)).cpu().numpy()
    nodes = np.arange(cfg.n_nodes)
    table = pa.table({
        "node": pa.array(nodes.astype(np.int16)),
        "row": pa.array((nodes // cfg.map_cols).astype(np.int16)),
        "col": pa.array((nodes % cfg.map_cols).astype(np.int16)),
        "n_members": pa.array(total.n_members),
        "prototype": spectra.to_list_column(protos.cpu().numpy()),
        "decoded": spectra.to_list_column(decoded),
        "coadd": spectra.to_list_column(total.coadd),
        "n_beyond_p99": pa.array(n_beyond_p99, pa.int64()) if n_beyond_p99 is not None
        else pa.nulls(cfg.n_nodes, pa.int64()),
    })
    target = paths.model_file("nodes", model_id)
    old = [("nodes", str(f.relative_to(writer.root)))
           for f in writer.archive.files("nodes", model_id=model_id)]
    writer.commit(add=[writer.stage_table("nodes", table, target)],
                  remove=[o for o in old if o[1] != target])
