"""desomdb report / plot on the small fingerprinted mock archive."""

import os
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.products import figure_base, paper_figures, report, report_state
from desomdb.query import views
from desomdb.science import label_catalogue

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def built(full_archive, tmp_path_factory):
    """The report of a copy of the full archive (a report records itself in its archive)."""
    src, model_id, _, _ = full_archive
    root = tmp_path_factory.mktemp("report")
    arch = root / "arch"
    shutil.copytree(src, arch)
    out = root / "report"
    result = CliRunner().invoke(main, ["report", str(arch), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return arch, model_id, out


def _non_blank(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200, path.name
    assert float(np.std(img[..., :3])) > 0.02, f"{path.name} looks blank"


def test_report_draws_every_figure(built) -> None:
    _, _, out = built
    page = (out / "index.html").read_text()
    assert "Not drawn" not in page
    for name in paper_figures.FIGURES:
        _non_blank(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(refs) == 2 * len(paper_figures.FIGURES)
    assert all((out / r).is_file() for r in refs)
    assert {p.name for p in out.iterdir()} == {*refs, "index.html"}


def test_default_nodes_are_the_age_extremes(built) -> None:
    arch, _, _ = built
    con = views.connect(arch)
    nodes = figure_base.default_nodes(con)
    ages = dict(con.sql("with l as (select node, n, median from node_labels where model_id "
                        "= current_model() and label = 'age_mw_gyr') select node, median "
                        "from l where median is not null and n >= least(?, (select max(n) "
                        "from l))", params=[figure_base.PDF_MIN_N]).fetchall())
    populated = con.sql("select count(*) from nodes where model_id = current_model() "
                        "and n_members > 0").fetchall()[0][0]
    assert len(nodes) == len(set(nodes)) >= min(2, populated)
    if len(set(ages.values())) >= 2:
        assert ages[nodes[0]] == min(ages.values()) and ages[nodes[1]] == max(ages.values())


def test_report_says_what_it_cannot_draw(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    copy = tmp_path / "arch"
    shutil.copytree(arch, copy)
    a = Archive(copy)
    with a.writer("test") as w:  # drop the fingerprints: no DESOM-2 figures
        w.commit(remove=[("fingerprints", str(f.relative_to(a.root)))
                         for f in a.files("fingerprints")])
    index = report.build_report(copy, tmp_path / "out")
    page = index.read_text()
    assert "Not drawn" in page and "desomdb fingerprints" in page
    assert not (tmp_path / "out" / "fig9_desom2.png").exists()
    assert (tmp_path / "out" / "fig5_node_medians.png").exists()


def test_plot_one_figure(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    con = views.connect(arch)
    nodes = [r[0] for r in con.sql("select node from nodes where model_id = current_model() "
                                   "order by n_members desc limit 2").fetchall()]
    out = tmp_path / "pdfs.png"
    result = CliRunner().invoke(main, ["plot", str(arch), "fig6_node_pdfs", "--nodes",
                                       ",".join(map(str, nodes)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    _non_blank(out)
    again = CliRunner().invoke(main, ["plot", str(arch), "fig6_node_pdfs", "--out", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output  # never replaced unasked
    out = tmp_path / "other.png"
    bad = CliRunner().invoke(main, ["plot", str(arch), "fig99", "--out", str(out)])
    assert bad.exit_code != 0 and "fig3_prototypes" in bad.output
    off = CliRunner().invoke(main, ["plot", str(arch), "fig4_templates", "--nodes", "999",
                                    "--out", str(out)])
    assert off.exit_code != 0 and "not on the" in off.output
    nog = CliRunner().invoke(main, ["plot", str(arch), "fig7_fingerprint", "--galaxy",
                                    "1-nope", "--out", str(out)])
    assert nog.exit_code != 0 and "not in the archive" in nog.output


def test_report_loads_in_headless_chromium(built) -> None:
    """Open index.html in Debian's chromium: no console errors, every image decodes."""
    if not CHROMIUM.exists() or os.environ.get("DESOMDB_NO_BROWSER"):
        if os.environ.get("DESOMDB_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} missing: install Debian's chromium package")
        pytest.skip("Debian chromium not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    _, model_id, out = built
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}"))
        page.goto((out / "index.html").as_uri(), wait_until="load")
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        title = page.title()
        browser.close()
    assert not errors, errors
    assert len(widths) == len(paper_figures.FIGURES) and min(widths) > 200
    assert model_id in title


def test_status_says_when_the_report_is_stale(built, tmp_path) -> None:
    arch, _, out = built
    copy = tmp_path / "arch"
    shutil.copytree(arch, copy)  # the record travels with the archive
    fresh = CliRunner().invoke(main, ["status", str(copy)])
    assert fresh.exit_code == 0, fresh.output
    assert f"report: {out / 'index.html'}" in fresh.output and "current" in fresh.output
    assert "STALE" not in fresh.output
    with Archive(copy).writer("test") as w:  # any commit (a refresh, a label run) moves on
        w.commit()
    state = report_state.report_state(Archive(copy))
    assert state is not None and state.stale is not None and "changed since" in state.stale
    stale = CliRunner().invoke(main, ["status", str(copy)])
    assert "STALE" in stale.output
    assert f"desomdb report {copy} --out {out}" in stale.output
    report.build_report(copy, tmp_path / "redrawn")
    again = report_state.report_state(Archive(copy))
    assert again is not None and again.stale is None
    assert again.index == str(tmp_path / "redrawn" / "index.html")


def test_map_colours_follow_map_position() -> None:
    import colorsys

    key = figure_base.map_colours(6, 6)
    hue = np.array([[colorsys.rgb_to_hls(*key[r, c])[0] for c in range(6)] for r in range(6)])
    light = np.array([[colorsys.rgb_to_hls(*key[r, c])[1] for c in range(6)] for r in range(6)])
    assert np.allclose(hue[0, 5], hue[5, 5], atol=0.01)  # nodes 5 and 35: one column, one hue
    assert abs(hue[0, 0] - hue[0, 5]) > 0.5  # opposite ends of a row: far apart
    assert np.all(np.diff(hue, axis=1) > 0) and np.all(np.diff(light, axis=0) > 0)
    flat = key.reshape(-1, 3)  # yet every node has its own colour
    dist = np.linalg.norm(flat[:, None] - flat[None, :], axis=-1)
    assert np.min(dist[~np.eye(36, dtype=bool)]) > 0.03


def test_continuum_limits_clip_emission_lines() -> None:
    from desomdb.science import spectra

    wave = spectra.rest_wave_aa()
    flux = 1.0 + 0.2 * (wave - wave[0]) / (wave[-1] - wave[0])  # a red continuum, 1-1.2
    flux[np.abs(wave - 6564.61) < 5] = 30.0  # a strong Hα line
    lo, hi = figure_base.continuum_limits(wave, flux)
    assert 0.9 < lo < 1.0 and 1.2 < hi < 1.3


def test_accuracy_limits_leave_rare_outliers_off_scale() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(0.0, 0.5, 1000)
    fit = true + rng.normal(0, 0.02, 1000)
    fit[:3] = -0.6  # catastrophic fits
    lo, hi = figure_base.accuracy_limits(true, fit)  # the truth ± 5 robust scatters (0.02)
    assert -0.15 < lo < -0.05 and 0.55 < hi < 0.65


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_figures_explain_what_they_show(full_archive) -> None:
    arch, _, cfg, _ = full_archive
    ctx = report._context(arch, None, None, None)
    fig3 = paper_figures.fig3_prototypes(ctx)
    corner = fig3.axes[(cfg.map_rows - 1) * cfg.map_cols]
    assert "rest λ" in corner.get_xlabel() and corner.get_ylabel()
    assert sum(bool(ax.get_xlabel()) for ax in fig3.axes) == 1
    assert "continuum" in fig3.get_suptitle()
    fig5 = paper_figures.fig5_node_medians(ctx)
    assert "no labelled members" in fig5.get_suptitle()
    assert all(float(t).is_integer() for t in fig5.axes[0].get_xticks())
    fig6 = paper_figures.fig6_node_pdfs(ctx)
    legend = " ".join(_texts(fig6))
    assert "n=" in legend and f"fewer than {figure_base.PDF_MIN_N}" in fig6.get_suptitle()
    fig9 = paper_figures.fig9_desom2(ctx)
    n_nodes = len(ctx.desom2[1].prototypes) if ctx.desom2 else 0
    numbers = [t for t in fig9.axes[0].texts if t.get_text().isdigit()]
    assert len(numbers) == n_nodes  # empty nodes show 0
    assert all(float(t).is_integer() for t in fig9.axes[0].get_xticks())
    assert "no galaxies" in paper_figures.fig14_morphology(ctx).get_suptitle()
    training = paper_figures.fig_training(ctx)
    assert [ax.get_yscale() for ax in training.axes] == ["log", "log", "linear"]
    assert "sSFR [yr⁻¹]" in label_catalogue.FIGURE_LABELS["log_ssfr"]
    fig7 = paper_figures.fig7_fingerprint(ctx)
    assert "arcsec" in fig7.axes[1].get_xlabel()
    assert fig7.axes[1].images[0].get_array().shape[-1] == 4  # RGBA from map_colours
