"""Galaxy fingerprints on a DESOM-1 map and the DESOM-2 that groups them (paper 4.2-4.3).

- ``counts``: per galaxy (mangaid; repeat cubes summed), the number of its baxels on each
  DESOM-1 node (``row * n_cols + col``), with ``fraction`` = counts / n_baxels.
- ``radius_weighted``: the paper's suggested extension — per node, the sum of the member
  baxels' ``radius_re`` divided by the galaxy's total, so inner and outer populations
  separate.
- DESOM-2 input, as the paper normalises: clip each node at its 99.9th percentile over
  galaxies, scale each node to 0-1 over galaxies, then each fingerprint to 0-1; shaped as
  the DESOM-1 map image. Trained with the same :class:`desomdb.som.model.Desom` and
  :func:`desomdb.pipeline.train.fit` as DESOM-1 (kind ``desom2``), split 80/20 by galaxy.
  ``desom2_distance`` (latent distance to the DESOM-2 node) ranks the ``galaxy_outliers``.
- After every write, the model's galaxy similarity index is rebuilt
  (:func:`desomdb.pipeline.similar_index.update_galaxy_index`; Hellinger distance between
  fractions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.errors import ModelError
from desomdb.pipeline import similar_index
from desomdb.pipeline.train import evaluate, fit, resumed_model_id
from desomdb.pipeline.training_set import BatchStream, galaxy_test_split
from desomdb.query import views
from desomdb.som import registry
from desomdb.som.inference import encode_all, nearest_nodes
from desomdb.som.model import Desom, DesomConfig, desom2_config
from desomdb.som.registry import load_model

TEST_FRACTION = 0.2


def normalisation_stats(counts: np.ndarray,
                        clip_percentile: float = 99.9) -> dict[str, list[float]]:
    """Per-node constants of the paper's normalisation, from the galaxies a DESOM-2 trains on.

    Parameters
    ----------
    counts : ndarray, shape (n_galaxies, n_nodes)

    Returns
    -------
    dict
        ``clip`` (the per-node ``clip_percentile`` over galaxies), ``lo`` and ``hi`` (the
        per-node range after clipping), each a list of n_nodes floats. Stored with the DESOM-2
        so that galaxies added later are normalised exactly like its training galaxies.
    """
    x = counts.astype(np.float64)
    clip = np.percentile(x, clip_percentile, axis=0)
    x = np.minimum(x, clip[None, :])
    return {"clip": clip.tolist(), "lo": x.min(axis=0).tolist(), "hi": x.max(axis=0).tolist()}


def normalise_for_desom2(counts: np.ndarray, stats: dict[str, list[float]] | None = None,
                         clip_percentile: float = 99.9) -> np.ndarray:
    """Normalise as the paper: per-node clip and 0-1 scaling, then per-galaxy 0-1.

    Parameters
    ----------
    counts : ndarray, shape (n_galaxies, n_nodes)
    stats : dict, optional
        Per-node constants from :func:`normalisation_stats` (default: from ``counts``).
        Values of new galaxies outside the stored range are clipped to 0-1.
    clip_percentile : float

    Returns
    -------
    ndarray, shape (n_galaxies, n_nodes), float32, values in [0, 1]
    """
    stats = stats or normalisation_stats(counts, clip_percentile)
    clip, lo, hi = (np.asarray(stats[k]) for k in ("clip", "lo", "hi"))
    x = np.minimum(counts.astype(np.float64), clip[None, :])
    x = np.where(hi > lo, np.clip((x - lo) / np.where(hi > lo, hi - lo, 1), 0, 1), 0.0)
    glo, ghi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    x = np.where(ghi > glo, (x - glo) / np.where(ghi > glo, ghi - glo, 1), 0.0)
    return x.astype(np.float32)


def galaxy_counts(arch: Archive, model_id: str, n_nodes: int
                  ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Count each galaxy's baxels per node under a DESOM-1 model (the galaxy_fingerprint view).

    Each cube is used once, in its newest release (``latest_cubes``); a galaxy's cubes are
    summed.

    Returns
    -------
    galaxies : polars.DataFrame
        mangaid, n_baxels, n_cubes (sorted by mangaid).
    counts : ndarray, shape (n_galaxies, n_nodes), int64
    radius : ndarray, shape (n_galaxies, n_nodes), float64
        Σ radius_re of the galaxy's baxels on each node.
    """
    con = views.connect(arch.root, model=model_id)
    try:
        df = con.sql("select mangaid, node, n_baxels, sum_radius_re, n_cubes "
                     "from galaxy_fingerprint order by mangaid, node").pl()
    finally:
        con.close()
    gal = df.group_by("mangaid").agg(pl.col("n_baxels").sum(), pl.col("n_cubes").first()
                                     ).sort("mangaid")
    index = {m: i for i, m in enumerate(gal["mangaid"])}
    rows = np.array([index[m] for m in df["mangaid"]], dtype=np.int64)
    nodes = df["node"].to_numpy().astype(np.int64)
    counts = np.zeros((gal.height, n_nodes), dtype=np.int64)
    radius = np.zeros((gal.height, n_nodes))
    counts[rows, nodes] = df["n_baxels"].to_numpy()
    radius[rows, nodes] = df["sum_radius_re"].to_numpy()
    return gal.with_columns(pl.col("n_baxels").cast(pl.Int64), pl.col("n_cubes").cast(pl.Int32)
                            ), counts, radius


