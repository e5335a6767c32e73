"""SQL latency on a survey-scale archive: 1.2M baxels of 10k galaxies (synthetic tables).

Run: python benchmarks/bench_sql.py [--baxels 1200000] [--galaxies 10000] [--out DIR]
Writes synthetic cubes, baxels, labels and assignments straight into an archive (DESIGN.md:
no 0.5 TB of cubes for a scale test), then times, through desomdb.connect():
(1) a node_labels-style aggregation (median, p16, p84 per node of one label);
(2) one galaxy's rows from baxel_labels; (3) one galaxy's fingerprint.
The named baseline is the in-memory DuckDB floor: the same rows loaded as tables into an
in-memory connection, the same derived views (live joins) on top, the same query. Each query
runs through ``desomdb.connect`` as readers get it (the query cache that the writer session
built, ``cached``) and without the cache (``live``: the joins over Parquet). The three runs
alternate (best of ``--repeat`` each), so machine load hits all alike. Prints absolute times
and the ratios to the floor, the cache's build time and size, then the file counts and sizes.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import write_json_atomic
from desomdb.query import views


def build(root: Path, n_bax: int, n_gal: int, per_file: int = 200_000) -> Archive:
    rng = np.random.default_rng(0)
    arch = Archive(root, create=True)
    gal = rng.integers(0, n_gal, n_bax)
    order = np.argsort(gal, kind="stable")
    gal = gal[order]
    plateifu = np.array([f"{8000 + g // 20}-{12701 + g % 20}" for g in range(n_gal)])[gal]
    mangaid = np.array([f"1-{100000 + g}" for g in range(n_gal)])[gal]
    bin_id = np.zeros(n_bax, dtype=np.int32)
    starts = np.flatnonzero(np.r_[True, gal[1:] != gal[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], n_bax], strict=True):
        bin_id[s:e] = np.arange(e - s)
    node = rng.integers(0, 225, n_bax).astype(np.int16)
    with arch.writer("bench") as w:
        cube_names = np.unique(plateifu)
        adds = [w.stage_table("cubes", pa.table({
            "plateifu": pa.array(cube_names), "status": pa.array(["ok"] * cube_names.size),
            "release_ordinal": pa.array(np.full(cube_names.size, 17, np.int32))}),
            f"{paths.release_dir('cubes', 'DR17')}/part-0.parquet")]
        for k, first in enumerate(range(0, n_bax, per_file)):
            sl = slice(first, first + per_file)
            n = len(bin_id[sl])
            ident = {"plateifu": pa.array(plateifu[sl]), "bin_id": pa.array(bin_id[sl])}
            adds.append(w.stage_table("baxels", pa.table({
                **ident, "mangaid": pa.array(mangaid[sl]),
                "radius_re": pa.array(rng.uniform(0, 2, n).astype(np.float32)),
                "snr": pa.array(rng.uniform(5, 40, n).astype(np.float32)),
                "trainable": pa.array(rng.uniform(size=n) > 0.1)}),
                f"{paths.release_dir('baxels', 'DR17')}/part-{k}.parquet"))
            adds.append(w.stage_table("labels", pa.table({
                **ident, "fitter": pa.array(["ppxf"] * n),
                "age_mw_gyr": pa.array(rng.uniform(0.1, 13, n)),
                "log_ml_r": pa.array(rng.normal(0.3, 0.3, n)),
                "chi2_ok": pa.array(rng.uniform(size=n) > 0.05), "status": pa.array(["ok"] * n)}),
                f"{paths.release_dir('labels', 'DR17')}/part-{k}.parquet"))
            adds.append(w.stage_table("assignments", pa.table({
                **ident, "release": pa.array(["DR17"] * n), "node": pa.array(node[sl]),
                "row": pa.array(node[sl] // 15), "col": pa.array(node[sl] % 15),
                "second_node": pa.array(node[sl]), "distance": pa.array(
                    rng.uniform(0, 3, n).astype(np.float32)),
                "is_adjacent": pa.array(np.ones(n, bool))}),
                f"{paths.model_dir('assignments', 'desom1-bench')}/part-{k}.parquet"))
        w.commit(add=adds)
    t = time.perf_counter()
    with arch.writer("bench model use"):  # synthetic assignments: no registered model
        write_json_atomic(root / paths.CURRENT_MODEL, {"desom1": "desom1-bench"})
    cache = root / paths.QUERY_CACHE
    print(f"query cache built at the session end in {time.perf_counter() - t:.2f} s, "
          f"{cache.stat().st_size / 1e6:.0f} MB")
    return arch


def best_of(con, sql: str, n: int = 5) -> float:
    """Best wall time of ``n`` runs of ``sql`` on ``con``, seconds."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        con.sql(sql).fetchall()
        times.append(time.perf_counter() - t)
    return min(times)


def in_memory_floor(arch: Archive, model: str) -> duckdb.DuckDBPyConnection:
    """The same rows as in-memory tables, with the same derived views over them."""
    con = duckdb.connect(":memory:")
    con.execute(f"create macro current_model() as '{model}'")
    for table in paths.TABLES:
        files = [str(f) for f in arch.files(table)]
        if files:
            con.execute(f"create table {table} as select * from read_parquet(?, "
                        "hive_partitioning = true, union_by_name = true)", [files])
    views._create_views(con, set())  # derived views only: the base names are tables here
    return con


QUERIES = {
    "node_labels-style (median/p16/p84 per node)":
        "select node, count(*), median(log_ml_r), quantile_cont(log_ml_r, 0.16), "
        "quantile_cont(log_ml_r, 0.84) from baxel_labels where chi2_ok group by node",
    "one galaxy's rows (baxel_labels)":
        "select plateifu, bin_id, node, log_ml_r from baxel_labels where mangaid = '1-104242'",
    "one galaxy's fingerprint (galaxy_fingerprint)":
        "select node, n_baxels from galaxy_fingerprint where mangaid = '1-104242'",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baxels", type=int, default=1_200_000)
    parser.add_argument("--galaxies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_sql"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    arch = build(args.out, args.baxels, args.galaxies)
    print(f"built {args.baxels:,} baxels / {args.galaxies:,} galaxies in "
          f"{time.perf_counter() - t:.1f} s")
    cached = views.connect(arch.root)
    live = views.connect(arch.root, cached=False)
    floor = in_memory_floor(arch, "desom1-bench")
    print(f"{'query':<48}{'cached ms':>10}{'live ms':>9}{'floor ms':>10}{'cached/floor':>14}"
          f"{'live/floor':>12}")
    for name, sql in QUERIES.items():
        t_cached, t_live, t_floor = np.inf, np.inf, np.inf
        for _ in range(args.repeat):  # alternate: load on the machine hits all alike
            t_cached = min(t_cached, best_of(cached, sql, 1))
            t_live = min(t_live, best_of(live, sql, 1))
            t_floor = min(t_floor, best_of(floor, sql, 1))
        print(f"{name:<48}{t_cached * 1e3:>10.1f}{t_live * 1e3:>9.1f}{t_floor * 1e3:>10.1f}"
              f"{t_cached / t_floor:>14.2f}{t_live / t_floor:>12.2f}")
    files = [f for t in ("baxels", "labels", "assignments") for f in arch.files(t)]
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"{len(files)} Parquet files, {size:.0f} MB")


if __name__ == "__main__":
    main()
