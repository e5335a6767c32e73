"""The Deep Embedded SOM (Forest et al. 2019) as used by Teimoorinia et al. (2022).

A 1-D (spectra) or 2-D (fingerprints) convolutional autoencoder and a SOM layer of
prototypes in its latent space, trained jointly with L = L_recon + γ·L_SOM. One SOM
implementation serves DESOM-1 (spectra) and DESOM-2 (fingerprints).

Conventions
-----------
- Nodes: ``node = row * n_cols + col`` (0-based).
- Grid distance: Manhattan, |r_k - r_l| + |c_k - c_l|. (The reference DESOM code computes
  the row gap as |k - l| // n_cols, which understates it for 22,050 of the 50,625 node
  pairs of a 15×15 map; :func:`grid_distance` does not.)
- Neighbourhood weights w_ik = exp(-d(bmu_i, k)² / T²); T decays exponentially from
  ``t_max`` to ``t_min`` over ``decay_iters`` iterations, then stays at ``t_min``.
- L_SOM = mean_i Σ_k w_ik ||z_i - m_k||²; reconstruction loss = mean squared error over
  unmasked bins only (a masked bin has weight zero).
- Optimisation: the autoencoder minimises L_recon + γ·L_SOM with Adam. The prototypes
  minimise L_SOM by the batch-SOM step m_k ← m_k + α (Σ_i w_ik z_i / Σ_i w_ik − m_k), which
  is a gradient step on L_SOM with a per-node step size. Adam on the prototypes (as in
  the reference code) normalises away the neighbourhood weights — a far node with
  w ≈ 1e-6 moves as fast as the winner — and collapsed our maps onto one or two nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from desomdb.errors import ConfigError
from desomdb.spectra import N_REST


@dataclass
class DesomConfig:
    """Architecture and training schedule of a DESOM.

    Two named configurations ship: :func:`paper_config` (the authors' network and schedule,
    for a GPU at survey scale) and :func:`compact_config` (the CPU default).
    """

    name: str = "compact"
    kind: str = "desom1"  # desom1: spectra (1-D); desom2: fingerprints (2-D)
    input_len: int = N_REST
    input_shape: tuple[int, int] = (15, 15)  # desom2 only
    arch: str = "strided"  # "paper" (conv + max-pool) or "strided"
    channels: tuple[int, ...] = (16, 32, 32)
    kernels: tuple[int, ...] = (8, 8, 4)
    strides: tuple[int, ...] = (4, 4, 2)
    latent: int = 256
    map_rows: int = 15
    map_cols: int = 15
    gamma: float = 5e-4
    t_max: float = 15.0
    t_min: float = 0.7
    iterations: int = 3000
    decay_iters: int = 2400
    pretrain_iters: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    som_lr: float = 0.1
    eval_every: int = 250
    patience: int = 4
    seed: int = 0
    #: "bf16": forward passes of training under bfloat16 autocast (losses and SOM in fp32).
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        """Number of SOM nodes."""
        return self.map_rows * self.map_cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DesomConfig:
        """Build from :meth:`to_dict` output; unknown keys are refused."""
        known = set(cls.__dataclass_fields__)
        bad = set(data) - known
        if bad:
            raise ConfigError(f"unknown DESOM configuration keys {sorted(bad)}; known: "
                              f"{sorted(known)}")
        conv = {k: tuple(v) for k, v in data.items()
                if k in ("channels", "kernels", "strides", "input_shape")}
        return cls(**{**data, **conv})


def paper_config(**overrides: Any) -> DesomConfig:
    """Return the authors' DESOM-1 configuration (finnarchinuk/GalaxyAE).

    4 × [Conv1d(64, k=6), LeakyReLU(0.1), MaxPool(2)] → 284×64 → Linear(256); 15×15;
    γ = 5e-4; T 15 → 0.7 over 50k of 65k iterations; batch 128; Adam 5e-5.
    """
    base = DesomConfig(
        name="paper", arch="paper", channels=(64, 64, 64, 64), kernels=(6, 6, 6, 6),
        strides=(2, 2, 2, 2), iterations=65000, decay_iters=50000, pretrain_iters=0,
        batch_size=128, lr=5e-5, eval_every=2000, patience=5,
    )
    return DesomConfig.from_dict({**base.to_dict(), **overrides})


def compact_config(**overrides: Any) -> DesomConfig:
    """Return the CPU default configuration.

    Three strided convolutions (16, 32, 32 channels, strides 4, 4, 2) → 142×32 →
    Linear(256); the same SOM and γ; a short schedule with early stopping.
    """
    return DesomConfig.from_dict({**DesomConfig().to_dict(), **overrides})


def desom2_config(**overrides: Any) -> DesomConfig:
    """DESOM-2 on 15×15 fingerprints: Conv2d(16, 3×3) autoencoder, 10×10 map, γ = 8e-6."""
    base = DesomConfig(
        name="desom2", kind="desom2", arch="conv2d", channels=(16,), kernels=(3,),
        strides=(1,), latent=64, map_rows=10, map_cols=10, gamma=8e-6, t_max=15.0,
        t_min=0.5, iterations=2000, decay_iters=1750, pretrain_iters=300, batch_size=64,
        lr=1e-3, eval_every=200,
    )
    return DesomConfig.from_dict({**base.to_dict(), **overrides})


CONFIGS = {"paper": paper_config, "compact": compact_config, "desom2": desom2_config}


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


def same_conv1d(n_in: int, n_out: int, k: int) -> nn.Sequential:
    """Conv1d with Keras-style 'same' padding (asymmetric for even kernels, as the authors')."""
    return nn.Sequential(nn.ConstantPad1d(((k - 1) // 2, k // 2), 0.0), nn.Conv1d(n_in, n_out, k))


class Encoder1D(nn.Module):
    """Spectrum (n, 4544) -> latent (n, latent)."""

    def __init__(self, cfg: DesomConfig):
        super().__init__()
        layers: list[nn.Module] = []
        n_in, length = 1, cfg.input_len
        for ch, k, s in zip(cfg.channels, cfg.kernels, cfg.strides, strict=True):
            if cfg.arch == "paper":
                layers += [same_conv1d(n_in, ch, k), nn.LeakyReLU(0.1), nn.MaxPool1d(s)]
                length //= s
            else:
                layers += [nn.Conv1d(n_in, ch, k, stride=s, padding=(k - s) // 2),
                           nn.LeakyReLU(0.1)]
                length = (length + 2 * ((k - s) // 2) - k) // s + 1
            n_in = ch
        self.conv = nn.Sequential(*layers)
        self.shape = (n_in, length)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n_in * length, cfg.latent),
                                nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` of shape (n, input_len)."""
        return torch.as_tensor(self.fc(self.conv(x[:, None, :])))


class Decoder1D(nn.Module):
    """Latent (n, latent) -> spectrum (n, 4544); mirror of :class:`Encoder1D`."""

    def __init__(self, cfg: DesomConfig, shape: tuple[int, int]):
        super().__init__()
        ch, length = shape
        self.shape = shape
        self.fc = nn.Sequential(nn.Linear(cfg.latent, ch * length), nn.LeakyReLU(0.1))
        layers: list[nn.Module] = []
        chans = list(cfg.channels)
        outs = [*chans[-2::-1], chans[0]]
        for i, (k, s) in enumerate(zip(cfg.kernels[::-1], cfg.strides[::-1], strict=True)):
            out_ch = outs[i]
            if cfg.arch == "paper":
                layers += [nn.Upsample(scale_factor=s), same_conv1d(ch, out_ch, k),
                           nn.LeakyReLU(0.1)]
            else:
                layers += [nn.ConvTranspose1d(ch, out_ch, k, stride=s, padding=(k - s) // 2),
                           nn.LeakyReLU(0.1)]
            ch = out_ch
        layers.append(nn.Conv1d(ch, 1, 3, padding="same"))
        self.deconv = nn.Sequential(*layers)
        self.out_len = cfg.input_len

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latent vectors to spectra of ``input_len`` bins."""
        h = self.fc(z).view(-1, *self.shape)
        y = self.deconv(h)[:, 0, :]
        if y.shape[1] != self.out_len:
            y = nn.functional.interpolate(y[:, None, :], size=self.out_len, mode="linear",
                                          align_corners=False)[:, 0, :]
        return torch.as_tensor(y)


class Encoder2D(nn.Module):
    """Fingerprint image (n, rows*cols) -> latent (n, latent)."""

    def __init__(self, cfg: DesomConfig):
        super().__init__()
        h, w = cfg.input_shape
        ch = cfg.channels[0]
        self.hw = (h, w)
        self.net = nn.Sequential(
            nn.Conv2d(1, ch, cfg.kernels[0], padding="same"), nn.LeakyReLU(0.1),
            nn.Flatten(), nn.Linear(ch * h * w, cfg.latent), nn.LeakyReLU(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode flattened images of shape (n, rows*cols)."""
        return torch.as_tensor(self.net(x.view(-1, 1, *self.hw)))


class Decoder2D(nn.Module):
    """Latent (n, latent) -> fingerprint image (n, rows*cols)."""

    def __init__(self, cfg: DesomConfig):
        super().__init__()
        h, w = cfg.input_shape
        ch = cfg.channels[0]
        self.hw, self.ch = (h, w), ch
        self.fc = nn.Sequential(nn.Linear(cfg.latent, ch * h * w), nn.LeakyReLU(0.1))
        self.conv = nn.Conv2d(ch, 1, cfg.kernels[0], padding="same")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode to flattened images."""
        h = self.fc(z).view(-1, self.ch, *self.hw)
        return torch.as_tensor(self.conv(h).flatten(1))


class Desom(nn.Module):
    """Autoencoder + SOM prototypes."""

    def __init__(self, cfg: DesomConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "desom2":
            self.encoder: nn.Module = Encoder2D(cfg)
            self.decoder: nn.Module = Decoder2D(cfg)
        else:
            enc = Encoder1D(cfg)
            self.encoder = enc
            self.decoder = Decoder1D(cfg, enc.shape)
        # Updated by som_step (batch-SOM), not by the autoencoder's optimiser.
        self.prototypes = nn.Parameter(torch.zeros(cfg.n_nodes, cfg.latent), requires_grad=False)
        self.register_buffer("grid_dist", grid_distance(cfg.map_rows, cfg.map_cols))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors of inputs ``x``."""
        return torch.as_tensor(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions of latent vectors ``z``."""
        return torch.as_tensor(self.decoder(z))

    def sq_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (n, n_nodes) from latents to prototypes."""
        return torch.cdist(z, self.prototypes).pow(2)

    def som_loss(self, z: torch.Tensor, temp: float) -> torch.Tensor:
        """L_SOM = mean_i Σ_k exp(-d(bmu_i, k)² / T²) ||z_i - m_k||²."""
        d2 = self.sq_distances(z)
        bmu = d2.detach().argmin(dim=1)
        grid: torch.Tensor = self.grid_dist  # type: ignore[assignment]
        w = torch.exp(-grid[bmu].pow(2) / temp**2)
        return (w * d2).sum(dim=1).mean()


@torch.no_grad()
def som_step(model: Desom, z: torch.Tensor, temp: float, alpha: float) -> None:
    """Move prototypes towards the neighbourhood-weighted means of the batch latents.

    Parameters
    ----------
    model : Desom
    z : torch.Tensor, shape (n, latent)
        Latents of the batch (detached).
    temp : float
        Neighbourhood radius T.
    alpha : float
        Step size in (0, 1].
    """
    d2 = model.sq_distances(z)
    bmu = d2.argmin(dim=1)
    grid: torch.Tensor = model.grid_dist  # type: ignore[assignment]
    w = torch.exp(-grid[bmu].pow(2) / temp**2)  # (n, n_nodes)
    wsum = w.sum(dim=0)
    target = (w.T @ z) / wsum.clamp_min(1e-12)[:, None]
    active = (wsum > 1e-6).float()[:, None]
    model.prototypes.add_(alpha * active * (target - model.prototypes))


def masked_mse(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over bins with weight > 0 (masked bins count zero)."""
    return ((x - x_hat).pow(2) * weight).sum() / weight.sum().clamp_min(1.0)


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


def init_prototypes(model: Desom, latents: torch.Tensor, seed: int) -> None:
    """Initialise prototypes from randomly chosen encoded samples (reference DESOM)."""
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    idx = torch.randint(0, n, (model.cfg.n_nodes,), generator=g) if n < model.cfg.n_nodes \
        else torch.randperm(n, generator=g)[: model.cfg.n_nodes]
    with torch.no_grad():
        model.prototypes.copy_(latents[idx])


def n_parameters(model: nn.Module) -> int:
    """Count the trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_hint(cfg: DesomConfig) -> str:
    """Human-readable summary of the architecture for logs."""
    return (f"{cfg.name}: {cfg.arch} {list(cfg.channels)} → latent {cfg.latent}; "
            f"map {cfg.map_rows}×{cfg.map_cols}; γ={cfg.gamma:g}; "
            f"T {cfg.t_max}→{cfg.t_min} over {cfg.decay_iters}/{cfg.iterations} iterations")

