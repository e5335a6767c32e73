"""Read a MaNGA DRP LOGCUBE (``.fits`` or ``.fits.gz``; DR15 or DR17 naming).

Bad pixels come from the MASK bits (see :data:`desomdb.survey.manga.BAD_PIXEL_BITS`), not from IVAR
alone: the DRP keeps IVAR > 0 on low-coverage and foreground-star spaxels.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from isal import igzip
from isal.igzip_lib import IsalError

from desomdb.errors import CubeFormatError
from desomdb.survey import manga

REQUIRED_HDUS = ("FLUX", "IVAR", "MASK", "WAVE")
#: What a truncated or corrupt file raises while it is decompressed and parsed (isal's
#: stubs do not declare IsalError an exception class, hence the cast).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zlib.error, cast("type[BaseException]", IsalError), gzip.BadGzipFile,
    TypeError, ValueError)
HEADER_KEYS = ("PLATEIFU", "MANGAID", "OBJRA", "OBJDEC", "IFURA", "IFUDEC", "EBVGAL")
#: Broad-band images the DRP reconstructs from the fibres onto the spaxel grid (HDU name ->
#: band); read when present (every DR15/DR17 LOGCUBE has them), stored by ingest.
IMAGE_HDUS = {"GIMG": "g", "RIMG": "r", "IIMG": "i", "ZIMG": "z"}


@dataclass
class Cube:
    """A LOGCUBE in memory.

    Attributes
    ----------
    path : Path
    plateifu, mangaid : str
    flux : ndarray, shape (4563, n_y, n_x), float32
        1e-17 erg/s/cm^2/Å/spaxel, observed frame, as in the file (no foreground correction).
    ivar : ndarray, shape (4563, n_y, n_x), float32
        Inverse variance of ``flux``.
    good : ndarray, shape (4563, n_y, n_x), bool
        IVAR > 0, finite flux, and none of the bad MASK bits.
    wave : ndarray, shape (4563,), float64
        Observed vacuum wavelength, Å.
    lsf_sigma_aa : ndarray, shape (4563,)
        Median post-pixelisation LSF sigma over the covered spaxels (at most ``LSF_SPAXELS``
        of them, spread evenly), Å (DISP or LSFPOST).
    objra, objdec, ifura, ifudec : float
        Degrees.
    ebvgal : float
        Milky-Way E(B-V), mag.
    drp3qual : int
    wcs : astropy.wcs.WCS
        Celestial WCS of the spaxel grid.
    images : dict of str to ndarray, shape (n_y, n_x), float32
        Band (``g``, ``r``, ``i``, ``z``) -> the DRP's reconstructed image, nanomaggies per
        spaxel (:data:`IMAGE_HDUS`); empty for a file without them.
    """

    path: Path
    plateifu: str
    mangaid: str
    flux: np.ndarray
    ivar: np.ndarray
    good: np.ndarray
    wave: np.ndarray
    lsf_sigma_aa: np.ndarray
    objra: float
    objdec: float
    ifura: float
    ifudec: float
    ebvgal: float
    drp3qual: int
    drp_version: str
    wcs: WCS
    #: Name of the LSF extension read: ``DISP`` (DR15 layout) or ``LSFPOST`` (DR17 layout).
    lsf_hdu: str = "DISP"
    images: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_y, n_x) of the spaxel grid."""
        return int(self.flux.shape[1]), int(self.flux.shape[2])

    def sky_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets of every spaxel centre from the galaxy centre (OBJRA, OBJDEC).

        Returns
        -------
        dra, ddec : ndarray, shape (n_y, n_x)
            Arcsec; ``dra`` = ΔRA·cos(Dec), east positive; ``ddec`` north positive.
        """
        n_y, n_x = self.shape
        yy, xx = np.mgrid[0:n_y, 0:n_x]
        ra, dec = self.wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
        dra = (ra - self.objra) * np.cos(np.deg2rad(self.objdec)) * 3600.0
        ddec = (dec - self.objdec) * 3600.0
        return dra.reshape(n_y, n_x), ddec.reshape(n_y, n_x)


#: Largest LOGCUBE accepted, decompressed (bytes). A 19-fibre mock cube is 94 MB, a
#: 127-fibre DRP cube a few hundred MB; more than this is not a LOGCUBE (a gzip bomb, a
#: wrong file) and is refused before it fills memory. ``DESOMDB_MAX_CUBE_BYTES`` overrides.
MAX_CUBE_BYTES = 4 * 1024**3
#: Bytes decompressed at a time; the FITS headers are checked after each chunk.
DECOMPRESS_CHUNK = 16 * 1024**2
_BLOCK = 2880  # FITS block: headers and data are padded to multiples of it


def max_cube_bytes() -> int:
    """Return the size limit of a decompressed cube (see :data:`MAX_CUBE_BYTES`)."""
    value = os.environ.get("DESOMDB_MAX_CUBE_BYTES")
    return int(value) if value and value.isdigit() else MAX_CUBE_BYTES


def _uncompressed(path: Path) -> io.BytesIO | Path:
    """Decompress a ``.gz`` once into memory, in chunks, refusing what is not a LOGCUBE.

    astropy re-reads a gzip stream from its start for every HDU it seeks to, which makes
    reading all HDUs of a LOGCUBE ~10x slower than decompressing first. The decompression
    is Intel's ISA-L (``isal.igzip``, the same bytes as ``gzip.decompress``). The size in the
    gzip trailer (ISIZE) is not trusted: after each chunk the FITS headers seen so far are
    read, and the file is refused as soon as they declare more than :func:`max_cube_bytes`
    or bytes follow the last HDU that are not another header.
    """
    limit = max_cube_bytes()
    if path.suffix != ".gz":
        if path.stat().st_size > limit:
            raise CubeFormatError(f"{path}: {path.stat().st_size / 1e9:.1f} GB, more than a "
                                  "LOGCUBE holds; not a DRP cube")
        return path
    out = io.BytesIO()
    walker = _HduWalker(path, limit)
    with igzip.open(path, "rb") as fh:
        while chunk := fh.read(DECOMPRESS_CHUNK):
            out.write(chunk)
            walker.advance(out)
    out.seek(0)
    return out


class _HduWalker:
    """Follow a FITS file's HDUs through a growing buffer and check their declared sizes."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.pos = path, limit, 0

    def advance(self, data: io.BytesIO) -> None:
        view = data.getbuffer()
        try:
            while self.pos < len(view):
                found = _header_at(view, self.pos)
                if found is None:
                    return  # the rest of this header is still compressed
                if found == -1:
                    if len(view) - self.pos > DECOMPRESS_CHUNK or any(
                            bytes(view[self.pos:self.pos + 80]).strip(b"\0 ")):
                        raise CubeFormatError(
                            f"{self.path}: holds {len(view) - self.pos:,} bytes past its last "
                            f"FITS HDU (at byte {self.pos:,}); not a DRP cube — re-download it")
                    return
                end = found
                if end > self.limit:
                    raise CubeFormatError(
                        f"{self.path}: its FITS headers declare {end / 1e9:.1f} GB, more than "
                        f"the {self.limit / 1e9:.1f} GB a LOGCUBE is allowed "
                        "(DESOMDB_MAX_CUBE_BYTES); not a DRP cube")
                self.pos = end
        finally:
            view.release()
        if len(data.getbuffer()) > self.limit:
            raise CubeFormatError(f"{self.path}: decompresses to more than "
                                  f"{self.limit / 1e9:.1f} GB; not a DRP cube")


