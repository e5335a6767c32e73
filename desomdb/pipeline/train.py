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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import read_parquet
from desomdb.errors import ArchiveError, ConfigError, ModelError
from desomdb.query import views
from desomdb.runtime import runner
from desomdb.runtime.progress import progress_bar
from desomdb.som import checkpoint, inference, registry
from desomdb.som.lattice import fit_som, quantization_error, temperature, topographic_error
from desomdb.som.model import Desom, DesomConfig, init_prototypes, masked_mse, som_step

DEFAULT_WHERE = "trainable"
TEST_FRACTION = 0.2
N_EVAL = 2048
N_PCA_FIT = 20000
PCA_COMPONENTS = 256
#: Training rows drawn for the input mean and scale (before AE pre-training).
N_STANDARDISE = 4096
#: Training rows encoded for the batch-SOM organisation of the prototypes.
N_SOM_FIT = 4096


@dataclass
class Selection:
    """The training data: which baxels, and how galaxies split."""

    rows: pl.DataFrame  # release, plateifu, bin_id, mangaid, norm_flux, split
    where: str
    seed: int

    def spec(self) -> dict[str, Any]:
        """JSON-ready description stored with the model."""
        counts = self.rows.group_by("split").len().to_dicts()
        return {"where": self.where, "seed": self.seed, "test_fraction": TEST_FRACTION,
                "split_by": "mangaid", "counts": {c["split"]: c["len"] for c in counts},
                "releases": sorted(self.rows["release"].unique().to_list())}


def galaxy_test_split(mangaids: list[str], salt: str, fraction: float) -> np.ndarray:
    """Seeded hash split by galaxy: True for test galaxies.

    A galaxy is in the test set when sha256(salt + mangaid) maps below ``fraction``; with
    more than one galaxy at least one is always held out.
    """
    u = np.array([int(hashlib.sha256(f"{salt}{m}".encode()).hexdigest()[:8], 16) / 2**32
                  for m in mangaids])
    test = u < fraction
    if len(u) > 1 and not test.any():
        test[np.argmin(u)] = True  # tiny archives: keep one galaxy out for evaluation
    return test


def select_training(arch: Archive, where: str = DEFAULT_WHERE, seed: int = 0) -> Selection:
    """Evaluate the training filter and split galaxies train/test by a seeded hash.

    Raises
    ------
    QueryError
        If ``where`` is not valid SQL over the ``baxels`` view (the message lists columns).
    ArchiveError
        If nothing is selected.
    """
    con = views.connect(arch.root)
    rel = views.query(
        con, "select release, plateifu, bin_id, mangaid, norm_flux from baxels "
        f"semi join latest_cubes using (release, plateifu) where {where}"
    )
    df = rel.pl()
    if df.height == 0:
        raise ArchiveError(f"{arch.root}: no baxel matches the training filter {where!r}")
    gal = df.select("mangaid").unique().sort("mangaid")
    test = galaxy_test_split(gal["mangaid"].to_list(), f"{seed}:", TEST_FRACTION)
    gal = gal.with_columns(pl.Series("split", np.where(test, "test", "train")))
    return Selection(df.join(gal, on="mangaid"), where, seed)


