"""Stacked spectra: node stacks equal the co-adds, inverse-variance weights, guarded selection."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from desomdb.archive.store import Archive
from desomdb.errors import QueryError
from desomdb.products import stack as stack_mod
from desomdb.products import stack_output
from desomdb.science import spectra


def _biggest_node(arch: Path, model_id: str) -> int:
    nodes = Archive(arch).read("nodes", model_id=model_id).sort_by([("n_members", "descending")])
    return int(nodes.column("node")[0].as_py())


@pytest.mark.parametrize("use_partials", [True, False])
def test_node_stack_equals_the_stored_coadd(full_archive, use_partials: bool) -> None:
    arch, model_id, _, _ = full_archive
    node = _biggest_node(arch, model_id)
    result = stack_mod.stack(arch, where=f"node = {node}", by="node", fit=False,
                             use_partials=use_partials)
    (s,) = result.stacks
    nodes = Archive(arch).read("nodes", model_id=model_id)
    row = nodes.filter(pa.compute.equal(nodes.column("node"), node))
    coadd = spectra.from_list_column(row.column("coadd"))[0].astype(float)
    assert s.group == node and s.n_members == int(row.column("n_members")[0].as_py())
    np.testing.assert_allclose(s.flux, coadd, rtol=2e-5, atol=1e-6, equal_nan=True)
    assert (s.from_partials == s.n_members) is use_partials
    assert np.all(np.isnan(s.flux) == (s.ivar == 0))


def test_weights_are_inverse_variance_and_masks_never_leak(tmp_path: Path) -> None:
    """Three constructed spectra through the real Parquet reading path."""
    n = spectra.N_REST
    norm = np.array([2.0, 4.0, 1.0])
    x = np.stack([np.full(n, 1.0), np.full(n, 3.0), np.full(n, 100.0)])
    # inverse variance of x: 3, 1 and 5; the third spectrum is masked on bins 0-99
    w = np.stack([np.full(n, 3.0), np.full(n, 1.0), np.full(n, 5.0)])
    mask = np.zeros((3, n), np.uint8)
    mask[2, :100] = 1
    mask[:, 200:210] = 1  # masked in every member: masked in the stack
    flux = (x * norm[:, None]).astype(np.float32)
    ivar = (w / norm[:, None] ** 2).astype(np.float32)
    flux[2, :100] = 1e6  # garbage under the mask
    file = tmp_path / "cube.parquet"
    pq.write_table(pa.table({"bin_id": pa.array([0, 1, 2], pa.int32()),
                             "flux": spectra.to_list_column(flux),
                             "ivar": spectra.to_list_column(ivar),
                             "mask": spectra.to_list_column(mask, pa.uint8())}), file)
    rows = pl.DataFrame({"bin_id": [0, 1, 2], "norm_flux": norm, "snr": [10.0, 20.0, 30.0],
                         "group": [None, None, None]})
    accs: defaultdict = defaultdict(stack_mod._Acc)
    lsf = np.full(n, 2.5)
    stack_mod._add_spectra(accs, file, rows, lsf, ("DR15", "1-1"))
    s = stack_mod._finish(None, accs[None])
    np.testing.assert_allclose(s.flux[:100], (3 * 1 + 1 * 3) / 4, rtol=1e-6)
    np.testing.assert_allclose(s.ivar[:100], 4.0, rtol=1e-6)
    np.testing.assert_allclose(s.flux[300:], (3 * 1 + 1 * 3 + 5 * 100) / 9, rtol=1e-6)
    np.testing.assert_allclose(s.ivar[300:], 9.0, rtol=1e-6)
    assert np.all(np.isnan(s.flux[200:210])) and np.all(s.ivar[200:210] == 0)
    np.testing.assert_allclose(s.lsf_fwhm[300:], 2.5)
    assert s.n_members == 3 and s.n_cubes == 1 and s.mean_snr == pytest.approx(20.0)


def test_a_second_statement_is_refused(full_archive, tmp_path: Path) -> None:
    arch = full_archive[0]
    target = tmp_path / "leak.csv"
    with pytest.raises(QueryError):
        stack_mod.stack(arch, where=f"true; copy baxels to '{target}'", fit=False)
    exe = shutil.which("desomdb")
    assert exe
    proc = subprocess.run([exe, "stack", str(arch), "--where",
                           f"node = 1) ; copy (select 1) to '{target}' ; select (1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not target.exists()


def test_cli_stack_fit_fits_file_and_plot(full_archive, tmp_path: Path) -> None:
    arch = full_archive[0]
    exe = shutil.which("desomdb")
    assert exe
    out = tmp_path / "galaxies.fits"
    proc = subprocess.run([exe, "stack", str(arch), "--where", "true", "--by", "mangaid",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with fits.open(out) as hdul:
        table, wave = hdul[1], hdul["WAVE"]
        assert wave.data.size == spectra.N_REST and wave.header["BUNIT"] == "Angstrom"
        names = table.columns.names
        unit = table.header[f"TUNIT{names.index('lsf_fwhm') + 1}"]
        assert unit == "Angstrom" and table.header["STKBY"] == "mangaid"
        data = table.data
        assert len(data) == 2 and np.all(data["n_members"] > 0)
        assert np.all(np.isfinite(data["chi2_red"])) and np.all(data["status"] == "ok")
        assert np.all((data["age_mw_gyr"] > 0.05) & (data["age_mw_gyr"] < 15))
        assert np.all(np.isnan(data["log_mstar"]))
        bad = data["mangaid"][data["chi2_red"] >= 2]
    # A stack whose fit fails the paper's chi2 cut says so beside its ages.
    assert proc.stderr.count("warning:") == len(bad)
    for mangaid in bad:
        assert f"warning: mangaid {mangaid}: chi2_red" in proc.stderr
    whole = subprocess.run([exe, "stack", str(arch), "--where", "true"], capture_output=True,
                           text=True)
    chi2 = stack_mod.stack(arch, where="true").stacks[0].labels["chi2_red"]
    assert ("warning: the stack: chi2_red" in whole.stderr) == (chi2 >= 2)
    png = tmp_path / "stack.png"
    proc = subprocess.run([exe, "plot", str(arch), "stack", "--stack", str(out), "--out",
                           str(png)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = stack_output.read(out)
    direct = stack_mod.stack(arch, where="true", by="mangaid", fit=False)
    np.testing.assert_allclose(spectra.from_list_column(back.column("flux")),
                               np.array([s.flux for s in direct.stacks]), rtol=1e-6,
                               equal_nan=True)


def test_shift_to_rest_moves_a_line_back_and_keeps_masks() -> None:
    """A Gaussian line seen at +v sits at its rest position again after the shift; the
    shift agrees with independent interpolation in ln λ, and masked bins stay masked."""
    from desomdb.constants import C_KMS
    from desomdb.science import coadd

    wave = spectra.rest_wave_aa()
    centre, sigma_aa = 6564.6, 2.0
    vel = np.array([250.0, -130.0])  # km/s, pPXF's convention: ln λ shifts by v / c
    seen = np.exp(-0.5 * ((wave[None, :] - centre * np.exp(vel[:, None] / C_KMS))
                          / sigma_aa) ** 2).astype(np.float32)
    w = np.ones_like(seen)
    w[1, 3000:3003] = 0  # a masked run in the second member
    x, w_out = coadd.shift_to_rest(seen, w, vel)
    for k in range(2):
        peak = wave[np.argmax(x[k])]
        assert abs(np.log(peak / centre)) * C_KMS < 35  # back within 0.6 bin of rest
        reference = np.interp(np.log(wave) + vel[k] / C_KMS, np.log(wave), seen[k])
        inner = w_out[k] > 0
        np.testing.assert_allclose(x[k][inner], reference[inner], atol=2e-3)
    shift_bins = 130.0 / (C_KMS * np.log(wave[1] / wave[0]))  # ~2.2 bins blueward
    assert np.all(w_out[1, 3000 + int(np.ceil(shift_bins)):3003 + int(np.ceil(shift_bins))]
                  == 0)
    assert w_out[0, -1] == 0 and w_out[1, 0] == 0  # beyond the grid: no weight
    assert np.all(x[w_out == 0] == 0)


def test_shifted_stack_uses_only_fitted_members(full_archive) -> None:
    """``shift_velocity`` stacks the members with a fitted vel, counts the others and
    never reads stored partial sums (they hold unshifted spectra)."""
    arch = full_archive[0]
    plain = stack_mod.stack(arch, where="vel is not null", fit=False)
    shifted = stack_mod.stack(arch, where="true", fit=False, shift_velocity=True)
    (p,), (s,) = plain.stacks, shifted.stacks
    assert shifted.shifted and s.n_members == p.n_members > 0
    total = stack_mod.stack(arch, where="true", fit=False).stacks[0].n_members
    assert shifted.n_without_velocity == total - s.n_members
    assert s.from_partials == 0
    good = (s.ivar > 0) & (p.ivar > 0)
    assert good.sum() > 4000
    assert not np.allclose(s.flux[good], p.flux[good], rtol=1e-4)  # the members did move
    np.testing.assert_allclose(np.nanmedian(s.flux), np.nanmedian(p.flux), rtol=0.02)


def test_partial_sums_committed_after_the_readers_snapshot(full_archive, tmp_path: Path) -> None:
    """A stack reads the partial-sum files of its connection's snapshot of the manifest. Sums
    that assign commits after that snapshot are not mixed in (the snapshot had none: the
    spectra are read), and sums replaced after it are still read from the snapshot's files."""
    from desomdb.query import views

    src, model_id, _, _ = full_archive
    root = tmp_path / "arch"
    shutil.copytree(src, root)
    arch = Archive(root)
    files = arch.files("node_partials", model_id=model_id)
    tables = {str(f.relative_to(root)): pq.read_table(f) for f in files}
    node = _biggest_node(root, model_id)

    def selection(con: views.ReadOnlyConnection) -> pl.DataFrame:
        sel = views.query(con, stack_mod.selection_sql(f"node = {node}")).pl()
        return sel.with_columns(pl.col("node").alias("group"))

    with views.connect(root, model=model_id) as con:  # a snapshot with the partial sums
        sel = selection(con)
        before = stack_mod._partials(con, arch, model_id, sel)
        with arch.writer("test") as w:  # assign replaces them before the stack reads them
            w.commit(remove=[("node_partials", rel) for rel in tables])
        again = stack_mod._partials(con, arch, model_id, sel)
    assert before and again
    assert before.keys() == again.keys()
    for cube, nodes in before.items():
        for n, (count, sum_w, sum_wx) in nodes.items():
            assert again[cube][n][0] == count
            np.testing.assert_array_equal(again[cube][n][1], sum_w)
            np.testing.assert_array_equal(again[cube][n][2], sum_wx)
    with views.connect(root, model=model_id) as con:  # the snapshot: no partial sums
        sel = selection(con)
        with arch.writer("test") as w:  # assign lands before the stack lists the files
            w.commit(add=[w.stage_table("node_partials", t, rel.replace(".parquet", "-b.parquet"))
                          for rel, t in tables.items()])
        assert stack_mod._partials(con, arch, model_id, sel) is None
    result = stack_mod.stack(root, where=f"node = {node}", by="node", fit=False)
    assert result.stacks[0].from_partials == result.stacks[0].n_members
