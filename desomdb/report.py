"""``desomdb report``: the paper's main figures from the archive's views, and an HTML page.

Figures written (PNG; colour-blind-safe ``cividis``/``viridis`` maps, labelled with units):

- ``fig3_prototypes.png``: decoded prototype spectrum of every node on the map grid.
- ``fig5_node_medians.png``: per-node median of each label (node_summary).
- ``fig7_fingerprint.png``: one galaxy's fingerprint and its bin map coloured by node.
- ``training.png``: held-out MSE, QE and TE during training of the current model.

Missing so far (issue 9): Fig. 4, 6, 9/10/14 and the accuracy-vs-truth panel.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from desomdb import spectra, views
from desomdb.archive import Archive
from desomdb.train import load_model

LABEL_UNITS = {"age_mw_gyr": "age [Gyr]", "mh_mw": "[M/H] [dex]",
               "log_ml_r": "log M*/L_r [dex]", "ebv_star": "E(B-V)_* [mag]",
               "log_ssfr": "log sSFR [yr^-1]", "d_bpt": "d_BPT [dex]"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_prototypes(con: Any, out: Path, rows: int, cols: int) -> Path:
    """Plot the decoded prototypes on the map grid (paper Fig. 3)."""
    plt = _plt()
    nodes = con.sql("select node, decoded, n_members from nodes where model_id = "
                    "current_model() order by node").fetchall()
    wave = spectra.rest_wave_aa()
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.1 * rows), sharex=True,
                             squeeze=False)
    for node, decoded, n in nodes:
        ax = axes[node // cols][node % cols]
        ax.plot(wave, np.asarray(decoded), lw=0.4, color="k")
        ax.set_title(f"{node // cols},{node % cols} (n={n})", fontsize=5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Decoded prototypes (normalised flux vs rest wavelength 3650-8950 Å)",
                 fontsize=8)
    path = out / "fig3_prototypes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_node_medians(con: Any, out: Path, rows: int, cols: int) -> Path:
    """Plot per-node median labels on the map (paper Fig. 5)."""
    plt = _plt()
    df = con.sql("select * from node_summary").pl()
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.2))
    for ax, (label, unit) in zip(axes.ravel(), LABEL_UNITS.items(), strict=False):
        grid = np.full((rows, cols), np.nan)
        col = f"median_{label}"
        for r in df.select("row", "col", col).iter_rows():
            if r[2] is not None:
                grid[r[0], r[1]] = r[2]
        im = ax.imshow(grid, cmap="cividis", origin="upper")
        ax.set_title(unit, fontsize=9)
        ax.set_xlabel("map column")
        ax.set_ylabel("map row")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path = out / "fig5_node_medians.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_fingerprint(con: Any, out: Path, rows: int, cols: int) -> Path:
    """Plot one galaxy's fingerprint (colour: median radius) and bin map by node (Fig. 7)."""
    plt = _plt()
    mangaid, plateifu, release = con.sql(
        "select mangaid, plateifu, release from baxels group by all "
        "order by count(*) desc limit 1").fetchall()[0]
    fp = con.sql(f"select row, col, n_baxels, median_radius_re from galaxy_fingerprint "
                 f"where mangaid = '{mangaid}'").fetchall()
    counts = np.zeros((rows, cols))
    radius = np.full((rows, cols), np.nan)
    for r, c, n, rad in fp:
        counts[r, c], radius[r, c] = n, rad
    bm = con.sql(f"select m.x, m.y, a.node from bin_map m left join assignments a on "
                 f"a.release = m.release and a.plateifu = m.plateifu and a.bin_id = m.bin_id "
                 f"and a.model_id = current_model() where m.plateifu = '{plateifu}' "
                 f"and m.release = '{release}'").fetchall()
    size = max(max(x for x, _, _ in bm), max(y for _, y, _ in bm)) + 1
    image = np.full((size, size), np.nan)
    for x, y, node in bm:
        if node is not None:
            image[y, x] = node
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    im1 = a1.imshow(radius, cmap="viridis", origin="upper")
    for r in range(rows):
        for c in range(cols):
            if counts[r, c]:
                a1.text(c, r, f"{int(counts[r, c])}", ha="center", va="center", fontsize=6,
                        color="w")
    a1.set_title(f"{mangaid}: baxels per node (colour: median R/R_e)", fontsize=9)
    fig.colorbar(im1, ax=a1, label="median radius [R_e]")
    im2 = a2.imshow(image, cmap="cividis", origin="lower")
    a2.set_title(f"{plateifu}: bin map coloured by node", fontsize=9)
    a2.set_xlabel("spaxel x (RA axis)")
    a2.set_ylabel("spaxel y (Dec axis)")
    fig.colorbar(im2, ax=a2, label="node = row * n_cols + col")
    fig.tight_layout()
    path = out / "fig7_fingerprint.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_training(history: list[dict[str, float]], out: Path) -> Path:
    """Plot held-out MSE, QE and TE against iteration."""
    plt = _plt()
    its = [h["it"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, ylabel in zip(axes, ("recon_mse", "qe", "te4"),
                               ("held-out MSE [normalised flux²]", "QE [latent units]",
                                "TE (4-neighbour)"), strict=True):
        ax.plot(its, [h[key] for h in history], marker="o", color="k")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(archive: str | Path, out: str | Path) -> Path:
    """Write the figures and ``index.html`` into ``out``; return the HTML path."""
    arch = Archive(archive)
    model_id = views.resolve_model(arch, None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = views.connect(arch.root, model=model_id)
    model, payload = load_model(arch, model_id)
    rows, cols = model.cfg.map_rows, model.cfg.map_cols
    figures = [fig_prototypes(con, out, rows, cols), fig_node_medians(con, out, rows, cols),
               fig_fingerprint(con, out, rows, cols),
               fig_training(payload["extra"]["history"], out)]
    metrics = json.dumps(payload["metrics"], indent=1, sort_keys=True)
    items = "\n".join(f'<figure><img src="{f.name}" alt="{f.stem}"><figcaption>{f.stem}'
                      f"</figcaption></figure>" for f in figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>desomdb report "
            f"{html.escape(model_id)}</title><style>body{{font-family:sans-serif;max-width:"
            f"1100px;margin:auto}}img{{max-width:100%}}</style></head><body>"
            f"<h1>desomdb report: {html.escape(model_id)}</h1>"
            f"<p>Archive {html.escape(str(arch.root))}</p>{items}"
            f"<h2>Metrics</h2><pre>{html.escape(metrics)}</pre></body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index