def _cube_rows(file: Path, group: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectra and weights of one cube's selected baxels, in ``group`` order."""
    t = read_parquet(file)
    pos = {int(b): i for i, b in enumerate(t.column("bin_id").to_numpy())}
    return inference.normalised(t.take([pos[int(b)] for b in group["bin_id"]]),
                      group["norm_flux"].to_numpy())


def load_rows(arch: Archive, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectra and weights of the given rows, in their order."""
    files = arch.cube_files("spectra")
    xs, ws, order = [], [], []
    for (release, plateifu), group in rows.with_row_index("_i").group_by(
        "release", "plateifu", maintain_order=True
    ):
        x, w = _cube_rows(files[(str(release), str(plateifu))], group)
        xs.append(x)
        ws.append(w)
        order.append(group["_i"].to_numpy())
    idx = np.argsort(np.concatenate(order))
    return np.concatenate(xs)[idx], np.concatenate(ws)[idx]


def _shuffle_plan(sizes: Sequence[int], batch_size: int, rng: np.random.Generator,
                  buffer_rows: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Draw the shuffle of an endless batch stream, without the data.

    Each epoch visits the groups in a random order, buffering groups until ``buffer_rows``
    rows, and cuts a random permutation of each buffer into batches.

    Yields
    ------
    groups : tuple of int
        Indices into ``sizes`` of the groups in the current buffer, in buffer order.
    rows : ndarray of int, shape (<= batch_size,)
        Row indices into that buffer forming one batch.
    """
    while True:
        order = rng.permutation(len(sizes))
        buf: list[int] = []
        n_buf = 0
        for j, k in enumerate(order):
            buf.append(int(k))
            n_buf += int(sizes[k])
            if n_buf >= buffer_rows or j == len(order) - 1:
                perm = rng.permutation(n_buf)
                for s in range(0, max(n_buf - batch_size, 0) + 1, batch_size):
                    yield tuple(buf), perm[s : s + batch_size]
                buf, n_buf = [], 0


class BatchStream:
    """Endless shuffled batches ``(x, w)`` that a resumed training can fast-forward.

    The shuffle depends only on ``rng`` and the group sizes, so :meth:`skip` replays the
    draws of ``n`` batches without reading any data, leaving the stream (and ``rng``) exactly
    where an uninterrupted run had them.

    Parameters
    ----------
    sizes : sequence of int
        Rows per group (e.g. per cube).
    load : callable
        ``load(groups)`` returns ``(x, w)`` of those groups' rows concatenated in that order,
        each shape (n_rows, ...), float32.
    batch_size : int
    rng : numpy.random.Generator
        Drawn from by this stream only.
    buffer_rows : int
        Rows shuffled together (bounds memory).
    """

    def __init__(self, sizes: Sequence[int],
                 load: Callable[[tuple[int, ...]], tuple[np.ndarray, np.ndarray]],
                 batch_size: int, rng: np.random.Generator, buffer_rows: int = 8192):
        self.rng = rng
        #: Number of batches drawn (or skipped) so far.
        self.position = 0
        self._plan = _shuffle_plan(sizes, batch_size, rng, buffer_rows)
        self._load = load
        self._groups: tuple[int, ...] | None = None
        self._x = self._w = np.zeros((0, 0), np.float32)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        groups, rows = next(self._plan)
        if groups != self._groups:
            self._x, self._w = self._load(groups)
            self._groups = groups
        self.position += 1
        return self._x[rows], self._w[rows]

    def skip(self, n: int) -> None:
        """Draw ``n`` batches' worth of shuffling without loading data."""
        for _ in range(n):
            next(self._plan)
        self.position += n
        self._groups = None


def stream_batches(arch: Archive, rows: pl.DataFrame, batch_size: int, rng: np.random.Generator,
                   buffer_rows: int = 8192) -> BatchStream:
    """Endless shuffled batches, reading a few cubes at a time (memory ~ buffer_rows)."""
    files = arch.cube_files("spectra")
    groups = dict(rows.group_by("release", "plateifu"))
    keys = list(groups)

    def load(which: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_cube_rows(files[(str(keys[k][0]), str(keys[k][1]))], groups[keys[k]])
                 for k in which]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return BatchStream([groups[k].height for k in keys], load, batch_size, rng, buffer_rows)


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
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
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
    while loop["it"] < total and not loop["stopped"]:
        it = loop["it"]
        if it == cfg.pretrain_iters and not loop["initialised"]:
            _initialise_prototypes(model, batches, device, loop)
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
        loop["it"] = it + 1
        bar.update(1)
        bar.set_postfix(rec=f"{loss_rec.item():.4g}", som=f"{som.item():.4g}")
        if loop["it"] % cfg.eval_every == 0 or loop["it"] == total:
            _evaluate_and_stop(model, x_eval, w_eval, device, loop)
            loop["seconds"] = time.perf_counter() - t_start
            loop["batches"] = batches.position
            checkpoint.save_resume_state(state_path, model, opt, loop,
                                         checkpoint.rng_states(batches.rng))
    bar.close()
    loop["seconds"] = time.perf_counter() - t_start
    return loop


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
