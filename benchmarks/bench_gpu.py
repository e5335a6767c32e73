"""The whole GPU measurement in one script (a few minutes on one GPU).

Run on the GPU machine: python benchmarks/bench_gpu.py --device cuda [--out DIR]
(``--device cpu --quick`` runs the same steps here, to check the script itself.)

1. Generates a small mock survey and ingests it (CPU, all cores), so the script needs no
   data beside the repository.
2. Encode and train-step throughput of the ``paper`` and ``compact`` networks, fp32 and
   bf16 autocast, batch 128 (synthetic input; no I/O).
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

import torch

from desomdb import mock
from desomdb.archive.store import Archive
from desomdb.pipeline import assign, ingest, train
from desomdb.query import views
from desomdb.som import model, registry


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(preset: str, device: str, precision: str, reps: int) -> dict[str, float]:
    """Encode and train-step spectra/s of one preset on random input (batch 128)."""
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
    args = parser.parse_args()
    if args.quick:
        args.galaxies, args.iterations = 3, 60
    reps = 3 if args.quick else 50
    dev = args.device
    info = {"device": dev, "name": torch.cuda.get_device_name() if dev.startswith("cuda")
            else "cpu", "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    print(json.dumps(info))
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
    print(json.dumps(summary))
    print(f"\n{'measure':40s} value")
    for key, value in {**{f"{k} encode/s": v["encode_per_s"] for k, v in results.items()
                          if isinstance(v, dict)},
                       **{f"{k} train/s": v["train_per_s"] for k, v in results.items()
                          if isinstance(v, dict)}, **summary}.items():
        print(f"{key:40s} {value if value is None else round(float(value), 4)}")


if __name__ == "__main__":
    main()
