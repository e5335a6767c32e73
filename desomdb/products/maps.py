"""Per-galaxy label maps: a FITS file with one image per label on the cube's spaxel grid.

``write_maps(archive, plateifu, out)`` paints every baxel's values back onto the spaxels
of its bin (``bin_map``) and writes, after a primary HDU with the cube's identity and the
export's provenance, one image extension each for BIN_ID (-1 = no bin), SNR, NODE (DESOM-1
node under the model, -1 = none), CHI2_RED and the labels (AGE_MW_GYR, MH_MW, LOG_ML_R,
EBV_STAR, EBV_GAS, LOG_SSFR, D_BPT, VEL, SIGMA). A label is NaN where the fit is missing or
fails that label's cut (the paper's cuts, as ``node_labels``: χ²_red < 2; Hα S/N > 2 for
E(B−V)_gas and sSFR; all four BPT lines at S/N > 2 for d_BPT). Where the archive has the
``baxel_estimates`` view (node labels calibrated), each node label X also gets X_EST (its fit,
or its node's value where the bin was not fitted), X_LO68, X_HI68 (the 68 % interval) and
X_SRC (1 = fit, 2 = map, 0 = none). Every image header carries
the cube's celestial WCS, ``BUNIT`` and a description, so the maps overlay the cube (and
any sky image) in DS9 or Marvin-style tools; pixel (x, y) is numpy ``[y, x]`` as in
``bin_map``.

Which WCS: the one stored at ingest in ``cubes.wcs_header`` (with ``n_x``, ``n_y``): the
archive is self-contained and the map matches the grid that was binned, even after the cube
file is moved, deleted or re-processed. Archives ingested before that column existed fall
back to the cube file's FLUX header, used only while the file's sha256 still equals
``cubes.checksum`` (a re-processed cube may have another grid); otherwise re-ingest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from desomdb.archive.store import Archive
from desomdb.errors import ArchiveError, InputDataError, QueryError
from desomdb.products.export import ascii_text, provenance_header, set_card
from desomdb.products.provenance import Provenance, provenance
from desomdb.query import views
from desomdb.query.schema import fits_unit, unit_note, view_docs
from desomdb.science import label_catalogue

#: ``<LABEL>_SRC`` image values of each ``baxel_estimates`` source.
SOURCE_CODES = {"fit": 1, "map": 2}
#: Label column -> the flag its value needs besides chi2_ok (None: chi2_ok alone).
LABELS: dict[str, str | None] = {lab.column: lab.flag for lab in label_catalogue.LABELS}


@dataclass(frozen=True)
class MapsFile:
    """What :func:`write_maps` wrote.

    Attributes
    ----------
    path : Path
    release, plateifu : str
    extensions : tuple of str
        Image extension names, in file order.
    wcs_source : str
        ``archive`` (cubes.wcs_header) or the cube file read for it.
    provenance : Provenance
    """

    path: Path
    release: str
    plateifu: str
    extensions: tuple[str, ...]
    wcs_source: str
    provenance: Provenance


def write_maps(archive: str | Path, plateifu: str, out: str | Path,
               release: str | None = None, model: str | None = None) -> MapsFile:
    """Write the label maps of one cube to ``out`` (FITS).

    Parameters
    ----------
    archive : str or Path
    plateifu : str
    out : str or Path
        Output FITS file (overwritten).
    release : str, optional
        Default: the cube's newest release (``latest_cubes``).
    model : str, optional
        DESOM-1 model of the NODE image (default: the current model; no NODE without one).

    Raises
    ------
    ArchiveError
        Unknown plateifu/release, or no WCS to be had (see the module notes).
    """
    arch = Archive(archive)
    prov = provenance(arch.root, model)
    con = views.connect(arch.root, model=prov.model_id)
    try:
        release = release or _latest_release(con, arch, plateifu)
        cube = _cube_row(con, arch, release, plateifu)
        key = [release, plateifu]
        bins = con.sql("select x, y, bin_id from bin_map where release = $1 and plateifu = $2",
                       params=key).fetchnumpy()
        baxels = con.sql("select bin_id, snr from baxels where release = $1 and plateifu = $2"
                         " order by bin_id", params=key).fetchnumpy()
        labels = _labels(con, arch, key)
        nodes = _nodes(con, arch, key, prov.model_id)
        estimates = _estimates(con, key, prov.model_id)
    finally:
        con.close()
    header, shape, source = celestial_header(cube, arch)
    bin_image = np.full(shape, -1, dtype=np.int32)
    bin_image[bins["y"], bins["x"]] = bins["bin_id"]
    inside = bin_image >= 0

    def paint(bin_id: np.ndarray, values: np.ndarray, fill: float = np.nan,
              dtype: type = np.float32) -> np.ndarray:
        """Spread per-bin values over the bins' spaxels; ``fill`` elsewhere."""
        per_bin: np.ndarray = np.full(int(bin_image.max(initial=-1)) + 1, fill, dtype=dtype)
        known = np.asarray(bin_id) < per_bin.size
        per_bin[np.asarray(bin_id)[known]] = np.ma.filled(values, fill)[known]
        image: np.ndarray = np.full(shape, fill, dtype=dtype)
        image[inside] = per_bin[bin_image[inside]]
        return image

    images: list[tuple[str, np.ndarray, str | None, str]] = [
        ("BIN_ID", bin_image, None, "Voronoi bin (baxel) of the spaxel; -1 = not binned"),
        ("SNR", paint(baxels["bin_id"], baxels["snr"]), None,
         "g-band S/N per pixel of the spaxel's bin (covariance-corrected)"),
    ]
    if nodes is not None:
        images.append(("NODE", paint(nodes["bin_id"], nodes["node"], -1, np.int32), None,
                       f"DESOM-1 node of the bin under {prov.model_id}; -1 = none"))
    if labels is not None:
        docs = view_docs()["labels"]
        images.append(("CHI2_RED", paint(labels["bin_id"], labels["chi2_red"]), None,
                       "reduced chi^2 of the bin's pPXF fit"))
        for label, flag in LABELS.items():
            usable = np.ma.filled(labels["chi2_ok"], False)
            if flag:
                usable &= np.ma.filled(labels[flag], False)
            values = np.where(usable, np.ma.filled(labels[label].astype(np.float64), np.nan),
                              np.nan)
            cut = "chi2_ok" + (f" and {flag}" if flag else "")
            images.append((label.upper(), paint(labels["bin_id"], values),
                           docs[label].unit, f"{docs[label].description} NaN unless {cut}."))
    if estimates is not None:
        docs = view_docs()["baxel_estimates"]
        for label in label_catalogue.NODE_LABELS:
            name, unit = label.upper(), docs[label].unit
            src = np.ma.filled(estimates[f"{label}_source"].astype(object), None)
            code = np.array([SOURCE_CODES.get(s, 0) for s in src], dtype=np.int16)
            images += [
                (f"{name}_EST", paint(estimates["bin_id"], _floats(estimates[label])), unit,
                 f"{label} of every bin: its fit, or its node's median where not fitted "
                 "(baxel_estimates); NaN where neither"),
                (f"{name}_LO68", paint(estimates["bin_id"], _floats(estimates[f"{label}_lo68"])),
                 unit, f"lower end of the 68 % interval of {name}_EST"),
                (f"{name}_HI68", paint(estimates["bin_id"], _floats(estimates[f"{label}_hi68"])),
                 unit, f"upper end of the 68 % interval of {name}_EST"),
                (f"{name}_SRC", paint(estimates["bin_id"], code, 0, np.int16), None,
                 "where " + f"{name}_EST comes from: 1 = fit, 2 = map (node), 0 = none"),
            ]
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(header=_primary_header(cube, release, prov, source))]
    for name, data, unit, description in images:
        hdr = header.copy()
        bunit = fits_unit(unit) if unit else None
        if bunit:
            hdr["BUNIT"] = bunit
        hdr["DESCRIP"] = ascii_text(description + (unit_note(unit) if unit and not bunit
                                                   else ""))
        hdus.append(fits.ImageHDU(data=data, header=hdr, name=name))
    out = Path(out)
    fits.HDUList(hdus).writeto(out, overwrite=True)
    return MapsFile(out, release, plateifu, tuple(n for n, *_ in images), source, prov)


