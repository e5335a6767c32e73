"""pPXF label accuracy against mock truth, same library and cross library, and throughput.

Run::

    python benchmarks/bench_labels.py [--galaxies 8] [--library all] [--max-per-cube N]
        [--variants default,regul,mdegree] [--fitters batch,ppxf] [--real]
        [--out /tmp/bench_labels]

For each library (``miuscat``: the mock is rendered from the templates the fits use, an
upper limit; ``bc03`` and ``mastar``: rendered from Bruzual & Charlot 2003 and MaStar
(Maraston et al. 2020) SSPs the fits never see) it
generates a mock survey, ingests it, labels it with 2 local workers (once per fit variant)
with every fitter of ``--fitters`` (cube halves interleaved A B / B A, so both fitters see
the same machine load; speed is the ratio of the two in the same run), and prints
fit − truth (median offset and robust scatter 1.4826 × MAD) per label for baxels
with χ²_red < 2 (sSFR/SFR: Hα S/N > 2 on star-forming baxels; d_BPT: all four lines at
S/N > 2, the paper's cuts; E(B-V)_gas: the published values).

Like with like: light-weighted age and [M/H] (``log_age_lw``, ``mh_lw``, light in
5070-5950 Å) are compared on every library; on a BC03 mock the truth's mass-weighted age
and [M/H] are weighted by initial mass (``truth.mass_weight``), so they are compared with the
fit's ``age_imw_gyr`` / ``mh_imw``; a MaStar mock has no mass-weighted truth. A last table puts
the three libraries side by side per label and bin S/N.
M*/L_r and sSFR are not compared across libraries: the bundled BC03 has no living + remnant
mass table (its truth M* is unknown) and its IMF (Chabrier) differs from MIUSCAT's (unimodal
1.3), which alone moves log M*/L by ~0.2 dex; the SFR (sSFR × M* of the same fit) is
compared instead. Baxels whose light-weighted truth lies outside the fitting grid
([M/H] > +0.22 or < -0.71, age < 0.063 Gyr) are reported in a separate table.

``--real`` prints what the labels give for the 8 + 3 real DR15 spectra in ``tests/data``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from desomdb import mock
from desomdb.archive.store import Archive
from desomdb.pipeline import ingest, labels
from desomdb.pipeline.jobs import IngestConfig, IngestJob
from desomdb.science import emission, fitting

TEST_DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
REAL_FILES = ("MaNGA_test_spectra.fits.gz", "MaNGA_multicomp_test_spectra.fits.gz")
#: Edges of the fitting grid (MIUSCAT, every second age up to 14.1 Gyr).
GRID_MH = (-0.71, 0.22)
GRID_AGE_MIN_GYR = 0.063
VARIANTS = {
    "default": fitting.FitOptions(),
    "noregul": fitting.FitOptions(regul=0.0),
    "regul": fitting.FitOptions(regul=100.0),
    "mdegree": fitting.FitOptions(mdegree=8),
}


def variant(name: str) -> fitting.FitOptions:
    """A named fit variant, or ``regul=X`` / ``mdegree=N`` for other strengths."""
    if name in VARIANTS:
        return VARIANTS[name]
    key, _, value = name.partition("=")
    if key == "regul" and value:
        return fitting.FitOptions(regul=float(value))
    if key == "mdegree" and value:
        return fitting.FitOptions(mdegree=int(value))
    raise ValueError(f"unknown fit variant {name!r}; choose from {list(VARIANTS)}, "
                     "regul=X or mdegree=N")


@dataclass
class Row:
    """One line of an accuracy table."""

    label: str
    unit: str
    n: int
    median: float
    scatter: float
    #: fit − truth per baxel ("plateifu/bin_id" -> value), to pair two fitters' rows.
    values: dict[str, float] = field(default_factory=dict)


def _stats(label: str, unit: str, diff: np.ndarray, frame: pl.DataFrame) -> Row:
    """Median and robust scatter (1.4826 × MAD) of ``diff``, one value per row of ``frame``."""
    ok = np.isfinite(diff)
    d = diff[ok]
    if d.size == 0:
        return Row(label, unit, 0, np.nan, np.nan)
    keys = [f"{p}/{b}" for p, b in zip(frame["plateifu"], frame["bin_id"], strict=True)]
    med = float(np.median(d))
    return Row(label, unit, int(d.size), med, float(1.4826 * np.median(np.abs(d - med))),
               dict(zip(np.asarray(keys)[ok].tolist(), d.tolist(), strict=True)))


def mass_weight(both: pl.DataFrame) -> str:
    """Which mass weights the truth's age and [M/H]: current, initial or none (MaStar)."""
    kinds = set(both["mass_weight_true"]) if both.height else {"current"}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def accuracy(both: pl.DataFrame) -> list[Row]:
    """Fit − truth rows for baxels joined with their truth (``_true`` suffix).

    Light-weighted age and [M/H] first (every library), then mass-weighted ones where the
    truth has them, weighted by the same mass (current, or initial for BC03).
    """
    weight = mass_weight(both)
    initial = weight != "current"
    age, mh = ("age_imw_gyr", "mh_imw") if initial else ("age_mw_gyr", "mh_mw")

    def diff(fit: str, true: str, frame: pl.DataFrame = both) -> np.ndarray:
        return (frame[fit] - frame[true]).to_numpy().astype(float)

    rows = [_stats("log age (light-weighted)", "dex", diff("log_age_lw", "log_age_lw_true"),
                   both),
            _stats("[M/H] (light-weighted)", "dex", diff("mh_lw", "mh_lw_true"), both)]
    if weight in ("current", "initial"):
        with np.errstate(divide="ignore", invalid="ignore"):
            log_age = (np.log10(both[age].to_numpy())
                       - np.log10(both["age_mw_gyr_true"].to_numpy()))
        rows += [_stats(f"log age ({weight}-mass-weighted)", "dex", log_age, both),
                 _stats(f"[M/H] ({weight}-mass-weighted)", "dex", diff(mh, "mh_mw_true"), both)]
    if both.height >= 3:
        low = both.filter(pl.col("snr") <= pl.col("snr").quantile(1 / 3))
        rows.append(_stats("[M/H]_L, lowest S/N third", "dex", diff("mh_lw", "mh_lw_true", low),
                           low))
    rows.append(_stats("σ_* (truth: spaxels' mean σ)", "km/s",
                       diff("sigma", "sigma_kms_true"), both))
    if "sigma_bin_kms_true" in both.columns:  # archives ingested before it lack the column
        rows.append(_stats("σ_* (truth: the bin's LOSVD, σ and velocity spread)", "km/s",
                           diff("sigma", "sigma_bin_kms_true"), both))
    if not initial:
        rows.append(_stats("log M*/L_r", "dex", diff("log_ml_r", "log_ml_r_true"), both))
    rows.append(_stats("E(B-V)_*", "mag", diff("ebv_star", "ebv_star_true"), both))
    pub = both.filter(pl.col("ebv_gas").is_not_nan())
    rows.append(_stats("E(B-V)_gas (published)", "mag", diff("ebv_gas", "ebv_gas_true", pub),
                       pub))
    sf = both.filter(pl.col("ssfr_ok") & (pl.col("d_bpt_true") < 0)
                     & (pl.col("sfr_msun_yr_true") > 0))
    if not initial:
        sf_cut = sf.filter(pl.col("log_ssfr_true") > -13)
        rows.append(_stats("log sSFR (SF, Hα S/N > 2)", "dex",
                           diff("log_ssfr", "log_ssfr_true", sf_cut), sf_cut))
    log_sfr = (sf["log_ssfr"] + sf["log_mstar"]).to_numpy() - np.log10(
        sf["sfr_msun_yr_true"].to_numpy())
    rows.append(_stats("log SFR (SF, Hα S/N > 2)", "dex", log_sfr, sf))
    bpt = both.filter(pl.col("bpt_ok"))
    rows.append(_stats("d_BPT (four lines S/N > 2)", "dex", diff("d_bpt", "d_bpt_true", bpt),
                       bpt))
    return rows


