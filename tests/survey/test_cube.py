import shutil

import numpy as np
import pytest
from astropy.io import fits

from desomdb.errors import CubeFormatError
from desomdb.survey import manga
from desomdb.survey.cube import read_cube


def test_reads_gz_and_plain(mock_cube_paths, tmp_path) -> None:
    cube = read_cube(mock_cube_paths[0])
    assert cube.flux.shape == (4563, 32, 32) and cube.wave.size == 4563
    assert cube.plateifu == mock_cube_paths[0].name.split("-", 1)[1].rsplit("-LOGCUBE")[0]
    plain = tmp_path / mock_cube_paths[0].name.removesuffix(".gz")
    with fits.open(mock_cube_paths[0]) as hdul:
        hdul.writeto(plain)
    again = read_cube(plain)  # from disk through astropy; the .gz straight from its bytes
    for name in ("flux", "ivar", "good", "wave", "lsf_sigma_aa"):
        a, b = getattr(cube, name), getattr(again, name)
        assert a.dtype == b.dtype and a.dtype.isnative, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    with fits.open(mock_cube_paths[0]) as hdul:
        np.testing.assert_array_equal(cube.flux[cube.good], hdul["FLUX"].data[cube.good])
    assert cube.lsf_sigma_aa.shape == (4563,)


def test_good_mask_follows_mask_bits(mock_cube_paths) -> None:
    cube = read_cube(mock_cube_paths[0])
    with fits.open(mock_cube_paths[0]) as hdul:
        mask, ivar = hdul["MASK"].data, hdul["IVAR"].data
    lowcov = (mask & manga.LOWCOV) > 0
    assert np.any(ivar[lowcov] > 0)  # the DRP keeps IVAR there ...
    assert not cube.good[lowcov].any()  # ... but it is not usable
    assert cube.good[(mask == 0) & (ivar > 0)].all()


def test_galaxy_centre_offsets(mock_cube_paths) -> None:
    cube = read_cube(mock_cube_paths[0])
    dra, ddec = cube.sky_offsets()
    iy, ix = np.unravel_index(np.argmin(np.hypot(dra, ddec)), dra.shape)
    assert np.hypot(dra[iy, ix], ddec[iy, ix]) < 0.5
    assert dra[0, 0] > dra[0, -1]  # east is to the left (RA decreases with x)


def test_truncated_gzip(mock_cube_paths, tmp_path) -> None:
    bad = tmp_path / "manga-1-1-LOGCUBE.fits.gz"
    data = mock_cube_paths[0].read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CubeFormatError, match="truncated or corrupt"):
        read_cube(bad)
    bad.write_bytes(b"not a fits file at all")
    with pytest.raises(CubeFormatError, match=str(bad.name)):
        read_cube(bad)
    # a damaged deflate stream (bytes overwritten inside it), not only a short one
    bad.write_bytes(data[:100] + b"x" * 1000 + data[1100:])
    with pytest.raises(CubeFormatError, match="truncated or corrupt"):
        read_cube(bad)


def test_missing_hdu_wrong_shape_all_masked(mock_cube_paths, tmp_path) -> None:
    with fits.open(mock_cube_paths[0]) as hdul:
        hdus = fits.HDUList([h.copy() for h in hdul])
    no_ivar = tmp_path / "noivar.fits"
    fits.HDUList([h for h in hdus if h.name != "IVAR"]).writeto(no_ivar)
    with pytest.raises(CubeFormatError, match=r"missing HDU\(s\) \['IVAR'\]"):
        read_cube(no_ivar)
    wrong = tmp_path / "wrong.fits"
    short = fits.HDUList([h.copy() for h in hdus])
    short["IVAR"].data = short["IVAR"].data[:, :10, :]
    short.writeto(wrong)
    with pytest.raises(CubeFormatError, match="must be equal"):
        read_cube(wrong)
    masked = tmp_path / "masked.fits"
    allbad = fits.HDUList([h.copy() for h in hdus])
    allbad["MASK"].data = np.full(allbad["MASK"].data.shape, manga.DONOTUSE, dtype=np.int32)
    allbad.writeto(masked)
    with pytest.raises(CubeFormatError, match="every pixel is masked"):
        read_cube(masked)
    nan = tmp_path / "nan.fits"
    nans = fits.HDUList([h.copy() for h in hdus])
    nans["FLUX"].data = np.full(nans["FLUX"].data.shape, np.nan, dtype=np.float32)
    nans.writeto(nan)
    with pytest.raises(CubeFormatError, match="every pixel"):
        read_cube(nan)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CubeFormatError, match="nothere"):
        read_cube(tmp_path / "nothere.fits.gz")
    shutil.rmtree(tmp_path)


