"""A stack's output: its table with units, Parquet/FITS files, and the plot of its spectra.

The stacking itself (selection, co-add, fit) is :mod:`desomdb.products.stack`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from desomdb.atomic import read_parquet
from desomdb.errors import ConfigError
from desomdb.products.stack import StackResult
from desomdb.science import label_catalogue, spectra


def to_table(result: StackResult) -> pa.Table:
    """One row per stack: group, counts, S/N, z_eff, spectra (fixed-size lists), labels."""
    stacks = result.stacks
    cols: dict[str, Any] = {}
    if result.by != "none":
        values = [s.group for s in stacks]
        cols[result.by] = pa.array(values, pa.int32() if result.by == "node" else pa.string())
    cols.update({
        "n_members": pa.array([s.n_members for s in stacks], pa.int64()),
        "n_cubes": pa.array([s.n_cubes for s in stacks], pa.int64()),
        "mean_snr": pa.array([s.mean_snr for s in stacks], pa.float64()),
        "snr_stack": pa.array([s.snr_stack for s in stacks], pa.float64()),
        "z_eff": pa.array([s.z_eff for s in stacks], pa.float64()),
        "flux": spectra.to_list_column(np.array([s.flux for s in stacks], np.float32)),
        "ivar": spectra.to_list_column(np.array([s.ivar for s in stacks], np.float32)),
        "lsf_fwhm": spectra.to_list_column(np.array([s.lsf_fwhm for s in stacks], np.float32)),
    })
    fitted = [s.labels for s in stacks if s.labels]
    if fitted:
        names = [k for k, v in fitted[0].items()
                 if isinstance(v, (int, float, bool, str, np.floating, np.integer)) or v is None]
        for k in names:
            vals = [s.labels.get(k) for s in stacks]
            vals = [v.item() if isinstance(v, np.generic) else v for v in vals]
            cols[k] = pa.array(vals)
    return pa.table(cols)


def column_docs() -> dict[str, Any]:
    """Document the stack table's own columns (labels: the schema's units)."""
    from desomdb.query.schema import ColumnDoc
    from desomdb.query.schema import column_docs as schema_docs

    docs: dict[str, Any] = dict(schema_docs(
        ["mangaid", "node", *label_catalogue.BY_COLUMN, "chi2_red"],
        "select * from baxel_labels"))
    docs.update({
        "n_members": ColumnDoc("Baxels stacked (newest cube versions only).", None),
        "n_cubes": ColumnDoc("Cubes contributing.", None),
        "mean_snr": ColumnDoc("Mean g-band S/N per pixel of the members (baxels.snr).", None),
        "snr_stack": ColumnDoc("Median flux*sqrt(ivar) of the stack over unmasked bins.", None),
        "z_eff": ColumnDoc("Redshift bucket whose rest-frame LSF matches lsf_fwhm (fit set-up).",
                           None),
        "flux": ColumnDoc("float32[4544] sum(w x)/sum(w), x = flux/norm_flux, w = ivar "
                          "norm_flux^2; NaN where masked; rest frame 3650-8950 A vacuum.", None),
        "ivar": ColumnDoc("float32[4544] sum(w): inverse variance of the normalised stack.", None),
        "lsf_fwhm": ColumnDoc("float32[4544] w-weighted mean rest-frame LSF FWHM.", "Angstrom"),
    })
    return docs


def write(result: StackResult, archive: str | Path, out: str | Path) -> Path:
    """Write the stacks to Parquet or FITS (by suffix) with units and provenance.

    Parameters
    ----------
    result : StackResult
    archive : str or Path
        Where the stacks came from (provenance).
    out : str or Path
        ``*.parquet`` or ``*.fits``; the FITS file also gets the rest-frame wavelengths in
        a ``WAVE`` extension.

    Returns
    -------
    Path
    """
    from astropy.io import fits

    from desomdb.products import export
    from desomdb.products.provenance import provenance

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".fits"):
        raise ConfigError(f"{out}: write stacks to a .parquet or .fits file")
    table = to_table(result)
    prov = provenance(archive, result.model_id)
    query = (f"stack where {result.where} by {result.by}"
             f"{' shifted by each member vel' if result.shifted else ''}")
    export.write_table(table, out, suffix[1:], prov, query, docs=column_docs())
    if suffix == ".fits":
        with fits.open(out, mode="update") as hdul:
            hdul[1].header["STKWHERE"] = export.ascii_text(result.where)[:68]
            hdul[1].header["STKBY"] = result.by
            hdul[1].header["STKSHIFT"] = (result.shifted, "members shifted by their own vel")
            wave = fits.ImageHDU(spectra.rest_wave_aa(), name="WAVE")
            wave.header["BUNIT"] = "Angstrom"
            wave.header["COMMENT"] = "rest-frame vacuum wavelength of every flux/ivar bin"
            hdul.append(wave)
    return out


def read(path: str | Path) -> pa.Table:
    """Read stacks written by :func:`write` (Parquet or FITS) back as an Arrow table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such stack file; write one with 'desomdb stack ARCHIVE "
                          "--where ... --out FILE.parquet'")
    if path.suffix.lower() == ".parquet":
        return read_parquet(path)
    from astropy.io import fits

    with fits.open(path) as hdul:  # the raw columns: no unit parsing ('dex' is not FITS)
        data = hdul[1].data
        cols = {}
        for name in data.columns.names:
            values = np.asarray(data[name])
            cols[name] = (spectra.to_list_column(values.astype(np.float32)) if values.ndim == 2
                          else pa.array(values.tolist()))
    return pa.table(cols)