def _batches(x: np.ndarray, batch: int, rng: np.random.Generator) -> BatchStream:
    """Endless shuffled batches of in-memory fingerprints (weights 1), resumable."""
    w = np.ones_like(x)
    return BatchStream([len(x)], lambda _groups: (x, w), batch, rng, buffer_rows=len(x))


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
    model_id = registry.resolve_model(arch, model_id)
    m1, _ = load_model(arch, model_id, device)
    gal, counts, radius = galaxy_counts(arch, model_id, m1.cfg.n_nodes)
    stats = normalisation_stats(counts)
    x = normalise_for_desom2(counts, stats)
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
    if d2_id in registry.registered_models(arch) and arch.files("fingerprints", model_id=model_id):
        done = arch.read("fingerprints", model_id=model_id)
        stored = done.column("desom2_model_id")[0].as_py()
        if stored == d2_id or registry.resumed_from(arch, stored) == d2_id:
            # idempotent: already built from the same counts and configuration
            if "desom2_distance" not in done.schema.names:  # written before it was stored
                update(arch.root, model_id, device)
            elif not similar_index.is_current(arch, model_id, "galaxies"):
                with arch.writer("desomdb fingerprints (galaxy index)"):
                    similar_index.update_galaxy_index(arch, model_id)
            return str(stored)
    torch.manual_seed(cfg.seed)

    with arch.writer("desomdb fingerprints") as writer:
        m2 = Desom(cfg).to(device)
        state = paths.train_state_path(arch.root, d2_id)
        loop = fit(m2, _batches(train_x, min(cfg.batch_size, len(train_x)),
                                np.random.default_rng(cfg.seed)),
                   eval_x, np.ones_like(eval_x), device, state, desc=f"train {d2_id}",
                   progress=progress)
        metrics: dict[str, Any] = {f"{k}_test": v for k, v in
                                   evaluate(m2, eval_x, np.ones_like(eval_x), device).items()}
        metrics.update(n_galaxies=int(gal.height), n_test=int(test.sum()),
                       train_seconds=loop["seconds"])
        if loop["resumed_at"]:  # its own id, as a resumed DESOM-1 (desomdb.pipeline.train)
            metrics.update(resumed_from=d2_id, resumed_at=list(loop["resumed_at"]))
            d2_id = resumed_model_id(d2_id, loop["resumed_at"])
        fp, _ = _stage_fingerprints(writer, model_id, d2_id, m2, gal, counts, radius, stats,
                                    test, device)
        registry.save_and_register(
            writer, d2_id, m2, cfg,
            {"fingerprints_of": model_id,
             "normalisation": "clip 99.9 pct, node 0-1, galaxy 0-1",
             "test_fraction": TEST_FRACTION, "seed": cfg.seed},
            metrics, {"history": loop["history"], "parent": model_id, "normalisation": stats},
            model_id, also=[fp])
        state.unlink(missing_ok=True)
        similar_index.update_galaxy_index(arch, model_id)
    return d2_id


def _stage_fingerprints(writer: Writer, model_id: str, d2_id: str, m2: Desom,
                        gal: pl.DataFrame, counts: np.ndarray, radius: np.ndarray,
                        stats: dict[str, list[float]], test: np.ndarray,
                        device: str) -> tuple[StagedFile, pa.Table]:
    """Assign galaxies to the DESOM-2; stage (and return) the fingerprints of ``model_id``."""
    x = normalise_for_desom2(counts, stats)
    found = nearest_nodes(m2, encode_all(m2, x, device), device)
    best = found.best
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = counts / counts.sum(axis=1, keepdims=True)
        rad = radius / radius.sum(axis=1, keepdims=True)
    n = counts.shape[1]
    cols = m2.cfg.map_cols
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
        "desom2_row": pa.array((best // cols).astype(np.int16)),
        "desom2_col": pa.array((best % cols).astype(np.int16)),
        "desom2_distance": pa.array(found.distance),
        "split": pa.array(np.where(test, "test", "train")),
    })
    staged = writer.stage_table(
        "fingerprints", table, paths.model_file("fingerprints", model_id))
    return staged, table


@dataclass(frozen=True)
class UpdateReport:
    """Outcome of :func:`update`.

    Attributes
    ----------
    desom2_model_id : str
    n_galaxies : int
    n_new : int
        Galaxies not fingerprinted before.
    n_changed : int
        Earlier galaxies whose counts changed.
    n_moved : int
        Earlier galaxies whose DESOM-2 node changed.
    """

    desom2_model_id: str
    n_galaxies: int
    n_new: int
    n_changed: int
    n_moved: int


