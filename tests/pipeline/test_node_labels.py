"""node_labels: members' statistics streamed from DuckDB, calibrated intervals, coverage."""

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from scipy import optimize, stats

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.pipeline import calibrate, node_labels
from desomdb.query import views
from desomdb.science import fitting, label_catalogue


def test_mixture_quantiles_match_a_root_of_the_mixture_cdf() -> None:
    rng = np.random.default_rng(1)
    value = rng.normal(size=40) * 3
    sigma = rng.uniform(0.1, 2.0, size=40)
    group = np.sort(rng.integers(0, 4, size=40))
    got = node_labels.mixture_quantiles(value, sigma, group, 4, (0.16, 0.84), tol=1e-10)
    for g in range(4):
        v, s = value[group == g], sigma[group == g]
        for k, p in enumerate((0.16, 0.84)):
            want = optimize.brentq(lambda x, v=v, s=s, p=p: stats.norm.cdf((x - v) / s).mean()
                                   - p, -50, 50, xtol=1e-12)
            assert got[g, k] == pytest.approx(want, abs=1e-8)


def test_one_member_interval_is_its_value_plus_minus_sigma() -> None:
    q = node_labels.mixture_quantiles(np.array([2.0, 5.0]), np.array([0.5, 0.0]),
                                      np.array([0, 1]), 2, (0.16, 0.84), tol=1e-12)
    z = stats.norm.ppf(0.84)
    np.testing.assert_allclose(q[0], [2 - 0.5 * z, 2 + 0.5 * z], atol=1e-9)
    np.testing.assert_allclose(q[1], [5.0, 5.0], atol=1e-9)  # sigma 0: a point mass


def test_coverage_on_a_constructed_case() -> None:
    truth = np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.nan])
    lo = np.array([-1.0, 1.0, 2.5, 0.0, 4.5, 0.0])
    hi = np.array([1.0, 2.0, 3.0, 2.9, 5.0, 1.0])
    # inside (bounds included): rows 0 and 1; outside: 2, 3, 4; row 5 has no truth
    assert calibrate.coverage(truth, lo, hi) == pytest.approx(2 / 5)
    assert np.isnan(calibrate.coverage(truth[5:], lo[5:], hi[5:]))
    # Truths drawn from the intervals' own Gaussian: the 68 % interval covers 68 %.
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=20000), rng.uniform(0.1, 1.0, size=20000)
    t = mu + s * rng.normal(size=mu.size)
    z = stats.norm.ppf(0.84)
    assert calibrate.coverage(t, mu - z * s, mu + z * s) == pytest.approx(0.68, abs=0.01)


def _galaxies(rng, n_gal: int, per_gal: int, n_nodes: int, offset: float, within: float,
              sigma: float):
    """Members of ``n_gal`` galaxies (each on 2 of ``n_nodes`` nodes) with a galaxy-wide
    offset of rms ``offset``: truth, fit (truth + N(0, sigma)), sigma, node, galaxy."""
    galaxy = np.repeat(np.arange(n_gal), per_gal)
    node = np.where(rng.random(galaxy.size) < 0.5, galaxy % n_nodes, (galaxy + 1) % n_nodes)
    truth = (node * 0.3 + rng.normal(0, offset, n_gal)[galaxy]
             + rng.normal(0, within, galaxy.size))
    fit = truth + rng.normal(0, sigma, galaxy.size)
    return truth, fit, np.full(galaxy.size, sigma), node, galaxy


def _held_out_coverage(truth, fit, sig, node, galaxy, use_term: bool) -> float:
    """Leave one galaxy out: coverage of its truths by intervals of the other galaxies."""
    hits = []
    for g in np.unique(galaxy):
        other = galaxy != g
        tau = node_labels.galaxy_term(fit[other], sig[other], node[other], galaxy[other],
                                      upper=5.0) if use_term else 0.0
        nodes = np.unique(node[other])
        order = np.argsort(node[other], kind="stable")
        grp = np.searchsorted(nodes, node[other][order])
        q = node_labels.mixture_quantiles(fit[other][order],
                                          np.sqrt(sig[other][order] ** 2 + tau**2), grp,
                                          nodes.size, (0.16, 0.84), tol=1e-9)
        mine = (galaxy == g) & np.isin(node, nodes)
        k = np.searchsorted(nodes, node[mine])
        hits.append((truth[mine] >= q[k, 0]) & (truth[mine] <= q[k, 1]))
    return float(np.concatenate(hits).mean())


