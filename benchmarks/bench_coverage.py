"""Coverage of mock truth by calibrated node intervals, same library and second library.

Run::

    python benchmarks/bench_coverage.py [--library both] [--galaxies 16] [--per-cube 40]
        [--per-bin 6] [--refits 3] [--workers 2] [--out /tmp/bench_coverage]

For each library (``miuscat``: the mock is rendered from the templates the fits use;
``bc03``: from Bruzual & Charlot 2003 SSPs the fits never see) it writes a mock survey
(19- and 37-fibre IFUs), ingests it, labels ``--per-cube`` baxels per cube (evenly spaced),
trains a compact DESOM-1 on a 6×6 map (the demo's schedule), assigns every baxel, then runs
``desomdb calibrate`` (``--per-bin`` baxels per S/N bin, ``--refits`` noise re-fits each) and
measures, leaving one galaxy out at a time, the fraction of its labelled baxels (label cuts
as ``node_labels``) whose truth lies in their node's interval computed from the *other*
galaxies' members (the map itself was trained on every galaxy's spectra, never on labels):

- ``lo68-hi68``: the calibrated interval;
- ``p16-p84``: the members' spread of point estimates (what node_labels gave before);
- ``fit±σ``: the baxel's own fit ± the error model's σ (checks the error model alone);
- ``total``: ``lo68_total-hi68_total`` (with the template-library term).

Then per label, the share of populated nodes (≥ 5 held-out baxels) whose interval covers the
truth of at least half of them (goal on the same library: ≥ 90 % of nodes).

The goal is 68 ± 5 %. Stages already done in ``--out`` are not redone (delete the folder to
start again; ``--recalibrate`` re-runs only the calibration).

``--sigma-scale 0.25,0.5,1,2`` then repeats the leave-one-galaxy-out measurement with every σ
of the error model multiplied by each factor (the galaxy term is refitted each time, as
``node_labels`` does), and restores the error model at the end. If no factor puts a label
within the goal on both mocks, no rescaling of a fits-only error model can.

On the BC03 mock the truth's age and [M/H] are weighted by initial mass (the bundled BC03
has no living-mass table) while the node labels are weighted by current mass; that
difference of definition is part of what the interval has to cover there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl

from desomdb import mock
from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.pipeline import assign, calibrate, ingest, labels, node_labels, train
from desomdb.query import views
from desomdb.science import label_catalogue
from desomdb.som import model, registry

LIBRARIES = ("miuscat", "bc03")


def build(out: Path, library: str, n_galaxies: int, per_cube: int, workers: int,
          seed: int) -> tuple[Path, str]:
    """Mock survey -> ingest -> label -> train -> assign (each skipped when already done)."""
    archive = out / "archive"
    release_dir = out / "survey" / "DR15"
    t = time.perf_counter()
    if not (release_dir / paths.truth_sidecar_name("DR15")).exists():
        mock.generate_survey(out / "survey", n_galaxies, "DR15", seed=seed, workers=workers,
                             ifu_sizes=(19, 37), progress=False, library=library)
    arch = Archive(archive, create=True)
    if not arch.has_table("baxels"):
        drpall = next(release_dir.glob("drpall-*.fits"))
        ingest.ingest(archive, ingest.IngestJob(release="DR15", cubes=str(release_dir),
                                                drpall=str(drpall), workers=workers),
                      progress=False)
    if not arch.has_table("labels"):
        labels.label(archive, workers=workers, progress=False, max_per_cube=per_cube)
    model_id = registry.current_model(arch)
    if model_id is None:
        cfg = model.compact_config(map_rows=6, map_cols=6, iterations=600, decay_iters=480,
                                   pretrain_iters=150, batch_size=64, eval_every=100,
                                   seed=seed)
        model_id = train.train(archive, cfg, progress=False)
        registry.set_current_model(arch, model_id)
    if not arch.files("node_labels", model_id=model_id):
        assign.assign(archive, model_id, progress=False)
    print(f"{library}: archive ready in {time.perf_counter() - t:.0f} s (model {model_id})")
    return archive, model_id


def set_errors(archive: Path, errors: pl.DataFrame) -> None:
    """Commit ``errors`` (the whole label_errors table) in place of the archive's; rebuild."""
    arch = Archive(archive)
    models = sorted({paths.parse_partition(str(f.relative_to(arch.root)))[2]
                     for f in arch.files("assignments")})
    with arch.writer("bench_coverage --sigma-scale") as writer:
        for (release, fitter), group in errors.group_by("release", "fitter"):
            calibrate.replace_error_model(writer, str(release), str(fitter),
                                          group.drop("release"))
        for model_id in models:
            node_labels.write_node_labels(writer, arch, model_id)


def coverage_by_label(archive: Path, model_id: str) -> dict[str, float]:
    """Leave-one-galaxy-out coverage of truth by ``lo68``/``hi68``, per label."""
    rows = pl.concat([calibrate.held_out_intervals(archive, model_id, f"a.plateifu = '{p}'")
                      for p in labelled_cubes(archive)])
    return {c.label: c.calibrated for c in calibrate.summarise(rows)}


