"""Commands that read an archive.

predict, similar, sql, serve, export-hats, maps, report, plot, stack, check, status, model.
"""

from __future__ import annotations

from pathlib import Path

import click

from desomdb.cli.base import (
    _friendly_errors,
    _node_list,
    main,
    model_option,
    overwrite_option,
    pl_config,
)
from desomdb.errors import ConfigError


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("spectra_file", type=click.Path(path_type=Path))
@model_option()
@click.option("--output", type=click.Path(path_type=Path),
              help="write all columns to this .parquet or .csv file")
@overwrite_option
@click.option("--min-good-bins", type=int,
              help="spectra with fewer good rest-frame bins (of 4544) get no node; the "
                   "reason column says why  [default: 1000]")
@_friendly_errors
def predict(archive: Path, spectra_file: Path, model_id: str | None,
            output: Path | None, overwrite: bool, min_good_bins: int | None) -> None:
    """Predict node and label distributions for new spectra.

    SPECTRA_FILE is a FITS file in the MaNGA DAP test-spectra layout (WAVE,
    FLUX, IVAR, MASK, Z; observed frame, log-spaced vacuum grid) or a Parquet
    file with the archive's spectra columns (flux, mask[, ivar, norm_flux,
    wave_rest_aa]; rest frame, 4544 log-spaced bins 3650-8950 Å, vacuum).
    Spectra with too few good bins, or none in the 4050-4150 Å normalisation
    window, get no node and a reason.

    \b
    Example:
      desomdb predict /tmp/archive tests/data/MaNGA_test_spectra.fits.gz
    """
    import polars as pl

    from desomdb.archive.outputs import output_file
    from desomdb.products import predict as predict_mod

    if output is not None:
        output = output_file(output, overwrite)
    df = predict_mod.predict(archive, spectra_file, model_id,
                             min_good_bins=predict_mod.MIN_GOOD_BINS if min_good_bins is None
                             else min_good_bins)
    if output is not None:
        if output.suffix == ".csv":
            df.drop([c for c, t in df.schema.items() if t.is_nested()]).write_csv(output)
        else:
            df.write_parquet(output)
        click.echo(f"wrote {df.height} predictions to {output}")
    show = [c for c in ("index", "node", "row", "col", "distance", "out_of_distribution",
                        "age_mw_gyr_median", "log_ml_r_median", "log_ssfr_median",
                        "d_bpt_median", "reason") if c in df.columns]
    with pl_config():
        click.echo(df.select(show))
    for index, reason in df.filter(pl.col("reason").is_not_null()).select(
            "index", "reason").iter_rows():
        click.echo(f"spectrum {index}: no node ({reason})", err=True)
    click.echo(f"{df['seconds_per_spectrum'][0] * 1e3:.2f} ms per spectrum (encode + assign)")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--baxel", help="a baxel of the archive, PLATEIFU:BIN (its cube's newest release)")
@click.option("--spectra", "spectra_file", type=click.Path(path_type=Path),
              help="a spectra file as 'desomdb predict' reads it (FITS or Parquet)")
@click.option("--index", "index", type=int, default=0, show_default=True,
              help="which spectrum of --spectra (0-based row)")
@click.option("--galaxy", help="a galaxy (mangaid): nearest galaxies by fingerprint")
@click.option("-k", "k", type=int, default=10, show_default=True, help="neighbours to list")
@model_option("DESOM-1 model id")
@click.option("--exact", is_flag=True, help="exact search instead of the HNSW index")
@_friendly_errors
def similar(archive: Path, baxel: str | None, spectra_file: Path | None, index: int,
            galaxy: str | None, k: int, model_id: str | None, exact: bool) -> None:
    """Find the spectra (baxels) or galaxies most like a given one.

    Baxels: nearest in the DESOM-1 latent space (Euclidean), among the
    current version of each cube (latest_cubes); the query baxel itself comes
    first. Galaxies: nearest by the Hellinger distance between their
    fingerprints (distributions over DESOM-1 nodes). Uses the model's HNSW
    indexes (built by assign and fingerprints); searches exactly, and says so,
    when an index is missing or out of date.

    \b
    Examples:
      desomdb similar /tmp/archive --baxel 8485-1901:12 -k 5
      desomdb similar /tmp/archive --spectra tests/data/MaNGA_test_spectra.fits.gz --index 2
      desomdb similar /tmp/archive --galaxy 1-209232
    """
    from desomdb.products import similar as similar_mod

    found = similar_mod.similar(archive, baxel=baxel, spectra_file=spectra_file, index=index,
                                galaxy=galaxy, k=k, model_id=model_id, exact=exact)
    click.echo(f"{found.query}: {found.kind} nearest under {found.model_id} "
               f"({found.metric})")
    with pl_config():
        click.echo(found.table)
    click.echo(f"{found.method} search: {found.seconds * 1e3:.2f} ms")
    if found.note:
        click.echo(f"note: {found.note}", err=True)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet", "fits",
                                                   "votable"]),
              default="table", show_default=True,
              help="parquet, fits and votable (need --output) carry units, descriptions "
                   "and provenance")