def _median(col: pl.Series) -> float:
    """Median of a column as a float (NaN when empty)."""
    value = col.median()
    return float(value) if isinstance(value, (int, float)) else np.nan


def gas_summary(both: pl.DataFrame) -> dict[str, float | tuple[float, float]]:
    """Published fraction, sign problems and BPT-class agreement of the emission lines."""
    n = max(both.height, 1)
    pub = both.filter(pl.col("ebv_gas").is_not_nan())
    low = pub.filter(pl.col("ebv_gas_raw") < -3 * pl.col("ebv_gas_raw_err"))
    old = both.filter((pl.col("sn_ha") > 2) & (pl.col("sn_hb") > 2)
                      & pl.col("ebv_gas_raw").is_not_nan())
    with np.errstate(divide="ignore", invalid="ignore"):
        truth_class = emission.bpt_class(
            np.log10((both["flux_nii6583_true"] / both["flux_halpha_true"]).to_numpy()),
            np.log10((both["flux_oiii5007_true"] / both["flux_hbeta_true"]).to_numpy()))
    classed = both["bpt_class"].to_numpy()
    has = np.array([c is not None for c in classed])
    agree = float(np.mean(classed[has] == truth_class[has])) if has.any() else np.nan
    return {
        "n": both.height,
        "ebv_gas finite fraction": pub.height / n,
        "ebv_gas_raw finite fraction": float(both["ebv_gas_raw"].is_not_nan().sum()) / n,
        "published with ebv_gas_raw < -3 sigma": low.height,
        "published at 0 (decrement < 2.86)": int(
            (pub["ebv_gas_flags"] & int(emission.GasFlag.DECREMENT_BELOW_INTRINSIC) > 0).sum()),
        "median S/N(Hα), S/N(Hβ)": (_median(both["sn_ha"]), _median(both["sn_hb"])),
        "S/N > 2 alone (these errors, no A/N) would publish": old.height / n,
        "... of which ebv_gas_raw < -3 sigma": int(
            (old["ebv_gas_raw"] < -3 * old["ebv_gas_raw_err"]).sum()),
        "BPT class given": float(has.mean()) if has.size else np.nan,
        "BPT class = truth's": agree,
    }


