"""Versioned model checkpoints: one format, content hash in the name, verified on load.

A checkpoint is a ``torch.save`` of ``{"format_version", "config", "state", "metrics",
"extra"}``. The final artefact of a model is named ``<model_id>-<sha256[:16]>.pt``; loading
recomputes the hash and refuses a file that does not match its name.

A training (resume) checkpoint holds what a killed run needs to continue *bit-identically*:
model, optimiser, loop state (with the number of batches drawn, so the data stream can be
replayed to the same position) and every random-number state (torch CPU/CUDA, numpy global
and the data stream's generator, python). Its format is versioned apart from the artefact's.

Both load with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from desomdb.archive import paths
from desomdb.atomic import atomic_write, write_bytes_atomic
from desomdb.errors import ModelError
from desomdb.som.model import Desom, DesomConfig

#: Format of final model artefacts; 2 added the input standardisation buffers (``mean``,
#: ``scale``), ``latent_var`` and the config keys ``gamma_mode``, ``standardise`` and
#: ``som_epochs``. Format 1 artefacts still load, as what they were: no standardisation
#: (mean 0, scale 1), the paper's raw γ, random prototype initialisation.
FORMAT_VERSION = 2
#: Artefact formats this version reads.
READABLE_FORMATS = (1, 2)
#: Format of training checkpoints; 2 added the random-number states and the batch count,
#: 3 the standardisation buffers and loop flags.
RESUME_FORMAT_VERSION = 3
#: What a format-1 artefact's configuration meant in the keys format 2 added.
FORMAT1_CONFIG = {"standardise": False, "gamma_mode": "raw", "som_epochs": 0}


def _serialise(model: Desom, metrics: dict[str, Any], extra: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "config": model.cfg.to_dict(),
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metrics": metrics,
            "extra": extra,
        },
        buf,
    )
    return buf.getvalue()


def save(model: Desom, folder: Path, model_id: str, metrics: dict[str, Any],
         extra: dict[str, Any] | None = None) -> tuple[Path, str]:
    """Write the final artefact atomically; return its path and sha256."""
    data = _serialise(model, metrics, extra or {})
    digest = hashlib.sha256(data).hexdigest()
    path = folder / paths.checkpoint_name(model_id, digest)
    write_bytes_atomic(path, data)
    return path, digest


def rng_states(data_rng: np.random.Generator) -> dict[str, Any]:
    """Every random-number state a training run draws from, as plain types and tensors.

    Parameters
    ----------
    data_rng : numpy.random.Generator
        The generator that shuffles the training data.
    """
    # The legacy global generator too: a dependency may draw from it during training.
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_global": [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss),
                         float(gauss)],
        "numpy_data": data_rng.bit_generator.state,
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any], data_rng: np.random.Generator) -> None:
    """Set the random-number states saved by :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() \
            and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy_global"]
    np.random.set_state(  # noqa: NPY002 - restoring the legacy global state is the point
        (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    data_rng.bit_generator.state = states["numpy_data"]
    random.setstate(states["python"])


def save_resume_state(path: Path, model: Desom, optimiser: torch.optim.Optimizer,
                      loop: dict[str, Any], rng: dict[str, Any]) -> None:
    """Write a training checkpoint atomically.

    Parameters
    ----------
    path : Path
    model : Desom
    optimiser : torch.optim.Optimizer
    loop : dict
        The training loop's state (plain types), including ``batches`` drawn so far.
    rng : dict
        :func:`rng_states` at the same moment.
    """
    state = {"format_version": RESUME_FORMAT_VERSION, "config": model.cfg.to_dict(),
             "state": model.state_dict(), "optimiser": optimiser.state_dict(),
             "loop": loop, "rng": rng}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: Path) -> dict[str, Any] | None:
    """Read a training checkpoint, or None if there is none.

    Raises
    ------
    ModelError
        If the file is unreadable or was written in another format (e.g. by an older
        desomdb, without the random-number states an exact resume needs).
    """
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types; all mean the same to the user
        # Checkpoints are written to a temporary name and renamed, so a kill never leaves a
        # half-written one: an unreadable file is damaged or not a checkpoint at all.
        raise ModelError(f"{path}: unreadable training checkpoint ({exc}); delete it to restart "
                         "training from scratch") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != RESUME_FORMAT_VERSION:
        raise ModelError(f"{path}: training checkpoint format {version} is not "
                         f"{RESUME_FORMAT_VERSION} (an older desomdb wrote it, so it cannot be "
                         "resumed exactly); delete it to restart training from scratch")
    return data


def load(path: str | Path, device: str = "cpu") -> tuple[Desom, dict[str, Any]]:
    """Load and verify a final artefact.

    Returns
    -------
    model : Desom
        In eval mode on ``device``.
    payload : dict
        ``metrics`` and ``extra`` as saved.

    Raises
    ------
    ModelError
        Missing file, hash mismatch, or a format version it cannot read (format 1 loads
        with ``FORMAT1_CONFIG``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model artefact not found; was the archive moved or the "
                         "artefacts folder deleted?")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if paths.parse_checkpoint_name(path.name)[1] != digest[:16]:
        raise ModelError(f"{path}: content hash {digest[:16]} does not match the file name; "
                         "the artefact is corrupt — retrain or restore it")
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types; all mean the same to the user
        raise ModelError(f"{path}: cannot read the model artefact as tensors and plain values "
                         f"({exc}); it is damaged or not a desomdb artefact — retrain or restore "
                         "it") from exc
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version not in READABLE_FORMATS:
        raise ModelError(f"{path}: checkpoint format {version} is not one of "
                         f"{list(READABLE_FORMATS)} that this desomdb reads; retrain with "
                         "`desomdb train` (or upgrade desomdb if a newer one wrote it)")
    config = payload["config"]
    if version == 1:
        config = {**config, **FORMAT1_CONFIG}
    model = Desom(DesomConfig.from_dict(config))
    state = payload["state"]
    if version == 1:  # no standardisation buffers then: mean 0, scale 1 (identity)
        state = {**{k: v.to(device) for k, v in model.state_dict().items()}, **state}
    model.load_state_dict(state)
    model.to(device).eval()
    return model, {"metrics": payload["metrics"], "extra": payload["extra"], "sha256": digest}
