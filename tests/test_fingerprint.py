import numpy as np
import polars as pl
import pytest

from desomdb import fingerprint, registry, views
from desomdb.archive import Archive


def test_normalisation_follows_the_paper() -> None:
    counts = np.array([[0, 5, 10], [2, 5, 0], [4, 100, 1]])
    x = fingerprint.normalise_for_desom2(counts, clip_percentile=100)
    assert x.min() == 0 and x.max() == 1
    assert np.all(x.max(axis=1) == 1) and np.all(x.min(axis=1) == 0)
    # node 1 (5, 5, 100) scaled 0-1 over galaxies before the per-galaxy step
    clipped = fingerprint.normalise_for_desom2(counts, clip_percentile=50)
    assert clipped.shape == counts.shape


def test_fingerprint_matrix_counts_baxels() -> None:
    a = pl.DataFrame({"release": ["DR15"] * 4, "plateifu": ["1-1", "1-1", "1-2", "2-1"],
                      "bin_id": [0, 1, 0, 0], "node": [3, 3, 0, 1]})
    b = pl.DataFrame({"release": ["DR15"] * 4, "plateifu": ["1-1", "1-1", "1-2", "2-1"],
                      "bin_id": [0, 1, 0, 0], "mangaid": ["A", "A", "A", "B"],
                      "radius_re": [0.5, 1.5, 2.0, 1.0]})
    gal, counts, radius = fingerprint.fingerprint_matrix(a, b, 4)
    assert gal["mangaid"].to_list() == ["A", "B"]
    assert gal["n_cubes"].to_list() == [2, 1]  # repeat cubes of one galaxy are summed
    np.testing.assert_array_equal(counts, [[1, 0, 0, 2], [0, 1, 0, 0]])
    np.testing.assert_allclose(radius[0], [2.0, 0, 0, 2.0])


@pytest.fixture(scope="module")
def with_fingerprints(full_archive):
    return full_archive


def test_fingerprints_and_desom2(with_fingerprints) -> None:
    arch_path, model_id, cfg, d2 = with_fingerprints
    con = views.connect(arch_path)
    fp = con.sql("select * from fingerprints").pl()
    n_gal = con.sql("select count(distinct mangaid) from baxels").fetchall()[0][0]
    assert fp.height == n_gal
    assert (fp["model_id"] == model_id).all()
    total = fp["counts"].list.sum()
    assert (total == fp["n_baxels"]).all()
    assert fp["counts"].list.len().to_list() == [cfg.n_nodes] * fp.height
    models = con.sql("select model_id, kind, parent_model_id from models").pl()
    row = models.filter(pl.col("kind") == "desom2").row(0, named=True)
    assert row["model_id"] == d2 and row["parent_model_id"] == model_id
    assert fp["desom2_model_id"].unique().to_list() == [d2]
    # the galaxy_fingerprint view agrees with the stored counts
    view = con.sql("select mangaid, sum(n_baxels) as n from galaxy_fingerprint group by 1").pl()
    assert view.join(fp.select("mangaid", "n_baxels"), on="mangaid").select(
        (pl.col("n") == pl.col("n_baxels")).all()).item()
    report = fingerprint.separation_report(arch_path, model_id)
    assert {"sersic_n_spread", "ba_spread", "type_purity"} <= set(report)
    assert 0 < report["type_purity"] <= 1


def test_one_galaxy_query_is_direct(with_fingerprints) -> None:
    arch_path, _, _, _ = with_fingerprints
    con = views.connect(arch_path)
    mangaid = con.sql("select mangaid from fingerprints limit 1").fetchall()[0][0]
    rows = con.sql(f"select node, n_baxels from galaxy_fingerprint where mangaid = '{mangaid}'"
                   ).pl()
    assert rows["n_baxels"].sum() > 0
    assert registry.current_model(Archive(arch_path)) is not None
