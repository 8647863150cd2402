"""Authorization matrix: every token kind against every interaction, for its own and another patient.

"allow" means the call returned data of that patient (or the write happened); "deny" means a 401 or
403, or no data of that patient at all. Every Bundle that comes back is also checked for leaks: no
entry may belong to a patient outside the token's reach.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.smart_auth.conftest import FlaskHttp, authorize_params, exchange, run_launch

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
OBSERVATION = {
    "maria-garcia": "maria-garcia-hba1c-2026-11-10",
    "sofia-garcia": "sofia-garcia-vitamin-d-2026-02-17",
    "daniel-garcia": "daniel-garcia-glucose-2026-06-16",
    "robert-chen": "robert-chen-ldl-2026-09-15",
    "linda-chen": "linda-chen-tsh-2026-10-13",
}
INTERACTIONS = ["read", "search", "include", "revinclude", "history", "everything", "create", "update"]
ALL = dict.fromkeys(INTERACTIONS, "allow")
NONE = dict.fromkeys(INTERACTIONS, "deny")

# token kind -> (own patient, other patient, expected for own, expected for other, patients it may reach)
MATRIX: dict[str, tuple[str, str, dict[str, str], dict[str, str], set[str]]] = {
    "patient-self": ("maria-garcia", "robert-chen", ALL, NONE, {"maria-garcia"}),
    "parent-child": ("sofia-garcia", "robert-chen", ALL, NONE, {"sofia-garcia"}),
    "proxy-teen": ("daniel-garcia", "maria-garcia", ALL, NONE, {"daniel-garcia"}),
    "proxy-ended": ("robert-chen", "linda-chen", NONE, NONE, set()),
    "user": ("robert-chen", "maria-garcia", ALL, NONE, {"robert-chen", "linda-chen"}),
    "system": ("robert-chen", "maria-garcia", {**ALL, "update": "deny"}, {**ALL, "update": "deny"},
               set(OBSERVATION)),
    "granular": ("maria-garcia", "robert-chen", {**ALL, "create": "deny", "update": "deny"}, NONE,
                 {"maria-garcia"}),
}


def _token(kind: str, world: Any, app: Any, fhir_base: str) -> str:
    http = FlaskHttp(app.test_client())
    if kind == "system":
        token_url = fhir_base.removesuffix("/fhir") + "/auth/token"
        reply = http.post("/auth/token", {
            "grant_type": "client_credentials", "scope": "system/*.rs system/Observation.c",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": world.assertion("backend", token_url)})
        return reply.json()["access_token"]
    username, patient, scope, ticked = {
        "patient-self": ("maria", "Patient/maria-garcia", "launch/patient patient/*.cruds", None),
        "parent-child": ("maria", "Patient/sofia-garcia", "launch/patient patient/*.cruds", None),
        "proxy-teen": ("maria", "Patient/daniel-garcia", "launch/patient patient/*.cruds", None),
        "proxy-ended": ("linda", "Patient/robert-chen", "launch/patient patient/*.cruds", None),
        "user": ("linda", None, "user/*.cruds", None),
        "granular": ("maria", "Patient/maria-garcia", "launch/patient patient/*.rs",
                     ["launch/patient", "patient/Patient.rs", f"patient/Observation.rs?category={LAB}"]),
    }[kind]
    params, verifier = authorize_params(fhir_base, scope=scope)
    launch = run_launch(http, params, verifier, username, patient=patient, ticked=ticked)
    token = exchange(http, launch).json()
    assert token["scope"].split() == (ticked or scope.split())
    if kind == "proxy-ended":
        world.smart.revoke_proxy("linda", "robert-chen")
    return token["access_token"]


def _patients_in(bundle: dict[str, Any]) -> set[str]:
    found = set()
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "Patient":
            found.add(resource["id"])
        for key in ("subject", "patient"):
            ref = (resource.get(key) or {}).get("reference", "")
            if ref.startswith("Patient/"):
                found.add(ref.removeprefix("Patient/"))
    return found


def _attempt(http: Any, bearer: dict[str, str], interaction: str, patient: str, reach: set[str]) -> str:
    obs = OBSERVATION[patient]
    if interaction == "read":
        return "allow" if http.get(f"/fhir/Observation/{obs}", bearer).status == 200 else "deny"
    if interaction in ("create", "update"):
        resource = {"resourceType": "Observation", "status": "final", "code": {"text": "matrix"},
                    "subject": {"reference": f"Patient/{patient}"}}
        headers = {**bearer, "Content-Type": "application/fhir+json"}
        if interaction == "create":
            reply = http.post("/fhir/Observation", json.dumps(resource), headers)
            return "allow" if reply.status == 201 else "deny"
        reply = http.client.put(f"/fhir/Observation/{obs}", data=json.dumps({**resource, "id": obs}), headers=headers)
        return "allow" if reply.status_code == 200 else "deny"
    url = {
        "search": f"/fhir/Observation?patient={patient}&_total=accurate&_count=500",
        "include": f"/fhir/Observation?patient={patient}&_include=Observation:subject",
        "revinclude": f"/fhir/Patient?_id={patient}&_revinclude=Observation:subject",
        "history": f"/fhir/Observation/{obs}/_history",
        "everything": f"/fhir/Patient/{patient}/$everything",
    }[interaction]
    reply = http.get(url, bearer)
    if reply.status != 200:
        return "deny"
    bundle = reply.json()
    seen = _patients_in(bundle)
    assert seen <= reach, f"{interaction} leaked {seen - reach}"
    if "total" in bundle and interaction == "search":
        assert bundle["total"] == len(bundle.get("entry", [])), "the total counts what the token cannot see"
    entries = bundle.get("entry", [])
    if interaction == "include":
        ok = any(e.get("search", {}).get("mode") == "include" and e["resource"]["id"] == patient for e in entries)
    elif interaction == "revinclude":
        ok = any(e.get("search", {}).get("mode") == "include" and e["resource"]["resourceType"] == "Observation"
                 for e in entries)
    else:
        ok = patient in seen
    return "allow" if ok else "deny"


@pytest.mark.parametrize("kind", list(MATRIX))
def test_authorization_matrix(kind: str, world: Any, app: Any, fhir_base: str) -> None:
    own, other, expect_own, expect_other, reach = MATRIX[kind]
    bearer = {"Authorization": f"Bearer {_token(kind, world, app, fhir_base)}"}
    http = FlaskHttp(app.test_client())
    got_own = {i: _attempt(http, bearer, i, own, reach) for i in INTERACTIONS}
    got_other = {i: _attempt(http, bearer, i, other, reach) for i in INTERACTIONS}
    assert (got_own, got_other) == (expect_own, expect_other)


def test_teen_proxy_never_sees_confidential_records(world: Any, app: Any, fhir_base: str) -> None:
    bearer = {"Authorization": f"Bearer {_token('proxy-teen', world, app, fhir_base)}"}
    http = FlaskHttp(app.test_client())
    assert http.get("/fhir/Observation/daniel-garcia-tsh-2026-10-27", bearer).status == 403
    assert http.get("/fhir/Condition/daniel-garcia-cond-depressive-disorder", bearer).status == 403
    for url in ("/fhir/Observation?patient=daniel-garcia&_count=500&_total=accurate",
                "/fhir/Patient/daniel-garcia/$everything?_count=500",
                "/fhir/Patient?_id=daniel-garcia&_revinclude=Observation:subject&_revinclude=Condition:subject"):
        bundle = http.get(url, bearer).json()
        labels = [s.get("code") for e in bundle["entry"] for s in e["resource"].get("meta", {}).get("security", [])]
        assert "R" not in labels and bundle["entry"], url
    # Daniel himself sees his confidential records.
    own = FlaskHttp(app.test_client())
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs")
    token = exchange(own, run_launch(own, params, verifier, "daniel")).json()
    assert own.get("/fhir/Observation/daniel-garcia-tsh-2026-10-27",
                   {"Authorization": f"Bearer {token['access_token']}"}).status == 200


def test_a_scope_that_does_not_cover_the_interaction_is_403(world: Any, app: Any, fhir_base: str) -> None:
    bearer = {"Authorization": f"Bearer {_token('granular', world, app, fhir_base)}"}
    http = FlaskHttp(app.test_client())
    assert http.get("/fhir/Condition?patient=maria-garcia", bearer).status == 403
    assert http.get("/fhir/Observation/maria-garcia-bp-2026-05-20", bearer).status == 403
    assert http.get("/fhir/Observation/_history", bearer).status == 403
    assert http.get("/fhir/_history", bearer).status == 403
    assert http.post("/fhir", json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}),
                     {**bearer, "Content-Type": "application/fhir+json"}).status == 403
