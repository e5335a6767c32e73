import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from desomdb import assign, checkpoint, model, train, views
from desomdb.archive import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError, ModelError, QueryError


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
    assert views.current_model(Archive(arch_path)) == model_id


def test_loss_decreases(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    _, payload = train.load_model(Archive(arch_path), model_id)
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
    m1, _ = train.load_model(arch, model_id)
    m2, _ = train.load_model(arch, model_id)
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
    assert out["n_encoded"] == 0
    con = views.connect(arch_path)
    assert con.sql("select count(*) from assignments").fetchall()[0][0] == out["n_assigned"]


def test_bad_training_filter(trained_archive) -> None:
    arch_path, _, _ = trained_archive
    with pytest.raises(QueryError, match="no_such_column"):
        train.select_training(Archive(arch_path), "no_such_column > 1")


def test_cli_model_list_and_use(trained_archive) -> None:
    arch_path, model_id, _ = trained_archive
    result = CliRunner().invoke(main, ["model", "list", str(arch_path)])
    assert result.exit_code == 0 and f"* {model_id}" in result.output
    bad = CliRunner().invoke(main, ["model", "use", str(arch_path), "desom1-nope"])
    assert bad.exit_code != 0 and "no registered model" in bad.output


def test_predict_real_spectra(trained_archive) -> None:
    from pathlib import Path

    arch_path, _, cfg = trained_archive
    data = Path(__file__).parent / "data" / "MaNGA_test_spectra.fits.gz"
    result = CliRunner().invoke(main, ["predict", str(arch_path), str(data), "--output",
                                       str(arch_path.parent / "pred.parquet")])
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(arch_path.parent / "pred.parquet")
    assert df.height == 8 and df["node"].is_between(0, cfg.n_nodes - 1).all()
    assert "log_ml_r_median" in df.columns and "ms per spectrum" in result.output
    assert df["n_good"][5] == 0  # the off-IFU spectrum: no good pixels


def test_killed_training_resumes_from_its_checkpoint(labelled_archive, tmp_path) -> None:
    from conftest import TINY

    from desomdb import model

    cfg = model.compact_config(**TINY)
    arch = Archive(labelled_archive)
    rows = train.select_training(arch, "true", 0).rows
    x, w = train.load_rows(arch, rows.head(20))

    class KilledError(Exception):
        pass

    def dies_after(n: int):
        for i, batch in enumerate(train.stream_batches(arch, rows, cfg.batch_size,
                                                       np.random.default_rng(0))):
            if i >= n:
                raise KilledError
            yield batch

    state = tmp_path / "train_state.pt"
    torch.manual_seed(0)
    with pytest.raises(KilledError):
        train.fit(model.Desom(cfg), dies_after(70), x, w, "cpu", state, progress=False)
    saved = torch.load(state, weights_only=False)["loop"]["it"]
    total = cfg.pretrain_iters + cfg.iterations
    assert 0 < saved < total
    loop = train.fit(model.Desom(cfg), train.stream_batches(
        arch, rows, cfg.batch_size, np.random.default_rng(1)), x, w, "cpu", state,
        progress=False)
    assert loop["it"] == total
    its = [h["it"] for h in loop["history"]]
    assert its == sorted(set(its)) and its[0] == 0  # one history, continued, no restart


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
    m, _ = train.load_model(arch, model_id)
    rows = train.select_training(arch, "true", 0).rows
    x, _ = train.load_rows(arch, rows)
    z32 = train.encode_all(m, x, "cpu")
    z16 = train.encode_all(m, x, "cpu", precision="bf16")
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
    _, payload = train.load_model(Archive(arch), model_id)
    mse = [h["recon_mse"] for h in payload["extra"]["history"]]
    assert mse[-1] < 0.7 * mse[0]
    row = views.connect(arch).sql("select config from models where model_id = ?",
                                  params=[model_id]).fetchall()[0][0]
    assert json.loads(row)["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        train.train(arch, model.compact_config(**{**TINY, "precision": "fp8"}), where="true",
                    progress=False)
