"""The whole GPU measurement in one script (a few minutes on one GPU).

Here (the package installed), prepare the batched fitter's inputs once, then on the GPU
machine run the script with them beside the repository::

    python benchmarks/bench_gpu.py --prepare-fitter benchmarks/gpu_inputs   # here, ~2 min
    python benchmarks/bench_gpu.py --device cuda --fitter-inputs benchmarks/gpu_inputs

(``benchmarks/gpu_inputs`` is git-ignored: name it in the device run's ``carry``.)
``--device cpu --quick`` runs the same steps here, to check the script itself.

1. The batched fitter alone (:mod:`desomdb.science.batchcore`, loaded from its file: the GPU
   machine has torch and numpy but not the package's other dependencies) on the prepared
   spectra of one mock cube, repeated to batches of 256 to 4,096: fits/s, and the largest
   difference from the CPU result computed here. Without a CUDA device it prints "not run".
2. (Only where the package imports.) A small mock survey generated and ingested (CPU, all
   cores); encode and train-step throughput of the ``paper`` and ``compact`` networks, fp32
   and bf16 autocast, batch 128 (synthetic input; no I/O).
3. A ``paper``-preset DESOM-1 trained from the archive for ``--iterations`` (streaming
   from Parquet), its held-out MSE against PCA-256, and ``desomdb assign`` throughput
   including Parquet reads — the paper's figure of merit: 10,000 spectra in 150 s on a CPU.
4. Peak GPU memory (``torch.cuda.max_memory_allocated``) and host peak RSS.

Prints one JSON line per measurement and a summary table; never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BATCHCORE = Path(__file__).resolve().parents[1] / "desomdb" / "science" / "batchcore.py"
#: Spectra saved for the fitter (float32; 16 MB with the templates, under the 64 MiB a
#: device run carries).
N_FITTER_SPECTRA = 256


def _batchcore() -> Any:
    """Load batchcore.py from its file, without the package (and its dependencies)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("batchcore", BATCHCORE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batchcore"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def prepare_fitter(out: Path) -> None:
    """Write one mock cube's spectra, its templates and the CPU fit of them to ``out``."""
    from desomdb import mock
    from desomdb.archive.store import Archive
    from desomdb.atomic import read_parquet
    from desomdb.pipeline import ingest
    from desomdb.science import batchfit, fitting, spectra

    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    survey = mock.generate_survey(work / "survey", 1, "DR15", seed=5, ifu_sizes=(61,),
                                  progress=False)
    arch = work / "archive"
    ingest.ingest(arch, ingest.IngestJob(
        release="DR15", cubes=str(survey.release_dir), drpall=str(survey.drpall_path),
        workers=2, config=ingest.IngestConfig(target_snr=10)), progress=False)
    a = Archive(arch)
    part = a.files("spectra")[0]
    table = read_parquet(str(part))
    bax = {r["bin_id"]: r["norm_flux"] for r in a.read(
        "baxels", columns=["bin_id", "norm_flux"]).to_pylist()}
    z = float(a.read("galaxies", columns=["z"]).column("z")[0].as_py())
    flux, ivar, mask = (spectra.from_list_column(table.column(c))
                        for c in ("flux", "ivar", "mask"))
    kept = []
    for i, b in enumerate(table.column("bin_id").to_pylist()):
        _, prepared = fitting._prepare(flux[i], ivar[i], mask[i], bax[b])
        if prepared is not None:
            kept.append(prepared)
    kept = kept[:N_FITTER_SPECTRA]
    galaxy, noise, good = (np.array([k[j] for k in kept]) for j in range(3))
    setup = fitting._setup_for({}, z, None)
    tp = batchfit._templates(setup, "cpu", fitting.FitOptions().regul)
    core = _batchcore()
    with batchfit.torch_threads(1):
        t0 = time.process_time()
        ref = [core.solve(tp, torch.as_tensor(galaxy[i:i + 8], dtype=torch.float64),
                          _weight(noise[i:i + 8], good[i:i + 8], "cpu"))
               for i in range(0, len(kept), 8)]
        cpu_s = (time.process_time() - t0) / len(kept)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = tp.to_arrays()
    np.savez(out / "templates.npz", **arrays)
    np.savez(out / "spectra.npz", galaxy=galaxy.astype(np.float32),
             noise=noise.astype(np.float32), good=good,
             kin=np.concatenate([r.kin.numpy() for r in ref]),
             a_v=np.concatenate([r.a_v.numpy() for r in ref]),
             chi2=np.concatenate([r.fit.chi2.numpy() for r in ref]),
             cpu_seconds_per_fit=cpu_s)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"prepared": str(out), "spectra": len(kept),
                      "cpu_seconds_per_fit_one_thread": cpu_s}))


