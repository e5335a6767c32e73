import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from desomdb.cli import main
from desomdb.errors import ArchiveError
from desomdb.products.export_hats import export_hats
from desomdb.query import views


# lsdb 0.11 and nested-pandas call pandas APIs that pandas 3.1 deprecates
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hats_round_trip_and_lsdb_crossmatch(full_archive, tmp_path) -> None:
    lsdb = pytest.importorskip("lsdb")
    pd = pytest.importorskip("pandas")
    arch, model_id, _, d2 = full_archive
    out = tmp_path / "desomdb_galaxies"
    result = CliRunner().invoke(main, ["export-hats", str(arch), str(out)])
    assert result.exit_code == 0, result.output

    expected = views.connect(arch).sql("select * from galaxy_summary order by plateifu").pl()
    catalog = lsdb.open_catalog(out)
    got = catalog.compute().sort_values("plateifu")
    assert got["plateifu"].tolist() == expected["plateifu"].to_list()
    assert np.allclose(got["ra"], expected["ra"]) and np.allclose(got["dec"], expected["dec"])
    assert got["peak_node"].tolist() == expected["peak_node"].to_list()
    assert set(got["desom2_model_id"]) == {d2}
    props = (out / "hats.properties").read_text()
    assert f"desomdb_model_id={model_id}" in props and "desomdb_template_library=MIUSCAT" in props
    data = next((out / "dataset").rglob("Npix=*.parquet"))
    field = pq.read_schema(data).field("median_log_ml_r")
    assert field.metadata[b"unit"] == b"dex(solMass / solLum)"

    # a second small HATS catalog: 1" east of the first galaxy, 2" north of the second, one far
    ra, dec = expected["ra"].to_numpy(), expected["dec"].to_numpy()
    other = pd.DataFrame({
        "source_id": [10, 11, 12],
        "ra": [ra[0] + 1 / 3600 / np.cos(np.radians(dec[0])), ra[1], (ra[0] + 90) % 360],
        "dec": [dec[0], dec[1] + 2 / 3600, -dec[0]],
    })
    lsdb.from_dataframe(other, ra_column="ra", dec_column="dec").to_hats(
        tmp_path / "other", progress_bar=False)
    matched = catalog.crossmatch(lsdb.open_catalog(tmp_path / "other"), radius_arcsec=3,
                                 n_neighbors=1, suffix_method="overlapping_columns",
                                 log_changes=False).compute().sort_values("source_id")
    assert matched["source_id"].tolist() == [10, 11]
    assert matched["plateifu"].tolist() == expected["plateifu"].to_list()[:2]
    assert np.allclose(matched["_dist_arcsec"], [1.0, 2.0], atol=1e-6)


def test_export_hats_refuses_an_existing_out_and_a_half_built_archive(full_archive, ingested,
                                                                      tmp_path) -> None:
    arch, _, _, _ = full_archive
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")  # an empty folder may be used
    result = CliRunner().invoke(main, ["export-hats", str(arch), str(tmp_path / "taken")])
    assert result.exit_code != 0 and "--overwrite" in result.output
    with pytest.raises(ArchiveError, match=r"labels \(desomdb label\)"):
        export_hats(ingested[0], tmp_path / "cat")  # reads only
