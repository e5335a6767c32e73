"""A synthetic survey of N = 10, 100, 1,000 small-IFU cubes through the whole pipeline.

Run: python benchmarks/bench_survey.py [--sizes 10,100,1000] [--workers 2] [--out DIR]
     python benchmarks/bench_survey.py --quick     # N = 10 only (CI-sized)

For each N:

1. **cubes** — a pool of distinct 19-fibre mock cubes is rendered once (``desomdb.mock``,
   MIUSCAT); cube ``i`` of the survey is pool cube ``i mod P`` under its own plate-IFU and
   mangaid with a *fresh noise realisation* (flux + N(0, 1/ivar) per voxel, seeded by
   ``i``), written as plain ``.fits`` in batches and deleted after its batch is ingested, so
   N = 1,000 fits the disk (identical pixels would trip the carry-over shortcuts and measure
   nothing). Writing the cubes is not timed.
2. **ingest** (DR15), **label** (2 pPXF fits per cube), **train** (a fixed, small schedule:
   its cost should not depend on N beyond selecting the rows), **assign**, **fingerprints**
   (+ DESOM-2), **query** (``setup.sql`` views: one aggregate over ``baxel_labels``) and
   **check** (every committed file's size and sha256), each in a fresh process whose wall
   time and peak RSS (its own VmHWM; the workers' are not included) are recorded;
3. **refresh** to a second release (DR17) in which 80 % of the cubes are byte-identical
   (regenerated from the same seed: carried over) and 20 % re-processed (new noise). The
   release arrives in batches of ``REFRESH_BATCH`` cubes (one refresh each; N = 1,000 cubes
   at once would need ~94 GB of uncompressed cube files), so from N > 250 on, its fixed
   costs (node co-adds and label PDFs rebuilt, fingerprints updated) are paid per batch.

It prints a table per stage: time and peak RSS per N, and the growth exponent b of
t ∝ N^b fitted over the sizes run (b ≤ ~1.1 is linear within the noise of this machine),
then an extrapolation to MaNGA DR17 (10,700 cubes) per stage. Small IFUs have fewer baxels
than the survey's mix (DR15: 1.17 M baxels / 4,682 cubes = 250 per cube), so the per-baxel
stages are also scaled by baxels.
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
from astropy.io import fits
from astropy.table import Table

DR17_CUBES = 10_700
SURVEY_BAXELS_PER_CUBE = 1.17e6 / 4682
CARRIED = 0.8
#: Cubes written to disk at a time (a 19-fibre cube is ~94 MB uncompressed; ingest and
#: refresh run once per batch, as cubes arriving in batches would be refreshed).
INGEST_BATCH = 100
REFRESH_BATCH = 250

CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
stage, root = args["stage"], args["root"]
t = time.perf_counter()
extra = {}
if stage == "ingest":
    from desomdb.pipeline import ingest
    job = ingest.IngestJob(release=args["release"], cubes=args["cubes"], drpall=args["drpall"],
                           workers=args["workers"])
    rep = ingest.ingest(root, job, progress=False)
    extra = {"n_cubes": rep.n_ingested, "n_carried": rep.n_carried}
elif stage == "label":
    from desomdb.pipeline import labels
    rep = labels.label(root, workers=args["workers"], progress=False,
                       max_per_cube=args["fits_per_cube"])
    extra = {"n_fits": rep.n_fits}
elif stage == "train":
    from desomdb.som import model, registry
    from desomdb.pipeline import train
    from desomdb.archive.store import Archive
    cfg = model.compact_config(map_rows=8, map_cols=8, iterations=args["iterations"],
                               decay_iters=int(args["iterations"] * 0.8),
                               pretrain_iters=args["iterations"] // 4, batch_size=32,
                               eval_every=max(args["iterations"] // 2, 1), seed=0)
    mid = train.train(root, cfg, progress=False)
    registry.set_current_model(Archive(root), mid)
elif stage == "assign":
    import inspect
    from desomdb.pipeline import assign
    params = inspect.signature(assign.assign).parameters
    kw = {"workers": args["workers"]} if "workers" in params else {}
    rep = assign.assign(root, progress=False, **kw)
    extra = {"n_baxels": rep.n_assigned}
elif stage == "fingerprints":
    from desomdb.pipeline import fingerprint
    fingerprint.build(root, progress=False)
elif stage == "query":
    from desomdb.query import views
    con = views.connect(root)
    con.sql("select node, count(*), avg(age_mw_gyr) from baxel_labels group by node").fetchall()
    n = con.sql("select count(*) from baxels where release = 'DR15'").fetchall()[0][0]
    extra = {"n_dr15_baxels": int(n)}
elif stage == "check":
    from desomdb.products import check
    rep = check.check(root)
    extra = {"n_problems": len(rep.problems)}
elif stage == "refresh":
    from desomdb.pipeline import ingest, refresh
    job = ingest.IngestJob(release=args["release"], cubes=args["cubes"], drpall=args["drpall"],
                           workers=args["workers"])
    rep = refresh.refresh(root, job, refresh.RefreshOptions(
        label_max_per_cube=args["fits_per_cube"]), progress=False)
    extra = {"n_carried": rep.ingest.n_carried}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so this process (and its
# workers) would report the benchmark parent's size (it holds the cube pool) instead
with open("/proc/self/status") as status:
    self_mb = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "rss_mb": self_mb, **extra}))
"""