def test_galaxy_term_calibrates_held_out_galaxies_from_fits_alone() -> None:
    """Few galaxies per node and galaxy-wide offsets: the members' mixture misses a new
    galaxy's truth; with the galaxy term (estimated from fits, never from truth) coverage of
    truth comes to 68 %."""
    rng = np.random.default_rng(1)
    truth, fit, sig, node, galaxy = _galaxies(rng, 16, 40, 16, offset=0.2, within=0.02,
                                              sigma=0.03)
    without = _held_out_coverage(truth, fit, sig, node, galaxy, use_term=False)
    with_term = _held_out_coverage(truth, fit, sig, node, galaxy, use_term=True)
    assert without < 0.3
    assert 0.58 <= with_term <= 0.78
    # two galaxies per node: the term is about the rms difference of two offsets, 0.2 √2
    assert 0.14 < node_labels.galaxy_term(fit, sig, node, galaxy, upper=5.0) < 0.45


def test_galaxy_term_is_zero_without_offsets_or_second_galaxies() -> None:
    rng = np.random.default_rng(2)
    _truth, fit, sig, node, galaxy = _galaxies(rng, 200, 20, 4, offset=0.0, within=0.05,
                                              sigma=0.03)
    assert node_labels.galaxy_term(fit, sig, node, galaxy, upper=5.0) < 0.01
    one = galaxy == 0
    assert node_labels.galaxy_term(fit[one], sig[one], node[one], galaxy[one]) == 0.0


def test_error_model_pools_squared_differences_per_snr_bin() -> None:
    def res(base: float, refits: list[float], alts: list[float]) -> dict:
        row = dict.fromkeys(label_catalogue.NODE_LABELS, np.nan)
        return {"base": {**row, "mh_mw": base},
                "refits": [{**row, "mh_mw": r} for r in refits],
                "alternatives": [{**row, "mh_mw": a} for a in alts]}

    results = [res(0.0, [0.1, -0.1], [0.3, 0.0]), res(0.0, [0.3, 0.3], [0.0, 0.0])]
    err = calibrate.error_model(results, np.array([12.0, 15.0])).filter(
        pl.col("label") == "mh_mw")
    both = err.filter(pl.col("snr_lo") == 10.0).row(0, named=True)
    assert both["n_baxels"] == 2
    assert both["sigma_stat"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0.09 + 0.09) / 4))
    assert both["sigma_sys"] == pytest.approx(np.sqrt(0.09 / 4))
    assert both["sigma"] == pytest.approx(np.hypot(both["sigma_stat"], both["sigma_sys"]))
    # Every other bin borrows the only calibrated one (and says it has no baxel of its own).
    assert err.height == len(calibrate.SNR_EDGES) - 1
    assert (err["sigma"] == both["sigma"]).all()
    assert err.filter(pl.col("snr_lo") != 10.0)["n_baxels"].sum() == 0


def _members(con, label: str, model_id: str) -> pl.DataFrame:
    """Node members of ``label``: node, value v, the fit's log_age_lw a, snr, fitter."""
    cut = f" and l.{label_catalogue.CUTS[label]}" if label in label_catalogue.CUTS else ""
    return con.sql(f"select a.node, l.{label} as v, l.log_age_lw as a, b.snr, l.fitter "
                   "from assignments a join preferred_labels l using (release, plateifu, bin_id) "
                   "join baxels b using (release, plateifu, bin_id) "
                   f"where a.model_id = '{model_id}' and l.status = 'ok' and l.chi2_ok{cut} "
                   f"and isfinite(l.{label})").pl()


