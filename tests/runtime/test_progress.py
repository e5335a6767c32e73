import io

from desomdb.runtime import progress, runner


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_sparse_milestones() -> None:
    log = io.StringIO()
    bar = progress.progress_bar(1000, "train desom1-x", file=log)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(rec=f"{1 / (i + 1):.3g}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert 5 <= len(lines) <= 11, lines  # every ~10 %, one line each, not one per step
    assert "\r" not in log.getvalue()
    assert lines[-1].startswith("train desom1-x: 1000/1000 it (100 %)") and "rec=0.001" in lines[-1]


def test_a_log_gets_a_line_every_so_often_on_slow_work() -> None:
    log = io.StringIO()
    bar = progress.Milestones(10_000, "ingest DR15", unit="cube", file=log, every_s=0.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("ingest DR15: 3/10000 cube (0 %)")
    assert len(log.getvalue().splitlines()) == 3


def test_a_terminal_gets_a_tqdm_bar_and_a_log_milestones() -> None:
    term = _Terminal()
    with progress.progress_bar(3, "assign", unit="cube", file=term) as bar:
        for _ in range(3):
            bar.update(1)
    assert "3/3" in term.getvalue() and "\r" in term.getvalue()
    log = io.StringIO()
    with progress.progress_bar(4, "assign", file=log) as bar:
        for _ in range(4):
            bar.update(1)
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines()[-1].startswith("assign: 4/4 it (100 %)")


def test_no_work_or_no_progress_prints_nothing(capsys) -> None:
    log = io.StringIO()
    progress.progress_bar(0, "pPXF labels (cubes)", unit="task", file=log).close()
    progress.progress_bar(5, "off", enabled=False, file=log).close()
    assert log.getvalue() == ""
    report = runner.run_tasks(abs, [], desc="pPXF labels (cubes)")  # refresh with nothing new
    assert report.results == []
    assert "0task" not in capsys.readouterr().err
