"""Which SQL a reader may run, and the sandbox every query connection runs in.

Two layers keep the read paths (``desomdb sql``, :func:`desomdb.connect`, the intake catalog,
the report) from changing the archive:

1. :func:`check_read_only` accepts exactly one statement, parsed by DuckDB itself: a SELECT
   (``with``, ``from``-first, ``describe``, ``show``, ``summarize`` and ``values`` parse as
   SELECT) or an EXPLAIN [ANALYZE] of one. Looking at the first keyword is not enough: a
   second statement after ``;`` would run too, and DuckDB 2 parses data-modifying CTEs
   (``with x as (copy ... to 'file') select 1``) as SELECT, so the parsed tree is walked for
   COPY/INSERT/UPDATE/DELETE nodes as well, and for the functions that run SQL text
   (``query``, ``json_execute_serialized_sql``), whose insides the tree does not show.
2. :func:`sandbox` limits the connection's file access to the archive folder, disables
   extensions, ATTACH and outside files, and locks the configuration so that no later ``SET``
   undoes it. Inside the archive folder DuckDB could still write, which is why layer 1 is
   needed for every query.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

from desomdb.errors import QueryError

# Query-node types of a parsed SELECT that only read. DuckDB serialises a data-modifying CTE
# as COPY_QUERY_NODE, INSERT_QUERY_NODE, ...; any node type not listed here is refused.
READ_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})

# Functions that run SQL given as text, which the parsed tree cannot look into: through them
# a SELECT could run a COPY (``select * from json_execute_serialized_sql(...)`` does).
SQL_RUNNERS = frozenset({"query", "json_execute_serialized_sql"})

REFUSED = "the archive is changed only by desomdb commands"

_parser_lock = threading.Lock()
_parser_con: duckdb.DuckDBPyConnection | None = None


def _parser() -> duckdb.DuckDBPyConnection:
    # A private in-memory connection that only parses (never runs user SQL), so the check
    # neither depends on nor disturbs duckdb's default connection.
    global _parser_con
    if _parser_con is None:
        _parser_con = duckdb.connect(":memory:")
    return _parser_con


def check_read_only(query: str) -> str:
    """Return ``query`` if it is exactly one read-only statement; raise otherwise.

    Parameters
    ----------
    query : str
        SQL text as a user typed it (comments, any case, trailing ``;`` allowed).

    Returns
    -------
    str
        ``query`` unchanged, ready to run.

    Raises
    ------
    QueryError
        If the text is not valid SQL (DuckDB's parser message is quoted), holds no statement
        or more than one, or its statement is not a SELECT or an EXPLAIN [ANALYZE] of one.
    """
    statements = _parse(query)
    if not statements:
        raise QueryError("empty query; give one SELECT statement")
    if len(statements) > 1:
        kinds = "; ".join(_first_keyword(s.query) for s in statements)
        raise QueryError(f"only one statement per query is allowed (got {len(statements)}: "
                         f"{kinds}); {REFUSED}")
    statement = statements[0]
    if statement.type == duckdb.StatementType.SELECT:
        _check_select(statement.query)
    elif statement.type == duckdb.StatementType.EXPLAIN:
        explained = _explained_select(statement.query)
        if explained is None:
            raise QueryError("only read-only queries are allowed (EXPLAIN of something other "
                             f"than a SELECT); {REFUSED}")
        _check_select(explained)
    elif statement.type == duckdb.StatementType.MULTI:
        raise QueryError(f"only plain read-only queries are allowed (got "
                         f"{_first_keyword(statement.query)} with a part, such as PIVOT, that "
                         f"DuckDB runs as several statements); {REFUSED}")
    else:
        raise QueryError(f"only read-only queries are allowed (got "
                         f"{_first_keyword(statement.query)}); {REFUSED}")
    return query


def _parse(query: str) -> list[Any]:
    with _parser_lock:
        try:
            return list(_parser().extract_statements(query))
        except duckdb.ParserException as exc:
            raise QueryError(syntax_error_message(exc)) from exc


def syntax_error_message(exc: duckdb.Error) -> str:
    """One line from DuckDB's parser error: its message and the ``LINE n:`` context."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    message = lines[0].removeprefix("Parser Error:").strip() if lines else type(exc).__name__
    context = next((ln for ln in lines[1:] if ln.startswith("LINE ")), None)
    return f"SQL syntax error: {message}" + (f" ({context})" if context else "")


def _check_select(text: str) -> None:
    with _parser_lock:
        out = _parser().execute("select json_serialize_sql(?)", [text]).fetchall()[0][0]
    tree = json.loads(out)
    if tree.get("error"):
        # e.g. a PIVOT subquery, which DuckDB cannot serialise: refuse rather than guess
        raise QueryError(f"cannot check this query ({tree.get('error_message')}); only plain "
                         f"SELECT queries are allowed; {REFUSED}")
    writes = sorted({t for t in _values(tree, "type") if t.endswith("_NODE")} - READ_NODES)
    if writes:
        kinds = ", ".join(t.removesuffix("_NODE").removesuffix("_QUERY") for t in writes)
        raise QueryError(f"only read-only queries are allowed (a SELECT containing {kinds}); "
                         f"{REFUSED}")
    runners = sorted({f.lower() for f in _values(tree, "function_name")} & SQL_RUNNERS)
    if runners:
        raise QueryError(f"{', '.join(runners)}() runs SQL given as text, which cannot be "
                         f"checked; write the query itself; {REFUSED}")


def _values(tree: Any, name: str) -> Iterator[str]:
    """Every string under key ``name`` in a ``json_serialize_sql`` tree (any depth)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name and isinstance(value, str):
                yield value
            else:
                yield from _values(value, name)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values(value, name)


def _tokens(text: str) -> list[tuple[int, str, Any]]:
    """DuckDB's tokens of ``text`` as (start, text, kind), comments left out."""
    found = duckdb.tokenize(text)
    ends = [pos for pos, _ in found[1:]] + [len(text)]
    return [(pos, text[pos:end].strip(), kind) for (pos, kind), end in zip(found, ends, strict=True)
            if kind != duckdb.token_type.comment]


def _explained_select(text: str) -> str | None:
    """Return the SELECT an EXPLAIN [ANALYZE] [(options)] wraps (None if not one)."""
    tokens = _tokens(text)[1:]  # the first is EXPLAIN
    if tokens and tokens[0][1].lower() in {"analyze", "analyse"}:
        tokens = tokens[1:]
    if not tokens:
        return None
    candidates = [text[tokens[0][0]:]]
    if tokens[0][1].startswith("("):
        # "explain (format json) select ...": the options end where the parenthesis depth,
        # counted over operator tokens only (not strings or comments), returns to zero
        depth = 0
        for pos, word, kind in tokens:
            if kind != duckdb.token_type.operator:
                continue
            for offset, char in enumerate(word):
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0:
                    candidates.append(text[pos + offset + 1:])
                    break
            if depth == 0:
                break
    for candidate in candidates:
        try:
            inner = _parse(candidate)
        except QueryError:
            continue
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return str(inner[0].query)
    return None


def _first_keyword(text: str) -> str:
    tokens = _tokens(text)
    return tokens[0][1].rstrip(";").upper() if tokens else "nothing"


def sandbox(con: duckdb.DuckDBPyConnection, allowed: Sequence[str | Path]) -> None:
    """Confine ``con`` to the folders ``allowed`` and lock its configuration.

    Run it after the views are created. Afterwards files outside ``allowed`` (and DuckDB's
    temporary folder) cannot be read or written, extensions cannot be installed or loaded,
    databases cannot be attached, Python objects are not found by name (replacement scans;
    ``con.register(name, df)`` still works), and ``SET``/``RESET``/``PRAGMA`` of a setting
    fails. The three settings are applied one after the other (DuckDB 2.0.1 rejects them
    together in ``duckdb.connect(config=...)``).

    Parameters
    ----------
    con : duckdb.DuckDBPyConnection
    allowed : sequence of str or Path
        Folders (absolute) whose files queries may read, e.g. the archive root.
    """
    con.execute("set allowed_directories = ?", [[str(Path(p)) for p in allowed]])
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")
