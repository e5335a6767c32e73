"""The explorer (desomdb serve): pages over the full archive, the guard, 404s, a real browser."""

import io
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from desomdb.cli import main
from desomdb.query import views
from desomdb.science import spectra
from desomdb.web import galaxy_pages

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DR15 = Path(__file__).parents[1] / "data" / "MaNGA_test_spectra.fits.gz"


@pytest.fixture(scope="module")
def site(full_archive):
    from starlette.testclient import TestClient

    from desomdb.web import create_app

    arch, model_id, _, d2 = full_archive
    con = views.connect(arch)
    facts = {
        "nodes": con.sql("select row, col, n_members from nodes where model_id = "
                         "current_model() order by n_members desc").fetchall(),
        "galaxy": con.sql("select mangaid, release, plateifu from cubes where status = 'ok' "
                          "order by n_baxels desc limit 1").fetchall()[0],
    }
    with TestClient(create_app(arch)) as client:
        yield client, arch, model_id, d2, facts


def test_map_is_a_grid_of_node_links_coloured_by_the_chosen_quantity(site) -> None:
    client, _, model_id, d2, facts = site
    first = client.get("/")
    assert first.status_code == 200 and first.url.path == f"/model/{model_id}/map"
    n_nodes = len(facts["nodes"])
    assert first.text.count('class="cell"') == n_nodes
    row, col, n = facts["nodes"][0]
    # the biggest node's hover text carries its member count, its link the node page
    assert f"<title>node {row},{col}: {n} baxels" in first.text
    assert f'href="/model/{model_id}/node/{row},{col}"' in first.text
    fills = {}
    for colour in ("occupancy", "median:age_mw_gyr", "width:mh_mw", "beyond_p99"):
        r = client.get(f"/model/{model_id}/map", params={"colour": colour})
        assert r.status_code == 200, r.text
        fills[colour] = sorted(set(_fills(r.text)))
    assert fills["occupancy"] != fills["median:age_mw_gyr"]  # the colour follows the choice
    bad = client.get(f"/model/{model_id}/map", params={"colour": "median:nonsense"})
    assert bad.status_code == 400 and "unknown colour" in bad.text
    d2_page = client.get(f"/model/{model_id}/map", params={"map": "desom2"})
    assert d2_page.status_code == 200 and d2 in d2_page.text


def test_stored_beyond_p99_counts_equal_the_count_over_every_assignment(site) -> None:
    """nodes.n_beyond_p99 (desomdb assign) is what counting each newest cube's rows gives."""
    from desomdb.web import pages

    _, arch, model_id, _, _ = site
    con = views.connect(arch)
    counted = dict(con.sql(
        "select a.node, count(*) filter (where a.distance > t.distance_p99) from assignments a "
        "join latest_cubes using (release, plateifu) join model_thresholds t using (model_id) "
        "where a.model_id = ? group by a.node", params=[model_id]).fetchall())
    stored = dict(con.sql("select node, n_beyond_p99 from nodes where model_id = ?",
                          params=[model_id]).fetchall())
    assert sum(counted.values()) > 0  # some members lie beyond the p99
    assert stored == {node: counted.get(node, 0) for node in stored}
    # the map reads the stored counts; nodes written before the column existed fall back to
    # the per-assignment query and colour the map the same
    info = pages.models(con)[model_id]
    raw = views.connect(arch, raw=True)
    raw.execute("create temp table nodes_before as select * exclude (n_beyond_p99) from nodes")
    raw.execute("create or replace temp view nodes as select * from nodes_before")
    old = views.ReadOnlyConnection(raw)
    assert "n_beyond_p99" not in old.sql("select * from nodes limit 0").columns
    fractions = pages.beyond_p99_fractions(con, info)
    assert fractions.keys() == pages.beyond_p99_fractions(old, info).keys()
    for node, f in pages.beyond_p99_fractions(old, info).items():
        assert fractions[node] == pytest.approx(f)


