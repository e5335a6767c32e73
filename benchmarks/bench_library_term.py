"""The template-library term: measured on other libraries' mocks, validated leaving one out.

Run::

    python benchmarks/bench_library_term.py [--galaxies 8] [--max-per-cube N]
        [--archive bc03=DIR ...] [--per-bin 6] [--refits 3] [--write]
        [--out /tmp/bench_library_term]

For each library (``miuscat``: rendered from the fitting templates; ``bc03``, ``mastar``:
from SSPs the fits never see) it uses a labelled archive of a mock survey (``--archive
LIB=DIR``, e.g. one ``bench_labels.py`` left, or builds one: mock -> ingest -> label with the
batched fitter), runs ``desomdb calibrate`` there if it has no error model (the statistical
σ), and joins every fit passing the label's cuts with its truth. Then, per label:

- *statistical*: the fraction of baxels whose truth lies within fit ± σ_stat, and its median
  half-width, per library;
- *total, leaving one library out*: σ_lib fitted on BC03 alone and applied to MaStar, and
  the reverse (never tested on the library it was fitted on), coverage of fit ±
  sqrt(σ_stat² + σ_lib²) and median half-width; on MIUSCAT with σ_lib from both (it
  over-covers there by design);
- the shipped term (fitted on BC03 and MaStar together) per age bin, and which bins the
  library dominates.

``--write`` stores the shipped term in ``desomdb/data/library_term.json`` with this run's
provenance. Goals: statistical 68 ± 5 % on MIUSCAT, total ≥ 63 % on BC03 and
MaStar.

Labels compared like with like: light-weighted age and [M/H] on every library;
``age_mw_gyr``/``mh_mw`` on MIUSCAT (current mass) and BC03 (the fit's initial-mass-weighted
``age_imw_gyr``/``mh_imw`` against its initial-mass truth), not on MaStar (no mass truth);
E(B−V)_*, σ_*, and the gas labels (published E(B−V)_gas, d_BPT: the lines are the mock's,
the stellar absorption under them the library's). M*/L_r and sSFR are not compared across
libraries (no living-mass table for BC03, another IMF): they get no library term.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl

from desomdb import mock
from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.pipeline import calibrate, ingest, labels
from desomdb.query import views
from desomdb.science import label_catalogue, library_term

LIBRARIES = ("miuscat", "bc03", "mastar")
OTHERS = ("bc03", "mastar")
#: Label -> (fit column per library, truth column, extra condition on fit l / truth t).
COMPARED: dict[str, tuple[dict[str, str], str, str]] = {
    "log_age_lw": ({}, "log_age_lw", "l.chi2_ok"),
    "mh_lw": ({}, "mh_lw", "l.chi2_ok"),
    "age_mw_gyr": ({"bc03": "age_imw_gyr", "mastar": ""}, "age_mw_gyr", "l.chi2_ok"),
    "mh_mw": ({"bc03": "mh_imw", "mastar": ""}, "mh_mw", "l.chi2_ok"),
    "ebv_star": ({}, "ebv_star", "l.chi2_ok"),
    "sigma": ({}, "sigma_bin_kms", "l.chi2_ok"),
    "ebv_gas": ({}, "ebv_gas", "l.chi2_ok and l.ssfr_ok"),
    "d_bpt": ({}, "d_bpt", "l.chi2_ok and l.bpt_ok"),
}


def build(library: str, args: argparse.Namespace) -> Path:
    """A labelled archive of a mock survey of ``library`` (reused when given or present)."""
    given = dict(a.split("=", 1) for a in args.archive)
    if library in given:
        return Path(given[library])
    root = args.out / library
    arch = root / "archive"
    if (arch / paths.MANIFEST).exists() and Archive(arch).has_table("labels"):
        return arch
    shutil.rmtree(root, ignore_errors=True)
    survey = mock.generate_survey(root / "survey", args.galaxies, "DR15", seed=args.seed,
                                  workers=args.workers, ifu_sizes=(19, 37), library=library,
                                  progress=False)
    ingest.ingest(arch, ingest.IngestJob(
        release="DR15", cubes=str(survey.release_dir), drpall=str(survey.drpall_path),
        workers=args.workers, config=ingest.IngestConfig(target_snr=20)), progress=False)
    labels.label(arch, workers=args.workers, progress=False, max_per_cube=args.max_per_cube,
                 fitter="batch")
    return arch


def fits_with_truth(arch: Path, library: str, args: argparse.Namespace) -> pl.DataFrame:
    """One row per (baxel, label): fit, truth, σ_stat, the fit's log_age_lw."""
    if not Archive(arch).files(paths.LABEL_ERRORS):
        calibrate.calibrate(arch, per_bin=args.per_bin, refits=args.refits,
                            workers=args.workers, progress=False)
    con = views.connect(arch)
    parts = []
    try:
        for label, (per_library, truth, where) in COMPARED.items():
            column = per_library.get(library, label)
            if not column:
                continue
            parts.append(con.sql(
                f"select '{label}' as label, l.{column}::double as fit, "
                f"t.{truth}::double as truth, l.log_age_lw::double as log_age_lw, "
                f"(select sqrt(avg(e.sigma * e.sigma)) from label_errors e "
                f"where e.fitter = l.fitter and e.label = '{label}' "
                f"and b.snr >= e.snr_lo and b.snr < e.snr_hi) as sigma_stat "
                f"from labels l join truth t using (release, plateifu, bin_id) "
                f"join baxels b using (release, plateifu, bin_id) "
                f"where l.status = 'ok' and {where}").pl())
    finally:
        con.close()
    return pl.concat(parts).filter(pl.col("fit").is_finite() & pl.col("truth").is_finite())


