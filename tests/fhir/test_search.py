"""FHIR search over the REST API: parameter types, modifiers, prefixes, paging, sorting, views, includes.

Every test seeds a handful of hand-made resources with fixed ids and asserts the exact ids a search
returns. Case tables (query -> expected ids) are checked together so one failure shows every
mismatch of a behaviour. Bulk seeding goes through the store in one transaction (one fsync, not one
per resource); writes that a test is about go through the HTTP API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import pytest

FHIR_JSON = {"Content-Type": "application/fhir+json"}
BASE = "http://testserver"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SUBSETTED = "SUBSETTED"


# --- helpers -----------------------------------------------------------------------------------

@pytest.fixture
def settings(settings: Any, request: pytest.FixtureRequest) -> Any:
    """The harness settings with the audit log off, unless the test asks for `audit_on`.

    The audit writer stores AuditEvents asynchronously, and they land in patients' compartments: left
    on, they would race into compartment and $everything results.
    """
    settings.audit_enabled = "audit_on" in request.fixturenames
    return settings


@pytest.fixture
def audit_on() -> None:
    """Requesting this fixture keeps the audit log on (see settings)."""


def seed(store: Any, *resources: dict[str, Any]) -> None:
    """Create (or replace) resources with fixed ids, all in one transaction."""
    def write(repo: Any) -> None:
        for resource in resources:
            repo.update(resource["resourceType"], resource["id"], resource)

    store.write(write)


def put(client: Any, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=FHIR_JSON)
    assert response.status_code in (200, 201), response.get_data(as_text=True)
    return response.get_json()


def get(client: Any, url: str, status: int = 200, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """GET a FHIR URL (absolute on the test base or relative) and return the JSON body."""
    if url.startswith(BASE):
        url = url[len(BASE):]
    response = client.get(url, headers=headers or {})
    assert response.status_code == status, f"{url}: {response.status_code} {response.get_data(as_text=True)[:500]}"
    return response.get_json()


def entries(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    """Ids of the entries of one search mode, in Bundle order."""
    return [r["id"] for r in entries(bundle, mode)]


def refs(bundle: dict[str, Any], mode: str) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in entries(bundle, mode)]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == relation), None)


def found(client: Any, url: str) -> set[str]:
    return set(ids(get(client, url)))


def walk(client: Any, url: str, page_hook: Any = None) -> list[dict[str, Any]]:
    """Every page of a search, following next links; page_hook(n) runs after page n is fetched."""
    pages = [get(client, url)]
    while True:
        if page_hook is not None:
            page_hook(len(pages))
        next_url = link(pages[-1], "next")
        if next_url is None:
            return pages
        assert len(pages) < 100, "next links do not end"
        pages.append(get(client, next_url))


def walked_ids(pages: Iterable[dict[str, Any]]) -> list[str]:
    return [i for page in pages for i in ids(page)]


def assert_cases(client: Any, rtype: str, cases: list[tuple[str, set[str]]]) -> None:
    """Run every query of a case table; fail once, listing each query whose ids differ."""
    wrong = {}
    for query, expected in cases:
        got = found(client, f"/fhir/{rtype}?{query}")
        if got != expected:
            wrong[query] = {"expected": sorted(expected), "got": sorted(got)}
    assert not wrong, wrong


def assert_outcome(body: dict[str, Any]) -> None:
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"


def assert_rejected(client: Any, urls: list[str]) -> None:
    """Every URL is answered 400 with an error OperationOutcome; fail once, listing the others."""
    wrong = {}
    for url in urls:
        response = client.get(url)
        body = response.get_json(silent=True) or {}
        issues = body.get("issue") or [{}]
        if response.status_code != 400 or body.get("resourceType") != "OperationOutcome" \
                or issues[0].get("severity") != "error":
            wrong[url] = f"{response.status_code} {response.get_data(as_text=True)[:200]}"
    assert not wrong, wrong


def assert_each_once(bundle: dict[str, Any]) -> None:
    full_urls = [e["fullUrl"] for e in bundle["entry"] if "fullUrl" in e]
    assert len(full_urls) == len(set(full_urls))


# --- resource builders -------------------------------------------------------------------------

def patient(rid: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid, **fields}


def observation(rid: str, code: Any = None, subject: str | None = None, **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": rid, "status": "final",
        "code": code if code is not None else {"coding": [{"system": LOINC, "code": "29463-7"}]},
    }
    if subject is not None:
        resource["subject"] = {"reference": subject}
    return {**resource, **fields}


def coding(system: str | None, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"code": code}
    if system:
        out["system"] = system
    if display:
        out["display"] = display
    return out


def quantity(value: float, code: str | None = None, unit: str | None = None, system: str | None = UCUM
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if unit:
        out["unit"] = unit
    if code:
        out["code"] = code
        out["system"] = system
    return out


def document(rid: str, url: str, source: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "DocumentReference", "id": rid, "status": "current",
                                "content": [{"attachment": {"url": url}}]}
    if source:
        resource["meta"] = {"source": source}
    return resource


def bp_component(code: str, value: float) -> dict[str, Any]:
    return {"code": {"coding": [coding(LOINC, code)]}, "valueQuantity": quantity(value, "mm[Hg]", "mmHg")}


def numbered_patients(n: int, prefix: str = "p", **fields: Any) -> list[dict[str, Any]]:
    return [patient(f"{prefix}{i:02d}", **fields) for i in range(n)]


# --- token -------------------------------------------------------------------------------------

@pytest.fixture
def token_observations(store: Any) -> None:
    seed(
        store,
        observation("o1", {"coding": [coding(LOINC, "1234-5", "Glucose [Mass/volume] in Blood")],
                           "text": "Blood sugar"}),
        observation("o2", {"coding": [coding(None, "1234-5")]}),
        observation("o3", {"coding": [coding("http://snomed.info/sct", "999")], "text": "Heart rate"}),
        observation("o4", {"text": "Body weight"}),
    )


def test_token_code_and_system_forms(client: Any, token_observations: None) -> None:
    assert_cases(client, "Observation", [
        ("code=1234-5", {"o1", "o2"}),
        (f"code={LOINC}|1234-5", {"o1"}),
        ("code=|1234-5", {"o2"}),
        (f"code={LOINC}|", {"o1"}),
        ("code=http://snomed.info/sct|1234-5", set()),
        ("code=1234", set()),
    ])


def test_token_not_includes_resources_without_a_match(client: Any, token_observations: None) -> None:
    assert_cases(client, "Observation", [
        ("code:not=1234-5", {"o3", "o4"}),
        (f"code:not={LOINC}|1234-5", {"o2", "o3", "o4"}),
        ("code:not=1234-5,999", {"o4"}),
    ])


def test_token_text_searches_display_and_concept_text(client: Any, token_observations: None) -> None:
    assert_cases(client, "Observation", [
        ("code:text=glucose", {"o1"}),
        ("code:text=BLOOD", {"o1"}),
        ("code:text=sugar", {"o1"}),
        ("code:text=body%20WEIGHT", {"o4"}),
        ("code:text=heart", {"o3"}),
        ("code:text=ucose", set()),
    ])


def test_token_comma_is_or_and_repeated_parameter_is_and(client: Any, token_observations: None) -> None:
    assert_cases(client, "Observation", [
        ("code=1234-5,999", {"o1", "o2", "o3"}),
        (f"code=http://snomed.info/sct|999,{LOINC}|1234-5", {"o1", "o3"}),
        (f"code=1234-5&code={LOINC}|1234-5", {"o1"}),
        ("code=1234-5&code=999", set()),
    ])


@pytest.fixture
def token_patients(store: Any) -> None:
    seed(
        store,
        patient("p1", active=True, gender="female",
                identifier=[{"system": "urn:mrn", "value": "111", "type": {"text": "Medical record number"}}],
                telecom=[{"system": "email", "value": "ann@example.org"}, {"system": "phone", "value": "555-1000"}]),
        patient("p2", active=False, gender="male", identifier=[{"value": "222"}],
                telecom=[{"system": "phone", "value": "555-2000"}]),
        patient("p3", identifier=[{"system": "urn:ssn", "value": "111"}]),
    )


def test_token_missing(client: Any, token_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("gender:missing=true", {"p3"}),
        ("gender:missing=false", {"p1", "p2"}),
        ("gender:not=male", {"p1", "p3"}),
        ("gender:not=male,female", {"p3"}),
    ])


def test_token_boolean(client: Any, token_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("active=true", {"p1"}),
        ("active=false", {"p2"}),
        ("active:not=true", {"p2", "p3"}),
        ("active:missing=true", {"p3"}),
    ])


def test_token_identifier(client: Any, token_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("identifier=111", {"p1", "p3"}),
        ("identifier=urn:mrn|111", {"p1"}),
        ("identifier=urn:ssn|", {"p3"}),
        ("identifier=|222", {"p2"}),
        ("identifier=|111", set()),
        ("identifier:text=medical", {"p1"}),
    ])


def test_token_contact_point(client: Any, token_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("email=ann@example.org", {"p1"}),
        ("phone=555-2000", {"p2"}),
        ("phone=555-1000,555-2000", {"p1", "p2"}),
        ("email=555-1000", set()),
        ("phone=ann@example.org", set()),
    ])


def test_token_escaped_separators(client: Any, store: Any) -> None:
    seed(store, patient("comma", identifier=[{"system": "urn:x", "value": "a,b"}]),
         patient("pipe", identifier=[{"system": "urn:x", "value": "a|b"}]),
         patient("plain", identifier=[{"system": "urn:x", "value": "a"}]))
    assert_cases(client, "Patient", [
        ("identifier=a%5C,b", {"comma"}),
        ("identifier=urn:x|a%5C,b", {"comma"}),
        ("identifier=urn:x|a%5C|b", {"pipe"}),
        ("identifier=a,b", {"plain"}),
    ])


# --- string ------------------------------------------------------------------------------------

@pytest.fixture
def named_patients(store: Any) -> None:
    seed(
        store,
        patient("s1", name=[{"family": "Muñoz", "given": ["José", "Maria"]}],
                address=[{"line": ["1 Main Street"], "city": "São Paulo"}]),
        patient("s2", name=[{"family": "Munster", "given": ["Ann"]}], address=[{"city": "Boston"}]),
        patient("s3", name=[{"family": "Smith", "given": ["Jo"], "prefix": ["Dr"]}, {"family": "Brown"}]),
        patient("s4", gender="unknown"),
        patient("s5", name=[{"family": "Under_score 100%"}]),
    )


def test_string_default_is_case_and_accent_insensitive_starts_with(client: Any, named_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("family=munoz", {"s1"}),
        ("family=MUÑOZ", {"s1"}),
        ("family=Mun", {"s1", "s2"}),
        ("family=oz", set()),
        ("family=munozz", set()),
    ])


def test_string_exact_and_contains(client: Any, named_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("family:exact=Muñoz", {"s1"}),
        ("family:exact=muñoz", set()),
        ("family:exact=Munoz", set()),
        ("family:exact=Muñ", set()),
        ("family:contains=OZ", {"s1"}),
        ("family:contains=nst", {"s2"}),
        ("family:contains=xyz", set()),
        ("family:missing=true", {"s4"}),
    ])


def test_string_exact_at_and_past_the_stored_length(client: Any, store: Any) -> None:
    """:exact compares the normalized value too (so that an index serves it) only below the stored
    maximum; a value stored clipped still matches by its first 255 characters, as before."""
    long_name = "Ä" + "b" * 299
    seed(store, patient("l1", name=[{"family": long_name}]), patient("l2", name=[{"family": "Äb"}]))
    assert_cases(client, "Patient", [
        (f"family:exact={long_name[:255]}", {"l1"}),
        (f"family:exact={long_name[:254]}", set()),
        (f"family:exact={long_name}", set()),
        ("family:exact=Äb", {"l2"}),
        ("family:exact=Ab", set()),
    ])


def test_string_like_wildcards_are_literal(client: Any, named_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("family=under_", {"s5"}),
        ("family=u_d", set()),
        ("family=%25", set()),
        ("family:contains=100%25", {"s5"}),
        ("family:contains=0_", set()),
        ("family:exact=Under_score%20100%25", {"s5"}),
    ])


def test_string_human_name_parts(client: Any, named_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("given=jo", {"s1", "s3"}),
        ("given:exact=Jo", {"s3"}),
        ("given=maria", {"s1"}),
        ("name=maria", {"s1"}),
        ("name=dr", {"s3"}),
        ("name=brown", {"s3"}),
        ("name=munoz,smith", {"s1", "s3"}),
        ("family=smith&given=jo", {"s3"}),
        ("family=munoz&given=ann", set()),
    ])


def test_string_address_parts(client: Any, named_patients: None) -> None:
    assert_cases(client, "Patient", [
        ("address-city=sao", {"s1"}),
        ("address-city=sao%20paulo", {"s1"}),
        ("address-city:exact=Boston", {"s2"}),
        ("address-city:exact=boston", set()),
        ("address=1%20main", {"s1"}),
        ("address=main", set()),
        ("address=boston", {"s2"}),
    ])


# --- date --------------------------------------------------------------------------------------

@pytest.fixture
def birthdates(store: Any) -> None:
    seed(
        store,
        patient("d1", birthDate="2013-06-01"),
        patient("d2", birthDate="2013-12-31"),
        patient("d3", birthDate="2014-01-01"),
        patient("d4", birthDate="1990-05-15"),
        patient("d5"),
        patient("d6", birthDate="2013-07"),
    )


def test_date_precision_of_the_search_value(client: Any, birthdates: None) -> None:
    assert_cases(client, "Patient", [
        ("birthdate=2013", {"d1", "d2", "d6"}),
        ("birthdate=2013-06", {"d1"}),
        ("birthdate=2013-06-01", {"d1"}),
        ("birthdate=eq2013-06-01", {"d1"}),
        ("birthdate=2013-07", {"d6"}),
        # A month is not contained in one day of it, nor a day in one second of it.
        ("birthdate=2013-07-15", set()),
        ("birthdate=2013-06-01T00:00:00Z", set()),
    ])


def test_date_prefixes(client: Any, birthdates: None) -> None:
    assert_cases(client, "Patient", [
        ("birthdate=ne2013", {"d3", "d4"}),
        ("birthdate=gt2013-06-01", {"d2", "d3", "d6"}),
        ("birthdate=ge2013-06-01", {"d1", "d2", "d3", "d6"}),
        ("birthdate=lt2013-06-01", {"d4"}),
        ("birthdate=le2013-06-01", {"d1", "d4"}),
        ("birthdate=gt2013-07-15", {"d2", "d3", "d6"}),
        ("birthdate=lt2013-07-15", {"d1", "d4", "d6"}),
        ("birthdate=gt2013", {"d3"}),
        ("birthdate=sa2013", {"d3"}),
        ("birthdate=eb2013", {"d4"}),
        ("birthdate=sa2013-06-15", {"d2", "d3", "d6"}),
        ("birthdate=eb2013-07-15", {"d1", "d4"}),
        ("birthdate=ge2013&birthdate=lt2014", {"d1", "d2", "d6"}),
        ("birthdate=1990,2014", {"d3", "d4"}),
        # ap: a tenth of the distance to today (over a year here) on either side.
        ("birthdate=ap2013-06-03", {"d1", "d2", "d3", "d6"}),
        ("birthdate:missing=true", {"d5"}),
    ])


@pytest.fixture
def effective_times(store: Any) -> None:
    seed(
        store,
        observation("e1", effectiveDateTime="2013-01-14T23:30:00-05:00"),  # 2013-01-15T04:30:00Z
        observation("e2", effectiveDateTime="2013-01-14T10:00:05Z"),
        observation("e3", effectivePeriod={"start": "2013-05-10", "end": "2013-07-20"}),
        observation("e4", effectivePeriod={"start": "2013-06-10"}),
        observation("e5", effectivePeriod={"end": "2012-01-01"}),
        observation("e6", effectiveDateTime="2013-06-15"),
    )


def test_date_against_datetimes_with_time_zones(client: Any, effective_times: None) -> None:
    assert_cases(client, "Observation", [
        ("date=2013-01-15", {"e1"}),
        ("date=2013-01-14", {"e2"}),
        ("date=2013-01-14T10:00:05Z", {"e2"}),
        ("date=2013-01-14T10:00:05%2B00:00", {"e2"}),
        ("date=2013-01-14T05:00:05-05:00", {"e2"}),
        ("date=2013-01-14T10:00:06Z", set()),
        ("date=2013-01-14T10:00", {"e2"}),
        ("date=2013-01-15T04:30:00Z", {"e1"}),
        ("date=2013-01-14T23:30:00-05:00", {"e1"}),
        ("date=gt2013-01-14T10:00:05Z", {"e1", "e3", "e4", "e6"}),
        ("date=le2013-01-14T10:00:05Z", {"e2", "e5"}),
    ])


def test_date_against_periods(client: Any, effective_times: None) -> None:
    assert_cases(client, "Observation", [
        # eq: the period must lie within the search range.
        ("date=2013-06", {"e6"}),
        ("date=2013", {"e1", "e2", "e3", "e6"}),
        ("date=ne2013", {"e4", "e5"}),
        # Open-ended periods reach to the end (or start) of time.
        ("date=gt2013-12-31", {"e4"}),
        ("date=ge2013-07-20", {"e4"}),
        ("date=lt2012-06", {"e5"}),
        ("date=le2011", {"e5"}),
        ("date=sa2013-05-01", {"e3", "e4", "e6"}),
        ("date=eb2013-05-11", {"e1", "e2", "e5"}),
        ("date=ap2030", {"e4"}),
    ])


def test_date_invalid_values_are_400(client: Any) -> None:
    assert_rejected(client, [f"/fhir/Patient?birthdate={value}" for value in (
        "2013-13", "2013-02-30", "xx2013", "not-a-date", "2013-06-01T25:00", "13-06-01", "eq", "2013-06-01T10:00:00X",
    )])


# --- number and quantity -----------------------------------------------------------------------

@pytest.fixture
def quantities(store: Any) -> None:
    seed(
        store,
        observation("q1", valueQuantity=quantity(5.41, "mg/dL", "mg/dL")),
        observation("q2", valueQuantity=quantity(5.46, "mg/dL", "mg/dL")),
        observation("q3", valueQuantity=quantity(5.4, "mg", "milligram")),
        observation("q4", valueQuantity=quantity(100, "kg", "kg")),
        observation("q5", valueString="not measured"),
    )


def test_quantity_precision_and_prefixes(client: Any, quantities: None) -> None:
    assert_cases(client, "Observation", [
        ("value-quantity=5.4", {"q1", "q3"}),
        ("value-quantity=eq5.4", {"q1", "q3"}),
        ("value-quantity=5.46", {"q2"}),
        ("value-quantity=5.40", {"q3"}),
        ("value-quantity=5", {"q1", "q2", "q3"}),
        ("value-quantity=1e2", {"q4"}),
        ("value-quantity=ne5.4", {"q2", "q4"}),
        ("value-quantity=gt5.41", {"q2", "q4"}),
        ("value-quantity=ge5.41", {"q1", "q2", "q4"}),
        ("value-quantity=lt5.41", {"q3"}),
        ("value-quantity=le5.41", {"q1", "q3"}),
        ("value-quantity=ap95", {"q4"}),
        ("value-quantity=ap80", set()),
        ("value-quantity=5.4,100", {"q1", "q3", "q4"}),
        ("value-quantity:missing=true", {"q5"}),
    ])


def test_quantity_system_code_and_unit(client: Any, quantities: None) -> None:
    assert_cases(client, "Observation", [
        (f"value-quantity=5.4|{UCUM}|mg", {"q3"}),
        (f"value-quantity=5.4|{UCUM}|mg/dL", {"q1"}),
        ("value-quantity=5.4|http://example.org/units|mg", set()),
        ("value-quantity=5.4||mg", {"q3"}),
        ("value-quantity=5.4||milligram", {"q3"}),
        ("value-quantity=gt1||kg", {"q4"}),
        ("value-quantity=gt1||mg", {"q3"}),
    ])


def test_quantity_invalid_numbers_are_400(client: Any) -> None:
    assert_rejected(client, [f"/fhir/Observation?value-quantity={value}" for value in ("abc", "gt", "5.4.1")])


# --- reference ---------------------------------------------------------------------------------

@pytest.fixture
def references(store: Any) -> None:
    seed(
        store,
        patient("1"),
        patient("2"),
        {"resourceType": "Group", "id": "1", "type": "person", "actual": True},
        observation("r1", subject="Patient/1"),
        observation("r2", subject=f"{BASE}/fhir/Patient/2"),
        observation("r3", subject="Group/1"),
        observation("r4", subject="http://other.example.org/fhir/Patient/1"),
        observation("r5"),
    )


def test_reference_forms(client: Any, references: None) -> None:
    assert_cases(client, "Observation", [
        ("subject=1", {"r1", "r3"}),
        ("subject=Patient/1", {"r1"}),
        (f"subject={BASE}/fhir/Patient/1", {"r1"}),
        ("subject=2", {"r2"}),
        ("subject=Patient/2", {"r2"}),
        (f"subject={BASE}/fhir/Patient/2", {"r2"}),
        ("subject=http://other.example.org/fhir/Patient/1", {"r4"}),
        ("subject=Patient/1,Group/1", {"r1", "r3"}),
    ])


def test_reference_type_modifier_and_missing(client: Any, references: None) -> None:
    assert_cases(client, "Observation", [
        ("subject:Patient=1", {"r1"}),
        ("subject:Group=1", {"r3"}),
        ("subject:Patient=Group/1", set()),
        ("subject:missing=true", {"r5"}),
        ("subject:missing=false", {"r1", "r2", "r3", "r4"}),
    ])


def test_reference_patient_parameter_only_reaches_patients(client: Any, references: None) -> None:
    assert_cases(client, "Observation", [
        ("patient=1", {"r1"}),
        ("patient=Patient/1", {"r1"}),
        ("patient=Group/1", set()),
        ("patient=2", {"r2"}),
        ("patient=http://other.example.org/fhir/Patient/1", {"r4"}),
        ("patient:missing=true", {"r3", "r5"}),
    ])


# --- uri ---------------------------------------------------------------------------------------

@pytest.fixture
def documents(store: Any) -> None:
    seed(
        store,
        document("u1", "http://example.org/docs/report/1.pdf", "http://example.org/feed#a"),
        document("u2", "http://example.org/docs/other.pdf", "http://example.org/feed#b"),
        document("u3", "http://example.com/x"),
        document("u4", "http://example.org/a_b"),
    )


def test_uri_exact_below_above_and_source(client: Any, documents: None) -> None:
    assert_cases(client, "DocumentReference", [
        ("location=http://example.org/docs/report/1.pdf", {"u1"}),
        ("location=http://example.org/docs", set()),
        ("location:below=http://example.org/docs/", {"u1", "u2"}),
        ("location:below=http://example.org/docs/report", {"u1"}),
        ("location:above=http://example.com/x/y/z", {"u3"}),
        ("_source=http://example.org/feed%23a", {"u1"}),
        ("_source=http://example.org/feed%23a,http://example.org/feed%23b", {"u1", "u2"}),
        ("_source:missing=true", {"u3", "u4"}),
    ])


def test_uri_below_is_case_sensitive(client: Any, documents: None) -> None:
    assert found(client, "/fhir/DocumentReference?location:below=HTTP://EXAMPLE.ORG/docs/") == set()


def test_uri_above_treats_the_stored_value_literally(client: Any, documents: None) -> None:
    assert found(client, "/fhir/DocumentReference?location:above=http://example.org/aXb/c") == set()


# --- composite ---------------------------------------------------------------------------------

@pytest.fixture
def blood_pressures(store: Any) -> None:
    panel = {"coding": [coding(LOINC, "85354-9")]}
    seed(
        store,
        observation("c1", panel, component=[bp_component("8480-6", 120), bp_component("8462-4", 80)]),
        observation("c2", panel, component=[bp_component("8480-6", 150), bp_component("8462-4", 95)]),
        observation("c3", {"coding": [coding(LOINC, "8480-6")]}, valueQuantity=quantity(120, "mm[Hg]")),
    )


def test_composite_component_code_value_quantity(client: Any, blood_pressures: None) -> None:
    assert_cases(client, "Observation", [
        (f"component-code-value-quantity={LOINC}|8480-6$gt130", {"c2"}),
        ("component-code-value-quantity=8480-6$120", {"c1"}),
        # Both halves must come from the same component: c1 has 120 only on 8480-6.
        ("component-code-value-quantity=8462-4$120", set()),
        (f"component-code-value-quantity=8480-6$lt130|{UCUM}|mm%5BHg%5D", {"c1"}),
        ("component-code-value-quantity=8480-6$ge120,8462-4$ge90", {"c1", "c2"}),
        ("component-code-value-quantity=8480-6$lt130&component-code-value-quantity=8462-4$gt90", set()),
    ])


def test_composite_code_value_quantity(client: Any, blood_pressures: None) -> None:
    assert_cases(client, "Observation", [
        (f"code-value-quantity={LOINC}|8480-6$120", {"c3"}),
        ("code-value-quantity=8480-6$gt100", {"c3"}),
        ("code-value-quantity=8480-6$gt120", set()),
        ("code-value-quantity=85354-9$120", set()),
    ])


def test_composite_without_dollar_is_400(client: Any) -> None:
    assert_outcome(get(client, "/fhir/Observation?code-value-quantity=8480-6", status=400))


# --- _id, _lastUpdated, _tag, _security, _profile -----------------------------------------------

def test_id(client: Any, store: Any) -> None:
    seed(store, patient("a"), patient("b"), patient("c"))
    assert_cases(client, "Patient", [
        ("_id=a", {"a"}),
        ("_id=a,c", {"a", "c"}),
        ("_id=a&_id=b", set()),
        ("_id=zz", set()),
    ])


def test_last_updated(client: Any) -> None:
    first = put(client, patient("old"))
    time.sleep(0.01)
    second = put(client, patient("new"))
    cut = first["meta"]["lastUpdated"].replace("+", "%2B")
    assert second["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
    assert_cases(client, "Patient", [
        (f"_lastUpdated=gt{cut}", {"new"}),
        (f"_lastUpdated=ge{cut}", {"old", "new"}),
        (f"_lastUpdated=le{cut}", {"old"}),
        (f"_lastUpdated={first['meta']['lastUpdated'][:10]}", {"old", "new"}),
        ("_lastUpdated=lt2000-01-01", set()),
        ("_lastUpdated=gt2999", set()),
    ])


def test_meta_tag_security_and_profile(client: Any, store: Any) -> None:
    confidentiality = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    profile = "http://example.org/StructureDefinition/special-patient"
    seed(
        store,
        patient("t1", meta={"tag": [{"system": "urn:tags", "code": "vip"}],
                            "security": [{"system": confidentiality, "code": "R"}], "profile": [profile]}),
        patient("t2", meta={"tag": [{"system": "urn:other", "code": "vip"}, {"system": "urn:tags", "code": "test"}]}),
        patient("t3"),
    )
    assert_cases(client, "Patient", [
        ("_tag=vip", {"t1", "t2"}),
        ("_tag=urn:tags|vip", {"t1"}),
        ("_tag=urn:tags|", {"t1", "t2"}),
        ("_tag=vip&_tag=test", {"t2"}),
        ("_tag:not=vip", {"t3"}),
        ("_tag:missing=true", {"t3"}),
        ("_security=R", {"t1"}),
        (f"_security={confidentiality}|R", {"t1"}),
        (f"_security={confidentiality}|N", set()),
        (f"_profile={profile}", {"t1"}),
        ("_profile=http://example.org/StructureDefinition/other", set()),
    ])


# --- paging ------------------------------------------------------------------------------------

def test_paging_walks_every_match_once(client: Any, store: Any) -> None:
    seed(store, *numbered_patients(23))
    pages = walk(client, "/fhir/Patient?_count=5")
    assert [len(ids(p)) for p in pages] == [5, 5, 5, 5, 3]
    assert all(link(p, "next") for p in pages[:-1])
    assert link(pages[-1], "next") is None
    assert all(link(p, "self") for p in pages)
    collected = walked_ids(pages)
    assert sorted(collected) == [f"p{i:02d}" for i in range(23)]


def test_paging_exact_multiple_has_no_empty_last_page(client: Any, store: Any) -> None:
    seed(store, *numbered_patients(10))
    assert link(get(client, "/fhir/Patient?_count=10"), "next") is None
    pages = walk(client, "/fhir/Patient?_count=5")
    assert [len(ids(p)) for p in pages] == [5, 5]
    assert link(pages[-1], "next") is None


def test_paging_is_stable_while_resources_are_added(client: Any, store: Any) -> None:
    originals = numbered_patients(30, name=[{"family": "Stable"}])
    seed(store, *originals)
    url = "/fhir/Patient?family=stable&_count=10"
    baseline = walked_ids(walk(client, url))
    assert sorted(baseline) == [p["id"] for p in originals]

    def insert_after_first_page(page_no: int) -> None:
        if page_no == 1:
            for i in range(5):
                response = client.post("/fhir/Patient", json=patient(f"x{i}", name=[{"family": "Stable"}]),
                                       headers=FHIR_JSON)
                assert response.status_code == 201

    pages = walk(client, url, insert_after_first_page)
    collected = walked_ids(pages)
    original_ids = {p["id"] for p in originals}
    assert len(collected) == len(set(collected))
    assert [i for i in collected if i in original_ids] == baseline
    assert link(pages[-1], "next") is None


def test_paging_self_link_names_the_current_page(client: Any, store: Any) -> None:
    seed(store, *numbered_patients(6))
    second = get(client, link(get(client, "/fhir/Patient?_count=3"), "next"))
    assert ids(get(client, link(second, "self"))) == ids(second)


def test_paging_bad_count_or_cursor_is_400(client: Any) -> None:
    # WzEsMl0 is [1,2]: a well-formed cursor that does not fit the search's single sort key.
    assert_rejected(client, [f"/fhir/Patient?{query}" for query in (
        "_count=-1", "_count=ten", "_cursor=not-a-cursor", "_cursor=WzEsMl0",
    )])


# --- _sort -------------------------------------------------------------------------------------

@pytest.fixture
def sortable(store: Any) -> None:
    seed(
        store,
        patient("a", name=[{"family": "Baker"}], birthDate="1990-01-01"),
        patient("b", name=[{"family": "adams"}], birthDate="1985-06-01"),
        patient("c", name=[{"family": "Carter"}], birthDate="1990-01-01"),
        patient("d", gender="unknown"),  # neither value: last in every order
        patient("e", name=[{"family": "Ávila"}], birthDate="2000-02-02"),
    )


@pytest.mark.parametrize(("sort", "expected"), [
    ("birthdate", "baced"),
    ("-birthdate", "eacbd"),
    ("family", "beacd"),
    ("-family", "caebd"),
    ("_id", "abcde"),
    ("-_id", "edcba"),
    ("birthdate,-family", "bcaed"),
    ("-birthdate,_id", "eacbd"),
])
def test_sort(client: Any, sortable: None, sort: str, expected: str) -> None:
    assert "".join(ids(get(client, f"/fhir/Patient?_sort={sort}"))) == expected


@pytest.mark.parametrize("sort", [
    "-birthdate", "_lastUpdated",
    "family", "-family,birthdate",
])
def test_sort_paging_is_complete_and_duplicate_free(client: Any, store: Any, sort: str) -> None:
    families = ["Zed", "Young", "Xu", None, "Wu"]
    seed(store, *[
        patient(f"p{i:02d}", **({"name": [{"family": families[i % 5]}]} if families[i % 5] else {}),
                **({"birthDate": f"19{50 + i % 7}-01-0{1 + i % 3}"} if i % 4 else {}))
        for i in range(25)
    ])
    unpaged = ids(get(client, f"/fhir/Patient?_sort={sort}&_count=100"))
    assert sorted(unpaged) == [f"p{i:02d}" for i in range(25)]
    assert walked_ids(walk(client, f"/fhir/Patient?_sort={sort}&_count=4")) == unpaged


@pytest.fixture
def sortable_observations(store: Any) -> None:
    seed(
        store,
        observation("s1", effectiveDateTime="2020-01-01", valueQuantity=quantity(5, "mg")),
        observation("s2", effectivePeriod={"start": "2019-06-01", "end": "2020-06-01"},
                    valueQuantity=quantity(10, "mg")),
        observation("s3", effectiveDateTime="2021-03-03T10:00:00Z", valueQuantity=quantity(1.5, "mg")),
        observation("s4", valueString="none"),
    )


@pytest.mark.parametrize(("sort", "expected"), [
    ("date", ["s2", "s1", "s3", "s4"]),
    ("-date", ["s3", "s2", "s1", "s4"]),
    ("value-quantity", ["s3", "s1", "s2", "s4"]),
    ("-value-quantity", ["s2", "s1", "s3", "s4"]),
])
def test_sort_observations_one_per_page(client: Any, sortable_observations: None, sort: str,
                                        expected: list[str]) -> None:
    assert walked_ids(walk(client, f"/fhir/Observation?_sort={sort}&_count=1")) == expected


def test_sort_by_unknown_parameter_is_400(client: Any) -> None:
    assert_outcome(get(client, "/fhir/Patient?_sort=shoe-size", status=400))


# --- _total, _summary, _elements ---------------------------------------------------------------

def test_total(client: Any, store: Any) -> None:
    seed(store, *numbered_patients(3))
    assert "total" not in get(client, "/fhir/Patient")
    accurate = get(client, "/fhir/Patient?_total=accurate&_count=1")
    assert accurate["total"] == 3
    assert len(ids(accurate)) == 1
    counted = get(client, "/fhir/Patient?_summary=count")
    assert counted["total"] == 3
    assert not counted.get("entry")
    assert get(client, "/fhir/Patient?_summary=count&_id=p01")["total"] == 1
    assert_outcome(get(client, "/fhir/Patient?_total=some", status=400))


def test_elements_keeps_listed_elements_and_marks_subsetted(client: Any, store: Any) -> None:
    seed(store, patient("p", meta={"tag": [{"system": "urn:tags", "code": "vip"}]}, gender="female",
                        birthDate="1970-01-01", name=[{"family": "Kept"}], address=[{"city": "Gone"}]))
    resource = entries(get(client, "/fhir/Patient?_elements=name,gender"), "match")[0]
    assert set(resource) == {"resourceType", "id", "meta", "name", "gender"}
    assert resource["name"] == [{"family": "Kept"}]
    tags = {(t.get("system"), t["code"]) for t in resource["meta"]["tag"]}
    assert ("urn:tags", "vip") in tags
    assert any(code == SUBSETTED for _, code in tags)


@pytest.fixture
def measured(store: Any) -> None:
    seed(store, observation("o", subject="Patient/x", valueQuantity=quantity(5, "mg"), note=[{"text": "n"}]))


def test_elements_keeps_choice_elements(client: Any, measured: None) -> None:
    resource = entries(get(client, "/fhir/Observation?_elements=value"), "match")[0]
    assert {"resourceType", "id", "meta", "valueQuantity"} <= set(resource)
    assert not {"subject", "note"} & set(resource)


def test_elements_keeps_mandatory_elements(client: Any, measured: None) -> None:
    resource = entries(get(client, "/fhir/Observation?_elements=value"), "match")[0]
    assert {"status", "code"} <= set(resource)


def test_summary_true_drops_non_summary_elements(client: Any, store: Any) -> None:
    seed(store, patient(
        "p", gender="male", name=[{"family": "Summary"}], birthDate="1970-01-01",
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
        communication=[{"language": {"text": "English"}}],
        contact=[{"name": {"family": "Next-of-kin"}}],
    ))
    resource = entries(get(client, "/fhir/Patient?_summary=true"), "match")[0]
    assert {"name", "gender", "birthDate"} <= set(resource)
    assert not {"text", "communication", "contact"} & set(resource)
    assert any(t["code"] == SUBSETTED for t in resource["meta"]["tag"])
    full = entries(get(client, "/fhir/Patient?_summary=false"), "match")[0]
    assert {"text", "communication", "contact"} <= set(full)
    data = entries(get(client, "/fhir/Patient?_summary=data"), "match")[0]
    assert "text" not in data
    assert {"communication", "contact", "name"} <= set(data)


# --- _include and _revinclude ------------------------------------------------------------------

@pytest.fixture
def care_network(store: Any) -> None:
    seed(
        store,
        {"resourceType": "Organization", "id": "org1", "name": "Clinic"},
        {"resourceType": "Practitioner", "id": "dr1"},
        {"resourceType": "Group", "id": "g1", "type": "person", "actual": True},
        patient("pA", generalPractitioner=[{"reference": "Practitioner/dr1"}],
                managingOrganization={"reference": "Organization/org1"},
                link=[{"other": {"reference": "Patient/pB"}, "type": "seealso"}]),
        patient("pB"),
        patient("pC"),
        observation("oA1", subject="Patient/pA", performer=[{"reference": "Practitioner/dr1"}]),
        observation("oA2", subject="Patient/pA"),
        observation("oB1", subject=f"{BASE}/fhir/Patient/pB"),
        observation("oG", subject="Group/g1"),
    )


def test_include_subject(client: Any, care_network: None) -> None:
    bundle = get(client, "/fhir/Observation?_include=Observation:subject")
    assert set(ids(bundle)) == {"oA1", "oA2", "oB1", "oG"}
    assert sorted(refs(bundle, "include")) == ["Group/g1", "Patient/pA", "Patient/pB"]
    assert_each_once(bundle)


def test_include_with_target_type(client: Any, care_network: None) -> None:
    for include in ("Observation:patient:Patient", "Observation:subject:Patient", "Observation:patient"):
        bundle = get(client, f"/fhir/Observation?_include={include}")
        assert sorted(refs(bundle, "include")) == ["Patient/pA", "Patient/pB"], include


def test_include_iterate(client: Any, care_network: None) -> None:
    base = "/fhir/Observation?_id=oA2&_include=Observation:subject"
    assert refs(get(client, base + "&_include=Patient:general-practitioner"), "include") == ["Patient/pA"]
    bundle = get(client, base + "&_include:iterate=Patient:general-practitioner&_include:iterate=Patient:organization")
    assert sorted(refs(bundle, "include")) == ["Organization/org1", "Patient/pA", "Practitioner/dr1"]
    assert_each_once(bundle)
    reverse = get(client, "/fhir/Patient?_id=pA&_revinclude=Observation:subject"
                          "&_include:iterate=Observation:performer")
    assert sorted(refs(reverse, "include")) == ["Observation/oA1", "Observation/oA2", "Practitioner/dr1"]


def test_include_never_repeats_a_match(client: Any, care_network: None) -> None:
    bundle = get(client, "/fhir/Patient?_id=pA,pB&_include=Patient:link")
    assert sorted(ids(bundle)) == ["pA", "pB"]
    assert refs(bundle, "include") == []


def test_revinclude(client: Any, care_network: None) -> None:
    bundle = get(client, "/fhir/Patient?_id=pA,pB,pC&_revinclude=Observation:subject")
    assert sorted(ids(bundle)) == ["pA", "pB", "pC"]
    assert sorted(refs(bundle, "include")) == ["Observation/oA1", "Observation/oA2", "Observation/oB1"]
    assert_each_once(bundle)
    both = get(client, "/fhir/Practitioner?_revinclude=Observation:performer&_revinclude=Patient:general-practitioner")
    assert sorted(refs(both, "include")) == ["Observation/oA1", "Patient/pA"]


def test_includes_are_not_truncated_by_count(client: Any, store: Any) -> None:
    people = numbered_patients(25)
    seed(store, *people, *[observation(f"o{i:02d}", subject=f"Patient/p{i:02d}") for i in range(25)],
         *[observation(f"x{i:02d}", subject=f"Patient/p{i:02d}") for i in range(25)])
    full = get(client, "/fhir/Observation?_id=" + ",".join(f"o{i:02d}" for i in range(25))
               + "&_count=25&_include=Observation:subject")
    assert len(ids(full)) == 25
    assert sorted(ids(full, "include")) == sorted(p["id"] for p in people)
    page = get(client, "/fhir/Patient?_count=5&_revinclude=Observation:subject")
    assert len(ids(page)) == 5
    assert len(ids(page, "include")) == 10
    assert link(page, "next") is not None


def test_include_of_unknown_parameter_is_400(client: Any, care_network: None) -> None:
    assert_outcome(get(client, "/fhir/Observation?_include=Observation:nonsense", status=400))


# --- compartments and $everything --------------------------------------------------------------

@pytest.fixture
def two_patients(store: Any) -> None:
    seed(
        store,
        {"resourceType": "Practitioner", "id": "dr1"},
        patient("pA", link=[{"other": {"reference": "Patient/pB"}, "type": "seealso"}]),
        patient("pB"),
        observation("oA1", subject="Patient/pA", performer=[{"reference": "Practitioner/dr1"}],
                    hasMember=[{"reference": "Observation/oB1"}]),
        observation("oA2", {"coding": [coding(LOINC, "8480-6")]}, subject="Patient/pA"),
        observation("oB1", subject="Patient/pB"),
        observation("oA3", subject=f"{BASE}/fhir/Patient/pA"),
        {"resourceType": "Condition", "id": "cA", "subject": {"reference": "Patient/pA"}},
        {"resourceType": "Condition", "id": "cB", "subject": {"reference": "Patient/pB"}},
        {"resourceType": "Encounter", "id": "eA", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "subject": {"reference": "Patient/pA"}},
    )


def test_compartment_search(client: Any, two_patients: None) -> None:
    assert found(client, "/fhir/Patient/pA/Observation") == {"oA1", "oA2", "oA3"}
    assert found(client, "/fhir/Patient/pA/Observation?code=8480-6") == {"oA2"}
    assert found(client, "/fhir/Patient/pB/Observation?code=8480-6") == set()
    assert found(client, "/fhir/Patient/pA/Condition") == {"cA"}
    assert found(client, "/fhir/Patient/pB/Observation") == {"oB1"}
    assert found(client, "/fhir/Patient/pA/Patient") == {"pA"}
    get(client, "/fhir/Patient/nobody/Observation", status=404)
    assert_outcome(get(client, "/fhir/Patient/pA/Practitioner", status=400))


def test_everything(client: Any, two_patients: None) -> None:
    bundle = get(client, "/fhir/Patient/pA/$everything")
    assert sorted(refs(bundle, "match")) == ["Condition/cA", "Encounter/eA", "Observation/oA1",
                                            "Observation/oA2", "Observation/oA3", "Patient/pA"]
    assert refs(bundle, "include") == ["Practitioner/dr1"]
    assert found(client, "/fhir/Patient/pA/$everything?_type=Observation") == {"oA1", "oA2", "oA3"}
    assert found(client, "/fhir/Patient/pA/$everything?_type=Patient,Condition") == {"pA", "cA"}
    get(client, "/fhir/Patient/nobody/$everything", status=404)


def test_everything_since(client: Any, two_patients: None) -> None:
    time.sleep(0.01)
    updated = put(client, observation("oA2", subject="Patient/pA", status="amended"))
    since = updated["meta"]["lastUpdated"]
    assert found(client, f"/fhir/Patient/pA/$everything?_since={since}") == {"oA2"}
    assert found(client, "/fhir/Patient/pA/$everything?_since=2999-01-01T00:00:00Z") == set()
    assert_outcome(get(client, "/fhir/Patient/pA/$everything?_since=yesterday", status=400))


def test_everything_paging(client: Any, store: Any, two_patients: None) -> None:
    seed(store, *[observation(f"n{i}", subject="Patient/pA") for i in range(7)],
         *[observation(f"m{i}", subject="Patient/pB") for i in range(3)])
    expected = {"pA", "oA1", "oA2", "oA3", "cA", "eA", *(f"n{i}" for i in range(7))}
    pages = walk(client, "/fhir/Patient/pA/$everything?_count=3")
    assert [len(ids(p)) for p in pages] == [3, 3, 3, 3, 1]
    collected = walked_ids(pages)
    assert len(collected) == len(set(collected))
    assert set(collected) == expected
    included = {i for p in pages for i in refs(p, "include")}
    assert included == {"Practitioner/dr1"}
    typed = walked_ids(walk(client, "/fhir/Patient/pA/$everything?_count=2&_type=Observation"))
    assert sorted(typed) == sorted(["oA1", "oA2", "oA3", *(f"n{i}" for i in range(7))])


def test_everything_repeated_type_parameters_union(client: Any, two_patients: None) -> None:
    assert found(client, "/fhir/Patient/pA/$everything?_type=Patient&_type=Condition") == {"pA", "cA"}


def test_everything_does_not_show_other_patients_through_audit_events(client: Any, app: Any, two_patients: None,
                                                                      audit_on: None) -> None:
    get(client, "/fhir/Patient?_id=pA,pB")
    app.extensions["gateway"].audit.flush()
    bundle = get(client, "/fhir/Patient/pA/$everything?_type=AuditEvent")
    events = [r for r in entries(bundle, "match") if r["resourceType"] == "AuditEvent"]
    assert events, "the search of both patients is in pA's access log"
    assert [r["id"] for r in events if "Patient/pB" in json.dumps(r)] == []


def test_everything_leaves_out_the_access_log_unless_asked(client: Any, app: Any, two_patients: None,
                                                          audit_on: None) -> None:
    get(client, "/fhir/Patient/pA")
    app.extensions["gateway"].audit.flush()
    types = {r["resourceType"] for r in entries(get(client, "/fhir/Patient/pA/$everything"), "match")}
    assert "AuditEvent" not in types and "Patient" in types


# --- unknown parameters and modifiers ----------------------------------------------------------

def test_unknown_parameter_is_ignored_with_a_warning(client: Any, store: Any) -> None:
    seed(store, patient("p", gender="male"), patient("q", gender="female"))
    bundle = get(client, "/fhir/Patient?gender=male&shoe-size=42")
    assert ids(bundle) == ["p"]
    outcomes = entries(bundle, "outcome")
    assert len(outcomes) == 1
    assert outcomes[0]["resourceType"] == "OperationOutcome"
    assert {i["severity"] for i in outcomes[0]["issue"]} == {"warning"}
    assert "shoe-size" in outcomes[0]["issue"][0]["diagnostics"]
    assert entries(get(client, "/fhir/Patient?gender=male"), "outcome") == []


def test_unknown_parameter_with_strict_handling_is_400(client: Any) -> None:
    body = get(client, "/fhir/Patient?shoe-size=42", status=400, headers={"Prefer": "handling=strict"})
    assert_outcome(body)
    assert get(client, "/fhir/Patient?gender=male", headers={"Prefer": "handling=strict"})["type"] == "searchset"


def test_unsupported_modifier_or_bad_value_is_400(client: Any) -> None:
    assert_rejected(client, [f"/fhir/{query}" for query in (
        "Patient?gender:contains=male",
        "Patient?family:text=smith",
        "Patient?birthdate:exact=2013",
        "Patient?family:below=smi",
        "Observation?subject:Practitioner=1",
        "Observation?subject:identifier=urn:mrn|1",
        "Observation?value-quantity:not=5",
        "Patient?gender:missing=maybe",
    )])


def test_unsupported_modifier_on_id_is_400(client: Any) -> None:
    assert_outcome(get(client, "/fhir/Patient?_id:contains=p", status=400))


# --- POST _search ------------------------------------------------------------------------------

def test_post_search_matches_get(client: Any, token_observations: None) -> None:
    query = {"code": "1234-5,999", "_sort": "-_id", "_count": "2"}
    via_get = get(client, "/fhir/Observation?code=1234-5,999&_sort=-_id&_count=2")
    response = client.post("/fhir/Observation/_search", data=query,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.get_data(as_text=True)
    via_post = response.get_json()
    assert ids(via_post) == ids(via_get) == ["o3", "o2"]
    assert walked_ids(walk(client, link(via_post, "next"))) == ["o1"]


# --- deleted resources -------------------------------------------------------------------------

def test_deleted_resources_never_appear(client: Any, store: Any) -> None:
    seed(store, patient("gone", name=[{"family": "Shared"}]), patient("kept", name=[{"family": "Shared"}]),
         {"resourceType": "Practitioner", "id": "dr"},
         observation("og", subject="Patient/gone"),
         observation("ok", subject="Patient/kept", performer=[{"reference": "Practitioner/dr"}]),
         observation("od", subject="Patient/kept"))
    for url in ("/fhir/Patient/gone", "/fhir/Observation/od", "/fhir/Practitioner/dr"):
        assert client.delete(url).status_code == 204
    assert found(client, "/fhir/Patient?family=shared") == {"kept"}
    assert found(client, "/fhir/Patient?_id=gone,kept") == {"kept"}
    assert found(client, "/fhir/Patient?name:missing=true") == set()
    assert found(client, "/fhir/Observation") == {"og", "ok"}
    included = get(client, "/fhir/Observation?_include=Observation:subject")
    assert refs(included, "include") == ["Patient/kept"]
    revincluded = get(client, "/fhir/Patient?_revinclude=Observation:subject")
    assert refs(revincluded, "include") == ["Observation/ok"]
    assert found(client, "/fhir/Patient/kept/Observation") == {"ok"}
    everything = get(client, "/fhir/Patient/kept/$everything")
    assert sorted(ids(everything)) == ["kept", "ok"]
    assert ids(everything, "include") == []
    assert get(client, "/fhir/Patient?_summary=count")["total"] == 1
    put(client, patient("gone", name=[{"family": "Shared"}]))
    assert found(client, "/fhir/Patient?family=shared") == {"gone", "kept"}


# --- statements reused across searches of one shape -----------------------------------------------

def test_searches_of_one_shape_share_a_statement_and_others_get_their_own(
        client: Any, token_observations: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statement built for a shape of search is kept and reused with other values; a search that
    differs in anything that shapes its SQL (modifier, number of values, system given or not, prefix)
    gets one of its own; the least recently used go first when there are too many."""
    from gateway.fhir import search

    monkeypatch.setattr(search, "_statements", search.OrderedDict())
    monkeypatch.setattr(search, "STATEMENT_CACHE_SIZE", 3)
    assert found(client, "/fhir/Observation?code=1234-5") == {"o1", "o2"}
    assert found(client, "/fhir/Observation?code=999") == {"o3"}  # same shape, other value
    assert len(search._statements) == 1
    cases = [
        ("code=1234-5,999", {"o1", "o2", "o3"}),
        (f"code={LOINC}|1234-5", {"o1"}),
        ("code=|1234-5", {"o2"}),
        ("code:not=1234-5", {"o3", "o4"}),
        ("code:text=blood", {"o1"}),
        ("_lastUpdated=gt2000", {"o1", "o2", "o3", "o4"}),
        ("_lastUpdated=lt2000", set()),
        ("code=999", {"o3"}),
    ]
    assert_cases(client, "Observation", cases)
    assert len(search._statements) == 3
    assert_cases(client, "Observation", cases)  # again, with the earlier shapes pushed out


def test_a_search_on_postgresql_waits_on_no_round_trip_that_sends_nothing(app: Any, store: Any, tmp_path: Any) -> None:
    """A search first writes what its transaction has buffered (Repository.flush). With nothing
    buffered it sends nothing: a psycopg pipeline with no statement in it still waits on the server
    once (it cost every search, history and version read a round trip)."""
    from gateway import db
    from gateway.fhir.search import search
    from tests.conftest import pg_round_trips

    engine = app.extensions["gateway"].engine
    if not db.is_postgres(engine):
        pytest.skip("round trips are PostgreSQL's")
    seed(store, {"resourceType": "Patient", "id": "trips", "name": [{"family": "Trip"}]})
    with pg_round_trips(engine, tmp_path / "search.trace") as trips, store.reading() as repo:
        _, found = search(repo, "Patient", [("family", "Trip")])
        assert [stored.id for stored in found.matches] == ["trips"]
    assert trips and all(trips), trips