@click.option("--output", type=click.Path(path_type=Path), help="write to this file")
@overwrite_option
@model_option("model for the convenience views")
@click.option("--setup", is_flag=True, help="print the DuckDB CLI setup script instead")
@_friendly_errors
def sql(archive: Path, query: str | None, fmt: str, output: Path | None, overwrite: bool,
        model_id: str | None, setup: bool) -> None:
    """Run a read-only SQL query over the archive's views.

    Views: cubes, galaxies, baxels, spectra, bin_map, labels, truth, models,
    nodes, assignments, node_labels, fingerprints, splits, and baxel_labels,
    node_summary, galaxy_fingerprint, galaxy_summary, latest_cubes, drift,
    poorly_represented (columns in sql/schema.yml). QUERY must be one SELECT (or EXPLAIN of one);
    anything else, and reading files outside the archive, is refused. --output
    is refused inside an archive, and an existing file is replaced only with
    --overwrite (as every output option). --model must be a registered model.
    For the plain DuckDB CLI: cd ARCHIVE && duckdb -cmd ".read setup.sql". cone(ra_deg, dec_deg,
    radius_arcsec) lists the galaxies within a radius.

    \b
    Example:
      desomdb sql /tmp/archive "select node, median(age_mw_gyr) from baxel_labels group by node"
      desomdb sql /tmp/archive "select * from galaxy_summary" --format fits --output gal.fits
    """
    from desomdb.query import views as views_mod

    if setup:
        click.echo(views_mod.setup_sql(archive), nl=False)
        return
    if not query:
        raise ConfigError("give a QUERY (or --setup)")
    if output is not None:
        from desomdb.archive.outputs import output_file

        output = output_file(output, overwrite)
    if fmt in ("parquet", "fits", "votable"):
        from desomdb.products import export

        if output is None:
            raise ConfigError(f"--format {fmt} needs --output FILE")
        done = export.export_query(archive, query, output, fmt, model_id)
        click.echo(f"wrote {done.n_rows} rows to {output}")
        if done.dropped:
            click.echo(f"left out (nested columns {fmt} cannot hold): {', '.join(done.dropped)}")
        return
    con = views_mod.connect(archive, model=model_id)
    rel = views_mod.query(con, query)
    df = rel.pl()
    if fmt == "table":
        with pl_config():
            text = str(df)
    elif fmt == "csv":
        flat = df.drop([c for c, t in df.schema.items() if t.is_nested()])
        text = flat.write_csv()
    elif fmt == "json":
        text = df.write_json()
    if output is not None:
        output.write_text(text)
        click.echo(f"wrote {df.height} rows to {output}")
    else:
        click.echo(text)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to bind (loopback: only this machine can connect)")
@click.option("--port", type=int, default=8765, show_default=True)
@_friendly_errors
def serve(archive: Path, host: str, port: int) -> None:
    """Explore the archive in a browser: map, nodes, galaxies, baxels, SQL (read only).

    Then open http://localhost:8765/ (the port given). Only this machine can connect
    unless --host names another interface.

    \b
    Example:
      desomdb serve /tmp/desomdb-demo/archive --port 8765
    """
    from desomdb.web import serve as serve_app

    serve_app(archive, host=host, port=port)


