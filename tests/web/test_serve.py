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


def test_search_finds_by_plateifu_mangaid_prefix_and_position(site) -> None:
    client, arch, model_id, _, facts = site
    mangaid, _, plateifu = facts["galaxy"]
    by_plateifu = client.get("/search", params={"q": plateifu}, follow_redirects=False)
    assert by_plateifu.status_code == 303
    assert by_plateifu.headers["location"] == (f"/model/{model_id}/galaxy/{quote(mangaid)}?"
                                               + urlencode({"plateifu": plateifu}))
    by_mangaid = client.get("/search", params={"q": f" {mangaid} "})
    assert by_mangaid.status_code == 200 and f"Galaxy {mangaid}" in by_mangaid.text
    con = views.connect(arch)
    cubes = con.sql("select plateifu, ra, dec from cubes where status = 'ok'").fetchall()
    prefix = plateifu.split("-")[0]
    listed = client.get("/search", params={"q": prefix})
    expected = sum(p.startswith(prefix) for p, _, _ in cubes)
    if expected > 1:
        assert f'<span id="n-found">{expected}</span>' in listed.text
    ra, dec = next((r, d) for p, r, d in cubes if p == plateifu)
    cone = client.get("/search", params={"q": f"{ra + 2 / 3600:.6f} {dec:.6f} 5"})
    assert cone.status_code == 200 and f">{plateifu}</td>" in cone.text
    rows = cone.text.split('id="found"')[1].split("</table>")[0].count('class="found"')
    assert rows == con.sql("select count(*) from cone(?, ?, 5)",
                           params=[round(ra + 2 / 3600, 6), round(dec, 6)]).fetchall()[0][0]
    nothing = client.get("/search", params={"q": "9999-99999"})
    assert nothing.status_code == 404 and nothing.text.count('id="error"') == 1
    bad = client.get("/search", params={"q": "10 95"})
    assert bad.status_code == 400 and "Dec" in bad.text


def test_baxel_page_draws_the_stored_fit_recomputed_with_its_own_fitter(site) -> None:
    """The fit over the spectrum is the stored row's: same fitter, same labels."""
    from desomdb.web import explorer

    client, arch, model_id, _, facts = site
    _, release, plateifu = facts["galaxy"]
    stored = views.connect(arch).sql(
        "select fitter, chi2_red, sigma, age_mw_gyr, vel from preferred_labels where "
        "release = ? and plateifu = ? and bin_id = 0", params=[release, plateifu]).fetchall()[0]
    page = client.get(f"/baxel/{release}/{plateifu}/0")
    assert page.status_code == 200
    assert 'id="fit"' in page.text and f"<code>{stored[0]}</code> fit" in page.text
    assert "stellar continuum" in page.text and "stars + emission lines" in page.text
    ex = explorer.Explorer(arch)
    with ex.connection(model_id) as (con, info):
        assert info is not None
        data = galaxy_pages.baxel_data(con, info, release, plateifu, 0)
    drawing = explorer.redraw_fit(ex, model_id, data)
    assert drawing is not None and drawing.fitter_id == stored[0]
    row = drawing.model.row
    np.testing.assert_allclose([row["chi2_red"], row["sigma"], row["age_mw_gyr"], row["vel"]],
                               stored[1:], rtol=1e-6, atol=1e-6)
    m = drawing.model
    total = (m.stars + m.gas)[m.good]
    chi = np.sqrt(np.mean((m.galaxy[m.good] - total) ** 2))
    assert chi < 0.2 * np.median(np.abs(m.galaxy[m.good]))  # the model follows the data


def test_an_unfitted_baxel_says_so(site, monkeypatch) -> None:
    import dataclasses

    from desomdb.web import routes

    _, arch, model_id, _, facts = site
    _, release, plateifu = facts["galaxy"]
    real = galaxy_pages.baxel_data
    monkeypatch.setattr(routes.galaxy_pages, "baxel_data", lambda *a, **k: dataclasses.replace(
        real(*a, **k), fit=None, labels={}))
    page = _uncached(arch).get(f"/model/{model_id}/baxel/{release}/{plateifu}/1")
    assert page.status_code == 200
    assert 'id="not-fitted"' in page.text and 'id="fit"' not in page.text
    assert "no fitter has labelled this" in page.text
    assert '<td class="num">not fitted</td>' in page.text
    assert '<td class="num">fails the cut</td>' not in page.text


