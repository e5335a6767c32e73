"""The SOM stage alone: desomdb's batch SOM vs XPySom and MiniSom on the same latents.

Run (one thread for every library, as the comparison is per core):
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_som.py [--n 100000]
      [--epochs 10] [--size 15] [--archive ARCHIVE]

Latents: ``--n`` vectors of 256 dimensions of a smooth 3-parameter family plus scatter
(:func:`family_latents`), or with ``--archive`` the archive's spectra encoded by its current
DESOM-1. The same latents, map
(``--size``², Manhattan grid for desomdb) and number of epochs go to

(a) :func:`desomdb.som.lattice.fit_som` — PCA-plane initialisation, one batch update per
    epoch, Euclidean-grid Gaussian neighbourhood, XPySom's own radius schedule
    (:func:`xpysom_temperatures`);
(b) XPySom (batch SOM, numpy backend; σ size/2 → 1, its default exponential decay and
    std_coeff 0.5);
(c) MiniSom (online; its time per presentation is measured on ``--minisom-presentations``
    presentations and scaled to ``epochs × n``, as its cost per presentation is constant).

(a) and (b) run alternately ``--repeats`` times in this process (XPySom with seed 0, 1, ...
as its random start matters; its QE/TE are averaged); the best time of each is kept. QE
(mean Euclidean distance to the BMU) and TE with 4- and 8-neighbour adjacency are computed
by the same functions for all.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from desomdb.som import lattice


def metrics(latents: np.ndarray, protos: np.ndarray, cols: int) -> tuple[float, float, float]:
    """QE, TE4 and TE8 of prototypes (n_nodes, dim) on ``latents`` (n, dim)."""
    z = torch.from_numpy(np.ascontiguousarray(latents, np.float32))
    p = torch.from_numpy(np.ascontiguousarray(protos, np.float32))
    best, second, d2b = [], [], []
    for s in range(0, len(z), 16384):
        d2 = torch.cdist(z[s : s + 16384].double(), p.double()).pow(2).numpy()
        b, c = lattice.bmu_and_runner_up(d2)
        best.append(b)
        second.append(c)
        d2b.append(d2[np.arange(len(b)), b])
    bb, ss = np.concatenate(best), np.concatenate(second)
    return (lattice.quantization_error(np.concatenate(d2b)),
            lattice.topographic_error(bb, ss, cols, 4), lattice.topographic_error(bb, ss, cols, 8))


def family_latents(n: int, dim: int = 256, seed: int = 0) -> np.ndarray:
    """Latents (n, dim) of a smooth 3-parameter family plus isotropic scatter.

    Spectra form a continuous family (age, metallicity, dust), so the stand-in latents are
    u ~ U[0, 1]³ mapped through 64 random sinusoids of u onto 256 dimensions, plus N(0, 0.5²)
    per dimension.
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, size=(n, 3))
    freq = rng.normal(size=(3, 64)) * np.array([[2.0], [1.5], [1.0]])
    phase = rng.uniform(0, 2 * np.pi, 64)
    basis = rng.normal(size=(64, dim))
    return (np.sin(u @ freq + phase) @ basis
            + rng.normal(scale=0.5, size=(n, dim))).astype(np.float32)


def archive_latents(archive: Path) -> np.ndarray:
    """The archive's spectra encoded by its current DESOM-1."""
    from desomdb.archive.store import Archive
    from desomdb.pipeline import training_set
    from desomdb.som import inference, registry

    arch = Archive(archive)
    m1, _ = registry.load_model(arch, registry.resolve_model(arch, None))
    x, _ = training_set.load_rows(arch, training_set.select_training(arch, "true", 0).rows)
    return inference.encode_all(m1, x, "cpu")


def xpysom_temperatures(size: int, epochs: int) -> tuple[float, float]:
    """XPySom's first and last neighbourhood radius as our T (grid units).

    XPySom's Gaussian is exp(-d²/(2 (0.5 σ)²)) = exp(-d²/T²) with T = σ/√2, and its
    exponential decay from σ0 = size/2 towards 1 stops one step short: σ_last =
    σ0 (1/σ0)^((epochs-1)/epochs).
    """
    s0 = size / 2
    return s0 / np.sqrt(2), s0 * (1 / s0) ** ((epochs - 1) / epochs) / np.sqrt(2)


