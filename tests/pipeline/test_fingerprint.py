import numpy as np
import polars as pl
import pytest

from desomdb.archive.store import Archive
from desomdb.pipeline import fingerprint
from desomdb.query import views
from desomdb.som import registry


def test_normalisation_follows_the_paper() -> None:
    counts = np.array([[0, 5, 10], [2, 5, 0], [4, 100, 1]])
    x = fingerprint.normalise_for_desom2(counts, clip_percentile=100)
    assert x.min() == 0 and x.max() == 1
    assert np.all(x.max(axis=1) == 1) and np.all(x.min(axis=1) == 0)
    # node 1 (5, 5, 100) scaled 0-1 over galaxies before the per-galaxy step
    clipped = fingerprint.normalise_for_desom2(counts, clip_percentile=50)
    # Clipped at each node's median: (0, 2, 4) -> (0, 2, 2), (5, 5, 100) -> 5 (constant, so
    # 0), (10, 0, 1) -> (1, 0, 1); scaled 0-1 per node, then per galaxy.
    np.testing.assert_array_equal(clipped, [[0, 0, 1], [1, 0, 0], [1, 0, 1]])


def test_galaxy_counts_sum_a_galaxys_cubes_in_their_newest_release(tmp_path) -> None:
    import pyarrow as pa

    arch = Archive(tmp_path / "a", create=True)
    cubes: dict[str, list] = {"plateifu": ["1-1", "1-2", "2-1"], "status": ["ok"] * 3,
             "release_ordinal": [15] * 3}
    baxels: dict[str, list] = {"plateifu": ["1-1", "1-1", "1-2", "2-1"], "bin_id": [0, 1, 0, 0],
              "mangaid": ["A", "A", "A", "B"], "radius_re": [0.5, 1.5, 2.0, float("nan")]}
    assigned: dict[str, list] = {"plateifu": ["1-1", "1-1", "1-2", "2-1"], "bin_id": [0, 1, 0, 0],
                "node": [3, 3, 0, 1], "row": [1, 1, 0, 0], "col": [1, 1, 0, 1],
                "release": ["DR15"] * 4}
    with arch.writer("test") as w:
        w.commit(add=[
            w.stage_table("cubes", pa.table(cubes), "cubes/release=DR15/c.parquet"),
            # a DR9 copy of 1-1 that latest_cubes must ignore
            w.stage_table("cubes", pa.table({"plateifu": ["1-1"], "status": ["ok"],
                                             "release_ordinal": [9]}),
                          "cubes/release=DR9/c.parquet"),
            w.stage_table("baxels", pa.table(baxels), "baxels/release=DR15/b.parquet"),
            w.stage_table("baxels", pa.table({k: v[:1] for k, v in baxels.items()}),
                          "baxels/release=DR9/b.parquet"),
            w.stage_table("assignments", pa.table(assigned),
                          "assignments/model_id=desom1-x/a.parquet"),
            w.stage_table("assignments", pa.table({**{k: v[:1] for k, v in assigned.items()},
                                                   "release": ["DR9"]}),
                          "assignments/model_id=desom1-x/b.parquet"),
            w.stage_table("models", pa.table({"kind": ["desom1"]}),
                          "models/model_id=desom1-x/model.parquet"),
        ])
    gal, counts, radius = fingerprint.galaxy_counts(arch, "desom1-x", 4)
    assert gal["mangaid"].to_list() == ["A", "B"]
    assert gal["n_cubes"].to_list() == [2, 1]  # repeat cubes of one galaxy are summed
    assert gal["n_baxels"].to_list() == [3, 1]
    np.testing.assert_array_equal(counts, [[1, 0, 0, 2], [0, 1, 0, 0]])
    np.testing.assert_allclose(radius, np.array([[2.0, 0, 0, 2.0], [0, 0, 0, 0]]))  # NaN: 0


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
    assert np.isfinite(report.sersic_n_spread) or np.isnan(report.sersic_n_spread)
    assert report.type_purity is not None and 0 < report.type_purity <= 1


def test_one_galaxy_query_is_direct(with_fingerprints) -> None:
    arch_path, _, _, _ = with_fingerprints
    con = views.connect(arch_path)
    mangaid = con.sql("select mangaid from fingerprints limit 1").fetchall()[0][0]
    rows = con.sql(f"select node, n_baxels from galaxy_fingerprint where mangaid = '{mangaid}'"
                   ).pl()
    assert rows["n_baxels"].sum() > 0
    assert registry.current_model(Archive(arch_path)) is not None
