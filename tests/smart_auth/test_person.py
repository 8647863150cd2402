"""A login that acts for several patients is a Person: its fhirUser, readable with its token, kept current.

The rule (launch.fhir_user_for): Patient when acting for oneself or for no one else; the RelatedPerson
when acting for the only other patient one may act for; the Person when one may act for several
others, or when the authorization has no single patient while one acts for others too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.smart_auth import admin, people, proxies
from tests.smart_auth.conftest import FlaskHttp, authorize_params, exchange, load_family, run_launch


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _person_of(world: Any, username: str) -> str:
    user = people.find_user(world.smart.engine, username)
    assert user is not None
    return proxies.person_id(user)


def _read(store: Any, rtype: str, rid: str) -> dict[str, Any]:
    with store.reading() as repo:
        return json.loads(repo.read(rtype, rid).content)


def _links(store: Any, person_id: str) -> list[str]:
    return [link["target"]["reference"] for link in _read(store, "Person", person_id)["link"]]


def _launch(http: Any, fhir_base: str, username: str, patient: str | None, scope: str) -> dict[str, Any]:
    params, verifier = authorize_params(fhir_base, scope=scope)
    launch = run_launch(http, params, verifier, username, patient=patient)
    reply = exchange(http, launch)
    assert reply.status == 200, reply.text
    return reply.json()


def _claims(http: Any, token: dict[str, Any]) -> dict[str, Any]:
    return jwt.decode(token["id_token"], KeySet.import_key_set(http.get("/auth/jwks").json()),
                      algorithms=["RS256"]).claims


def test_the_parent_of_two_is_her_person(world: Any, http: Any, fhir_base: str) -> None:
    maria = _person_of(world, "maria")
    token = _launch(http, fhir_base, "maria", "Patient/sofia-garcia", "launch/patient patient/*.rs openid fhirUser "
                    "offline_access")
    assert _claims(http, token)["fhirUser"] == f"{fhir_base}/Person/{maria}"
    introspected = http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"}).json()
    assert introspected["fhirUser"] == f"{fhir_base}/Person/{maria}"
    refreshed = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                          "client_id": "public-app"}).json()
    assert _claims(http, refreshed)["fhirUser"] == f"{fhir_base}/Person/{maria}"

    # The Person is readable with the token it came with; it is outside Sofia's compartment.
    reply = http.get(f"/fhir/Person/{maria}", _bearer(refreshed["access_token"]))
    assert reply.status == 200, reply.text
    person = reply.json()
    assert [link["target"]["reference"] for link in person["link"]] == [
        "Patient/maria-garcia", "RelatedPerson/maria-garcia-mother-of-daniel",
        "RelatedPerson/maria-garcia-mother-of-sofia"]
    assert person["name"][0]["family"] == "Garcia" and person["telecom"]  # from Maria's own Patient
    # Another login's Person is not: refused as any resource outside the token's reach is.
    assert http.get(f"/fhir/Person/{_person_of(world, 'linda')}", _bearer(refreshed["access_token"])).status == 403
    # Reading the Person does not open up what it links to.
    assert http.get("/fhir/Patient/maria-garcia", _bearer(refreshed["access_token"])).status == 403
    # A search finds the token's own Person and no other.
    found = http.get("/fhir/Person", _bearer(refreshed["access_token"])).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [maria]


@pytest.mark.parametrize(("username", "patient", "scope", "expected"), [
    ("maria", "Patient/maria-garcia", "launch/patient patient/*.rs", "Patient/maria-garcia"),
    ("maria", "Patient/daniel-garcia", "launch/patient patient/*.rs", "Person/{maria}"),
    ("maria", None, "user/*.rs", "Person/{maria}"),
    ("linda", "Patient/robert-chen", "launch/patient patient/*.rs", "RelatedPerson/{carer}"),
    ("linda", None, "user/*.rs", "Person/{linda}"),
    ("daniel", "Patient/daniel-garcia", "launch/patient patient/*.rs", "Patient/daniel-garcia"),
    ("daniel", None, "user/*.rs", "Patient/daniel-garcia"),
])
def test_which_resource_is_the_fhir_user(username: str, patient: str | None, scope: str, expected: str,
                                         world: Any, http: Any, fhir_base: str) -> None:
    linda = people.find_user(world.smart.engine, "linda")
    assert linda is not None
    with world.smart.engine.connect() as conn:
        carer = people.proxy_record(conn, linda.id, "robert-chen")
    token = _launch(http, fhir_base, username, patient, f"{scope} openid fhirUser")
    fhir_user = expected.format(maria=_person_of(world, "maria"), linda=_person_of(world, "linda"), carer=carer)
    assert _claims(http, token)["fhirUser"] == f"{fhir_base}/{fhir_user}"
    assert http.get(f"/fhir/{fhir_user}", _bearer(token["access_token"])).status == 200


def test_a_patient_token_reads_its_own_person_but_no_one_elses(world: Any, http: Any, fhir_base: str) -> None:
    maria, linda = _person_of(world, "maria"), _person_of(world, "linda")
    # Maria for herself, without fhirUser: her Person links her Patient, so it is in her compartment.
    own = _launch(http, fhir_base, "maria", "Patient/maria-garcia", "launch/patient patient/*.rs")
    assert http.get(f"/fhir/Person/{maria}", _bearer(own["access_token"])).status == 200
    assert http.get(f"/fhir/Person/{linda}", _bearer(own["access_token"])).status == 403
    found = http.get("/fhir/Person", _bearer(own["access_token"])).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [maria]
    # Daniel, whose mother's Person links the RelatedPerson about him, still cannot read it.
    daniel = _launch(FlaskHttp(http.client.application.test_client()), fhir_base, "daniel", "Patient/daniel-garcia",
                     "launch/patient patient/*.rs openid fhirUser")
    assert http.get(f"/fhir/Person/{maria}", _bearer(daniel["access_token"])).status == 403
    assert http.get("/fhir/Person", _bearer(daniel["access_token"])).json().get("entry", []) == []


def test_the_persons_links_follow_grant_and_revoke(world: Any) -> None:
    store, engine = world.store, world.smart.engine
    linda = _person_of(world, "linda")
    user = people.find_user(engine, "linda")
    assert user is not None
    with engine.connect() as conn:
        carer = people.proxy_record(conn, user.id, "robert-chen")
    assert _links(store, linda) == ["Patient/linda-chen", f"RelatedPerson/{carer}"]

    granted = admin.grant_proxy(engine, store, "linda", "Patient/daniel-garcia", "GUARD")
    assert granted["person"] == f"Person/{linda}"
    for_daniel = granted["related_person"]
    assert _links(store, linda) == ["Patient/linda-chen", *sorted([f"RelatedPerson/{carer}", for_daniel])]

    world.smart.revoke_proxy("linda", "robert-chen")
    assert _links(store, linda) == ["Patient/linda-chen", for_daniel]
    world.smart.revoke_proxy("linda", "daniel-garcia")
    assert _links(store, linda) == ["Patient/linda-chen"]
    # A revocation that ends nothing writes nothing new.
    with store.reading() as repo:
        version = repo.read("Person", linda).version_id
    world.smart.revoke_proxy("linda", "daniel-garcia")
    with store.reading() as repo:
        assert repo.read("Person", linda).version_id == version
        # A login that never acted for anyone gets no Person from a revocation that ends nothing.
        world.smart.revoke_proxy("daniel", "sofia-garcia")
        assert repo.find("Person", _person_of(world, "daniel")) is None


def test_a_relationship_ended_by_date_is_not_linked(world: Any) -> None:
    # "former" was Robert's caregiver until yesterday (granted a month ago, in conftest).
    assert _links(world.store, _person_of(world, "former")) == ["Patient/linda-chen-other"]


def test_demo_logins_make_persons_for_the_parent_and_the_caregiver(app: Any) -> None:
    services = app.extensions["gateway"]
    load_family(services.store)
    admin.load_demo_logins(services.engine, services.store, "http://127.0.0.1:8080")
    for username, links in (("maria", 3), ("linda", 2)):
        user = people.find_user(services.engine, username)
        assert user is not None
        assert _links(services.store, proxies.person_id(user))[0] == user.fhir_user
        assert len(_links(services.store, proxies.person_id(user))) == links
    daniel = people.find_user(services.engine, "daniel")
    assert daniel is not None
    with services.store.reading() as repo:
        assert repo.find("Person", proxies.person_id(daniel)) is None
