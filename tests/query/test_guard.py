"""Read paths cannot write: the statement guard, the sandbox, and the guarded connect()."""

import hashlib
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.cli import main
from desomdb.errors import QueryError
from desomdb.query import views
from desomdb.query.guard import check_read_only, sandbox

READ_ONLY = [
    "select 1",
    "SeLeCt 1;",
    "with a as (select 1 as x) select * from a",
    "from range(3)",
    "describe select 1",
    "summarize select 1",
    "show tables",
    "explain select 1",
    "EXPLAIN ANALYZE select 1",
    "/* c */ explain /* d */ analyze (select 1)",
    "explain (format json) select 1",
    "select 'copy (select 1) to x' as s -- ; copy (select 1) to 'x.csv'",
]

REFUSED = [
    ("select 1; copy (select 1) to 'x.csv'", "one statement"),
    ("/* c */ select 1; copy (select 1) to 'x.csv'", "one statement"),
    ("-- x\n copy (select 1) to 'x.csv'", "got COPY"),
    ("CoPy (select 1) to 'x.csv'", "got COPY"),
    ("attach 'x.db'", "got ATTACH"),
    ("export database 'x'", "got EXPORT"),
    ("install httpfs", "got INSTALL"),
    ("load httpfs", "got LOAD"),
    ("set threads = 1", "got SET"),
    ("pragma version", "got PRAGMA"),
    ("call pragma_version()", "got CALL"),
    ("with x as (copy (select 1) to 'x.csv') select 1", "containing COPY"),
    ("select (with d as (delete from t returning 1) select count(*) from d)", "containing DELETE"),
    ("explain copy (select 1) to 'x.csv'", "EXPLAIN of"),
    ("explain analyze copy (select 1) to 'x.csv'", "EXPLAIN of"),
    ("explain (format json) copy (select 1) to 'x.csv'", "EXPLAIN of"),
    ("select * from json_execute_serialized_sql('{}')", "runs SQL given as text"),
    ("select * from main.QUERY('select 1')", "runs SQL given as text"),
    ("  ;  ", "empty query"),
]


@pytest.mark.parametrize("query", READ_ONLY)
def test_read_only_statements_pass(query: str) -> None:
    assert check_read_only(query) == query


@pytest.mark.parametrize(("query", "reason"), REFUSED)
def test_anything_else_is_refused_in_one_line(query: str, reason: str) -> None:
    with pytest.raises(QueryError, match=reason) as info:
        check_read_only(query)
    assert "\n" not in str(info.value)


