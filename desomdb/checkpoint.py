"""Versioned model checkpoints: one format, content hash in the name, verified on load.

A checkpoint is a ``torch.save`` of ``{"format_version", "config", "state", "metrics",
"extra"}``. The final artefact of a model is named ``<model_id>-<sha256[:16]>.pt``; loading
recomputes the hash and refuses a file that does not match its name.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from desomdb.errors import ModelError
from desomdb.model import Desom, DesomConfig

FORMAT_VERSION = 1


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
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_id}-{digest[:16]}.pt"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path, digest


def save_resume_state(path: Path, model: Desom, optimiser: torch.optim.Optimizer,
                      state: dict[str, Any]) -> None:
    """Write a training checkpoint (model + optimiser + loop state) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format_version": FORMAT_VERSION, "config": model.cfg.to_dict(),
                "state": model.state_dict(), "optimiser": optimiser.state_dict(),
                "loop": state}, tmp)
    tmp.replace(path)


def load_resume_state(path: Path) -> dict[str, Any] | None:
    """Read a training checkpoint, or None if there is none."""
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint cut short by a crash is not fatal: start over
        raise ModelError(f"{path}: unreadable training checkpoint ({exc}); delete it to restart "
                         "training from scratch") from exc
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
        Missing file, hash mismatch, or unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model artefact not found; was the archive moved or the "
                         "artefacts folder deleted?")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not path.stem.endswith(digest[:16]):
        raise ModelError(f"{path}: content hash {digest[:16]} does not match the file name; "
                         "the artefact is corrupt — retrain or restore it")
    payload = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: checkpoint format {payload.get('format_version')} is not "
                         f"{FORMAT_VERSION}; upgrade desomdb")
    model = Desom(DesomConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state"])
    model.to(device).eval()
    return model, {"metrics": payload["metrics"], "extra": payload["extra"], "sha256": digest}
