import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _python_blocks() -> list[str]:
    text = (ROOT / "docs" / "sql.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_stays_short() -> None:
    """The README is a front door (what, install, taste, where the docs are), not a manual."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_readme_sql_taste_runs(full_archive) -> None:
    from desomdb.query import views

    arch = full_archive[0]
    (query,) = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    result = views.connect(arch).sql(query).pl()
    assert result.columns == ["node", "n_baxels", "log_age_lw", "mh_lw", "ebv_star"]
    assert 0 < result.height <= 5
    assert result["n_baxels"].is_sorted(descending=True)


def test_readme_commands_match_ci() -> None:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert match is not None
    commands = match.group(1).splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0] in ci and commands[1] in ci
    assert commands[2].startswith("desomdb demo")


def test_readme_python_example_runs(full_archive, monkeypatch) -> None:
    arch, _, _, _ = full_archive
    (block,) = _python_blocks()
    assert 'archive = "desomdb-demo/archive"' in block
    code = block.replace('archive = "desomdb-demo/archive"', f'archive = "{arch}"')
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["flux"].shape[1] == 4544
    assert namespace["pred"].height == 8
    assert namespace["ages"].height > 0 and namespace["rows"].height > 0