def _arrays(frame: pl.DataFrame, label: str) -> tuple[np.ndarray, ...]:
    sub = frame.filter(pl.col("label") == label)
    return tuple(sub[c].to_numpy().astype(float)
                 for c in ("fit", "truth", "sigma_stat", "log_age_lw"))


def terms_from(frames: dict[str, pl.DataFrame], libs: tuple[str, ...]
               ) -> list[library_term.Term]:
    """σ_lib of every label fitted on the pooled baxels of ``libs``."""
    out: list[library_term.Term] = []
    for label in COMPARED:
        cols = [_arrays(frames[lib], label) for lib in libs]
        fit, truth, stat, age = (np.concatenate([c[k] for c in cols]) for k in range(4))
        if fit.size:
            out.extend(library_term.fit_terms(label, fit, truth, stat, age))
    return out


def report(frames: dict[str, pl.DataFrame]) -> list[library_term.Term]:
    """Print coverage and widths per label and library; return the shipped term."""
    held = {"bc03": terms_from(frames, ("mastar",)), "mastar": terms_from(frames, ("bc03",)),
            "miuscat": terms_from(frames, OTHERS)}
    print("\n| label | library | n | statistical coverage | median σ_stat | total coverage "
          "(σ_lib fitted on) | median total σ |")
    print("|---|---|---|---|---|---|---|")
    for label in COMPARED:
        unit = label_catalogue.BY_COLUMN[label].unit or ""
        for lib in LIBRARIES:
            fit, truth, stat, age = _arrays(frames[lib], label)
            if not fit.size:
                continue
            lib_sigma = library_term.sigma_library(held[lib], label, age)
            total = library_term.total_sigma(stat, lib_sigma)
            width = f"{np.median(total):.4g} {unit}" if np.isfinite(total).any() else "–"
            source = "+".join(OTHERS) if lib == "miuscat" else next(o for o in OTHERS
                                                                     if o != lib)
            print(f"| {label} | {lib} | {fit.size} | "
                  f"{library_term.coverage(fit, truth, stat):.1%} | "
                  f"{np.nanmedian(stat):.4g} {unit} | "
                  f"{library_term.coverage(fit, truth, total):.1%} ({source}) | {width} |")
    shipped = terms_from(frames, OTHERS)
    print("\nShipped term (fitted on BC03 + MaStar), σ_lib per bin of the fit's log_age_lw:")
    print("| label | log age_L bin | n | σ_lib | library dominates |")
    print("|---|---|---|---|---|")
    for t in shipped:
        print(f"| {t.label} | [{t.age_lo:g}, {t.age_hi:g}) | {t.n} | {t.sigma:.4g} | "
              f"{'yes' if t.dominated else 'no'} |")
    return shipped


def main(argv: list[str] | None = None) -> list[library_term.Term]:
    """Build or reuse the three archives, print the tables, optionally write the term."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--galaxies", type=int, default=8)
    parser.add_argument("--max-per-cube", type=int, help="label at most N baxels per cube")
    parser.add_argument("--archive", action="append", default=[], metavar="LIB=DIR")
    parser.add_argument("--per-bin", type=int, default=6)
    parser.add_argument("--refits", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--write", action="store_true",
                        help="store the shipped term in desomdb/data/library_term.json")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_library_term"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    frames = {lib: fits_with_truth(build(lib, args), lib, args) for lib in LIBRARIES}
    shipped = report(frames)
    if args.write:
        target = Path(__file__).resolve().parents[1] / "desomdb" / "data" / \
            library_term.DATA_FILE
        library_term.save(shipped, target, {
            "command": " ".join(["python", f"benchmarks/{Path(__file__).name}", *argv]),
            "date": datetime.date.today().isoformat(),
            "label_rows": {lib: int(frames[lib].height) for lib in OTHERS},
            "fitted_on": list(OTHERS), "age_edges_log_yr": [None, *library_term.AGE_EDGES[1:-1],
                                                            None]})
        print(f"wrote {target}")
    return shipped


if __name__ == "__main__":
    main()
