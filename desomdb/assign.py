"""Assign every baxel to its DESOM-1 node; build ``nodes`` and ``node_labels``.

Only the encoder runs per spectrum (the authors' code also ran the decoder, ~3× slower).
``distance`` is the Euclidean latent distance to the best-matching prototype;
``is_adjacent`` says whether the runner-up node is a 4-neighbour (Manhattan distance 1).
``latent`` (float32[latent]) is the encoder's output, kept so that similarity search
(:mod:`desomdb.similar`) never re-encodes;
after assigning, the model's baxel index is brought up to date
(:func:`desomdb.similar_index.update_baxel_index`).
Node co-adds, ``n_members`` and ``node_labels`` count each cube once, in its newest release
(:mod:`desomdb.versions`). ``node_labels`` use all assigned baxels (train and test) passing
the paper's label cuts —
chi2_red < 2; sSFR also Hα S/N > 2; d_BPT also all four lines at S/N > 2 — with histogram
edges fixed per label so node PDFs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from desomdb import paths, registry, similar_index, spectra, versions
from desomdb.archive import Archive, StagedFile, Writer
from desomdb.inference import encode_all, nearest_nodes, normalised
from desomdb.model import Desom
from desomdb.progress import track
from desomdb.registry import load_model

#: Labels summarised per node, with their fixed histogram range and bin count.
LABEL_EDGES: dict[str, tuple[float, float, int]] = {
    "age_mw_gyr": (0.0, 14.0, 28),
    "mh_mw": (-0.8, 0.3, 22),
    "log_ml_r": (-1.0, 1.5, 25),
    "ebv_star": (0.0, 1.0, 20),
    "ebv_gas": (-0.5, 1.5, 20),
    "log_ssfr": (-14.0, -8.0, 24),
    "d_bpt": (-1.0, 1.5, 25),
    "sigma": (0.0, 400.0, 20),
}
LABEL_CUTS = {"log_ssfr": "ssfr_ok", "d_bpt": "bpt_ok", "ebv_gas": "ssfr_ok"}


def assign_table(model: Desom, table: pa.Table, norm: np.ndarray, device: str = "cpu",
                 precision: str = "fp32") -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Assign the spectra of one Parquet table (one cube).

    Returns
    -------
    rows : pyarrow.Table
        bin_id, node, row, col, second_node, distance, is_adjacent, latent.
    best : ndarray of int, shape (n,)
    x, w : ndarray, shape (n, 4544)
        The normalised spectra and weights (for node co-adds).
    """
    x, w = normalised(table, norm)
    z = encode_all(model, x, device, precision=precision)
    found = nearest_nodes(model, z, device)
    rows = pa.table({
        "bin_id": table.column("bin_id"),
        "node": pa.array(found.best.astype(np.int16)),
        "row": pa.array(found.row.astype(np.int16)),
        "col": pa.array(found.col.astype(np.int16)),
        "second_node": pa.array(found.second.astype(np.int16)),
        "distance": pa.array(found.distance),
        "is_adjacent": pa.array(found.adjacent),
        similar_index.LATENT: spectra.to_list_column(z),
    })
    best = found.best
    return rows, best, x, w


@dataclass(frozen=True)
class AssignReport:
    """Outcome of :func:`assign`.

    Attributes
    ----------
    model_id : str
    n_assigned : int
        Baxels of the current version of each cube on the map (those in the node co-adds).
    n_encoded : int
        Spectra encoded by this run (0 on a rerun).
    n_cubes : int
    seconds : float
    spectra_per_s : float
        Encoding throughput of this run (NaN when nothing was encoded).
    index : IndexReport, optional
        What the update of the model's baxel similarity index did.
    """

    model_id: str
    n_assigned: int
    n_encoded: int
    n_cubes: int
    seconds: float
    spectra_per_s: float
    index: similar_index.IndexReport | None = None