def _weight(noise: np.ndarray, good: np.ndarray, device: str) -> Any:
    """1/noise on the good bins, 0 elsewhere, as a float64 tensor on ``device``."""
    return torch.where(torch.as_tensor(good, device=device),
                       1.0 / torch.as_tensor(noise, dtype=torch.float64, device=device), 0.0)


def run_fitter(inputs: Path, device: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Fits/s of the batched fitter on ``device`` and its difference from the CPU result."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        result: dict[str, Any] = {"batch_fitter": f"not run (device {device}, CUDA "
                                                  f"{torch.cuda.is_available()})"}
        print(json.dumps(result))
        return result
    core = _batchcore()
    tp = core.Templates.from_arrays(np.load(inputs / "templates.npz"), device)
    d = np.load(inputs / "spectra.npz")
    n = len(d["galaxy"])
    result = {"batch_fitter_spectra": n, "cpu_seconds_per_fit": float(d["cpu_seconds_per_fit"])}
    for size in sizes:
        reps = -(-size // n)
        gal = torch.as_tensor(np.tile(d["galaxy"], (reps, 1))[:size], dtype=torch.float64,
                              device=device)
        noise, good = (np.tile(d[k], (reps, 1))[:size] for k in ("noise", "good"))
        w = _weight(noise, good, device)
        core.solve(tp, gal[:8], w[:8])  # warm-up (kernels, allocator)
        sync(device)
        t0 = time.perf_counter()
        best = core.solve(tp, gal, w)
        sync(device)
        fits_s = size / (time.perf_counter() - t0)
        m = min(n, size)
        result[f"batch_{size}_fits_per_s"] = fits_s
        result[f"batch_{size}_max_dv_kms"] = float(np.abs(
            best.kin[:m].cpu().numpy() - d["kin"][:m]).max())
        result[f"batch_{size}_max_rel_dchi2"] = float(np.abs(
            best.fit.chi2[:m].cpu().numpy() / d["chi2"][:m] - 1).max())
        if device.startswith("cuda"):
            result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"batch": size, "fits_per_s": fits_s}))
    print(json.dumps(result))
    return result


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(preset: str, device: str, precision: str, reps: int) -> dict[str, float]:
    """Encode and train-step spectra/s of one preset on random input (batch 128)."""
    from desomdb.som import model

    m = model.Desom(model.CONFIGS[preset]()).to(device)
    x = torch.randn(128, 4544, device=device)
    w = torch.ones_like(x)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    bf16 = precision == "bf16"
    with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
        m.encode(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            m.encode(x)
        sync(device)
        enc = reps * 128 / (time.perf_counter() - t)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-4)
    for i in range(reps + 1):
        if i == 1:
            sync(device)
            t = time.perf_counter()
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            z = m.encode(x)
            x_hat = m.decode(z)
        loss = model.masked_mse(x, x_hat.float(), w) + 5e-4 * m.som_loss(z.float(), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return {"encode_per_s": enc, "train_per_s": reps * 128 / (time.perf_counter() - t)}


def main() -> None:
    """Run every GPU measurement and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-gpu"))
    parser.add_argument("--galaxies", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (script check)")
    parser.add_argument("--prepare-fitter", type=Path, metavar="DIR",
                        help="write the batched fitter's inputs to DIR and stop (here)")
    parser.add_argument("--fitter-inputs", type=Path, metavar="DIR",
                        default=Path(__file__).resolve().parent / "gpu_inputs")
    args = parser.parse_args()
    if args.prepare_fitter:
        prepare_fitter(args.prepare_fitter)
        return
    if args.quick:
        args.galaxies, args.iterations = 3, 60
    reps = 3 if args.quick else 50
    dev = args.device
    info = {"device": dev, "name": torch.cuda.get_device_name() if dev.startswith("cuda")
            else "cpu", "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    print(json.dumps(info))
    fitter = (run_fitter(args.fitter_inputs, dev, (16,) if args.quick else (256, 1024, 4096))
              if (args.fitter_inputs / "spectra.npz").exists()
              else {"batch_fitter": f"not run (no inputs in {args.fitter_inputs}: "
                                    "--prepare-fitter first)"})
    try:
        from desomdb import mock
        from desomdb.archive.store import Archive
        from desomdb.pipeline import assign, ingest, train
        from desomdb.query import views
        from desomdb.som import model, registry
    except ImportError as exc:
        print(json.dumps({"desom": f"not run ({exc}): the package's dependencies are "
                                   "not installed here", **fitter}))
        return
    results: dict[str, object] = {}
    for preset in ("paper", "compact"):
        for precision in ("fp32", "bf16"):
            r = throughput(preset, dev, precision, reps)
            results[f"{preset}/{precision}"] = r
            print(json.dumps({"preset": preset, "precision": precision, **r}))

    shutil.rmtree(args.out, ignore_errors=True)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    t = time.perf_counter()
    survey = mock.generate_survey(args.out / "survey", args.galaxies, "DR15", seed=3,
                                  workers=workers, ifu_sizes=(37, 61), progress=False)
    arch_path = args.out / "archive"
    ingest.ingest(arch_path, ingest.IngestJob(release="DR15", cubes=str(survey.release_dir),
                                              drpall=str(survey.drpall_path), workers=workers),
                  progress=False)
    n = Archive(arch_path).read("baxels", columns=["bin_id"]).num_rows
    print(json.dumps({"mock_and_ingest_s": time.perf_counter() - t, "baxels": n}))

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    its = args.iterations
    cfg = model.paper_config(iterations=its, decay_iters=int(its * 0.8),
                             pretrain_iters=its // 5, eval_every=max(its // 10, 1),
                             patience=1000)
    t = time.perf_counter()
    model_id = train.train(arch_path, cfg, device=dev, progress=False)
    train_s = time.perf_counter() - t
    registry.set_current_model(Archive(arch_path), model_id)
    metrics = json.loads(views.connect(arch_path).sql(
        "select metrics from models where model_id = ?", params=[model_id]).fetchall()[0][0])
    out = assign.assign(arch_path, model_id, device=dev, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda") else None
    summary = {"paper_train_s": train_s, "iterations": metrics["iterations_run"],
               "train_spectra_per_s": metrics["train_spectra_per_s"],
               "recon_mse_test": metrics["recon_mse_test"],
               "pca256_mse_test": metrics["pca_mse_test"],
               "ae_over_pca": metrics["ae_over_pca"], "qe": metrics["qe"],
               "te4": metrics["te4"], "assign_spectra_per_s": out.spectra_per_s,
               "seconds_per_10k_spectra": 1e4 / out.spectra_per_s,
               "paper_cpu_seconds_per_10k": 150.0, "gpu_peak_mb": peak,
               "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    summary.update({k: v for k, v in fitter.items() if isinstance(v, float)})
    print(json.dumps(summary))
    print(f"\n{'measure':40s} value")
    for key, value in {**{f"{k} encode/s": v["encode_per_s"] for k, v in results.items()
                          if isinstance(v, dict)},
                       **{f"{k} train/s": v["train_per_s"] for k, v in results.items()
                          if isinstance(v, dict)}, **summary}.items():
        print(f"{key:40s} {value if value is None else round(float(value), 4)}")


if __name__ == "__main__":
    main()