def test_tile_compressed_and_scaled_hdus_read_through_astropy(mock_cube_paths, tmp_path) -> None:
    """HDUs whose bytes are not the plain big-endian array (fpack'ed FLUX, a scaled IVAR)
    give the same values as astropy's reading, not their raw bytes."""
    import gzip

    with fits.open(mock_cube_paths[0]) as hdul:
        flux = hdul["FLUX"].data.astype(np.float32)
        ivar = hdul["IVAR"].data.astype(np.float32)
        out = fits.HDUList([h.copy() for h in hdul])
    i = out.index_of("FLUX")
    out[i] = fits.CompImageHDU(flux, header=out[i].header, name="FLUX",
                               compression_type="GZIP_1")
    j = out.index_of("IVAR")
    scaled = fits.ImageHDU(ivar.astype(np.float64), header=out[j].header, name="IVAR")
    scaled.scale("float32", bzero=1.0)
    out[j] = scaled
    path = tmp_path / mock_cube_paths[0].name
    raw = tmp_path / "raw.fits"
    out.writeto(raw)
    path.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    cube = read_cube(path)
    with fits.open(raw) as hdul:  # astropy's values (the tile compression is lossy)
        want_flux = np.asarray(hdul["FLUX"].data, dtype=np.float32)
        want_ivar = np.asarray(hdul["IVAR"].data, dtype=np.float32)
    np.testing.assert_array_equal(cube.flux[cube.good], want_flux[cube.good])
    np.testing.assert_allclose(cube.ivar[cube.good], want_ivar[cube.good], rtol=1e-6)
    assert cube.good.sum() == read_cube(mock_cube_paths[0]).good.sum()


def _gz(path, data: bytes) -> None:
    import gzip

    path.write_bytes(gzip.compress(data, compresslevel=1))


def _header(cards: dict) -> bytes:
    from astropy.io import fits

    return fits.Header(cards).tostring().encode()


def test_a_gzip_bomb_is_refused_a_chunk_past_its_last_hdu(tmp_path, monkeypatch) -> None:
    """Seen: a 1.5 GB bomb (6.7 MB on disk) was refused only after ingest reached 3.5 GB."""
    from desomdb.survey import cube as cube_mod

    monkeypatch.setattr(cube_mod, "DECOMPRESS_CHUNK", 1 << 20)
    bomb = tmp_path / "manga-1-1-LOGCUBE.fits.gz"
    _gz(bomb, _header({"SIMPLE": True, "BITPIX": 8, "NAXIS": 0}) + bytes(40 << 20))
    seen = []
    real = cube_mod._HduWalker.advance

    def spy(self, data):
        seen.append(len(data.getbuffer()))
        real(self, data)

    monkeypatch.setattr(cube_mod._HduWalker, "advance", spy)
    with pytest.raises(CubeFormatError, match="past its last FITS HDU"):
        read_cube(bomb)
    assert max(seen) <= 3 << 20  # stopped within a few chunks, not after 40 MB


def test_headers_declaring_more_than_a_cube_holds_are_refused(tmp_path) -> None:
    huge = tmp_path / "manga-1-1-LOGCUBE.fits.gz"
    cards = {"SIMPLE": True, "BITPIX": -32, "NAXIS": 3, "NAXIS1": 80, "NAXIS2": 80,
             "NAXIS3": 4563 * 100}
    _gz(huge, _header(cards) + bytes(2880))
    with pytest.raises(CubeFormatError, match=r"headers declare 11\.7 GB"):
        read_cube(huge)
