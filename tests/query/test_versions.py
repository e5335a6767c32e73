"""Release order and the current version of each cube (one rule: the latest_cubes view)."""

import pyarrow as pa

import desomdb
from desomdb.archive.store import Archive
from desomdb.query import versions


def _cubes(w, release: str, ordinal: int | None, plateifus: list[str]):
    cols: dict[str, list] = {"plateifu": plateifus, "status": ["ok"] * len(plateifus)}
    if ordinal is not None:
        cols["release_ordinal"] = [ordinal] * len(plateifus)
    return w.stage_table("cubes", pa.table(cols), f"cubes/release={release}/c.parquet")


def test_releases_order_by_their_recorded_ordinal_not_their_name(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("test") as w:  # "DR9" sorts after "DR17" as text
        w.commit(add=[_cubes(w, "DR9", 9, ["1-1", "1-2"]), _cubes(w, "DR17", 17, ["1-1"])])
    assert versions.release_order(arch) == ["DR9", "DR17"]
    latest = versions.latest_cubes(arch)
    assert dict(zip(latest["plateifu"], latest["release"], strict=True)) == \
        {"1-1": "DR17", "1-2": "DR9"}
    con = desomdb.connect(arch.root)
    assert con.sql("select release from latest_cubes where plateifu = '1-1'").fetchall() == \
        [("DR17",)]


def test_rows_without_an_ordinal_still_order(tmp_path) -> None:
    arch = Archive(tmp_path / "a", create=True)
    with arch.writer("test") as w:  # written before ordinals were recorded
        w.commit(add=[_cubes(w, "DR15", None, ["1-1"]), _cubes(w, "DR17", None, ["1-1"])])
    assert versions.release_order(arch) == ["DR15", "DR17"]
    assert versions.latest_cubes(arch)["release"].to_list() == ["DR17"]


def test_ingest_records_the_release_ordinal(ingested) -> None:
    archive, _ = ingested
    t = Archive(archive).read("cubes", columns=["release_ordinal"])
    assert set(t.column("release_ordinal").to_pylist()) == {15}