def assign(archive: str | Path, model_id: str | None = None, device: str = "cpu",
           progress: bool = True, precision: str = "fp32") -> AssignReport:
    """Assign every baxel of every release with a DESOM-1 model; write nodes/node_labels.

    Resumable: cubes already assigned under this model are not re-encoded (their rows are
    read back for the node co-adds), except the newest version of a cube assigned before
    latents were stored (encoded again, once, to store them).

    Returns
    -------
    dict
        ``model_id``, ``n_assigned``, ``n_cubes``, ``seconds``, ``spectra_per_s``.
    """
    import time

    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    model, _ = load_model(arch, model_id, device)
    files = arch.cube_files("spectra")
    bax = pl.from_arrow(arch.read("baxels", columns=["release", "plateifu", "bin_id", "norm_flux"]))
    assert isinstance(bax, pl.DataFrame)
    norms = {(str(k[0]), str(k[1])): g for k, g in bax.group_by("release", "plateifu")}
    n_nodes = model.cfg.n_nodes
    sum_x = np.zeros((n_nodes, spectra.N_REST))
    sum_w = np.zeros((n_nodes, spectra.N_REST))
    counts = np.zeros(n_nodes, dtype=np.int64)
    t0 = time.perf_counter()
    n_encoded = 0
    current = set(versions.latest_cubes(arch).iter_rows())
    with arch.writer("desomdb assign") as writer:
        done = {f.name: f for f in arch.files("assignments", model_id=model_id)}
        by_content: dict[str, Path] = {}  # spectra file name -> an assignment of it
        for name, f in done.items():
            by_content.setdefault(paths.parse_assignment_part_name(name)[1], f)
        pending: list[StagedFile] = []
        for (release, plateifu), f in track(sorted(files.items()), f"assign {model_id}",
                                            unit="cube", enabled=progress):
            name = paths.assignment_part_name(release, f.name)
            latest = (release, plateifu) in current
            if name in done and not latest:
                continue  # an older version: assigned, and not part of the node co-adds
            table = pq.read_table(f)
            g = norms[(release, plateifu)]
            pos = {int(b): i for i, b in enumerate(g["bin_id"])}
            norm = g["norm_flux"].to_numpy()[[pos[int(b)] for b in table.column("bin_id")
                                               .to_numpy()]]
            no_latents = name in done and latest and not _has_latents(done[name])
            if name in done and not no_latents:
                best = pq.read_table(done[name], columns=["node"]).column("node").to_numpy()
                x, w = normalised(table, norm)
            elif f.name in by_content and _has_latents(by_content[f.name]):
                # the same spectra carried over from another release
                rows = pq.read_table(by_content[f.name]).drop_columns(["release"])
                rows = rows.append_column("release", pa.array([release] * rows.num_rows))
                best = rows.column("node").to_numpy()
                x, w = normalised(table, norm)
                pending.append(writer.stage_table(
                    "assignments", rows, paths.model_file("assignments", model_id, name)))
            else:
                rows, best, x, w = assign_table(model, table, norm, device, precision)
                rows = rows.append_column("plateifu", pa.array([plateifu] * rows.num_rows))
                rows = rows.append_column("release", pa.array([release] * rows.num_rows))
                pending.append(writer.stage_table(
                    "assignments", rows, paths.model_file("assignments", model_id, name)))
                n_encoded += rows.num_rows
            if len(pending) >= 32:
                writer.commit(add=pending)
                pending = []
            if latest:
                np.add.at(sum_x, best, x * w)
                np.add.at(sum_w, best, w)
                counts += np.bincount(best, minlength=n_nodes)
        if pending:
            writer.commit(add=pending)
        seconds = time.perf_counter() - t0
        _write_nodes(writer, model, model_id, counts, sum_x, sum_w, device)
        _write_node_labels(writer, arch, model_id)
        index = similar_index.update_baxel_index(arch, model_id, model.cfg.latent)
    return AssignReport(model_id, int(counts.sum()), n_encoded, len(files), seconds,
                        n_encoded / seconds if seconds > 0 else float("nan"), index)