def _uncached(arch):
    """A client of an app that draws every page afresh (the module's app keeps pages)."""
    from starlette.testclient import TestClient

    from desomdb.web import create_app

    return TestClient(create_app(arch, cache_pages=0))


def test_galaxy_page_shows_the_image_footprint_and_formatted_numbers(site) -> None:
    client, arch, _, _, facts = site
    mangaid, release, plateifu = facts["galaxy"]
    r = client.get(f"/galaxy/{mangaid}")
    assert 'class="cube-image"' in r.text and 'class="footprint"' in r.text
    assert "data:image/png;base64," in r.text
    z = views.connect(arch).sql("select z from galaxies where release = ? and plateifu = ?",
                                params=[release, plateifu]).fetchall()[0][0]
    assert f"<td class=\"num\">{z:.4g}</td>" in r.text and repr(z) not in r.text
    assert "<td>deg</td>" in r.text  # ra and dec carry their unit


def test_a_cube_ingested_before_images_says_it_has_none(site, monkeypatch) -> None:
    import dataclasses

    from desomdb.web import routes

    _, arch, model_id, _, facts = site
    real = galaxy_pages.galaxy_data
    monkeypatch.setattr(routes.galaxy_pages, "galaxy_data", lambda *a, **k: dataclasses.replace(
        real(*a, **k), images={}))
    r = _uncached(arch).get(f"/model/{model_id}/galaxy/{facts['galaxy'][0]}")
    assert r.status_code == 200 and 'id="no-image"' in r.text
    assert 'class="cube-image"' not in r.text


def test_bin_map_and_image_put_east_on_the_left() -> None:
    """DRP cubes have CD1_1 < 0: RA falls with x, so x grows to the right for east left."""
    from astropy.wcs import WCS

    from desomdb.web import figures

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cd = [[-0.5 / 3600, 0], [0, 0.5 / 3600]]
    assert galaxy_pages.x_grows_west(wcs.to_header_string())
    wcs.wcs.cd = [[0.5 / 3600, 0], [0, 0.5 / 3600]]
    assert not galaxy_pages.x_grows_west(wcs.to_header_string())
    xy = np.array([[0, 0, 1], [1, 0, 2]])
    right = figures.binmap_svg(xy, {}, {}, {}, px=8, x_right=True)
    assert right.index('data-bin="1"') < right.index('x="0"') < right.index('data-bin="2"')
    left = figures.binmap_svg(xy, {}, {}, {}, px=8, x_right=False)
    assert left.index('data-bin="2"') < left.index('x="0"')


def test_sql_page_lists_every_view_its_columns_and_examples_that_run(site) -> None:
    from desomdb.query import schema
    from desomdb.web import pages

    client = site[0]
    r = client.get("/sql")
    for view, cols in schema.view_docs().items():
        assert f'data-view="{view}"' in r.text
        assert all(f"<code>{c}</code>" in r.text for c in cols)
    assert r.text.count('class="example"') == len(pages.SQL_EXAMPLES)
    for _, query in pages.SQL_EXAMPLES:
        ran = client.get("/sql", params={"q": query})
        assert ran.status_code == 200, (query, ran.text[-400:])
        assert int(ran.text.split('<span id="n-rows">')[1].split("<")[0]) > 0, query


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
    result = r.text.split('id="result"')[1].split("</table>")[0]
    assert result.count("<tr>") == pages.SQL_ROWS_SHOWN + 1  # header + the shown rows
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
    assert browser.find_elements(By.CSS_SELECTOR, "#image svg.cube-image path.footprint")
    browser.find_element(By.CSS_SELECTOR, "#binmap a.bin").click()
    assert "/baxel/" in browser.current_url
    assert "DESOM reconstruction" in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, "#fit svg")  # the fit over the spectrum
    visit("baxel")
    mangaid, plateifu = views.connect(arch).sql(
        "select mangaid, plateifu from cubes order by plateifu limit 1").fetchall()[0]
    box = browser.find_element(By.ID, "search")
    box.send_keys(plateifu)
    box.submit()
    assert f"/galaxy/{mangaid}" in browser.current_url and plateifu in browser.title + \
        browser.find_element(By.TAG_NAME, "h1").text
    visit("search")
    browser.get(live + "/sql")
    browser.find_element(By.CSS_SELECTOR, 'details[data-view="baxels"] summary').click()
    assert browser.find_element(By.CSS_SELECTOR, 'details[data-view="baxels"] table'
                                ).is_displayed()
    visit("sql_views")
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
