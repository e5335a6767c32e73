"""Explorer page latency on a survey-scale archive, as a ratio to the page's queries alone.

Run: python benchmarks/bench_serve.py --source ARCHIVE [--baxels 120000,1200000] [--repeats 5]

SOURCE is a small archive with a trained, assigned model and fingerprints (e.g. the demo's
``desomdb demo --out DIR`` archive). For each size N this copies it and adds synthetic cubes
of ``PER_CUBE`` baxels each (rows copied from the source's cubes under new plateifus and
mangaids) written the way the pipeline lays them out: one assignment part file per cube
(as ``desomdb assign`` writes), baxels, labels and bin_map in compacted files of 200,000
rows, ``cubes``/``galaxies`` one row per cube, fingerprints one row per galaxy but the last
(whose galaxy page counts its cube's own assignments instead), ``nodes`` rewritten with
``n_members`` and ``n_beyond_p99`` counted as ``desomdb assign`` counts them. Spectra: one
part file per cube as ingest writes them, but holding only bin 0 (the full 1.2 M spectra
are ~50 GB; the baxel page reads one spectrum, and what grows with the survey is the number
of per-cube files it has to look through, which this keeps). DESIGN.md: synthetic tables
straight into the archive for scale tests. ``--keep`` keeps the archives and ``--reuse``
measures them again without building.

Each page is timed in two ways, interleaved, best of ``--repeats``:
- **queries**: the page's data function of :mod:`desomdb.web.pages` (all its SQL through
  the guarded connection), on the app's own connection;
- **page**: a GET through Starlette's TestClient (queries + figures + HTML + similarity
  search where the page has one).
It prints both in ms and page / queries. The baxel page's nearest-baxel search runs only
with a current HNSW index: ``--index`` builds it as ``desomdb assign`` would (~1 min per
120,000 baxels on 2 busy cores); without one the page shows the 'search exactly' link
(stated in the output).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.som import registry

PER_CUBE = 120  # 1.2 M baxels in 10,000 cubes, as the MaNGA survey
ROWS_PER_FILE = 200_000


def _replace(t: pa.Table, **cols: Any) -> pa.Table:
    for name, values in cols.items():
        if name in t.column_names:
            t = t.set_column(t.column_names.index(name), name,
                             pa.array(values, type=t.schema.field(name).type))
    return t


def build(source: Path, root: Path, n: int, model_id: str) -> None:
    """Copy ``source`` to ``root`` and add synthetic cubes up to ``n`` baxels in all."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root)
    arch = Archive(root)
    release = "DR17"
    src = {t: arch.read(t) for t in ("baxels", "labels", "bin_map", "cubes", "galaxies")}
    src_spec = arch.read("spectra")
    src_asg = arch.read("assignments", model_id=model_id)
    cubes = src["cubes"].filter(pc.equal(src["cubes"]["status"], "ok"))
    pifus = cubes["plateifu"].to_pylist()
    n_cubes = n // PER_CUBE
    rng = np.random.default_rng(0)
    by_cube = {}
    for t in ("baxels", "labels", "bin_map"):
        for p in pifus:
            by_cube[(t, p)] = src[t].filter(pc.equal(src[t]["plateifu"], p))
    asg_by = {p: src_asg.filter(pc.equal(src_asg["plateifu"], p)) for p in pifus}
    spec_by = {p: src_spec.filter(pc.equal(src_spec["plateifu"], p)).slice(0, 1) for p in pifus}
    cube_by = {p: cubes.filter(pc.equal(cubes["plateifu"], p)).slice(0, 1) for p in pifus}
    gal_by = {p: src["galaxies"].filter(pc.equal(src["galaxies"]["plateifu"], p)).slice(0, 1)
              for p in pifus}
    n_nodes = arch.read("nodes", columns=["node"], model_id=model_id).num_rows
    t0 = time.perf_counter()
    with arch.writer("bench_serve") as w:
        big: dict[str, list[pa.Table]] = {"baxels": [], "labels": [], "bin_map": []}
        adds, cube_rows, gal_rows = [], [], []
        fp_counts: list[tuple[str, np.ndarray]] = []
        for c in range(n_cubes):
            p = pifus[c % len(pifus)]
            pifu, mangaid = f"{10000 + c // 20}-{12701 + c % 20}", f"1-{700000 + c}"
            checksum = f"{c:012d}"
            for t in ("baxels", "labels"):
                part = by_cube[(t, p)]
                take = np.arange(PER_CUBE) % max(part.num_rows, 1)
                rows = part.take(pa.array(take))
                big[t].append(_replace(rows, plateifu=[pifu] * PER_CUBE,
                                       bin_id=np.arange(PER_CUBE, dtype=np.int32),
                                       mangaid=[mangaid] * PER_CUBE,
                                       release=[release] * PER_CUBE))
            side = int(np.ceil(np.sqrt(PER_CUBE * 4)))
            k = side * side
            big["bin_map"].append(pa.table({
                "plateifu": pa.array([pifu] * k),
                "x": pa.array(np.arange(k) % side, pa.int16()),
                "y": pa.array(np.arange(k) // side, pa.int16()),
                "bin_id": pa.array(np.minimum(np.arange(k) // 4, PER_CUBE - 1), pa.int32())}))
            asg = asg_by[p]
            take = np.arange(PER_CUBE) % asg.num_rows
            nodes = rng.integers(0, n_nodes, PER_CUBE)
            rows = _replace(asg.take(pa.array(take)), plateifu=[pifu] * PER_CUBE,
                            bin_id=np.arange(PER_CUBE, dtype=np.int32), node=nodes,
                            release=[release] * PER_CUBE)
            if c < n_cubes - 1:  # the last galaxy has no fingerprint (the page's fallback)
                fp_counts.append((mangaid, np.bincount(nodes, minlength=n_nodes)))
            spec_name = paths.cube_part_name(pifu, checksum)
            adds.append(w.stage_table("assignments", rows, paths.model_file(
                "assignments", model_id, paths.assignment_part_name(release, spec_name))))
            adds.append(w.stage_table("spectra", _replace(spec_by[p], plateifu=[pifu]),
                                      f"{paths.release_dir('spectra', release)}/{spec_name}"))
            cube_rows.append(_replace(cube_by[p], plateifu=[pifu], mangaid=[mangaid],
                                      checksum=[checksum], n_baxels=[PER_CUBE],
                                      release=[release]))
            gal_rows.append(_replace(gal_by[p], plateifu=[pifu], mangaid=[mangaid],
                                     release=[release]))
            if len(adds) >= 2000:
                w.commit(add=adds)
                adds = []
        for t, parts in big.items():
            whole = pa.concat_tables(parts, promote_options="default")
            if "release" in whole.column_names:
                whole = whole.drop(["release"])
            for i, s in enumerate(range(0, whole.num_rows, ROWS_PER_FILE)):
                adds.append(w.stage_table(t, whole.slice(s, ROWS_PER_FILE),
                                          paths.release_file(t, release, f"bench-{i}.parquet")))
        for t, rows in (("cubes", cube_rows), ("galaxies", gal_rows)):
            whole = pa.concat_tables(rows, promote_options="default")
            if "release" in whole.column_names:
                whole = whole.drop(["release"])
            adds.append(w.stage_table(t, whole, paths.release_file(t, release,
                                                                    "bench-0.parquet")))
        w.commit(add=adds)
        _model_tables(arch, w, model_id, fp_counts)
    print(f"  built {n_cubes} cubes ({n_cubes * PER_CUBE} synthetic baxels) in "
          f"{time.perf_counter() - t0:.0f} s")


def _model_tables(arch: Archive, w: Any, model_id: str,
                  fp_counts: list[tuple[str, np.ndarray]]) -> None:
    """Rewrite ``nodes`` and ``fingerprints`` as ``desomdb assign``/``fingerprints`` would.

    ``nodes.n_members`` and ``n_beyond_p99`` are counted over the newest cubes (the latter
    by :func:`desomdb.pipeline.node_table.beyond_p99_counts`, as assign stores it); every
    synthetic galaxy but the last gets a fingerprint row (counts per node; DESOM-2 columns copied).
    """
    from desomdb.pipeline import node_table
    from desomdb.query import views

    nodes = arch.read("nodes", model_id=model_id)
    con = views.connect(arch.root, raw=True)
    try:
        found = dict(con.sql("select a.node, count(*) from assignments a semi join latest_cubes "
                             "c on a.release = c.release and a.plateifu = c.plateifu where "
                             "a.model_id = ? group by a.node", params=[model_id]).fetchall())
    finally:
        con.close()
    n_nodes = nodes.num_rows
    members = np.array([found.get(k, 0) for k in range(n_nodes)], np.int64)
    beyond = node_table.beyond_p99_counts(arch, model_id, n_nodes)
    nodes = nodes.drop_columns([c for c in ("model_id", "n_beyond_p99")
                                if c in nodes.column_names])
    nodes = _replace(nodes, n_members=members).append_column(
        "n_beyond_p99", pa.array(beyond, pa.int64()) if beyond is not None
        else pa.nulls(n_nodes, pa.int64()))
    adds = [w.stage_table("nodes", nodes, paths.model_file("nodes", model_id))]
    fps = arch.read("fingerprints", model_id=model_id)
    fps = fps.drop_columns([c for c in ("model_id",) if c in fps.column_names])
    if fp_counts and fps.num_rows:
        counts = np.stack([c for _, c in fp_counts]).astype(np.int64)
        tot = counts.sum(axis=1, keepdims=True)
        frac = (counts / tot).astype(np.float32)
        take = fps.take(pa.array(np.arange(len(fp_counts)) % fps.num_rows))

        def fixed(a: np.ndarray, kind: pa.DataType) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), kind), n_nodes)

        synth = take.set_column(take.column_names.index("mangaid"), "mangaid",
                                pa.array([m for m, _ in fp_counts]))
        for name, values in (("n_baxels", pa.array(tot[:, 0], pa.int64())),
                             ("n_cubes", pa.array(np.ones(len(fp_counts)), pa.int32())),
                             ("counts", fixed(counts, pa.int64())),
                             ("fraction", fixed(frac, pa.float32())),
                             ("radius_weighted", fixed(frac, pa.float32()))):
            i = synth.column_names.index(name)
            synth = synth.set_column(i, name, values.cast(synth.schema.field(name).type))
        adds.append(w.stage_table("fingerprints", pa.concat_tables([fps, synth]),
                                  paths.model_file("fingerprints", model_id)))
    w.commit(add=adds)


def index(root: Path, model_id: str) -> None:
    """Bring the model's baxel index up to date, as ``desomdb assign`` does after assigning."""
    from desomdb.pipeline import similar_index as sx

    arch = Archive(root)
    net = registry.load_model(arch, model_id)[0]
    t0 = time.perf_counter()
    with arch.writer("bench_serve index"):  # the lock assign holds while indexing
        done = sx.update_baxel_index(arch, model_id, net.cfg.latent)
    print(f"  baxel index: {done.n_vectors} vectors, {done.n_added} added in "
          f"{time.perf_counter() - t0:.0f} s")


def measure(root: Path, repeats: int) -> list[tuple[str, float, float]]:
    """Time every page and its queries alone, interleaved; best of ``repeats`` each."""
    from starlette.testclient import TestClient

    from desomdb.web import create_app, galaxy_pages, pages
    from desomdb.web.app import Explorer

    arch = Archive(root)
    model_id = registry.current_model(arch)
    assert model_id is not None
    ex = Explorer(root)
    with ex.connection(model_id) as (con, info):
        assert info is not None
        row, col = con.sql("select row, col from nodes where model_id = ? order by n_members "
                           "desc limit 1", params=[model_id]).fetchall()[0]
        # the last synthetic cube's galaxy has no fingerprint row, the one before has one
        (mangaid, release, pifu), (fp_mangaid, _, _) = con.sql(
            "select mangaid, release, plateifu from cubes where release = 'DR17' "
            "order by plateifu desc limit 2").fetchall()
    parts = ex.cube_parts(model_id)  # listed once per archive generation, as the app does
    cases = {
        "map (occupancy)": (f"/model/{model_id}/map",
                            lambda c, i: pages.map_data(c, i, "occupancy")),
        "map (beyond p99)": (f"/model/{model_id}/map?colour=beyond_p99",
                             lambda c, i: pages.map_data(c, i, "beyond_p99")),
        "map (median age)": (f"/model/{model_id}/map?colour=median:age_mw_gyr",
                             lambda c, i: pages.map_data(c, i, "median:age_mw_gyr")),
        "node": (f"/model/{model_id}/node/{row},{col}",
                 lambda c, i: pages.node_data(c, i, row, col)),
        "galaxy": (f"/model/{model_id}/galaxy/{fp_mangaid}",
                   lambda c, i: galaxy_pages.galaxy_data(c, i, fp_mangaid, parts=parts)),
        "galaxy (no fingerprint)": (f"/model/{model_id}/galaxy/{mangaid}",
                                    lambda c, i: galaxy_pages.galaxy_data(c, i, mangaid,
                                                                          parts=parts)),
        "baxel": (f"/model/{model_id}/baxel/{release}/{pifu}/0",
                  lambda c, i: galaxy_pages.baxel_data(c, i, release, pifu, 0, parts)),
        "sql (node_summary)": ("/sql?q=select+*+from+node_summary",
                               lambda c, i: c.sql("select * from node_summary").pl()),
    }
    out = []
    # cache_pages=0: every GET draws its page (a cache hit would time nothing)
    with TestClient(create_app(root, cache_pages=0)) as client:
        for name, (url, data) in cases.items():
            r = client.get(url)  # warm: connection, network and templates loaded once
            assert r.status_code == 200, (name, r.text[:300])
            if name == "baxel":
                print("  baxel page: " + ("no current baxel index, nearest baxels not searched"
                                          if 'id="exact-search"' in r.text else
                                          "nearest baxels through the HNSW index"))
            q_times, p_times = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                with ex.connection(model_id) as (con, info):
                    data(con, info)
                q_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.get(url)
                p_times.append(time.perf_counter() - t)
            out.append((name, min(q_times) * 1e3, min(p_times) * 1e3))
    return out


def main() -> None:
    """Build archives of the given sizes and time each page against its queries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--baxels", default="120000,1200000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-serve"))
    parser.add_argument("--keep", action="store_true", help="keep the archives built")
    parser.add_argument("--index", action="store_true",
                        help="build the baxel HNSW index of the archives (as assign does)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure archives kept under --out by an earlier --keep run "
                             "instead of building them again")
    args = parser.parse_args()
    model_id = registry.current_model(Archive(args.source))
    assert model_id is not None, "the source archive needs a current model"
    results = {}
    for n in (int(v) for v in args.baxels.split(",")):
        root = args.out / f"n{n}"
        print(f"N = {n} baxels:")
        if not (args.reuse and (root / paths.MANIFEST).exists()):
            build(args.source, root, n, model_id)
        if args.index:
            index(root, model_id)
        results[n] = measure(root, args.repeats)
        print(f"  {'page':24s} {'queries ms':>10s} {'page ms':>8s} {'page/queries':>12s}")
        for name, q, p in results[n]:
            print(f"  {name:24s} {q:10.1f} {p:8.1f} {p / q:12.2f}")
        if not (args.keep or args.reuse):
            shutil.rmtree(root, ignore_errors=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        print(f"extrapolated to 1.2 M baxels (linear in N through the {lo} and {hi} points; "
              "a negative slope, i.e. noise, counts as flat):")
        for (name, _, p_lo), (_, _, p_hi) in zip(results[lo], results[hi], strict=True):
            slope = max((p_hi - p_lo) / (hi - lo), 0.0)
            at = p_hi + slope * (1_200_000 - hi)
            print(f"  {name:24s} {at:8.0f} ms {'(< 300 ms)' if at < 300 else '(OVER 300 ms)'}")
    print("median of page/queries:", statistics.median(
        p / q for r in results.values() for _, q, p in r))


if __name__ == "__main__":
    main()