def celestial_header(cube: dict, arch: Archive) -> tuple[fits.Header, tuple[int, int], str]:
    """Return the cube's 2-D celestial WCS header, grid shape (n_y, n_x) and its source.

    ``cube`` is the cube's ``cubes`` row; the source is ``"archive"`` or the cube file's path.
    """
    text = cube.get("wcs_header") or ""
    if text and cube.get("n_x") and cube.get("n_y"):
        header = WCS(fits.Header.fromstring(text)).to_header()
        return header, (int(cube["n_y"]), int(cube["n_x"])), "archive"
    path = Path(cube["source_path"])
    if not path.exists():
        raise ArchiveError(
            f"{arch.root}: {cube['plateifu']} ({cube['release']}) was ingested before the "
            f"archive kept the cube's WCS, and its cube {path} is gone; re-ingest it to map it")
    from desomdb.pipeline.ingest import file_checksum

    if file_checksum(path) != cube["checksum"]:
        raise ArchiveError(
            f"{path} changed since {cube['plateifu']} was ingested (sha256 differs), so its "
            "WCS may not match the binned grid; re-ingest the cube ('desomdb ingest')")
    try:
        flux = fits.getheader(path, "FLUX")
    except (OSError, KeyError) as exc:
        raise InputDataError(f"{path}: cannot read the FLUX header ({exc})") from exc
    wcs = WCS(flux).celestial
    return wcs.to_header(), (int(flux["NAXIS2"]), int(flux["NAXIS1"])), str(path)