def print_table(title: str, rows: list[Row]) -> None:
    """Print an accuracy table as Markdown."""
    print(f"\n{title}\n")
    print("| label | unit | n | median offset | robust scatter |")
    print("|---|---|---|---|---|")
    for r in rows:
        med = f"{r.median:+.3f}" if r.n else "-"
        mad = f"{r.scatter:.3f}" if r.n else "-"
        print(f"| {r.label} | {r.unit} | {r.n} | {med} | {mad} |")


def outside_grid(both: pl.DataFrame) -> pl.Expr:
    """Baxels whose true light-weighted [M/H] or age lies outside the fitting grid."""
    return ((pl.col("mh_lw_true") > GRID_MH[1] + 1e-6) | (pl.col("mh_lw_true") < GRID_MH[0] - 1e-6)
            | (pl.col("log_age_lw_true") < np.log10(GRID_AGE_MIN_GYR * 1e9)))


#: Bin S/N ranges of the side-by-side table.
SNR_RANGES = ((0.0, 10.0), (10.0, 20.0), (20.0, np.inf))
#: Labels of the side-by-side table: (title, fit column, truth column).
SIDE_BY_SIDE = (("log age_L", "log_age_lw", "log_age_lw_true"),
                ("[M/H]_L", "mh_lw", "mh_lw_true"),
                ("E(B-V)_*", "ebv_star", "ebv_star_true"),
                ("σ_* [km/s]", "sigma", "sigma_kms_true"))


