"""The label catalogue: every per-baxel label defined once.

Each :class:`Label` says what a label column is (its unit as an astropy unit string, as
``sql/schema.yml`` documents it), how it is shown (the axis text of figures and pages), how
node labels bin it (fixed histogram edges, so node PDFs compare), which quality flag a value
needs besides ``chi2_ok`` (the paper's cuts), which column of a mock survey's ``truth``
table it is compared with, and whether ``desomdb calibrate`` models its error (so node
labels carry a calibrated ``lo68``/``hi68``).

Every list of labels elsewhere (node labels, calibration, maps, stacks, the report, the
explorer, the CLI) is derived from :data:`LABELS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    """One per-baxel label of the fits.

    Attributes
    ----------
    column : str
        Column in ``labels`` / ``baxel_labels``.
    unit : str or None
        Astropy unit string (``sql/schema.yml``); None for a dimensionless number.
    display : str
        Axis text with the unit, e.g. ``"age [Gyr]"``.
    edges : tuple of (float, float, int) or None
        ``(lo, hi, n_bins)`` of the node-label histogram (values clipped into range); None
        for a column that gets no node PDF.
    flag : str or None
        Boolean column a value needs besides ``chi2_ok`` (None: ``chi2_ok`` alone).
    truth : str or None
        Column of a mock survey's ``truth`` table holding the same quantity.
    calibrated : bool
        Whether ``desomdb calibrate`` models its error (``label_errors``), giving node labels
        and predictions a calibrated ``lo68``/``hi68``.
    accuracy_where : str or None
        Extra SQL condition (aliases ``l`` = labels, ``t`` = truth) on the baxels the report
        and the label benchmark compare with the truth; None: not compared.
    """

    column: str
    unit: str | None
    display: str
    edges: tuple[float, float, int] | None
    flag: str | None = None
    truth: str | None = None
    calibrated: bool = True
    accuracy_where: str | None = None


#: The labels, in display order.
LABELS: tuple[Label, ...] = (
    Label("age_mw_gyr", "Gyr", "age [Gyr]", (0.0, 14.0, 28), truth="age_mw_gyr",
          accuracy_where="l.chi2_ok"),
    Label("mh_mw", "dex", "[M/H] [dex]", (-0.8, 0.3, 22), truth="mh_mw",
          accuracy_where="l.chi2_ok"),
    Label("log_age_lw", "dex(yr)", "log age_L [yr]", (7.5, 10.3, 28), truth="log_age_lw",
          accuracy_where="l.chi2_ok"),
    Label("mh_lw", "dex", "[M/H]_L [dex]", (-0.8, 0.3, 22), truth="mh_lw",
          accuracy_where="l.chi2_ok"),
    Label("log_ml_r", "dex(solMass / solLum)", "log M*/L_r [dex]", (-1.0, 1.5, 25),
          truth="log_ml_r", accuracy_where="l.chi2_ok"),
    Label("ebv_star", "mag", "E(B−V)_* [mag]", (0.0, 1.0, 20), truth="ebv_star",
          accuracy_where="l.chi2_ok"),
    Label("ebv_gas", "mag", "E(B−V)_gas [mag]", (-0.5, 1.5, 20), flag="ssfr_ok",
          truth="ebv_gas", accuracy_where="l.ssfr_ok"),
    # sSFR from Hα only where the truth is star-forming: Hα from AGN/LI(N)ER-like gas is not
    # star formation.
    Label("log_ssfr", "dex(1 / yr)", "log sSFR [yr⁻¹]", (-14.0, -8.0, 24), flag="ssfr_ok",
          truth="log_ssfr", accuracy_where="l.ssfr_ok and t.d_bpt < 0 and t.log_ssfr > -13"),
    Label("d_bpt", "dex", "d_BPT [dex]", (-1.0, 1.5, 25), flag="bpt_ok", truth="d_bpt",
          accuracy_where="l.bpt_ok"),
    Label("vel", "km / s", "v_* [km/s]", None, calibrated=False),
    Label("sigma", "km / s", "σ_* [km/s]", (0.0, 400.0, 20), truth="sigma_bin_kms"),
)

#: Fitted members (passing a label's cuts) a node needs before the map labels its unfitted
#: members (``baxel_estimates``: "too few fitted members" below it), and that a labelling
#: plan gives every populated node first (:mod:`desomdb.pipeline.label_plan`).
MIN_NODE_MEMBERS = 3

BY_COLUMN: dict[str, Label] = {lab.column: lab for lab in LABELS}

#: Labels that get node PDFs and calibrated intervals (``node_labels``), in order.
NODE_LABELS: tuple[str, ...] = tuple(lab.column for lab in LABELS if lab.edges is not None)
#: Histogram edges of each node label.
EDGES: dict[str, tuple[float, float, int]] = {
    lab.column: lab.edges for lab in LABELS if lab.edges is not None}
#: Node labels that need a flag besides ``chi2_ok``, and the flag.
CUTS: dict[str, str] = {
    lab.column: lab.flag for lab in LABELS if lab.edges is not None and lab.flag is not None}
#: Labels whose error ``desomdb calibrate`` models.
CALIBRATED: tuple[str, ...] = tuple(lab.column for lab in LABELS if lab.calibrated)
#: Truth column of each label a mock survey's truth holds.
TRUTH_COLUMNS: dict[str, str] = {lab.column: lab.truth for lab in LABELS if lab.truth}
#: Labels compared with the mock truth, and the selection of each.
ACCURACY: dict[str, str] = {
    lab.column: lab.accuracy_where for lab in LABELS if lab.accuracy_where is not None}
#: The labels of the paper's node figures (medians and PDFs), with their axis text.
FIGURE_LABELS: dict[str, str] = {
    c: BY_COLUMN[c].display
    for c in ("age_mw_gyr", "mh_mw", "log_ml_r", "ebv_star", "log_ssfr", "d_bpt")}
#: Labels compared with the truth, with their axis text.
ACCURACY_DISPLAY: dict[str, str] = {c: BY_COLUMN[c].display for c in ACCURACY}
#: Stellar-population labels a stack's summary shows (the fit's, not a node's).
STACK_LABELS: tuple[str, ...] = ("age_mw_gyr", "mh_mw", "log_ml_r", "ebv_star", "ebv_gas")
