"""Write the docs' generated reference pages before Sphinx reads the sources.

``_generated/jobfile-keys.md`` (from :func:`desomdb.pipeline.jobs.reference`),
``_generated/views.md`` (from ``sql/schema.yml`` through :mod:`desomdb.query.schema`) and
``_generated/sql-examples.md`` (the explorer's example queries) are included by
``jobfiles.md`` and ``sql.md``; the folder is not committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def jobfile_keys() -> str:
    """Return the job-file keys as Markdown tables, one per section."""
    from desomdb.pipeline import jobs

    out: list[str] = []
    section = None
    for sec, key, kind, default, unit, about in jobs.reference():
        if sec != section:
            section = sec
            out += ["", f"### `[{sec}]`", "", "| key | type | default | unit | meaning |",
                    "|---|---|---|---|---|"]
        out.append(f"| `{key}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(unit)} | "
                   f"{_cell(about)} |")
    return "\n".join(out).lstrip() + "\n"


def views_reference() -> str:
    """Return every public view and table macro with its columns, units and meanings."""
    from desomdb.web.pages import view_catalogue  # what the explorer's SQL page lists

    out: list[str] = []
    for v in view_catalogue():
        out += ["", f"### `{v.name}` ({'table macro' if v.macro else 'view'})", "",
                _cell(v.description), "", "| column | unit | meaning |", "|---|---|---|"]
        out += [f"| `{c}` | {_cell(unit)} | {_cell(about)} |" for c, unit, about in v.columns]
    return "\n".join(out).lstrip() + "\n"


def sql_examples() -> str:
    """Return the explorer's example queries (:data:`desomdb.web.pages.SQL_EXAMPLES`)."""
    from desomdb.web.pages import SQL_EXAMPLES

    return "\n".join(f"- {what}:\n\n  ```sql\n" + "\n".join(f"  {line}" for line in
                                                            query.splitlines())
                     + "\n  ```\n" for what, query in SQL_EXAMPLES)


def _write(app: Any) -> None:
    folder = Path(app.srcdir) / "_generated"
    folder.mkdir(exist_ok=True)
    for name, text in (("jobfile-keys.md", jobfile_keys()), ("views.md", views_reference()),
                       ("sql-examples.md", sql_examples())):
        target = folder / name
        if not target.exists() or target.read_text() != text:  # unchanged: no rebuild
            target.write_text(text)


def setup(app: Any) -> dict[str, Any]:
    """Register the generator with Sphinx."""
    app.connect("builder-inited", _write)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