def test_galaxy_counts_read_only_the_galaxys_cubes(site) -> None:
    """Without a fingerprint, the galaxy page counts its cubes' own files like the view."""
    from desomdb.web import pages
    from desomdb.web.explorer import Explorer

    _, arch, model_id, _, _ = site
    ex = Explorer(arch)
    parts = ex.cube_parts(model_id)
    with ex.connection(model_id) as (con, info):
        assert info is not None
        view = con.sql("select mangaid, node::bigint as node, n_baxels from galaxy_fingerprint "
                       "order by mangaid, node").pl()
        cubes = con.sql("select mangaid, release, plateifu from cubes join latest_cubes "
                        "using (release, plateifu)").fetchall()
        assert all(parts.source("assignments", r, p) for _, r, p in cubes)  # own files
        for mangaid in view["mangaid"].unique():
            mine = [(r, p) for m, r, p in cubes if m == mangaid]
            expected = view.filter(pl.col("mangaid") == mangaid).drop("mangaid")
            assert galaxy_pages.cube_node_counts(con, info, mine, parts).equals(expected)
            assert galaxy_pages.cube_node_counts(con, info, mine).equals(expected)  # via the view
        # the rows come from the files listed for the cube, not from the view over all cubes
        release, plateifu = mine[0]
        moved = pages.CubeParts({"assignments": {(release, plateifu): [str(arch / "gone.pq")]}})
        with pytest.raises(duckdb.IOException, match=r"gone\.pq"):
            galaxy_pages.cube_node_counts(con, info, [(release, plateifu)], moved)


def test_nearest_galaxies_from_vectors_read_once_equal_desomdb_similar(site) -> None:
    from desomdb.products import similar
    from desomdb.web import explorer as app

    _, arch, model_id, _, _ = site
    ex = app.Explorer(arch)
    for mangaid in views.connect(arch).sql(
            "select distinct mangaid from fingerprints order by 1").fetchnumpy()["mangaid"]:
        shown, _ = app.similar_galaxies(ex, model_id, mangaid)
        found = similar.similar_galaxies(arch, mangaid, k=app.K_SIMILAR, model_id=model_id)
        expected = found.table.filter(pl.col("mangaid") != mangaid)
        assert shown.select("mangaid", "hellinger").equals(expected.select("mangaid",
                                                                           "hellinger"))
    assert [k for k in ex._kept if k[0] == "galaxy_vectors"] == [("galaxy_vectors", model_id)]
    missing, note = app.similar_galaxies(ex, model_id, "1-nope")
    assert missing is None and "no fingerprint of galaxy 1-nope" in str(note)


def test_nearest_baxels_from_the_index_kept_open_equal_desomdb_similar(site) -> None:
    from desomdb.products import similar
    from desomdb.web import explorer as app

    _, arch, model_id, _, _ = site
    ex = app.Explorer(arch)
    with ex.connection(model_id) as (con, info):
        assert info is not None
        baxels = con.sql("select a.release, a.plateifu, a.bin_id from assignments a join "
                         "latest_cubes using (release, plateifu) where a.model_id = ? "
                         "order by all limit 4", params=[model_id]).fetchall()
        shown = {}
        for release, plateifu, bin_id in baxels:
            data = galaxy_pages.baxel_data(con, info, release, plateifu, bin_id,
                                           ex.cube_parts(model_id))
            for exact in (False, True):
                shown[(plateifu, bin_id, exact)] = app.similar_baxels(ex, model_id, data, exact)
    assert [k for k in ex._kept if k[0] == "baxel_index"] == [("baxel_index", model_id)]
    for (plateifu, bin_id, exact), (table, note) in shown.items():
        found = similar.similar_baxels(arch, baxel=f"{plateifu}:{bin_id}", k=app.K_SIMILAR,
                                       model_id=model_id, exact=exact)
        assert found.method == ("exact" if exact else "usearch HNSW") and note is None
        t = found.table
        expected = t.filter((pl.col("plateifu") != plateifu) | (pl.col("bin_id") != bin_id))
        cols = ["release", "plateifu", "bin_id", "node"]
        assert table.select(cols).equals(expected.select(cols))
        np.testing.assert_allclose(table["distance"], expected["distance"], rtol=1e-6)