def _latest_release(con: views.ReadOnlyConnection, arch: Archive, plateifu: str) -> str:
    rows = con.sql("select release from latest_cubes where plateifu = $1",
                   params=[plateifu]).fetchall()
    if not rows:
        known = [r[0] for r in con.sql(
            "select plateifu from latest_cubes order by 1 limit 20").fetchall()]
        raise ArchiveError(f"{arch.root}: no ingested cube {plateifu!r}; some there: "
                           f"{', '.join(known) or 'none'}")
    return str(rows[0][0])


def _cube_row(con: views.ReadOnlyConnection, arch: Archive, release: str, plateifu: str
              ) -> dict:
    rel = con.sql("select * from cubes where release = $1 and plateifu = $2 and status = 'ok'",
                  params=[release, plateifu])
    rows = rel.fetchall()
    if not rows:
        raise ArchiveError(f"{arch.root}: no cube {plateifu} ingested with status ok in "
                           f"release {release!r}")
    return dict(zip(rel.columns, rows[0], strict=True))


def _labels(con: views.ReadOnlyConnection, arch: Archive, key: list[str]
            ) -> dict[str, np.ndarray] | None:
    if not arch.has_table("labels"):
        return None
    cols = ", ".join(["bin_id", "chi2_red", "chi2_ok", "ssfr_ok", "bpt_ok", *LABELS])
    found = con.sql(f"select {cols} from preferred_labels where release = $1 and plateifu = $2 "
                    "and "
                    "status = 'ok'", params=key).fetchnumpy()
    return found if len(found["bin_id"]) else None


def _floats(values: np.ndarray) -> np.ndarray:
    """Return a fetched column as float64, NaN for nulls."""
    return np.asarray(np.ma.filled(np.ma.asarray(values).astype(np.float64), np.nan))


def _estimates(con: views.ReadOnlyConnection, key: list[str], model_id: str | None
               ) -> dict[str, np.ndarray] | None:
    """Return the cube's ``baxel_estimates`` rows (None before node labels are calibrated)."""
    if model_id is None:
        return None
    try:
        return con.sql("select * from baxel_estimates where release = $1 and plateifu = $2",
                       params=key).fetchnumpy()
    except (QueryError, duckdb.CatalogException):  # needs node_labels + label_errors
        return None


def _nodes(con: views.ReadOnlyConnection, arch: Archive, key: list[str], model_id: str | None
           ) -> dict[str, np.ndarray] | None:
    if model_id is None or not arch.has_table("assignments"):
        return None
    return con.sql("select bin_id, node from assignments where model_id = $1 and "
                   "release = $2 and plateifu = $3", params=[model_id, *key]).fetchnumpy()


def _primary_header(cube: dict, release: str, prov: Provenance, source: str) -> fits.Header:
    header = fits.Header()
    header["PLATEIFU"] = cube["plateifu"]
    header["MANGAID"] = cube["mangaid"]
    header["RELEASE"] = (release, "MaNGA data release")
    header["OBJRA"] = (cube["ra"], "[deg] galaxy RA")
    header["OBJDEC"] = (cube["dec"], "[deg] galaxy Dec")
    header["Z"] = (cube["z"], "drpall redshift")
    set_card(header, "WCSSRC", source, "where the WCS came from")
    header.extend(provenance_header(prov))
    return header
