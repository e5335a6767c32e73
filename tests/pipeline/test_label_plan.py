"""The labelling plan and the labels the map carries (``baxel_estimates``)."""

import shutil

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError
from desomdb.pipeline import assign, calibrate, label_plan, labels, train
from desomdb.query import views
from desomdb.science import label_catalogue
from desomdb.som import model, registry


def _members(n_nodes: int = 4, per_node: int = 12, n_gal: int = 3) -> pl.DataFrame:
    rows = []
    for node in range(n_nodes):
        for k in range(per_node):
            rows.append({"release": "DR15", "plateifu": f"1-{k % n_gal}", "bin_id": node * 100 + k,
                         "node": node, "distance": 1.0, "snr": 5.0 + k, "fitted": False,
                         "planned": False})
    return pl.DataFrame(rows)


def test_out_of_distribution_first_then_every_node_before_any_gets_more() -> None:
    df = _members().with_columns(
        pl.when(pl.col("bin_id") == 305).then(9.0).otherwise(pl.col("distance"))
        .alias("distance"))
    new = label_plan.choose(df, threshold=2.0, n_budget=9)
    assert new["reason"].to_list()[0] == "out_of_distribution" and new["bin_id"][0] == 305
    per_node = new.filter(pl.col("reason") == "node_minimum").group_by("node").len()
    assert sorted(per_node["len"].to_list()) == [2, 2, 2, 2]  # level by level, all nodes
    assert new.height == 9


def test_a_node_minimum_alternates_galaxies_and_spreads_snr() -> None:
    df = _members(n_nodes=1, per_node=12, n_gal=3)
    new = label_plan.choose(df, threshold=2.0, n_budget=5)
    picked = df.join(new.select("bin_id"), on="bin_id")
    assert picked["plateifu"].n_unique() == 3  # every galaxy of the node
    snr = picked["snr"].to_numpy()
    assert snr.max() - snr.min() >= 6  # not five of one S/N


def test_fitted_and_planned_baxels_count_and_a_bigger_budget_extends() -> None:
    df = _members(n_nodes=2, per_node=10)
    n_min = 2 * label_plan.MIN_FITTED
    first = label_plan.choose(df, threshold=2.0, n_budget=n_min)
    assert first.height == n_min and set(first["reason"]) == {"node_minimum"}
    done = df.with_columns(pl.col("bin_id").is_in(first["bin_id"].to_list()).alias("planned"))
    assert label_plan.choose(done, threshold=2.0, n_budget=n_min).height == 0  # nothing new
    more = label_plan.choose(done, threshold=2.0, n_budget=n_min + 6,
                             widths={0: 0.5, 1: 0.1})
    assert more.height == 6 and set(more["reason"]) == {"wide_interval"}
    assert not set(more["bin_id"]) & set(first["bin_id"])
    counts = dict(more.group_by("node").len().iter_rows())
    assert counts[0] == 5 and counts[1] == 1  # more fits where the intervals are wide


def test_budget_is_a_fraction_or_a_count() -> None:
    assert label_plan.budget_count(0.1, 1000) == 100
    assert label_plan.budget_count(250, 1000) == 250
    with pytest.raises(ConfigError, match="budget"):
        label_plan.budget_count(0, 1000)


