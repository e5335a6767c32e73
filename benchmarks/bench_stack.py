"""Time per stack as a ratio to reading the selected spectra with pyarrow alone.

Run: python benchmarks/bench_stack.py --source ARCHIVE [--spectra 120000] [--rounds 3]

``--source`` is an ingested and labelled archive (``desomdb demo`` makes one). A synthetic
archive of ``--spectra`` spectra in ~250-baxel cubes is built from it, labelled, given a
briefly trained compact 15×15 DESOM-1 and assigned (``bench_assign.make_archive``; assign
stores the per-cube node partial sums). Then, interleaved for ``--rounds`` rounds:

* **selection** — ``radius_re < 0.2`` (a tenth of the baxels, spread over every cube),
  one stack, no fit: :func:`desomdb.products.stack.stack` vs the floor, reading exactly those rows'
  ``flux``/``ivar``/``mask`` with ``pyarrow.parquet.read_table`` + ``take`` per cube;
* **node** — the most populated node, every member: the stack from the stored partial sums
  vs reading its members' spectra with pyarrow (and vs ``use_partials=False``).

Times are extrapolated to 1.2 M baxels linearly (the reading scales with the selected rows;
the node stack with the number of cubes, whose partial-sum files it opens). The pPXF fit of a
stack costs one baxel fit (``bench_labels.py``) and is not included.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from bench_assign import make_archive

from desomdb.archive.store import Archive
from desomdb.pipeline import assign
from desomdb.products import stack as stack_mod
from desomdb.query import views

SURVEY = 1.2e6


def read_floor(root: Path, where: str) -> tuple[float, int]:
    """Read the selected rows' spectra with pyarrow alone; return (seconds, rows)."""
    con = views.connect(root)
    sel = con.sql(f"select release, plateifu, bin_id from baxel_labels where {where}").pl()
    con.close()
    files = Archive(root).cube_files("spectra")
    t = time.perf_counter()
    n = 0
    for (release, plateifu), rows in sel.group_by(["release", "plateifu"]):
        table = pq.read_table(files[(str(release), str(plateifu))],
                              columns=["bin_id", "flux", "ivar", "mask"])
        pos = {int(b): i for i, b in enumerate(table.column("bin_id").to_numpy())}
        take = table.take(pa.array([pos[int(b)] for b in rows["bin_id"]]))
        n += take.num_rows
    return time.perf_counter() - t, n


def timed(fn, *args, **kw) -> tuple[float, object]:
    """Wall time of one call and its result."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def main() -> None:
    """Build the archive, then time selection and node stacks against the pyarrow floor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("desomdb-demo/archive"))
    parser.add_argument("--spectra", type=int, default=120_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/desomdb-bench-stack"))
    parser.add_argument("--keep", action="store_true", help="keep the archive for a rerun")
    args = parser.parse_args()
    root = args.out / f"n{args.spectra}"
    if not (root / "_manifest.json").exists():
        t = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        make_archive(args.source, root, args.spectra)
        assign.assign(root, progress=False)
        print(f"built, trained and assigned {args.spectra} spectra in "
              f"{time.perf_counter() - t:.0f} s")
    arch = Archive(root)
    n_cubes = len(arch.cube_files("spectra"))
    con = views.connect(root)
    node = con.sql("select node from baxel_labels group by node order by count(*) desc "
                   "limit 1").fetchall()[0][0]
    con.close()
    sel_where, node_where = "radius_re < 0.2", f"node = {node}"
    res: dict[str, list[float]] = {k: [] for k in (
        "sel_floor", "sel_stack", "node_floor", "node_partials", "node_spectra")}
    counts = {}
    for _ in range(args.rounds):
        dt, n = read_floor(root, sel_where)
        res["sel_floor"].append(dt)
        counts["sel"] = n
        dt, out = timed(stack_mod.stack, root, where=sel_where, fit=False)
        res["sel_stack"].append(dt)
        dt, n = read_floor(root, node_where)
        res["node_floor"].append(dt)
        counts["node"] = n
        dt, out = timed(stack_mod.stack, root, where=node_where, by="node", fit=False)
        res["node_partials"].append(dt)
        assert out.stacks[0].from_partials == n  # type: ignore[attr-defined]
        dt, _ = timed(stack_mod.stack, root, where=node_where, by="node", fit=False,
                      use_partials=False)
        res["node_spectra"].append(dt)
    med = {k: float(np.median(v)) for k, v in res.items()}
    n_bax = arch.read("baxels", columns=["bin_id"]).num_rows
    scale = SURVEY / n_bax
    print(f"\narchive: {n_bax} baxels in {n_cubes} cubes; median of {args.rounds} rounds")
    print("| stack | rows | seconds | floor (pyarrow read) | ratio | at 1.2 M baxels |")
    print("|---|---|---|---|---|---|")
    print(f"| selection `{sel_where}` | {counts['sel']} | {med['sel_stack']:.2f} | "
          f"{med['sel_floor']:.2f} | {med['sel_stack'] / med['sel_floor']:.2f}x | "
          f"{med['sel_stack'] * scale:.0f} s |")
    print(f"| node {node}, stored partial sums | {counts['node']} | {med['node_partials']:.2f} | "
          f"{med['node_floor']:.2f} | {med['node_partials'] / med['node_floor']:.2f}x | "
          f"{med['node_partials'] * scale:.1f} s |")
    print(f"| node {node}, spectra re-read | {counts['node']} | {med['node_spectra']:.2f} | "
          f"{med['node_floor']:.2f} | {med['node_spectra'] / med['node_floor']:.2f}x | "
          f"{med['node_spectra'] * scale:.0f} s |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