def run_stage(stage: str, root: Path, **kw: object) -> dict:
    """Run one stage in a fresh process; return its seconds, peak RSS (MB) and extras."""
    args = json.dumps({"stage": stage, "root": str(root), **kw}, default=str)
    # passive OpenMP threads: spinning torch threads on a shared 2-core box made one train
    # stage 15x slower instead of ~2x (541 s vs 35 s at N = 10) when anything else ran
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    res = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {stage}: {out['seconds']:.1f} s, {out['rss_mb']:.0f} MB", flush=True)
    return out


class Pool:
    """Distinct mock cubes (in memory) and their drpall rows, to copy with fresh noise."""

    def __init__(self, folder: Path, n: int, workers: int) -> None:
        from desomdb import mock  # the benchmark makes its own data; the pipeline never does

        survey = mock.generate_survey(folder, n, "DR15", seed=11, workers=workers,
                                      ifu_sizes=(19,), progress=False)
        files = sorted(survey.release_dir.glob("*/stack/*-LOGCUBE.fits.gz"))
        self.hdus = [fits.open(f, memmap=False) for f in files]
        for h in self.hdus:
            h.readall()
        drpall = Table.read(survey.drpall_path)
        by_plateifu = {str(r["plateifu"]).strip(): i for i, r in enumerate(drpall)}
        self.rows = [by_plateifu[str(h[0].header["PLATEIFU"]).strip()] for h in self.hdus]
        self.drpall = drpall

    @staticmethod
    def name(i: int) -> tuple[str, str, int, int]:
        """Plate-IFU, mangaid, plate and IFU design of survey cube ``i``."""
        plate, ifu = 20000 + i // 2, 1901 + i % 2
        return f"{plate}-{ifu}", f"1-{700000 + i}", plate, ifu

    def write_drpall(self, n: int, path: Path) -> None:
        """Write the drpall of an ``n``-cube survey."""
        t = self.drpall[[self.rows[i % len(self.rows)] for i in range(n)]]
        names = [self.name(i) for i in range(n)]
        t["plateifu"] = [s[0] for s in names]
        t["mangaid"] = [s[1] for s in names]
        t["plate"] = np.array([s[2] for s in names], dtype=np.int32)
        t["ifudsgn"] = [str(s[3]) for s in names]
        path.parent.mkdir(parents=True, exist_ok=True)
        t.write(path, format="fits", overwrite=True)

    def write_cube(self, i: int, folder: Path, noise_seed: int) -> Path:
        """Write survey cube ``i`` with the noise realisation ``noise_seed``."""
        src = self.hdus[i % len(self.hdus)]
        plateifu, mangaid, plate, ifu = self.name(i)
        out = fits.HDUList([h.copy() for h in src])
        hdr = out[0].header
        hdr["PLATEIFU"], hdr["MANGAID"], hdr["PLATEID"], hdr["IFUDSGN"] = (
            plateifu, mangaid, plate, str(ifu))
        ivar = np.asarray(out["IVAR"].data, dtype=np.float32)
        rng = np.random.default_rng([noise_seed, i])
        sd = np.where(ivar > 0, 1 / np.sqrt(np.maximum(ivar, 1e-30)), 0).astype(np.float32)
        out["FLUX"].data = (np.asarray(out["FLUX"].data, dtype=np.float32)
                            + rng.standard_normal(ivar.shape, dtype=np.float32) * sd)
        path = folder / str(plate) / "stack" / f"manga-{plateifu}-LOGCUBE.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        out.writeto(path, overwrite=True)
        return path


def ingest_in_batches(pool: Pool, n: int, root: Path, work: Path, release: str, drpall: Path,
                      workers: int, noise_seed: int, batch: int,
                      stage: str = "ingest", fits_per_cube: int = 2) -> dict:
    """Write cubes in batches, run the stage on each batch, delete the batch; sum the stage."""
    total = {"seconds": 0.0, "rss_mb": 0.0}
    for start in range(0, n, batch):
        folder = work / f"{release}-cubes"
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(start, min(n, start + batch)):
            carried = stage == "refresh" and i < round(CARRIED * n)
            pool.write_cube(i, folder, 0 if (stage == "ingest" or carried) else noise_seed)
        r = run_stage(stage, root, release=release, cubes=folder, drpall=drpall,
                      workers=workers, fits_per_cube=fits_per_cube)
        expected = len(range(start, min(n, start + batch, round(CARRIED * n))))
        if stage == "refresh" and r["n_carried"] != expected:
            raise SystemExit(f"refresh carried {r['n_carried']} cubes, expected {expected}")
        total["seconds"] += r["seconds"]
        total["rss_mb"] = max(total["rss_mb"], r["rss_mb"])
        for key in ("n_cubes", "n_carried"):  # counts add up over the batches
            if key in r:
                total[key] = total.get(key, 0) + r[key]
        shutil.rmtree(folder, ignore_errors=True)
    return total


