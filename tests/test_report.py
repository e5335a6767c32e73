"""desomdb report / plot on the small fingerprinted mock archive."""

import os
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from desomdb import report, views
from desomdb.archive import Archive
from desomdb.cli import main

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def built(full_archive, tmp_path_factory):
    arch, model_id, _, _ = full_archive
    out = tmp_path_factory.mktemp("report") / "report"
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
    for name in report.FIGURES:
        _non_blank(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(refs) == 2 * len(report.FIGURES)
    assert all((out / r).is_file() for r in refs)
    assert {p.name for p in out.iterdir()} == {*refs, "index.html"}


def test_default_nodes_are_the_age_extremes(built) -> None:
    arch, _, _ = built
    con = views.connect(arch)
    nodes = report.default_nodes(con)
    ages = dict(con.sql("select node, median_age_mw_gyr from node_summary where "
                        "median_age_mw_gyr is not null and n_members >= least(5, (select "
                        "max(n_members) from node_summary))").fetchall())
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
    assert len(widths) == len(report.FIGURES) and min(widths) > 200
    assert model_id in title
