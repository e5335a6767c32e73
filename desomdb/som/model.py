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
- Input standardisation (``standardise``, on by default): the model stores the training
  set's mean spectrum μ (per bin, over unmasked bins) and one scale s (the RMS of x − μ over
  unmasked bins) as buffers saved with it. :meth:`Desom.encode` feeds the network
  (x − μ) / s with masked bins (exactly 0 in the normalised input, see
  :func:`desomdb.science.spectra.normalise`) kept at 0; :meth:`Desom.decode` returns s·net(z) + μ.
  So every caller (assign, predict, similar, refresh) sees the same standardisation, and the
  reconstruction loss is the same masked MSE of the normalised spectra as without it. (An
  autoencoder without it must build the mean spectrum through its decoder biases; PCA gets
  it for free.)
- Reconstruction loss = mean squared error over unmasked bins only (a masked bin has weight
  zero).
- SOM loss, two semantics of γ (``gamma_mode``):

  * ``"raw"`` — the paper's and the reference code's: L = L_rec + γ·L_SOM with
    L_SOM = mean_i Σ_k w_ik ||z_i − m_k||², summed over nodes in latent units (γ = 5e-4
    for DESOM-1, 8e-6 for DESOM-2 in the paper). The balance then depends on the latent
    scale (norms ~100 here) and on the neighbourhood width (Σ_k w_ik ≈ n_nodes at T = 15):
    at CPU budgets the SOM term swamped the reconstruction and the encoder shrank its
    latents instead of reconstructing. Kept for DESOM-2 and for models saved before
    checkpoint format 2.
  * ``"relative"`` (default for DESOM-1) — scale-free: L = L_rec + γ·s²·L̃_SOM with
    L̃_SOM = mean_i [Σ_k w_ik ||z_i − m_k||² / Σ_k w_ik] / v_z, a neighbourhood-weighted
    *mean* (not sum) of squared distances divided by v_z, the running mean (not
    differentiated) of the latents' total variance mean_i ||z_i − z̄||². L̃_SOM is
    dimensionless and unchanged when the latents are rescaled; s² (the stored input
    variance) gives the term the units of the MSE, so scaling the inputs scales both terms
    alike. γ is then the weight of "fraction of latent variance not explained by the
    neighbourhood" against "MSE in units of the spectra's variance".
- Prototypes: organised once by a batch SOM (:func:`fit_som`: PCA plane, then per
  epoch every latent's BMU and m_k ← Σ_j h_kj S_j / Σ_j h_kj N_j with S_j, N_j the sum and
  count of latents whose BMU is j, h on the Euclidean grid distance; T from ``t_max`` to
  ``t_min`` over the first 70 % of ``som_epochs`` epochs, then fine-tuning at ``t_min``) on a
  sample of latents after AE pre-training;
  during the joint phase they then track the latents at T = ``t_min`` with the step
  m_k ← m_k + α (Σ_i w_ik z_i / Σ_i w_ik − m_k), a gradient step on L_SOM with a per-node
  step size. (``som_epochs = 0``: random-sample initialisation and the decaying-T schedule
  in the joint phase, as before.) Adam on the prototypes (as in the reference code)
  normalises away the neighbourhood weights — a far node with w ≈ 1e-6 moves as fast as the
  winner — and collapsed our maps onto one or two nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from desomdb.errors import ConfigError