def run_survey(pool: Pool, n: int, work: Path, workers: int, fits_per_cube: int,
               iterations: int) -> dict[str, dict]:
    """Run every stage on an ``n``-cube survey; return each stage's seconds and RSS."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "archive"
    out: dict[str, dict] = {}
    dr15, dr17 = work / "drpall-DR15.fits", work / "drpall-DR17.fits"
    pool.write_drpall(n, dr15)
    pool.write_drpall(n, dr17)
    out["ingest"] = ingest_in_batches(pool, n, root, work, "DR15", dr15, workers, 0,
                                      INGEST_BATCH)
    out["label"] = run_stage("label", root, workers=workers, fits_per_cube=fits_per_cube)
    out["train"] = run_stage("train", root, iterations=iterations)
    out["assign"] = run_stage("assign", root, workers=workers)
    out["fingerprints"] = run_stage("fingerprints", root)
    out["query"] = run_stage("query", root)
    out["refresh"] = ingest_in_batches(pool, n, root, work, "DR17", dr17, workers, 1,
                                       REFRESH_BATCH, stage="refresh",
                                       fits_per_cube=fits_per_cube)
    out["check"] = run_stage("check", root)
    out["_baxels"] = {"n": float(out["query"]["n_dr15_baxels"])}
    shutil.rmtree(work, ignore_errors=True)
    return out


def growth(ns: list[int], ts: list[float]) -> float:
    """Exponent b of a least-squares fit t = a N^b (nan with one size)."""
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(np.maximum(ts, 1e-6)), 1)[0])


def print_table(results: dict[int, dict[str, dict]], sizes: list[int], workers: int) -> None:
    """Print per-stage time and RSS per N, growth exponents and the DR17 extrapolation.

    ``b`` is fitted over every size; ``b_last`` between the two largest sizes only (fixed
    costs weigh less there, so it is the better test of linear growth).
    """
    stages = [s for s in results[sizes[0]] if not s.startswith("_")]
    head = "".join(f" | N={n:>5} s, MB" for n in sizes)
    print(f"\n| stage        {head} | b | b_last | DR17 2 cores | DR17 64 cores |")
    print("|---" * (len(sizes) + 5) + "|")
    big = sizes[-1]
    baxels_per_cube = results[big]["_baxels"]["n"] / big
    for s in stages:
        ts = [results[n][s]["seconds"] for n in sizes]
        b, b_last = growth(sizes, ts), growth(sizes[-2:], ts[-2:])
        per_cube = ts[-1] / big
        scale = SURVEY_BAXELS_PER_CUBE / baxels_per_cube if s in ("ingest", "assign") else 1.0
        est = per_cube * scale * DR17_CUBES
        if s == "train":
            est = ts[-1]
        cells = "".join(f" | {results[n][s]['seconds']:7.1f}, {results[n][s]['rss_mb']:5.0f}"
                        for n in sizes)
        parallel = s in ("ingest", "label", "assign", "refresh")
        est64 = est * workers / 64 if parallel else est
        print(f"| {s:<12}{cells} | {b:5.2f} | {b_last:6.2f} | {est / 3600:9.1f} h "
              f"| {est64 / 3600:10.2f} h |")
    print(f"\nbaxels per cube here: {baxels_per_cube:.0f} (survey: {SURVEY_BAXELS_PER_CUBE:.0f}); "
          "ingest/assign estimates scaled by baxels; label is at 2 fits per cube "
          "(labelling every baxel: see bench_labels.py)")


def main() -> None:
    """Run the survey at each size; print per-stage times, RSS, growth and DR17 estimates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--quick", action="store_true", help="N = 10 only, 1 fit per cube")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", type=int, default=6, help="distinct mock cubes to copy")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-survey"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--table", type=Path,
                        help="only print the table of a results file written by --json")
    args = parser.parse_args()
    if args.table is not None:
        saved = {int(k): v for k, v in json.loads(args.table.read_text()).items()}
        print_table(saved, sorted(saved), args.workers)
        return
    sizes = [10] if args.quick else [int(v) for v in args.sizes.split(",")]
    fits_per_cube = 1 if args.quick else 2
    iterations = 60 if args.quick else args.iterations
    t0 = time.perf_counter()
    pool = Pool(args.out / "pool", 3 if args.quick else args.pool, args.workers)
    print(f"pool of {len(pool.hdus)} mock cubes rendered in {time.perf_counter() - t0:.0f} s; "
          f"{args.workers} workers; peak RSS is the stage process's own (VmHWM), workers "
          "not included")
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        t = time.perf_counter()
        results[n] = run_survey(pool, n, args.out / f"n{n}", args.workers, fits_per_cube,
                                iterations)
        print(f"N={n}: {time.perf_counter() - t:.0f} s wall (cube writing included)", flush=True)
        if args.json:  # after every size, so a long run killed later keeps what it measured
            args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print_table(results, sizes, args.workers)
    for h in pool.hdus:
        h.close()


if __name__ == "__main__":
    main()