def _fit_sigma(con, m: pl.DataFrame, label: str) -> np.ndarray:
    """The error model's σ of ``label`` for each member (its fitter and S/N bin)."""
    sig = con.sql("select snr_lo, snr_hi, sigma, fitter from label_errors "
                  f"where label = '{label}'").pl()
    return np.array([sig.filter((pl.col("fitter") == f) & (pl.col("snr_lo") <= x)
                                & (pl.col("snr_hi") > x))["sigma"][0]
                     for x, f in zip(m["snr"], m["fitter"], strict=True)])


def _assert_mixture_quantiles(nl: pl.DataFrame, m: pl.DataFrame, lo: str, hi: str) -> None:
    """Each node's ``lo``/``hi`` are the 16th/84th percentiles of N(v, s²) over its members."""
    for (node,), g in m.group_by("node"):
        v, sg = g["v"].to_numpy(), g["s"].to_numpy()
        row = nl.filter(pl.col("node") == node)
        for col, p in ((lo, 0.16), (hi, 0.84)):
            want = optimize.brentq(lambda x, v=v, sg=sg, p=p: stats.norm.cdf((x - v) / sg)
                                   .mean() - p, -100, 100, xtol=1e-10)
            assert row[col][0] == pytest.approx(want, abs=1e-6)


def test_statistics_match_numpy_and_do_not_depend_on_the_batch_size(
        trained_archive, monkeypatch) -> None:
    arch_path, model_id, _ = trained_archive
    whole = pl.DataFrame(node_labels.node_label_table(arch_path, model_id))
    monkeypatch.setattr(node_labels, "BATCH_ROWS", 5)  # groups cut across many batches
    small = pl.DataFrame(node_labels.node_label_table(arch_path, model_id))
    assert whole.equals(small)
    assert whole["lo68"].null_count() == whole.height  # no error model yet
    con = views.connect(arch_path, raw=True)
    m = _members(con, "age_mw_gyr", model_id)
    for (node,), g in m.group_by("node"):
        row = whole.filter((pl.col("label") == "age_mw_gyr") & (pl.col("node") == node))
        v = g["v"].to_numpy()
        assert row["n"][0] == v.size
        assert row["p16"][0] == pytest.approx(np.percentile(v, 16), rel=1e-12)
        assert row["p84"][0] == pytest.approx(np.percentile(v, 84), rel=1e-12)
        assert row["mean"][0] == pytest.approx(v.mean(), rel=1e-12)
        assert row["histogram"][0].to_list() == np.histogram(
            np.clip(v, 0, 14), bins=np.linspace(0, 14, 29))[0].tolist()


@pytest.fixture(scope="module")
def calibrated(trained_archive, tmp_path_factory) -> tuple[Path, str, calibrate.CalibrationReport]:
    """A copy of the trained archive after a (minimal) real calibration run."""
    arch_path, model_id, _ = trained_archive
    arch = tmp_path_factory.mktemp("calibrated") / "arch"
    shutil.copytree(arch_path, arch)
    report = calibrate.calibrate(arch, per_bin=1, refits=1, workers=1, progress=False)
    return arch, model_id, report


@pytest.mark.slow
def test_calibrate_writes_the_error_model_and_intervals(calibrated) -> None:
    arch, model_id, report = calibrated
    assert report.models == [model_id] and report.n_fits == report.n_baxels * 4
    con = views.connect(arch, raw=True)
    err = con.sql("select * from label_errors").pl()
    documented = yaml.safe_load(resources.files("desomdb.sql").joinpath("schema.yml")
                                .read_text())["views"]
    for view in ("label_errors", "node_labels"):
        cols = {r[0] for r in con.sql(f"describe {view}").fetchall()}
        assert set(documented[view]["columns"]) <= cols, view
    assert set(err["fitter"]) <= set(fitting.FITTERS.values())
    assert err.height == len(set(err["fitter"])) * len(label_catalogue.NODE_LABELS) * (
        len(calibrate.SNR_EDGES) - 1)
    assert err.filter(pl.col("label") == "age_mw_gyr")["sigma"].is_finite().all()
    np.testing.assert_allclose(err["sigma"] ** 2, err["sigma_stat"] ** 2 + err["sigma_sys"] ** 2)
    nl = con.sql("select * from node_labels where label = 'age_mw_gyr'").pl()
    assert nl["lo68"].null_count() == 0
    # The interval of each node is the mixture of its members convolved with their sigma
    # and the label's galaxy term, in quadrature.
    tau = nl["sigma_galaxy"].unique().to_list()
    assert len(tau) == 1 and tau[0] >= 0
    m = _members(con, "age_mw_gyr", model_id)
    s = _fit_sigma(con, m, "age_mw_gyr")
    m = m.with_columns(pl.Series("s", np.sqrt(s**2 + tau[0] ** 2)))
    _assert_mixture_quantiles(nl, m, "lo68", "hi68")


