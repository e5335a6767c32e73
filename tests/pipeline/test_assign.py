"""Assignment: node co-adds from inverse-variance partial sums, workers, Dask."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.pipeline import assign
from desomdb.query import versions
from desomdb.science import coadd, spectra


def _add_at(x: np.ndarray, w: np.ndarray, node: np.ndarray, n_nodes: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scatter-add co-add the sorted partial sums replace (the reference)."""
    sum_w = np.zeros((n_nodes, x.shape[1]))
    sum_wx = np.zeros((n_nodes, x.shape[1]))
    np.add.at(sum_w, node, w)
    np.add.at(sum_wx, node, w * x)
    return np.bincount(node, minlength=n_nodes), sum_w, sum_wx


def test_inverse_variance_weights_on_a_constructed_case() -> None:
    norm = np.array([2.0, 0.5], np.float32)
    x_true = np.array([[1.0, 1.0, 3.0, 5.0], [2.0, 2.0, 4.0, 6.0]], np.float32)
    w_true = np.array([[4.0, 4.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    flux = x_true * norm[:, None]
    ivar = w_true / norm[:, None] ** 2  # w = ivar * norm^2 is the inverse variance of x
    mask = np.zeros((2, 4), np.uint8)
    mask[0, 2] = 1  # masked: its flux is garbage and must not count
    mask[:, 3] = 1  # masked in both: no co-add there
    flux[0, 2] = np.inf
    ivar[1, 1] = 0.0  # no information: weight 0 though not masked
    x, w = coadd.weighted(flux, ivar, mask, norm)
    np.testing.assert_array_equal(w, [[4, 4, 0, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(x[:, 3], [0, 0])
    total = coadd.combine([coadd.partial_sums(x, w, np.array([1, 1]))], n_nodes=3, width=4)
    assert total.n_members.tolist() == [0, 2, 0]
    got = total.coadd
    np.testing.assert_allclose(got[1, :3], [(4 * 1 + 1 * 2) / 5, 1.0, 4.0], rtol=1e-6)
    assert np.isnan(got[1, 3]) and np.isnan(got[0]).all() and np.isnan(got[2]).all()
    # the network input is the 0/1-masked normalised flux it always was
    x_net, _ = spectra.normalise(flux, mask, norm)
    np.testing.assert_array_equal(x, x_net)


def test_reduceat_partials_equal_add_at_and_nodes_coadd(trained_archive) -> None:
    arch_path, model_id, cfg = trained_archive
    arch = Archive(arch_path)
    n_nodes = cfg.n_nodes
    bax = arch.read("baxels", columns=["release", "plateifu", "bin_id", "norm_flux"]).to_pylist()
    norms = {(r["release"], r["plateifu"], r["bin_id"]): r["norm_flux"] for r in bax}
    total = coadd.Accumulator(n_nodes)
    xs, ws, nodes = [], [], []
    latest = set(versions.latest_cubes(arch).iter_rows())
    for (release, plateifu), f in sorted(arch.cube_files("spectra").items()):
        t = pq.read_table(f)
        a = pq.read_table(arch.root / paths.model_file(
            "assignments", model_id, paths.assignment_part_name(release, f.name)))
        assert a.column("bin_id").equals(t.column("bin_id"))
        norm = np.array([norms[(release, plateifu, b)] for b in t.column("bin_id").to_pylist()])
        flux, ivar, mask = (spectra.from_list_column(t.column(c)) for c in ("flux", "ivar", "mask"))
        x, w = coadd.weighted(flux, ivar, mask, norm)
        assert (w[mask != 0] == 0).all()
        node = a.column("node").to_numpy().astype(np.int64)
        mine = coadd.partial_sums(x, w, node)
        n_ref, w_ref, wx_ref = _add_at(x, w, node, n_nodes)
        np.testing.assert_array_equal(mine.n_members, n_ref[mine.node])
        np.testing.assert_allclose(mine.sum_w, w_ref[mine.node], rtol=1e-6)
        np.testing.assert_allclose(mine.sum_wx, wx_ref[mine.node], rtol=1e-6, atol=1e-9)
        stored = coadd.from_table(pq.read_table(arch.root / paths.node_partials_file(
            model_id, release, f.name)))
        np.testing.assert_array_equal(stored.node, mine.node)
        np.testing.assert_allclose(stored.sum_wx, mine.sum_wx, rtol=1e-6, atol=1e-9)
        if (release, plateifu) in latest:
            total.add(stored)
            xs.append(x)
            ws.append(w)
            nodes.append(node)
    n_ref, w_ref, wx_ref = _add_at(np.concatenate(xs), np.concatenate(ws),
                                   np.concatenate(nodes), n_nodes)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(w_ref > 0, wx_ref / w_ref, np.nan)
    table = arch.read("nodes", model_id=model_id).sort_by("node")
    got = spectra.from_list_column(table.column("coadd"))
    np.testing.assert_array_equal(table.column("n_members").to_numpy(), n_ref)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(got, total.result().coadd, rtol=1e-6, equal_nan=True)


def _unassigned_copy(src: Path, dst: Path, model_id: str) -> Path:
    shutil.copytree(src, dst)
    arch = Archive(dst)
    with arch.writer("test") as w:
        w.commit(remove=[(t, str(f.relative_to(arch.root)))
                         for t in ("assignments", "node_partials", "nodes")
                         for f in arch.files(t, model_id=model_id)])
    return dst


def _same_result(a: Path, b: Path, model_id: str) -> None:
    key = [("release", "ascending"), ("plateifu", "ascending"), ("bin_id", "ascending")]
    ta, tb = (Archive(r).read("assignments", model_id=model_id).sort_by(key) for r in (a, b))
    for col in ("release", "plateifu", "bin_id", "node", "second_node", "is_adjacent"):
        assert ta.column(col).equals(tb.column(col)), col
    np.testing.assert_allclose(ta.column("distance").to_numpy(), tb.column("distance").to_numpy(),
                               rtol=1e-5)
    na, nb = (Archive(r).read("nodes", model_id=model_id).sort_by("node") for r in (a, b))
    assert na.column("n_members").equals(nb.column("n_members"))
    np.testing.assert_allclose(spectra.from_list_column(na.column("coadd")),
                               spectra.from_list_column(nb.column("coadd")), rtol=1e-5,
                               equal_nan=True)


@pytest.mark.slow
def test_two_local_workers_equal_one(trained_archive, tmp_path) -> None:
    arch, model_id, _ = trained_archive  # assigned by the fixture in-process (1 worker)
    copy = _unassigned_copy(arch, tmp_path / "arch", model_id)
    out = assign.assign(copy, progress=False, workers=2)
    assert out.n_encoded == out.n_assigned > 0
    _same_result(arch, copy, model_id)


@pytest.mark.slow
def test_dask_local_cluster_equals_local(trained_archive, tmp_path) -> None:
    from distributed import LocalCluster

    arch, model_id, _ = trained_archive
    copy = _unassigned_copy(arch, tmp_path / "arch", model_id)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        out = assign.assign(copy, progress=False, scheduler=cluster.scheduler_address)
    assert out.n_encoded == out.n_assigned > 0
    _same_result(arch, copy, model_id)


def test_rerun_builds_coadds_from_stored_partials_only(trained_archive, tmp_path) -> None:
    arch, model_id, _ = trained_archive
    copy = tmp_path / "arch"
    shutil.copytree(arch, copy)
    for f in Archive(copy).files("spectra"):  # same schema, no rows: a read would show
        empty = pq.read_table(f).slice(0, 0)
        f.unlink()
        pq.write_table(empty, f)
    out = assign.assign(copy, progress=False)
    assert out.n_encoded == 0 and out.n_summed == 0 and out.n_assigned > 0
    _same_result(arch, copy, model_id)
