"""The SOM layer's maths on its map lattice: distances, neighbourhoods, batch SOM, quality.

Pure tensor and array functions, shared by the network (:mod:`desomdb.som.model`), training
and evaluation: Manhattan grid distances on the rows x cols lattice, the Gaussian
neighbourhood at temperature T, best-matching nodes, batch-SOM epochs and PCA initialisation,
and the quantization and topographic errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from desomdb.errors import ConfigError

if TYPE_CHECKING:  # the schedule reads a config; the network module imports this one
    from desomdb.som.model import DesomConfig


def grid_distance(rows: int, cols: int, metric: str = "manhattan") -> torch.Tensor:
    """Distances between all pairs of nodes on the map grid.

    Parameters
    ----------
    rows, cols : int
    metric : {"manhattan", "chebyshev", "euclidean"}

    Returns
    -------
    torch.Tensor, shape (rows*cols, rows*cols), float32
    """
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    dr = (r[:, None] - r[None, :]).abs().float()
    dc = (c[:, None] - c[None, :]).abs().float()
    if metric == "manhattan":
        return dr + dc
    if metric == "chebyshev":
        return torch.maximum(dr, dc)
    if metric == "euclidean":
        return torch.sqrt(dr**2 + dc**2)
    raise ConfigError(f"unknown grid metric {metric!r}")


def temperature(it: int, cfg: DesomConfig) -> float:
    """Neighbourhood radius T at SOM iteration ``it`` (exponential decay, then flat)."""
    if it >= cfg.decay_iters - 1 or cfg.decay_iters <= 1:
        return cfg.t_min
    return cfg.t_max * (cfg.t_min / cfg.t_max) ** (it / (cfg.decay_iters - 1))


def neighbourhood(grid_dist: torch.Tensor, temp: float) -> torch.Tensor:
    """Neighbourhood weights h_kl = exp(-d(k, l)² / T²) of a grid-distance matrix."""
    return torch.exp(-grid_dist.pow(2) / temp**2)


@torch.no_grad()
def best_nodes(z: torch.Tensor, prototypes: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Best-matching node (n,) of each latent in ``z`` (n, latent), in chunks of rows.

    Uses argmin_k (||m_k||² − 2 z·m_k), one matrix product per chunk.
    """
    m_sq = prototypes.pow(2).sum(dim=1)
    out = [torch.addmm(m_sq, z[s : s + chunk], prototypes.T, alpha=-2.0).argmin(dim=1)
           for s in range(0, z.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)


@torch.no_grad()
def batch_som_epoch(prototypes: torch.Tensor, z: torch.Tensor, grid_dist: torch.Tensor,
                    temp: float, chunk: int = 16384) -> None:
    """One batch-SOM epoch (Kohonen's batch map), updating ``prototypes`` in place.

    m_k ← Σ_j h_kj S_j / Σ_j h_kj N_j, where S_j and N_j are the sum and the number of the
    latents whose BMU is node j and h = :func:`neighbourhood`. A node with no weight at all
    keeps its prototype.

    Parameters
    ----------
    prototypes : torch.Tensor, shape (n_nodes, latent)
    z : torch.Tensor, shape (n, latent)
    grid_dist : torch.Tensor, shape (n_nodes, n_nodes)
    temp : float
        Neighbourhood radius T (grid units).
    chunk : int
        Rows per distance computation (bounds memory to chunk × n_nodes).
    """
    bmu = best_nodes(z, prototypes, chunk)
    sums = torch.zeros_like(prototypes).index_add_(0, bmu, z)
    counts = torch.zeros(prototypes.shape[0], dtype=z.dtype, device=z.device)
    counts.index_add_(0, bmu, torch.ones_like(bmu, dtype=z.dtype))
    h = neighbourhood(grid_dist, temp)
    num = h @ sums
    den = h @ counts
    ok = den > 1e-12 * max(float(counts.sum()), 1.0)
    prototypes[ok] = num[ok] / den[ok, None]


@torch.no_grad()
def pca_prototypes(z: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Prototypes on the plane of the two leading principal components of ``z``.

    Node (r, c) sits at mean + a_r √λ1 v1 + b_c √λ2 v2 with a, b evenly spaced in [-2, 2]
    (the linear initialisation of Kohonen's SOM; ordered from the start); v1 runs along
    the longer side of the map.

    Returns
    -------
    torch.Tensor, shape (rows*cols, latent)
    """
    mean = z.mean(dim=0)
    zc = z - mean
    _, s, v = torch.linalg.svd(zc[: min(len(zc), 50000)], full_matrices=False)
    n = max(min(len(zc), 50000) - 1, 1)
    sd = s[:2] / n**0.5
    a = torch.linspace(-2, 2, rows, dtype=z.dtype, device=z.device) if rows > 1 \
        else torch.zeros(1, dtype=z.dtype, device=z.device)
    b = torch.linspace(-2, 2, cols, dtype=z.dtype, device=z.device) if cols > 1 \
        else torch.zeros(1, dtype=z.dtype, device=z.device)
    v1, s1 = v[0] * sd[0], (v[1] * sd[1] if v.shape[0] > 1 else torch.zeros_like(v[0]))
    if cols > rows:  # the first component along the longer side of the map
        v1, s1 = s1, v1
    grid = a[:, None, None] * v1 + b[None, :, None] * s1
    return (mean + grid).reshape(rows * cols, -1)


#: Fraction of a batch SOM's epochs spent fine-tuning at the final radius (:func:`fit_som`).
FINE_TUNE = 0.3


@torch.no_grad()
def fit_som(z: torch.Tensor, rows: int, cols: int, epochs: int, t_max: float, t_min: float,
            prototypes: torch.Tensor | None = None, init: str = "pca", seed: int = 0,
            metric: str = "euclidean", chunk: int = 16384,
            fine_tune: float = FINE_TUNE) -> torch.Tensor:
    """Fit a SOM to fixed latents with the batch-SOM update.

    Two phases, as the SOM Toolbox trains a batch map: an ordering phase in which T decays
    exponentially from ``t_max`` to ``t_min``, then a fine-tuning phase of
    ``round(fine_tune × epochs)`` epochs at ``t_min``, which lets the prototypes converge to
    their nodes' members. On 100 k latents (15×15 map, 10 epochs, XPySom's radii;
    ``benchmarks/bench_som.py``) 7 + 3 epochs gave QE 14.24 and TE4 0.137 where 10 ordering
    epochs gave 14.56 and 0.114, against XPySom's 14.14 and 0.185 (mean of 3 seeds).

    Parameters
    ----------
    z : torch.Tensor, shape (n, latent)
    rows, cols : int
        Map shape; nodes ``row * cols + col``.
    epochs : int
        Batch updates in all (ordering and fine-tuning).
    t_max, t_min : float
        Neighbourhood radius (grid units) of :func:`neighbourhood`: the first epoch's and
        the fine-tuning phase's.
    prototypes : torch.Tensor, optional, shape (rows*cols, latent)
        Start here instead of ``init``.
    init : {"pca", "random"}
        :func:`pca_prototypes` (deterministic and ordered from the start), or seeded random
        latents (XPySom's initialisation; the final TE then varies with the seed).
    seed : int
    metric : str
        Grid metric of the neighbourhood (:func:`grid_distance`). Euclidean (a diagonal
        neighbour at √2, as XPySom's Gaussian) ordered benchmark maps better than Manhattan
        (TE4 0.18 vs 0.23 on 100 k mixture latents); nodes and TE keep their conventions.
    chunk : int
    fine_tune : float
        Fraction of ``epochs`` spent at ``t_min`` at the end (0: T decays over every epoch).

    Returns
    -------
    torch.Tensor, shape (rows*cols, latent)
    """
    z = z.float()
    if prototypes is not None:
        protos = prototypes.clone().float()
    elif init == "pca":
        protos = pca_prototypes(z, rows, cols)
    elif init == "random":
        g = torch.Generator().manual_seed(seed)
        protos = z[torch.randint(0, z.shape[0], (rows * cols,), generator=g).to(z.device)]
    else:
        raise ConfigError(f"unknown SOM initialisation {init!r}; use random or pca")
    grid = grid_distance(rows, cols, metric).to(z.device)
    ordering = epochs - min(round(fine_tune * epochs), epochs - 1) if epochs > 1 else epochs
    for e in range(epochs):
        step = min(e / (ordering - 1), 1.0) if ordering > 1 else 1.0
        batch_som_epoch(protos, z, grid, t_max * (t_min / t_max) ** step, chunk)
    return protos


def bmu_and_runner_up(d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best and second-best node per row of squared distances (n, n_nodes)."""
    order = np.argpartition(d2, 1, axis=1)[:, :2]
    first = np.take_along_axis(d2, order, axis=1)
    swap = first[:, 1] < first[:, 0]
    best = np.where(swap, order[:, 1], order[:, 0])
    second = np.where(swap, order[:, 0], order[:, 1])
    return best, second


def quantization_error(d2_best: np.ndarray) -> float:
    """Mean Euclidean distance to the best-matching prototype (SOM Toolbox convention)."""
    return float(np.mean(np.sqrt(np.maximum(d2_best, 0.0))))


def topographic_error(best: np.ndarray, second: np.ndarray, cols: int,
                      neighbours: int = 4) -> float:
    """Fraction of samples whose two best nodes are not adjacent on the grid.

    Parameters
    ----------
    best, second : ndarray of int
        Node indices (``row * cols + col``).
    cols : int
    neighbours : {4, 8}
        4: adjacent = Manhattan distance 1 (SOM Toolbox, DESOM); 8: also diagonals
        (MiniSom, XPySom).
    """
    dr = np.abs(best // cols - second // cols)
    dc = np.abs(best % cols - second % cols)
    adjacent = (dr + dc == 1) if neighbours == 4 else (np.maximum(dr, dc) == 1)
    return float(1.0 - np.mean(adjacent))