def test_reused_spectrum_figure_draws_what_a_fresh_one_draws() -> None:
    """A thread's spectrum figure is reused across pages; nothing of one page stays on it."""
    import re

    from desomdb.web import figures

    rng = np.random.default_rng(1)
    a, b = (m + s * rng.standard_normal(spectra.N_REST) for m, s in ((1, 0.1), (2, 0.3)))

    def draw(flux: np.ndarray, title: str) -> str:
        svg = figures.spectrum_figure([("spectrum", flux, "k")], title, flux - flux.mean())
        # ids are salted per drawing and the metadata holds the time: not the picture
        return re.sub(r"\b[mp][0-9a-f]{10}\b", "ID",
                      re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S))

    first, other, again = draw(a, "A"), draw(b, "B"), draw(a, "A")
    fresh: list[str] = []
    thread = threading.Thread(target=lambda: fresh.append(draw(a, "A")))  # its own figure
    thread.start()
    thread.join()
    assert first == again == fresh[0] and other != first and ">B<" in other


def _fills(svg: str) -> list[str]:
    import re

    return re.findall(r'class="cell"[^>]*><title>[^<]*</title><rect [^>]*fill="(#[0-9a-f]+)"',
                      svg)


def test_node_page_shows_its_spectra_pdfs_members_and_neighbours(site) -> None:
    client, arch, model_id, _, facts = site
    row, col, n = facts["nodes"][0]
    r = client.get(f"/model/{model_id}/node/{row},{col}")
    assert r.status_code == 200
    assert f'<span id="n-members">{n}</span>' in r.text
    assert "decoded prototype" in r.text and r.text.count("<svg") >= 2  # spectrum + PDFs
    members = views.connect(arch).sql(
        "select mangaid, count(*) from baxel_labels where node = ? group by 1",
        params=[row * _cols(site) + col]).fetchall()
    for mangaid, _ in members:
        assert f">{mangaid}</a>" in r.text
    for dr, dc in ((-1, 0), (0, -1), (0, 1), (1, 0)):
        if 0 <= row + dr < _cols(site) and 0 <= col + dc < _cols(site):
            assert f'/node/{row + dr},{col + dc}"' in r.text
    csv = client.get(f"/model/{model_id}/node/{row},{col}/coadd.csv")
    table = pl.read_csv(io.BytesIO(csv.content))
    decoded = views.connect(arch).sql(
        "select decoded from nodes where model_id = current_model() and node = ?",
        params=[row * _cols(site) + col]).fetchall()[0][0]
    assert table.height == spectra.N_REST
    np.testing.assert_allclose(table["decoded"].to_numpy(), decoded, rtol=1e-5)
    fits_file = client.get(f"/model/{model_id}/node/{row},{col}/coadd.fits")
    assert fits_file.status_code == 200 and fits_file.content[:6] == b"SIMPLE"


def _cols(site) -> int:
    return int(np.sqrt(len(site[4]["nodes"])))


def test_galaxy_and_baxel_pages(site) -> None:
    client, arch, model_id, _, facts = site
    mangaid, release, plateifu = facts["galaxy"]
    r = client.get(f"/galaxy/{mangaid}")
    assert r.status_code == 200, r.text
    n_bins = views.connect(arch).sql(
        "select count(distinct bin_id) from bin_map where release = ? and plateifu = ? "
        "and bin_id >= 0", params=[release, plateifu]).fetchall()[0][0]
    assert r.text.count('class="bin"') == n_bins  # every bin is a link
    assert "nsa_z" in r.text and "Radial profile" in r.text
    assert f"{plateifu}: age_mw_gyr against radius" in r.text  # a label, not the node number
    by_label = client.get(f"/galaxy/{mangaid}", params={"colour": "age_mw_gyr"})
    assert by_label.status_code == 200 and "Colour (cividis)" in by_label.text
    b = client.get(f"/baxel/{release}/{plateifu}/0")
    assert b.status_code == 200, b.text
    assert "DESOM reconstruction" in b.text and "residual" in b.text
    node = views.connect(arch).sql(
        "select row, col from assignments where model_id = current_model() and release = ? "
        "and plateifu = ? and bin_id = 0", params=[release, plateifu]).fetchall()[0]
    assert f'id="node-link" href="/model/{model_id}/node/{node[0]},{node[1]}"' in b.text


