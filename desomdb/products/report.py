"""``desomdb report`` / ``desomdb plot``: the paper's figures from the archive's views.

Every figure is built from SQL over the views (what a user could query) and written as PNG
and PDF; ``index.html`` (static, no server) shows them with captions. Colour maps are
colour-blind safe (``cividis``, ``viridis``); the two-node overlays use the Okabe-Ito blue
and orange. Wavelengths are rest-frame vacuum Å; fluxes are normalised by the 4050-4150 Å
mean (``baxels.norm_flux``).

==================  =====================================================================
name                content (paper figure)
==================  =====================================================================
fig3_prototypes     decoded prototype of every DESOM-1 node on the map grid, its co-added
                    member spectrum behind it, chosen nodes framed (Fig. 3)
fig4_templates      co-added high-S/N templates of chosen nodes (Fig. 4)
fig5_node_medians   per-node median age, [M/H], log M*/L_r, E(B-V)_*, sSFR, d_BPT (Fig. 5)
fig6_node_pdfs      label PDFs (node_labels histograms) of two nodes overlaid (Fig. 6)
fig7_fingerprint    one galaxy's fingerprint and its bin map coloured by map position (Fig. 7)
fig9_desom2         DESOM-2 occupancy: galaxies per node (Fig. 9)
fig10_desom2_protos decoded DESOM-2 prototypes = typical fingerprints (Fig. 10)
fig14_morphology    median Sersic n and b/a of each DESOM-2 node's galaxies (Fig. 14)
training            held-out MSE, QE and TE during training of the current model
accuracy            pPXF labels against the mock truth (mock surveys only)
==================  =====================================================================

Chosen nodes default to the youngest and the oldest well-populated node (median age) and
the most populated one; the galaxy defaults to the one with most baxels.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from desomdb.archive.store import Archive
from desomdb.atomic import write_text_atomic
from desomdb.errors import ConfigError
from desomdb.products.figure_base import Context, FigureSkippedError, default_nodes, pyplot
from desomdb.products.paper_figures import FIGURES
from desomdb.products.report_state import record_report
from desomdb.query import views
from desomdb.som import registry


def _context(archive: str | Path, model_id: str | None, nodes: list[int] | None,
             galaxy: str | None) -> Context:
    from desomdb.som.registry import load_model

    arch = Archive(archive)
    generation = int(arch.manifest()["generation"])
    model_id = registry.resolve_model(arch, model_id)
    con = views.connect(arch.root, model=model_id)
    model, payload = load_model(arch, model_id)
    ctx = Context(arch, con, model_id, model.cfg.map_rows, model.cfg.map_cols, payload,
                  galaxy=galaxy, generation=generation, cfg=model.cfg)
    if nodes:
        bad = [n for n in nodes if not 0 <= n < model.cfg.n_nodes]
        if bad:
            raise ConfigError(f"nodes {bad} are not on the {ctx.rows}x{ctx.cols} map of "
                              f"{model_id} (0-{model.cfg.n_nodes - 1})")
        ctx.nodes = list(nodes)
    elif arch.files("nodes", model_id=model_id):
        ctx.nodes = default_nodes(con)
    return ctx


def _save(fig: Any, *paths: Path) -> None:
    plt = pyplot()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)


def is_report_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a report desomdb drew and nothing else.

    Its ``index.html`` is a desomdb report, and every other file is one of its figures.
    """
    index = folder / "index.html"
    if not index.is_file() or "<h1>desomdb report:" not in index.read_text(errors="replace"):
        return False
    names = {f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")} | {"index.html"}
    return all(p.is_file() and p.name in names for p in folder.iterdir())


def plot(archive: str | Path, name: str, out: str | Path, model_id: str | None = None,
         nodes: list[int] | None = None, galaxy: str | None = None) -> Path:
    """Write one figure (format from the suffix of ``out``: .png, .pdf, .svg).

    Raises
    ------
    ConfigError
        Unknown figure name, or a figure the archive cannot make (the reason says why).
    """
    if name not in FIGURES:
        raise ConfigError(f"unknown figure {name!r}; choose from {', '.join(FIGURES)}")
    ctx = _context(archive, model_id, nodes, galaxy)
    try:
        fig = FIGURES[name][0](ctx)
    except FigureSkippedError as exc:
        raise ConfigError(f"cannot draw {name}: {exc}") from None
    out = Path(out)
    _save(fig, out)
    return out


def build_report(archive: str | Path, out: str | Path, model_id: str | None = None,
                 nodes: list[int] | None = None, galaxy: str | None = None) -> Path:
    """Write every figure (PNG + PDF) and ``index.html`` into ``out``; return the HTML path.

    Figures whose inputs are missing (e.g. no DESOM-2 yet, or no truth) are listed on the
    page with the reason instead of failing the report.
    """
    ctx = _context(archive, model_id, nodes, galaxy)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts, skipped = [], []
    for name, (func, caption) in FIGURES.items():
        try:
            fig = func(ctx)
        except FigureSkippedError as exc:
            skipped.append(f"<li>{html.escape(name)}: {html.escape(str(exc))}</li>")
            continue
        _save(fig, out / f"{name}.png", out / f"{name}.pdf")
        parts.append(f'<figure id="{name}"><img src="{name}.png" alt="{html.escape(caption)}">'
                     f'<figcaption>{html.escape(caption)} <a href="{name}.pdf">PDF</a>'
                     f"</figcaption></figure>")
    metrics = json.dumps(ctx.payload["metrics"], indent=1, sort_keys=True)
    missing = f"<h2>Not drawn</h2><ul>{''.join(skipped)}</ul>" if skipped else ""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>desomdb report {html.escape(ctx.model_id)}</title><style>"
            f"body{{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}}"
            f"img{{max-width:100%}}figure{{margin:2em 0}}</style></head><body>"
            f"<h1>desomdb report: {html.escape(ctx.model_id)}</h1>"
            f"<p>Archive {html.escape(str(ctx.arch.root))}; map {ctx.rows}x{ctx.cols}; "
            f"chosen nodes {ctx.nodes}; galaxy {html.escape(str(ctx.galaxy))}; drawn from "
            f"archive generation {ctx.generation} ('desomdb status' says when the archive "
            f"has changed since).</p>"
            f"{''.join(parts)}{missing}<h2>Model metrics</h2><pre>{html.escape(metrics)}</pre>"
            f"</body></html>")
    index = out / "index.html"
    write_text_atomic(index, page)
    record_report(ctx.arch, index, ctx.model_id, ctx.generation)
    return index