def side_by_side(results: dict[str, pl.DataFrame]) -> None:
    """Print fit − truth (median / robust scatter, n) per label and S/N, one column per library.

    Parameters
    ----------
    results : dict
        Library -> its joined rows (default variant, first fitter), truth inside the grid.
    """
    libs = list(results)
    print("\n== all libraries side by side (fit − truth: median / robust scatter (n)), "
          "truth inside the fitting grid\n")
    print("| label | bin S/N | " + " | ".join(libs) + " |")
    print("|---|---|" + "---|" * len(libs))
    for title, fit, true in SIDE_BY_SIDE:
        for lo, hi in SNR_RANGES:
            cells = []
            for lib in libs:
                frame = results[lib].filter((pl.col("snr") >= lo) & (pl.col("snr") < hi))
                r = _stats(title, "", (frame[fit] - frame[true]).to_numpy().astype(float), frame)
                cells.append(f"{r.median:+.3f} / {r.scatter:.3f} ({r.n})" if r.n else "-")
            span = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f"≥ {lo:g}"
            print(f"| {title} | {span} | " + " | ".join(cells) + " |")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers), s."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _label_interleaved(root: Path, name: str, args: argparse.Namespace
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """Label one copy of the ingested archive per fitter, interleaved.

    The cubes are split in two halves labelled A B, then B A (A, B = the fitters), so a
    change of machine load during the run weighs on both fitters alike.

    Returns
    -------
    wall, cpu : dict
        Fitter -> job wall-clock seconds, and CPU seconds of the job (this process and its
        worker processes, which end with each job).
    """
    bax = pl.from_arrow(Archive(root / "ingested").read("baxels", columns=["plateifu"]))
    assert isinstance(bax, pl.DataFrame)
    cubes = sorted(set(bax["plateifu"]))
    halves = [cubes[::2], cubes[1::2]]
    for fitter in args.fitters:
        arch_dir = root / f"arch-{name.replace('=', '')}-{fitter}"  # '=' reads as a partition
        shutil.copytree(root / "ingested", arch_dir)
    wall = dict.fromkeys(args.fitters, 0.0)
    cpu = dict.fromkeys(args.fitters, 0.0)
    for k, half in enumerate(halves):
        for fitter in (args.fitters if k == 0 else args.fitters[::-1]):
            if not half:
                continue
            t0, c0 = time.perf_counter(), _cpu_seconds()
            labels.label(root / f"arch-{name.replace('=', '')}-{fitter}", workers=args.workers,
                         progress=False, max_per_cube=args.max_per_cube, options=variant(name),
                         plateifus=half, fitter=fitter)
            wall[fitter] += time.perf_counter() - t0
            cpu[fitter] += _cpu_seconds() - c0
    return wall, cpu


def run_library(library: str, args: argparse.Namespace) -> dict[str, pl.DataFrame]:
    """Mock → ingest → label (per variant and fitter) one library; joined rows per run.

    Returns
    -------
    dict
        ``"<variant>:<fitter>"`` -> labels joined with truth (χ²_red < 2 fits).
    """
    root = args.out / library
    shutil.rmtree(root, ignore_errors=True)
    survey = mock.generate_survey(root / "survey", args.galaxies, "DR15", seed=args.seed,
                                  workers=args.workers, ifu_sizes=args.ifu_sizes,
                                  library=library, progress=False)
    job = IngestJob(release="DR15", cubes=str(survey.release_dir),
                    drpall=str(survey.drpall_path), workers=args.workers,
                    config=IngestConfig(target_snr=args.target_snr))
    ingest.ingest(root / "ingested", job, progress=False)
    out = {}
    for name in args.variants:
        wall, cpu = _label_interleaved(root, name, args)
        summary: dict[str, tuple[float, float, list[Row], float]] = {}
        for fitter in args.fitters:
            arch = Archive(root / f"arch-{name.replace('=', '')}-{fitter}")
            lab = pl.from_arrow(arch.read("labels"))
            truth = pl.from_arrow(arch.read("truth"))
            bax = pl.from_arrow(arch.read("baxels", columns=["plateifu", "bin_id", "snr"]))
            assert isinstance(lab, pl.DataFrame) and isinstance(truth, pl.DataFrame)
            assert isinstance(bax, pl.DataFrame)
            keys = ["release", "plateifu", "bin_id"]
            truth = truth.rename({c: f"{c}_true" for c in truth.columns if c not in keys})
            fitted = (lab.join(truth, on=["plateifu", "bin_id"], suffix="_truth")
                      .join(bax, on=["plateifu", "bin_id"])
                      .filter(pl.col("status") == "ok"))
            both = fitted.filter(pl.col("chi2_ok"))
            n_fits = lab.height
            rate = n_fits / max(wall[fitter], 1e-9)
            per_fit = cpu[fitter] / max(n_fits, 1)
            chi2_frac = both.height / max(fitted.height, 1)
            print(f"\n== {library}, fit variant {name}, fitter {fitter} "
                  f"({fitting.FITTERS[fitter]}): {n_fits} fits, {both.height} with χ²_red < 2 "
                  f"(fraction {chi2_frac:.3f}); bin S/N 10/50/90 %: "
                  f"{np.percentile(both['snr'].to_numpy(), [10, 50, 90]).round(1).tolist()}; "
                  f"{rate:.2f} fits/s with {args.workers} workers (job wall clock), "
                  f"{per_fit:.3f} CPU-s per fit (the whole job: workers, set-up, I/O), "
                  f"median {_median(lab['fit_seconds']):.3f} s per fit inside the workers")
            inside = both.filter(~outside_grid(both))
            rows = accuracy(inside)
            print_table(f"{library} / {name} / {fitter}: truth inside the fitting grid", rows)
            outside = both.filter(outside_grid(both))
            print_table(f"{library} / {name} / {fitter}: truth outside the fitting grid "
                        f"({outside.height} baxels)", accuracy(outside) if outside.height else [])
            for key, value in gas_summary(both).items():
                print(f"  {key}: {value if not isinstance(value, float) else round(value, 3)}")
            summary[fitter] = (rate, per_fit, rows, chi2_frac)
            out[f"{name}:{fitter}"] = both
        for other in (f for f in summary if f != "ppxf"):
            if "ppxf" in summary:
                compare(library, name, summary["ppxf"], summary[other], other)
    return out


