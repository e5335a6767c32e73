import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from click.testing import CliRunner

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ArchiveError
from desomdb.products import maps
from desomdb.query import views
from desomdb.survey.cube import read_cube


def test_maps_wcs_maps_a_bins_spaxel_to_the_cubes_radec(full_archive, tmp_path) -> None:
    arch, model_id, _, _ = full_archive
    con = views.connect(arch)
    plateifu, release, source = con.sql(
        "select plateifu, release, source_path from cubes where status = 'ok' order by 1"
    ).fetchall()[0]
    out = tmp_path / "maps.fits"
    result = CliRunner().invoke(main, ["maps", str(arch), plateifu, "--out", str(out)])
    assert result.exit_code == 0, result.output

    # a labelled bin passing the cut, and one of its spaxels
    bin_id, age, node = con.sql(
        "select bin_id, age_mw_gyr, node from baxel_labels where plateifu = $1 and chi2_ok "
        "order by bin_id limit 1", params=[plateifu]).fetchall()[0]
    x, y = con.sql("select x, y from bin_map where plateifu = $1 and bin_id = $2 "
                   "order by y, x limit 1", params=[plateifu, bin_id]).fetchall()[0]
    cube = read_cube(source)
    with fits.open(out) as hdul:
        assert hdul[0].header["PLATEIFU"] == plateifu and hdul[0].header["DESOM1"] == model_id
        assert hdul[0].header["WCSSRC"] == "archive"
        for name in ("BIN_ID", "SNR", "NODE", "AGE_MW_GYR", "LOG_ML_R", "D_BPT"):
            assert hdul[name].data.shape == cube.shape
        assert hdul["BIN_ID"].data[y, x] == bin_id
        assert hdul["NODE"].data[y, x] == node
        assert hdul["AGE_MW_GYR"].data[y, x] == pytest.approx(age, rel=1e-6)
        assert hdul["AGE_MW_GYR"].header["BUNIT"] == "Gyr"
        assert hdul["BIN_ID"].data[cube.good.any(axis=0) == 0].max() == -1
        wcs = WCS(hdul["AGE_MW_GYR"].header)
    ra, dec = wcs.all_pix2world([x], [y], 0)
    ra_cube, dec_cube = cube.wcs.all_pix2world([x], [y], 0)
    assert abs(ra[0] - ra_cube[0]) * 3600 < 1e-6 and abs(dec[0] - dec_cube[0]) * 3600 < 1e-6
    assert result.output.startswith(f"wrote {out}: {plateifu} ({release})")


def test_wcs_falls_back_to_an_unchanged_cube_file(full_archive) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    rel = con.sql("select * from cubes where status = 'ok' order by plateifu limit 1")
    cube = dict(zip(rel.columns, rel.fetchall()[0], strict=True))
    stored, shape, source = maps.celestial_header(cube, Archive(arch))
    old = {**cube, "wcs_header": None, "n_x": None, "n_y": None}  # archive before the column
    from_file, shape_file, source_file = maps.celestial_header(old, Archive(arch))
    assert source == "archive" and source_file == cube["source_path"]
    assert shape == shape_file
    pix = np.array([[0.0, 0.0], [shape[1] - 1.0, shape[0] - 1.0]])
    assert np.allclose(WCS(stored).all_pix2world(pix, 0), WCS(from_file).all_pix2world(pix, 0),
                       rtol=0, atol=1e-10)
    with pytest.raises(ArchiveError, match="sha256 differs"):
        maps.celestial_header({**old, "checksum": "0" * 64}, Archive(arch))
    with pytest.raises(ArchiveError, match="re-ingest"):
        maps.celestial_header({**old, "source_path": "/nonexistent.fits"}, Archive(arch))


def test_unknown_plateifu_is_one_line(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    result = CliRunner().invoke(main, ["maps", str(arch), "1-2", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "no ingested cube '1-2'" in result.output