def plot(table: pa.Table, out: str | Path, max_stacks: int = 8) -> Path:
    """Draw stacked spectra (offset), their ±1σ band and the emission lines marked.

    Parameters
    ----------
    table : pyarrow.Table
        As written by :func:`write` / returned by :func:`read`.
    out : str or Path
        Figure file; the suffix sets the format.
    max_stacks : int
        Draw at most this many (the first ones).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from desomdb.science import emission

    wave = spectra.rest_wave_aa()
    n = min(table.num_rows, max_stacks)
    flux = spectra.from_list_column(table.column("flux"))[:n].astype(float)
    ivar = spectra.from_list_column(table.column("ivar"))[:n].astype(float)
    group = next((c for c in ("node", "mangaid") if c in table.column_names), None)
    fig, ax = plt.subplots(figsize=(10, 2.0 + 1.2 * n), constrained_layout=True)
    for i in range(n):
        f = np.where(ivar[i] > 0, flux[i], np.nan)
        sd = np.where(ivar[i] > 0, 1 / np.sqrt(np.where(ivar[i] > 0, ivar[i], 1)), np.nan)
        off = 1.0 * (n - 1 - i)
        parts = [f"{group} {table.column(group)[i].as_py()}" if group else "all",
                 f"{table.column('n_members')[i].as_py()} baxels"]
        for key, fmt in (("age_mw_gyr", "age {:.1f} Gyr"), ("mh_mw", "[M/H] {:+.2f}"),
                         ("chi2_red", "chi2 {:.2f}")):
            if key in table.column_names and table.column(key)[i].as_py() is not None:
                parts.append(fmt.format(table.column(key)[i].as_py()))
        line = ax.plot(wave, f + off, lw=0.6, label=", ".join(parts))[0]
        ax.fill_between(wave, f - sd + off, f + sd + off, color=line.get_color(), alpha=0.3,
                        lw=0)
    for name, lam in emission.LINES_AA.items():
        ax.axvline(lam, color="0.6", lw=0.4, ls=":")
        ax.text(lam, 1.0, name, rotation=90, fontsize=6, va="top", ha="right",
                transform=ax.get_xaxis_transform(), color="0.4")
    ax.set_xlabel("rest-frame vacuum wavelength [Å]")
    ax.set_ylabel("flux / norm_flux (+ offset)")
    ax.set_xlim(wave[0], wave[-1])
    ax.legend(fontsize=7, loc="upper right")
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
