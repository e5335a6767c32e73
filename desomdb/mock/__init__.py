"""The mock survey: DRP-format cubes, a drpall table and per-spaxel truth from real SSPs.

Tests, docs, the demo and benchmarks use it; the pipeline never imports it (it reads what the
mock writes like any other survey, and aggregates the truth through :mod:`desomdb.science.sidecar`).
"""

from desomdb.mock.render import render_cube, write_cube
from desomdb.mock.survey import SurveyResult, generate_survey

__all__ = ["SurveyResult", "generate_survey", "render_cube", "write_cube"]
