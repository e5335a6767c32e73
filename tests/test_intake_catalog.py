import intake
import yaml

from desomdb import intake_catalog as ic
from desomdb import views


def test_shipped_catalog_is_current(tmp_path) -> None:
    fresh = tmp_path / "fresh.yaml"
    ic.build_catalog().to_yaml_file(str(fresh))
    shipped = yaml.safe_load(ic.catalog_path().read_text())
    assert yaml.safe_load(fresh.read_text()) == shipped, \
        "run 'python -m desomdb.intake_catalog' after changing sql/"


def test_every_entry_loads_and_matches_connect(full_archive) -> None:
    arch, _, _, _ = full_archive
    cat = ic.open_catalog(arch)
    con = views.connect(arch)
    names = set(views.view_sql())
    assert set(cat.entries) == names
    for name in sorted(names):
        df = cat[name].read().pl()
        n = con.sql(f"select count(*) from {name}").fetchall()[0][0]
        assert df.height == n, name
    # parameters are set on the catalog (intake 2 ignores read(param=...))
    none = ic.open_catalog(arch, release="DR17")
    assert none["baxels"].read().pl().height == 0
    other = ic.open_catalog(arch, model="desom1-none")
    assert other["baxel_labels"].read().pl()["node"].null_count() == \
        other["baxel_labels"].read().pl().height


def test_plain_intake_open(full_archive) -> None:
    arch, _, _, _ = full_archive
    cat = intake.from_yaml_file(str(ic.catalog_path()))(archive=str(arch))
    assert cat["cubes"].read().pl().height > 0
