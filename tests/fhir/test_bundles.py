"""Transaction and batch Bundles posted to the base URL."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway import db

FHIR_JSON = {"Content-Type": "application/fhir+json"}
SYSTEM = "urn:test:mrn"
PATIENT_URN = "urn:uuid:9a3c5a0e-1d0c-4a36-8d7e-000000000001"
OBSERVATION_URN = "urn:uuid:9a3c5a0e-1d0c-4a36-8d7e-000000000002"


# --- helpers ---

def patient(mrn: str | None = None, **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", **fields}
    if mrn:
        resource["identifier"] = [{"system": SYSTEM, "value": mrn}]
    return resource


def observation(subject: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": subject}, **fields}


def entry(method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None,
          **request: str) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        out["resource"] = resource
    if full_url:
        out["fullUrl"] = full_url
    return out


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def send(client: Any, body: dict[str, Any]) -> Any:
    return client.post("/fhir", data=json.dumps(body), headers=FHIR_JSON)


def create(client: Any, resource: dict[str, Any]) -> str:
    response = client.post(f"/fhir/{resource['resourceType']}", data=json.dumps(resource), headers=FHIR_JSON)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


def read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference.split('/_history')[0]}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def statuses(response: Any) -> list[str]:
    return [e["response"]["status"] for e in response.get_json()["entry"]]


def written(store: Any) -> int:
    v = db.resource_version.c
    with store.reading() as repo:
        query = select(func.count()).select_from(db.resource_version).where(v.resource_type != "AuditEvent")
        return repo.conn.execute(query).scalar_one()


# --- transactions ---

def test_transaction_rewrites_urn_uuid_references(client: Any) -> None:
    response = send(client, bundle(
        "transaction",
        entry("POST", "Observation", observation(PATIENT_URN), OBSERVATION_URN),
        entry("POST", "Patient", patient("T1"), PATIENT_URN),
        entry("POST", "Observation", observation(PATIENT_URN, hasMember=[{"reference": OBSERVATION_URN}])),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "transaction-response"
    assert statuses(response) == ["201 Created"] * 3
    locations = [e["response"]["location"] for e in body["entry"]]
    assert [loc.split("/")[0] for loc in locations] == ["Observation", "Patient", "Observation"]
    assert all(loc.endswith("/_history/1") for loc in locations)
    assert all(e["response"]["etag"] == 'W/"1"' for e in body["entry"])
    patient_ref = locations[1].split("/_history")[0]
    first, second = read(client, locations[0]), read(client, locations[2])
    assert first["subject"]["reference"] == patient_ref
    assert second["subject"]["reference"] == patient_ref
    assert second["hasMember"] == [{"reference": locations[0].split("/_history")[0]}]
    assert "urn:uuid" not in json.dumps([first, second])


def test_transaction_conditional_create_reuses_existing(client: Any) -> None:
    existing = create(client, patient("T2"))
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("T2", gender="male"), PATIENT_URN, ifNoneExist=f"identifier={SYSTEM}|T2"),
        entry("POST", "Observation", observation(PATIENT_URN)),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    matched, created = response.get_json()["entry"]
    assert matched["response"]["status"].startswith("200")
    assert matched["response"]["location"] == f"Patient/{existing}/_history/1"
    assert created["response"]["status"] == "201 Created"
    assert read(client, created["response"]["location"])["subject"]["reference"] == f"Patient/{existing}"
    current = read(client, f"Patient/{existing}")
    assert (current["meta"]["versionId"], "gender" in current) == ("1", False)
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 1


def test_transaction_conditional_create_without_match_creates(client: Any) -> None:
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("T8"), PATIENT_URN, ifNoneExist=f"identifier={SYSTEM}|T8"),
        entry("POST", "Observation", observation(PATIENT_URN)),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert statuses(response) == ["201 Created", "201 Created"]
    patient_location, observation_location = (e["response"]["location"] for e in response.get_json()["entry"])
    assert read(client, observation_location)["subject"]["reference"] == patient_location.split("/_history")[0]


def test_transaction_if_none_exist_matching_two_is_412(client: Any, store: Any) -> None:
    create(client, patient("T3"))
    create(client, patient("T3"))
    before = written(store)
    response = send(client, bundle(
        "transaction", entry("POST", "Patient", patient("T3"), ifNoneExist=f"identifier={SYSTEM}|T3")))
    assert response.status_code == 412
    assert written(store) == before


def test_transaction_with_invalid_entry_writes_nothing(client: Any, store: Any) -> None:
    existing = create(client, patient("T4"))
    before = written(store)
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("T5"), PATIENT_URN),
        entry("PUT", f"Patient/{existing}", patient("T4", id=existing, gender="male")),
        entry("POST", "Observation", {"resourceType": "Observation", "status": "final",
                                      "subject": {"reference": PATIENT_URN}}),
    ))
    assert response.status_code == 422
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2]" in outcome["issue"][0]["diagnostics"]
    assert "Observation.code" in json.dumps(outcome)
    assert written(store) == before


def test_transaction_failing_during_execution_rolls_back(client: Any, store: Any) -> None:
    existing = create(client, patient("T6"))
    before = written(store)
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("T7"), PATIENT_URN),
        entry("POST", "Observation", observation(PATIENT_URN)),
        entry("DELETE", "Patient?identifier=nothing|matches"),
        entry("PUT", f"Patient/{existing}", patient("T6", id=existing, gender="male"), ifMatch='W/"5"'),
    ))
    assert response.status_code == 412
    assert "Bundle.entry[3]" in response.get_json()["issue"][0]["diagnostics"]
    assert written(store) == before
    assert client.get("/fhir/Observation?_summary=count").get_json()["total"] == 0


def test_transaction_entry_without_request_names_the_entry(client: Any, store: Any) -> None:
    response = send(client, bundle("transaction", entry("POST", "Patient", patient()), {"resource": patient()}))
    assert response.status_code == 400
    assert "Bundle.entry[1]" in response.get_data(as_text=True)
    assert written(store) == 0


def test_transaction_put_delete_and_patch_entries(client: Any) -> None:
    kept = create(client, patient("K", gender="female"))
    doomed = create(client, patient("D"))
    patched = create(client, patient("P", gender="female"))
    patch = base64.b64encode(json.dumps([{"op": "replace", "path": "/gender", "value": "other"}]).encode())
    response = send(client, bundle(
        "transaction",
        entry("PUT", f"Patient/{kept}", patient("K", id=kept, gender="male")),
        entry("DELETE", f"Patient/{doomed}"),
        entry("PUT", "Patient/brand-new", patient("N", id="brand-new")),
        entry("PATCH", f"Patient/{patched}", {"resourceType": "Binary", "contentType": "application/json-patch+json",
                                              "data": patch.decode()}),
        entry("DELETE", "Patient/never-existed"),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert statuses(response) == ["200 OK", "204 No Content", "201 Created", "200 OK", "204 No Content"]
    locations = [e["response"].get("location") for e in response.get_json()["entry"]]
    assert locations[0] == f"Patient/{kept}/_history/2"
    assert locations[2] == "Patient/brand-new/_history/1"
    assert read(client, f"Patient/{kept}")["gender"] == "male"
    assert client.get(f"/fhir/Patient/{doomed}").status_code == 410
    assert read(client, "Patient/brand-new")["identifier"][0]["value"] == "N"
    assert read(client, f"Patient/{patched}")["gender"] == "other"


def test_transaction_conditional_put_and_delete(client: Any) -> None:
    existing = create(client, patient("C1"))
    doomed = create(client, patient("C2"))
    response = send(client, bundle(
        "transaction",
        entry("PUT", f"Patient?identifier={SYSTEM}|C1", patient("C1", gender="male"), PATIENT_URN),
        entry("PUT", f"Patient?identifier={SYSTEM}|C3", patient("C3")),
        entry("DELETE", f"Patient?identifier={SYSTEM}|C2"),
        entry("POST", "Observation", observation(PATIENT_URN)),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert statuses(response) == ["200 OK", "201 Created", "204 No Content", "201 Created"]
    assert body["entry"][0]["response"]["location"] == f"Patient/{existing}/_history/2"
    assert read(client, body["entry"][3]["response"]["location"])["subject"]["reference"] == f"Patient/{existing}"
    assert client.get(f"/fhir/Patient/{doomed}").status_code == 410


def test_get_entries_inside_a_transaction(client: Any) -> None:
    existing = create(client, patient("G1", gender="female"))
    response = send(client, bundle(
        "transaction",
        entry("GET", f"Patient/{existing}"),
        entry("POST", "Patient", patient("G2")),
        entry("GET", f"Patient?identifier={SYSTEM}|G2"),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    read_entry, created, search = response.get_json()["entry"]
    assert read_entry["response"]["status"] == "200 OK"
    assert read_entry["resource"]["id"] == existing
    assert read_entry["resource"]["gender"] == "female"
    assert created["response"]["status"] == "201 Created"
    # GETs run after the writes, so the search sees the Patient created by the same transaction.
    assert search["resource"]["type"] == "searchset"
    assert [e["resource"]["identifier"][0]["value"] for e in search["resource"]["entry"]] == ["G2"]


def test_get_of_absent_resource_fails_the_transaction(client: Any, store: Any) -> None:
    response = send(client, bundle("transaction", entry("POST", "Patient", patient("G3")),
                                   entry("GET", "Patient/not-there")))
    assert response.status_code == 404
    assert "Bundle.entry[1]" in response.get_json()["issue"][0]["diagnostics"]
    assert written(store) == 0


def test_conditional_references_are_resolved(client: Any, store: Any) -> None:
    existing = create(client, patient("R1"))
    response = send(client, bundle(
        "transaction",
        entry("POST", "Observation", observation(f"Patient?identifier={SYSTEM}|R1")),
        entry("PUT", "Observation/by-put", observation(f"Patient?identifier={SYSTEM}|R1", id="by-put")),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    for result in response.get_json()["entry"]:
        assert read(client, result["response"]["location"])["subject"]["reference"] == f"Patient/{existing}"


def test_unmatched_conditional_reference_fails_the_transaction(client: Any, store: Any) -> None:
    before = written(store)
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("R2")),
        entry("POST", "Observation", observation(f"Patient?identifier={SYSTEM}|nobody")),
    ))
    assert response.status_code == 412
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert written(store) == before


def test_unmatched_conditional_reference_names_the_entry(client: Any) -> None:
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", patient("R2")),
        entry("POST", "Observation", observation(f"Patient?identifier={SYSTEM}|nobody")),
    ))
    assert "Bundle.entry[1]" in response.get_json()["issue"][0]["diagnostics"]


def test_conditional_reference_matching_two_fails(client: Any, store: Any) -> None:
    create(client, patient("R3"))
    create(client, patient("R3"))
    before = written(store)
    response = send(client, bundle(
        "transaction", entry("POST", "Observation", observation(f"Patient?identifier={SYSTEM}|R3"))))
    assert response.status_code == 412
    assert written(store) == before


def test_transaction_response_in_entry_order_with_mixed_methods(client: Any) -> None:
    kept = create(client, patient("O1"))
    doomed = create(client, patient("O4"))
    response = send(client, bundle(
        "transaction",
        entry("GET", f"Patient/{kept}"),
        entry("PUT", "Patient/ordered", patient("O2", id="ordered")),
        entry("POST", "Patient", patient("O3")),
        entry("DELETE", f"Patient/{doomed}"),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert statuses(response) == ["200 OK", "201 Created", "201 Created", "204 No Content"]
    entries = response.get_json()["entry"]
    assert entries[0]["resource"]["id"] == kept
    assert entries[1]["response"]["location"] == "Patient/ordered/_history/1"
    assert read(client, entries[2]["response"]["location"])["identifier"][0]["value"] == "O3"


# --- batches ---

def test_batch_entries_are_independent(client: Any, store: Any) -> None:
    existing = create(client, patient("B1"))
    response = send(client, bundle(
        "batch",
        entry("POST", "Patient", patient("B2")),
        entry("POST", "Observation", {"resourceType": "Observation", "status": "final"}),
        entry("PUT", f"Patient/{existing}", patient("B1", id=existing, gender="male"), ifMatch='W/"9"'),
        entry("GET", "Patient/not-there"),
        entry("GET", f"Patient/{existing}"),
        entry("DELETE", f"Patient/{existing}"),
    ))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["type"] == "batch-response"
    codes = [s.split()[0] for s in statuses(response)]
    assert codes == ["201", "422", "412", "404", "200", "204"]
    for failed in body["entry"][1:4]:
        assert failed["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert "Observation.code" in json.dumps(body["entry"][1]["response"]["outcome"])
    assert read(client, body["entry"][0]["response"]["location"])["identifier"][0]["value"] == "B2"
    assert body["entry"][4]["resource"]["id"] == existing
    assert client.get(f"/fhir/Patient/{existing}").status_code == 410
    assert client.get("/fhir/Observation?_summary=count").get_json()["total"] == 0


def test_batch_conditional_create(client: Any) -> None:
    existing = create(client, patient("B3"))
    response = send(client, bundle(
        "batch",
        entry("POST", "Patient", patient("B3"), ifNoneExist=f"identifier={SYSTEM}|B3"),
        entry("POST", "Patient", patient("B4"), ifNoneExist=f"identifier={SYSTEM}|B4"),
    ))
    matched, created = response.get_json()["entry"]
    assert matched["response"]["status"].startswith("200")
    assert matched["response"]["location"] == f"Patient/{existing}/_history/1"
    assert created["response"]["status"] == "201 Created"
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 2


# --- not transaction or batch ---

@pytest.mark.parametrize("kind", ["collection", "document", "searchset", "message", None])
def test_other_bundle_types_are_rejected(client: Any, store: Any, kind: str | None) -> None:
    body = bundle(kind or "", entry("POST", "Patient", patient("X"), PATIENT_URN))
    if kind is None:
        del body["type"]
    response = send(client, body)
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert written(store) == 0
