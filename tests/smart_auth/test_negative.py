"""The negative cases of the SMART App Launch and ONC (g)(10) test kits, each asserted."""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import responses
from joserfc.jwk import KeySet, RSAKey

from gateway.smart_auth import admin
from tests.smart_auth.conftest import REDIRECT, authorize_params, exchange, run_launch


def _params(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


# --- /authorize ---

def test_invalid_aud_issues_no_code(world: Any, http: Any, fhir_base: str) -> None:
    for aud in (fhir_base + "/", "http://evil.example/fhir", ""):
        params, _ = authorize_params(fhir_base, aud=aud)
        reply = http.get("/auth/authorize?" + urlencode(params))
        assert reply.status == 302
        got = _params(reply.location)
        assert got["error"] == "invalid_request" and got["state"] == params["state"] and "code" not in got


def test_unregistered_redirect_uri_gets_an_error_page_never_a_redirect(world: Any, http: Any,
                                                                       fhir_base: str) -> None:
    params, _ = authorize_params(fhir_base, redirect_uri="http://evil.example/callback")
    reply = http.get("/auth/authorize?" + urlencode(params))
    assert reply.status == 400 and "Location" not in reply.headers
    assert "evil.example" in reply.text  # the page says which redirect URI was refused
    # An unknown client gets a page too: there is no registered redirect URI to trust.
    params, _ = authorize_params(fhir_base, client_id="nobody")
    reply = http.get("/auth/authorize?" + urlencode(params))
    assert reply.status == 400 and "Location" not in reply.headers


@pytest.mark.parametrize("change", [{"code_challenge": None, "code_challenge_method": None},
                                    {"code_challenge_method": "plain"},
                                    {"code_challenge_method": None}])
def test_pkce_s256_is_required_at_authorize(world: Any, http: Any, fhir_base: str, change: dict[str, Any]) -> None:
    params, _ = authorize_params(fhir_base, client_id="secret-app")
    for key, value in change.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = value
    reply = http.get("/auth/authorize?" + urlencode(params))
    assert reply.status == 302
    got = _params(reply.location)
    assert got["error"] == "invalid_request" and got["state"] == params["state"]


def test_unsupported_response_type_redirects_with_state(world: Any, http: Any, fhir_base: str) -> None:
    params, _ = authorize_params(fhir_base, response_type="token")
    reply = http.get("/auth/authorize?" + urlencode(params))
    got = _params(reply.location)
    assert got["error"] in ("unsupported_response_type", "unauthorized_client") and got["state"] == params["state"]


def test_scopes_outside_the_registration_are_not_granted(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs system/*.cruds")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia")
    assert exchange(http, launch).json()["scope"] == "launch/patient patient/*.rs"


# --- the code at /token ---

@pytest.fixture
def launched(world: Any, http: Any, fhir_base: str) -> Any:
    params, verifier = authorize_params(fhir_base)
    return run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia")


def test_bad_code(launched: Any, http: Any) -> None:
    reply = exchange(http, launched, code="not-a-code")
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


def test_reused_code_fails_and_revokes_what_it_produced(launched: Any, http: Any) -> None:
    first = exchange(http, launched)
    assert first.status == 200
    token = first.json()["access_token"]
    assert http.get("/fhir/Patient/maria-garcia", {"Authorization": f"Bearer {token}"}).status == 200
    second = exchange(http, launched)
    assert second.status == 400 and second.json()["error"] == "invalid_grant"
    assert http.get("/fhir/Patient/maria-garcia", {"Authorization": f"Bearer {token}"}).status == 401


def test_code_for_another_client(launched: Any, http: Any) -> None:
    reply = exchange(http, launched, client_id="other-app")
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


def test_code_expires_after_a_minute(launched: Any, http: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.smart_auth import server

    real = server.now_ms
    monkeypatch.setattr(server, "now_ms", lambda: real() + 61_000)
    reply = exchange(http, launched)
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("verifier", ["missing", "", "wrong", "challenge"])
def test_pkce_verifier_checked(world: Any, http: Any, fhir_base: str, verifier: str) -> None:
    params, good = authorize_params(fhir_base)
    launch = run_launch(http, params, good, "maria", patient="Patient/maria-garcia")
    value: str | None = {"missing": None, "": "", "wrong": secrets.token_urlsafe(48),
                         "challenge": params["code_challenge"]}[verifier]
    reply = exchange(http, launch, code_verifier=value)
    assert reply.status == 400
    assert reply.json()["error"] in ("invalid_request", "invalid_grant")
    # A failed attempt burns the code: the right verifier does not rescue it afterwards.
    assert exchange(http, launch).status == 400


def test_redirect_uri_must_match_at_token(launched: Any, http: Any) -> None:
    reply = exchange(http, launched, redirect_uri="http://app.example/other")
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


# --- confidential symmetric clients ---

def _launch_for(http: Any, fhir_base: str, client_id: str) -> Any:
    params, verifier = authorize_params(fhir_base, client_id=client_id)
    return run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia")


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def test_client_secret_basic_with_client_id_in_body(world: Any, http: Any, fhir_base: str) -> None:
    launch = _launch_for(http, fhir_base, "secret-app")
    data = {"grant_type": "authorization_code", "code": launch.params["code"], "redirect_uri": REDIRECT,
            "client_id": "secret-app", "code_verifier": launch.verifier}
    reply = http.post("/auth/token", data, _basic("secret-app", "s3cret-value"))
    assert reply.status == 200, reply.text


def test_client_secret_post(world: Any, http: Any, fhir_base: str) -> None:
    launch = _launch_for(http, fhir_base, "secret-app")
    assert exchange(http, launch, client_id="secret-app", client_secret="s3cret-value").status == 200


@pytest.mark.parametrize("how", ["wrong-secret", "no-secret", "body-disagrees"])
def test_confidential_client_must_authenticate(world: Any, http: Any, fhir_base: str, how: str) -> None:
    launch = _launch_for(http, fhir_base, "secret-app")
    data = {"grant_type": "authorization_code", "code": launch.params["code"], "redirect_uri": REDIRECT,
            "client_id": "other-app" if how == "body-disagrees" else "secret-app", "code_verifier": launch.verifier}
    headers = {"wrong-secret": _basic("secret-app", "nope"), "no-secret": {},
               "body-disagrees": _basic("secret-app", "s3cret-value")}[how]
    reply = http.post("/auth/token", data, headers)
    assert reply.status in (400, 401) and reply.json()["error"] == "invalid_client"


# --- refresh ---

def test_refresh_rotates_and_reuse_revokes_the_grant(launched: Any, http: Any) -> None:
    first = exchange(http, launched).json()
    refreshed = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                                          "client_id": "public-app"})
    assert refreshed.status == 200, refreshed.text
    second = refreshed.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["patient"] == "maria-garcia"  # context survives refresh
    assert second["scope"] == first["scope"]
    assert refreshed.headers["Cache-Control"] == "no-store"
    bearer = {"Authorization": f"Bearer {second['access_token']}"}
    assert http.get("/fhir/Patient/maria-garcia", bearer).status == 200
    # The old refresh token again: refused, and everything from this authorization is revoked.
    reuse = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                                      "client_id": "public-app"})
    assert reuse.status == 400 and reuse.json()["error"] == "invalid_grant"
    assert http.get("/fhir/Patient/maria-garcia", bearer).status == 401
    again = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": second["refresh_token"],
                                      "client_id": "public-app"})
    assert again.status == 400


def test_refresh_with_a_random_token(world: Any, http: Any) -> None:
    reply = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": secrets.token_urlsafe(48),
                                      "client_id": "public-app"})
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


def test_refresh_by_another_client(launched: Any, http: Any) -> None:
    token = exchange(http, launched).json()
    reply = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                      "client_id": "other-app"})
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    # The rightful client can still refresh: another client's attempt does not burn the token.
    ok = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                   "client_id": "public-app"})
    assert ok.status == 200


def test_no_refresh_token_without_offline_or_online_access(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia")
    assert "refresh_token" not in exchange(http, launch).json()


# --- introspection and revocation ---

def test_introspection(launched: Any, http: Any, fhir_base: str) -> None:
    token = exchange(http, launched).json()
    body = http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"}).json()
    assert body["active"] is True
    assert body["scope"] == token["scope"] and body["client_id"] == "public-app"
    assert body["patient"] == "maria-garcia" and body["iss"] == fhir_base
    assert body["fhirUser"] == f"{fhir_base}/Patient/maria-garcia" and body["sub"] == "maria"
    assert body["exp"] > time.time()
    invalid = http.post("/auth/introspect", {"token": "nonsense", "client_id": "public-app"})
    assert invalid.status == 200 and invalid.json() == {"active": False}
    # A refresh token is active until it is used, then only its successor is.
    refresh = {"token": token["refresh_token"], "token_type_hint": "refresh_token", "client_id": "public-app"}
    assert http.post("/auth/introspect", refresh).json()["active"] is True
    rotated = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                        "client_id": "public-app"}).json()
    assert http.post("/auth/introspect", refresh).json() == {"active": False}
    assert http.post("/auth/introspect", {**refresh, "token": rotated["refresh_token"]}).json()["active"] is True
    # Another client may not look at this client's tokens.
    other = http.post("/auth/introspect", {"token": rotated["access_token"], "client_id": "other-app"})
    assert other.json() == {"active": False}


def test_revocation_stops_the_token_at_once(launched: Any, http: Any) -> None:
    token = exchange(http, launched).json()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert http.get("/fhir/Patient/maria-garcia", bearer).status == 200
    assert http.post("/auth/revoke", {"token": token["refresh_token"], "client_id": "public-app"}).status == 200
    assert http.get("/fhir/Patient/maria-garcia", bearer).status == 401
    assert http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"}).json() == \
        {"active": False}
    # Revoking an unknown token is not an error (RFC 7009).
    assert http.post("/auth/revoke", {"token": "unknown", "client_id": "public-app"}).status == 200


def test_ended_relationship_stops_tokens_at_once(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    token = exchange(http, launch).json()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert http.get("/fhir/Patient/sofia-garcia", bearer).status == 200
    world.smart.revoke_proxy("maria", "sofia-garcia")
    assert http.get("/fhir/Patient/sofia-garcia", bearer).status == 401
    assert http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"}).json() == \
        {"active": False}
    refresh = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                        "client_id": "public-app"})
    assert refresh.status == 400


def test_ended_relationship_is_not_offered(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "former")
    # "former" acts for nobody now but an unknown record of their own: no Robert in any picker.
    assert all("robert-chen" not in page for page in launch.pages)


def test_minor_proxy_ends_before_the_18th_birthday(world: Any) -> None:
    from datetime import date

    from gateway.smart_auth import people

    people.add_user(world.smart.engine, "dad", "correct horse battery", "Patient/robert-chen")
    granted = admin.grant_proxy(world.smart.engine, world.store, "dad", "Patient/daniel-garcia", "FTH",
                                until=date(2040, 1, 1))
    assert granted["valid_until"] == "2029-05-09"
    with world.smart.engine.connect() as conn:
        user = people.find_user(world.smart.engine, "dad")
        assert user is not None
        assert people.acting_for(conn, user.id, date(2029, 5, 9))["daniel-garcia"] is True  # 17: limited
        assert "daniel-garcia" not in people.acting_for(conn, user.id, date(2029, 5, 10))
        assert people.acting_for(conn, user.id, date(2022, 1, 1)).get("daniel-garcia") is None  # before grant


# --- private_key_jwt and backend services ---

def _backend(http: Any, world: Any, fhir_base: str, scope: str = "system/Observation.rs", **kw: Any) -> Any:
    token_url = fhir_base.removesuffix("/fhir") + "/auth/token"
    assertion = world.assertion("backend", token_url, **kw)
    return http.post("/auth/token", {"grant_type": "client_credentials", "scope": scope,
                                     "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                                     "client_assertion": assertion})


def test_backend_services_token(world: Any, http: Any, fhir_base: str) -> None:
    reply = _backend(http, world, fhir_base)
    assert reply.status == 200, reply.text
    token = reply.json()
    assert token["expires_in"] <= 300 and "refresh_token" not in token and token["scope"] == "system/Observation.rs"
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert http.get("/fhir/Observation?patient=daniel-garcia&_count=1", bearer).status == 200
    assert http.get("/fhir/Patient/daniel-garcia", bearer).status == 403
    es = _backend(http, world, fhir_base, key=world.ec, alg="ES384")
    assert es.status == 200, es.text


@pytest.mark.parametrize("case", ["reused-jti", "exp-too-far", "unknown-kid", "wrong-aud", "bad-jku", "hs256",
                                  "no-kid", "wrong-scope", "user-scope"])
def test_client_assertion_refusals(world: Any, http: Any, fhir_base: str, case: str) -> None:
    if case == "reused-jti":
        assert _backend(http, world, fhir_base, jti="same").status == 200
        reply = _backend(http, world, fhir_base, jti="same")
    elif case == "exp-too-far":
        reply = _backend(http, world, fhir_base, exp_in=900)
    elif case == "unknown-kid":
        stranger = RSAKey.generate_key(2048, {"kid": "stranger"}, private=True)
        reply = _backend(http, world, fhir_base, key=stranger)
    elif case == "wrong-aud":
        reply = _backend(http, world, fhir_base, aud="http://elsewhere.example/token")
    elif case == "bad-jku":
        reply = _backend(http, world, fhir_base, headers={"jku": "http://evil.example/jwks"})
    elif case == "hs256":
        from joserfc.jwk import OctKey

        reply = _backend(http, world, fhir_base, key=OctKey.generate_key(256, {"kid": "rsa-1"}), alg="HS256")
    elif case == "no-kid":
        reply = _backend(http, world, fhir_base, headers={"kid": ""})
    elif case == "wrong-scope":
        reply = _backend(http, world, fhir_base, scope="system/Patient.cruds")
        assert reply.status == 400 and reply.json()["error"] == "invalid_scope"
        return
    else:
        reply = _backend(http, world, fhir_base, scope="patient/*.rs")
        assert reply.status == 400 and reply.json()["error"] == "invalid_scope"
        return
    assert reply.status in (400, 401) and reply.json()["error"] == "invalid_client", reply.text


@responses.activate
def test_private_key_jwt_with_a_jwks_url_and_key_rotation(world: Any, http: Any, fhir_base: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    jwks_url = "https://app.example/.well-known/jwks.json"
    first = RSAKey.generate_key(2048, {"kid": "k1"}, private=True)
    second = RSAKey.generate_key(2048, {"kid": "k2"}, private=True)
    responses.get(jwks_url, json=KeySet([first]).as_dict(private=False))
    admin.register_client(world.smart.engine, "url-app", [REDIRECT], jwks_url=jwks_url, scope="system/*.rs")
    token_url = fhir_base.removesuffix("/fhir") + "/auth/token"

    def ask(key: Any, jku: str | None = None) -> Any:
        headers = {"jku": jku} if jku else None
        assertion = world.assertion("url-app", token_url, key=key, headers=headers)
        return http.post("/auth/token", {"grant_type": "client_credentials", "scope": "system/Patient.rs",
                                         "client_assertion_type":
                                             "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                                         "client_assertion": assertion})

    assert ask(first, jku=jwks_url).status == 200
    assert len(responses.calls) == 1
    # The client rotates its keys. An unknown kid within 10 seconds of the last fetch is refused
    # without fetching again (made-up kids must not make the server hammer the URL)...
    responses.replace(responses.GET, jwks_url, json=KeySet([first, second]).as_dict(private=False))
    assert ask(second).status in (400, 401)
    assert len(responses.calls) == 1
    # ...and after that, it makes the server fetch the JWKS again.
    from gateway.smart_auth import server

    monkeypatch.setattr(server, "JWKS_MIN_REFETCH", 0)
    assert ask(second).status == 200
    assert len(responses.calls) == 2
    assert ask(first).status == 200 and len(responses.calls) == 2  # known kids use the kept set


def test_jwks_rotation_keeps_the_previous_key_published(world: Any, http: Any) -> None:
    from gateway.smart_auth import keys

    before = {k["kid"] for k in http.get("/auth/jwks").json()["keys"]}
    new_kid = keys.rotate(world.smart.engine)
    after = {k["kid"] for k in http.get("/auth/jwks").json()["keys"]}
    assert new_kid in after and before <= after
    keys.rotate(world.smart.engine)
    assert not before & {k["kid"] for k in http.get("/auth/jwks").json()["keys"]}


def test_id_tokens_sign_with_the_current_key_parsed_once(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from joserfc import jwt

    from gateway.smart_auth import keys

    engine = world.smart.engine
    public = KeySet.import_key_set(keys.jwks(engine))  # the first use parses the stored key
    imports = []
    real_import = RSAKey.import_key
    monkeypatch.setattr(RSAKey, "import_key", lambda *a, **k: imports.append(1) or real_import(*a, **k))
    tokens = [keys.sign(engine, {"n": n}) for n in range(3)]
    assert imports == []  # signing again parses nothing (the import validates the key: ~45 ms CPU)
    monkeypatch.undo()
    assert [jwt.decode(token, public).claims for token in tokens] == [{"n": 0}, {"n": 1}, {"n": 2}]
    new_kid = keys.rotate(engine)  # a rotation signs with the new key at once
    token = keys.sign(engine, {"n": 3})
    assert jwt.decode(token, KeySet.import_key_set(keys.jwks(engine))).header["kid"] == new_kid


# --- the resource server without a valid token ---

def test_api_without_or_with_a_bad_token(world: Any, app: Any) -> None:
    app.extensions["gateway"].settings.open_access = False
    client = app.test_client()
    assert client.get("/fhir/Patient/maria-garcia").status_code == 401
    reply = client.get("/fhir/Patient/maria-garcia", headers={"Authorization": "Bearer nonsense"})
    assert reply.status_code == 401 and "invalid_token" in reply.headers["WWW-Authenticate"]
    assert client.get("/fhir/metadata").status_code == 200
    assert client.get("/fhir/.well-known/smart-configuration").status_code == 200


def test_hl7_over_http_with_a_backend_services_token(world: Any, app: Any, http: Any, fhir_base: str) -> None:
    from tests.hl7.test_ingest import adt, msa

    app.extensions["gateway"].settings.open_access = False
    jwks = KeySet([world.rsa]).as_dict(private=False)
    admin.register_client(world.smart.engine, "ehr-feed", [REDIRECT], jwks=jwks, scope="system/*.c")
    token_url = fhir_base.removesuffix("/fhir") + "/auth/token"
    token = http.post("/auth/token", {
        "grant_type": "client_credentials", "scope": "system/*.c",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": world.assertion("ehr-feed", token_url)}).json()["access_token"]
    client = app.test_client()
    sent = client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2",
                       headers={"Authorization": f"Bearer {token}"})
    assert sent.status_code == 200 and msa(sent.get_data(as_text=True))[1] == "AA"
    reader = _backend(http, world, fhir_base).json()["access_token"]  # system/Observation.rs: no create
    refused = client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2",
                          headers={"Authorization": f"Bearer {reader}"})
    assert refused.status_code == 401


def test_proxy_grants_are_recorded_as_related_person_and_consent(world: Any, http: Any, fhir_base: str) -> None:
    import json as _json

    from gateway.smart_auth import people

    def read(rtype: str, rid: str) -> dict[str, Any]:
        with world.store.reading() as repo:
            return _json.loads(repo.read(rtype, rid).content)

    with world.smart.engine.connect() as conn:
        linda = people.find_user(world.smart.engine, "linda")
        maria = people.find_user(world.smart.engine, "maria")
        assert linda is not None and maria is not None
        carer = people.proxy_record(conn, linda.id, "robert-chen")
        # Maria's own Patient already links to her RelatedPerson for Sofia: it is reused.
        assert people.proxy_record(conn, maria.id, "sofia-garcia") == "maria-garcia-mother-of-sofia"
    assert carer is not None
    related = read("RelatedPerson", carer)
    assert related["patient"]["reference"] == "Patient/robert-chen"
    assert related["name"][0]["family"] == "Chen"  # copied from Linda's own record
    from sqlalchemy import select

    from gateway.smart_auth.models import proxy_grant

    with world.smart.engine.connect() as conn:
        consent_id = conn.execute(select(proxy_grant.c.consent_id).where(
            proxy_grant.c.user_id == linda.id)).scalar_one()
    consent = read("Consent", consent_id)
    assert consent["status"] == "active" and consent["patient"]["reference"] == "Patient/robert-chen"
    assert consent["provision"]["actor"][0]["reference"]["reference"] == f"RelatedPerson/{carer}"
    assert "start" in consent["provision"]["period"]
    daniel = read("Consent", _consent_of(world, maria.id, "daniel-garcia"))
    assert daniel["provision"]["period"]["end"] == "2029-05-09"  # ends before Daniel turns 18

    # Linda acting for her father is that RelatedPerson.
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs openid fhirUser")
    launch = run_launch(http, params, verifier, "linda", patient="Patient/robert-chen")
    token = exchange(http, launch).json()
    body = http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"}).json()
    assert body["fhirUser"] == f"{fhir_base}/RelatedPerson/{carer}"

    assert world.smart.revoke_proxy("linda", "robert-chen") == [consent_id]
    assert read("Consent", consent_id)["status"] == "inactive"


def _consent_of(world: Any, user_id: int, patient_id: str) -> str:
    from sqlalchemy import select

    from gateway.smart_auth.models import proxy_grant

    with world.smart.engine.connect() as conn:
        return conn.execute(select(proxy_grant.c.consent_id).where(
            proxy_grant.c.user_id == user_id, proxy_grant.c.patient_id == patient_id)).scalar_one()
