import click
import pytest
from click.testing import CliRunner

from desomdb import __version__
from desomdb.cli import main

CONTRACT = ["mock", "ingest", "label", "train", "assign", "predict", "refresh", "sql",
            "report", "status", "demo"]


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_the_contract_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in CONTRACT:
        assert name in result.output


@pytest.mark.parametrize("path", [p for p, _ in _all_commands(main)], ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "desomdb " + path[0] in result.output


def test_refresh_without_a_job_says_what_is_missing(tmp_path) -> None:
    result = CliRunner().invoke(main, ["refresh", str(tmp_path), "--release", "DR17"])
    assert result.exit_code != 0
    assert "--cubes" in result.output and "JOBFILE" in result.output
    assert "Traceback" not in result.output