@dataclass(frozen=True)
class SeparationReport:
    """How well DESOM-2 nodes group galaxies (see :func:`separation_report`)."""

    sersic_n_spread: float
    ba_spread: float
    type_purity: float | None = None
    type_purity_random: float | None = None


def update(archive: str | Path, model_id: str | None = None, device: str = "cpu"
           ) -> UpdateReport | None:
    """Recompute a DESOM-1 model's fingerprints and assign them to its existing DESOM-2.

    For an archive that gained cubes (``desomdb refresh``): no retraining; new galaxies are
    normalised with the DESOM-2's stored constants and mapped by its encoder, and galaxies
    whose cubes did not change keep identical rows. The DESOM-2 is the one named in the
    model's current fingerprints table.

    Returns
    -------
    UpdateReport or None
        None when the model has no fingerprints yet.

    Raises
    ------
    ModelError
        If the DESOM-2 was saved without its normalisation constants (rebuild it with
        ``desomdb fingerprints``).
    """
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    if not arch.files("fingerprints", model_id=model_id):
        return None
    old = pl.from_arrow(arch.read("fingerprints", columns=["mangaid", "counts", "desom2_model_id",
                                                           "desom2_node", "split"],
                                  model_id=model_id))
    assert isinstance(old, pl.DataFrame)
    d2_id = str(old["desom2_model_id"][0])
    m1, _ = load_model(arch, model_id, device)
    m2, meta = load_model(arch, d2_id, device)
    stats = meta["extra"].get("normalisation")
    if stats is None:
        raise ModelError(f"{d2_id}: saved without its fingerprint normalisation; rebuild it "
                         f"with 'desomdb fingerprints {arch.root}'")
    gal, counts, radius = galaxy_counts(arch, model_id, m1.cfg.n_nodes)
    # Galaxies keep the split the DESOM-2 was trained with; new ones are drawn by the hash.
    test = galaxy_test_split(gal["mangaid"].to_list(), f"d2:{m2.cfg.seed}:", TEST_FRACTION)
    was = dict(zip(old["mangaid"], old["split"], strict=True))
    test = np.array([was[m] == "test" if m in was else t
                     for m, t in zip(gal["mangaid"], test, strict=True)])
    with arch.writer("desomdb fingerprints --update") as writer:
        fp, table = _stage_fingerprints(writer, model_id, d2_id, m2, gal, counts, radius,
                                        stats, test, device)
        writer.commit(add=[fp])
        similar_index.update_galaxy_index(arch, model_id)
    new = pl.from_arrow(table.select(["mangaid", "counts", "desom2_node"]))
    assert isinstance(new, pl.DataFrame)
    both = new.join(old, on="mangaid", how="left", suffix="_old")
    before = both.filter(pl.col("desom2_node_old").is_not_null())
    changed = sum(1 for a, b in zip(before["counts"], before["counts_old"], strict=True)
                  if list(a) != list(b))
    return UpdateReport(d2_id, new.height, new.height - before.height, changed,
                        int((before["desom2_node"] != before["desom2_node_old"]).sum()))


def separation_report(archive: str | Path, model_id: str | None = None) -> SeparationReport:
    """How well DESOM-2 nodes group galaxies by Sersic n, b/a and (mocks) true type.

    Returns
    -------
    SeparationReport
        ``sersic_n_spread`` / ``ba_spread``: median within-node robust spread over the global
        one (< 1 means nodes group similar galaxies); ``type_purity``: mean fraction of a
        node's galaxies sharing its majority true type (mock surveys only), and the same for
        a random assignment with the same node sizes.
    """
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    con = views.connect(arch.root, model=model_id)
    df = con.sql(
        "select f.mangaid, f.desom2_node, any_value(g.nsa_sersic_n) as n, "
        "any_value(g.nsa_elpetro_ba) as ba from fingerprints f "
        "join galaxies g using (mangaid) where f.model_id = current_model() group by all"
    ).pl()
    spread = {}
    for col in ("n", "ba"):
        glob = _mad(df[col].to_numpy())
        within = [_mad(g[col].to_numpy()) for _, g in df.group_by("desom2_node") if g.height > 1]
        spread[col] = float(np.median(within) / glob) if within and glob > 0 else float("nan")
    purity = purity_random = None
    if arch.has_table("truth"):
        t = con.sql("select distinct mangaid, galaxy_type from truth join baxels "
                    "using (release, plateifu, bin_id)").pl()
        j = df.join(t, on="mangaid")
        purity = _purity(j["desom2_node"].to_numpy(), j["galaxy_type"].to_numpy())
        rng = np.random.default_rng(0)
        purity_random = float(np.mean([
            _purity(rng.permutation(j["desom2_node"].to_numpy()), j["galaxy_type"].to_numpy())
            for _ in range(200)]))
    return SeparationReport(spread["n"], spread["ba"], purity, purity_random)


def _mad(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else float("nan")


def _purity(nodes: np.ndarray, types: np.ndarray) -> float:
    total = 0
    for node in np.unique(nodes):
        _, c = np.unique(types[nodes == node], return_counts=True)
        total += c.max()
    return float(total / len(nodes))
