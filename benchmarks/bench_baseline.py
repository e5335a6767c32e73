"""An honest baseline for DESOM-1: PCA-k (+ a batch SOM on the PCA coefficients) and k-NN.

Run: python benchmarks/bench_baseline.py [--archive desomdb-demo/archive] [--model ID]
       [--components 256] [--epochs 10] [--neighbours 10] [--quick]

On the galaxies the model held out (its ``splits``), compares

- reconstruction: masked MSE of DESOM-1 vs PCA-k fitted on (up to 20,000) training spectra;
- the map: QE, TE4, TE8 of DESOM-1's map (latent space) and of a map of the same size fitted
  to the PCA coefficients by XPySom (batch SOM, σ size/2 → 1; desomdb's ``fit_som`` when
  XPySom is not installed) — QE is in each method's own space and not comparable across;
- map smoothness per label: mean |Δ node median| over 4-neighbour node pairs, over the same
  for a random permutation of the node medians (mean of 200); < 1 = smoother than chance;
- label prediction for held-out baxels: the node median (of the training baxels on the
  node) for each map, and the median of the k nearest labelled training baxels in PCA
  space, against the pPXF label and, on a mock, against the truth (``truth`` table);
  robust scatter 1.4826 × MAD of the difference. "pPXF" is the fits' own scatter against
  the truth, the bar a predictor from spectra alone is measured against.

Labels: log10 mass-weighted age [dex], [M/H] [dex], log M*/L_r [dex], E(B−V)_* [mag] of
the ``labels`` table (only the baxels pPXF fitted count: on an archive labelled with
``--label-max-per-cube N``, a fixed evenly spaced sample per cube). One thread
(``torch.set_num_threads(1)``); ``--quick`` uses at most 8 components and 3 epochs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from desomdb.archive.store import Archive
from desomdb.pipeline import training_set
from desomdb.query import views
from desomdb.som import inference, lattice, model, registry

LABELS = {"log age [dex]": "log10(age_mw_gyr)", "[M/H] [dex]": "mh_mw",
          "log M*/L_r [dex]": "log_ml_r", "E(B-V)_* [mag]": "ebv_star"}
N_FIT = 20000


@dataclass
class MapResult:
    """A method's map: best and runner-up node of train and test rows, and QE/TE on test."""

    name: str
    train_nodes: np.ndarray
    test_nodes: np.ndarray
    qe: float
    te4: float
    te8: float


def robust_scatter(d: np.ndarray) -> float:
    """1.4826 × median absolute deviation of the finite values of ``d`` (nan if none)."""
    d = d[np.isfinite(d)]
    return float(1.4826 * np.median(np.abs(d - np.median(d)))) if d.size else float("nan")


