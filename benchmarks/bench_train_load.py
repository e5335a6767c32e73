"""DESOM-1 training on a quiet and on a loaded machine, with and without the thread tuner.

Run: python benchmarks/bench_train_load.py ARCHIVE [--iterations 200] [--load 2]

ARCHIVE is an archive with trainable baxels (e.g. the demo's). Each run copies it and
trains the demo's DESOM-1 (6x6 map, batch 64, 100 pre-training iterations, ``--iterations``
joint ones, seed 12) in a fresh process, once with :class:`desomdb.runtime.runner.ThreadTuner`
(the default: one torch thread or the default count, whichever is faster) and once with the
tuner switched off (torch's default count throughout), interleaved: first on the quiet
machine, then beside ``--load`` busy Python processes (a shared login node). It prints
the wall time of each, the loaded / quiet ratios and fixed / tuned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

#: One training run in a child process: prints its wall seconds and iterations as JSON.
_RUN = """
import json, shutil, sys, tempfile, time
from pathlib import Path
from desomdb.pipeline import train
from desomdb.runtime import runner
from desomdb.som import model, registry
from desomdb.archive.store import Archive
src, mode, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "fixed":
    class Fixed:
        def before(self): pass
        def after(self, seconds): pass
        def close(self): pass
    runner.ThreadTuner = Fixed
work = Path(tempfile.mkdtemp()) / "arch"
shutil.copytree(src, work)
cfg = model.compact_config(map_rows=6, map_cols=6, iterations=iterations,
                           decay_iters=int(iterations * 0.8), pretrain_iters=100,
                           batch_size=64, eval_every=100, seed=12)
t0 = time.perf_counter()
model_id = train.train(work, cfg, progress=False)
seconds = time.perf_counter() - t0
_, meta = registry.load_model(Archive(work), model_id)
print(json.dumps({"seconds": seconds, "iterations": meta["metrics"]["iterations_run"]}))
shutil.rmtree(work.parent)
"""


def _run(archive: str, mode: str, iterations: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _RUN, archive, mode, str(iterations)],
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    """Time tuned and fixed training, quiet then loaded; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--load", type=int, default=2, help="busy processes beside the loaded runs")
    args = ap.parse_args()
    results: dict[tuple[str, str], dict[str, float]] = {}
    for condition in ("quiet", "loaded"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.load if condition == "loaded" else 0)]
        try:
            time.sleep(1 if hogs else 0)
            for mode in ("tuned", "fixed"):
                results[(condition, mode)] = _run(args.archive, mode, args.iterations)
                r = results[(condition, mode)]
                print(f"{condition:6} {mode:5} {r['seconds']:7.1f} s "
                      f"({int(r['iterations'])} iterations)", flush=True)
        finally:
            for h in hogs:
                h.kill()
    for mode in ("tuned", "fixed"):
        ratio = results[("loaded", mode)]["seconds"] / results[("quiet", mode)]["seconds"]
        print(f"{mode}: loaded / quiet = {ratio:.2f}")
    for condition in ("quiet", "loaded"):
        ratio = results[(condition, "fixed")]["seconds"] / results[(condition, "tuned")][
            "seconds"]
        print(f"{condition}: fixed / tuned = {ratio:.2f}")


if __name__ == "__main__":
    main()
