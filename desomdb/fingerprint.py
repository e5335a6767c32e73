"""Galaxy fingerprints on a DESOM-1 map and the DESOM-2 that groups them (paper 4.2-4.3).

- ``counts``: per galaxy (mangaid; repeat cubes summed), the number of its baxels on each
  DESOM-1 node (``row * n_cols + col``), with ``fraction`` = counts / n_baxels.
- ``radius_weighted``: the paper's suggested extension — per node, the sum of the member
  baxels' ``radius_re`` divided by the galaxy's total, so inner and outer populations
  separate.
- DESOM-2 input, as the paper normalises: clip each node at its 99.9th percentile over
  galaxies, scale each node to 0-1 over galaxies, then each fingerprint to 0-1; shaped as
  the DESOM-1 map image. Trained with the same :class:`desomdb.model.Desom` and
  :func:`desomdb.train.fit` as DESOM-1 (kind ``desom2``), split 80/20 by galaxy.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from desomdb import paths, views
from desomdb.archive import Archive
from desomdb.model import DesomConfig, bmu_and_runner_up, desom2_config
from desomdb.train import encode_all, evaluate, fit, galaxy_test_split, load_model

TEST_FRACTION = 0.2


def fingerprint_matrix(assignments: pl.DataFrame, baxels: pl.DataFrame,
                       n_nodes: int) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Count each galaxy's baxels per node.

    Parameters
    ----------
    assignments : polars.DataFrame
        release, plateifu, bin_id, node.
    baxels : polars.DataFrame
        release, plateifu, bin_id, mangaid, radius_re.
    n_nodes : int

    Returns
    -------
    galaxies : polars.DataFrame
        mangaid, n_baxels, n_cubes (sorted by mangaid).
    counts : ndarray, shape (n_galaxies, n_nodes), int64
    radius : ndarray, shape (n_galaxies, n_nodes), float64
        Σ radius_re of the galaxy's baxels on each node.
    """
    joined = assignments.join(baxels, on=["release", "plateifu", "bin_id"])
    gal = joined.group_by("mangaid").agg(
        pl.len().alias("n_baxels"), pl.col("plateifu").n_unique().alias("n_cubes")
    ).sort("mangaid")
    index = {m: i for i, m in enumerate(gal["mangaid"])}
    rows = np.array([index[m] for m in joined["mangaid"]])
    nodes = joined["node"].to_numpy().astype(int)
    counts = np.zeros((gal.height, n_nodes), dtype=np.int64)
    radius = np.zeros((gal.height, n_nodes))
    np.add.at(counts, (rows, nodes), 1)
    np.add.at(radius, (rows, nodes), np.nan_to_num(joined["radius_re"].to_numpy()))
    return gal, counts, radius


def normalise_for_desom2(counts: np.ndarray, clip_percentile: float = 99.9) -> np.ndarray:
    """Normalise as the paper: per-node clip and 0-1 scaling, then per-galaxy 0-1.

    Parameters
    ----------
    counts : ndarray, shape (n_galaxies, n_nodes)

    Returns
    -------
    ndarray, shape (n_galaxies, n_nodes), float32, values in [0, 1]
    """
    x = counts.astype(np.float64)
    x = np.minimum(x, np.percentile(x, clip_percentile, axis=0)[None, :])
    lo, hi = x.min(axis=0), x.max(axis=0)
    x = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    glo, ghi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    x = np.where(ghi > glo, (x - glo) / np.where(ghi > glo, ghi - glo, 1), 0.0)
    return x.astype(np.float32)