def compare(library: str, name: str, ref: tuple[float, float, list[Row], float],
            fast: tuple[float, float, list[Row], float], fitter: str = "fast") -> None:
    """Print a fitter (``fast``) against the reference: speed ratios and the accuracy criteria.

    "Unchanged" (issue 19): per label, |median offset| and robust scatter within 10 % of the
    reference's (or better), and a χ²_red < 2 fraction not lower. Offsets near zero make
    10 % a tiny absolute number, so the absolute differences are printed as well.

    Both fitters fit the same baxels, so a miss is also tested for significance on the
    baxels both rows hold: resampling them (paired bootstrap, 2,000 draws) gives the 95 %
    interval of fast − 1.1 × ppxf for |median| and scatter; a miss whose interval reaches 0
    or below is within the noise of the statistic. The last column is the median per-baxel
    |fast − ppxf|.
    """
    print(f"\n{library} / {name}: {fitter} vs ppxf (same run, interleaved)\n")
    print(f"  fits/s ratio (job wall clock): {fast[0] / ref[0]:.2f}; "
          f"CPU-time ratio (whole job, per fit): {ref[1] / fast[1]:.2f}")
    print(f"  χ²_red < 2 fraction: ppxf {ref[3]:.3f}, {fitter} {fast[3]:.3f} "
          f"({'ok' if fast[3] >= ref[3] else 'LOWER'})")
    print(f"\n| label | ppxf median | {fitter} median | ppxf scatter | {fitter} scatter | "
          f"within 10 % | paired median abs({fitter} − ppxf) |")
    print("|---|---|---|---|---|---|---|")
    for r, f in zip(ref[2], fast[2], strict=True):
        if not (r.n and f.n):
            continue
        ok_med = abs(f.median) <= 1.1 * abs(r.median)
        ok_mad = f.scatter <= 1.1 * r.scatter
        common = sorted(set(r.values) & set(f.values))
        a = np.array([r.values[k] for k in common])
        b = np.array([f.values[k] for k in common])
        verdict = "yes" if ok_med and ok_mad else (
            f"no (|Δmedian| {abs(f.median) - abs(r.median):+.4f}, "
            f"Δscatter {f.scatter - r.scatter:+.4f}){_significance(a, b, ok_med, ok_mad)}")
        paired = f"{np.median(np.abs(b - a)):.4f} ({a.size})" if a.size else "-"
        print(f"| {r.label} | {r.median:+.4f} | {f.median:+.4f} | {r.scatter:.4f} | "
              f"{f.scatter:.4f} | {verdict} | {paired} |")