def test_coverage_of_held_out_truth_is_measured(calibrated) -> None:
    arch, model_id, _ = calibrated
    con = views.connect(arch, raw=True)
    # every other bin held out (two galaxies only: a whole held-out galaxy may share no node
    # with the other one)
    held_out = "a.bin_id % 2 = 0"
    cov = {c.label: c for c in calibrate.node_coverage(arch, model_id, held_out,
                                                        ("age_mw_gyr", "mh_mw"))}
    assert set(cov) == {"age_mw_gyr", "mh_mw"}
    for c in cov.values():  # the tiny map may give no held-out baxel a node with others
        assert c.n == 0 or (0 <= c.calibrated <= 1 and 0 <= c.members <= 1)
    # Recomputed by hand: intervals from the other members, truth of the held-out ones.
    nl = pl.DataFrame(node_labels.node_label_table(arch, model_id, where=f"not ({held_out})"))
    held = con.sql("select a.node, t.age_mw_gyr as truth from assignments a "
                   "join labels l using (release, plateifu, bin_id) "
                   "join truth t using (release, plateifu, bin_id) "
                   f"where {held_out} and l.status = 'ok' and l.chi2_ok").pl()
    j = held.join(nl.filter(pl.col("label") == "age_mw_gyr"), on="node")
    assert cov["age_mw_gyr"].n == j.height
    if j.height:
        want = ((j["truth"] >= j["lo68"]) & (j["truth"] <= j["hi68"])).to_numpy().mean()
        assert cov["age_mw_gyr"].calibrated == pytest.approx(want)


@pytest.mark.slow
def test_recalibrating_replaces_the_error_model_under_a_new_name(calibrated, tmp_path) -> None:
    """A committed file never changes under its name (readers cache footers by path): the
    old code rewrote label_errors-<fitter>.parquet in place."""
    arch, _, _ = calibrated
    copy = tmp_path / "arch"
    shutil.copytree(arch, copy)
    before = {f.name for f in Archive(copy).files(paths.LABEL_ERRORS)}
    calibrate.calibrate(copy, per_bin=1, refits=1, workers=1, seed=1, progress=False)
    after = {f.name for f in Archive(copy).files(paths.LABEL_ERRORS)}
    assert len(after) == len(before) and not after & before
    assert {paths.parse_label_errors_name(n) for n in after} == \
        {paths.parse_label_errors_name(n) for n in before}


def test_calibrate_needs_labels(ingested) -> None:
    from desomdb.errors import ArchiveError

    arch, _ = ingested
    with pytest.raises(ArchiveError, match="desomdb label"):
        calibrate.calibrate(arch, progress=False)


def test_galaxy_term_bounds_its_pairs_when_members_crowd_one_node() -> None:
    """Every member on one node (a degenerate map): a seeded sample of the node's members is
    the reference, so the pairs stay bounded and the term is still estimated."""
    rng = np.random.default_rng(3)
    n = 60_000
    galaxy = rng.integers(0, 300, n)
    fit = rng.normal(0, 0.1, 300)[galaxy] + rng.normal(0, 0.02, n)
    sig = np.full(n, 0.02)
    node = np.zeros(n, dtype=np.int64)
    tau = node_labels.galaxy_term(fit, sig, node, galaxy, max_held=500, max_reference=200,
                                  upper=5.0)
    assert np.isfinite(tau) and 0.0 <= tau < 0.1  # 300 galaxies: the node's spread covers


