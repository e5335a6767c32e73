import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.io.votable import parse
from astropy.table import Table
from click.testing import CliRunner

from desomdb.cli import main
from desomdb.products import export
from desomdb.products.provenance import Provenance, provenance
from desomdb.science import fitting

QUERY = ("select plateifu, bin_id, age_mw_gyr, mh_mw, log_ml_r, flux_ha, chi2_ok, "
         "median(age_mw_gyr) over () as \"median(age_mw_gyr)\" from labels order by 1, 2")


def _sql(arch, fmt, out) -> None:
    result = CliRunner().invoke(main, ["sql", str(arch), QUERY, "--format", fmt,
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output


def test_fits_columns_carry_units_descriptions_and_provenance(full_archive, tmp_path) -> None:
    arch, model_id, _, _ = full_archive
    _sql(arch, "fits", tmp_path / "labels.fits")
    with fits.open(tmp_path / "labels.fits") as hdul:
        h = hdul[1].header
        units = {h[f"TTYPE{i}"]: h.get(f"TUNIT{i}") for i in range(1, h["TFIELDS"] + 1)}
        comments = {h[f"TTYPE{i}"]: h.get(f"TCOMM{i}") for i in range(1, h["TFIELDS"] + 1)}
        assert units["age_mw_gyr"] == "Gyr"
        assert units["mh_mw"] is None and units["log_ml_r"] is None  # FITS has no log units
        assert comments["log_ml_r"].endswith("[unit: [solMass.Lsun-1]]")
        assert units["flux_ha"] == "10**-17 erg s-1 cm-2"
        assert units["median(age_mw_gyr)"] == "Gyr"
        assert units["plateifu"] is None and units["chi2_ok"] is None
        assert comments["flux_ha"] == "Halpha flux."  # ASCII in FITS headers
        for header in (hdul[0].header, h):
            assert header["DESOM1"] == model_id
            assert header["FITTER"] == fitting.FITTER
            assert "MIUSCAT" in header["TEMPLIB"] and "0.2 dex" in header["TEMPLIB"]
            assert header["RELEASES"] == "DR15"
            assert header["DESOMVER"]
        assert hdul[1].data["age_mw_gyr"].size > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy reads it without a UnitsWarning
        table = Table.read(tmp_path / "labels.fits")
    assert str(table["age_mw_gyr"].unit) == "Gyr"


def test_votable_fields_carry_units_descriptions_and_provenance(full_archive, tmp_path) -> None:
    arch, model_id, _, _ = full_archive
    _sql(arch, "votable", tmp_path / "labels.vot")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'dex' is not VOUnit; the reader says so
        vot = parse(str(tmp_path / "labels.vot"))
    fields = {f.name: f for f in vot.get_first_table().fields}
    assert str(fields["age_mw_gyr"].unit) == "Gyr"
    assert fields["mh_mw"].unit.to_string() == "dex"
    assert "Hα flux" in fields["flux_ha"].description
    infos = {i.name: i.value for i in vot.resources[0].infos}
    assert infos["desomdb_model_id"] == model_id
    assert "Teimoorinia et al. 2022" in infos["desomdb_references"]


def test_parquet_export_keeps_units_for_pyarrow_and_astropy(full_archive, tmp_path) -> None:
    arch, model_id, _, _ = full_archive
    _sql(arch, "parquet", tmp_path / "labels.parquet")
    schema = pq.read_schema(tmp_path / "labels.parquet")
    assert schema.field("age_mw_gyr").metadata[b"unit"] == b"Gyr"
    assert schema.field("log_ml_r").metadata[b"unit"] == b"dex(solMass / solLum)"
    assert schema.metadata[b"desomdb_model_id"] == model_id.encode()
    table = Table.read(tmp_path / "labels.parquet")
    assert str(table["age_mw_gyr"].unit) == "Gyr"
    assert table.meta["desomdb_fitters"] == fitting.FITTER
    assert set(table["plateifu"]) == set(pq.read_table(tmp_path / "labels.parquet")
                                         .column("plateifu").to_pylist())


def test_provenance_of_the_archive(full_archive) -> None:
    arch, model_id, _, d2 = full_archive
    prov = provenance(arch)
    assert prov.model_id == model_id and prov.desom2_model_id == d2
    assert prov.releases == ("DR15",) and prov.fitters == (fitting.FITTER,)
    assert prov.generation > 0
    assert any("Cappellari & Copin 2003" in r for r in prov.references)


def test_arrays_become_array_columns_and_ragged_lists_are_left_out(tmp_path) -> None:
    prov = Provenance("/a", 1, ("DR15",), None, None, (), "0", "2026-01-01T00:00:00Z")
    table = pa.table({
        "flux": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3),
        "ragged": pa.array([[1.0], [1.0, 2.0]]),
        "snr": pa.array([1.5, None]),
    })
    dropped = export.write_table(table, tmp_path / "t.fits", "fits", prov)
    assert dropped == ["ragged"]
    with fits.open(tmp_path / "t.fits") as hdul:
        assert hdul[1].data["flux"].shape == (2, 3)
        assert np.isnan(hdul[1].data["snr"][1])