def test_syntax_error_quotes_the_parser() -> None:
    with pytest.raises(QueryError) as info:
        check_read_only("selec * from cubes")
    assert str(info.value) == ('SQL syntax error: syntax error at or near "selec" '
                               "(LINE 1: selec * from cubes)")


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def archive_copy(ingested, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the shared ingested archive (probes may damage it) and its checksums."""
    root = tmp_path_factory.mktemp("guard") / "arch"
    shutil.copytree(ingested[0], root)
    return root, _checksums(root)


def _probes(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (query, why refused): each one ran, and most changed the archive, before #16."""
    committed = Archive(root).files("baxels")[0]
    empty = f"copy (select * from baxels limit 0) to '{committed}' (format parquet)"
    # runs in a context of its own, without the views' variables: a constant row, then
    garbage = f"copy (select 1 as x) to '{committed}' (format parquet)"
    as_text = garbage.replace("'", "''")  # quoted once, for a string literal
    as_text2 = as_text.replace("'", "''")  # twice, for a literal inside a literal
    return {
        "copy_after_select": (f"select 1; {empty}", "one statement"),
        "copy_to_manifest": (f"select 1; copy (select 1 as x) to '{root / paths.MANIFEST}' "
                             "(format json)", "one statement"),
        "attach": (f"select 1; attach '{root / 'evil.db'}' as evil", "one statement"),
        "export_database": (f"select 1; export database '{root / 'export'}'", "one statement"),
        "install": ("select 1; install httpfs", "one statement"),
        "load": ("select 1; load json", "one statement"),
        "set": ("select 1; set threads = 1", "one statement"),
        "pragma": ("select 1; pragma threads = 1", "one statement"),
        "block_comment": (f"/* note */ select 1; copy (select 1 as x) to '{root / 'x.csv'}'",
                          "one statement"),
        "line_comment": (f"-- x\n {empty}", "got COPY"),
        "mixed_case": ("SeLeCt 1; CoPy (select * from baxels limit 0) To "
                       f"'{committed}' (FoRmAt parquet)", "one statement"),
        "copy_in_cte": (f"with x as ({empty}) select 1", "a SELECT containing COPY"),
        "explain_analyze_copy": (f"explain analyze {empty}", "EXPLAIN of"),
        "serialized_sql": ("select * from json_execute_serialized_sql(json_serialize_sql("
                           f"'with x as ({as_text}) select 1'))", "json_execute_serialized_sql()"),
        "query_function": ("select * from query('select * from json_execute_serialized_sql("
                           f"json_serialize_sql(''with x as ({as_text2}) "
                           "select 1''))')", "query()"),
    }


PROBES = ["copy_after_select", "copy_to_manifest", "attach", "export_database", "install", "load",
          "set", "pragma", "block_comment", "line_comment", "mixed_case", "copy_in_cte",
          "explain_analyze_copy", "serialized_sql", "query_function"]


@pytest.mark.parametrize("name", PROBES)
def test_cli_sql_probe_leaves_the_archive_byte_identical(archive_copy, name: str) -> None:
    root, before = archive_copy
    probes = _probes(root)
    assert sorted(probes) == sorted(PROBES)
    probe, reason = probes[name]
    result = CliRunner().invoke(main, ["sql", "--", str(root), probe])  # "--": line_comment
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("desomdb: error: "), result.output
    assert reason in lines[0] and "the archive is changed only by desomdb commands" in lines[0]
    assert "Traceback" not in result.output
    assert _checksums(root) == before


def test_cli_sql_comments_before_a_select_are_fine(archive_copy) -> None:
    root, _ = archive_copy
    for query in ("/* note */ select count(*) as n from baxels",
                  "-- note\nSELECT count(*) AS n FROM baxels"):
        result = CliRunner().invoke(main, ["sql", "--", str(root), query])
        assert result.exit_code == 0, result.output


def test_cli_sql_reads_no_file_outside_the_archive(archive_copy) -> None:
    root, _ = archive_copy
    result = CliRunner().invoke(main, ["sql", str(root), "select * from read_csv('/etc/passwd')"])
    assert result.exit_code != 0 and "root:" not in result.output
    assert result.output.startswith("desomdb: error: ") and "/etc/passwd" in result.output


def test_cli_sql_explain_of_a_select_runs(archive_copy) -> None:
    root, _ = archive_copy
    for query in ("explain select count(*) from baxels",
                  "explain analyze select count(*) from baxels"):
        result = CliRunner().invoke(main, ["sql", str(root), query])
        assert result.exit_code == 0, result.output
        assert "plan" in result.output


def test_cli_sql_syntax_error_says_so(archive_copy) -> None:
    root, _ = archive_copy
    result = CliRunner().invoke(main, ["sql", str(root), "selec * from cubes"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith('desomdb: error: SQL syntax error: syntax error at or near '
                                    '"selec"')


def test_cli_sql_unknown_model_is_an_error(archive_copy) -> None:
    root, _ = archive_copy
    result = CliRunner().invoke(main, ["sql", str(root), "select count(node) from baxel_labels",
                                       "--model", "desom1-typo"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"desomdb: error: {root.resolve()}: model 'desom1-typo' is not registered; "
        "registered: none (see 'desomdb model list')"]


def test_connect_is_guarded_and_sandboxed_by_default(archive_copy) -> None:
    root, before = archive_copy
    committed = Archive(root).files("baxels")[0]
    with views.connect(root) as con:
        assert isinstance(con, views.ReadOnlyConnection)
        n = con.execute("select count(*) from baxels").fetchall()[0][0]
        assert n > 0 and con.sql("select count(*) as n from baxels").pl()["n"][0] == n
        assert con.query("select count(*) from baxels where release = ?",
                         params=["DR15"]).fetchall() == [(n,)]
        with pytest.raises(QueryError, match="one statement"):
            con.sql(f"select 1; copy (select * from baxels limit 0) to '{committed}'")
        with pytest.raises(QueryError, match="got SET"):
            con.execute("set enable_external_access = true")
        with pytest.raises(duckdb.PermissionException):
            con.sql("select * from read_csv('/etc/passwd')")
        df = pl.DataFrame({"x": [1, 2]})
        with pytest.raises(duckdb.CatalogException):
            con.sql("select * from df")  # no replacement scans in the sandbox ...
        assert con.register("mine", df).sql("select sum(x) from mine").fetchall() == [(3,)]
        with pytest.raises(AttributeError, match="raw=True"):
            con.install_extension("httpfs")
    raw = views.connect(root, raw=True)
    assert isinstance(raw, duckdb.DuckDBPyConnection)
    raw.execute("set threads = 1")  # the plain connection: unguarded, not sandboxed
    assert raw.sql("select sum(x) from df").fetchall() == [(3,)]  # ... but outside it, yes
    assert raw.sql("select count(*) from baxels").fetchall() == [(n,)]
    raw.close()
    assert _checksums(root) == before


def test_query_helper_translates_sandbox_refusals(archive_copy) -> None:
    root, _ = archive_copy
    con = views.connect(root)
    with pytest.raises(QueryError, match="/etc/passwd"):
        views.query(con, "select * from read_text('/etc/passwd')")


def test_sandbox_confines_files_extensions_attach_and_settings(tmp_path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    con = duckdb.connect(":memory:")
    for folder in (inside, outside):
        con.execute(f"copy (select 1 as x) to '{folder / 'a.parquet'}'")
    con.execute(f"create view v as select * from read_parquet('{inside / 'a.parquet'}')")
    sandbox(con, [inside])
    assert con.sql("select * from v").fetchall() == [(1,)]  # views over the archive still work
    for statement in (f"select * from read_parquet('{outside / 'a.parquet'}')",
                      "select * from read_csv('/etc/passwd')",
                      f"copy (select 1) to '{outside / 'b.csv'}'",
                      f"attach '{outside / 'x.db'}' as x",
                      "install httpfs",
                      "load httpfs"):
        with pytest.raises(duckdb.Error, match="disabled"):
            con.execute(statement)
    for statement in ("set enable_external_access = true", "set allowed_directories = ['/']",
                      "reset lock_configuration", "pragma threads = 1"):
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(statement)
    assert sorted(p.name for p in outside.iterdir()) == ["a.parquet"]