def run_ours(z: np.ndarray, size: int, epochs: int) -> tuple[float, np.ndarray]:
    """Time and prototypes of :func:`desomdb.som.lattice.fit_som`."""
    t0 = time.perf_counter()
    t_max, t_min = xpysom_temperatures(size, epochs)
    protos = lattice.fit_som(torch.from_numpy(z), size, size, epochs, t_max, t_min)
    return time.perf_counter() - t0, protos.numpy()


def run_xpysom(z: np.ndarray, size: int, epochs: int, seed: int = 0
               ) -> tuple[float, np.ndarray]:
    """Time and prototypes of XPySom (numpy backend), random-sample initialisation."""
    from xpysom import XPySom

    xs = XPySom(size, size, z.shape[1], sigma=size / 2, sigmaN=1, learning_rate=0.5,
                random_seed=seed)
    t0 = time.perf_counter()
    xs.random_weights_init(z)
    xs.train(z, epochs)
    return time.perf_counter() - t0, np.asarray(xs.get_weights()).reshape(size * size, -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--minisom-presentations", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    z = archive_latents(args.archive) if args.archive else family_latents(args.n)
    n, dim = z.shape
    size = args.size
    print(f"{n} latent vectors of {dim} dims; {size}x{size} map; {args.epochs} epochs; "
          f"torch threads {torch.get_num_threads()}")
    rows: dict[str, tuple[float, float, float, float]] = {}
    times: dict[str, list[float]] = {"ours": [], "xpysom": []}
    xpy_metrics: list[tuple[float, float, float]] = []
    for rep in range(args.repeats):  # interleaved; XPySom's random start: seed = repeat
        t, p = run_ours(z, size, args.epochs)
        times["ours"].append(t)
        rows["desomdb fit_som (batch)"] = (min(times["ours"]), *metrics(z, p, size))
        try:
            t, p = run_xpysom(z, size, args.epochs, seed=rep)
        except ImportError:
            print("XPySom not installed: pip install xpysom")
            continue
        times["xpysom"].append(t)
        xpy_metrics.append(metrics(z, p, size))
        print(f"XPySom seed {rep}: QE {xpy_metrics[-1][0]:.3f} TE4 {xpy_metrics[-1][1]:.3f} "
              f"TE8 {xpy_metrics[-1][2]:.3f}")
    if xpy_metrics:
        mean = np.mean(np.array(xpy_metrics), axis=0)
        rows[f"XPySom (mean of {len(xpy_metrics)} seeds)"] = (min(times["xpysom"]), *mean)
    try:
        from minisom import MiniSom
    except ImportError:
        print("MiniSom not installed: pip install minisom")
    else:
        ms = MiniSom(size, size, dim, sigma=size / 2, learning_rate=0.5, random_seed=0)
        k = min(args.minisom_presentations, args.epochs * n)
        t0 = time.perf_counter()
        ms.random_weights_init(z)
        ms.train(z, k, random_order=True)
        t_ms = (time.perf_counter() - t0) * (args.epochs * n) / k
        print(f"MiniSom: {k} presentations timed, scaled to {args.epochs * n}: {t_ms:.1f} s")
        rows["MiniSom (online, scaled)"] = (t_ms, float("nan"), float("nan"), float("nan"))
    print(f"{'SOM':<28}{'seconds':>9}{'QE':>9}{'TE4':>8}{'TE8':>8}")
    for name, (t, qe, te4, te8) in rows.items():
        print(f"{name:<28}{t:>9.2f}{qe:>9.3f}{te4:>8.3f}{te8:>8.3f}")
    ours = rows["desomdb fit_som (batch)"]
    for name, row in rows.items():
        if name.startswith("desomdb"):
            continue
        print(f"{name}: time ratio peer/desomdb {row[0] / ours[0]:.2f}"
              + (f"; QE desomdb/peer {ours[1] / row[1]:.3f}; TE4 {ours[2]:.3f} vs {row[2]:.3f};"
                 f" TE8 {ours[3]:.3f} vs {row[3]:.3f}" if np.isfinite(row[1]) else ""))


if __name__ == "__main__":
    main()
