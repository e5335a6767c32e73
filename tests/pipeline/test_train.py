from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError, ModelError, QueryError
from desomdb.pipeline import assign, train, training_set
from desomdb.query import views
from desomdb.som import checkpoint, inference, model, registry


def _frame(t) -> pl.DataFrame:
    out = pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


def test_model_is_registered_with_metrics(trained_archive) -> None:
    arch_path, model_id, _cfg = trained_archive
    con = views.connect(arch_path)
    row = con.sql("select * from models").pl().row(0, named=True)
    assert row["model_id"] == model_id and row["kind"] == "desom1"
    for key in ("recon_mse", "pca_mse", "qe", "te4", "te8"):
        assert np.isfinite(row[key]), key
    assert row["artefact_sha256"] and row["artefact_path"].endswith(".pt")
    assert registry.current_model(Archive(arch_path)) == model_id


def test_loss_decreases(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    _, payload = registry.load_model(Archive(arch_path), model_id)
    history = payload["extra"]["history"]
    assert history[-1]["recon_mse"] < history[0]["recon_mse"]


def test_split_is_by_galaxy(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    splits = _frame(Archive(arch_path).read("splits", model_id=model_id))
    assert splits["mangaid"].is_unique().all()
    assert set(splits["split"]) == {"train", "test"}


def test_reload_is_bit_identical(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    arch = Archive(arch_path)
    m1, _ = registry.load_model(arch, model_id)
    m2, _ = registry.load_model(arch, model_id)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    x = torch.randn(3, 4544)
    with torch.no_grad():
        assert torch.equal(m1.encode(x), m2.encode(x))


def test_corrupt_artefact_is_refused(trained_archive, tmp_path) -> None:
    arch_path, _model_id, _ = trained_archive
    rel = views.connect(arch_path).sql("select artefact_path from models").fetchall()[0][0]
    bad = tmp_path / (arch_path / rel).name
    data = bytearray((arch_path / rel).read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match"):
        checkpoint.load(bad)


def test_assignments_cover_every_baxel(trained_archive) -> None:
    arch_path, model_id, cfg = trained_archive
    con = views.connect(arch_path)
    n_bax = con.sql("select count(*) from baxels").fetchall()[0][0]
    a = con.sql(f"select * from assignments where model_id = '{model_id}'").pl()
    assert a.height == n_bax
    assert a.select("release", "plateifu", "bin_id").is_unique().all()
    assert a["node"].is_between(0, cfg.n_nodes - 1).all()
    assert ((a["row"] * cfg.map_cols + a["col"]) == a["node"]).all()
    adj = (abs(a["node"] // cfg.map_cols - a["second_node"] // cfg.map_cols)
           + abs(a["node"] % cfg.map_cols - a["second_node"] % cfg.map_cols)) == 1
    assert (adj == a["is_adjacent"]).all()
    nodes = con.sql("select node, n_members from nodes").pl().sort("node")
    counts = a.group_by("node").len()
    joined = nodes.join(counts, on="node", how="left").fill_null(0)
    assert (joined["n_members"] == joined["len"]).all()


def test_node_labels_match_a_direct_aggregation(trained_archive) -> None:
    arch_path, _model_id, _ = trained_archive
    con = views.connect(arch_path)
    nl = con.sql("select node, median, n from node_labels where label = 'log_ml_r'").pl()
    direct = con.sql(
        "select a.node, median(l.log_ml_r) as med, count(*) as n from assignments a "
        "join labels l using (release, plateifu, bin_id) "
        "where l.status = 'ok' and l.chi2_ok group by a.node").pl()
    both = nl.join(direct, on="node")
    assert both.height == direct.height > 0
    np.testing.assert_allclose(both["median"], both["med"], rtol=1e-6)
    assert (both["n"] == both["n_right"]).all()
    hist = con.sql("select histogram, n from node_labels").pl()
    assert all(sum(h) == n for h, n in hist.iter_rows())


def test_rerun_assign_resumes_without_duplicates(trained_archive) -> None:
    arch_path, _model_id, _ = trained_archive
    out = assign.assign(arch_path, progress=False)
    assert out.n_encoded == 0
    con = views.connect(arch_path)
    assert con.sql("select count(*) from assignments").fetchall()[0][0] == out.n_assigned


def test_bad_training_filter(trained_archive) -> None:
    arch_path, _, _ = trained_archive
    with pytest.raises(QueryError, match="no_such_column"):
        training_set.select_training(Archive(arch_path), "no_such_column > 1")


def test_cli_model_list_and_use(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    result = CliRunner().invoke(main, ["model", "list", str(arch_path)])
    assert result.exit_code == 0 and f"* {model_id}" in result.output
    bad = CliRunner().invoke(main, ["model", "use", str(arch_path), "desom1-nope"])
    assert bad.exit_code != 0 and "no registered model" in bad.output


_TRAIN_SCRIPT = """
import json, sys
from desomdb.som import model
from desomdb.runtime import runner
from desomdb.pipeline import train
with runner.single_threaded():
    train.train(sys.argv[1], model.compact_config(**json.loads(sys.argv[2])), where="true",
                progress=False)
"""
#: Metrics that measure the wall clock, the one thing a resumed run may not reproduce.
_TIMING = {"train_seconds", "train_spectra_per_s"}


def test_training_killed_with_sigkill_resumes_bit_identically(trained_archive, labelled_archive,
                                                              tmp_path) -> None:
    """``kill -9`` mid-training, then train again: on one thread, the same weights and metrics
    as an uninterrupted run, registered under its own id with the run it resumed named."""
    import json
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import TINY

    from desomdb.archive import paths
    from desomdb.runtime import runner

    _, model_id, cfg = trained_archive
    # The uninterrupted run, at the thread count of the killed and the resumed run (float
    # sums depend on it; the session fixture may have trained at another).
    ref_arch = tmp_path / "reference"
    shutil.copytree(labelled_archive, ref_arch)
    with runner.single_threaded():
        assert train.train(ref_arch, cfg, where="true", progress=False) == model_id
    arch = tmp_path / "arch"
    shutil.copytree(labelled_archive, arch)
    state = paths.artefact_dir(arch, model_id) / "train_state.pt"
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(arch), json.dumps(TINY)])
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
    saved = torch.load(state, weights_only=True)
    total = cfg.pretrain_iters + cfg.iterations
    assert 0 < saved["loop"]["it"] < total and saved["loop"]["batches"] > 0
    assert model_id not in registry.registered_models(Archive(arch))

    with runner.single_threaded():
        resumed_id = train.train(arch, cfg, where="true", progress=False)
    assert resumed_id == train.resumed_model_id(model_id, [saved["loop"]["it"]])
    assert resumed_id != model_id and resumed_id.startswith("desom1-")
    assert set(registry.registered_models(Archive(arch))) == {resumed_id}
    resumed, r_meta = registry.load_model(Archive(arch), resumed_id)
    reference, ref_meta = registry.load_model(Archive(ref_arch), model_id)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert r_meta["metrics"]["resumed_from"] == model_id
    assert r_meta["metrics"]["resumed_at"] == [saved["loop"]["it"]]
    assert registry.resumed_from(Archive(arch), resumed_id) == model_id
    drop = lambda m: {k: v for k, v in m.items()  # noqa: E731
                      if k not in _TIMING | {"resumed_from", "resumed_at"}}
    assert drop(r_meta["metrics"]) == drop(ref_meta["metrics"])
    assert r_meta["extra"]["history"] == ref_meta["extra"]["history"]
    assert r_meta["extra"]["resumed_at"] == [saved["loop"]["it"]]
    assert ref_meta["extra"]["resumed_at"] == []
    assert not state.exists()


class _KilledError(Exception):
    pass


class _DyingStream(training_set.BatchStream):
    """A batch stream whose process 'dies' when it reaches ``limit`` batches."""

    limit = 0

    def __next__(self):
        if self.position >= self.limit:
            raise _KilledError
        return super().__next__()


@pytest.fixture
def one_thread():
    """One torch thread: tiny networks on a busy machine train ~10x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _desom2_setup(**kw):
    cfg = model.desom2_config(**{"map_rows": 2, "map_cols": 2, "input_shape": (4, 4),
                                 "iterations": 60, "decay_iters": 40, "pretrain_iters": 20,
                                 "eval_every": 20, "batch_size": 8, "patience": 50, **kw})
    x = np.random.default_rng(3).random((40, 16), dtype=np.float32)
    return cfg, x


def _desom2_fit(cfg, x, state, stream=None):
    from desomdb.pipeline import fingerprint

    torch.manual_seed(cfg.seed)  # as fingerprint.build does
    m = model.Desom(cfg)
    stream = stream or fingerprint._batches(x, cfg.batch_size, np.random.default_rng(cfg.seed))
    loop = train.fit(m, stream, x, np.ones_like(x), "cpu", state, progress=False)
    return m, loop


# The paper's set-up (DESOM-2's) and DESOM-1's (standardisation, batch SOM, relative γ).
SETUPS = [{}, {"standardise": True, "gamma_mode": "relative", "gamma": 0.1, "som_epochs": 5}]


@pytest.mark.parametrize("setup", SETUPS, ids=["raw", "standardised"])
def test_desom2_training_resumes_bit_identically(tmp_path, one_thread, setup) -> None:
    import random

    cfg, x = _desom2_setup(**setup)
    reference, ref_loop = _desom2_fit(cfg, x, tmp_path / "a.pt")
    dying = _DyingStream([len(x)], lambda _: (x, np.ones_like(x)), cfg.batch_size,
                         np.random.default_rng(cfg.seed), buffer_rows=len(x))
    # past the checkpoint at it 40 (after the prototype initialisation), before it 60: 42
    # batches drawn by then, plus the standardisation's and the batch SOM's samples
    extra = 0
    if setup:
        extra = (-(-train.N_STANDARDISE // cfg.batch_size)
                 + max(train.N_SOM_FIT, 2 * cfg.n_nodes) // cfg.batch_size + 1 - 2)
    dying.limit = 50 + extra
    with pytest.raises(_KilledError):
        _desom2_fit(cfg, x, tmp_path / "b.pt", dying)
    torch.manual_seed(999)  # what the crashed process drew must not matter
    np.random.seed(1)  # noqa: NPY002
    random.seed(2)
    resumed, loop = _desom2_fit(cfg, x, tmp_path / "b.pt")
    assert loop["resumed_at"] == [40] and loop["it"] == ref_loop["it"]
    assert loop["history"] == ref_loop["history"] and loop["batches"] == ref_loop["batches"]
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_of_another_stream_or_format_is_refused(tmp_path, one_thread) -> None:
    cfg, x = _desom2_setup()
    state = tmp_path / "state.pt"
    dying = _DyingStream([len(x)], lambda _: (x, np.ones_like(x)), cfg.batch_size,
                         np.random.default_rng(cfg.seed), buffer_rows=len(x))
    dying.limit = 30
    with pytest.raises(_KilledError):
        _desom2_fit(cfg, x, state, dying)
    other_seed = training_set.BatchStream([len(x)], lambda _: (x, np.ones_like(x)), cfg.batch_size,
                                   np.random.default_rng(cfg.seed + 1), buffer_rows=len(x))
    with pytest.raises(ModelError, match="does not reproduce the checkpoint's data order"):
        _desom2_fit(cfg, x, state, other_seed)
    old = torch.load(state, weights_only=True)
    torch.save({**old, "format_version": 1}, state)  # as desomdb wrote before the RNG states
    with pytest.raises(ModelError, match=r"format 1 is not 3.*delete it"):
        _desom2_fit(cfg, x, state)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="unreadable training checkpoint"):
        _desom2_fit(cfg, x, state)


def _artefact(tmp_path, payload: dict) -> Path:
    """Write ``payload`` as an artefact named by its content hash, as checkpoint.save does."""
    import hashlib
    import io

    buf = io.BytesIO()
    torch.save(payload, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    path = tmp_path / f"desom1-old-{digest[:16]}.pt"
    path.write_bytes(buf.getvalue())
    return path


def test_format_1_artefact_loads_with_its_old_semantics(tmp_path) -> None:
    """A model saved before standardisation: no mean/scale buffers, no new config keys."""
    new_keys = {"gamma_mode", "standardise", "som_epochs"}
    cfg = model.compact_config(map_rows=2, map_cols=2, latent=4, input_len=64, channels=(4,),
                               kernels=(4,), strides=(2,), gamma=5e-4)
    torch.manual_seed(0)
    m = model.Desom(cfg)
    old_state = {k: v for k, v in m.state_dict().items()
                 if k not in ("mean", "scale", "latent_var")}
    old_config = {k: v for k, v in cfg.to_dict().items() if k not in new_keys}
    path = _artefact(tmp_path, {"format_version": 1, "config": old_config, "state": old_state,
                                "metrics": {"qe": 1.0}, "extra": {}})
    loaded, payload = checkpoint.load(path)
    assert payload["metrics"] == {"qe": 1.0}
    assert loaded.cfg.gamma_mode == "raw" and not loaded.cfg.standardise
    assert loaded.cfg.som_epochs == 0
    x = torch.rand(3, 64)
    with torch.no_grad():  # what the format-1 model computed: the raw encoder and decoder
        torch.testing.assert_close(loaded.encode(x), m.encoder(x))
        torch.testing.assert_close(loaded.decode(m.encoder(x)), m.decoder(m.encoder(x)))
    newer = _artefact(tmp_path, {"format_version": 99, "config": cfg.to_dict(),
                                 "state": m.state_dict(), "metrics": {}, "extra": {}})
    with pytest.raises(ModelError, match=rf"{newer.name}: checkpoint format 99 .*desomdb train"):
        checkpoint.load(newer)


def test_trained_model_stores_the_training_mean(trained_archive) -> None:
    """train() records the training set's mean spectrum; assign's encoder subtracts it."""
    arch_path, model_id, _ = trained_archive
    arch = Archive(arch_path)
    m, _ = registry.load_model(arch, model_id)
    assert m.cfg.standardise and m.cfg.gamma_mode == "relative"
    splits = _frame(arch.read("splits", model_id=model_id))
    rows = training_set.select_training(arch, "true", 0).rows.join(
        splits.filter(pl.col("split") == "train").select("mangaid"), on="mangaid")
    x, w = training_set.load_rows(arch, rows)
    mean = (x * w).sum(0) / np.maximum(w.sum(0), 1)
    good = w.sum(0) > 0
    # A stream sample of 4,096 rows with repeats: close to the exact training mean.
    assert np.abs(m.mean.numpy()[good] - mean[good]).mean() < 0.05 * float(m.scale)
    con = views.connect(arch_path)
    a = con.sql(f"select release, plateifu, bin_id, node from assignments "
                f"where model_id = '{model_id}' order by all limit 50").pl()
    a = a.join(training_set.select_training(arch, "true", 0).rows.drop("split"),
               on=["release", "plateifu", "bin_id"], maintain_order="left")
    xa, _ = training_set.load_rows(arch, a)
    z = inference.encode_all(m, xa)
    with torch.no_grad():
        z_raw = m.encoder(torch.from_numpy(xa)).numpy()
    assert not np.allclose(z, z_raw)  # the stored mean and scale are applied
    assert (inference.nearest_nodes(m, z).best == a["node"].to_numpy()).all()


def test_artefact_with_pickled_objects_is_refused(tmp_path) -> None:
    """Artefacts load with weights_only=True: a pickled object is refused, not executed."""
    import hashlib
    import io

    cfg, _ = _desom2_setup()
    buf = io.BytesIO()
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "config": cfg.to_dict(),
                "state": model.Desom(cfg).state_dict(), "metrics": {"qe": np.float64(1)},
                "extra": {}}, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    path = tmp_path / f"desom2-x-{digest[:16]}.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelError, match="cannot read the model artefact"):
        checkpoint.load(path)


def test_status_summarises_the_archive(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    result = CliRunner().invoke(main, ["status", str(arch_path)])
    assert result.exit_code == 0, result.output
    assert "DR15: baxels" in result.output and "cubes_ok 2" in result.output
    assert f"* {model_id}" in result.output
    assert "baxels without a node under the current model: 0" in result.output


def test_bf16_encoding_agrees_with_fp32(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    arch = Archive(arch_path)
    m, _ = registry.load_model(arch, model_id)
    rows = training_set.select_training(arch, "true", 0).rows
    x, _ = training_set.load_rows(arch, rows)
    z32 = inference.encode_all(m, x, "cpu")
    z16 = inference.encode_all(m, x, "cpu", precision="bf16")
    assert z16.dtype == np.float32
    assert np.linalg.norm(z32 - z16) / np.linalg.norm(z32) < 0.02
    with torch.no_grad():
        d32 = m.sq_distances(torch.from_numpy(z32)).sqrt().numpy()
        b16 = m.sq_distances(torch.from_numpy(z16)).argmin(1).numpy()
    # Where bf16 picks another node it is a near-tie: by the triangle inequality its fp32
    # distance exceeds the best by at most twice the latent error.
    rows_ = np.arange(len(b16))
    err = np.linalg.norm(z32 - z16, axis=1)
    assert np.all(d32[rows_, b16] <= d32.min(axis=1) + 2 * err + 1e-5)


def test_drift_threshold_is_the_training_p99(trained_archive) -> None:
    """About 1 % of the training spectra lie beyond the stored distance_p99, by definition."""
    arch, model_id, _ = trained_archive
    con = views.connect(arch, model=model_id)
    frac, n = con.sql(
        "select avg((a.distance > cast(m.metrics ->> '$.distance_p99' as double))::int), "
        "count(*) from assignments a join models m using (model_id) "
        "join splits s using (model_id) join baxels b using (release, plateifu, bin_id) "
        "where a.model_id = current_model() and s.mangaid = b.mangaid and s.split = 'train'"
    ).fetchall()[0]
    assert n > 0 and frac <= 0.01 + 1 / n  # at most the one spectrum above the p99 point
    held_out, = con.sql("select frac_beyond_p99 from drift where model_id = current_model()"
                        ).fetchall()[0]
    assert held_out >= frac  # test galaxies are represented less well than training ones


def test_bf16_training_learns_and_is_recorded(labelled_archive, tmp_path) -> None:
    import json
    import shutil

    from conftest import TINY

    arch = tmp_path / "arch"
    shutil.copytree(labelled_archive, arch)
    cfg = model.compact_config(**{**TINY, "precision": "bf16"})
    model_id = train.train(arch, cfg, where="true", progress=False)
    _, payload = registry.load_model(Archive(arch), model_id)
    mse = [h["recon_mse"] for h in payload["extra"]["history"]]
    assert mse[-1] < 0.7 * mse[0]
    row = views.connect(arch).sql("select config from models where model_id = ?",
                                  params=[model_id]).fetchall()[0][0]
    assert json.loads(row)["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        train.train(arch, model.compact_config(**{**TINY, "precision": "fp8"}), where="true",
                    progress=False)
