"""Per-spaxel sidecar tables aggregated into per-baxel rows (e.g. a mock survey's truth).

A sidecar is a Parquet file of per-spaxel values (``plateifu``, ``x``, ``y`` and any
columns) that describes, in its schema metadata under :data:`RULES_KEY`, how each output
column is aggregated over a bin's spaxels. Ingest applies those rules once the binning is
known; it needs to know nothing about what the columns mean or who wrote them. Rules (JSON,
output column -> ``[op, args...]``, in output order):

``["first", col]``                the first value (a per-galaxy constant)
``["count"]``                     number of spaxels
``["sum", col]`` / ``["mean", col]``
``["wmean", col, weight]``        Σ weight·col / Σ weight
``["wdispersion", sigma, vel, w]`` the dispersion of the weighted sum of Gaussians of
                                  dispersion ``sigma`` centred at ``vel``:
                                  sqrt(Σ w (σ² + v²) / Σ w − (Σ w v / Σ w)²)
``["log10_ratio", num, den]``     log10(Σ num / Σ den)
``["log10_ratio", num, den, f]``  the same, floored at 10**f
``["d_bpt", nii, ha, oiii, hb]``  distance from the Kauffmann et al. (2003) curve, from summed
                                  line fluxes (:func:`desomdb.science.emission.d_bpt`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from desomdb.atomic import read_parquet
from desomdb.errors import InputDataError
from desomdb.science import emission

RULES_KEY = b"desomdb.aggregate"


def read(path: str | Path) -> tuple[pl.DataFrame, dict[str, list[Any]]]:
    """Read a sidecar file and its aggregation rules.

    Raises
    ------
    InputDataError
        If the file cannot be read or carries no rules.
    """
    try:
        table = read_parquet(path)
    except OSError as exc:
        raise InputDataError(f"{path}: cannot read the per-spaxel table ({exc})") from exc
    meta = table.schema.metadata or {}
    if RULES_KEY not in meta:
        raise InputDataError(f"{path}: no '{RULES_KEY.decode()}' rules in its Parquet metadata; "
                             "write it with desomdb.science.sidecar.with_rules")
    rules = json.loads(meta[RULES_KEY])
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame, rules


def with_rules(table: Any, rules: dict[str, list[Any]]) -> Any:
    """Return the pyarrow ``table`` with ``rules`` stored in its schema metadata."""
    meta = dict(table.schema.metadata or {})
    meta[RULES_KEY] = json.dumps(rules).encode()
    return table.replace_schema_metadata(meta)


def aggregate(spaxels: pl.DataFrame, bin_map: pl.DataFrame,
              rules: dict[str, list[Any]]) -> pl.DataFrame:
    """Aggregate one cube's per-spaxel rows into one row per bin.

    Parameters
    ----------
    spaxels : polars.DataFrame
        One cube's sidecar rows (columns ``x``, ``y`` and those the rules name).
    bin_map : polars.DataFrame
        Columns ``x``, ``y``, ``bin_id`` (-1 = not binned).
    rules : dict
        Output column -> ``[op, args...]`` (see the module docstring).

    Returns
    -------
    polars.DataFrame
        ``bin_id`` (int32) and the rule columns in rule order, sorted by ``bin_id``.
    """
    joined = spaxels.join(bin_map.filter(pl.col("bin_id") >= 0), on=["x", "y"], how="inner")
    exprs: list[pl.Expr] = []
    post: dict[str, list[Any]] = {}
    summed: set[str] = set()
    for name, (op, *args) in rules.items():
        if op == "first":
            exprs.append(pl.col(args[0]).first().alias(name))
        elif op == "count":
            exprs.append(pl.len().alias(name))
        elif op == "sum":
            exprs.append(pl.col(args[0]).sum().alias(name))
        elif op == "mean":
            exprs.append(pl.col(args[0]).mean().alias(name))
        elif op == "wmean":
            col, w = pl.col(args[0]), pl.col(args[1])
            exprs.append(((w * col).sum() / w.sum()).alias(name))
        elif op == "wdispersion":
            sig, vel, w = (pl.col(a) for a in args[:3])
            mean_v = (w * vel).sum() / w.sum()
            second = (w * (sig**2 + vel**2)).sum() / w.sum()
            exprs.append((second - mean_v**2).clip(lower_bound=0.0).sqrt().alias(name))
        elif op in ("log10_ratio", "d_bpt"):
            for col in args[:4] if op == "d_bpt" else args[:2]:
                if col not in summed:
                    summed.add(col)
                    exprs.append(pl.col(col).sum().alias(f"__sum_{col}"))
            post[name] = [op, *args]
        else:
            raise InputDataError(f"unknown sidecar aggregation {op!r} for column {name!r}")
    agg = joined.group_by("bin_id").agg(exprs)
    derived = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, (op, *args) in post.items():
            s = {c: agg[f"__sum_{c}"].to_numpy().astype(np.float64)
                 for c in (args[:4] if op == "d_bpt" else args[:2])}
            if op == "log10_ratio":
                ratio = s[args[0]] / s[args[1]]
                if len(args) > 2:
                    ratio = np.maximum(ratio, 10.0 ** float(args[2]))
                values = np.log10(ratio)
            else:
                nii, ha, oiii, hb = (s[c] for c in args[:4])
                values = emission.d_bpt(np.log10(nii / ha), np.log10(oiii / hb))
            derived.append(pl.Series(name, values))
    out = agg.with_columns(derived).with_columns(pl.col("bin_id").cast(pl.Int32))
    return out.select("bin_id", *rules).sort("bin_id")
