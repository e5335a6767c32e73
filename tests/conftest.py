"""Shared fixtures: one small seeded mock survey that many tests read (never write)."""

from pathlib import Path

import pytest

from desomdb import mock


@pytest.fixture(scope="session")
def mock_survey(tmp_path_factory: pytest.TempPathFactory) -> mock.SurveyResult:
    out = tmp_path_factory.mktemp("survey")
    return mock.generate_survey(out, n_galaxies=2, release="DR15", seed=7, ifu_sizes=(19,),
                                progress=False)


@pytest.fixture(scope="session")
def mock_cube_paths(mock_survey: mock.SurveyResult) -> list[Path]:
    return sorted(mock_survey.release_dir.glob("*/stack/*-LOGCUBE.fits.gz"))
