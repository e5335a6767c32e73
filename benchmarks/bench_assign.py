"""Assignment throughput (1 and 2 workers) against the previous implementation; peak RSS.

Run: python benchmarks/bench_assign.py --source ARCHIVE [--spectra 6000] [--rounds 2]
                                      [--rss-sizes 4000,16000]

``--source`` is any ingested and labelled archive (``desomdb demo`` makes one): its spectra
and label rows seed a synthetic archive of ``--spectra`` spectra in ~250-baxel cubes
(``bench_scale.build``: real mock spectra re-noised by their inverse variance) with a label
row per baxel (sampled from the source), so ``node_labels`` runs as it does on a real archive.
A compact 15x15 DESOM-1 is trained briefly on it (the map's quality does not change the cost
of assigning). Then, interleaved for ``--rounds`` rounds on fresh hard-linked copies of the
unassigned archive:

* ``baseline``: the previous implementation, kept here only as the yardstick — per cube
  ``pq.read_table`` of every column, 0/1 mask weights, ``np.add.at`` node co-adds, staged and
  committed 32 cubes at a time, in this process with torch on 1 thread (and on 2 threads,
  as ``desomdb assign`` ran before it had ``--workers``);
* ``assign(workers=1)`` and ``assign(workers=2)``: :func:`desomdb.pipeline.assign.assign`.

Throughput is spectra encoded per second of the cube loop including Parquet reads, writes and
commits (``AssignReport.spectra_per_s``; the same span for the baseline); the whole call
(node co-adds, node_labels, similarity index) is printed beside it. Peak RSS: ``assign``
with 2 workers in a fresh process per archive size (labels present), the parent's and the
largest worker's ``ru_maxrss`` (the stage process's own peak is its VmHWM; a worker's
``ru_maxrss`` can include what it inherited at fork, so it is an upper bound). Nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import build

from desomdb.archive import paths
from desomdb.archive.records import StagedFile
from desomdb.archive.store import Archive
from desomdb.pipeline import assign, train
from desomdb.science import spectra
from desomdb.som import registry
from desomdb.som.inference import normalised
from desomdb.som.model import compact_config
from desomdb.som.registry import load_model


def add_labels(source: Path, root: Path, seed: int = 0) -> None:
    """Give every baxel of ``root`` a label row and an S/N sampled from the source archive."""
    src = Archive(source).read("labels").drop_columns(["release"])
    arch = Archive(root)
    bax = arch.read("baxels", columns=["plateifu", "bin_id"])
    rng = np.random.default_rng(seed)
    fitter = str(src.column("fitter")[0].as_py())
    adds = []
    with arch.writer("bench_assign labels") as w:
        for plateifu in sorted(set(bax.column("plateifu").to_pylist())):
            ids = bax.filter(pc.equal(bax.column("plateifu"), plateifu)).column("bin_id")
            rows = src.take(pa.array(rng.integers(0, src.num_rows, len(ids))))
            rows = rows.set_column(rows.schema.get_field_index("plateifu"), "plateifu",
                                   pa.array([plateifu] * len(ids)))
            rows = rows.set_column(rows.schema.get_field_index("bin_id"), "bin_id",
                                   ids.cast(rows.schema.field("bin_id").type))
            adds.append(w.stage_table("labels", rows, paths.release_file(
                "labels", "DR17", paths.label_part_name(plateifu, fitter))))
        # the synthetic baxels lack the S/N that node_labels weighs members by: sample it too
        (old,) = arch.files("baxels")
        snr_src = Archive(source).read("baxels", columns=["snr"]).column("snr")
        full = pq.read_table(old)
        full = full.append_column("snr", snr_src.take(
            pa.array(rng.integers(0, len(snr_src), full.num_rows))))
        adds.append(w.stage_table("baxels", full, paths.release_file(
            "baxels", "DR17", paths.compact_name(arch.generation() + 1))))
        w.commit(add=adds, remove=[("baxels", str(old.relative_to(arch.root)))])


def make_archive(source: Path, root: Path, n: int, model_from: Path | None = None) -> str:
    """Build and label the benchmark archive, train (or adopt) a model; return its id.

    With ``model_from`` the model of that archive is registered here instead of training
    one (assigning costs the same whatever data the map was trained on).
    """
    build(source, root, n)
    add_labels(source, root)
    if model_from is None:
        cfg = compact_config(iterations=40, decay_iters=30, pretrain_iters=10, eval_every=20,
                             map_rows=15, map_cols=15)
        model_id = train.train(root, cfg, progress=False)
    else:
        model_id = adopt_model(model_from, root)
    registry.set_current_model(Archive(root), model_id)
    return model_id


def adopt_model(src_root: Path, root: Path) -> str:
    """Register the current model of ``src_root`` (its registry rows and artefact) in ``root``."""
    src, arch = Archive(src_root), Archive(root)
    model_id = registry.current_model(src)
    assert model_id is not None
    shutil.copytree(paths.artefact_dir(src.root, model_id), paths.artefact_dir(arch.root, model_id))
    with arch.writer("bench_assign adopt") as w:
        adds = []
        for f in src.files("models", model_id=model_id):
            staged = w.staging_dir("adopt") / f.name
            shutil.copyfile(f, staged)
            adds.append(StagedFile("models", str(f.relative_to(src.root)), staged))
        w.commit(add=adds)
    return model_id


def baseline_assign(root: Path, model_id: str) -> tuple[float, np.ndarray]:
    """Assign with the previous implementation; return (spectra/s, nodes in file order)."""
    arch = Archive(root)
    model, _ = load_model(arch, model_id)
    bax = arch.read("baxels", columns=["plateifu", "bin_id", "norm_flux"]).to_pandas()
    norms = {k: g.set_index("bin_id")["norm_flux"] for k, g in bax.groupby("plateifu")}
    n_nodes = model.cfg.n_nodes
    sum_x = np.zeros((n_nodes, spectra.N_REST))
    sum_w = np.zeros((n_nodes, spectra.N_REST))
    counts = np.zeros(n_nodes, dtype=np.int64)
    nodes, n = [], 0
    t0 = time.perf_counter()
    with arch.writer("bench_assign baseline") as writer:
        pending = []
        for (release, plateifu), f in sorted(arch.cube_files("spectra").items()):
            table = pq.read_table(f)
            norm = norms[plateifu].loc[table.column("bin_id").to_numpy()].to_numpy()
            x, w = normalised(table, norm)
            rows, best = assign.assign_rows(model, x, table.column("bin_id"))
            rows = rows.append_column("plateifu", pa.array([plateifu] * rows.num_rows))
            rows = rows.append_column("release", pa.array([release] * rows.num_rows))
            pending.append(writer.stage_table("assignments", rows, paths.model_file(
                "assignments", model_id, paths.assignment_part_name(release, f.name))))
            if len(pending) >= 32:
                writer.commit(add=pending)
                pending = []
            np.add.at(sum_x, best, x * w)
            np.add.at(sum_w, best, w)
            counts += np.bincount(best, minlength=n_nodes)
            nodes.append(best)
            n += len(best)
        if pending:
            writer.commit(add=pending)
    return n / (time.perf_counter() - t0), np.concatenate(nodes)


def fresh_copy(base: Path, dst: Path) -> Path:
    """Hard-link copy of the unassigned archive (committed files are never modified)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base, dst, copy_function=os.link)
    return dst