def test_sql_box_runs_the_guarded_query_and_refuses_writes(site, tmp_path) -> None:
    client, arch, _, _, _ = site
    r = client.get("/sql", params={"q": "select node, n_members from node_summary"})
    assert r.status_code == 200
    n = views.connect(arch).sql("select count(*) from node_summary").fetchall()[0][0]
    assert f'<span id="n-rows">{n}</span>' in r.text
    csv = client.get("/sql.csv", params={"q": "select node, n_members from node_summary"})
    assert pl.read_csv(io.BytesIO(csv.content)).height == n
    target = arch / "leak.csv"
    for query in (f"copy (select 1) to '{target}'", f"attach '{tmp_path / 'x.db'}' as x",
                  "select * from read_text('/etc/hostname')"):
        refused = client.get("/sql", params={"q": query})
        assert refused.status_code == 400
        line = refused.text.split('<p class="error" id="error">')[1].split("</p>")[0]
        assert "\n" not in line and line
    assert not target.exists()


def test_a_slow_query_is_stopped_and_does_not_block_other_clients(site, monkeypatch) -> None:
    """Seen: a range(4e11) query ran on after its client left and blocked /sql for ~127 s."""
    import threading
    import time

    from desomdb.web import routes

    client = site[0]
    monkeypatch.setattr(routes, "SQL_SECONDS", 2.0)
    slow: dict = {}

    def run_slow() -> None:
        t0 = time.monotonic()
        slow["r"] = client.get("/sql", params={"q": "select count(*) from range(400000000000)"})
        slow["s"] = time.monotonic() - t0

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    fast = client.get("/sql", params={"q": "select 1 as one"})
    fast_s = time.monotonic() - t0
    thread.join(timeout=60)
    assert fast.status_code == 200 and fast_s < slow["s"]  # not queued behind the slow one
    assert slow["r"].status_code == 400 and "stopped after 2 s" in slow["r"].text
    assert slow["s"] < 30


def test_the_sql_page_shows_a_capped_head_and_the_csv_streams_a_capped_body(
        site, monkeypatch) -> None:
    """Seen: a 30 M-row CSV download returned 523 MB and grew the server to 2.5 GB."""
    from desomdb.web import pages, routes

    client = site[0]
    r = client.get("/sql", params={"q": "select range as i from range(2000)"})
    assert r.status_code == 200
    assert f'the first <span id="n-rows">{pages.SQL_ROWS_SHOWN}</span> rows' in r.text
    assert r.text.count("<tr>") == pages.SQL_ROWS_SHOWN + 1  # header + the shown rows
    monkeypatch.setattr(routes, "SQL_CSV_ROWS", 1500)
    monkeypatch.setattr(routes, "SQL_CSV_BATCH", 400)  # several batches, one header
    csv = client.get("/sql.csv", params={"q": "select range as i from range(2000)"})
    body = pl.read_csv(io.BytesIO(csv.content))
    assert body.columns == ["i"] and body["i"].to_list() == list(range(1500))
    empty = client.get("/sql.csv", params={"q": "select 1 as i where false"})
    assert empty.text.strip() == "i"


