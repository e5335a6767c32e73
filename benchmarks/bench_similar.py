"""Similarity search: HNSW (usearch, as desomdb similar uses it) against exact search.

Run: python benchmarks/bench_similar.py [--sizes 120000,1200000] [--queries 200] [--f16]
     [--faiss]

Synthetic DESOM-1 latents (DESIGN.md: scale tests write synthetic data): 256 components
drawn from a 6-parameter manifold (a random tanh network, like spectra varying with age,
metallicity, dust ...) plus a little noise, around a common offset. The test archive's
real latents have per-component means of ~9 against a spread of ~0.5; the generator copies
that, because it decides whether float16 storage is good enough (``--f16`` measures it).

For each size: index build time (all cores), then per query (one at a time, as the CLI
asks): exact search (:class:`desomdb.som.ann.ExactSearch`: one BLAS matrix-vector product over
all vectors, squared norms precomputed, top k re-ranked in float64) and HNSW search
(``desomdb.som.ann.search``, one thread), recall@10 of HNSW against exact, and the ratio of
their times. Queries are fresh draws (held-out spectra), not indexed vectors.
``--faiss`` adds faiss-cpu IVF-Flat (nlist = 4 sqrt(n), nprobe 16) when it is installed.
Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from desomdb.som import ann


def synthetic_latents(n: int, seed: int, ndim: int = 256, n_params: int = 6) -> np.ndarray:
    """``n`` latents of the generator described in the module docstring, float32."""
    model = np.random.default_rng(12345)  # one fixed "network" for data and queries
    w1 = model.normal(size=(n_params, 64)) / np.sqrt(n_params)
    w2 = model.normal(size=(64, ndim)) / 8.0 * 0.5 / 0.55
    offset = model.normal(0.0, 9.0, ndim)
    rng = np.random.default_rng(seed)
    out = np.empty((n, ndim), np.float32)
    for s in range(0, n, 100_000):
        p = rng.normal(size=(min(100_000, n - s), n_params))
        z = np.tanh(p @ w1) @ w2 + offset + 0.02 * rng.normal(size=(len(p), ndim))
        out[s : s + len(p)] = z
    return out


def bench_usearch(x: np.ndarray, queries: np.ndarray, exact_rows: list[np.ndarray], k: int,
                  params: ann.HnswParams) -> dict[str, float]:
    index = ann.new_index(x.shape[1], params)
    t0 = time.perf_counter()
    ann.add(index, np.arange(len(x)), x)
    build = time.perf_counter() - t0
    times, recalls = [], []
    for q, truth in zip(queries, exact_rows, strict=True):
        t0 = time.perf_counter()
        keys, _ = ann.search(index, q, k)
        times.append(time.perf_counter() - t0)
        recalls.append(ann.recall_at_k(keys.astype(np.int64), truth))
    return {"build_s": build, "ms": 1e3 * float(np.median(times)),
            "p95_ms": 1e3 * float(np.percentile(times, 95)), "recall": float(np.mean(recalls)),
            "mb": index.serialized_length / 1e6}


def bench_faiss(x: np.ndarray, queries: np.ndarray, exact_rows: list[np.ndarray],
                k: int) -> dict[str, float] | None:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    nlist = int(4 * np.sqrt(len(x)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], nlist)
    t0 = time.perf_counter()
    sample = np.random.default_rng(0).choice(len(x), min(len(x), 40 * nlist), replace=False)
    index.train(x[sample])
    index.add(x)
    build = time.perf_counter() - t0
    index.nprobe = 16
    faiss.omp_set_num_threads(1)
    times, recalls = [], []
    for q, truth in zip(queries, exact_rows, strict=True):
        t0 = time.perf_counter()
        _, found = index.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
        recalls.append(ann.recall_at_k(found[0], truth))
    return {"build_s": build, "ms": 1e3 * float(np.median(times)),
            "p95_ms": 1e3 * float(np.percentile(times, 95)), "recall": float(np.mean(recalls)),
            "mb": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="120000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--expansion-add", type=int, default=ann.HnswParams.expansion_add,
                        help="HNSW efConstruction (desomdb's default)")
    parser.add_argument("--f16", action="store_true", help="also an index of float16 vectors")
    parser.add_argument("--faiss", action="store_true", help="also faiss-cpu IVF-Flat")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    params = ann.HnswParams(expansion_add=args.expansion_add)
    print(f"{os.cpu_count()} CPUs, load average {load:.1f}; k = {args.k}, "
          f"{args.queries} held-out queries, 256-d synthetic latents; HNSW M = "
          f"{params.connectivity}, efConstruction = {params.expansion_add}, ef = "
          f"{params.expansion_search}")
    print(f"{'n':>9} {'method':<22} {'build s':>8} {'ms/query':>9} {'p95 ms':>7} "
          f"{'ratio':>7} {'recall@10':>9} {'MB':>6}")
    for n in (int(s) for s in args.sizes.split(",")):
        x = synthetic_latents(n, seed=1)
        queries = synthetic_latents(args.queries, seed=2)
        exact = ann.ExactSearch(x)
        best: tuple[float, int, list[float]] | None = None
        for threads in (1, 2):  # the faster is the baseline (2 threads lose on a busy host)
            with threadpool_limits(limits=threads):
                truth, times = [], []
                for q in queries:
                    t1 = time.perf_counter()
                    truth.append(exact.search(q, args.k)[0])
                    times.append(time.perf_counter() - t1)
            ms = 1e3 * float(np.median(times))
            if best is None or ms < best[0]:
                best = (ms, threads, times)
        assert best is not None
        exact_ms, threads, times = best
        print(f"{n:>9} {f'exact (BLAS, {threads} thr)':<22} {'-':>8} {exact_ms:>9.2f} "
              f"{1e3 * np.percentile(times, 95):>7.2f} {1.0:>7.3f} {1.0:>9.3f} "
              f"{x.nbytes / 1e6:>6.0f}")
        runs: list[tuple[str, dict[str, float] | None]] = [
            ("usearch HNSW f32", bench_usearch(x, queries, truth, args.k, params))]
        if args.f16:
            f16 = ann.HnswParams(expansion_add=args.expansion_add, dtype="f16")
            runs.append(("usearch HNSW f16", bench_usearch(x, queries, truth, args.k, f16)))
        if args.faiss:
            runs.append(("faiss IVF-Flat np16", bench_faiss(x, queries, truth, args.k)))
        for name, r in runs:
            if r is None:
                print(f"{n:>9} {name:<22} not run (faiss-cpu is not installed)")
                continue
            print(f"{n:>9} {name:<22} {r['build_s']:>8.1f} {r['ms']:>9.3f} {r['p95_ms']:>7.2f} "
                  f"{r['ms'] / exact_ms:>7.4f} {r['recall']:>9.3f} {r['mb']:>6.0f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
