"""The paper's figures, each drawn from SQL over the archive's views.

Every figure function takes a :class:`Context` (the archive, its connection, the model and
the chosen nodes and galaxy) and returns a matplotlib figure, or raises
:class:`FigureSkippedError` saying which input is missing. :data:`FIGURES` lists them with
their captions; :mod:`desomdb.products.report` writes them out. Conventions (units, colours):
see :mod:`desomdb.products.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from desomdb.errors import ConfigError
from desomdb.products.figure_base import (
    NODE_COLOURS,
    PDF_MIN_N,
    Context,
    FigureSkippedError,
    accuracy_limits,
    continuum_limits,
    map_colours,
    map_ticks,
    node_grid,
    pyplot,
)
from desomdb.science import emission, label_catalogue, spectra
from desomdb.survey import manga


# ----------------------------------------------------------------------------- figures
def fig3_prototypes(ctx: Context) -> Any:
    """Plot the decoded prototypes on the map grid (paper Fig. 3)."""
    plt = pyplot()
    nodes = ctx.con.sql("select node, decoded, coadd, n_members from nodes where model_id = "
                        "current_model() order by node").fetchall()
    if not nodes:
        raise FigureSkippedError("no nodes table for the current model: run 'desomdb assign'")
    wave = spectra.rest_wave_aa()
    fig, axes = plt.subplots(ctx.rows, ctx.cols, figsize=(1.6 * ctx.cols, 1.1 * ctx.rows + 0.5),
                             squeeze=False)
    for node, decoded, coadd, n in nodes:
        ax = axes[node // ctx.cols][node % ctx.cols]
        drawn = [np.asarray(decoded, dtype=float)]
        if n:
            drawn.append(np.asarray(coadd, dtype=float))
            ax.plot(wave, drawn[1], lw=0.3, color="0.65")
        ax.plot(wave, drawn[0], lw=0.4, color="k")
        # Scaled to the continuum (lines clipped): its shape is what orders the map.
        ax.set_ylim(*continuum_limits(wave, *drawn))
        ax.set_xlim(wave[0], wave[-1])
        ax.set_title(f"{node // ctx.cols},{node % ctx.cols} (n={n})", fontsize=5, pad=2)
        if ax is axes[-1][0]:
            ax.set_xticks([4000, 6000, 8000])
            ax.tick_params(labelsize=5, length=2, pad=1)
            ax.set_xlabel("rest λ [Å]", fontsize=5, labelpad=1)
            ax.set_ylabel("flux / mean 4050-4150 Å", fontsize=5, labelpad=1)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if node in ctx.nodes:
            colour = NODE_COLOURS[ctx.nodes.index(node) % len(NODE_COLOURS)]
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(2)
    fig.suptitle("Decoded prototypes (black) and co-added members (grey): normalised flux "
                 "vs rest wavelength 3650-8950 Å\neach panel scaled to its continuum (emission "
                 "lines clipped); framed: nodes of Fig. 4/6", fontsize=8)
    return fig


def fig4_templates(ctx: Context) -> Any:
    """Plot the co-added node templates of the chosen nodes (paper Fig. 4)."""
    plt = pyplot()
    if not ctx.nodes:
        raise FigureSkippedError("no populated nodes")
    wave = spectra.rest_wave_aa()
    fig, axes = plt.subplots(len(ctx.nodes), 1, figsize=(10, 2.2 * len(ctx.nodes)),
                             sharex=True, squeeze=False)
    for i, node in enumerate(ctx.nodes):
        coadd, n = ctx.con.sql("select coadd, n_members from nodes where model_id = "
                               "current_model() and node = ?", params=[node]).fetchall()[0]
        ax = axes[i][0]
        ax.plot(wave, np.asarray(coadd, dtype=float), lw=0.6,
                color=NODE_COLOURS[i % len(NODE_COLOURS)])
        for lam in emission.LINES_AA.values():
            ax.axvline(lam, color="0.8", lw=0.5, zorder=0)
        ax.set_ylabel("normalised flux")
        ax.set_title(f"node {node} (row {node // ctx.cols}, col {node % ctx.cols}): "
                     f"co-add of {n} baxels", fontsize=9)
    axes[-1][0].set_xlabel("rest wavelength [Å, vacuum]; grey: emission lines fitted")
    fig.tight_layout()
    return fig


def fig5_node_medians(ctx: Context) -> Any:
    """Plot per-node median labels on the map (paper Fig. 5)."""
    plt = pyplot()
    df = ctx.con.sql("select * from node_summary").pl()
    if df.height == 0:
        raise FigureSkippedError("no node_summary for the current model")
    counts = ctx.con.sql("select n.row, n.col, l.label, l.n from nodes n join node_labels l "
                         "using (model_id, node) where n.model_id = current_model()").fetchall()
    annotate = ctx.rows * ctx.cols <= 100  # n per cell stays legible up to a 10x10 map
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6))
    cmap = plt.get_cmap("cividis").with_extremes(bad="0.88")
    for ax, (label, unit) in zip(axes.ravel(), label_catalogue.FIGURE_LABELS.items(), strict=False):
        grid = node_grid(list(df.select("row", "col", f"median_{label}").iter_rows()),
                     ctx.rows, ctx.cols)
        im = ax.imshow(grid, cmap=cmap, origin="upper")
        if annotate:
            n = node_grid([(r, c, k) for r, c, lab, k in counts if lab == label],
                      ctx.rows, ctx.cols)
            for (r, c), k in np.ndenumerate(n):
                empty = np.isnan(grid[r, c]) or np.isnan(k)
                light = not empty and float(im.norm(grid[r, c])) > 0.6
                ax.text(c, r, "–" if empty else f"{int(k)}", ha="center", va="center",
                        fontsize=6, color="0.3" if empty or light else "w")
        ax.set_title(f"median {unit}", fontsize=9)
        ax.set_xlabel("map column")
        ax.set_ylabel("map row")
        map_ticks(ax, ctx.rows, ctx.cols)
        fig.colorbar(im, ax=ax, shrink=0.8)
    numbers = "numbers: labelled members (n); " if annotate else ""
    fig.suptitle(f"Per-node median labels ({numbers}grey '–': no labelled members)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def fig6_node_pdfs(ctx: Context) -> Any:
    """Plot the label PDFs of two nodes overlaid (paper Fig. 6)."""
    plt = pyplot()
    pair = ctx.nodes[:2]
    if len(pair) < 2:
        raise FigureSkippedError("fewer than two populated nodes")
    df = ctx.con.sql("select node, label, n, median, histogram, hist_lo, hist_hi "
                     "from node_labels where model_id = current_model() and node in (?, ?)",
                     params=pair).pl()
    if df.height == 0:
        raise FigureSkippedError("no node_labels: run 'desomdb label' then 'desomdb assign'")
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.6))
    for ax, (label, unit) in zip(axes.ravel(), label_catalogue.FIGURE_LABELS.items(), strict=False):
        for i, node in enumerate(pair):
            sel = df.filter((df["node"] == node) & (df["label"] == label))
            if sel.height == 0:
                continue
            n = int(sel["n"][0])
            if n == 0 or sel["median"][0] is None:
                ax.plot([], [], color=NODE_COLOURS[i], label=f"node {node}: no labelled members")
                continue
            hist = np.asarray(sel["histogram"][0], dtype=float)
            lo, hi = float(sel["hist_lo"][0]), float(sel["hist_hi"][0])
            edges = np.linspace(lo, hi, hist.size + 1)
            dens = hist / max(hist.sum(), 1) / np.diff(edges)
            few = n < PDF_MIN_N
            colour = ("0.6", "0.3")[i] if few else NODE_COLOURS[i]
            ax.stairs(dens, edges, color=colour, lw=1.0 if few else 1.5, ls=":" if few else "-",
                      label=f"node {node} (n={n}{', too few' if few else ''})")
            ax.axvline(float(sel["median"][0]), color=colour, ls="--", lw=1)
        ax.set_xlabel(unit)
        ax.set_ylabel("probability density")
        ax.legend(fontsize=6)
    fig.suptitle(f"Empirical label PDFs of two nodes (dashed: medians; grey dotted: fewer "
                 f"than {PDF_MIN_N} labelled baxels, not a reliable PDF)", fontsize=9)
    fig.tight_layout()
    return fig


def fig7_fingerprint(ctx: Context) -> Any:
    """Plot one galaxy's fingerprint (colour: median radius) and bin map (Fig. 7).

    The bin map is coloured by map position (:func:`map_colours`, keyed in an inset), so
    spaxels on nearby nodes look alike.
    """
    plt = pyplot()
    if ctx.galaxy is None:
        found = ctx.con.sql("select mangaid from baxels group by mangaid "
                            "order by count(*) desc, mangaid limit 1").fetchall()
        if not found:
            raise FigureSkippedError("no baxels")
        ctx.galaxy = str(found[0][0])
    where = [ctx.galaxy]
    cube = ctx.con.sql("select b.plateifu, b.release from baxels b join latest_cubes using "
                       "(release, plateifu) where b.mangaid = ? group by all "
                       "order by count(*) desc limit 1", params=where).fetchall()
    if not cube:
        raise ConfigError(f"galaxy {ctx.galaxy!r} is not in the archive; pick a mangaid "
                          "from 'desomdb sql ARCHIVE \"select mangaid from galaxies\"'")
    plateifu, release = cube[0]
    fp = ctx.con.sql("select row, col, n_baxels, median_radius_re from galaxy_fingerprint "
                     "where mangaid = ?", params=where).fetchall()
    counts = node_grid([(r, c, n) for r, c, n, _ in fp], ctx.rows, ctx.cols)
    radius = node_grid([(r, c, m) for r, c, _, m in fp], ctx.rows, ctx.cols)
    bm = ctx.con.sql("select m.x, m.y, a.node from bin_map m left join assignments a on "
                     "a.release = m.release and a.plateifu = m.plateifu and a.bin_id = m.bin_id "
                     "and a.model_id = current_model() where m.plateifu = ? and m.release = ?",
                     params=[plateifu, release]).fetchall()
    size = max(max(x for x, _, _ in bm), max(y for _, y, _ in bm)) + 1
    key = map_colours(ctx.rows, ctx.cols)
    image = np.ones((size, size, 4))  # white, transparent where no baxel
    image[..., 3] = 0.0
    for x, y, node in bm:
        if node is not None:
            image[y, x, :3] = key[node // ctx.cols, node % ctx.cols]
            image[y, x, 3] = 1.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.8), width_ratios=(1, 1.15))
    im1 = a1.imshow(radius, cmap="viridis", origin="upper")
    for r in range(ctx.rows):
        for c in range(ctx.cols):
            if np.isfinite(counts[r, c]):
                a1.text(c, r, f"{int(counts[r, c])}", ha="center", va="center", fontsize=6,
                        color="w")
    a1.set_title(f"{ctx.galaxy}: baxels per node (colour: median R/R_e)", fontsize=9)
    a1.set_xlabel("map column")
    a1.set_ylabel("map row")
    map_ticks(a1, ctx.rows, ctx.cols)
    fig.colorbar(im1, ax=a1, label="median radius [R_e]")
    half = size * manga.SPAXEL_ARCSEC / 2  # cube centre at 0
    a2.imshow(image, origin="lower", extent=(-half, half, -half, half),
              interpolation="nearest")
    a2.set_title(f"{plateifu} ({release}): bin map coloured by map position", fontsize=9)
    a2.set_xlabel("Δx [arcsec] (cube x, RA axis)")
    a2.set_ylabel("Δy [arcsec] (cube y, Dec axis)")
    a2.set_aspect("equal")
    inset = a2.inset_axes((1.04, 0.55, 0.4, 0.4))
    inset.imshow(key, origin="upper")
    map_ticks(inset, ctx.rows, ctx.cols)
    inset.tick_params(labelsize=6)
    inset.set_title("key: map position", fontsize=7)
    inset.set_xlabel("column", fontsize=6)
    inset.set_ylabel("row", fontsize=6)
    fig.tight_layout()
    return fig


def _desom2(ctx: Context) -> tuple[str, Any]:
    if ctx.desom2 is not None:
        return ctx.desom2
    found = ctx.con.sql("select any_value(desom2_model_id) from fingerprints "
                        "where model_id = current_model()").fetchall() \
        if ctx.arch.files("fingerprints", model_id=ctx.model_id) else []
    if not found or found[0][0] is None:
        raise FigureSkippedError("no fingerprints/DESOM-2 for the current model: run "
                                 "'desomdb fingerprints'")
    from desomdb.som.registry import load_model

    d2_id = str(found[0][0])
    model, _ = load_model(ctx.arch, d2_id)
    ctx.desom2 = (d2_id, model)
    return ctx.desom2


def fig9_desom2(ctx: Context) -> Any:
    """Plot the number of galaxies per DESOM-2 node (paper Fig. 9)."""
    plt = pyplot()
    d2_id, m2 = _desom2(ctx)
    occ = ctx.con.sql("select desom2_row, desom2_col, count(*) from fingerprints "
                      "where model_id = current_model() group by all").fetchall()
    grid = np.nan_to_num(node_grid(occ, m2.cfg.map_rows, m2.cfg.map_cols))  # empty node: 0
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(grid, cmap="viridis", origin="upper", vmin=0)
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=8,
                color="k" if float(im.norm(v)) > 0.6 else "w")
    ax.set_title(f"{d2_id}: galaxies per node", fontsize=9)
    ax.set_xlabel("DESOM-2 column")
    ax.set_ylabel("DESOM-2 row")
    map_ticks(ax, m2.cfg.map_rows, m2.cfg.map_cols)
    bar = fig.colorbar(im, ax=ax, label="galaxies")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.tight_layout()
    return fig


def fig10_desom2_protos(ctx: Context) -> Any:
    """Plot decoded DESOM-2 prototypes: typical fingerprints on the DESOM-1 map (Fig. 10)."""
    import torch

    plt = pyplot()
    d2_id, m2 = _desom2(ctx)
    with torch.no_grad():
        images = m2.decode(m2.prototypes.detach()).cpu().numpy()
    h, w = m2.cfg.input_shape
    rows, cols = m2.cfg.map_rows, m2.cfg.map_cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.6 * cols, 5.0) + 0.8,
                                                  max(1.6 * rows, 4.0) + 0.6), squeeze=False,
                             layout="constrained")  # keeps the title off the panel titles
    im = None
    for k, img in enumerate(images):
        ax = axes[k // cols][k % cols]
        im = ax.imshow(img.reshape(h, w), cmap="cividis", origin="upper", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"DESOM-2 node {k // cols},{k % cols}", fontsize=6)
    fig.suptitle(f"{d2_id}: decoded prototypes\n(normalised counts on the {h}x{w} DESOM-1 "
                 "map)", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="normalised count (0-1)")
    return fig


def fig14_morphology(ctx: Context) -> Any:
    """Plot median Sersic n and b/a of each DESOM-2 node's galaxies (paper Fig. 14)."""
    plt = pyplot()
    _, m2 = _desom2(ctx)
    df = ctx.con.sql(
        "with g as (select mangaid, any_value(nsa_sersic_n) as n, "
        "any_value(nsa_elpetro_ba) as ba from galaxies group by 1) "
        "select f.desom2_row, f.desom2_col, median(g.n), median(g.ba) from fingerprints f "
        "join g using (mangaid) where f.model_id = current_model() group by all").fetchall()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    cmap = plt.get_cmap("cividis").with_extremes(bad="0.88")
    for ax, i, title in ((axes[0], 2, "median Sersic n"), (axes[1], 3, "median b/a")):
        grid = node_grid([(r[0], r[1], r[i]) for r in df], m2.cfg.map_rows, m2.cfg.map_cols)
        im = ax.imshow(grid, cmap=cmap, origin="upper")
        for (r, c), v in np.ndenumerate(grid):
            if np.isnan(v):
                ax.text(c, r, "–", ha="center", va="center", color="0.3", fontsize=12)
        ax.set_title(f"{title} (NSA) per DESOM-2 node", fontsize=9)
        ax.set_xlabel("DESOM-2 column")
        ax.set_ylabel("DESOM-2 row")
        map_ticks(ax, m2.cfg.map_rows, m2.cfg.map_cols)
        fig.colorbar(im, ax=ax, label=title.split()[-1])
    fig.suptitle("grey '–': no galaxies in the node", fontsize=8)
    fig.tight_layout()
    return fig


