"""The SOM stage alone: this project's batch-SOM step vs MiniSom, XPySom, quicksom.

Run: python benchmarks/bench_som.py [--archive desomdb-demo/archive] [--epochs 10]
Encodes the archive's spectra with its current DESOM-1 (fixed latents), then trains a
15×15 map on them with (a) desomdb.model.som_step (mini-batches of 128, T 15 → 0.7) and
(b) MiniSom (pip install minisom; online updates, sigma 7.5 → ~0, same number of
sample presentations) and (c) XPySom (pip install xpysom; batch SOM, same epochs; numpy
backend on a CPU) and (d) quicksom (pip install quicksom; torch mini-batches of 128, its
own learning-rate/sigma schedule, same epochs). Prints wall time, QE (mean Euclidean
distance to the BMU) and TE with 4- and 8-neighbour adjacency, computed by the same
functions for all.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from desomdb import inference, model, registry, train
from desomdb.archive import Archive


def metrics(latents: np.ndarray, protos: np.ndarray, cols: int) -> tuple[float, float, float]:
    d2 = ((latents[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
    best, second = model.bmu_and_runner_up(d2)
    return (model.quantization_error(d2[np.arange(len(best)), best]),
            model.topographic_error(best, second, cols, 4),
            model.topographic_error(best, second, cols, 8))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=15)
    args = parser.parse_args()
    arch = Archive(args.archive)
    m1, _ = registry.load_model(arch, registry.resolve_model(arch, None))
    rows = train.select_training(arch, "true", 0).rows
    x, _ = train.load_rows(arch, rows)
    z = inference.encode_all(m1, x, "cpu")
    n, dim = z.shape
    size = args.size
    presentations = args.epochs * n
    print(f"{n} latent vectors of {dim} dims; {size}x{size} map; {args.epochs} epochs")

    cfg = model.compact_config(map_rows=size, map_cols=size, latent=dim,
                               decay_iters=max(presentations // 128, 2))
    som = model.Desom(cfg)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model.init_prototypes(som, torch.from_numpy(z), 0)
    it = 0
    zt = torch.from_numpy(z)
    for _ in range(args.epochs):
        order = torch.from_numpy(rng.permutation(n))
        for s in range(0, n, 128):
            model.som_step(som, zt[order[s : s + 128]], model.temperature(it, cfg), cfg.som_lr)
            it += 1
    t_ours = time.perf_counter() - t0
    ours = metrics(z, som.prototypes.numpy(), size)

    try:
        from minisom import MiniSom
    except ImportError:
        print("MiniSom not installed: pip install minisom")
        minisom_row = None
    else:
        ms = MiniSom(size, size, dim, sigma=size / 2, learning_rate=0.5, random_seed=0)
        t0 = time.perf_counter()
        ms.random_weights_init(z)
        ms.train(z, presentations, random_order=True)
        t_ms = time.perf_counter() - t0
        w = ms.get_weights()  # (x, y, dim): node (i, j) -> our node i * size + j
        minisom_row = (t_ms, *metrics(z, w.reshape(size * size, dim), size))

    try:
        from xpysom import XPySom
    except ImportError:
        print("XPySom not installed: pip install xpysom")
        xpy_row = None
    else:  # batch SOM (numpy backend here; CuPy on a GPU), same epochs
        xs = XPySom(size, size, dim, sigma=size / 2, learning_rate=0.5, random_seed=0)
        t0 = time.perf_counter()
        xs.random_weights_init(z)
        xs.train(z, args.epochs)
        t_xs = time.perf_counter() - t0
        wx = np.asarray(xs.get_weights())
        xpy_row = (t_xs, *metrics(z, wx.reshape(size * size, dim), size))

    try:
        import quicksom.som as quicksom_som
    except ImportError:
        print("quicksom not installed: pip install quicksom")
        quick_row = None
    else:  # torch mini-batch SOM (batch 128 as ours), same epochs, its default schedule
        qs = quicksom_som.SOM(size, size, dim, n_epoch=args.epochs, device="cpu")
        t0 = time.perf_counter()
        qs.fit(dataset=torch.from_numpy(z), batch_size=128, n_epoch=args.epochs,
               do_compute_all_dists=False, logfile=None, num_workers=0, print_each=10**9)
        t_qs = time.perf_counter() - t0
        wq = qs.centroids.detach().cpu().numpy().reshape(size * size, dim)
        quick_row = (t_qs, *metrics(z, wq, size))

    print(f"{'SOM':<22}{'seconds':>9}{'QE':>9}{'TE4':>8}{'TE8':>8}")
    print(f"{'desomdb som_step':<22}{t_ours:>9.2f}{ours[0]:>9.3f}{ours[1]:>8.3f}{ours[2]:>8.3f}")
    for name, row in (("MiniSom (online)", minisom_row), ("XPySom (batch)", xpy_row),
                      ("quicksom (torch)", quick_row)):
        if row:
            t, qe, te4, te8 = row
            print(f"{name:<22}{t:>9.2f}{qe:>9.3f}{te4:>8.3f}{te8:>8.3f}")
            print(f"time ratio {name.split()[0]}/desomdb: {t / t_ours:.1f}")


if __name__ == "__main__":
    main()