def _header_at(view: memoryview, pos: int) -> int | None:
    """End of the HDU whose header starts at ``pos`` (header + padded data), in bytes.

    None if the header is not complete in ``view`` yet; -1 if no header starts there.
    """
    first = bytes(view[pos:pos + 8])
    if len(first) < 8:
        return None
    if first != (b"SIMPLE  " if pos == 0 else b"XTENSION"):
        return -1
    cards: dict[str, str] = {}
    at = pos
    while True:
        block = bytes(view[at:at + _BLOCK])
        if len(block) < _BLOCK:
            return None
        at += _BLOCK
        for i in range(0, _BLOCK, 80):
            card = block[i:i + 80].decode("ascii", "replace")
            key = card[:8].strip()
            if key == "END":
                return at + _padded(_data_bytes(cards))
            if card[8:10] == "= ":
                cards[key] = card[10:].split("/")[0].strip()


def _data_bytes(cards: dict[str, str]) -> int:
    """Size of an HDU's data from its header cards (FITS standard 4.4.1)."""
    try:
        naxis = int(cards.get("NAXIS", "0"))
        bits = abs(int(cards.get("BITPIX", "8")))
        pcount, gcount = int(cards.get("PCOUNT", "0")), int(cards.get("GCOUNT", "1"))
        dims = [int(cards[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
    except (KeyError, ValueError):
        return 0  # astropy will say what is wrong with the header
    if naxis == 0:
        return 0
    return bits // 8 * gcount * (pcount + int(np.prod(dims, dtype=np.int64)))


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


@contextlib.contextmanager
def _buffer(source: io.BytesIO | Path) -> Iterator[memoryview | None]:
    """Lend the bytes of an in-memory file (None for a path), released on exit."""
    if not isinstance(source, io.BytesIO):
        yield None
        return
    buf = source.getbuffer()
    try:
        yield buf
    finally:
        buf.release()


#: Spaxels whose LSF the cube's median LSF is taken over (spread evenly over the covered ones).
LSF_SPAXELS = 256

_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _image(hdul: fits.HDUList, name: str, dtype: type, buf: memoryview | None,
           spaxels: np.ndarray | None = None) -> np.ndarray:
    """Return an image HDU's data as a native-order ``dtype`` array, in one pass over it.

    With ``buf``, the in-memory file ``hdul`` was opened from, the raw big-endian bytes are
    converted straight from it (astropy would first copy them out, then ``astype`` would copy
    again: ~1 s per 127-fibre cube). Scaled data (BSCALE/BZERO/BLANK), tile-compressed HDUs,
    or a file on disk (``buf`` None), go through astropy.

    With ``spaxels`` (flat indices into the (n_y, n_x) grid of a 3-D HDU), only those
    spaxels are converted: the result has shape (n_wave, spaxels.size).
    """
    hdu = hdul[name]
    hdr = hdu.header
    code = _BITPIX.get(int(hdr.get("BITPIX", 0)))
    scaled = float(hdr.get("BSCALE", 1.0)) != 1.0 or float(hdr.get("BZERO", 0.0)) != 0.0
    plain = type(hdu) in (fits.ImageHDU, fits.PrimaryHDU)  # not tile-compressed, say
    if buf is None or not plain or code is None or scaled or "BLANK" in hdr:
        data = np.asarray(hdu.data)
    else:
        shape = tuple(int(hdr[f"NAXIS{k}"]) for k in range(int(hdr["NAXIS"]), 0, -1))
        count = int(np.prod(shape)) if shape else 0
        offset = int(hdu.fileinfo()["datLoc"])
        if offset + count * np.dtype(code).itemsize > len(buf):
            raise ValueError(f"HDU {name} ends beyond the end of the file")
        data = np.frombuffer(buf, dtype=code, count=count, offset=offset).reshape(shape)
    if spaxels is not None and data.ndim == 3:
        data = data.reshape(data.shape[0], -1)[:, spaxels]
    return data.astype(dtype)


def _check_shapes(path: Path, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray,
                  wave: np.ndarray) -> None:
    if flux.ndim != 3 or flux.shape != ivar.shape or flux.shape != mask.shape:
        raise CubeFormatError(
            f"{path}: FLUX {flux.shape}, IVAR {ivar.shape}, MASK {mask.shape} must be equal "
            "3-D (n_wave, n_y, n_x) arrays"
        )
    if flux.shape[0] != wave.size or wave.size != manga.N_WAVE:
        raise CubeFormatError(
            f"{path}: {flux.shape[0]} spectral pixels and WAVE of {wave.size}; a LOGCUBE has "
            f"{manga.N_WAVE}"
        )


def _good_pixels(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IVAR > 0, finite flux and IVAR, none of the bad MASK bits; shape of ``flux``."""
    good = ivar > 0
    good &= np.isfinite(flux)
    good &= np.isfinite(ivar)
    good &= (mask & np.int32(manga.BAD_PIXEL_BITS)) == 0
    return good


def read_cube(path: str | Path) -> Cube:
    """Read a LOGCUBE and derive its good-pixel mask.

    Parameters
    ----------
    path : str or Path
        ``manga-<plate>-<ifudsgn>-LOGCUBE.fits[.gz]``.

    Returns
    -------
    Cube

    Raises
    ------
    CubeFormatError
        Truncated or corrupt file, a missing HDU or header key, inconsistent shapes, or a
        cube with no usable pixel; the message names the file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            source = _uncompressed(path)
            hdul = fits.open(source, memmap=False, lazy_load_hdus=False)
        truncated = [str(w.message) for w in caught if "truncat" in str(w.message).lower()]
        if truncated:
            hdul.close()
            raise CubeFormatError(f"{path}: the file is truncated or corrupt ({truncated[0]}) "
                                  "— re-download it")
        with hdul, _buffer(source) as buf:  # the buffer is released before the file closes
            names = {h.name for h in hdul}
            missing = [h for h in REQUIRED_HDUS if h not in names]
            lsf_name = "DISP" if "DISP" in names else "LSFPOST" if "LSFPOST" in names else None
            if missing or lsf_name is None:
                raise CubeFormatError(
                    f"{path}: missing HDU(s) {missing or ['DISP/LSFPOST']}; a DRP LOGCUBE has "
                    "FLUX, IVAR, MASK, WAVE and DISP (DR15) or LSFPOST (DR17). The file is "
                    "truncated or corrupt, or not a LOGCUBE — re-download it"
                )
            hdr = hdul[0].header
            absent = [k for k in HEADER_KEYS if k not in hdr]
            if absent:
                raise CubeFormatError(f"{path}: primary header lacks {absent}")
            flux = _image(hdul, "FLUX", np.float32, buf)
            ivar = _image(hdul, "IVAR", np.float32, buf)
            mask = _image(hdul, "MASK", np.int32, buf)
            wave = _image(hdul, "WAVE", np.float64, buf)
            _check_shapes(path, flux, ivar, mask, wave)
            good = _good_pixels(flux, ivar, mask)
            covered = good.any(axis=0)
            # The LSF varies slowly across the IFU: its median over <= LSF_SPAXELS covered
            # spaxels spread evenly over them is the cube's LSF (converting and sorting every
            # spaxel's 4563 values cost ~0.35 s per 127-fibre cube).
            cov = np.flatnonzero(covered.ravel())
            sample = cov[np.linspace(0, cov.size - 1, min(cov.size, LSF_SPAXELS)).astype(int)]
            lsf = _image(hdul, lsf_name, np.float32, buf,
                         sample if hdul[lsf_name].shape == flux.shape and cov.size else None)
            wcs = WCS(hdul["FLUX"].header).celestial
            meta = {k: hdr[k] for k in HEADER_KEYS}
            drp3qual = int(hdr.get("DRP3QUAL", 0))
            drp_version = str(hdr.get("VERSDRP3", ""))
            images = {band: _image(hdul, hdu, np.float32, buf) for hdu, band in
                      IMAGE_HDUS.items() if hdu in names
                      and hdul[hdu].shape == flux.shape[1:]}
    except CubeFormatError:
        raise
    except _READ_ERRORS as exc:
        raise CubeFormatError(
            f"{path}: cannot read as FITS ({type(exc).__name__}: {exc}); the file is truncated "
            "or corrupt — re-download it"
        ) from exc

    # In place on the native-order float32 copies made above: a 127-fibre cube is ~100 MB
    # per array, and every extra temporary costs a pass over it.
    if not covered.any():
        raise CubeFormatError(f"{path}: every pixel is masked or has IVAR <= 0 / NaN flux")
    bad = ~good
    flux[bad] = 0.0
    ivar[bad] = 0.0
    del bad
    lsf_sigma = (np.median(lsf, axis=1, overwrite_input=True)
                 if lsf.ndim == 2 and lsf.shape[0] == flux.shape[0] else lsf)
    return Cube(
        path=path,
        plateifu=str(meta["PLATEIFU"]).strip(),
        mangaid=str(meta["MANGAID"]).strip(),
        flux=flux,
        ivar=ivar,
        good=good,
        wave=wave,
        lsf_sigma_aa=np.asarray(lsf_sigma, dtype=np.float64),
        objra=float(meta["OBJRA"]),
        objdec=float(meta["OBJDEC"]),
        ifura=float(meta["IFURA"]),
        ifudec=float(meta["IFUDEC"]),
        ebvgal=float(meta["EBVGAL"]),
        drp3qual=drp3qual,
        drp_version=drp_version,
        wcs=wcs,
        lsf_hdu=lsf_name,
        images=images,
    )