CHILD = """
import json, resource, sys, time
from desomdb.pipeline import assign
t = time.perf_counter()
out = assign.assign(sys.argv[1], progress=False, workers=int(sys.argv[2]))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so this process would report
# the benchmark parent's size (which holds the source archive's arrays) at any archive size
with open("/proc/self/status") as status:
    own = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "spectra_per_s": out.spectra_per_s,
                  "peak_rss_mb": own,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> None:
    """Build the benchmark archive, time the baseline and assign interleaved, then RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--spectra", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rss-sizes", default="4000,16000")
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-assign"))
    parser.add_argument("--keep", action="store_true",
                        help="keep OUT afterwards and reuse its benchmark archive if present")
    args = parser.parse_args()
    base = args.out / "base"
    if args.keep and (base / paths.MANIFEST).exists():
        model_id = registry.current_model(Archive(base)) or ""
        args.spectra = Archive(base).read("baxels", columns=["bin_id"]).num_rows
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        model_id = make_archive(args.source, base, args.spectra)
    print(f"archive: {args.spectra} spectra in ~250-baxel cubes, labels present, "
          f"model {model_id} (compact, 15x15); {os.cpu_count()} CPUs")
    rates: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    same = True
    n_threads = torch.get_num_threads()
    for _ in range(args.rounds):
        for name in ("baseline 1 thread", "baseline 2 threads", "assign workers=1",
                     "assign workers=2"):
            root = fresh_copy(base, args.out / "run")
            t = time.perf_counter()
            if name.startswith("baseline"):
                torch.set_num_threads(1 if "1 thread" in name else 2)
                rate, ref = baseline_assign(root, model_id)
                torch.set_num_threads(n_threads)
            else:
                out = assign.assign(root, progress=False, workers=int(name[-1]))
                rate = out.spectra_per_s
                got = np.concatenate([pq.read_table(f, columns=["node"]).column(0).to_numpy()
                                      for f in sorted(Archive(root).files(
                                          "assignments", model_id=model_id))])
                same &= bool(np.array_equal(got, ref))
            rates.setdefault(name, []).append(rate)
            walls.setdefault(name, []).append(time.perf_counter() - t)
    ref_rate = float(np.median(rates["baseline 1 thread"]))
    for name in rates:
        r = float(np.median(rates[name]))
        print(f"{name:20s} {r:7.0f} spectra/s incl. Parquet ({r / ref_rate:4.2f}x baseline "
              f"1 thread); whole call {np.median(walls[name]):5.1f} s")
    print(f"same assignments as the baseline: {same}")
    for n in (int(v) for v in args.rss_sizes.split(",")):
        root = args.out / f"rss{n}"
        make_archive(args.source, root, n, model_from=base)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e9
        res = subprocess.run([sys.executable, "-c", CHILD, str(root), "2"],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"N={n} ({size:.2f} GB Parquet, labels present): assign --workers 2 peak RSS "
              f"parent {r['peak_rss_mb']:.0f} MB, largest worker {r['worker_rss_mb']:.0f} MB, "
              f"{r['seconds']:.0f} s, {r['spectra_per_s']:.0f} spectra/s")
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: python {sys.version.split()[0]}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