def _significance(ref: np.ndarray, fast: np.ndarray, ok_med: bool, ok_mad: bool,
                  draws: int = 2000) -> str:
    """Paired-bootstrap 95 % intervals of fast − 1.1 × ref for the criteria that missed."""
    if ref.size < 20:
        return "; too few paired baxels to test"
    rng = np.random.default_rng(0)
    idx = rng.integers(0, ref.size, (draws, ref.size))

    def med_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        med = np.median(x, axis=1)
        return med, 1.4826 * np.median(np.abs(x - med[:, None]), axis=1)

    (m_r, s_r), (m_f, s_f) = med_mad(ref[idx]), med_mad(fast[idx])
    parts = []
    for missed, excess, what in ((not ok_med, np.abs(m_f) - 1.1 * np.abs(m_r), "|median|"),
                                 (not ok_mad, s_f - 1.1 * s_r, "scatter")):
        if missed:
            lo, hi = np.percentile(excess, [2.5, 97.5])
            verdict = "within the noise" if lo <= 0 else "significant"
            parts.append(f"{what} − 1.1 × ppxf's: 95 % [{lo:+.4f}, {hi:+.4f}], {verdict}")
    return "; " + "; ".join(parts)


def real_spectra(fitter: str = fitting.DEFAULT_FITTER) -> pl.DataFrame:
    """Label the 8 + 3 real DR15 spectra shipped in tests/data; one row per spectrum."""
    from astropy.io import fits

    from desomdb.science import spectra

    rows = []
    for name in REAL_FILES:
        with fits.open(TEST_DATA / name) as hdul:
            wave, z = hdul["WAVE"].data, hdul["Z"].data
            flux, ivar = hdul["FLUX"].data.astype(float), hdul["IVAR"].data.astype(float)
            mask = hdul["MASK"].data
        f, iv, m, norm = spectra.observed_to_rest(wave, flux, ivar, mask, z)
        for k in range(len(z)):
            row = fitting.fit_spectrum(f[k], iv[k], m[k], norm[k], float(z[k]), fitter=fitter)
            rows.append({"file": name.split("_")[1], "index": k, "z": float(z[k]),
                         **{c: row[c] for c in (
                             "status", "chi2_red", "age_mw_gyr", "mh_mw", "log_ml_r", "ebv_star",
                             "sn_hb", "an_hb", "sn_ha", "an_ha", "sn_oiii5007", "sn_nii6583",
                             "ebv_gas_raw", "ebv_gas_raw_err", "ebv_gas", "ebv_gas_flags",
                             "log_ssfr", "ssfr_flags", "d_bpt", "bpt_class", "ew_ha")}})
    return pl.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, pl.DataFrame]]:
    """Run the benchmark; returns the joined fit + truth rows per library and variant."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--galaxies", type=int, default=8)
    parser.add_argument("--library", choices=("all", "miuscat", "bc03", "mastar"),
                        default="all")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated fit variants: {list(VARIANTS)}, regul=X, "
                        "mdegree=N")
    parser.add_argument("--max-per-cube", type=int, help="fit at most N baxels per cube")
    parser.add_argument("--target-snr", type=float, default=20.0, help="Voronoi target S/N")
    parser.add_argument("--ifu-sizes", default="19,37")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_labels"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fitters", default="batch,ppxf",
                        help="comma-separated fitters, labelled interleaved: "
                        f"{list(fitting.FITTERS)}")
    parser.add_argument("--real", action="store_true", help="also label the real DR15 spectra")
    args = parser.parse_args(argv)
    args.ifu_sizes = tuple(int(s) for s in args.ifu_sizes.split(","))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.fitters = [f.strip() for f in args.fitters.split(",") if f.strip()]
    for fitter in args.fitters:
        if fitter not in fitting.FITTERS:
            parser.error(f"unknown fitter {fitter!r}; choose from {list(fitting.FITTERS)}")
    for name in args.variants:
        try:
            variant(name)
        except ValueError as exc:
            parser.error(str(exc))
    # Realistic numbers first: the library the fits do not use.
    libraries = ["bc03", "mastar", "miuscat"] if args.library == "all" else [args.library]
    results = {lib: run_library(lib, args) for lib in libraries}
    first = f"{args.variants[0]}:{args.fitters[0]}"
    side_by_side({lib: r[first].filter(~outside_grid(r[first])) for lib, r in results.items()})
    if args.real:
        with pl.Config(tbl_cols=-1, tbl_rows=-1, tbl_width_chars=250, float_precision=2):
            for fitter in args.fitters:
                print(f"\nreal DR15 spectra (tests/data), fitter {fitter}\n",
                      real_spectra(fitter))
    return results


if __name__ == "__main__":
    main()