def test_unknown_things_get_a_one_line_404(site) -> None:
    client, _, model_id, _, _ = site
    for url in (f"/model/{model_id}/node/99,99", "/galaxy/1-nope", "/model/desom1-nope/map",
                "/baxel/DR15/1-2/0", "/model/desom1-nope/node/0,0", "/nothing/here"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert r.text.count('id="error"') == 1


def test_upload_predicts_in_memory(site) -> None:
    client, arch, _, _, _ = site
    before = sorted(p.name for p in arch.rglob("*"))
    with DR15.open("rb") as fh:
        r = client.post("/predict", files={"spectra": ("dr15.fits.gz", fh.read())})
    assert r.status_code == 200, r.text
    rows = r.text.split('id="predictions"')[1].count("<tr>") - 1
    assert rows == 8  # the eight DR15 spectra in the file
    assert sorted(p.name for p in arch.rglob("*")) == before  # nothing stored
    bad = client.post("/predict", files={"spectra": ("junk.fits", b"not fits")})
    assert bad.status_code == 400 and "junk.fits" in bad.text


def test_serve_command(full_archive, tmp_path) -> None:
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "desomdb serve" in r.output and "127.0.0.1" in r.output
    nope = CliRunner().invoke(main, ["serve", str(tmp_path / "none")])
    assert nope.exit_code != 0 and "desomdb: error:" in nope.output


# ----------------------------------------------------------------------------- browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(full_archive):
    import uvicorn

    from desomdb.web import create_app

    arch = full_archive[0]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(arch), host="127.0.0.1", port=port,
                                           log_level="warning", ws="none", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) or os.environ.get("DESOMDB_NO_BROWSER"):
        if os.environ.get("DESOMDB_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing: install Debian's chromium "
                        "and chromium-driver")
        pytest.skip("Debian chromium/chromium-driver not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_click_map_node_galaxy_baxel_in_chromium(live, browser, full_archive, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    arch, model_id, _, _ = full_archive
    shots = []

    def visit(name: str, status: int = 200) -> None:
        """Screenshot the page; the console must hold no error but the page's own status."""
        shots.append(tmp_path / f"{name}.png")
        browser.save_screenshot(str(shots[-1]))
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        own = f"{browser.current_url} - Failed to load resource: the server responded with " \
              f"a status of {status}"
        assert all(m.startswith(own) for m in errors) if status != 200 else not errors, \
            (name, errors)

    browser.get(live + "/")
    assert browser.title.startswith("map")
    visit("map")
    biggest = views.connect(arch).sql(
        "select row, col from nodes where model_id = current_model() "
        "order by n_members desc limit 1").fetchall()[0]
    browser.find_element(By.CSS_SELECTOR, f'a.cell[data-node="{biggest[0]},{biggest[1]}"]'
                         ).click()
    assert browser.current_url.endswith(f"/model/{model_id}/node/{biggest[0]},{biggest[1]}")
    assert browser.find_element(By.ID, "n-members").text != "0"
    visit("node")
    browser.find_element(By.CSS_SELECTOR, "a.member").click()
    assert "/galaxy/" in browser.current_url
    assert browser.find_elements(By.CSS_SELECTOR, "#binmap svg a.bin")
    visit("galaxy")
    browser.find_element(By.CSS_SELECTOR, "#binmap a.bin").click()
    assert "/baxel/" in browser.current_url
    assert "DESOM reconstruction" in browser.page_source
    visit("baxel")
    browser.get(live + "/sql?" + urlencode({"q": "copy (select 1) to 'x.csv'"}))
    error = browser.find_element(By.ID, "error").text
    assert "read-only" in error and "\n" not in error
    visit("sql_refused", 400)
    browser.get(live + "/sql?" + urlencode({"q": "select * from node_summary"}))
    assert browser.find_element(By.ID, "n-rows").text == str(len(views.connect(arch).sql(
        "select * from node_summary").fetchall()))
    visit("sql_result")
    browser.get(f"{live}/galaxy/{quote('1-nope')}")
    assert "404" in browser.title and "1-nope" in browser.find_element(By.ID, "error").text
    visit("unknown_galaxy", 404)
    assert all(p.stat().st_size > 5000 for p in shots)
