"""Start-up of the light commands against bare Python and the DuckDB CLI.

Run: python benchmarks/bench_startup.py --archive desomdb-demo/archive [--repeat 5]
Times, interleaved and repeated (median wall clock of each command as a subprocess):
``python -c pass``, ``duckdb -c "select 1"`` (the DuckDB CLI, from the duckdb-cli package),
``desomdb --help``, ``desomdb status /nonexistent`` (an error path), ``desomdb status
ARCHIVE`` and ``desomdb sql ARCHIVE "select count(*) from baxels"``; prints each with its
ratio to bare Python. Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", default="desomdb-demo/archive")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    desomdb = [sys.executable, "-m", "desomdb.cli"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "desomdb --help": [*desomdb, "--help"],
        "desomdb status /nonexistent": [*desomdb, "status", "/nonexistent"],
        "desomdb status ARCHIVE": [*desomdb, "status", args.archive],
        "desomdb sql ARCHIVE count(*)": [*desomdb, "sql", args.archive,
                                         "select count(*) from baxels"],
    }
    duckdb_cli = shutil.which("duckdb")
    if duckdb_cli:
        commands["duckdb -c 'select 1'"] = [duckdb_cli, "-c", "select 1"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):  # interleaved: load on the machine hits every command alike
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':32s} {'median s':>9s} {'x python':>9s}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:32s} {m:9.3f} {m / base:9.1f}")


if __name__ == "__main__":
    main()
