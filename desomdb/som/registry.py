"""The model registry: the ``models`` table, model artefacts, and the current model.

One owner for what a registered model is: its row (:data:`MODELS_SCHEMA`), how a trained
model is saved and registered (:func:`save_and_register`), how it is loaded back
(:func:`load_model`, hash-verified), and which model is current (``_current_model.json``,
switched only by an explicit ``desomdb model use``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.atomic import write_json_atomic
from desomdb.errors import ModelError, QueryError

if TYPE_CHECKING:  # torch is imported where a model is saved or loaded, not by status or sql
    from desomdb.som.model import Desom, DesomConfig


def current_model(archive: Archive, kind: str = "desom1") -> str | None:
    """Return the archive's current model id of ``kind`` (None if none was made current)."""
    path = archive.root / paths.CURRENT_MODEL
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: damaged ({exc}); set the current model again with "
                         "'desomdb model use ID' (see 'desomdb model list')") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, str) or v is None for v in data.values()):
        raise ModelError(f"{path}: not a mapping of kind -> model id; set the current "
                         "model again with 'desomdb model use ID'")
    value = data.get(kind)
    return str(value) if value else None


def set_current_model(archive: Archive, model_id: str, kind: str = "desom1") -> None:
    """Make ``model_id`` the current model of ``kind`` (explicit, reversible).

    Raises
    ------
    ModelError
        If ``model_id`` is not a registered model of ``kind``.
    LockError
        If another process is writing to the archive.
    """
    known = registered_models(archive)
    if model_id not in known:
        raise ModelError(f"{archive.root}: no registered model {model_id!r}; registered: "
                         f"{sorted(known) or 'none'} (see 'desomdb model list')")
    if known[model_id] != kind:
        raise ModelError(f"{model_id} is a {known[model_id]} model, not {kind}")
    path = archive.root / paths.CURRENT_MODEL
    # A writer session: one change at a time, and its end regenerates what follows the
    # current model (setup.sql's current_model(), the query cache).
    with archive.writer(f"model use {model_id}"):
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            data = {}  # damaged: rewritten below with the model the user names
        if not isinstance(data, dict):
            data = {}
        data[kind] = model_id
        write_json_atomic(path, data)


def registered_models(archive: Archive) -> dict[str, str]:
    """model_id -> kind of every registered model."""
    if not archive.has_table("models"):
        return {}
    t = archive.read("models", columns=["model_id", "kind"])
    return dict(zip(t.column("model_id").to_pylist(), t.column("kind").to_pylist(), strict=True))


def resumed_from(archive: Archive, model_id: str) -> str | None:
    """Return the id of the run ``model_id`` was resumed from (metrics' ``resumed_from``)."""
    if not archive.has_table("models"):
        return None
    t = archive.read("models", columns=["model_id", "metrics"])
    for mid, metrics in zip(t.column("model_id").to_pylist(), t.column("metrics").to_pylist(),
                            strict=True):
        if mid == model_id and metrics:
            value = json.loads(metrics).get("resumed_from")
            return str(value) if value is not None else None
    return None


def resolve_model(archive: Archive, model_id: str | None, kind: str = "desom1") -> str:
    """``model_id`` if given (and registered), else the current model; clear errors."""
    if model_id is None:
        model_id = current_model(archive, kind)
        if model_id is None:
            raise ModelError(f"{archive.root}: no current {kind} model; train one with "
                             "'desomdb train' or pick one with --model")
    known = registered_models(archive)
    if model_id not in known:
        raise ModelError(f"{archive.root}: model {model_id!r} is not registered; registered: "
                         f"{', '.join(sorted(known)) or 'none'} (see 'desomdb model list')")
    return model_id


#: Column types of a ``models`` row (fixed so that nulls never change a column's type).
MODELS_SCHEMA = pa.schema([
    ("kind", pa.string()), ("created_at", pa.string()), ("config", pa.string()),
    ("data_spec", pa.string()), ("metrics", pa.string()), ("recon_mse", pa.float64()),
    ("pca_mse", pa.float64()), ("qe", pa.float64()), ("te4", pa.float64()),
    ("te8", pa.float64()), ("parent_model_id", pa.string()), ("artefact_path", pa.string()),
    ("artefact_sha256", pa.string()), ("seed", pa.int64()),
])


def models_row(row: dict[str, Any]) -> pa.Table:
    """One ``models`` registry row with :data:`MODELS_SCHEMA` types."""
    return pa.Table.from_pylist([row], schema=MODELS_SCHEMA)


def save_and_register(
    writer: Writer,
    model_id: str,
    model: Desom,
    cfg: DesomConfig,
    data_spec: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any],
    parent: str | None,
    also: list[StagedFile] | None = None,
) -> None:
    """Save a trained model's artefact and commit its ``models`` row (and ``also``) at once.

    Parameters
    ----------
    writer : Writer
    model_id : str
    model : Desom
        The trained network (prototypes included).
    cfg : DesomConfig
        Its configuration (``kind`` desom1 or desom2).
    data_spec : dict
        What it was trained on (filter, split, seed ...), stored as JSON.
    metrics : dict
        Stored as JSON; ``recon_mse_test``/``pca_mse_test``/``qe``/``te4``/``te8`` (or their
        ``*_test`` forms) also as columns.
    extra : dict
        Stored in the checkpoint (training history, normalisation ...).
    parent : str, optional
        The warm-start parent, or the DESOM-1 whose fingerprints a DESOM-2 maps.
    also : list of StagedFile, optional
        Further files of the same unit (splits, fingerprints) committed with the row.
    """
    from desomdb.som import checkpoint

    artefact, digest = checkpoint.save(model, paths.artefact_dir(writer.root, model_id),
                                       model_id, metrics, extra)

    def metric(name: str) -> Any:
        return metrics.get(name, metrics.get(f"{name}_test"))

    row = {
        "kind": cfg.kind, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "data_spec": json.dumps(data_spec, sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True),
        "recon_mse": metric("recon_mse"), "pca_mse": metric("pca_mse"),
        "qe": metric("qe"), "te4": metric("te4"), "te8": metric("te8"),
        "parent_model_id": parent, "artefact_path": str(artefact.relative_to(writer.root)),
        "artefact_sha256": digest, "seed": cfg.seed,
    }
    staged = writer.stage_table("models", models_row(row), paths.model_file("models", model_id))
    writer.commit(add=[staged, *(also or [])])


def load_model(arch: Archive, model_id: str, device: str = "cpu") -> tuple[Desom, dict[str, Any]]:
    """Load a registered model's artefact (hash-verified)."""
    t = arch.read("models", columns=["artefact_path"], model_id=model_id)
    if t.num_rows != 1:
        raise QueryError(f"model {model_id} has {t.num_rows} registry rows")
    from desomdb.som import checkpoint

    return checkpoint.load(arch.root / t.column("artefact_path")[0].as_py(), device)

