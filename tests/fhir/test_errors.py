"""Failures: each answers an OperationOutcome (application/fhir+json, no traceback) and writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from gateway import db

FHIR_JSON = "application/fhir+json"
LIMIT = 2 * 1024 * 1024
PID = "existing"
EXISTING = {"resourceType": "Patient", "id": PID, "gender": "female"}
OVERSIZED = json.dumps({"resourceType": "Patient", "id": PID, "text": {"status": "generated",
                                                                     "div": "x" * (LIMIT + 10)}})


@dataclass
class Case:
    method: str
    path: str
    body: Any = None  # dict/list: JSON-encoded; str/bytes: sent as is
    status: int = 400
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": FHIR_JSON})
    expression: str | None = None

    def send(self, client: Any) -> Any:
        data = json.dumps(self.body) if isinstance(self.body, dict | list) else self.body
        return client.open(self.path, method=self.method, data=data, headers=self.headers)


def _patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **fields}


OBSERVATION_WITHOUT_CODE = {"resourceType": "Observation", "status": "final"}
PATCH = [{"op": "replace", "path": "/gender", "value": "male"}]

CASES: dict[str, Case] = {
    # malformed bodies
    "post-malformed-json": Case("POST", "/fhir/Patient", '{"resourceType": "Patient",'),
    "put-malformed-json": Case("PUT", f"/fhir/Patient/{PID}", "{not json"),
    "post-json-array": Case("POST", "/fhir/Patient", [_patient()]),
    "post-empty-body": Case("POST", "/fhir/Patient", ""),
    "transaction-malformed-json": Case("POST", "/fhir", "[1, 2"),
    "patch-malformed-json": Case("PATCH", f"/fhir/Patient/{PID}", "[{",
                                 headers={"Content-Type": "application/json-patch+json"}),
    # resourceType and id against the URL
    "post-type-mismatch": Case("POST", "/fhir/Patient", OBSERVATION_WITHOUT_CODE | {"code": {"text": "x"}},
                               expression="resourceType"),
    "put-type-mismatch": Case("PUT", f"/fhir/Patient/{PID}", {"resourceType": "Observation", "id": PID}),
    "put-id-mismatch": Case("PUT", f"/fhir/Patient/{PID}", _patient(id="other"), expression="Patient.id"),
    "put-id-missing": Case("PUT", f"/fhir/Patient/{PID}", _patient(gender="male")),
    "post-not-a-bundle": Case("POST", "/fhir", _patient()),
    "post-collection-bundle": Case("POST", "/fhir", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:0b1f", "resource": _patient()}]}, expression="Bundle.type"),
    # invalid resources
    "post-bad-birthdate": Case("POST", "/fhir/Patient", _patient(birthDate="1970-13-45"), 422,
                               expression="Patient.birthDate"),
    "put-bad-birthdate": Case("PUT", f"/fhir/Patient/{PID}", _patient(id=PID, birthDate="yesterday"), 422,
                              expression="Patient.birthDate"),
    "post-observation-without-code": Case("POST", "/fhir/Observation", OBSERVATION_WITHOUT_CODE, 422,
                                          expression="Observation.code"),
    "post-unknown-element": Case("POST", "/fhir/Patient", _patient(favouriteColour="blue"), 422),
    "post-bad-id": Case("POST", "/fhir/Patient", _patient(id="no spaces allowed"), 422, expression="Patient.id"),
    "patch-to-invalid": Case("PATCH", f"/fhir/Patient/{PID}", [{"op": "add", "path": "/gender", "value": 7}],
                             422, headers={"Content-Type": "application/json-patch+json"}),
    "patch-failed-test": Case("PATCH", f"/fhir/Patient/{PID}", [{"op": "test", "path": "/gender", "value": "x"}],
                              422, headers={"Content-Type": "application/json-patch+json"}),
    "patch-missing-path": Case("PATCH", f"/fhir/Patient/{PID}", [{"op": "remove", "path": "/name/3"}], 422,
                               headers={"Content-Type": "application/json-patch+json"}),
    # size
    "post-too-large": Case("POST", "/fhir/Patient", OVERSIZED, 413),
    "put-too-large": Case("PUT", f"/fhir/Patient/{PID}", OVERSIZED, 413),
    "transaction-too-large": Case("POST", "/fhir", OVERSIZED, 413),
    # media types
    "post-xml": Case("POST", "/fhir/Patient", "<Patient xmlns='http://hl7.org/fhir'/>", 415,
                     headers={"Content-Type": "text/xml"}),
    "put-xml": Case("PUT", f"/fhir/Patient/{PID}", "<Patient/>", 415, headers={"Content-Type": "text/xml"}),
    "transaction-xml": Case("POST", "/fhir", "<Bundle/>", 415, headers={"Content-Type": "application/fhir+xml"}),
    "post-form": Case("POST", "/fhir/Patient", "a=b", 415,
                      headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "patch-fhir-json": Case("PATCH", f"/fhir/Patient/{PID}", PATCH, 415),
    "get-accept-xml": Case("GET", "/fhir/Patient", status=406, headers={"Accept": "application/fhir+xml"}),
    "read-accept-xml": Case("GET", f"/fhir/Patient/{PID}", status=406, headers={"Accept": "application/fhir+xml"}),
    "post-accept-xml": Case("POST", "/fhir/Patient", _patient(), 406,
                            headers={"Content-Type": FHIR_JSON, "Accept": "application/fhir+xml"}),
    "get-format-xml": Case("GET", "/fhir/Patient?_format=xml", status=406),
    "read-format-xml": Case("GET", f"/fhir/Patient/{PID}?_format=application/fhir%2Bxml", status=406),
    "post-format-xml": Case("POST", "/fhir/Patient?_format=xml", _patient(), 406),
    # unknown types, ids and paths
    "search-unknown-type": Case("GET", "/fhir/Unicorn", status=404),
    "read-unknown-type": Case("GET", "/fhir/Unicorn/1", status=404),
    "post-unknown-type": Case("POST", "/fhir/Unicorn", {"resourceType": "Unicorn"}, 404),
    "put-unknown-type": Case("PUT", "/fhir/Unicorn/1", {"resourceType": "Unicorn", "id": "1"}, 404),
    "read-unknown-id": Case("GET", "/fhir/Patient/not-there", status=404),
    "vread-unknown-version": Case("GET", f"/fhir/Patient/{PID}/_history/9", status=404),
    "vread-bad-version": Case("GET", f"/fhir/Patient/{PID}/_history/latest", status=404),
    "history-unknown-id": Case("GET", "/fhir/Patient/not-there/_history", status=404),
    "patch-unknown-id": Case("PATCH", "/fhir/Patient/not-there", PATCH, 404,
                             headers={"Content-Type": "application/json-patch+json"}),
    "unknown-sub-path": Case("GET", f"/fhir/Patient/{PID}/nothing/here", status=404),
    # parameters and headers
    "search-count-text": Case("GET", "/fhir/Patient?_count=many"),
    "search-count-negative": Case("GET", "/fhir/Patient?_count=-1"),
    "history-count-text": Case("GET", "/fhir/_history?_count=ten"),
    "history-bad-since": Case("GET", "/fhir/_history?_since=last-week"),
    "search-bad-summary": Case("GET", "/fhir/Patient?_summary=maybe"),
    "search-bad-date": Case("GET", "/fhir/Patient?birthdate=not-a-date"),
    "put-bad-if-match": Case("PUT", f"/fhir/Patient/{PID}", _patient(id=PID, gender="male"),
                             headers={"Content-Type": FHIR_JSON, "If-Match": "banana"}),
    "delete-type-without-criteria": Case("DELETE", "/fhir/Patient", status=405),
    "put-type-without-criteria": Case("PUT", "/fhir/Patient", _patient(), 405),
    "method-not-allowed": Case("PATCH", "/fhir/Patient", PATCH, 405,
                               headers={"Content-Type": "application/json-patch+json"}),
    # conflicts
    "put-stale-if-match": Case("PUT", f"/fhir/Patient/{PID}", _patient(id=PID, gender="male"), 412,
                               headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"3"'}),
}


def written(store: Any) -> int:
    """Versions of anything but AuditEvent (which the audit log writes for every request)."""
    v = db.resource_version.c
    with store.reading() as repo:
        query = select(func.count()).select_from(db.resource_version).where(v.resource_type != "AuditEvent")
        return repo.conn.execute(query).scalar_one()


def assert_outcome(response: Any, status: int) -> dict[str, Any]:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text[:500]
    assert response.mimetype == FHIR_JSON
    assert "Traceback" not in text and 'File "/' not in text
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and all(issue["severity"] in ("error", "fatal") for issue in body["issue"])
    assert all(issue.get("diagnostics") for issue in body["issue"])
    return body


@pytest.fixture
def existing(client: Any) -> None:
    response = client.put(f"/fhir/Patient/{PID}", json=EXISTING, headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 201


@pytest.mark.parametrize("name", list(CASES))
def test_failure_is_operation_outcome_and_writes_nothing(client: Any, store: Any, existing: None, name: str) -> None:
    case = CASES[name]
    before = written(store)
    body = assert_outcome(case.send(client), case.status)
    if case.expression:
        assert case.expression in body["issue"][0].get("expression", []), body
    assert written(store) == before
    current = client.get(f"/fhir/Patient/{PID}").get_json()
    assert (current["meta"]["versionId"], current["gender"]) == ("1", "female")


def test_counts_unchanged_after_rejected_creates(client: Any) -> None:
    for name in ("post-bad-birthdate", "post-too-large", "post-xml", "post-accept-xml", "post-malformed-json",
                 "post-observation-without-code", "post-collection-bundle"):
        assert CASES[name].send(client).status_code == CASES[name].status
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 0
    assert client.get("/fhir/Observation?_summary=count").get_json()["total"] == 0


def test_invalid_resource_names_each_element(client: Any) -> None:
    response = client.post("/fhir/Patient", json=_patient(birthDate="1970-13-45", active="perhaps"),
                           headers={"Content-Type": FHIR_JSON})
    body = assert_outcome(response, 422)
    expressions = {e for issue in body["issue"] for e in issue.get("expression", [])}
    assert {"Patient.birthDate", "Patient.active"} <= expressions


def test_deleted_resource_is_410_outcome(client: Any, existing: None) -> None:
    client.delete(f"/fhir/Patient/{PID}")
    body = assert_outcome(client.get(f"/fhir/Patient/{PID}"), 410)
    assert body["issue"][0]["code"] == "deleted"
    assert_outcome(client.get(f"/fhir/Patient/{PID}/_history/2"), 410)


def test_413_outcome_names_the_limit(client: Any) -> None:
    body = assert_outcome(CASES["post-too-large"].send(client), 413)
    assert str(LIMIT) in body["issue"][0]["diagnostics"]


def test_a_body_just_under_the_limit_is_accepted(client: Any) -> None:
    shell = json.dumps({"resourceType": "Patient", "text": {"status": "generated", "div": ""}})
    div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * (LIMIT - len(shell) - 200) + "</div>"
    data = json.dumps({"resourceType": "Patient", "text": {"status": "generated", "div": div}})
    assert len(data) < LIMIT
    assert client.post("/fhir/Patient", data=data, headers={"Content-Type": FHIR_JSON}).status_code == 201


def test_unexpected_error_is_fatal_outcome_without_traceback(app: Any, client: Any, existing: None) -> None:
    store = app.extensions["gateway"].store

    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    store.reading = explode
    response = client.get(f"/fhir/Patient/{PID}")
    text = response.get_data(as_text=True)
    assert response.status_code == 500
    assert response.mimetype == FHIR_JSON
    assert response.get_json()["issue"][0]["severity"] == "fatal"
    assert "secret internal detail" not in text and "Traceback" not in text


@pytest.mark.parametrize(("cause", "status"), [("unreachable", 503), ("full", 507)])
def test_a_database_down_or_full_is_503_or_507_no_store_with_retry_after(app: Any, client: Any, existing: None,
                                                                        cause: str, status: int) -> None:
    import psycopg
    from sqlalchemy.exc import OperationalError

    store = app.extensions["gateway"].store
    error = psycopg.OperationalError("connection failed") if cause == "unreachable" else \
        psycopg.errors.DiskFull("could not extend file: No space left on device")

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT ...", {}, error)

    store.reading = store.write = fail
    for response in (client.get(f"/fhir/Patient/{PID}"),
                     client.post("/fhir/Patient", data='{"resourceType": "Patient"}',
                                 headers={"Content-Type": FHIR_JSON})):
        assert response.status_code == status
        assert response.mimetype == FHIR_JSON and response.headers["Retry-After"] == "5"
        issue = response.get_json()["issue"][0]
        assert issue["code"] == "no-store" and "Traceback" not in response.get_data(as_text=True)


@pytest.mark.slow
def test_chunked_body_over_the_limit_is_413(live_server: str) -> None:
    data = OVERSIZED.encode()

    def chunks() -> Any:
        for start in range(0, len(data), 1 << 16):
            yield data[start:start + (1 << 16)]

    response = requests.post(f"{live_server}/fhir/Patient", data=chunks(), timeout=60,
                             headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 413