from desomdb.science.spectra import N_REST
from desomdb.som.lattice import grid_distance


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
    #: Weight of the SOM loss; its meaning depends on ``gamma_mode`` (module docstring).
    gamma: float = 0.1
    #: "relative" (scale-free, default) or "raw" (the paper's Σ-over-nodes, latent units).
    gamma_mode: str = "relative"
    #: Subtract the stored training mean spectrum and divide by the stored scale.
    standardise: bool = True
    #: Batch-SOM epochs organising the prototypes after AE pre-training (0: random init).
    som_epochs: int = 20
    t_max: float = 15.0
    t_min: float = 0.7
    #: Compact default schedule: on a 48-galaxy mock (15×15) 1,800 + 400 iterations gave the
    #: same held-out MSE as 3,000 + 500 (0.70x PCA-256), TE4 0.19 vs 0.21, in 37 % fewer
    #: steps (docs/measured.md, "DESOM-1 against the baseline").
    iterations: int = 1800
    decay_iters: int = 1440
    pretrain_iters: int = 400
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
    T 15 → 0.7 over 50k of 65k iterations; batch 128; Adam 5e-5. The paper's γ = 5e-4 is
    in the ``"raw"`` semantics (``paper_config(gamma=5e-4, gamma_mode="raw",
    standardise=False, som_epochs=0)`` is the authors' set-up); this preset uses the
    scale-free ``"relative"`` γ, input standardisation and the batch-SOM organisation.
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
    """DESOM-2 on 15×15 fingerprints: Conv2d(16, 3×3) autoencoder, 10×10 map, raw γ = 8e-6.

    The paper's semantics throughout (``gamma_mode="raw"``, no standardisation, random
    prototype initialisation).
    """
    base = DesomConfig(
        name="desom2", kind="desom2", arch="conv2d", channels=(16,), kernels=(3,),
        strides=(1,), latent=64, map_rows=10, map_cols=10, gamma=8e-6, gamma_mode="raw",
        standardise=False, som_epochs=0, t_max=15.0,
        t_min=0.5, iterations=2000, decay_iters=1750, pretrain_iters=300, batch_size=64,
        lr=1e-3, eval_every=200,
    )
    return DesomConfig.from_dict({**base.to_dict(), **overrides})


CONFIGS = {"paper": paper_config, "compact": compact_config, "desom2": desom2_config}


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


GAMMA_MODES = ("relative", "raw")


class Desom(nn.Module):
    """Autoencoder + SOM prototypes, with the input standardisation it was trained with.

    Buffers (saved in the checkpoint): ``mean`` (input_len,) and ``scale`` () — the training
    set's mean input and RMS about it (0 and 1 when ``standardise`` is off or not yet set);
    ``latent_var`` () — running total variance of the latents (the ``"relative"`` γ's unit).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    latent_var: torch.Tensor

    def __init__(self, cfg: DesomConfig):
        super().__init__()
        if cfg.gamma_mode not in GAMMA_MODES:
            raise ConfigError(f"gamma_mode must be one of {GAMMA_MODES}, got {cfg.gamma_mode!r}")
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
        n_in = cfg.input_shape[0] * cfg.input_shape[1] if cfg.kind == "desom2" else cfg.input_len
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("latent_var", torch.ones(()))

    @torch.no_grad()
    def set_standardisation(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Store the mean input and the RMS about it, over bins with weight > 0.

        Parameters
        ----------
        x : torch.Tensor, shape (n, input_len)
            Training inputs (normalised flux, dimensionless).
        weight : torch.Tensor, shape (n, input_len)
            0 for masked bins, 1 otherwise. A bin masked in every row gets mean 0.
        """
        x = x.to(self.mean.device, torch.float32)
        w = weight.to(self.mean.device, torch.float32)
        n = w.sum(dim=0)
        mean = (w * x).sum(dim=0) / n.clamp_min(1.0)
        var = (w * (x - mean).pow(2)).sum() / w.sum().clamp_min(1.0)
        self.mean.copy_(mean)
        self.scale.copy_(var.sqrt().clamp_min(1e-12))

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Network input: (x − mean) / scale, masked DESOM-1 bins (x == 0) kept at 0."""
        if not self.cfg.standardise:
            return x
        xs = (x - self.mean) / self.scale
        if self.cfg.kind == "desom1":
            xs = torch.where(x != 0, xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
        return xs

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors (n, latent) of inputs ``x`` (n, input_len), standardised first."""
        return torch.as_tensor(self.encoder(self.standardised(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions (n, input_len) of latent vectors ``z``, in the inputs' units."""
        y = torch.as_tensor(self.decoder(z))
        if self.cfg.standardise:
            y = y * self.scale + self.mean
        return y

    def sq_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (n, n_nodes) from latents to prototypes."""
        return torch.cdist(z, self.prototypes).pow(2)

    def som_loss(self, z: torch.Tensor, temp: float) -> torch.Tensor:
        """L_SOM = mean_i Σ_k exp(-d(bmu_i, k)² / T²) ||z_i - m_k||² (the paper's)."""
        d2 = self.sq_distances(z)
        bmu = d2.detach().argmin(dim=1)
        grid: torch.Tensor = self.grid_dist  # type: ignore[assignment]
        w = torch.exp(-grid[bmu].pow(2) / temp**2)
        return (w * d2).sum(dim=1).mean()

    def som_term(self, z: torch.Tensor, temp: float) -> torch.Tensor:
        """Return the SOM loss that γ multiplies, in the semantics of ``cfg.gamma_mode``.

        ``"raw"``: :meth:`som_loss`. ``"relative"``: scale² · mean_i [Σ_k w_ik d²_ik /
        Σ_k w_ik] / latent_var (module docstring); unchanged in ratio to the masked MSE when
        the inputs, or the latents, are rescaled.
        """
        if self.cfg.gamma_mode == "raw":
            return self.som_loss(z, temp)
        d2 = self.sq_distances(z)
        bmu = d2.detach().argmin(dim=1)
        grid: torch.Tensor = self.grid_dist  # type: ignore[assignment]
        w = torch.exp(-grid[bmu].pow(2) / temp**2)
        rel = ((w * d2).sum(dim=1) / w.sum(dim=1)).mean() / self.latent_var.clamp_min(1e-12)
        return self.scale.pow(2) * rel

    @torch.no_grad()
    def track_latent_var(self, z: torch.Tensor, momentum: float = 0.01) -> None:
        """Update the running total latent variance with a batch ``z`` (n, latent)."""
        v = (z - z.mean(dim=0)).pow(2).sum(dim=1).mean()
        self.latent_var.mul_(1 - momentum).add_(momentum * v)


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