@pytest.fixture(scope="module")
def planned(ingested, tmp_path_factory):
    """Three galaxies: a first sample of 3 per cube, a tiny map, a plan of 40 %, calibrated."""
    from conftest import TINY

    src, _ = ingested
    root = tmp_path_factory.mktemp("plan") / "arch"
    shutil.copytree(src, root)
    labels.label(root, workers=1, progress=False, max_per_cube=3)
    model_id = train.train(root, model.compact_config(**TINY), where="true", progress=False)
    registry.set_current_model(Archive(root), model_id)
    assign.assign(root, progress=False)
    result = CliRunner().invoke(main, ["label", str(root), "--plan", "--budget", "0.4",
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    calibrate.calibrate(root, per_bin=1, refits=1, workers=1, progress=False)
    return root, model_id, result.output


@pytest.mark.slow
def test_plan_fits_its_baxels_and_the_map_labels_the_rest(planned) -> None:
    root, model_id, output = planned
    assert "planned" in output and "node_minimum" in output
    con = views.connect(root)
    n_bax = con.sql("select count(*) from baxels").fetchall()[0][0]
    n_lab = con.sql("select count(*) from labels").fetchall()[0][0]
    plan = con.sql("select * from label_plan").pl()
    assert n_lab == pytest.approx(0.4 * n_bax, abs=1)  # the first sample counted in the budget
    assert plan["model_id"].unique().to_list() == [model_id]
    est = con.sql("select e.*, l.age_mw_gyr as fit_age, l.chi2_ok as fit_chi2_ok, "
                  "m.age_mw_gyr as node_age, n.n as node_n, m.age_mw_gyr_lo68 as node_lo "
                  "from baxel_estimates e left join labels l using (release, plateifu, bin_id) "
                  "left join node_labels n on n.model_id = current_model() and n.node = e.node "
                  "and n.label = 'age_mw_gyr' left join map_labels m on "
                  "m.model_id = current_model() and m.release = e.release and "
                  "m.plateifu = e.plateifu and m.bin_id = e.bin_id").pl()
    con.close()
    assert est.height == n_bax
    fit = est.filter(pl.col("age_mw_gyr_source") == "fit")
    assert fit.height == int(est["fit_chi2_ok"].fill_null(False).sum())
    assert (fit["age_mw_gyr"] == fit["fit_age"]).all()
    assert (fit["age_mw_gyr_lo68"] < fit["age_mw_gyr"]).all()  # ± the fit error model
    mapped = est.filter(pl.col("age_mw_gyr_source") == "map")
    assert mapped.height > 0 and mapped["in_distribution"].all()
    assert (mapped["age_mw_gyr"] == mapped["node_age"]).all()
    assert (mapped["age_mw_gyr_lo68"] == mapped["node_lo"]).all()
    assert (mapped["node_n"] >= label_catalogue.MIN_NODE_MEMBERS).all()
    none = est.filter(pl.col("age_mw_gyr_source").is_null())
    assert none["age_mw_gyr"].is_null().all()
    assert (~none["in_distribution"] | (none["node_n"].fill_null(0)
                                        < label_catalogue.MIN_NODE_MEMBERS)
            | none["fit_chi2_ok"].is_not_null()).all()
    # The total interval holds the statistical one and adds the shipped library term; a
    # label without a measured term (M*/L_r) has none.
    from desomdb.science import library_term

    both = est.filter(pl.col("log_age_lw_lo68").is_not_null())
    assert both.height > 0 and library_term.load()
    widened = both["log_age_lw_lo68"] - both["log_age_lw_lo68_total"]
    assert (widened > 0.02).all()  # σ_lib of log age_L is ~0.09 dex at every age
    assert (both["log_age_lw_hi68_total"] > both["log_age_lw_hi68"]).all()
    assert est["log_ml_r_lo68_total"].is_null().all()
    # Every light-weighted and mass-weighted label has its four columns, all documented.
    for lab in label_catalogue.NODE_LABELS:
        assert {lab, f"{lab}_lo68", f"{lab}_hi68", f"{lab}_source"} <= set(est.columns)
    from desomdb.query.schema import view_docs

    docs = view_docs()
    assert set(docs["baxel_estimates"]) == set(est.columns) - {
        "fit_age", "fit_chi2_ok", "node_age", "node_n", "node_lo"}
    assert set(docs["label_plan"]) == set(plan.columns)


@pytest.mark.slow
def test_a_rerun_with_the_same_budget_fits_nothing_and_a_bigger_one_extends(
        planned, tmp_path) -> None:
    src, _, _ = planned
    root = tmp_path / "arch"
    shutil.copytree(src, root)
    again = label_plan.plan_and_label(root, 0.4, workers=1, progress=False)
    assert sum(again.n_new.values()) == 0 and again.label_report is not None
    assert again.label_report.n_cubes == 0
    before = Archive(root).read("label_plan").num_rows
    more = label_plan.plan_and_label(root, 0.7, workers=1, progress=False)
    after = Archive(root).read("label_plan").num_rows
    assert sum(more.n_new.values()) > 0 and after == before + sum(more.n_new.values())
    n_bax = Archive(root).read("baxels", columns=["bin_id"]).num_rows
    n_lab = Archive(root).read("labels", columns=["bin_id"]).num_rows
    assert n_lab == pytest.approx(0.7 * n_bax, abs=1)


def test_generated_view_matches_the_label_catalogue() -> None:
    from desomdb.query import estimates

    assert estimates.sql_path().read_text() == estimates.estimates_sql()
    text = estimates.estimates_sql()
    for lab in label_catalogue.NODE_LABELS:
        assert f" as {lab}_source" in text


def test_plan_needs_an_assigned_model(ingested, tmp_path) -> None:
    src, _ = ingested
    root = tmp_path / "arch"
    shutil.copytree(src, root)
    result = CliRunner().invoke(main, ["label", str(root), "--plan", "--budget", "0.1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "model" in result.output
    result = CliRunner().invoke(main, ["label", str(root), "--plan", "--label-max-per-cube", "3"])
    assert result.exit_code != 0 and "--plan" in result.output


@pytest.mark.slow
def test_maps_carry_the_estimates_and_their_source(planned, tmp_path) -> None:
    from astropy.io import fits

    from desomdb.products import maps

    root, _, _ = planned
    con = views.connect(root)
    pifu, n_map = con.sql("select plateifu, count(*) filter (where age_mw_gyr_source = 'map') "
                          "as n from baxel_estimates group by 1 order by n desc limit 1"
                          ).fetchall()[0]
    est = con.sql("select bin_id, age_mw_gyr, age_mw_gyr_source from baxel_estimates "
                  "where plateifu = $1", params=[pifu]).pl()
    con.close()
    out = maps.write_maps(root, pifu, tmp_path / "maps.fits")
    assert {"AGE_MW_GYR_EST", "AGE_MW_GYR_LO68", "AGE_MW_GYR_SRC",
            "LOG_AGE_LW_EST"} <= set(out.extensions)
    with fits.open(out.path) as hdul:
        bins, src = hdul["BIN_ID"].data, hdul["AGE_MW_GYR_SRC"].data
        value, fitted = hdul["AGE_MW_GYR_EST"].data, hdul["AGE_MW_GYR"].data
        assert hdul["AGE_MW_GYR_EST"].header["BUNIT"] == "Gyr"
    for row in est.iter_rows(named=True):
        y, x = np.argwhere(bins == row["bin_id"])[0]
        code = {"fit": 1, "map": 2, None: 0}[row["age_mw_gyr_source"]]
        assert src[y, x] == code
        if code:
            assert value[y, x] == pytest.approx(row["age_mw_gyr"], rel=1e-6)
        if code == 2:
            assert np.isnan(fitted[y, x])  # the fit-only map stays a fit-only map
    assert n_map > 0


@pytest.mark.slow
def test_explorer_baxel_page_shows_the_estimate_and_its_source(planned) -> None:
    from starlette.testclient import TestClient

    from desomdb.web import create_app

    root, _, _ = planned
    con = views.connect(root)
    release, pifu, bin_id, value = con.sql(
        "select release, plateifu, bin_id, age_mw_gyr from baxel_estimates "
        "where age_mw_gyr_source = 'map' limit 1").fetchall()[0]
    con.close()
    with TestClient(create_app(root)) as client:
        page = client.get(f"/baxel/{release}/{pifu}/{bin_id}")
    assert page.status_code == 200
    row = page.text.split("<td>age_mw_gyr</td>")[1].split("</tr>")[0]
    assert "not fitted" in row and f"{value:.3g}" in row
    assert '<td class="source">map</td>' in row


@pytest.mark.slow
def test_estimates_export_to_fits_with_units(planned, tmp_path) -> None:
    from astropy.table import Table

    root, _, _ = planned
    out = tmp_path / "estimates.fits"
    result = CliRunner().invoke(main, ["sql", str(root), "select * from baxel_estimates",
                                       "--format", "fits", "--output", str(out)])
    assert result.exit_code == 0, result.output
    table = Table.read(out)
    assert str(table["age_mw_gyr"].unit) == "Gyr" and str(table["log_age_lw_lo68"].unit)
    assert set(table["age_mw_gyr_source"]) <= {"fit", "map", ""}
