import pytest

from desomdb import runner
from desomdb.errors import DesomdbError, InputDataError


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise InputDataError("cube 3 is corrupt")
    if x == 4:
        raise ValueError("unexpected")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_recorded_and_the_rest_lands(workers: int) -> None:
    seen = []
    report = runner.run_tasks(_square_or_fail, list(range(6)), workers=workers, progress=False,
                              labels=[f"t{i}" for i in range(6)],
                              on_result=lambda i, r: seen.append(i))
    assert report.results == [0, 1, 4, None, None, 25]
    assert [f.label for f in report.failures] == ["t3", "t4"]
    assert report.failures[0].error == "cube 3 is corrupt"
    assert "ValueError" in report.failures[1].error and "Traceback" in report.failures[1].detail
    assert sorted(seen) == [0, 1, 2, 5]
    with pytest.raises(DesomdbError, match="2 task\\(s\\) failed:\n  t3: cube 3 is corrupt"):
        report.raise_if_failed("demo")


def test_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(DesomdbError, match="cannot reach the Dask scheduler"):
        runner.run_tasks(_square_or_fail, [1], scheduler="tcp://127.0.0.1:1", progress=False)