def fig_training(ctx: Context) -> Any:
    """Plot held-out MSE, QE and TE against iteration."""
    plt = pyplot()
    history = ctx.payload["extra"].get("history") or []
    if not history:
        raise FigureSkippedError("the model artefact has no training history")
    its = [h["it"] for h in history]
    pretrain, every = int(ctx.cfg.pretrain_iters), int(ctx.cfg.eval_every)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, key, ylabel, log in zip(
            axes, ("recon_mse", "qe", "te4"),
            ("held-out MSE [normalised flux²]", "QE [latent units]", "TE (4-neighbour)"),
            (True, True, False), strict=True):
        ax.plot(its, [h[key] for h in history], marker="o", ms=3, lw=1, color="k")
        if log:  # one early spike (e.g. QE before the prototypes exist) must not flatten the rest
            ax.set_yscale("log")
        if pretrain:
            ax.axvspan(0, pretrain, color="0.9", zorder=0, lw=0)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
    shaded = f"; shaded: autoencoder pre-training ({pretrain} it., no SOM yet)" if pretrain else ""
    fig.suptitle(f"Training of {ctx.model_id}: held-out metrics every {every} iterations "
                 f"(points){shaded}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def fig_accuracy(ctx: Context) -> Any:
    """Plot pPXF labels against the mock truth, per label (mock surveys only)."""
    plt = pyplot()
    if not (ctx.arch.has_table("truth") and ctx.arch.has_table("labels")):
        raise FigureSkippedError("no truth table (not a mock survey) or no labels")
    n_cols = -(-len(label_catalogue.ACCURACY) // 2)
    fig, axes = plt.subplots(2, n_cols, figsize=(3.25 * n_cols, 6.4))
    for ax, (label, cut) in zip(axes.ravel(), label_catalogue.ACCURACY.items(), strict=False):
        df = ctx.con.sql(f"select l.{label} as fit, t.{label} as true from preferred_labels l "
                         f"join truth t using (release, plateifu, bin_id) where l.status = 'ok' "
                         f"and "
                         f"{cut} and isfinite(l.{label}) and isfinite(t.{label})").pl()
        if df.height == 0:
            ax.set_visible(False)
            continue
        fit, true = df["fit"].to_numpy(), df["true"].to_numpy()
        d = fit - true
        scatter = 1.4826 * np.median(np.abs(d - np.median(d)))
        lo, hi = accuracy_limits(true, fit)
        off = (fit < lo) | (fit > hi)
        ax.scatter(true[~off], fit[~off], s=3, color="#0072B2", alpha=0.5)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        if off.any():  # drawn on the frame, so one sees on which side
            ax.scatter(true[off], np.clip(fit[off], lo, hi), s=12, marker="x", lw=0.8,
                       color="#D55E00", clip_on=False)
            n = int(off.sum())
            ax.text(0.03, 0.97, f"{n} point{'s' if n > 1 else ''} off-scale (x on the frame)",
                    fontsize=7, transform=ax.transAxes, va="top", color="#D55E00")
        unit = label_catalogue.ACCURACY_DISPLAY[label]
        ax.set_xlabel(f"true {unit}")
        ax.set_ylabel(f"pPXF {unit}")
        note = " (star-forming)" if label == "log_ssfr" else ""
        ax.set_title(f"offset {np.median(d):+.3f}, scatter {scatter:.3f} (n={d.size}){note}",
                     fontsize=8)
    axes.ravel()[-1].set_visible(False)
    fig.suptitle("Label accuracy against the mock truth (median offset, robust scatter); axes "
                 "span the truth ± 5 robust scatters, fits beyond are counted as off-scale",
                 fontsize=9)
    fig.tight_layout()
    return fig


#: name -> (function, caption)
FIGURES: dict[str, tuple[Callable[[Context], Any], str]] = {
    "fig3_prototypes": (fig3_prototypes, "Decoded prototype of every DESOM-1 node (black) "
                        "and its co-added members (grey) on the map grid (paper Fig. 3)."),
    "fig4_templates": (fig4_templates, "Co-added high-S/N templates of the chosen nodes "
                       "(paper Fig. 4)."),
    "fig5_node_medians": (fig5_node_medians, "Per-node median labels (paper Fig. 5)."),
    "fig6_node_pdfs": (fig6_node_pdfs, "Empirical label PDFs of two nodes (paper Fig. 6)."),
    "fig7_fingerprint": (fig7_fingerprint, "One galaxy's fingerprint coloured by median "
                         "radius, and its bin map coloured by map position: hue follows the "
                         "map column, lightness the row (paper Fig. 7)."),
    "fig9_desom2": (fig9_desom2, "DESOM-2 occupancy: galaxies per node (paper Fig. 9)."),
    "fig10_desom2_protos": (fig10_desom2_protos, "Decoded DESOM-2 prototypes: typical "
                            "fingerprints (paper Fig. 10)."),
    "fig14_morphology": (fig14_morphology, "Median Sersic n and b/a per DESOM-2 node "
                         "(paper Fig. 14)."),
    "training": (fig_training, "Held-out reconstruction MSE, QE and TE during training."),
    "accuracy": (fig_accuracy, "pPXF labels against the mock truth (mock surveys only)."),
}
