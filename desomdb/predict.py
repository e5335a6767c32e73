"""Labels for new spectra from their DESOM-1 node, in milliseconds instead of a pPXF fit.

Input: a FITS file in the MaNGA DAP test-spectra layout (HDUs WAVE, FLUX, IVAR, MASK, Z;
observed frame) or a Parquet file with the archive's ``spectra`` columns (rest frame;
``norm_flux`` optional). Output: per spectrum, its node, the latent distance, whether
that distance is beyond the training set's 99th percentile (``out_of_distribution``), and
the node's label distribution (median, p16, p84 of each label in ``node_labels``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from astropy.io import fits

from desomdb import spectra, views
from desomdb.archive import Archive
from desomdb.errors import InputDataError
from desomdb.model import bmu_and_runner_up
from desomdb.train import encode_all, load_model


def read_spectra_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Normalised rest-frame spectra and weights from a FITS or Parquet file.

    Returns
    -------
    x, w : ndarray, shape (n, 4544), float32
        Flux / norm_flux (0 where masked) and 1/0 weights.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: spectra file not found")
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        missing = {"flux", "mask"} - set(t.column_names)
        if missing:
            raise InputDataError(f"{path}: needs columns flux and mask (float32[4544], "
                                 f"uint8[4544]) as in the archive's spectra table; missing "
                                 f"{sorted(missing)}")
        flux = spectra.from_list_column(t.column("flux")).astype(np.float64)
        mask = spectra.from_list_column(t.column("mask"))
        norm = t.column("norm_flux").to_numpy() if "norm_flux" in t.column_names \
            else spectra.norm_flux(flux, mask)
    else:
        try:
            with fits.open(path) as hdul:
                wave = hdul["WAVE"].data
                flux_o = hdul["FLUX"].data.astype(float)
                ivar_o = hdul["IVAR"].data.astype(float)
                bits = hdul["MASK"].data
                z = hdul["Z"].data
        except (KeyError, OSError) as exc:
            raise InputDataError(f"{path}: expected HDUs WAVE, FLUX, IVAR, MASK, Z "
                                 f"(mangadap test-spectra layout): {exc}") from exc
        flux, _, mask, norm = spectra.observed_to_rest(wave, flux_o, ivar_o, bits, z)
    return spectra.normalise(flux, mask, np.where(norm > 0, norm, np.nan))


def predict(archive: str | Path, spectra_file: str | Path, model_id: str | None = None,
            device: str = "cpu") -> pl.DataFrame:
    """Node and label distributions for the spectra in ``spectra_file``.

    Returns
    -------
    polars.DataFrame
        One row per input spectrum: ``index``, ``node``, ``row``, ``col``, ``distance``,
        ``out_of_distribution``, ``n_good`` and ``<label>_median/_p16/_p84``.
    """
    arch = Archive(archive)
    model_id = views.resolve_model(arch, model_id)
    model, payload = load_model(arch, model_id, device)
    x, w = read_spectra_file(spectra_file)
    t0 = time.perf_counter()
    z = encode_all(model, x, device)
    with torch.no_grad():
        d2 = model.sq_distances(torch.from_numpy(z).to(device)).cpu().numpy()
    best, _ = bmu_and_runner_up(d2)
    seconds = time.perf_counter() - t0
    dist = np.sqrt(np.maximum(d2[np.arange(len(best)), best], 0))
    p99 = payload["metrics"].get("distance_p99", np.inf)
    cols = model.cfg.map_cols
    out = pl.DataFrame({
        "index": np.arange(len(best)), "node": best.astype(np.int32),
        "row": (best // cols).astype(np.int32), "col": (best % cols).astype(np.int32),
        "distance": dist.astype(np.float32), "out_of_distribution": dist > p99,
        "n_good": w.sum(axis=1).astype(np.int32),
    })
    if arch.files("node_labels", model_id=model_id):
        nl = pl.from_arrow(arch.read("node_labels", columns=["node", "label", "median", "p16",
                                                             "p84"], model_id=model_id))
        assert isinstance(nl, pl.DataFrame)
        wide = nl.pivot(on="label", index="node", values=["median", "p16", "p84"])
        wide = wide.rename({c: _wide_name(c) for c in wide.columns if c != "node"})
        out = out.join(wide.with_columns(pl.col("node").cast(pl.Int32)), on="node", how="left")
    return out.with_columns(pl.lit(seconds / max(len(best), 1)).alias("seconds_per_spectrum"))


def _wide_name(col: str) -> str:
    stat, label = col.split("_", 1)
    return f"{label}_{stat}"