@main.command("export-hats")
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@model_option("DESOM-1 model of the node columns")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@_friendly_errors
def export_hats(archive: Path, out: Path, model_id: str | None, overwrite: bool) -> None:
    """Write the galaxies as a HATS catalog (hats-import) for LSDB cross-matches.

    One row per cube in its newest release: RA/Dec, redshift, drpall columns,
    median labels, fingerprint peak node and DESOM-2 node (the galaxy_summary
    view), with units in the Parquet metadata and provenance in
    hats.properties. Needs the 'hats' extra: pip install "desomdb[hats]".

    \b
    Example:
      desomdb export-hats /tmp/archive /tmp/desomdb_galaxies
      python -c "import lsdb; print(lsdb.open_catalog('/tmp/desomdb_galaxies'))"
    """
    from desomdb.products import export_hats as hats_mod

    done = hats_mod.export_hats(archive, out, model=model_id, overwrite=overwrite)
    click.echo(f"wrote {done.n_rows} galaxies to {done.path} (HATS; model "
               f"{done.provenance.model_id})")
    if done.n_without_position:
        click.echo(f"left out {done.n_without_position} galaxies without RA/Dec")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("plateifu")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="output FITS file")
@overwrite_option
@click.option("--release", help="data release (default: the cube's newest)")
@model_option("DESOM-1 model of the NODE image")
@_friendly_errors
def maps(archive: Path, plateifu: str, out: Path, overwrite: bool, release: str | None,
         model_id: str | None) -> None:
    """Write one galaxy's label maps as FITS images with the cube's WCS.

    Extensions BIN_ID, SNR, NODE, CHI2_RED and one per label (AGE_MW_GYR,
    MH_MW, LOG_ML_R, EBV_STAR, EBV_GAS, LOG_SSFR, D_BPT, VEL, SIGMA; NaN where
    the fit fails the label's cut) on the cube's spaxel grid, each with the
    cube's celestial WCS and BUNIT, so they overlay the cube in DS9.

    \b
    Example:
      desomdb maps /tmp/archive 8131-6102 --out manga-8131-6102-DESOM-MAPS.fits
      ds9 -multiframe manga-8131-6102-DESOM-MAPS.fits
    """
    from desomdb.archive.outputs import output_file
    from desomdb.products import maps as maps_mod

    out = output_file(out, overwrite)
    done = maps_mod.write_maps(archive, plateifu, out, release=release, model=model_id)
    click.echo(f"wrote {done.path}: {done.plateifu} ({done.release}), "
               f"{len(done.extensions)} images: {', '.join(done.extensions)}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="folder for the figures (PNG + PDF) and index.html")
@overwrite_option
@model_option("DESOM-1 model")
@click.option("--nodes", help="comma-separated nodes for Fig. 3/4/6 (default: youngest, "
              "oldest and most populated)")
@click.option("--galaxy", help="mangaid for Fig. 7 (default: the one with most baxels)")
@_friendly_errors
def report(archive: Path, out: Path, overwrite: bool, model_id: str | None,
           nodes: str | None, galaxy: str | None) -> None:
    """Write the paper's figures (PNG + PDF) and a static HTML page.

    Figures: 3 (decoded prototypes), 4 (node templates), 5 (per-node median
    labels), 6 (node label PDFs), 7 (a galaxy's fingerprint and bin map), 9/10/14
    (DESOM-2 occupancy, decoded fingerprints, Sersic n and b/a), training curves,
    and label accuracy against the truth of a mock survey. Open OUT/index.html in
    a browser (no server needed). --overwrite redraws a report in OUT; a folder
    holding other files is never replaced.

    \b
    Example:
      desomdb report /tmp/archive --out /tmp/report
    """
    from desomdb.archive.outputs import output_folder
    from desomdb.products import report as report_mod

    out = output_folder(out, overwrite, wrote_it=report_mod.is_report_folder)
    index = report_mod.build_report(archive, out, model_id, _node_list(nodes), galaxy)
    click.echo(f"report: {index}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("figure")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="output file; the suffix (.png, .pdf, .svg) sets the format")
@overwrite_option
@model_option("DESOM-1 model")
@click.option("--nodes", help="comma-separated nodes for Fig. 3/4/6")
@click.option("--galaxy", help="mangaid for Fig. 7")
@click.option("--stack", "stack_file", type=click.Path(path_type=Path),
              help="for FIGURE 'stack': a file written by 'desomdb stack --out'")
@_friendly_errors
def plot(archive: Path, figure: str, out: Path, overwrite: bool, model_id: str | None,
         nodes: str | None, galaxy: str | None, stack_file: Path | None) -> None:
    """Draw one figure of the report, or stacked spectra.

    FIGURE is one of fig3_prototypes, fig4_templates, fig5_node_medians,
    fig6_node_pdfs, fig7_fingerprint, fig9_desom2, fig10_desom2_protos,
    fig14_morphology, training, accuracy, or stack (with --stack FILE).

    \b
    Example:
      desomdb plot /tmp/archive fig6_node_pdfs --nodes 3,17 --out node_pdfs.pdf
    """
    from desomdb.archive.outputs import output_file

    out = output_file(out, overwrite)
    if figure == "stack":
        from desomdb.products import stack_output

        if stack_file is None:
            raise ConfigError("FIGURE stack needs --stack FILE (written by 'desomdb stack "
                              "ARCHIVE --where ... --out FILE.parquet')")
        click.echo(f"wrote {stack_output.plot(stack_output.read(stack_file), out)}")
        return
    from desomdb.products import report as report_mod

    path = report_mod.plot(archive, figure, out, model_id, _node_list(nodes), galaxy)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--where", default="true", show_default=True,
              help="SQL condition over the baxel_labels view selecting the baxels")
@click.option("--by", type=click.Choice(["none", "node", "mangaid"]), default="none",
              show_default=True, help="one stack, or one per node or per galaxy")
@model_option("DESOM-1 model for 'node'")
@click.option("--out", type=click.Path(path_type=Path),
              help="write the stacks to a .parquet or .fits file")
@overwrite_option
@click.option("--no-fit", is_flag=True, help="skip the pPXF fit of each stack")
@click.option("--shift-velocity", is_flag=True,
              help="shift each member to its own stellar rest frame by its fitted vel "
                   "(members without a fit are left out)")
@_friendly_errors
def stack(archive: Path, where: str, by: str, model_id: str | None, out: Path | None,
          overwrite: bool, no_fit: bool, shift_velocity: bool) -> None:
    """Stack the spectra of a selection (inverse-variance weighted) and fit each stack.

    Each cube counts once (its newest release). Stacked: flux/norm_flux with weights
    ivar × norm_flux². Plot the result with 'desomdb plot ARCHIVE stack --stack FILE'.

    \b
    Example:
      desomdb stack /tmp/archive --where "node = 3" --by node --out node3.fits
      desomdb stack /tmp/archive --where "radius_re < 0.5 and chi2_ok" --by mangaid
    """
    from desomdb.archive.outputs import output_file
    from desomdb.products import stack as stack_mod
    from desomdb.products import stack_output
    from desomdb.science import label_catalogue

    if out is not None:
        out = output_file(out, overwrite)
    result = stack_mod.stack(archive, where=where, by=by, model_id=model_id, fit=not no_fit,
                             shift_velocity=shift_velocity)
    table = stack_output.to_table(result)
    cols = [c for c in (by, "n_members", "n_cubes", "mean_snr", "snr_stack", "z_eff",
                        *label_catalogue.STACK_LABELS, "chi2_red")
            if c in table.column_names]
    import polars as pl

    frame = pl.from_arrow(table.select(cols))
    with pl_config():
        click.echo(frame)
    left_out = (f"; {result.n_without_velocity} baxel(s) without a fitted vel left out"
                if result.n_without_velocity else "")
    click.echo(f"{len(result.stacks)} stack(s) in {result.seconds:.2f} s"
               f"{f', fitted in {result.fit_seconds:.1f} s' if not no_fit else ''}{left_out}",
               err=True)
    if "chi2_red" in table.column_names:
        from desomdb.science.fitsetup import CHI2_MAX

        key = by if by in table.column_names else None
        for i, chi2 in enumerate(table.column("chi2_red").to_pylist()):
            if chi2 is not None and chi2 >= CHI2_MAX:
                which = f"{by} {table.column(key)[i].as_py()}" if key else "the stack"
                click.echo(f"warning: {which}: chi2_red {chi2:.1f} >= {CHI2_MAX:g} (the "
                           "paper's cut): its fitted ages, [M/H] and dust are unreliable; the "
                           "members are unlike each other or the model misses them — narrow "
                           "--where, or plot it: 'desomdb plot ARCHIVE stack --stack FILE'",
                           err=True)
    if out is not None:
        click.echo(f"wrote {stack_output.write(result, archive, out)}")