def sigma_scan(archives: dict[str, tuple[Path, str]], scales: list[float]) -> None:
    """Coverage with every σ of each archive's error model multiplied by each of ``scales``."""
    originals = {}
    for lib, (archive, _) in archives.items():
        con = views.connect(archive, raw=True)
        originals[lib] = con.sql("select * from label_errors").pl()
        con.close()
    table: dict[float, dict[str, dict[str, float]]] = {}
    try:
        for k in scales:
            table[k] = {}
            for lib, (archive, model_id) in archives.items():
                scaled = originals[lib].with_columns(
                    pl.col("sigma_stat", "sigma_sys", "sigma") * k)
                set_errors(archive, scaled)
                table[k][lib] = coverage_by_label(archive, model_id)
    finally:
        for lib, (archive, _) in archives.items():
            set_errors(archive, originals[lib])
    names = [n for n in label_catalogue.NODE_LABELS
             if any(n in table[k][lib] for k in scales for lib in archives)]
    print("lo68-hi68 coverage with σ × k (" + ", ".join(archives) + ")")
    print(f"  {'k':>5s} " + " ".join(f"{n:>17s}" for n in names))
    for k in scales:
        cells = []
        for n in names:
            vals = [table[k][lib].get(n, float("nan")) for lib in archives]
            both = all(abs(v - 0.68) <= 0.05 for v in vals)
            cells.append(" / ".join(f"{v:5.1%}" for v in vals) + ("*" if both else " "))
        print(f"  {k:5.2f} " + " ".join(f"{c:>17s}" for c in cells))
    print("  * within 68 ± 5 % on every mock")


def labelled_cubes(archive: Path) -> list[str]:
    """Plate-IFUs with at least one label."""
    con = views.connect(archive, raw=True)
    return [r[0] for r in con.sql("select distinct plateifu from labels order by 1").fetchall()]


def main() -> None:
    """Build both mocks, calibrate, and print coverage per label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=[*LIBRARIES, "both"], default="both")
    parser.add_argument("--galaxies", type=int, default=16)
    parser.add_argument("--per-cube", type=int, default=40)
    parser.add_argument("--per-bin", type=int, default=6)
    parser.add_argument("--refits", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_coverage"))
    parser.add_argument("--recalibrate", action="store_true",
                        help="run desomdb calibrate even where the archive has an error model "
                        "(e.g. after the error model changed)")
    parser.add_argument("--sigma-scale", default="",
                        help="comma-separated factors: re-measure with σ × each (see above)")
    parser.add_argument("--archive", type=Path,
                        help="measure this labelled, assigned mock archive instead of building "
                        "one (e.g. the demo's, labelled by the current fitter)")
    args = parser.parse_args()
    libs = LIBRARIES if args.library == "both" else (args.library,)
    if args.archive is not None:
        libs = (str(args.archive),)
    measured: dict[str, tuple[Path, str]] = {}
    for library in libs:
        if args.archive is not None:
            archive = args.archive
            model_id = registry.resolve_model(Archive(archive), None)
        else:
            archive, model_id = build(args.out / library, library, args.galaxies,
                                      args.per_cube, args.workers, args.seed)
        measured[library] = (archive, model_id)
        arch = Archive(archive)
        if args.recalibrate or not arch.files(paths.LABEL_ERRORS):
            t = time.perf_counter()
            rep = calibrate.calibrate(archive, per_bin=args.per_bin, refits=args.refits,
                                      workers=args.workers, progress=False)
            print(f"{library}: calibrated on {rep.n_baxels} baxels ({rep.n_fits} fits) in "
                  f"{time.perf_counter() - t:.0f} s")
        con = views.connect(archive, raw=True)
        print(con.sql("select fitter, label, snr_lo, snr_hi, n_baxels, "
                      "round(sigma_stat, 4) as stat, round(sigma_sys, 4) as sys "
                      "from label_errors where label in ('age_mw_gyr', 'mh_mw', 'ebv_star', "
                      "'log_ml_r') order by fitter, label, snr_lo").pl())
        t = time.perf_counter()
        rows = pl.concat([calibrate.held_out_intervals(archive, model_id, f"a.plateifu = '{p}'")
                          for p in labelled_cubes(archive)])
        print(f"{library}: leave-one-galaxy-out over {len(labelled_cubes(archive))} labelled "
              f"cubes ({time.perf_counter() - t:.0f} s)")
        print(f"  {'label':11s} {'n':>5s} {'lo68-hi68':>10s} {'total':>7s} {'p16-p84':>8s} "
              f"{'fit±σ':>7s} {'median off':>10s}")
        for c in calibrate.summarise(rows):
            print(f"  {c.label:11s} {c.n:5d} {c.calibrated:10.1%} {c.total:7.1%} "
                  f"{c.members:8.1%} {c.fit:7.1%} {c.median_offset:10.3f}")
        print(f"{library}: populated nodes (≥ 5 held-out baxels) whose interval covers ≥ 50 % "
              "of their truths")
        print(f"  {'label':11s} {'nodes':>5s} {'lo68-hi68':>10s} {'total':>7s}")
        for nc in calibrate.node_level(rows):
            print(f"  {nc.label:11s} {nc.nodes:5d} {nc.at_least_half:10.1%} "
                  f"{nc.total_at_least_half:7.1%}")
    if args.sigma_scale:
        sigma_scan(measured, [float(k) for k in args.sigma_scale.split(",")])


if __name__ == "__main__":
    main()
