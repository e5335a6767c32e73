"""Run every benchmark in one go and print their headline lines side by side.

Run: python benchmarks/run_all.py [--quick]
Needs a demo archive for the DESOM and SOM benchmarks (``desomdb demo --out desomdb-demo``);
``--quick`` uses small sizes (a few minutes on 2 cores). Benchmarks are not tests: nothing
here asserts a time. GPU measurements are reported as not run when no GPU is present.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(script: str, args: list[str]) -> list[str]:
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for ln in lines:
        print(ln)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        lines.append(f"FAILED (exit {proc.returncode})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--archive", default="desomdb-demo/archive")
    args = parser.parse_args()
    q = args.quick
    results = {
        "ingest (127-fibre) vs reading the .fits.gz":
            run("bench_ingest.py", ["--cubes", "1" if q else "3"])[-1:],
        "pPXF accuracy and throughput":
            run("bench_labels.py", ["--galaxies", "2" if q else "8"])[-1:],
        "SQL at 1.2M baxels":
            run("bench_sql.py", ["--baxels", "200000" if q else "1200000"])[-4:],
        "SOM stage vs MiniSom":
            run("bench_som.py", ["--archive", args.archive, "--epochs", "5" if q else "10"])[-3:],
        "DESOM paper vs compact, AE vs PCA-256":
            run("bench_desom.py", ["--archive", args.archive, "--compact-iterations",
                                   "200" if q else "800", "--paper-iterations",
                                   "20" if q else "120"])[1:6],
        "peak memory of train/assign vs archive size":
            run("bench_scale.py", ["--source", args.archive, "--sizes",
                                   "6000,24000" if q else "24000,120000"])[1:],
    }
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu = False
    results["GPU training/assignment"] = (
        run("bench_gpu.py", ["--device", "cuda"] + (["--quick"] if q else []))[-22:] if gpu
        else ["not run: no GPU on this machine (benchmarks/bench_gpu.py is the GPU script)"])
    print("\n==== summary ====")
    for name, lines in results.items():
        print(f"\n{name}:")
        for ln in lines:
            print(f"  {ln}")


if __name__ == "__main__":
    main()