def test_a_member_without_sigma_does_not_drop_the_labels_galaxy_term() -> None:
    """One sampled member of a fitter the error model does not cover used to drop the whole
    label's galaxy term, and a label with no term lost every node's interval."""
    rng = np.random.default_rng(4)
    _truth, fit, sig, node, galaxy = _galaxies(rng, 16, 40, 16, offset=0.2, within=0.02,
                                               sigma=0.03)
    sig_missing = sig.copy()
    sig_missing[0] = np.nan  # one member of an uncovered fitter
    rows = pa.table({"label": ["mh_mw"] * fit.size, "node": node, "value": fit,
                     "sigma": sig_missing, "galaxy": galaxy.astype(str)})
    terms = node_labels.terms_of_sample(rows)
    keep = np.isfinite(sig_missing)
    assert terms["mh_mw"] == node_labels.galaxy_term(
        fit[keep], sig[keep], node[keep], galaxy[keep].astype(str), upper=1.1)
    assert terms["mh_mw"] > 0.1
    # no term for a label (nothing sampled): the members' own sigma still gives intervals
    order = np.lexsort((fit, node))
    table = node_labels._reduce(np.full(fit.size, "mh_mw"), node[order], fit[order],
                                sig[order], {})
    assert table.column("lo68").null_count == 0
    assert pc.all(pc.equal(table.column("sigma_galaxy"), 0.0)).as_py()


@pytest.mark.slow
def test_total_intervals_add_the_library_term_to_every_member(calibrated, monkeypatch) -> None:
    from desomdb.science import library_term

    arch, model_id, _ = calibrated
    edges = library_term.AGE_EDGES
    terms = [library_term.Term("age_mw_gyr", edges[k], edges[k + 1], s, 10, True)
             for k, s in enumerate((2.0, 1.0, 0.5))]
    monkeypatch.setattr(library_term, "load", lambda path=None: terms)
    table = pl.from_arrow(node_labels.node_label_table(arch, model_id))
    assert isinstance(table, pl.DataFrame)
    age = table.filter(pl.col("label") == "age_mw_gyr")
    assert age["lo68_total"].null_count() == 0
    assert (age["lo68_total"] <= age["lo68"] + 1e-9).all()
    assert (age["hi68_total"] >= age["hi68"] - 1e-9).all()
    assert table.filter(pl.col("label") == "log_ml_r")["lo68_total"].null_count() == \
        table.filter(pl.col("label") == "log_ml_r").height  # no term: no total interval
    # Each member's σ is widened by the term of its own fit's light-weighted age.
    con = views.connect(arch, raw=True)
    m = _members(con, "age_mw_gyr", model_id)
    s = _fit_sigma(con, m, "age_mw_gyr")
    lib = library_term.sigma_library(terms, "age_mw_gyr", m["a"].to_numpy())
    tau = age["sigma_galaxy"][0]
    m = m.with_columns(pl.Series("s", np.sqrt(s**2 + tau**2 + lib**2)))
    _assert_mixture_quantiles(age, m, "lo68_total", "hi68_total")
    # The flag follows the widths (a unit test below checks both outcomes).
    width = (age["hi68"] - age["lo68"]).to_numpy()
    total = (age["hi68_total"] - age["lo68_total"]).to_numpy()
    assert (age["library_dominated"].to_numpy() == (total**2 > 2 * width**2)).all()
    ml = table.filter(pl.col("label") == "log_ml_r")
    assert ml["library_dominated"].null_count() == ml.height


def test_a_node_is_library_dominated_when_the_term_outweighs_its_spread() -> None:
    # Two nodes of the same members; the library term is small in one, large in the other.
    rng = np.random.default_rng(4)
    value = np.sort(rng.normal(0.0, 0.1, 50))
    label = np.full(100, "log_age_lw")
    node = np.repeat([0, 1], 50)
    sigma = np.full(100, 0.05)
    lib = np.r_[np.full(50, 0.01), np.full(50, 0.5)]
    table = node_labels._reduce(label, node, np.r_[value, value], sigma, {}, lib)
    assert table.column("library_dominated").to_pylist() == [False, True]
    none = node_labels._reduce(label, node, np.r_[value, value], sigma, {})
    assert none.column("library_dominated").to_pylist() == [None, None]
