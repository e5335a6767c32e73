"""Shared fixtures: small seeded mock surveys and an archive ingested from one of them.

Session-scoped fixtures are read-only for tests; a test that modifies files copies them.
"""

import gzip
import shutil
from pathlib import Path

import pytest

from desomdb import mock
from desomdb.pipeline import ingest
from desomdb.som import registry


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


@pytest.fixture(scope="session")
def labelled_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 19-fibre galaxies binned to S/N 40 (few baxels), ingested and labelled."""
    from desomdb.pipeline import labels

    out = tmp_path_factory.mktemp("lab")
    survey = mock.generate_survey(out / "survey", n_galaxies=2, release="DR15", seed=4,
                                  ifu_sizes=(19,), progress=False)
    job = ingest.IngestJob(release="DR15", cubes=str(survey.release_dir),
                           drpall=str(survey.drpall_path), workers=1,
                           config=ingest.IngestConfig(target_snr=40))
    ingest.ingest(out / "arch", job, progress=False)
    labels.label(out / "arch", workers=1, progress=False)
    return out / "arch"


TINY = {"iterations": 120, "decay_iters": 80, "pretrain_iters": 40, "eval_every": 40,
        "batch_size": 8, "map_rows": 4, "map_cols": 4, "patience": 50}


@pytest.fixture(scope="session")
def trained_archive(labelled_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the labelled archive with a tiny DESOM-1 trained, made current, assigned."""
    from desomdb.archive.store import Archive
    from desomdb.pipeline import assign, train
    from desomdb.som import model

    arch = tmp_path_factory.mktemp("trained") / "arch"
    shutil.copytree(labelled_archive, arch)
    cfg = model.compact_config(**TINY)
    model_id = train.train(arch, cfg, where="true", progress=False)
    registry.set_current_model(Archive(arch), model_id)
    assign.assign(arch, progress=False)
    return arch, model_id, cfg


@pytest.fixture(scope="session")
def full_archive(trained_archive):
    """The trained archive with fingerprints and a DESOM-2 as well."""
    from desomdb.pipeline import fingerprint

    arch, model_id, cfg = trained_archive
    d2 = fingerprint.build(arch, model_id, progress=False)
    return arch, model_id, cfg, d2


class ReaderLoop:
    """A reader thread querying an archive while a writer works (concurrency checks).

    It opens ``desomdb.connect`` again and again and counts ``tables``; every commit of the
    writer is recorded with the counts it leaves. Afterwards ``errors`` must be empty and
    every count a reader saw must be the count of some committed state (``check()``).
    """

    def __init__(self, root: Path, tables: tuple[str, ...]):
        self.root, self.tables = Path(root), tables
        self.errors: list[str] = []
        self.seen: dict[str, set[int]] = {t: set() for t in tables}
        self.committed: dict[str, set[int]] = {t: {0} for t in tables}

    def _counts(self) -> dict[str, int]:
        from desomdb.archive.store import Archive

        arch = Archive(self.root)
        return {t: arch.read(t, columns=[]).num_rows if arch.has_table(t) else 0
                for t in self.tables}

    def __enter__(self) -> "ReaderLoop":
        import threading

        import desomdb
        from desomdb.archive import writer

        self._real_commit = real = writer.Writer.commit
        loop = self

        def recording_commit(writer, add=(), remove=()):
            gen = real(writer, add, remove)
            for t, n in loop._counts().items():
                loop.committed[t].add(n)
            return gen

        writer.Writer.commit = recording_commit  # type: ignore[method-assign]
        for t, n in self._counts().items():
            self.committed[t].add(n)
        self._done = threading.Event()

        def read() -> None:
            while not self._done.is_set():
                try:
                    con = desomdb.connect(self.root)
                    names = {r[0] for r in con.sql("select view_name from duckdb_views()")
                             .fetchall()}
                    for t in self.tables:
                        if t in names:
                            self.seen[t].add(con.sql(f"select count(*) from {t}")
                                             .fetchall()[0][0])
                    con.close()
                except Exception as exc:  # any failure of a reader is the finding
                    self.errors.append(repr(exc))

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:

        self._done.set()
        self._thread.join()
        from desomdb.archive import writer

        writer.Writer.commit = self._real_commit  # type: ignore[method-assign]

    def check(self) -> None:
        assert not self.errors, self.errors[:3]
        for t in self.tables:
            assert self.seen[t] <= self.committed[t], (t, self.seen[t], self.committed[t])
