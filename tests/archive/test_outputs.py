"""Output paths: never inside an archive, never over a file unasked (seen in probes)."""

import json

import pytest
from click.testing import CliRunner

from desomdb.archive.outputs import enclosing_archive, output_file, output_folder
from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import ConfigError


@pytest.fixture
def arch(tmp_path):
    a = Archive(tmp_path / "arch", create=True)
    (a.root / "baxels" / "release=DR15").mkdir(parents=True)
    return a


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_paths_inside_an_archive_are_found_through_links(arch, tmp_path) -> None:
    assert enclosing_archive(arch.root / "baxels" / "release=DR15" / "x.parquet") == arch.root
    assert enclosing_archive(arch.root) == arch.root
    assert enclosing_archive(tmp_path / "elsewhere" / "x.csv") is None
    link = tmp_path / "link"
    link.symlink_to(arch.root / "baxels")
    assert enclosing_archive(link / "x.csv") == arch.root


def test_sql_output_over_the_manifest_is_refused(arch) -> None:
    """Seen: 'sql ... --output ARCH/_manifest.json' overwrote the manifest, exit 0."""
    manifest = arch.root / "_manifest.json"
    before = manifest.read_bytes()
    result = _run("sql", arch.root, "select 1 a", "--format", "csv", "--output", manifest,
                  "--overwrite")
    assert result.exit_code != 0 and "inside the archive" in result.output
    assert manifest.read_bytes() == before
    json.loads(manifest.read_text())


@pytest.mark.parametrize("args", [
    ("sql", "{arch}", "select 1 a", "--format", "csv", "--output", "{target}"),
    ("maps", "{arch}", "1-1", "--out", "{target}"),
    ("stack", "{arch}", "--out", "{target}"),
    ("plot", "{arch}", "training", "--out", "{target}"),
    ("predict", "{arch}", "spectra.fits", "--output", "{target}"),
])
def test_every_file_output_refuses_a_committed_file(arch, args) -> None:
    """Seen: 'sql --output' or 'maps --out' on a committed Parquet file replaced it."""
    target = arch.root / "baxels" / "release=DR15" / "part-1-1-abc.parquet"
    target.write_bytes(b"committed")
    argv = [a.format(arch=arch.root, target=target) for a in args]
    result = _run(*argv, "--overwrite")
    assert result.exit_code != 0 and "inside the archive" in result.output, result.output
    assert target.read_bytes() == b"committed"


def test_an_existing_file_is_replaced_only_with_overwrite(arch, tmp_path) -> None:
    """Seen: 'sql --output' replaced a user's file without asking."""
    mine = tmp_path / "mine.csv"
    mine.write_text("precious")
    result = _run("sql", arch.root, "select 1 a", "--format", "csv", "--output", mine)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert mine.read_text() == "precious"
    assert output_file(mine, overwrite=True) == mine


def test_export_hats_never_replaces_an_archive_or_a_foreign_folder(arch, tmp_path) -> None:
    """Seen: 'export-hats ARCH ARCH --overwrite' deleted the archive; --overwrite wiped
    unrelated files in the target folder."""
    pytest.importorskip("hats_import")
    before = sorted(p.name for p in arch.root.iterdir())
    result = _run("export-hats", arch.root, arch.root, "--overwrite")
    assert result.exit_code != 0 and "inside the archive" in result.output
    assert sorted(p.name for p in arch.root.iterdir()) == before
    other = tmp_path / "papers"
    other.mkdir()
    (other / "draft.tex").write_text("x")
    result = _run("export-hats", arch.root, other, "--overwrite")
    assert result.exit_code != 0 and "did not write" in result.output
    assert (other / "draft.tex").read_text() == "x"


def test_a_folder_output_is_replaced_only_if_the_command_wrote_it(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "properties").write_text("hats")
    with pytest.raises(ConfigError, match="--overwrite"):
        output_folder(out)
    with pytest.raises(ConfigError, match="did not write"):
        output_folder(out, overwrite=True)
    assert output_folder(out, overwrite=True, wrote_it=lambda p: True) == out
    assert output_folder(tmp_path / "new") == tmp_path / "new"


def test_demo_and_mock_refuse_an_archive_folder(arch) -> None:
    for args in (("demo", "--out", arch.root / "demo"), ("mock", arch.root / "survey")):
        result = _run(*args)
        assert result.exit_code != 0 and "inside the archive" in result.output
        assert not (arch.root / "demo").exists() and not (arch.root / "survey").exists()
