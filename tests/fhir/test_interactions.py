"""REST interactions against the store: create, read, vread, update, patch, delete, history,
conditional interactions, Prefer, decimals, metadata, health and audit."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import pytest

from gateway.fhir import jsonio

BASE = "http://testserver"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
SYSTEM = "urn:test:mrn"


# --- helpers ---

def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **fields}


def with_mrn(value: str, **fields: Any) -> dict[str, Any]:
    return patient(identifier=[{"system": SYSTEM, "value": value}], **fields)


def observation(patient_id: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": f"Patient/{patient_id}"}, **fields}


def post(client: Any, resource: dict[str, Any], **headers: str) -> Any:
    return client.post(f"/fhir/{resource['resourceType']}", data=json.dumps(resource),
                       headers={**FHIR_JSON, **headers})


def put(client: Any, path: str, resource: dict[str, Any], **headers: str) -> Any:
    return client.put(path, data=json.dumps(resource), headers={**FHIR_JSON, **headers})


def create(client: Any, resource: dict[str, Any]) -> dict[str, Any]:
    response = post(client, resource)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def local(url: str) -> str:
    assert url.startswith(BASE), url
    return url[len(BASE):]


def count(client: Any, resource_type: str) -> int:
    return client.get(f"/fhir/{resource_type}?_summary=count").get_json()["total"]


def history_versions(client: Any, path: str) -> list[tuple[str, str | None, str]]:
    """(method, versionId or None, id) of every entry of a history, following next links."""
    out: list[tuple[str, str | None, str]] = []
    url: str | None = path
    while url:
        bundle = client.get(url).get_json()
        assert bundle["type"] == "history"
        for entry in bundle["entry"]:
            resource = entry.get("resource")
            out.append((entry["request"]["method"], resource["meta"]["versionId"] if resource else None,
                        entry["fullUrl"].rsplit("/", 1)[1]))
        url = next((local(link["url"]) for link in bundle["link"] if link["relation"] == "next"), None)
    return out


def flushed_audit_events(app: Any, client: Any) -> list[dict[str, Any]]:
    app.extensions["gateway"].audit.flush()
    bundle = client.get("/fhir/AuditEvent?_count=1000").get_json()
    return [entry["resource"] for entry in bundle["entry"]]


def references(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "what" in e}


# --- create and read ---

def test_create_assigns_id_version_and_headers(client: Any) -> None:
    response = post(client, patient(id="client-chosen", gender="female"))
    assert response.status_code == 201
    body = response.get_json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert response.headers["Location"] == f"{BASE}/fhir/Patient/{body['id']}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    last_modified = email.utils.parsedate_to_datetime(response.headers["Last-Modified"])
    updated = datetime.fromisoformat(body["meta"]["lastUpdated"].replace("Z", "+00:00")).replace(microsecond=0)
    assert last_modified == updated
    assert response.content_type.startswith("application/fhir+json")


def test_read_returns_stored_body(client: Any) -> None:
    created = post(client, patient(gender="male", birthDate="1970-01-02"))
    response = client.get(f"/fhir/Patient/{created.get_json()['id']}")
    assert response.status_code == 200
    assert response.get_data() == created.get_data()
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Last-Modified"] == created.headers["Last-Modified"]


def test_if_none_match(client: Any) -> None:
    pid = create(client, patient())["id"]
    not_modified = client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": 'W/"1"'})
    assert not_modified.status_code == 304
    assert not_modified.get_data() == b""
    assert not_modified.headers["ETag"] == 'W/"1"'
    changed = client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": 'W/"2"'})
    assert changed.status_code == 200
    assert changed.get_json()["id"] == pid


def test_if_modified_since(client: Any) -> None:
    created = post(client, patient())
    path = f"/fhir/Patient/{created.get_json()['id']}"
    same = client.get(path, headers={"If-Modified-Since": created.headers["Last-Modified"]})
    assert same.status_code == 304
    future = client.get(path, headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert future.status_code == 304
    past = client.get(path, headers={"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert past.status_code == 200
    assert past.get_json()["id"] == created.get_json()["id"]


def test_unknown_extension_is_accepted_and_kept(client: Any) -> None:
    extension = [{"url": "http://example.org/fhir/StructureDefinition/not-known", "valueString": "kept"}]
    created = create(client, patient(extension=extension, birthDate="1980-05-06",
                                     _birthDate={"extension": extension}))
    read = client.get(f"/fhir/Patient/{created['id']}").get_json()
    assert read["extension"] == extension
    assert read["_birthDate"] == {"extension": extension}


# --- versions: update, vread ---

def test_update_increments_version_and_vread_serves_old_versions(client: Any) -> None:
    pid = create(client, patient(gender="female"))["id"]
    bodies = {}
    for version, gender in ((2, "male"), (3, "other")):
        response = put(client, f"/fhir/Patient/{pid}", patient(id=pid, gender=gender))
        assert response.status_code == 200
        assert response.headers["ETag"] == f'W/"{version}"'
        assert response.headers["Location"] == f"{BASE}/fhir/Patient/{pid}/_history/{version}"
        assert response.get_json()["meta"]["versionId"] == str(version)
        bodies[version] = response.get_data()
    first = client.get(f"/fhir/Patient/{pid}/_history/1")
    assert first.status_code == 200
    assert first.get_json()["gender"] == "female"
    assert first.headers["ETag"] == 'W/"1"'
    assert client.get(f"/fhir/Patient/{pid}/_history/2").get_data() == bodies[2]
    assert client.get(f"/fhir/Patient/{pid}").get_data() == bodies[3]
    assert client.get(f"/fhir/Patient/{pid}/_history/4").status_code == 404


def test_update_with_identical_content_creates_no_version(client: Any) -> None:
    created = create(client, patient(gender="female"))
    pid = created["id"]
    # The body as read back (meta included) and the bare body both count as unchanged.
    for body in (created, patient(id=pid, gender="female")):
        response = put(client, f"/fhir/Patient/{pid}", body)
        assert response.status_code == 200
        assert response.headers["ETag"] == 'W/"1"'
        assert response.get_json()["meta"] == created["meta"]
    assert history_versions(client, f"/fhir/Patient/{pid}/_history") == [("POST", "1", pid)]


def test_update_changing_only_decimal_precision_is_stored(client: Any) -> None:
    created = client.post("/fhir/Observation", data=DECIMAL_OBSERVATION.replace("1.50", "1.5"), headers=FHIR_JSON)
    oid = created.get_json()["id"]
    changed = created.get_data(as_text=True).replace('"value":1.5,', '"value":1.50,')
    assert '"value":1.50,' in changed
    response = client.put(f"/fhir/Observation/{oid}", data=changed, headers=FHIR_JSON)
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    assert '"value":1.50,' in client.get(f"/fhir/Observation/{oid}").get_data(as_text=True)


@pytest.mark.parametrize("if_match", ['W/"1"', '"1"', "1"])
def test_if_match_forms_accepted(client: Any, if_match: str) -> None:
    pid = create(client, patient())["id"]
    response = put(client, f"/fhir/Patient/{pid}", patient(id=pid, gender="male"), **{"If-Match": if_match})
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'


@pytest.mark.parametrize("if_match", ['W/"2"', '"7"', "0"])
def test_if_match_mismatch_is_412_and_writes_nothing(client: Any, if_match: str) -> None:
    pid = create(client, patient(gender="female"))["id"]
    response = put(client, f"/fhir/Patient/{pid}", patient(id=pid, gender="male"), **{"If-Match": if_match})
    assert response.status_code == 412
    assert response.get_json()["resourceType"] == "OperationOutcome"
    current = client.get(f"/fhir/Patient/{pid}").get_json()
    assert (current["meta"]["versionId"], current["gender"]) == ("1", "female")


def test_update_of_new_id_creates(client: Any) -> None:
    response = put(client, "/fhir/Patient/chosen-by-client", patient(id="chosen-by-client"))
    assert response.status_code == 201
    assert response.headers["Location"] == f"{BASE}/fhir/Patient/chosen-by-client/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert client.get("/fhir/Patient/chosen-by-client").status_code == 200


def test_update_with_if_match_of_absent_resource_is_412(client: Any) -> None:
    response = put(client, "/fhir/Patient/absent", patient(id="absent"), **{"If-Match": 'W/"1"'})
    assert response.status_code == 412
    assert client.get("/fhir/Patient/absent").status_code == 404


# --- delete ---

def test_delete_then_read_is_gone_and_history_shows_it(client: Any) -> None:
    pid = create(client, patient(gender="female"))["id"]
    put(client, f"/fhir/Patient/{pid}", patient(id=pid, gender="male"))
    response = client.delete(f"/fhir/Patient/{pid}")
    assert response.status_code == 204
    assert response.get_data() == b""
    gone = client.get(f"/fhir/Patient/{pid}")
    assert gone.status_code == 410
    assert gone.get_json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Patient/{pid}/_history/1").get_json()["gender"] == "female"
    assert client.get(f"/fhir/Patient/{pid}/_history/2").get_json()["gender"] == "male"
    assert client.get(f"/fhir/Patient/{pid}/_history/3").status_code == 410
    assert history_versions(client, f"/fhir/Patient/{pid}/_history") == [
        ("DELETE", None, pid), ("PUT", "2", pid), ("POST", "1", pid)]
    bundle = client.get(f"/fhir/Patient/{pid}/_history").get_json()
    assert bundle["entry"][0]["response"]["status"].startswith("410")
    assert count(client, "Patient") == 0
    # Deleting again, or updating, brings it back as version 4.
    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204
    revived = put(client, f"/fhir/Patient/{pid}", patient(id=pid))
    assert revived.status_code == 201
    assert revived.headers["ETag"] == 'W/"4"'


def test_delete_of_absent_id_is_204(client: Any) -> None:
    assert client.delete("/fhir/Patient/never-there").status_code == 204
    assert client.get("/fhir/Patient/never-there").status_code == 404


# --- history ---

@pytest.fixture
def versions(app: Any, client: Any) -> dict[str, str]:
    """Patient a (versions 1-2), Patient b (1, then deleted), Observation o (1), audit off for a quiet history."""
    app.extensions["gateway"].audit.enabled = False
    a = create(client, patient(gender="female"))["id"]
    b = create(client, patient())["id"]
    put(client, f"/fhir/Patient/{a}", patient(id=a, gender="male"))
    o = create(client, observation(a))["id"]
    client.delete(f"/fhir/Patient/{b}")
    return {"a": a, "b": b, "o": o}


def test_history_instance_and_system_newest_first(client: Any, versions: dict[str, str]) -> None:
    a, b, o = versions["a"], versions["b"], versions["o"]
    assert history_versions(client, f"/fhir/Patient/{a}/_history") == [("PUT", "2", a), ("POST", "1", a)]
    assert history_versions(client, "/fhir/_history") == [
        ("DELETE", None, b), ("POST", "1", o), ("PUT", "2", a), ("POST", "1", b), ("POST", "1", a)]
    bundle = client.get("/fhir/_history").get_json()
    instants = [e["response"]["lastModified"] for e in bundle["entry"]]
    assert instants == sorted(instants, reverse=True)
    assert client.get("/fhir/Patient/missing/_history").status_code == 404


def test_history_type_newest_first(client: Any, versions: dict[str, str]) -> None:
    a, b = versions["a"], versions["b"]
    assert history_versions(client, "/fhir/Patient/_history") == [
        ("DELETE", None, b), ("PUT", "2", a), ("POST", "1", b), ("POST", "1", a)]


def test_history_since(client: Any) -> None:
    old = create(client, patient())["id"]
    time.sleep(0.01)
    new = create(client, patient())
    since = new["meta"]["lastUpdated"]
    put(client, f"/fhir/Patient/{old}", patient(id=old, gender="male"))
    system = client.get("/fhir/_history", query_string={"_since": since, "_count": "1000"}).get_json()
    ids = [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in system["entry"]
           if e["resource"]["resourceType"] == "Patient"]
    assert ids == [(old, "2"), (new["id"], "1")]
    instance = client.get(f"/fhir/Patient/{old}/_history", query_string={"_since": since}).get_json()
    assert [e["resource"]["meta"]["versionId"] for e in instance["entry"]] == ["2"]


def test_history_type_since(client: Any) -> None:
    create(client, patient())
    time.sleep(0.01)
    new = create(client, patient())
    response = client.get("/fhir/Patient/_history", query_string={"_since": new["meta"]["lastUpdated"]})
    assert response.status_code == 200
    assert [e["resource"]["id"] for e in response.get_json()["entry"]] == [new["id"]]


@pytest.mark.parametrize("page", [1, 2, 3, 7])
def test_history_count_pages_through_everything(app: Any, client: Any, page: int) -> None:
    app.extensions["gateway"].audit.enabled = False
    a = create(client, patient())["id"]
    b = create(client, patient())["id"]
    for gender in ("male", "female", "other"):
        put(client, f"/fhir/Patient/{a}", patient(id=a, gender=gender))
    put(client, f"/fhir/Patient/{b}", patient(id=b, gender="male"))
    everything = history_versions(client, "/fhir/_history?_count=100")
    assert len(everything) == 6
    first = client.get(f"/fhir/_history?_count={page}").get_json()
    assert len(first["entry"]) == min(page, 6)
    assert any(link["relation"] == "next" for link in first["link"]) == (page < 6)
    assert history_versions(client, f"/fhir/_history?_count={page}") == everything
    assert history_versions(client, f"/fhir/Patient/{a}/_history?_count={page}") == [
        e for e in everything if e[2] == a]


def test_history_count_zero_has_no_next_link(client: Any) -> None:
    for _ in range(3):
        create(client, patient())
    bundle = client.get("/fhir/_history?_count=0").get_json()
    assert bundle.get("entry", []) == []
    assert [link["relation"] for link in bundle["link"]] == ["self"]


def test_history_reports_the_method_used(client: Any) -> None:
    put(client, "/fhir/Patient/by-put", patient(id="by-put"))
    client.patch("/fhir/Patient/by-put", data=json.dumps([{"op": "add", "path": "/gender", "value": "male"}]),
                 headers=JSON_PATCH)
    entries = client.get("/fhir/Patient/by-put/_history").get_json()["entry"]
    assert [(e["request"]["method"], e["request"]["url"]) for e in entries] == [
        ("PATCH", "Patient/by-put"), ("PUT", "Patient/by-put")]


# --- patch ---

def test_patch_replace_and_add(client: Any) -> None:
    pid = create(client, patient(gender="female"))["id"]
    operations = [{"op": "replace", "path": "/gender", "value": "male"},
                  {"op": "add", "path": "/birthDate", "value": "1999-12-31"}]
    response = client.patch(f"/fhir/Patient/{pid}", data=json.dumps(operations), headers=JSON_PATCH)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["gender"], body["birthDate"], body["meta"]["versionId"]) == ("male", "1999-12-31", "2")
    assert response.headers["ETag"] == 'W/"2"'
    assert client.get(f"/fhir/Patient/{pid}").get_json()["gender"] == "male"
    assert history_versions(client, f"/fhir/Patient/{pid}/_history")[0][:2] == ("PATCH", "2")


def test_patch_failed_test_op_is_422(client: Any) -> None:
    pid = create(client, patient(gender="female"))["id"]
    operations = [{"op": "test", "path": "/gender", "value": "male"},
                  {"op": "replace", "path": "/gender", "value": "other"}]
    response = client.patch(f"/fhir/Patient/{pid}", data=json.dumps(operations), headers=JSON_PATCH)
    assert response.status_code == 422
    assert response.get_json()["resourceType"] == "OperationOutcome"
    current = client.get(f"/fhir/Patient/{pid}").get_json()
    assert (current["gender"], current["meta"]["versionId"]) == ("female", "1")


def test_patch_with_if_match(client: Any) -> None:
    pid = create(client, patient(gender="female"))["id"]
    operations = json.dumps([{"op": "replace", "path": "/gender", "value": "male"}])
    stale = client.patch(f"/fhir/Patient/{pid}", data=operations, headers={**JSON_PATCH, "If-Match": 'W/"2"'})
    assert stale.status_code == 412
    ok = client.patch(f"/fhir/Patient/{pid}", data=operations, headers={**JSON_PATCH, "If-Match": 'W/"1"'})
    assert ok.status_code == 200
    assert ok.headers["ETag"] == 'W/"2"'


# --- Prefer ---

def test_prefer_return_minimal(client: Any) -> None:
    response = post(client, patient(), Prefer="return=minimal")
    assert response.status_code == 201
    assert response.get_data() == b""
    assert response.headers["ETag"] == 'W/"1"'
    pid = local(response.headers["Location"]).split("/")[3]
    updated = put(client, f"/fhir/Patient/{pid}", patient(id=pid, gender="male"), Prefer="return=minimal")
    assert updated.status_code == 200
    assert updated.get_data() == b""
    assert updated.headers["Location"].endswith("/_history/2")


def test_prefer_return_operation_outcome(client: Any) -> None:
    response = post(client, patient(), Prefer="return=OperationOutcome")
    assert response.status_code == 201
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert response.headers["Location"].endswith("/_history/1")
    assert count(client, "Patient") == 1


# --- conditional create, update, delete ---

def test_conditional_create(client: Any) -> None:
    criteria = {"If-None-Exist": f"identifier={SYSTEM}|A1"}
    first = post(client, with_mrn("A1"), **criteria)
    assert first.status_code == 201
    again = post(client, with_mrn("A1", gender="male"), **criteria)
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["ETag"] == 'W/"1"'
    assert "gender" not in client.get(local(first.headers["Location"]).split("/_history")[0]).get_json()
    assert count(client, "Patient") == 1
    create(client, with_mrn("A1"))
    duplicate = post(client, with_mrn("A1"), **criteria)
    assert duplicate.status_code == 412
    assert count(client, "Patient") == 2


def test_conditional_update(client: Any) -> None:
    path = f"/fhir/Patient?identifier={SYSTEM}|U1"
    created = put(client, path, with_mrn("U1", gender="female"))
    assert created.status_code == 201
    pid = created.get_json()["id"]
    updated = put(client, path, with_mrn("U1", gender="male"))
    assert updated.status_code == 200
    assert updated.get_json()["id"] == pid
    assert updated.headers["ETag"] == 'W/"2"'
    assert count(client, "Patient") == 1
    create(client, with_mrn("U1"))
    ambiguous = put(client, path, with_mrn("U1", gender="other"))
    assert ambiguous.status_code == 412
    assert client.get(f"/fhir/Patient/{pid}").get_json()["gender"] == "male"


def test_conditional_delete(client: Any) -> None:
    path = f"/fhir/Patient?identifier={SYSTEM}|D1"
    assert client.delete(path).status_code == 204
    pid = create(client, with_mrn("D1"))["id"]
    keep = create(client, with_mrn("D2"))["id"]
    assert client.delete(path).status_code == 204
    assert client.get(f"/fhir/Patient/{pid}").status_code == 410
    assert client.get(f"/fhir/Patient/{keep}").status_code == 200
    create(client, with_mrn("D2"))
    assert client.delete(f"/fhir/Patient?identifier={SYSTEM}|D2").status_code == 412
    assert count(client, "Patient") == 2


# --- serialisation ---

DECIMAL_OBSERVATION = (
    '{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p"},'
    '"valueQuantity":{"value":1.50,"unit":"mg"},'
    '"referenceRange":[{"low":{"value":0.1000,"unit":"mg"}}]}'
)


def test_decimal_precision_preserved(client: Any) -> None:
    response = client.post("/fhir/Observation", data=DECIMAL_OBSERVATION, headers=FHIR_JSON)
    assert response.status_code == 201
    oid = response.get_json()["id"]
    served = [
        response.get_data(as_text=True),
        client.get(f"/fhir/Observation/{oid}").get_data(as_text=True),
        client.get(f"/fhir/Observation/{oid}/_history/1").get_data(as_text=True),
        client.get("/fhir/Observation?subject=Patient/p").get_data(as_text=True),
        client.get(f"/fhir/Observation/{oid}/_history").get_data(as_text=True),
        client.get(f"/fhir/Observation/{oid}?_pretty=true").get_data(as_text=True),
    ]
    for text in served:
        assert "1.50" in text and "0.1000" in text, text
    assert client.get("/fhir/Observation?value-quantity=1.50").get_json()["entry"]


def test_pretty(client: Any) -> None:
    pid = create(client, patient(gender="male"))["id"]
    compact = client.get(f"/fhir/Patient/{pid}")
    pretty = client.get(f"/fhir/Patient/{pid}?_pretty=true")
    assert "\n" not in compact.get_data(as_text=True)
    assert '\n  "gender": "male"' in pretty.get_data(as_text=True)
    assert jsonio.loads(pretty.get_data()) == jsonio.loads(compact.get_data())
    assert "\n  " in client.get("/fhir/Patient?_pretty=true").get_data(as_text=True)


# --- content negotiation ---

@pytest.mark.parametrize("accept", [
    "application/fhir+json", "application/json", "*/*", "application/fhir+json;q=0.9, application/fhir+xml;q=0.1",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
])
def test_json_accept_headers(client: Any, accept: str) -> None:
    response = client.get("/fhir/metadata", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"


def test_accept_with_fhir_version_parameter(client: Any) -> None:
    assert client.get("/fhir/metadata", headers={"Accept": "application/fhir+json; fhirVersion=4.0"}).status_code == 200


def test_content_type_with_parameters_accepted(client: Any) -> None:
    response = client.post("/fhir/Patient", data=json.dumps(patient()),
                           headers={"Content-Type": "application/fhir+json; charset=utf-8; fhirVersion=4.0"})
    assert response.status_code == 201


@pytest.mark.parametrize("fmt", ["json", "application/json", "application/fhir%2Bjson"])
def test_format_json_variants(client: Any, fmt: str) -> None:
    assert client.get(f"/fhir/Patient?_format={fmt}").status_code == 200


def test_format_with_literal_plus(client: Any) -> None:
    assert client.get("/fhir/Patient?_format=application/fhir+json").status_code == 200


# --- metadata and health ---

def test_metadata_parses_strictly_with_fhirclient(client: Any) -> None:
    from fhirclient.models.capabilitystatement import CapabilityStatement

    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = CapabilityStatement(response.get_json(), strict=True)
    assert statement.fhirVersion == "4.0.1"
    resources = {r.type: r for r in statement.rest[0].resource}
    patient_rest = resources["Patient"]
    params = {p.name: p.type for p in patient_rest.searchParam}
    assert params["identifier"] == "token"
    assert params["birthdate"] == "date"
    assert params["name"] == "string"
    assert "everything" in [op.name for op in patient_rest.operation]
    assert {"read", "vread", "update", "patch", "delete", "create"} <= {i.code for i in patient_rest.interaction}
    assert "Observation" in resources


def test_health_and_readiness(client: Any) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["status"] == "ready"


# --- audit ---

def test_audit_events_for_reads_searches_and_writes(app: Any, client: Any) -> None:
    pid = create(client, patient())["id"]
    oid = create(client, observation(pid))["id"]
    client.get(f"/fhir/Observation/{oid}")
    client.get(f"/fhir/Observation?subject=Patient/{pid}")
    put(client, f"/fhir/Observation/{oid}", observation(pid, id=oid, status="amended"))
    client.delete(f"/fhir/Observation/{oid}")
    events = flushed_audit_events(app, client)

    def find(subtype: str) -> list[dict[str, Any]]:
        return [e for e in events if e["subtype"][0]["code"] == subtype]

    expected = {"create": "C", "read": "R", "search-type": "E", "update": "U", "delete": "D"}
    for subtype, action in expected.items():
        assert find(subtype), subtype
        assert {e["action"] for e in find(subtype)} == {action}
        assert {e["outcome"] for e in find(subtype)} == {"0"}
    assert [references(e) for e in find("read")] == [{f"Observation/{oid}", f"Patient/{pid}"}]
    assert {f"Patient/{pid}"} in [references(e) for e in find("create")]
    assert {f"Observation/{oid}", f"Patient/{pid}"} in [references(e) for e in find("create")]
    assert [references(e) for e in find("update")] == [{f"Observation/{oid}", f"Patient/{pid}"}]
    assert f"Observation/{oid}" in references(find("delete")[0])
    (search_event,) = find("search-type")
    assert f"Patient/{pid}" in references(search_event)
    assert any(f"subject=Patient/{pid}" in unquote(e.get("description", "")) for e in search_event["entity"])


def test_audit_event_search_by_patient_finds_observation_read(app: Any, client: Any) -> None:
    pid = create(client, patient())["id"]
    other = create(client, patient())["id"]
    oid = create(client, observation(pid))["id"]
    create(client, observation(other))
    client.get(f"/fhir/Observation/{oid}")
    app.extensions["gateway"].audit.flush()
    bundle = client.get(f"/fhir/AuditEvent?patient={pid}&_count=100").get_json()
    events = [e["resource"] for e in bundle["entry"]]
    reads = [e for e in events if e["action"] == "R"]
    assert len(reads) == 1
    assert f"Observation/{oid}" in references(reads[0])
    assert all(f"Patient/{other}" not in references(e) for e in events)


def test_audit_flush_does_not_wait_for_records_to_gather(app: Any, client: Any) -> None:
    """The writer lets records gather for `max_delay` to write them in batches; whoever waits in
    flush() (tests, shutdown) must not sit through that delay."""
    audit = app.extensions["gateway"].audit
    audit.max_delay = 30.0
    pid = create(client, patient())["id"]
    client.get(f"/fhir/Patient/{pid}")
    started = time.monotonic()
    audit.flush()
    assert time.monotonic() - started < 10
    assert audit.queue.unfinished_tasks == 0
    assert [e for e in flushed_audit_events(app, client) if e["subtype"][0]["code"] == "read"]


def _spool_only(audit: Any) -> None:
    """Let the writer put what is queued into the spool, and store nothing from it meanwhile."""
    audit._when_idle = lambda: None
    audit._hurry.set()
    try:
        audit.queue.join()
    finally:
        audit._hurry.clear()


def _in_spool(app: Any) -> int:
    from sqlalchemy import func, select

    from gateway import db

    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(db.audit_spool)).scalar_one()


def _stored_audit_events(app: Any) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from gateway import db

    with app.extensions["gateway"].engine.connect() as conn:
        rows = conn.execute(select(db.resource.c.content).where(db.resource.c.resource_type == "AuditEvent"))
        return [json.loads(row.content) for row in rows]


def test_a_search_of_audit_events_first_stores_those_still_in_the_spool(app: Any, client: Any) -> None:
    """A read's record goes to the spool (cheap, on the request's heels); it becomes an AuditEvent
    resource later, but never later than the next AuditEvent search: that search finds it."""
    audit = app.extensions["gateway"].audit
    pid = create(client, patient())["id"]
    audit.flush()
    _spool_only(audit)
    client.get(f"/fhir/Patient/{pid}")
    _spool_only(audit)
    assert _in_spool(app) == 1
    assert client.get("/readyz").get_json()["audit_backlog"] == 1
    assert not [e for e in _stored_audit_events(app) if e["subtype"][0]["code"] == "read"]
    found = client.get(f"/fhir/AuditEvent?subtype=read&entity=Patient/{pid}").get_json()
    assert [references(e["resource"]) for e in found["entry"]] == [{f"Patient/{pid}"}]
    assert _in_spool(app) == 0
    # the search itself was recorded, and waits in the spool for the next one
    _spool_only(audit)
    assert _in_spool(app) == 1


def test_a_process_with_nothing_to_do_stores_the_spooled_audit_events(app: Any, client: Any) -> None:
    audit = app.extensions["gateway"].audit
    audit._spare = lambda: True  # the test suite keeps every core of the machine busy
    pid = create(client, patient())["id"]
    client.get(f"/fhir/Patient/{pid}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (audit.queue.unfinished_tasks or _in_spool(app)):
        time.sleep(0.1)
    assert _in_spool(app) == 0
    assert [e for e in _stored_audit_events(app) if e["subtype"][0]["code"] == "read"]


def test_an_idle_process_stores_the_spool_in_short_transactions(app: Any, client: Any) -> None:
    """A process with nothing to do stores while its siblings may be serving: on SQLite each chunk
    holds the only write lock, so chunks stay small (500 events held it ~175 ms, an HL7 ACK's wait)."""
    from gateway.audit import IDLE_SPOOL_CHUNK

    audit = app.extensions["gateway"].audit
    pid = create(client, patient())["id"]
    for _ in range(IDLE_SPOOL_CHUNK + 5):
        client.get(f"/fhir/Patient/{pid}")
    _spool_only(audit)
    assert _in_spool(app) > IDLE_SPOOL_CHUNK
    chunks: list[int] = []
    store = audit.store_spooled

    def counted(limit: int, wait: bool = True) -> int:
        chunks.append(store(limit, wait=wait))
        return chunks[-1]

    audit.store_spooled = counted
    audit._idle = lambda: True
    type(audit)._when_idle(audit)  # the writer thread runs the no-op _spool_only left
    assert _in_spool(app) == 0
    assert len(chunks) >= 2 and max(chunks) <= IDLE_SPOOL_CHUNK


def test_spooled_events_become_resources_before_the_write_lock_and_are_stored_once(
        app: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the events are made into resources (JSON, index rows) before the writing
    transaction takes the only write lock; when another process stores them in between, this one
    stores nothing and reads the spool again: each event is stored once."""
    import gateway.audit as audit_module
    from gateway import db

    gateway = app.extensions["gateway"]
    if gateway.engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL reads and prepares in the writing transaction, row-locked (no database-wide lock)")
    audit = gateway.audit
    pid = create(client, patient())["id"]
    for _ in range(3):
        client.get(f"/fhir/Patient/{pid}")
    _spool_only(audit)
    spooled = _in_spool(app)
    assert spooled >= 3
    before = len(_stored_audit_events(app))
    gate = db._writer_gate(gateway.engine)
    assert gate is not None
    real = audit_module.new_resources
    calls: list[bool] = []

    def made(resources: list[dict[str, Any]], base_url: str) -> list[Any]:
        held = gate._depth > 0
        calls.append(held)
        if len(calls) == 1:  # another process stores the whole spool between the read and the write
            assert audit_module.AuditLog.store_spooled(audit, 1000) == spooled
        return real(resources, base_url)

    monkeypatch.setattr(audit_module, "new_resources", made)
    assert audit.store_spooled(1000) == 0  # what it had read was stored elsewhere; the spool is empty now
    assert _in_spool(app) == 0
    assert len(_stored_audit_events(app)) == before + spooled
    assert calls == [False, False]  # both outside the write lock


def test_spooled_events_wait_while_other_processes_keep_the_cores_busy() -> None:
    """A listener or worker with nothing to do must not take the CPU its busy siblings need: the
    spool is worked off only while a core is left free by the machine's other processes."""
    from gateway.audit import SpareCore

    tick = 100  # /proc/stat counts in 1/100 s on Linux
    machine = {"busy": 0, "idle": 0}
    own = {"seconds": 0.0}
    clock = {"now": 0.0}

    def stat() -> list[int]:
        return [machine["busy"], 0, 0, machine["idle"], 0, 0, 0, 0]

    spare = SpareCore(stat, lambda: own["seconds"], lambda: clock["now"], cores=2)

    def second(others: float, mine: float = 0.0) -> bool:
        clock["now"] += 1.0
        machine["busy"] += int((others + mine) * tick)
        machine["idle"] += int((2 - others - mine) * tick)
        own["seconds"] += mine
        return spare()

    assert spare() is False  # the baseline: nothing known yet
    assert second(others=1.9) is False  # two web workers at full load
    assert second(others=0.1) is True  # the load is gone
    assert second(others=0.1, mine=0.95) is True  # its own storing does not count against it
    assert second(others=1.5, mine=0.5) is False  # the load is back
    assert SpareCore(lambda: (_ for _ in ()).throw(OSError("no /proc")))() is True


def test_under_sustained_load_the_spool_is_kept_below_its_bound(app: Any, client: Any) -> None:
    """A process never idle stores spooled events with every batch once the spool holds more than
    max_backlog: the spool stays bounded, and requests pay what they paid before it existed."""
    audit = app.extensions["gateway"].audit
    pid = create(client, patient())["id"]
    audit.flush()
    audit.max_backlog = 2
    _spool_only(audit)
    for _ in range(3):
        client.get(f"/fhir/Patient/{pid}")
    _spool_only(audit)  # the spool held 3 > 2 after that batch: they were stored with it
    assert _in_spool(app) == 0
    assert len([e for e in _stored_audit_events(app) if e["subtype"][0]["code"] == "read"]) == 3


def test_while_the_audit_log_is_behind_requests_are_refused_before_touching_any_data(app: Any, client: Any) -> None:
    """The database takes no AuditEvents (down, or its disk full while reads still work): once the
    records not yet written reach the high-water mark, new requests get a 503 saying so, before any
    query, instead of hanging on a full queue until the server stops answering. Health answers,
    readiness says why it is not ready, and once the writer catches up everything works again and no
    record of the requests that were served is lost."""
    audit = app.extensions["gateway"].audit
    pid = create(client, patient())["id"]
    audit.flush()
    entered, release = threading.Event(), threading.Event()
    write = audit._write

    def held(batch: Any) -> None:
        entered.set()
        release.wait(60)
        write(batch)

    audit._write = held
    audit.high_water = 3
    try:
        assert client.get(f"/fhir/Patient/{pid}").status_code == 200
        assert entered.wait(10)  # the writer holds that read's record and cannot write it
        served = [client.get(f"/fhir/Patient/{pid}").status_code for _ in range(3)]
        assert served == [200, 200, 200] and audit.queue.qsize() == 3
        refused = client.get(f"/fhir/Patient/{pid}")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        issue = refused.get_json()["issue"][0]
        assert issue["code"] == "transient" and "audit log" in issue["diagnostics"]
        assert pid not in refused.get_data(as_text=True)
        created = client.post("/fhir/Patient", json=patient(), headers={"Content-Type": "application/fhir+json"})
        assert created.status_code == 503
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["audit"] == "behind"
        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 503 and "Traceback" not in page.get_data(as_text=True)
        assert audit.queue.qsize() == 3  # the refusals queued nothing
    finally:
        release.set()
    audit.flush()
    audit._write = write
    assert client.get("/readyz").status_code == 200
    assert client.get(f"/fhir/Patient/{pid}").status_code == 200
    reads = [e for e in flushed_audit_events(app, client) if e["subtype"][0]["code"] == "read"]
    assert len(reads) == 5  # the first read, the three served while the log was behind, the last one
    bundle = client.get("/fhir/Patient?_summary=count").get_json()
    assert bundle["total"] == 1  # the refused create wrote nothing


# --- several current versions at once (the HL7 feed reads a message's resources this way) ---

def test_find_many_reads_several_types_and_leaves_out_absent_and_deleted(store: Any) -> None:
    with store.writing() as repo:
        kept = [repo.create(patient(gender="female")).stored, repo.create(patient(gender="male")).stored]
        kept.append(repo.create(observation(kept[0].id)).stored)
        gone_one = repo.create(observation(kept[1].id)).stored
        repo.delete("Observation", gone_one.id)
    wanted = [(s.resource_type, s.id) for s in kept]
    with store.writing() as repo:
        found = repo.find_many([*wanted, ("Observation", gone_one.id), ("Patient", "absent"), wanted[0]],
                               for_update=True)
    assert sorted(found) == sorted(wanted)
    assert {key: s.version_id for key, s in found.items()} == {key: 1 for key in wanted}


def test_find_many_searches_the_index_on_sqlite(tmp_path: Any) -> None:
    """A row-value list `(type, id) IN (VALUES ...)` made SQLite read the whole resource table (15 ms
    at 20,000 resources, more with every resource stored): each type's ids must be an index search.
    Asked of a database of its own: with statistics of a table of a few rows (other tests' ANALYZE),
    a scan is the right plan."""
    from gateway import db
    from gateway.fhir.store import _current_many_text

    engine = db.make_engine(f"sqlite:///{tmp_path / 'plan.sqlite'}")
    db.metadata.create_all(engine)
    sql = _current_many_text("sqlite", (2, 1), False)
    with engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql,
                                                       ("Patient", "a", "b", "Observation", "c"))]
    engine.dispose()
    assert not any(step.startswith("SCAN") for step in plan), plan
    assert sum(step.startswith("SEARCH resource USING INDEX") for step in plan) == 2, plan
