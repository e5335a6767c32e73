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


@pytest.mark.parametrize("path", [p for p, _ in _all_commands(main)], ids=" ".join)
def test_help_examples_keep_their_line_continuations(path: tuple[str, ...]) -> None:
    output = CliRunner().invoke(main, [*path, "--help"]).output
    example = output.split("Example")[1].split("Options:")[0].splitlines()[1:]
    for line, following in zip(example, [*example[1:], ""], strict=True):
        assert "   " not in line.strip(), f"a gap in {line!r}"  # a swallowed backslash-newline
        if line.endswith("\\"):
            assert following.startswith("      --"), (line, following)


@pytest.mark.parametrize("command", ["ingest", "refresh"])
def test_wrapped_examples_show_the_backslash(command: str) -> None:
    lines = CliRunner().invoke(main, [command, "--help"]).output.splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"desomdb {command}")]
    assert lines[i].endswith(" \\") and lines[i + 1].strip().startswith("--drpall ")


@pytest.mark.parametrize(("command", "options"), [
    ("label", ["--label-max-per-cube"]),
    ("refresh", ["--label-max-per-cube"]),
    ("demo", ["--label-max-per-cube", "--ifu-sizes", "--map-size"]),
    ("mock", ["--ifu-sizes"]),
])
def test_shared_options_have_the_same_names(command: str, options: list[str]) -> None:
    output = CliRunner().invoke(main, [command, "--help"]).output
    assert all(option in output for option in options)


def test_bad_ifu_sizes_are_refused_before_any_work(tmp_path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--ifu-sizes",
                                       "19,big"])
    assert result.exit_code != 0 and "--ifu-sizes takes comma-separated" in result.output
    assert not (tmp_path / "d").exists()


def test_label_takes_a_per_cube_limit(ingested, tmp_path) -> None:
    import shutil

    from desomdb.query import views

    archive, report = ingested
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    result = CliRunner().invoke(main, ["label", str(copy), "--workers", "1",
                                       "--label-max-per-cube", "1"])
    assert result.exit_code == 0, result.output
    per_cube = views.connect(copy).sql("select plateifu, count(*) from labels group by 1"
                                       ).fetchall()
    assert len(per_cube) == report.n_ingested and all(n == 1 for _, n in per_cube)


def test_light_commands_and_error_paths_do_not_import_torch(ingested) -> None:
    """Seen: 'desomdb status nope' took 6-7 s on a busy machine, importing torch to fail."""
    import subprocess
    import sys

    arch = str(ingested[0])
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from desomdb.cli import main\n"
        f"for args in (['--help'], ['status', '/nope'], ['status', {arch!r}],\n"
        f"             ['sql', '/nope', 'select 1'], ['sql', {arch!r}, 'select 1'],\n"
        "             ['check', '/nope'], ['label', '/nope']):\n"
        "    CliRunner().invoke(main, args)\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'astropy.cosmology')"
        " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tables_in_a_pipe_never_wrap_a_model_id(trained_archive) -> None:
    """Seen: tables printed to a pipe wrapped at ~80 columns, splitting model ids."""
    arch, model_id, _ = trained_archive
    result = CliRunner().invoke(main, ["sql", str(arch), "select * from node_summary limit 2"])
    assert result.exit_code == 0, result.output
    rows = [ln for ln in result.output.splitlines() if ln.startswith("│ desom1")]
    assert len(rows) == 2 and all(model_id in ln for ln in rows), result.output
