import hashlib
from pathlib import Path

import duckdb
import intake
import pytest
import yaml
from intake.readers.datatypes import SQLQuery

from desomdb.errors import ConfigError, DesomdbError, ModelError, QueryError
from desomdb.query import intake_catalog as ic
from desomdb.query import views


def test_shipped_catalog_is_current(tmp_path) -> None:
    fresh = tmp_path / "fresh.yaml"
    ic.build_catalog().to_yaml_file(str(fresh))
    shipped = yaml.safe_load(ic.catalog_path().read_text())
    assert yaml.safe_load(fresh.read_text()) == shipped, \
        "run 'python -m desomdb.query.intake_catalog' after changing sql/"


def test_every_entry_loads_and_matches_connect(full_archive) -> None:
    arch, model_id, _, _ = full_archive
    cat = ic.open_catalog(arch)
    con = views.connect(arch)
    names = set(views.view_sql())
    assert set(cat.entries) == names
    present = {r[0] for r in con.sql(
        "select view_name from duckdb_views() where not internal").fetchall()}
    for name in sorted(names & present):
        df = cat[name].read().pl()
        n = con.sql(f"select count(*) from {name}").fetchall()[0][0]
        assert df.height == n, name
    assert "label_errors" not in present  # written by 'desomdb calibrate', not run here
    with pytest.raises(QueryError, match="no label_errors table in this archive yet"):
        cat["label_errors"].read()
    # parameters are set on the catalog (intake 2 ignores read(param=...))
    n = con.sql("select count(*) from baxels").fetchall()[0][0]
    assert ic.open_catalog(arch, release="DR1%")["baxels"].read().pl().height == n
    assert ic.open_catalog(arch, model=model_id)["baxel_labels"].read().pl()["node"].null_count() \
        == 0
    with pytest.raises(ConfigError, match=r"release 'DR17' matches none .*\(DR15\)"):
        ic.open_catalog(arch, release="DR17")
    with pytest.raises(ModelError, match=f"registered: {model_id}"):
        ic.open_catalog(arch, model="desom1-none")


def test_plain_intake_open(full_archive) -> None:
    arch, _, _, _ = full_archive
    cat = intake.from_yaml_file(str(ic.catalog_path()))(archive=str(arch))
    assert cat["cubes"].read().pl().height > 0


def _checksums(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hostile(arch: Path, out: Path) -> list[dict[str, str]]:
    """Values that, pasted into the entries' SQL before #16, returned rows, wrote or read."""
    return [
        {"release": "DR17' or 1=1 --"},
        {"release": f"%'; copy (select 1 as x) to '{out}'; select 1 where '"},
        {"release": "%' union all by name select * from read_csv('/etc/passwd') --"},
        {"model": "x' or 1=1 --"},
        {"model": f"x'; copy (select 1 as x) to '{arch}/evil.csv'; select 1 where '"},
    ]


@pytest.mark.parametrize("i", range(5))
def test_hostile_parameters_are_refused(ingested, tmp_path, i: int) -> None:
    arch = ingested[0]
    out = tmp_path / "written.csv"
    before = _checksums(arch)
    params = _hostile(arch, out)[i]
    with pytest.raises((ConfigError, ModelError)):
        ic.open_catalog(arch, **params)
    # plain intake, without open_catalog: the reader checks them too
    cat = intake.from_yaml_file(str(ic.catalog_path()))(archive=str(arch), **params)
    for name in ("baxels", "baxel_labels"):
        with pytest.raises(DesomdbError):
            cat[name].read()
    assert not out.exists() and _checksums(arch) == before


def test_parameters_are_bound_never_pasted() -> None:
    shipped = yaml.safe_load(ic.catalog_path().read_text())
    for data in shipped["data"].values():
        query = data["kwargs"]["query"]
        assert not {"{archive}", "{release}", "{model}"} & set(query.split()), query
        assert "{" not in query, query
    for entry in shipped["entries"].values():
        assert entry["reader"] == "desomdb.query.intake_catalog:ArchiveSQL"


def test_entries_run_guarded_and_sandboxed(ingested, tmp_path) -> None:
    arch = ingested[0]

    def read(query: str) -> object:
        return ic.ArchiveSQL(SQLQuery(conn=":memory:", query=query),
                             archive_path=str(arch)).read()

    with pytest.raises(QueryError, match="one statement"):
        read(f"select 1; copy (select 1 as x) to '{tmp_path / 'x.csv'}'")
    with pytest.raises(duckdb.PermissionException):
        read("select * from read_csv('/etc/passwd')")
    assert not (tmp_path / "x.csv").exists()
