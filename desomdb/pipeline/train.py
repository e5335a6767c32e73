"""Train a DESOM-1 from the archive and register it.

The training set is a SQL filter over ``baxels`` (default: ``trainable``, i.e. the paper's
cuts), each cube in its newest release only (``latest_cubes``). Galaxies (mangaid) are split
train/test with a seeded hash, so no galaxy is in both; the split is stored in ``splits``.
Spectra stream from the per-cube Parquet files in shuffled chunks (bounded memory). A killed
run resumes from its last checkpoint: the checkpoint holds the model, the optimiser, every
random-number state and the number of batches drawn, and :class:`BatchStream` replays the
shuffle to that position without reading data. Run on one thread, a resumed model equals the
uninterrupted one weight for weight (``tests/pipeline/test_train.py``); with several threads
the float sums, and so the weights, can differ. A resumed run is therefore registered under
its own id (:func:`resumed_model_id`), and its metrics name the run it resumed
(``resumed_from``) and the iterations it resumed at (``resumed_at``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.errors import ConfigError, ModelError
from desomdb.pipeline.training_set import (
    DEFAULT_WHERE,
    BatchStream,
    Selection,
    load_rows,
    select_training,
    stream_batches,
)
from desomdb.runtime import runner
from desomdb.runtime.progress import progress_bar
from desomdb.som import checkpoint, inference, registry
from desomdb.som.lattice import fit_som, quantization_error, temperature, topographic_error
from desomdb.som.model import Desom, DesomConfig, init_prototypes, masked_mse, som_step

N_EVAL = 2048
N_PCA_FIT = 20000
PCA_COMPONENTS = 256
#: Training rows drawn for the input mean and scale (before AE pre-training).
N_STANDARDISE = 4096
#: Training rows encoded for the batch-SOM organisation of the prototypes.
N_SOM_FIT = 4096


def pca_baseline(x_train: np.ndarray, x_test: np.ndarray, w_test: np.ndarray,
                 n_components: int = PCA_COMPONENTS) -> float:
    """Held-out masked MSE of a PCA reconstruction with ``n_components`` components."""
    k = min(n_components, x_train.shape[0] - 1, x_train.shape[1])
    mean = x_train.mean(axis=0)
    xt = torch.from_numpy(x_train - mean)
    _, _, v = torch.pca_lowrank(xt, q=k, center=False, niter=4)
    v = v[:, :k]
    xc = torch.from_numpy(x_test - mean)
    recon = (xc @ v) @ v.T + torch.from_numpy(mean)
    return float(masked_mse(torch.from_numpy(x_test), recon, torch.from_numpy(w_test)))


def resumed_model_id(model_id: str, resumed_at: Sequence[int]) -> str:
    """Return the id a run of ``model_id`` resumed at iterations ``resumed_at`` registers under.

    Same kind prefix, another hash: a resumed model is never mistaken for the uninterrupted
    one, and the same resumption gives the same id.
    """
    kind = model_id.split("-", 1)[0]
    text = f"{model_id} resumed at {list(resumed_at)}"
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def model_id_for(cfg: DesomConfig, selection: Selection, arch: Archive) -> str:
    """Deterministic id from the configuration, the data filter, the seed and the data."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(selection.where.encode())
    h.update(str(selection.seed).encode())
    h.update("\n".join(arch.manifest()["tables"].get("spectra", [])).encode())
    return f"{cfg.kind}-{h.hexdigest()[:10]}"


def evaluate(model: Desom, x: np.ndarray, w: np.ndarray, device: str) -> dict[str, float]:
    """Reconstruction MSE, QE, TE (4 and 8 neighbours) and node usage on a sample."""
    model.eval()
    with torch.no_grad():
        xt, wt = torch.from_numpy(x).to(device), torch.from_numpy(w).to(device)
        z = model.encode(xt)
        mse = float(masked_mse(xt, model.decode(z), wt))
    found = inference.nearest_nodes(model, z.cpu().numpy(), device)
    cols = model.cfg.map_cols
    model.train()
    return {
        "recon_mse": mse,
        "qe": quantization_error(found.distance.astype(np.float64) ** 2),
        "te4": topographic_error(found.best, found.second, cols, 4),
        "te8": topographic_error(found.best, found.second, cols, 8),
        "frac_nodes_used": float(np.unique(found.best).size / model.cfg.n_nodes),
    }


