"""DESOM-1 on the CPU: the authors' network (``paper``) vs the ``compact`` default.

Run: python benchmarks/bench_desom.py [--archive desomdb-demo/archive]
Prints (1) encode and train-step throughput of both presets (batch 128, this machine's
threads), (2) held-out reconstruction MSE of each after the same short training budget
against PCA with 256 components fitted on the same training spectra, (3) assignment
throughput including Parquet reads, and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import polars as pl
import torch
from bench_gpu import throughput  # the one throughput measurement (sibling script)

from desomdb.archive.store import Archive
from desomdb.pipeline import assign, train, training_set
from desomdb.som import model, registry


def held_out(arch: Archive, preset: str, iterations: int, batch: int) -> dict[str, float]:
    cfg = model.CONFIGS[preset](iterations=iterations, decay_iters=int(iterations * 0.8),
                                pretrain_iters=iterations // 4, batch_size=batch,
                                map_rows=8, map_cols=8, eval_every=max(iterations // 4, 1),
                                patience=100)
    sel = training_set.select_training(arch, "trainable", 0)
    tr = sel.rows.filter(pl.col("split") == "train")
    te = sel.rows.filter(pl.col("split") == "test")
    x_te, w_te = training_set.load_rows(arch, te)
    x_tr, _ = training_set.load_rows(arch, tr)
    torch.manual_seed(0)
    m = model.Desom(cfg)
    state = Path(f"/tmp/bench_desom_{preset}.pt")
    state.unlink(missing_ok=True)
    loop = train.fit(m, training_set.stream_batches(arch, tr, batch, np.random.default_rng(0)),
                     x_te, w_te, "cpu", state, desc=preset)
    state.unlink(missing_ok=True)
    ev = train.evaluate(m, x_te, w_te, "cpu")
    pca = train.pca_baseline(x_tr, x_te, w_te)
    return {"mse": ev["recon_mse"], "pca": pca, "seconds": loop["seconds"],
            "n_train": len(x_tr), "n_test": len(x_te)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--compact-iterations", type=int, default=800)
    parser.add_argument("--paper-iterations", type=int, default=120)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    rates = {p: tuple(throughput(p, "cpu", "fp32", 3).values())
             for p in ("compact", "paper")}
    for p, (enc, tr) in rates.items():
        print(f"{p:<8} encode {enc:8.0f} spectra/s   train {tr:6.0f} spectra/s")
    print(f"compact/paper: encode {rates['compact'][0] / rates['paper'][0]:.1f}x, "
          f"train {rates['compact'][1] / rates['paper'][1]:.1f}x")
    arch = Archive(args.archive)
    for preset, its, batch in (("compact", args.compact_iterations, 64),
                               ("paper", args.paper_iterations, 32)):
        r = held_out(arch, preset, its, batch)
        print(f"{preset:<8} {its} iterations x {batch} ({r['seconds']:.0f} s): held-out MSE "
              f"{r['mse']:.4f} vs PCA-256 {r['pca']:.4f} (AE/PCA {r['mse'] / r['pca']:.2f}); "
              f"{r['n_train']} train / {r['n_test']} test spectra")
    mid = registry.current_model(arch)
    if mid:
        out = assign.assign(arch.root, mid, progress=False)
        print(f"assignment (re-reading existing rows, encoding new): {out}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
