"""Peak memory of building ``node_labels``: whole tables in polars vs streamed from DuckDB.

Run: python benchmarks/bench_node_labels.py --source desomdb-demo/archive [--sizes 100000,400000]

For each size N, writes a synthetic archive of N labelled, assigned baxels: the source
archive's real ``labels`` rows (every column) repeated under new keys with jittered label
values, random nodes of a 15×15 map, and the matching ``cubes``/``baxels`` rows (250 baxels
per cube; labels in compacted files of 50,000 rows). Then, each in a fresh process, it
builds the table twice:

- ``polars`` (the baseline, the implementation before streaming): read the model's
  assignments and the whole labels table into polars, join, group per label and node;
- ``duckdb-stream``: :func:`desomdb.pipeline.node_labels.node_label_table` (DuckDB joins the Parquet
  files and streams members ordered by label, node and value; per-node reductions in NumPy),
  here with an error model present so ``lo68``/``hi68`` are computed too.

It prints each one's peak RSS (``ru_maxrss``) above that of a process that only imports the
same modules, and the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.pipeline import calibrate
from desomdb.science import fitting, label_catalogue

PER_CUBE = 250
#: Labels rows per Parquet file (compacted files of many cubes).
CHUNK = 50_000
MODEL_ID = "desom1-bench"


def build(source: Path, root: Path, n: int, seed: int = 0) -> None:
    """Write a synthetic archive of ``n`` labelled baxels assigned to a 15×15 map."""
    src = Archive(source)
    lab = pl.from_arrow(src.read("labels"))
    assert isinstance(lab, pl.DataFrame)
    lab = lab.filter(pl.col("status") == "ok").drop("release", strict=False)
    fitter = str(lab["fitter"].mode()[0])
    lab = lab.filter(pl.col("fitter") == fitter)
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    arch = Archive(root, create=True)
    n_cubes = int(np.ceil(n / PER_CUBE))
    cube = np.arange(n) // PER_CUBE
    names = np.array([f"{9000 + c // 20}-{12701 + c % 20}" for c in range(n_cubes)])
    bin_id = (np.arange(n) % PER_CUBE).astype(np.int32)
    with arch.writer("bench_node_labels") as w:
        adds = []
        for i, lo in enumerate(range(0, n, CHUNK)):
            hi = min(n, lo + CHUNK)
            k = hi - lo
            pick = lab[rng.integers(0, lab.height, k).tolist()]
            jitter = {name: pl.col(name) + pl.Series(rng.normal(0, 0.01, k))
                      for name in label_catalogue.NODE_LABELS}
            rows = pick.with_columns(pl.Series("plateifu", names[cube[lo:hi]]),
                                     pl.Series("bin_id", bin_id[lo:hi]), **jitter)
            adds.append(w.stage_table("labels", rows.to_arrow(), paths.release_file(
                "labels", "DR17", paths.compact_name(i))))
        keys = {"plateifu": pa.array(names[cube]), "bin_id": pa.array(bin_id)}
        adds.append(w.stage_table("baxels", pa.table({
            **keys, "snr": pa.array(rng.uniform(5, 60, n).astype(np.float32))}),
            paths.release_file("baxels", "DR17", paths.compact_name(0))))
        adds.append(w.stage_table("cubes", pa.table({
            "plateifu": pa.array(names), "status": pa.array(["ok"] * n_cubes)}),
            paths.release_file("cubes", "DR17", paths.compact_name(0))))
        adds.append(w.stage_table("assignments", pa.table({
            "release": pa.array(["DR17"] * n), **keys,
            "node": pa.array(rng.integers(0, 225, n).astype(np.int16))}),
            paths.model_file("assignments", MODEL_ID, "part-0.parquet")))
        err = pl.DataFrame([{"fitter": fitter, "label": name, "snr_lo": lo, "snr_hi": hi,
                             "n_baxels": 1, "sigma_stat": 0.1, "sigma_sys": 0.1,
                             "sigma": 0.1 * np.sqrt(2)}
                            for name in label_catalogue.NODE_LABELS
                            for lo, hi in itertools.pairwise(calibrate.SNR_EDGES)])
        adds.append(w.stage_table(paths.LABEL_ERRORS, err.to_arrow(), paths.release_file(
            paths.LABEL_ERRORS, "DR17", paths.label_errors_name(fitter))))
        w.commit(add=adds)


CHILD = """
import json, resource, sys, time
import numpy as np
import polars as pl
from desomdb.pipeline import node_labels
from desomdb.query import versions
from desomdb.archive.store import Archive
root, how, model_id = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
arch = Archive(root)
if how == "polars":
    a = pl.from_arrow(arch.read("assignments", columns=["release", "plateifu", "bin_id", "node"],
                                model_id=model_id))
    lab = pl.from_arrow(arch.read("labels"))
    a = versions.keep_latest(arch, a.drop("model_id", strict=False))
    joined = a.join(lab.filter((pl.col("status") == "ok") & pl.col("chi2_ok")),
                    on=["release", "plateifu", "bin_id"])
    n = 0
    for label, (lo, hi, nbins) in label_catalogue.EDGES.items():
        sel = joined
        if label in label_catalogue.CUTS:
            sel = sel.filter(pl.col(label_catalogue.CUTS[label]))
        sel = sel.filter(pl.col(label).is_not_nan() & pl.col(label).is_not_null())
        edges = np.linspace(lo, hi, nbins + 1)
        for _, g in sel.group_by("node"):
            v = g[label].to_numpy()
            np.histogram(np.clip(v, lo, hi), bins=edges)
            np.percentile(v, [16, 50, 84])
            n += 1
elif how == "duckdb-stream":
    n = node_labels.node_label_table(arch, model_id).num_rows
else:
    n = 0
print(json.dumps({"how": how, "seconds": time.perf_counter() - t, "rows": n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(root: Path, how: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(root), how, MODEL_ID],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build archives of growing size and report node_labels peak RSS for both methods."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-node-labels"))
    args = parser.parse_args()
    print(f"labels fitter of this version: {fitting.FITTER}")
    for n in (int(v) for v in args.sizes.split(",")):
        root = args.out / f"n{n}"
        t = time.perf_counter()
        build(args.source, root, n)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
        print(f"N={n}: built in {time.perf_counter() - t:.0f} s, {size:.0f} MB of Parquet")
        base = _child(root, "imports")["peak_rss_mb"]
        res = {how: _child(root, how) for how in ("polars", "duckdb-stream")}
        extra = {how: r["peak_rss_mb"] - base for how, r in res.items()}
        for how, r in res.items():
            print(f"  {how:14s} peak RSS {r['peak_rss_mb']:.0f} MB ({extra[how]:.0f} MB above "
                  f"imports), {r['seconds']:.1f} s")
        print(f"  ratio polars / duckdb-stream (above imports): "
              f"{extra['polars'] / max(extra['duckdb-stream'], 1.0):.1f}x")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
