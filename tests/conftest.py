"""Shared fixtures: small seeded mock surveys and an archive ingested from one of them.

Session-scoped fixtures are read-only for tests; a test that modifies files copies them.
"""

import gzip
import shutil
from pathlib import Path

import pytest

from desomdb import ingest, mock


@pytest.fixture(scope="session")
def mock_survey(tmp_path_factory: pytest.TempPathFactory) -> mock.SurveyResult:
    out = tmp_path_factory.mktemp("survey")
    return mock.generate_survey(out, n_galaxies=2, release="DR15", seed=7, ifu_sizes=(19,),
                                progress=False)


@pytest.fixture(scope="session")
def mock_cube_paths(mock_survey: mock.SurveyResult) -> list[Path]:
    return sorted(mock_survey.release_dir.glob("*/stack/*-LOGCUBE.fits.gz"))


@pytest.fixture(scope="session")
def ingest_survey(tmp_path_factory: pytest.TempPathFactory) -> mock.SurveyResult:
    """Three galaxies, 19- and 37-fibre IFUs; one cube stored as plain .fits."""
    out = tmp_path_factory.mktemp("survey_ingest")
    result = mock.generate_survey(out, n_galaxies=3, release="DR15", seed=21,
                                  ifu_sizes=(19, 37), progress=False)
    first = sorted(result.release_dir.glob("*/stack/*-LOGCUBE.fits.gz"))[0]
    with gzip.open(first, "rb") as src, first.with_suffix("").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    first.unlink()
    return result


def make_job(survey: mock.SurveyResult, cubes: Path | None = None, **kw) -> ingest.IngestJob:
    return ingest.IngestJob(release="DR15", cubes=str(cubes or survey.release_dir),
                            drpall=str(survey.drpall_path), workers=kw.pop("workers", 1),
                            cubes_per_task=kw.pop("cubes_per_task", 1), **kw)


@pytest.fixture(scope="session")
def ingested(tmp_path_factory: pytest.TempPathFactory, ingest_survey: mock.SurveyResult):
    archive = tmp_path_factory.mktemp("archive") / "arch"
    report = ingest.ingest(archive, make_job(ingest_survey), progress=False)
    return archive, report