def nodes_of(z: np.ndarray, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best node, runner-up and squared distance to the best for rows of ``z``."""
    d2 = torch.cdist(torch.from_numpy(z).double(), torch.from_numpy(protos).double()).pow(2)
    best, second = lattice.bmu_and_runner_up(d2.numpy())
    return best, second, d2.numpy()[np.arange(len(best)), best]


def pca(x_fit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (n_bins,) and top-``k`` principal axes (n_bins, k) of ``x_fit``."""
    mean = x_fit.mean(axis=0)
    k = min(k, x_fit.shape[0] - 1, x_fit.shape[1])
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(torch.from_numpy(x_fit - mean), q=k, center=False, niter=4)
    return mean, v[:, :k].numpy()


def som_on(c_train: np.ndarray, rows: int, cols: int, epochs: int) -> tuple[str, np.ndarray]:
    """Prototypes (rows*cols, k) of a batch SOM on PCA coefficients: XPySom or fit_som."""
    try:
        from xpysom import XPySom
    except ImportError:
        t_max = max(rows, cols) / 2 / np.sqrt(2)
        protos = lattice.fit_som(torch.from_numpy(c_train.astype(np.float32)), rows, cols,
                               epochs, t_max, 1 / np.sqrt(2))
        return "PCA + desomdb fit_som", protos.numpy()
    xs = XPySom(rows, cols, c_train.shape[1], sigma=max(rows, cols) / 2, sigmaN=1,
                learning_rate=0.5, random_seed=0)
    xs.random_weights_init(c_train.astype(np.float32))
    xs.train(c_train.astype(np.float32), epochs)
    return "PCA + XPySom", np.asarray(xs.get_weights()).reshape(rows * cols, -1)


def map_result(name: str, z_train: np.ndarray, z_test: np.ndarray, protos: np.ndarray,
               cols: int) -> MapResult:
    """Nodes of train and test rows and the test QE/TE of one map."""
    train_best, _, _ = nodes_of(z_train, protos)
    best, second, d2 = nodes_of(z_test, protos)
    return MapResult(name, train_best, best, lattice.quantization_error(d2),
                     lattice.topographic_error(best, second, cols, 4),
                     lattice.topographic_error(best, second, cols, 8))


def node_medians(nodes: np.ndarray, values: np.ndarray, n_nodes: int) -> np.ndarray:
    """Median of the finite ``values`` per node (n_nodes,), nan for an empty node."""
    out = np.full(n_nodes, np.nan)
    ok = np.isfinite(values)
    for k in np.unique(nodes[ok]):
        out[k] = np.median(values[ok & (nodes == k)])
    return out


def smoothness(medians: np.ndarray, rows: int, cols: int, rng: np.random.Generator,
               n_perm: int = 200) -> float:
    """Mean |Δ median| over 4-neighbour node pairs / the same for permuted medians."""
    grid = medians.reshape(rows, cols)

    def mean_step(g: np.ndarray) -> float:
        d = np.concatenate([np.abs(np.diff(g, axis=0)).ravel(), np.abs(np.diff(g, axis=1)).ravel()])
        d = d[np.isfinite(d)]
        return float(d.mean()) if d.size else float("nan")

    filled = np.isfinite(medians)
    perms = []
    for _ in range(n_perm):
        shuffled = medians.copy()
        shuffled[filled] = rng.permutation(medians[filled])
        perms.append(mean_step(shuffled.reshape(rows, cols)))
    finite = [p for p in perms if np.isfinite(p)]
    chance = float(np.mean(finite)) if finite else float("nan")
    return mean_step(grid) / chance if chance > 0 else float("nan")


def labelled(arch: Archive, rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with the four pPXF labels and, on a mock, their true values (``true_*``)."""
    con = views.connect(arch.root)
    exprs = ", ".join(f"{sql} as \"{name}\"" for name, sql in LABELS.items())
    lab = con.sql(f"select release, plateifu, bin_id, {exprs} from labels").pl()
    out = rows.join(lab, on=["release", "plateifu", "bin_id"], how="left")
    has_truth = "truth" in arch.manifest()["tables"]
    if has_truth:
        texprs = ", ".join(f"{sql} as \"true {name}\"" for name, sql in LABELS.items())
        truth = con.sql(f"select release, plateifu, bin_id, {texprs} from truth").pl()
        out = out.join(truth, on=["release", "plateifu", "bin_id"], how="left")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--model", help="DESOM-1 model id (default: the current model)")
    parser.add_argument("--components", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k_pca, epochs = ((min(args.components, 8), min(args.epochs, 3)) if args.quick
                     else (args.components, args.epochs))
    arch = Archive(args.archive)
    model_id = registry.resolve_model(arch, args.model)
    m, _ = registry.load_model(arch, model_id)
    cfg = m.cfg
    splits = pl.from_arrow(arch.read("splits", model_id=model_id))
    assert isinstance(splits, pl.DataFrame)
    rows = training_set.select_training(arch, "true", cfg.seed).rows.drop("split").join(
        splits, on="mangaid")
    tr = rows.filter(pl.col("split") == "train")
    te = rows.filter(pl.col("split") == "test")
    tr_fit = tr.sample(min(N_FIT, tr.height), seed=0)
    x_tr, _ = training_set.load_rows(arch, tr_fit)
    x_te, w_te = training_set.load_rows(arch, te)
    print(f"model {model_id} ({cfg.name}, {cfg.map_rows}x{cfg.map_cols}); {tr_fit.height} "
          f"train / {te.height} held-out spectra of {splits.height} galaxies; PCA-{k_pca}; "
          f"{epochs} SOM epochs")

    # Reconstruction.
    mean, axes = pca(x_tr, k_pca)
    c_tr, c_te = (x_tr - mean) @ axes, (x_te - mean) @ axes
    xt, wt = torch.from_numpy(x_te), torch.from_numpy(w_te)
    pca_mse = float(model.masked_mse(xt, torch.from_numpy(c_te @ axes.T + mean), wt))
    z_tr = inference.encode_all(m, x_tr)
    z_te = inference.encode_all(m, x_te)
    with torch.no_grad():
        desom_mse = float(model.masked_mse(xt, m.decode(torch.from_numpy(z_te)), wt))
    mean_mse = float(model.masked_mse(xt, torch.from_numpy(mean).expand(len(x_te), -1), wt))
    print(f"held-out masked MSE: DESOM-1 {desom_mse:.5f}, PCA-{axes.shape[1]} {pca_mse:.5f} "
          f"(DESOM/PCA {desom_mse / pca_mse:.2f}), training-mean spectrum {mean_mse:.5f}")

    # Maps.
    som_name, pca_protos = som_on(c_tr, cfg.map_rows, cfg.map_cols, epochs)
    maps = [map_result("DESOM-1", z_tr, z_te, m.prototypes.detach().numpy(), cfg.map_cols),
            map_result(som_name, c_tr, c_te, pca_protos, cfg.map_cols)]
    print(f"{'map (held-out)':<24}{'QE':>9}{'TE4':>8}{'TE8':>8}   (QE in each method's space)")
    for r in maps:
        print(f"{r.name:<24}{r.qe:>9.3f}{r.te4:>8.3f}{r.te8:>8.3f}")

    # Labels: node medians, smoothness, prediction; k-NN in PCA space.
    lt, le = labelled(arch, tr_fit), labelled(arch, te)
    has_truth = any(c.startswith("true ") for c in le.columns)
    rng = np.random.default_rng(0)
    n_nodes = cfg.n_nodes
    results: dict[str, dict[str, float]] = {}
    knn_idx = None
    for name in LABELS:
        y_tr = lt[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        y_te = le[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        truth = (le[f"true {name}"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                 if has_truth else np.full(len(y_te), np.nan))
        ok_tr = np.isfinite(y_tr)
        if knn_idx is None and ok_tr.any():
            d = torch.cdist(torch.from_numpy(c_te).float(), torch.from_numpy(c_tr[ok_tr]).float())
            knn_idx = d.topk(min(args.neighbours, int(ok_tr.sum())), largest=False).indices
        preds: dict[str, np.ndarray] = {}
        for r in maps:
            med = node_medians(r.train_nodes, y_tr, n_nodes)
            results.setdefault(f"smoothness {r.name}", {})[name] = smoothness(
                med, cfg.map_rows, cfg.map_cols, rng)
            preds[f"node median {r.name}"] = med[r.test_nodes]
        if knn_idx is not None:
            preds[f"{args.neighbours}-NN in PCA space"] = np.median(
                y_tr[ok_tr][knn_idx.numpy()], axis=1)
        for pname, p in preds.items():
            results.setdefault(f"{pname} - pPXF", {})[name] = robust_scatter(p - y_te)
            if has_truth:
                results.setdefault(f"{pname} - truth", {})[name] = robust_scatter(p - truth)
        if has_truth:
            results.setdefault("pPXF - truth", {})[name] = robust_scatter(y_te - truth)
        results.setdefault("n held-out labelled", {})[name] = float(np.isfinite(y_te).sum())
    print(f"\n{'robust scatter / smoothness':<44}" + "".join(f"{n:>18}" for n in LABELS))
    for row, vals in results.items():
        print(f"{row:<44}" + "".join(f"{vals.get(n, float('nan')):>18.3f}" for n in LABELS))
    print("\nsummary " + json.dumps({"desom_mse": desom_mse, "pca_mse": pca_mse,
                                     "maps": {r.name: [r.qe, r.te4, r.te8] for r in maps},
                                     "rows": results}, default=float))


if __name__ == "__main__":
    main()
