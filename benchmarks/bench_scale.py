"""Peak memory of training and assignment as the archive grows: is it bounded?

Run: python benchmarks/bench_scale.py --source desomdb-demo/archive [--sizes 24000,120000]

For each size N, writes a synthetic archive of N spectra — real mock spectra of the source
archive, each copy rescaled and re-noised by its own inverse variance — in per-cube
Parquet files of ~250 baxels (a MaNGA-like cube), then runs, each in a fresh process,
``train`` (compact preset, 300 iterations; the PCA-256 baseline on its fixed 20,000-spectrum
sample included) and ``assign`` over every spectrum, and prints each one's peak RSS
(``ru_maxrss``) and wall time. Streaming means the RSS should not grow with N; the full
survey (1.2 M spectra, ~21 GB float32) is 10x the largest size here and did not fit this
machine's disk budget for a benchmark.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.science import spectra

PER_CUBE = 250


def build(source: Path, root: Path, n: int, seed: int = 0) -> None:
    """Write a synthetic archive of ``n`` spectra drawn from the source archive."""
    src = Archive(source)
    files = src.files("spectra")
    tables = [pq.read_table(f) for f in files[:8]]
    flux = np.concatenate([spectra.from_list_column(t.column("flux")) for t in tables])
    ivar = np.concatenate([spectra.from_list_column(t.column("ivar")) for t in tables])
    mask = np.concatenate([spectra.from_list_column(t.column("mask")) for t in tables])
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    arch = Archive(root, create=True)
    n_cubes = int(np.ceil(n / PER_CUBE))
    with arch.writer("bench_scale") as w:
        adds, cube_rows, bax = [], [], []
        for c in range(n_cubes):
            k = min(PER_CUBE, n - c * PER_CUBE)
            pick = rng.integers(0, len(flux), k)
            scale = rng.uniform(0.3, 3.0, k)[:, None].astype(np.float32)
            sd = np.where(ivar[pick] > 0, 1 / np.sqrt(np.maximum(ivar[pick], 1e-30)), 0)
            f = (flux[pick] + rng.standard_normal(sd.shape).astype(np.float32) * sd) * scale
            iv = ivar[pick] / scale**2
            plateifu, checksum = f"{9000 + c // 20}-{12701 + c % 20}", f"{c:012d}"
            name = paths.cube_part_name(plateifu, checksum)
            ids = np.arange(k, dtype=np.int32)
            adds.append(w.stage_table("spectra", pa.table({
                "plateifu": pa.array([plateifu] * k), "bin_id": pa.array(ids),
                "flux": spectra.to_list_column(f), "ivar": spectra.to_list_column(iv),
                "mask": spectra.to_list_column(mask[pick], pa.uint8())}),
                f"{paths.release_dir('spectra', 'DR17')}/{name}"))
            norm = spectra.norm_flux(f, mask[pick])
            bax.append(pa.table({
                "plateifu": pa.array([plateifu] * k), "bin_id": pa.array(ids),
                "mangaid": pa.array([f"1-{500000 + c}"] * k),
                "norm_flux": pa.array(norm.astype(np.float32)),
                "radius_re": pa.array(rng.uniform(0, 2, k).astype(np.float32)),
                "trainable": pa.array(np.isfinite(norm) & (norm > 0))}))
            cube_rows.append({"plateifu": plateifu, "mangaid": f"1-{500000 + c}",
                              "checksum": checksum, "status": "ok", "n_baxels": k,
                              "z": float(rng.uniform(0.01, 0.1))})
            if len(adds) >= 64:
                w.commit(add=adds)
                adds = []
        adds.append(w.stage_table("baxels", pa.concat_tables(bax),
                                  f"{paths.release_dir('baxels', 'DR17')}/compact-0.parquet"))
        adds.append(w.stage_table("cubes", pa.Table.from_pylist(cube_rows),
                                  f"{paths.release_dir('cubes', 'DR17')}/compact-0.parquet"))
        w.commit(add=adds)


CHILD = """
import json, resource, sys, time
from desomdb.pipeline import assign, train
from desomdb.som import model, registry
from desomdb.query import views
from desomdb.archive.store import Archive
root, stage = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if stage == "train":
    cfg = model.compact_config(iterations=300, decay_iters=240, pretrain_iters=60,
                               eval_every=100, map_rows=15, map_cols=15)
    mid = train.train(root, cfg, progress=False)
    registry.set_current_model(Archive(root), mid)
    extra = {}
else:
    out = assign.assign(root, progress=False)
    extra = {"spectra_per_s": out.spectra_per_s, "n": out.n_assigned}
print(json.dumps({"stage": stage, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **extra}))
"""


def main() -> None:
    """Build archives of growing size and report train/assign peak RSS for each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--sizes", default="24000,120000")
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-scale"))
    args = parser.parse_args()
    print(f"machine: {resource.getpagesize()} B pages; python {sys.version.split()[0]}")
    for n in (int(v) for v in args.sizes.split(",")):
        root = args.out / f"n{n}"
        t = time.perf_counter()
        build(args.source, root, n)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e9
        print(f"N={n}: built in {time.perf_counter() - t:.0f} s, {size:.2f} GB of Parquet")
        for stage in ("train", "assign"):
            res = subprocess.run([sys.executable, "-c", CHILD, str(root), stage],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rate = f", {r['spectra_per_s']:.0f} spectra/s" if "spectra_per_s" in r else ""
            print(f"  {stage}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.0f} s{rate}")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
