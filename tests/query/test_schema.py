import warnings

import pytest
from astropy import units as u

from desomdb.query import schema


def test_every_unit_parses_and_has_a_fits_and_vo_spelling() -> None:
    units = {d.unit for cols in schema.view_docs().values() for d in cols.values() if d.unit}
    assert {"deg", "arcsec", "Gyr", "dex", "dex(solMass / solLum)", "km / s"} <= units
    for text in units:
        parsed = schema.parse_unit(text)
        assert isinstance(parsed, u.UnitBase | u.FunctionUnitBase), text
        assert schema.vo_unit(text)
        fits_text = schema.fits_unit(text)
        if fits_text is None:  # log, littleh, nanomaggy: no FITS unit, the comment names it
            assert "dex" in text or "littleh" in text or text == "nanomaggy", text
            assert schema.unit_note(text).startswith(" [unit: ")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # astropy's FITS reader parses it silently
                u.Unit(fits_text, format="fits")
    assert schema.fits_unit("km / s") == "km s-1"
    assert schema.fits_unit("dex(solMass / solLum)") is None
    assert schema.unit_note("dex(solMass / solLum)") == " [unit: [solMass.Lsun-1]]"
    assert schema.vo_unit("1e-17 erg / (s cm2 Angstrom)") == "1e-17erg.Angstrom**-1.s**-1.cm**-2"


@pytest.mark.parametrize(("names", "query", "expected"), [
    (["ra", "dec"], "select ra, dec from cubes", {"ra": "deg", "dec": "deg"}),
    (["median(age_mw_gyr)"], "select median(age_mw_gyr) from labels",
     {"median(age_mw_gyr)": "Gyr"}),
    (["log_ssfr"], "select * from baxel_labels", {"log_ssfr": "dex(1 / yr)"}),
    (["sep_arcsec"], "select * from cone(1, 2, 3)", {"sep_arcsec": "arcsec"}),
])
def test_result_columns_get_units(names, query, expected) -> None:
    docs = schema.column_docs(names, query)
    assert {k: v.unit for k, v in docs.items()} == expected


def test_a_derived_views_inputs_document_its_other_columns() -> None:
    docs = schema.column_docs(["nsa_sersic_n", "peak_node", "chi2_red"],
                              "select * from galaxy_summary join baxel_labels using (plateifu)")
    assert docs["nsa_sersic_n"].description == "NSA single-Sersic index."
    assert set(docs) == {"nsa_sersic_n", "peak_node", "chi2_red"}


def test_unitless_names_of_other_views_are_not_guessed() -> None:
    # 'n' is node_labels' count; a count(*) alias in a baxels query is something else
    assert schema.column_docs(["n"], "select count(*) as n from baxels") == {}
    assert schema.column_docs(["n"], "select n from node_labels")["n"].unit is None
