"""Date ranges and index-row conversions."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.fhir.dates import MAX_MS, MIN_MS, date_range
from gateway.fhir.indexer import compartment_patients, index_rows, normalize


@pytest.mark.parametrize(("value", "low", "high"), [
    ("2013", "2013-01-01T00:00:00Z", "2013-12-31T23:59:59.999Z"),
    ("2013-02", "2013-02-01T00:00:00Z", "2013-02-28T23:59:59.999Z"),
    ("2012-02", "2012-02-01T00:00:00Z", "2012-02-29T23:59:59.999Z"),
    ("2013-12", "2013-12-01T00:00:00Z", "2013-12-31T23:59:59.999Z"),
    ("2013-01-14", "2013-01-14T00:00:00Z", "2013-01-14T23:59:59.999Z"),
    ("2013-01-14T10:00", "2013-01-14T10:00:00Z", "2013-01-14T10:00:59.999Z"),
    ("2013-01-14T10:00:00+01:00", "2013-01-14T09:00:00Z", "2013-01-14T09:00:00.999Z"),
    ("2013-01-14T10:00:00.123Z", "2013-01-14T10:00:00.123Z", "2013-01-14T10:00:00.123Z"),
])
def test_date_range_follows_precision(value: str, low: str, high: str) -> None:
    assert date_range(value) == (date_range(low)[0], date_range(high)[0])


@pytest.mark.parametrize("value", ["2013-13", "2013-02-30", "13-01-01", "2013-01-01T25:00", "yesterday", ""])
def test_invalid_dates_raise(value: str) -> None:
    with pytest.raises(ValueError):
        date_range(value)


def test_normalize_folds_case_and_accents() -> None:
    assert normalize("Muñoz ÅSTRÖM") == "munoz astrom"


def test_no_index_row_is_written_for_id_which_search_reads_from_the_resource_table() -> None:
    rows = index_rows({"resourceType": "Patient", "id": "p1", "gender": "female"})
    assert all(row["param"] != "_id" for kind in rows.values() for row in kind)
    assert any(row["param"] == "gender" for row in rows["token"])


def test_period_without_end_is_open() -> None:
    rows = index_rows({"resourceType": "Encounter", "id": "e", "status": "planned", "class": {"code": "AMB"},
                       "period": {"start": "2020-01-01"}})
    date_row = next(r for r in rows["date"] if r["param"] == "date")
    assert date_row["low"] == date_range("2020-01-01")[0]
    assert date_row["high"] == MAX_MS
    rows = index_rows({"resourceType": "Encounter", "id": "e", "status": "planned", "class": {"code": "AMB"},
                       "period": {"end": "2020-01-01"}})
    assert next(r for r in rows["date"] if r["param"] == "date")["low"] == MIN_MS


def test_token_rows_of_codeable_concept_and_identifier() -> None:
    rows = index_rows({
        "resourceType": "Observation", "id": "o", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}],
                 "text": "Hb"},
        "identifier": [{"system": "urn:x", "value": "42"}],
        "valueQuantity": {"value": Decimal("13.50"), "unit": "g/dL", "system": "http://unitsofmeasure.org",
                          "code": "g/dL"},
    })
    code_rows = [(r["system"], r["code"], r["text"]) for r in rows["token"] if r["param"] == "code"]
    assert ("http://loinc.org", "718-7", "hemoglobin") in code_rows
    assert (None, None, "hb") in code_rows
    assert ("urn:x", "42", None) in [(r["system"], r["code"], r["text"]) for r in rows["token"]
                                     if r["param"] == "identifier"]
    quantity = next(r for r in rows["quantity"] if r["param"] == "value-quantity")
    assert quantity["value"] == 13.5 and quantity["code"] == "g/dL"


def test_references_on_own_base_are_local() -> None:
    rows = index_rows({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
                       "subject": {"reference": "http://gw.example/fhir/Patient/p1"}},
                      base_url="http://gw.example/fhir")
    subject = next(r for r in rows["reference"] if r["param"] == "subject")
    assert (subject["target_type"], subject["target_id"]) == ("Patient", "p1")


def test_compartment_membership() -> None:
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/a"}, "performer": [{"reference": "Patient/b"},
                                                                {"reference": "Practitioner/c"}]}
    assert compartment_patients(obs) == {"a", "b"}
    # A Patient is in its own compartment only, never in a linked record's.
    patient = {"resourceType": "Patient", "id": "a", "link": [{"other": {"reference": "Patient/z"},
                                                             "type": "seealso"}]}
    assert compartment_patients(patient) == {"a"}
    assert compartment_patients({"resourceType": "Practitioner", "id": "p"}) == set()