def _has_latents(part: Path) -> bool:
    """Whether an assignment part file stores latents (files from before they were don't)."""
    return similar_index.LATENT in pq.read_schema(part).names


def _write_nodes(writer: Writer, model: Desom, model_id: str, counts: np.ndarray,
                 sum_x: np.ndarray, sum_w: np.ndarray, device: str) -> None:
    cfg = model.cfg
    with torch.no_grad():
        protos = model.prototypes.detach()
        decoded = model.decode(protos.to(device)).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        coadd = np.where(sum_w > 0, sum_x / sum_w, np.nan)
    nodes = np.arange(cfg.n_nodes)
    table = pa.table({
        "node": pa.array(nodes.astype(np.int16)),
        "row": pa.array((nodes // cfg.map_cols).astype(np.int16)),
        "col": pa.array((nodes % cfg.map_cols).astype(np.int16)),
        "n_members": pa.array(counts),
        "prototype": spectra.to_list_column(protos.cpu().numpy()),
        "decoded": spectra.to_list_column(decoded),
        "coadd": spectra.to_list_column(coadd),
    })
    target = paths.model_file("nodes", model_id)
    old = [("nodes", str(f.relative_to(writer.root)))
           for f in writer.archive.files("nodes", model_id=model_id)]
    writer.commit(add=[writer.stage_table("nodes", table, target)],
                  remove=[o for o in old if o[1] != target])


def node_label_table(assignments: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Per node and label: n, median, p16, p84 and a fixed-edge histogram.

    Parameters
    ----------
    assignments : polars.DataFrame
        release, plateifu, bin_id, node.
    labels : polars.DataFrame
        The labels table (status, chi2_ok, ssfr_ok, bpt_ok and the label columns).
    """
    joined = assignments.join(labels.filter((pl.col("status") == "ok") & pl.col("chi2_ok")),
                              on=["release", "plateifu", "bin_id"])
    out = []
    for label, (lo, hi, nbins) in LABEL_EDGES.items():
        sel = joined
        if label in LABEL_CUTS:
            sel = sel.filter(pl.col(LABEL_CUTS[label]))
        sel = sel.filter(pl.col(label).is_not_nan() & pl.col(label).is_not_null())
        edges = np.linspace(lo, hi, nbins + 1)
        for (node,), g in sel.group_by("node"):
            v = g[label].to_numpy()
            hist = np.histogram(np.clip(v, lo, hi), bins=edges)[0]
            out.append({"node": node, "label": label, "n": int(v.size),
                        "median": float(np.median(v)), "p16": float(np.percentile(v, 16)),
                        "p84": float(np.percentile(v, 84)), "mean": float(np.mean(v)),
                        "hist_lo": lo, "hist_hi": hi, "histogram": hist.tolist()})
    schema: dict[str, Any] = {
        "node": pl.Int32, "label": pl.Utf8, "n": pl.Int64, "median": pl.Float64,
        "p16": pl.Float64, "p84": pl.Float64, "mean": pl.Float64, "hist_lo": pl.Float64,
        "hist_hi": pl.Float64, "histogram": pl.List(pl.Int64),
    }
    return pl.DataFrame(out, schema=schema).sort("label", "node")


def _write_node_labels(writer: Writer, arch: Archive, model_id: str) -> None:
    if not arch.has_table("labels"):
        return
    a = pl.from_arrow(arch.read("assignments", columns=["release", "plateifu", "bin_id", "node"],
                                model_id=model_id))
    lab = pl.from_arrow(arch.read("labels"))
    assert isinstance(a, pl.DataFrame) and isinstance(lab, pl.DataFrame)
    a = versions.keep_latest(arch, a.drop("model_id", strict=False))
    table = node_label_table(a, lab)
    target = paths.model_file("node_labels", model_id)
    writer.commit(add=[writer.stage_table("node_labels", table.to_arrow(), target)])