def _batches(x: np.ndarray, batch: int, rng: np.random.Generator
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    w = np.ones_like(x)
    while True:
        perm = rng.permutation(len(x))
        for s in range(0, max(len(x) - batch, 0) + 1, batch):
            sel = perm[s : s + batch]
            yield x[sel], w[sel]


def build(archive: str | Path, model_id: str | None = None, cfg: DesomConfig | None = None,
          device: str = "cpu", progress: bool = True) -> str:
    """Write the fingerprints of a DESOM-1 model and train/assign its DESOM-2.

    Parameters
    ----------
    archive : str or Path
    model_id : str, optional
        DESOM-1 model (default: current).
    cfg : DesomConfig, optional
        DESOM-2 configuration (default :func:`desom2_config`; its map is shrunk for
        archives with few galaxies so that nodes stay populated).
    device : str
    progress : bool

    Returns
    -------
    str
        The DESOM-2 model id.
    """
    arch = Archive(archive)
    model_id = views.resolve_model(arch, model_id)
    m1, _ = load_model(arch, model_id, device)
    a = pl.from_arrow(arch.read("assignments", columns=["release", "plateifu", "bin_id", "node"],
                                model_id=model_id))
    b = pl.from_arrow(arch.read("baxels", columns=["release", "plateifu", "bin_id", "mangaid",
                                                   "radius_re"]))
    assert isinstance(a, pl.DataFrame) and isinstance(b, pl.DataFrame)
    gal, counts, radius = fingerprint_matrix(a.drop("model_id", strict=False), b,
                                             m1.cfg.n_nodes)
    x = normalise_for_desom2(counts)
    side = int(np.clip(np.sqrt(gal.height / 4), 2, 10))
    cfg = cfg or desom2_config(map_rows=side, map_cols=side)
    cfg = DesomConfig.from_dict({**cfg.to_dict(),
                                 "input_shape": (m1.cfg.map_rows, m1.cfg.map_cols)})
    test = galaxy_test_split(gal["mangaid"].to_list(), f"d2:{cfg.seed}:", TEST_FRACTION)
    train_x = x[~test] if (~test).sum() >= 2 else x
    eval_x = x[test] if test.any() else x
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()
                            + model_id.encode() + counts.tobytes()).hexdigest()[:10]
    d2_id = f"desom2-{digest}"
    torch.manual_seed(cfg.seed)
    from desomdb import checkpoint
    from desomdb.model import Desom

    with arch.writer("desomdb fingerprints") as writer:
        m2 = Desom(cfg).to(device)
        state = paths.artefact_dir(arch.root, d2_id) / "train_state.pt"
        loop = fit(m2, _batches(train_x, min(cfg.batch_size, len(train_x)),
                                np.random.default_rng(cfg.seed)),
                   eval_x, np.ones_like(eval_x), device, state, desc=f"train {d2_id}",
                   progress=progress)
        metrics: dict[str, Any] = {f"{k}_test": v for k, v in
                                   evaluate(m2, eval_x, np.ones_like(eval_x), device).items()}
        metrics.update(n_galaxies=int(gal.height), n_test=int(test.sum()),
                       train_seconds=loop["seconds"])
        z = encode_all(m2, x, device)
        with torch.no_grad():
            d2 = m2.sq_distances(torch.from_numpy(z).to(device)).cpu().numpy()
        best, _ = bmu_and_runner_up(d2)
        artefact, sha = checkpoint.save(m2, paths.artefact_dir(arch.root, d2_id), d2_id,
                                        metrics, {"history": loop["history"], "parent": model_id})
        state.unlink(missing_ok=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = counts / counts.sum(axis=1, keepdims=True)
            rad = radius / radius.sum(axis=1, keepdims=True)
        n = m1.cfg.n_nodes
        table = pa.table({
            "mangaid": pa.array(gal["mangaid"].to_list()),
            "n_baxels": pa.array(gal["n_baxels"].to_numpy().astype(np.int64)),
            "n_cubes": pa.array(gal["n_cubes"].to_numpy().astype(np.int32)),
            "counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel()), n),
            "fraction": pa.FixedSizeListArray.from_arrays(
                pa.array(np.nan_to_num(frac).ravel().astype(np.float32)), n),
            "radius_weighted": pa.FixedSizeListArray.from_arrays(
                pa.array(np.nan_to_num(rad).ravel().astype(np.float32)), n),
            "desom2_model_id": pa.array([d2_id] * gal.height),
            "desom2_node": pa.array(best.astype(np.int16)),
            "desom2_row": pa.array((best // cfg.map_cols).astype(np.int16)),
            "desom2_col": pa.array((best % cfg.map_cols).astype(np.int16)),
            "split": pa.array(np.where(test, "test", "train")),
        })
        fp = writer.stage_table("fingerprints", table,
                                f"{paths.model_dir('fingerprints', model_id)}/fingerprints.parquet")
        row = {"kind": "desom2", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "config": json.dumps(cfg.to_dict(), sort_keys=True),
               "data_spec": json.dumps({"fingerprints_of": model_id,
                                        "normalisation": "clip 99.9 pct, node 0-1, galaxy 0-1",
                                        "test_fraction": TEST_FRACTION, "seed": cfg.seed}),
               "metrics": json.dumps(metrics, sort_keys=True),
               "recon_mse": metrics["recon_mse_test"], "pca_mse": None,
               "qe": metrics["qe_test"], "te4": metrics["te4_test"], "te8": metrics["te8_test"],
               "parent_model_id": model_id,
               "artefact_path": str(artefact.relative_to(arch.root)), "artefact_sha256": sha,
               "seed": cfg.seed}
        reg = writer.stage_table("models", pa.Table.from_pylist([row]),
                                 f"{paths.model_dir('models', d2_id)}/model.parquet")
        writer.commit(add=[fp, reg])
    return d2_id


def separation_report(archive: str | Path, model_id: str | None = None) -> dict[str, Any]:
    """How well DESOM-2 nodes group galaxies by Sersic n, b/a and (mocks) true type.

    Returns
    -------
    dict
        ``sersic_n_spread`` / ``ba_spread``: median within-node robust spread over the global
        one (< 1 means nodes group similar galaxies); ``type_purity``: mean fraction of a
        node's galaxies sharing its majority true type (mock surveys only), and the same for
        a random assignment with the same node sizes.
    """
    arch = Archive(archive)
    model_id = views.resolve_model(arch, model_id)
    con = views.connect(arch.root, model=model_id)
    df = con.sql(
        "select f.mangaid, f.desom2_node, any_value(g.nsa_sersic_n) as n, "
        "any_value(g.nsa_elpetro_ba) as ba from fingerprints f "
        "join galaxies g using (mangaid) where f.model_id = current_model() group by all"
    ).pl()
    out: dict[str, Any] = {}
    for col, key in (("n", "sersic_n_spread"), ("ba", "ba_spread")):
        glob = _mad(df[col].to_numpy())
        within = [_mad(g[col].to_numpy()) for _, g in df.group_by("desom2_node") if g.height > 1]
        out[key] = float(np.median(within) / glob) if within and glob > 0 else float("nan")
    if arch.has_table("truth"):
        t = con.sql("select distinct mangaid, galaxy_type from truth join baxels "
                    "using (release, plateifu, bin_id)").pl()
        j = df.join(t, on="mangaid")
        out["type_purity"] = _purity(j["desom2_node"].to_numpy(), j["galaxy_type"].to_numpy())
        rng = np.random.default_rng(0)
        out["type_purity_random"] = float(np.mean([
            _purity(rng.permutation(j["desom2_node"].to_numpy()), j["galaxy_type"].to_numpy())
            for _ in range(200)]))
    return out


def _mad(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else float("nan")


def _purity(nodes: np.ndarray, types: np.ndarray) -> float:
    total = 0
    for node in np.unique(nodes):
        _, c = np.unique(types[nodes == node], return_counts=True)
        total += c.max()
    return float(total / len(nodes))
