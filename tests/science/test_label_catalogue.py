"""The label catalogue: each label once, and every list derived from it agrees with the docs."""

import astropy.units as u

from desomdb.pipeline import calibrate, node_labels
from desomdb.products import maps
from desomdb.query.schema import view_docs
from desomdb.science import label_catalogue as lc
from desomdb.science.fitting import empty_row


def test_every_label_is_a_labels_column_with_the_unit_schema_yml_documents() -> None:
    docs = view_docs()["labels"]
    row = empty_row()
    for lab in lc.LABELS:
        assert lab.column in row, lab.column  # the fit writes it
        assert lab.column in docs, lab.column
        documented = docs[lab.column].unit
        if lab.unit is None:
            assert documented is None, lab.column
        else:
            assert documented is not None and u.Unit(documented) == u.Unit(lab.unit), lab.column


def test_flags_are_boolean_columns_the_fit_writes() -> None:
    row = empty_row()
    for lab in lc.LABELS:
        if lab.flag is not None:
            assert isinstance(row[lab.flag], bool), lab.flag


def test_the_stages_use_the_catalogue_lists() -> None:
    assert tuple(lc.EDGES) == lc.NODE_LABELS
    assert set(lc.CUTS) <= set(lc.NODE_LABELS)
    assert set(lc.TRUTH_COLUMNS) <= set(lc.NODE_LABELS)
    assert list(maps.LABELS) == [lab.column for lab in lc.LABELS]
    assert all(maps.LABELS[c] == lc.BY_COLUMN[c].flag for c in maps.LABELS)
    # the node-label SQL unpivots exactly the catalogue's node labels
    sql = node_labels._members_cte("m", "true")
    assert f"unpivot base on {', '.join(lc.NODE_LABELS)} " in sql
    assert calibrate.summarise.__defaults__ == (lc.NODE_LABELS,)


def test_histogram_edges_are_increasing_with_bins() -> None:
    for name, (lo, hi, n) in lc.EDGES.items():
        assert lo < hi and n > 0, name