def fit(
    model: Desom,
    batches: BatchStream,
    x_eval: np.ndarray,
    w_eval: np.ndarray,
    device: str,
    state_path: Path,
    desc: str = "train",
    progress: bool = True,
    initialised: bool = False,
) -> dict[str, Any]:
    """Train a DESOM jointly (AE pre-training, prototype initialisation, AE + SOM).

    The one training loop for DESOM-1 (spectra) and DESOM-2 (fingerprints). Unless warm
    started (``initialised``), it first stores the input mean and scale of ``N_STANDARDISE``
    training rows in the model (``cfg.standardise``); after AE pre-training it encodes
    ``N_SOM_FIT`` rows and organises the prototypes on them with ``cfg.som_epochs`` batch-SOM
    epochs (T ``t_max`` → ``t_min``; the joint phase then tracks at ``t_min``), or, with
    ``som_epochs = 0``, starts them at random latents and decays T in the joint phase. Evaluates on
    ``x_eval`` every ``eval_every`` iterations, checkpoints to ``state_path``, and stops early
    once the SOM has finished shrinking and the held-out MSE has not improved by 0.5 % for
    ``patience`` evaluations.

    A killed run started again with a fresh ``batches`` stream (same seed) continues from the
    checkpoint exactly as if it had never stopped: model, optimiser, every random-number state
    and the stream position are restored.

    The steps run on one torch thread or on the caller's count, whichever is faster at the
    time (:class:`desomdb.runtime.runner.ThreadTuner`): a small network on a 2-core machine
    shared with other jobs trains ~1.7x faster on one. A caller on one thread (a resumable,
    bit-reproducible run) stays on one.

    Returns
    -------
    dict
        The loop state: ``it``, ``history`` (metrics per evaluation), ``seconds``,
        ``batches`` (drawn from the stream), ``resumed_at`` (iterations resumed from).

    Raises
    ------
    ModelError
        If the checkpoint is unreadable, from an older format, or does not belong to this
        data stream.
    """
    cfg = model.cfg
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loop = _start_or_resume(model, opt, batches, state_path, initialised)
    total = cfg.pretrain_iters + cfg.iterations
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    bf16 = cfg.precision == "bf16"
    bar = progress_bar(total, desc, initial=loop["it"], enabled=progress)
    t_start = time.perf_counter() - loop["seconds"]
    if cfg.gamma_mode not in ("relative", "raw"):
        raise ConfigError(f"gamma_mode must be relative or raw, got {cfg.gamma_mode!r}")
    if not loop["standardised"]:
        if cfg.standardise:
            drawn = [next(batches) for _ in range(-(-N_STANDARDISE // cfg.batch_size))]
            with runner.single_threaded():  # sums independent of the thread count
                model.set_standardisation(
                    torch.from_numpy(np.concatenate([d[0] for d in drawn])),
                    torch.from_numpy(np.concatenate([d[1] for d in drawn])))
        loop["standardised"] = True
    if not loop["history"]:
        loop["history"].append({**evaluate(model, x_eval, w_eval, device), "it": 0})
    model.train()
    threads = runner.ThreadTuner()  # one thread or more, whichever is faster under the load
    try:
        _loop(model, opt, batches, x_eval, w_eval, device, state_path, loop, bar, bf16,
              threads, t_start)
    finally:
        threads.close()
    bar.close()
    loop["seconds"] = time.perf_counter() - t_start
    return loop


def _loop(model: Desom, opt: torch.optim.Optimizer, batches: BatchStream, x_eval: np.ndarray,
          w_eval: np.ndarray, device: str, state_path: Path, loop: dict[str, Any], bar: Any,
          bf16: bool, threads: runner.ThreadTuner, t_start: float) -> None:
    """Run :func:`fit`'s iterations until the schedule ends or early stopping (``loop``)."""
    cfg = model.cfg
    total = cfg.pretrain_iters + cfg.iterations
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    while loop["it"] < total and not loop["stopped"]:
        it = loop["it"]
        if it == cfg.pretrain_iters and not loop["initialised"]:
            _initialise_prototypes(model, batches, device, loop)
        threads.before()
        t_step = time.perf_counter()
        xb, wb = (torch.from_numpy(a).to(device) for a in next(batches))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            z = model.encode(xb)
            x_hat = model.decode(z)
        z = z.float()
        loss_rec = masked_mse(xb, x_hat.float(), wb)
        loss = loss_rec
        som = torch.zeros(())
        temp = cfg.t_min if loop.get("som_fitted") else temperature(it - cfg.pretrain_iters, cfg)
        if it >= cfg.pretrain_iters:
            model.track_latent_var(z.detach())
            som = model.som_term(z, temp)
            loss = loss_rec + cfg.gamma * som
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it >= cfg.pretrain_iters:
            som_step(model, z.detach(), temp, cfg.som_lr)
        threads.after(time.perf_counter() - t_step)
        loop["it"] = it + 1
        bar.update(1)
        bar.set_postfix(rec=f"{loss_rec.item():.4g}", som=f"{som.item():.4g}")
        if loop["it"] % cfg.eval_every == 0 or loop["it"] == total:
            _evaluate_and_stop(model, x_eval, w_eval, device, loop)
            loop["seconds"] = time.perf_counter() - t_start
            loop["batches"] = batches.position
            checkpoint.save_resume_state(state_path, model, opt, loop,
                                         checkpoint.rng_states(batches.rng))


def _start_or_resume(model: Desom, opt: torch.optim.Optimizer, batches: BatchStream,
                     state_path: Path, initialised: bool) -> dict[str, Any]:
    """Return a new loop state, or restore model, optimiser, RNGs and stream from a checkpoint."""
    resume = checkpoint.load_resume_state(state_path)
    if resume is None:
        return {"it": 0, "best": float("inf"), "stale": 0, "history": [], "seconds": 0.0,
                "initialised": initialised, "stopped": False, "batches": 0, "resumed_at": [],
                "standardised": initialised, "som_fitted": False}
    model.load_state_dict(resume["state"])
    opt.load_state_dict(resume["optimiser"])
    loop: dict[str, Any] = resume["loop"]
    batches.skip(loop["batches"] - batches.position)
    if batches.rng.bit_generator.state != resume["rng"]["numpy_data"]:
        raise ModelError(f"{state_path}: replaying {loop['batches']} batches does not "
                         "reproduce the checkpoint's data order (the training data or its "
                         "seed changed); delete the checkpoint to restart training")
    checkpoint.restore_rng_states(resume["rng"], batches.rng)
    loop["resumed_at"].append(loop["it"])
    return loop


def _initialise_prototypes(model: Desom, batches: BatchStream, device: str,
                           loop: dict[str, Any]) -> None:
    """Set the prototypes after AE pre-training: batch SOM on encoded rows, or random latents."""
    cfg = model.cfg
    n_rows = max(N_SOM_FIT, 2 * cfg.n_nodes) if cfg.som_epochs > 0 else cfg.n_nodes
    sample = [next(batches)[0] for _ in range(max(2, n_rows // cfg.batch_size + 1))]
    # One thread: the SVD, matrix products and reductions of the prototype set-up give the
    # same floats whatever this process's thread count (resume == uninterrupted).
    with runner.single_threaded():
        latents = torch.from_numpy(
            inference.encode_all(model, np.concatenate(sample), device)).to(device)
        if cfg.som_epochs > 0:
            with torch.no_grad():
                model.prototypes.copy_(fit_som(latents, cfg.map_rows, cfg.map_cols,
                                               cfg.som_epochs, cfg.t_max, cfg.t_min,
                                               seed=cfg.seed))
            loop["som_fitted"] = True
        else:
            init_prototypes(model, latents, cfg.seed)
        with torch.no_grad():
            model.latent_var.copy_((latents - latents.mean(0)).pow(2).sum(1).mean())
    loop["initialised"] = True


def _evaluate_and_stop(model: Desom, x_eval: np.ndarray, w_eval: np.ndarray, device: str,
                       loop: dict[str, Any]) -> None:
    """Evaluate on the held-out rows, record it, and decide whether training stops."""
    cfg = model.cfg
    m = evaluate(model, x_eval, w_eval, device)
    m["it"] = loop["it"]
    loop["history"].append(m)
    som_done = loop["it"] - cfg.pretrain_iters >= cfg.decay_iters
    if m["recon_mse"] < loop["best"] * 0.995:
        loop["best"], loop["stale"] = m["recon_mse"], 0
    elif som_done:
        loop["stale"] += 1
    # Early stopping (held-out MSE has plateaued) is part of the saved state, so a run
    # killed after stopping does not train on when resumed.
    loop["stopped"] = som_done and loop["stale"] >= cfg.patience


def train(
    archive: str | Path,
    cfg: DesomConfig,
    where: str = DEFAULT_WHERE,
    device: str = "cpu",
    progress: bool = True,
    parent_model_id: str | None = None,
    init_state: dict[str, Any] | None = None,
) -> str:
    """Train a DESOM-1 on the archive, register it, and return its model id.

    Parameters
    ----------
    archive : str or Path
    cfg : DesomConfig
        ``compact_config()`` (CPU default) or ``paper_config()``.
    where : str
        SQL filter over the ``baxels`` view selecting training spectra.
    device : {"cpu", "cuda"}
    progress : bool
    parent_model_id : str, optional
        Recorded in ``models`` (warm starts).
    init_state : dict, optional
        A state dict to warm-start from (prototypes included).

    Returns
    -------
    str
        The model id (``desom1-<hash>``; a run resumed from a checkpoint registers under
        :func:`resumed_model_id`); not made current — use ``desomdb model use``.
    """
    arch = Archive(archive)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    selection = select_training(arch, where, cfg.seed)
    model_id = model_id_for(cfg, selection, arch)
    if model_id in registry.registered_models(arch):
        return model_id  # idempotent: the same data and configuration give the same model
    train_rows = selection.rows.filter(pl.col("split") == "train")
    test_rows = selection.rows.filter(pl.col("split") == "test")
    eval_rows = test_rows.sample(min(N_EVAL, test_rows.height), seed=cfg.seed) \
        if test_rows.height else train_rows.sample(min(N_EVAL, train_rows.height), seed=1)
    x_eval, w_eval = load_rows(arch, eval_rows)

    with arch.writer("desomdb train") as writer:
        model = Desom(cfg).to(device)
        if init_state is not None:
            model.load_state_dict(init_state)
        state_path = paths.train_state_path(arch.root, model_id)
        batches = stream_batches(arch, train_rows, cfg.batch_size, rng)
        loop = fit(model, batches, x_eval, w_eval, device, state_path,
                   desc=f"train {model_id}", progress=progress,
                   initialised=init_state is not None)
        seconds = loop["seconds"]
        metrics = _final_metrics(arch, model, train_rows, x_eval, w_eval, device, rng)
        metrics.update(iterations_run=loop["it"], train_seconds=seconds,
                       train_spectra_per_s=loop["it"] * cfg.batch_size / max(seconds, 1e-9))
        registered = model_id
        if loop["resumed_at"]:
            registered = resumed_model_id(model_id, loop["resumed_at"])
            metrics.update(resumed_from=model_id, resumed_at=list(loop["resumed_at"]))
        splits = selection.rows.select("mangaid", "split").unique().sort("mangaid")
        split_file = writer.stage_table("splits", splits.to_arrow(),
                                        paths.model_file("splits", registered))
        registry.save_and_register(
            writer, registered, model, cfg, selection.spec(), metrics,
            {"history": loop["history"], "resumed_at": loop["resumed_at"]},
            parent_model_id, also=[split_file])
        state_path.unlink(missing_ok=True)
    return registered


def _final_metrics(arch: Archive, model: Desom, train_rows: pl.DataFrame, x_eval: np.ndarray,
                   w_eval: np.ndarray, device: str, rng: np.random.Generator) -> dict[str, Any]:
    m = evaluate(model, x_eval, w_eval, device)
    d_best = inference.nearest_nodes(
        model, inference.encode_all(model, x_eval, device), device).distance
    fit_rows = train_rows.sample(min(N_PCA_FIT, train_rows.height),
                                 seed=int(rng.integers(1_000_000_000)))
    x_fit, _ = load_rows(arch, fit_rows)
    pca = pca_baseline(x_fit, x_eval, w_eval)
    # The training distribution of latent distances (the drift threshold).
    d_train = inference.nearest_nodes(
        model, inference.encode_all(model, x_fit, device), device).distance
    return {"recon_mse_test": m["recon_mse"], "pca_mse_test": pca,
            "ae_over_pca": m["recon_mse"] / pca if pca > 0 else float("nan"),
            "qe": m["qe"], "te4": m["te4"], "te8": m["te8"],
            "frac_nodes_used": m["frac_nodes_used"], "n_eval": len(x_eval),
            "distance_p99": float(np.percentile(d_train, 99)),
            "distance_p99_test": float(np.percentile(d_best, 99)),
            "pca_components": int(min(PCA_COMPONENTS, len(x_fit) - 1))}
