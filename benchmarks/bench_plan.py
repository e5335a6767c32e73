"""The map carries the labels: a planned fraction fitted, the rest labelled by their nodes.

Run::

    python benchmarks/bench_plan.py [--galaxies 48] [--library miuscat,bc03]
        [--fractions 0.05,0.1,0.2] [--out /tmp/bench_plan]

Per library: a mock survey is ingested and a DESOM-1 map is trained on its spectra and
assigned (labels play no part in training). Then, on copies of that archive:

- ``all``: every baxel fitted (the default fitter), the baseline;
- ``plan f``: ``desomdb label --plan --budget f`` (:mod:`desomdb.pipeline.label_plan`)
  for each fraction ``f``.

Each copy is calibrated (``desomdb calibrate``, default sample) and read through the
``baxel_estimates`` view. For the baxels a plan left unfitted, the map-sourced labels
(``source = 'map'``) are compared with the truth — median offset and robust scatter
(1.4826 × MAD) per label, and the fraction of truths inside their 68 % interval — beside
the fits of the same baxels in ``all``. The fraction of unfitted baxels the map labels, and
the CPU spent (fit seconds of the labels + the calibration's re-fits, summed inside the
workers) are printed beside the baseline's.

Like with like: light-weighted age and [M/H] on every library; mass-weighted ones where the
truth has them (current mass for MIUSCAT; initial mass for BC03, compared with the fit's
``age_imw_gyr``/``mh_imw``, which are not node labels, so BC03 shows light-weighted only).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from desomdb import mock
from desomdb.archive.store import Archive
from desomdb.pipeline import assign, calibrate, ingest, label_plan, labels, node_labels, train
from desomdb.query import views
from desomdb.som import model, registry

#: Noise re-fits per calibration baxel (``desomdb calibrate``'s default).
REFITS = 4
#: (title, estimate column, truth column, log10 of both first, same-library only).
COMPARED = (
    ("log age_L", "log_age_lw", "log_age_lw", False, False),
    ("[M/H]_L", "mh_lw", "mh_lw", False, False),
    ("log age_M", "age_mw_gyr", "age_mw_gyr", True, True),
    ("[M/H]_M", "mh_mw", "mh_mw", False, True),
    ("log M*/L_r", "log_ml_r", "log_ml_r", False, True),
    ("E(B-V)_*", "ebv_star", "ebv_star", False, False),
    ("log sSFR", "log_ssfr", "log_ssfr", False, True),
)


def build(out: Path, library: str, args: argparse.Namespace) -> Path:
    """Mock -> ingest -> train -> assign, once per library (reused when present)."""
    base = out / "base"
    if (base / "_done").exists():
        return base
    shutil.rmtree(out, ignore_errors=True)
    survey = mock.generate_survey(out / "survey", args.galaxies, "DR15", seed=args.seed,
                                  workers=args.workers, ifu_sizes=args.ifu_sizes,
                                  library=library, progress=False)
    job = ingest.IngestJob(release="DR15", cubes=str(survey.release_dir),
                           drpall=str(survey.drpall_path), workers=args.workers,
                           config=ingest.IngestConfig(target_snr=args.target_snr))
    ingest.ingest(base, job, progress=False)
    cfg = model.compact_config(map_rows=args.map_size, map_cols=args.map_size,
                               iterations=1500, decay_iters=1200, pretrain_iters=300,
                               batch_size=64, eval_every=150, seed=args.seed)
    model_id = train.train(base, cfg, where="true", progress=False)
    registry.set_current_model(Archive(base), model_id)
    assign.assign(base, model_id, progress=False)
    (base / "_done").write_text(model_id)
    return base


def cpu_seconds(root: Path) -> tuple[float, int]:
    """Fit CPU seconds (labels + calibration re-fits, from the median fit time) and fits.

    The calibration's fits: its baxels (``label_errors.n_baxels`` of one label, summed over
    S/N bins) times one fit, the noise re-fits and the alternative set-ups each.
    """
    arch = Archive(root)
    lab = pl.from_arrow(arch.read("labels", columns=["fit_seconds"]))
    err = pl.from_arrow(arch.read("label_errors", columns=["label", "n_baxels"]))
    assert isinstance(lab, pl.DataFrame) and isinstance(err, pl.DataFrame)
    n_calib = int(err.filter(pl.col("label") == err["label"][0])["n_baxels"].sum())
    n_refits = n_calib * (1 + REFITS + len(calibrate.ALTERNATIVES))
    per_fit = float(lab["fit_seconds"].median() or 0.0)
    return float(lab["fit_seconds"].sum()) + n_refits * per_fit, lab.height + n_refits


def estimates(root: Path) -> pl.DataFrame:
    """``baxel_estimates`` joined with the truth, node medians and which baxels were fitted."""
    con = views.connect(root)
    truths = ", ".join(sorted({f"t.{c[2]} as {c[2]}_right" for c in COMPARED}))
    nodes = ", ".join(f"(select median from node_labels n where n.model_id = current_model() "
                      f"and n.node = e.node and n.label = '{c[1]}') as {c[1]}_node"
                      for c in COMPARED)
    try:
        return con.sql(f"select e.*, {truths}, {nodes}, "
                       "exists (select 1 from labels l where l.release = e.release and "
                       "l.plateifu = e.plateifu and l.bin_id = e.bin_id) as fitted "
                       "from baxel_estimates e join truth t using (release, plateifu, bin_id)"
                       ).pl()
    finally:
        con.close()


def compare(df: pl.DataFrame, source: str | None, same_library: bool, value: str = ""
            ) -> dict[str, tuple]:
    """Per label: (n, median offset, robust scatter, coverage of lo68-hi68).

    ``value`` is a suffix of the compared column (``_node``: the node median instead).
    """
    out = {}
    for title, col, true, log, same_only in COMPARED:
        if same_only and not same_library:
            continue
        sel = df if source is None else df.filter(pl.col(f"{col}_source") == source)
        sel = sel.filter(pl.col(col + value).is_not_null()
                         & pl.col(f"{true}_right").is_not_nan())
        v = sel[col + value].to_numpy().astype(float)
        t = sel[f"{true}_right"].to_numpy().astype(float)
        lo = sel[f"{col}_lo68"].to_numpy().astype(float)
        hi = sel[f"{col}_hi68"].to_numpy().astype(float)
        if title == "log sSFR":  # star-forming truth only, as the label benchmark
            keep = t > -13
            v, t, lo, hi = v[keep], t[keep], lo[keep], hi[keep]
        covered = (t >= lo) & (t <= hi)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v, t = np.log10(v), np.log10(t)
        d = v - t
        d = d[np.isfinite(d)]
        if d.size == 0:
            out[title] = (0, np.nan, np.nan, np.nan)
            continue
        med = float(np.median(d))
        out[title] = (int(d.size), med, float(1.4826 * np.median(np.abs(d - med))),
                      float(np.nanmean(covered)) if covered.size else np.nan)
    return out


def run_library(library: str, args: argparse.Namespace) -> None:
    """All variants of one library; prints its tables."""
    out = args.out / library
    t0 = time.perf_counter()
    base = build(out, library, args)
    print(f"\n== {library}: {args.galaxies} galaxies, archive and map ready in "
          f"{time.perf_counter() - t0:.0f} s")
    results = {}
    for name in ["all", *[f"{f:g}" for f in args.fractions]]:
        root = out / f"arch-{name}"
        t = time.perf_counter()
        if args.reuse and (root / "label_errors").is_dir():
            arch = Archive(root)  # fits and calibration kept: node and map labels rebuilt
            with arch.writer("bench_plan --reuse") as writer:
                node_labels.write_node_labels(writer, arch, registry.resolve_model(arch, None))
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(base, root)
            if name == "all":
                labels.label(root, workers=args.workers, progress=False)
            else:
                rep = label_plan.plan_and_label(root, float(name), workers=args.workers,
                                                progress=False)
                print(f"  plan {name}: {rep.n_budget} of {rep.n_assigned} baxels; new "
                      f"{rep.n_new}; {rep.n_nodes} populated nodes, {rep.n_nodes_short} short")
            calibrate.calibrate(root, refits=REFITS, workers=args.workers, progress=False)
        cpu, n_fits = cpu_seconds(root)
        results[name] = (estimates(root), cpu, n_fits, time.perf_counter() - t)
    full, cpu_all, fits_all, _ = results["all"]
    same = library == "miuscat"
    for name in [f"{f:g}" for f in args.fractions]:
        df, cpu, n_fits, wall = results[name]
        unfitted = df.filter(~pl.col("fitted"))
        keys = unfitted.select("release", "plateifu", "bin_id")
        base_rows = full.join(keys, on=["release", "plateifu", "bin_id"])
        mapped = unfitted.filter(pl.col("log_age_lw_source") == "map").height
        print(f"\n{library}, plan {name}: {df.height - unfitted.height} fitted, "
              f"{unfitted.height} unfitted, of which {mapped} labelled by the map "
              f"({mapped / max(unfitted.height, 1):.1%}); fit CPU {cpu:.0f} s ({n_fits} fits "
              f"incl. calibration) vs {cpu_all:.0f} s ({fits_all}) fitting every baxel: "
              f"{cpu / max(cpu_all, 1e-9):.1%}; wall {wall:.0f} s\n")
        ours = compare(unfitted, "map", same)
        node = compare(unfitted.filter(pl.col("log_age_lw_source") == "map"), None, same,
                       "_node")
        theirs = compare(base_rows, "fit", same)
        print("| label | map (latent neighbours): n, median, scatter, coverage | node median: "
              "median, scatter | fit every baxel: n, median, scatter, coverage | scatter "
              "ratio map / fit |")
        print("|---|---|---|---|---|")
        for title in ours:
            a, b, c = ours[title], theirs[title], node[title]
            ratio = a[2] / b[2] if b[2] else np.nan
            print(f"| {title} | {a[0]}, {a[1]:+.3f}, {a[2]:.3f}, {a[3]:.1%} | {c[1]:+.3f}, "
                  f"{c[2]:.3f} | {b[0]}, {b[1]:+.3f}, {b[2]:.3f}, {b[3]:.1%} | {ratio:.2f} |")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--galaxies", type=int, default=48)
    parser.add_argument("--library", default="miuscat,bc03")
    parser.add_argument("--fractions", default="0.05,0.1,0.2")
    parser.add_argument("--ifu-sizes", default="19")
    parser.add_argument("--target-snr", type=float, default=25.0)
    parser.add_argument("--map-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_plan"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep the fits and calibration of an earlier run in --out; "
                        "rebuild only node and map labels")
    args = parser.parse_args(argv)
    args.ifu_sizes = tuple(int(s) for s in args.ifu_sizes.split(","))
    args.fractions = [float(f) for f in args.fractions.split(",")]
    for library in args.library.split(","):
        run_library(library.strip(), args)


if __name__ == "__main__":
    main()
