"""The EHR pushes FHIR data with a backend-services token (system/*.cu), and what it pushes is not
sent back to it by the outbox."""

from __future__ import annotations

from typing import Any

import pytest
from joserfc.jwk import KeySet
from sqlalchemy import func, select

from gateway import db
from gateway.smart_auth import admin
from tests.smart_auth.conftest import REDIRECT
from tests.upstream import records


@pytest.fixture
def settings(settings: Any) -> Any:
    settings.outbox_message = "hl7"  # a patient's message to the care team is queued for the EHR
    settings.outbox_mllp_port = 9  # never reached: nothing is delivered in these tests
    return settings


def _token(http: Any, world: Any, fhir_base: str, scope: str) -> dict[str, str]:
    token_url = fhir_base.removesuffix("/fhir") + "/auth/token"
    reply = http.post("/auth/token", {
        "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": world.assertion("ehr", token_url)})
    assert reply.status == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}", "Content-Type": "application/fhir+json"}


def _queued(app: Any) -> int:
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(db.outbox)).scalar_one()


def test_the_ehr_pushes_resources_and_transactions(app: Any, world: Any, http: Any, fhir_base: str) -> None:
    app.extensions["gateway"].settings.open_access = False
    jwks = KeySet([world.rsa]).as_dict(private=False)
    admin.register_client(world.smart.engine, "ehr", [REDIRECT], jwks=jwks, scope="system/*.cu system/*.rs")
    client = app.test_client()
    queued_before = _queued(app)  # the demo people's own records, written as a patient would
    pusher = _token(http, world, fhir_base, "system/*.cu")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": records.patient(), "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": records.practitioner(), "request": {"method": "PUT", "url": "Practitioner/dr1"}},
        {"resource": records.message("c1"), "request": {"method": "PUT", "url": "Communication/c1"}},
    ]}
    pushed = client.post("/fhir", json=bundle, headers=pusher)
    assert pushed.status_code == 200, pushed.get_data(as_text=True)
    assert [e["response"]["status"][:3] for e in pushed.get_json()["entry"]] == ["201", "201", "201"]
    updated = client.put("/fhir/Patient/p1", json={**records.patient(), "gender": "other"}, headers=pusher)
    assert updated.status_code == 200
    fresh = {k: v for k, v in records.message().items() if k != "id"}
    created = client.post("/fhir/Communication", json=fresh, headers=pusher)
    assert created.status_code == 201
    # a patient's message would be queued for the EHR; the EHR's own push is not echoed back to it
    assert _queued(app) == queued_before

    reader = _token(http, world, fhir_base, "system/*.rs")
    assert client.get("/fhir/Patient/p1", headers=reader).get_json()["gender"] == "other"
    refused = client.put("/fhir/Patient/p1", json=records.patient(), headers=reader)
    assert refused.status_code == 403
    assert client.post("/fhir", json=bundle, headers=reader).status_code == 403


def test_a_patients_own_message_is_queued(app: Any) -> None:
    """The same write without a backend client behind it is the patient's, and goes to the EHR."""
    store = app.extensions["gateway"].store
    queued_before = _queued(app)
    with store.writing() as repo:
        repo.update("Patient", "p1", records.patient())
        repo.update("Practitioner", "dr1", records.practitioner())
        repo.create(records.message("c3"))
    assert _queued(app) == queued_before + 1
