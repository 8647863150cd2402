"""SMART apps in the console: registering each kind, bad input, disabling and enabling, rotating a secret,
revoking a grant; each checked where it matters, at the token endpoint and the FHIR API."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from joserfc.jwk import KeySet
from sqlalchemy import select

from gateway import create_app, db
from gateway.admin import apps as service
from gateway.smart_auth import people
from gateway.smart_auth.models import oauth_client
from tests.portal.conftest import text_of
from tests.smart_auth.conftest import REDIRECT, FlaskHttp, authorize_params, exchange, run_launch

SOFIA = "/fhir/Patient/sofia-garcia"


@pytest.fixture
def http(app: Any) -> FlaskHttp:
    """The app's side: a browser for the user's launch and the app's own calls."""
    return FlaskHttp(app.test_client())


@pytest.fixture
def officer(console: Any) -> Any:
    return console("security-officer")


def _bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def _token(http: Any, fhir_base: str, client_id: str = "public-app", secret: str | None = None,
           shown_as: str | None = None) -> dict[str, Any]:
    """Maria's token for Sofia through a real launch (authorize, login, picker, consent, code exchange)."""
    params, verifier = authorize_params(fhir_base, client_id=client_id)
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    assert "code" in launch.params, launch.location
    if shown_as:
        assert f"Allow {shown_as} access?" in text_of(launch.pages[-1])
    if secret is None:
        reply = exchange(http, launch, client_id=client_id)
    else:
        reply = http.post("/auth/token", {"grant_type": "authorization_code", "code": launch.params["code"],
                                          "redirect_uri": REDIRECT, "code_verifier": launch.verifier},
                          _basic(client_id, secret))
    assert reply.status == 200, reply.text
    return reply.json()


def _register(officer: Any, **form: Any) -> Any:
    data = {"kind": "public", "name": "Test app", "redirect_uris": REDIRECT, **form}
    return officer.post("/admin/apps/new", data)


def _secret(html: str) -> str:
    match = re.search(r'id="client-secret">([^<]+)<', html)
    assert match, text_of(html)[:500]
    return match.group(1).strip()


def _error(html: str) -> str:
    match = re.search(r'id="apps-error">([^<]+)<', html)
    assert match, text_of(html)[:500]
    return text_of(match.group(1))


def _fhir_base(app: Any) -> str:
    return app.extensions["gateway"].settings.fhir_base


def _audit_actions(app: Any) -> list[tuple[str, str]]:
    """(console action, agent) of every console AuditEvent written so far."""
    services = app.extensions["gateway"]
    services.audit.flush()
    with services.store.reading() as repo:
        rows = repo.conn.execute(select(db.resource.c.content).where(
            db.resource.c.resource_type == "AuditEvent")).scalars().all()
    events = [json.loads(content) for content in rows]
    return [(e["subtype"][0]["code"], e["agent"][0]["name"]) for e in events
            if e.get("type", {}).get("code") == "console"]


# --- registering ---

def test_register_a_public_app(app: Any, officer: Any) -> None:
    reply = _register(officer, client_id="calendar", name="Clinic calendar",
                      redirect_uris=f"{REDIRECT}\n http://app.example/other \n\n", launch_url="https://app.example/launch")
    assert reply.status_code == 200
    html = reply.get_data(as_text=True)
    assert "is registered with the client id calendar" in text_of(html) and 'id="client-secret"' not in html
    registered = service.get_app(app.extensions["gateway"].engine, "calendar")
    assert registered.client_type == "public" and registered.name == "Clinic calendar"
    assert registered.redirect_uris == [REDIRECT, "http://app.example/other"]
    assert registered.scope == service.admin.DEFAULT_APP_SCOPE and registered.launch_url == "https://app.example/launch"
    listing = text_of(officer.get("/admin/apps"))
    assert "Clinic calendar" in listing and "calendar" in listing
    assert ("create-client", f"staff:{officer.username}") in _audit_actions(app)


def test_confidential_app_secret_is_shown_once_and_works_with_basic_auth(app: Any, officer: Any, http: Any) -> None:
    reply = _register(officer, kind="confidential-symmetric", client_id="billing", name="Billing",
                      scope="launch/patient patient/*.rs openid fhirUser offline_access")
    secret = _secret(reply.get_data(as_text=True))
    assert reply.headers["Cache-Control"] == "no-store"
    engine = app.extensions["gateway"].engine
    with engine.connect() as conn:
        stored = conn.execute(select(oauth_client.c.secret_hash).where(oauth_client.c.client_id == "billing")).scalar()
    assert stored and secret not in stored and stored.startswith("$argon2") and people.verify_secret(stored, secret)
    # Never shown again.
    assert secret not in officer.get("/admin/apps/client/billing") and secret not in officer.get("/admin/apps")
    token = _token(http, _fhir_base(app), "billing", secret, shown_as="Billing")  # the consent page names it
    assert http.get(SOFIA, _bearer(token)).status == 200
    # And the secret is what authenticates it.
    refresh = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    assert http.post("/auth/token", refresh, _basic("billing", "wrong")).status == 401


def test_asymmetric_app_from_an_uploaded_jwks_file(app: Any, officer: Any, world: Any, http: Any) -> None:
    jwks = json.dumps(KeySet([world.rsa]).as_dict(private=False)).encode()
    reply = _register(officer, kind="confidential-asymmetric", client_id="lab-feed", name="Lab feed",
                      scope="system/Observation.rs", jwks_file=(io.BytesIO(jwks), "keys.json"))
    assert reply.status_code == 200, text_of(reply.get_data(as_text=True))[:400]
    assert "rsa-1" in officer.get("/admin/apps/client/lab-feed")
    # The uploaded keys are the ones the token endpoint checks a backend service's assertion with.
    token_url = app.extensions["gateway"].smart.token_url
    reply = http.post("/auth/token", {
        "grant_type": "client_credentials", "scope": "system/Observation.rs",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": world.assertion("lab-feed", token_url)})
    assert reply.status == 200, reply.text
    # With a JWKS URL instead.
    reply = _register(officer, kind="confidential-asymmetric", client_id="lab-feed-2", name="Lab feed 2",
                      jwks_url="https://keys.example/jwks.json")
    assert reply.status_code == 200
    registered = service.get_app(app.extensions["gateway"].engine, "lab-feed-2")
    assert registered.jwks_url == "https://keys.example/jwks.json" and "system/*.cruds" in registered.scope


BAD_REGISTRATIONS: list[tuple[dict[str, Any], str]] = [
    ({"redirect_uris": "  "}, "at least one redirect URI"),
    ({"redirect_uris": "app.example/callback"}, "not a redirect URI"),
    ({"redirect_uris": "https://app.example/cb#frag"}, "not a redirect URI"),
    ({"client_id": "public-app"}, "client id public-app already"),
    ({"client_id": "has space"}, "A client id has"),
    ({"client_id": ""}, "Enter a client id"),
    ({"name": ""}, "a name"),
    ({"kind": "sideways"}, "kind of app"),
    ({"scope": "patient/*.read everything"}, "everything"),
    ({"scope": "system/*.rs"}, "system/ scopes"),
    ({"jwks_url": "https://keys.example/jwks"}, "Only apps that sign in with a key set"),
    ({"kind": "confidential-asymmetric"}, "needs a JWKS URL or a JWKS file"),
    ({"kind": "confidential-asymmetric", "jwks_url": "ftp://keys.example/jwks"}, "JWKS URL must be"),
    ({"kind": "confidential-asymmetric", "jwks": b"{not json"}, "it is not JSON"),
    ({"kind": "confidential-asymmetric", "jwks": b'{"keys": [{"kty": "RSA"}]}'}, "cannot be used"),
    ({"kind": "confidential-asymmetric", "jwks": "no-kid"}, "needs a kid"),
    ({"kind": "confidential-asymmetric", "jwks": "private"}, "private or symmetric key"),
    ({"kind": "confidential-asymmetric", "jwks": "public", "jwks_url": "https://keys.example/jwks"}, "not both"),
]


def test_bad_registrations_say_why_on_the_page(app: Any, officer: Any, world: Any) -> None:
    public = KeySet([world.rsa]).as_dict(private=False)
    files = {"no-kid": {"keys": [{k: v for k, v in public["keys"][0].items() if k != "kid"}]},
             "private": KeySet([world.rsa]).as_dict(private=True), "public": public}
    for case, message in BAD_REGISTRATIONS:
        form: dict[str, Any] = {"client_id": "x1", **case}
        jwks = form.pop("jwks", None)
        if jwks is not None:
            raw = json.dumps(files[jwks]).encode() if isinstance(jwks, str) else jwks
            form["jwks_file"] = (io.BytesIO(raw), "keys.json")
        reply = _register(officer, **form)
        assert reply.status_code == 400, case
        shown = _error(reply.get_data(as_text=True))
        assert message in shown, (case, shown)
    engine = app.extensions["gateway"].engine
    with engine.connect() as conn:
        assert conn.execute(select(oauth_client.c.client_id).where(oauth_client.c.client_id == "x1")).first() is None


def test_edit_a_registration(app: Any, officer: Any) -> None:
    page = "/admin/apps/client/other-app"
    reply = officer.post("/admin/apps/update", {"client_id": "other-app", "name": "Other app",
                                                "redirect_uris": "https://other.example/cb",
                                                "scope": "launch/patient patient/Observation.rs",
                                                "launch_url": ""}, page=page)
    assert reply.status_code == 200 and "The registration was saved" in text_of(reply.get_data(as_text=True))
    changed = service.get_app(app.extensions["gateway"].engine, "other-app")
    assert changed.name == "Other app" and changed.redirect_uris == ["https://other.example/cb"]
    assert changed.scope == "launch/patient patient/Observation.rs"
    reply = officer.post("/admin/apps/update", {"client_id": "other-app", "name": "Other app",
                                                "redirect_uris": "", "scope": ""}, page=page)
    assert reply.status_code == 400 and "at least one redirect URI" in _error(reply.get_data(as_text=True))
    assert service.get_app(app.extensions["gateway"].engine, "other-app").redirect_uris == ["https://other.example/cb"]
    assert ("update-client", f"staff:{officer.username}") in _audit_actions(app)


# --- disabling, rotating, revoking ---

@pytest.fixture
def worker_b(settings: Any) -> Iterator[Any]:
    """A second app instance on the same database that keeps cached tokens an hour."""
    other = create_app(dataclasses.replace(settings, token_cache_seconds=3600))
    yield other
    other.extensions["gateway"].audit.flush()
    other.extensions["gateway"].close()


def test_disable_stops_the_apps_tokens_everywhere_and_enable_lets_it_back(app: Any, officer: Any, http: Any,
                                                                          worker_b: Any) -> None:
    fhir_base = _fhir_base(app)
    token = _token(http, fhir_base)
    b = FlaskHttp(worker_b.test_client())
    assert http.get(SOFIA, _bearer(token)).status == 200
    assert b.get(SOFIA, _bearer(token)).status == 200  # cached in B now
    reply = officer.post("/admin/apps/disable", {"client_id": "public-app"}, page="/admin/apps/client/public-app")
    assert reply.status_code == 200 and "Disabled since" in text_of(reply.get_data(as_text=True))
    # Refused at once, in this process and in the other one that had the token cached.
    assert http.get(SOFIA, _bearer(token)).status == 401
    assert b.get(SOFIA, _bearer(token)).status == 401
    # No new tokens: neither from the refresh token nor through a new authorization.
    refreshed = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                          "client_id": "public-app"})
    assert refreshed.status in (400, 401) and refreshed.json()["error"] == "invalid_client"
    params, verifier = authorize_params(fhir_base)
    refused = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    assert refused.params.get("error") == "unauthorized_client", refused.location
    introspected = http.post("/auth/introspect", {"token": token["access_token"], "client_id": "public-app"})
    assert introspected.status == 200 and introspected.json() == {"active": False}
    assert "Disabled since" in text_of(officer.get("/admin/apps"))
    # Enabled again: it gets new tokens, and they work.
    reply = officer.post("/admin/apps/enable", {"client_id": "public-app"}, page="/admin/apps/client/public-app")
    assert reply.status_code == 200 and "enabled again" in text_of(reply.get_data(as_text=True))
    fresh = _token(http, fhir_base)
    assert http.get(SOFIA, _bearer(fresh)).status == 200
    assert b.get(SOFIA, _bearer(fresh)).status == 200
    actions = _audit_actions(app)
    assert ("execute-disable-client", f"staff:{officer.username}") in actions
    assert ("execute-enable-client", f"staff:{officer.username}") in actions


def test_rotating_a_secret(app: Any, officer: Any, http: Any) -> None:
    token = _token(http, _fhir_base(app), "secret-app", "s3cret-value")
    page = "/admin/apps/client/secret-app"
    assert "Rotate the client secret" in text_of(officer.get(page))
    reply = officer.post("/admin/apps/rotate", {"client_id": "secret-app"}, page=page)
    new_secret = _secret(reply.get_data(as_text=True))
    assert new_secret != "s3cret-value" and reply.headers["Cache-Control"] == "no-store"
    refresh = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    old = http.post("/auth/token", refresh, _basic("secret-app", "s3cret-value"))
    assert old.status == 401 and old.json()["error"] == "invalid_client"
    assert http.post("/auth/token", refresh, _basic("secret-app", new_secret)).status == 200
    # A public app has no secret to rotate.
    reply = officer.post("/admin/apps/rotate", {"client_id": "public-app"}, page="/admin/apps/client/public-app")
    assert reply.status_code == 400 and "Only confidential apps" in _error(reply.get_data(as_text=True))
    assert ("execute-rotate-secret", f"staff:{officer.username}") in _audit_actions(app)


def test_revoking_a_grant(app: Any, officer: Any, http: Any) -> None:
    token = _token(http, _fhir_base(app))
    other = _token(http, _fhir_base(app), "other-app")
    page = "/admin/apps/client/public-app"
    html = officer.get(page)
    rows = re.findall(r'<tr class="grant">.*?</tr>', html, re.S)
    assert len(rows) == 1 and "maria" in text_of(rows[0]) and "Patient/sofia-garcia" in text_of(rows[0])
    grant_id = re.search(r'name="grant_id" value="([^"]+)"', rows[0]).group(1)  # type: ignore[union-attr]
    # A grant of another app cannot be revoked through this one's page.
    other_grant = service.active_grants(app.extensions["gateway"].engine, "other-app")[0].grant_id
    reply = officer.post("/admin/apps/revoke", {"client_id": "public-app", "grant_id": other_grant}, page=page)
    assert reply.status_code == 400 and "not active any more" in _error(reply.get_data(as_text=True))
    assert http.get(SOFIA, _bearer(other)).status == 200
    reply = officer.post("/admin/apps/revoke", {"client_id": "public-app", "grant_id": grant_id}, page=page)
    assert reply.status_code == 200 and "authorization was revoked" in text_of(reply.get_data(as_text=True))
    assert http.get(SOFIA, _bearer(token)).status == 401
    refreshed = http.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                          "client_id": "public-app"})
    assert refreshed.status == 400
    assert 'id="no-grants"' in officer.get(page)
    assert http.get(SOFIA, _bearer(other)).status == 200  # the other app's grant is untouched
    listing = officer.get("/admin/apps")
    row = re.search(r'data-client-id="other-app">.*?</tr>', listing, re.S)
    assert row and text_of(row.group(0)).endswith(" 1")
    # The revocation is in the audit trail, and in the patient's own access log.
    services = app.extensions["gateway"]
    services.audit.flush()
    with services.store.reading() as repo:
        from gateway.fhir.search import search

        _, result = search(repo, "AuditEvent", [("patient", "Patient/sofia-garcia"),
                                                ("subtype", "execute-revoke-grant")])
    assert len(result.matches) == 1
    assert f"staff:{officer.username}" in (result.matches[0].content or "")


# --- who may ---

@pytest.mark.parametrize("role", ["operator", "front-desk"])
def test_other_roles_cannot_change_apps(app: Any, console: Any, role: str) -> None:
    driver = console(role)
    assert driver.client.get("/admin/apps").status_code == 403
    for path, data in [("/admin/apps/new", {"kind": "public", "client_id": "sneaky", "name": "x",
                                            "redirect_uris": REDIRECT}),
                       ("/admin/apps/disable", {"client_id": "public-app"}),
                       ("/admin/apps/rotate", {"client_id": "secret-app"})]:
        reply = driver.post(path, data, page="/admin/")
        assert reply.status_code == 403, (role, path)
    assert service.get_app(app.extensions["gateway"].engine, "public-app").disabled is None
    with pytest.raises(service.AppError):
        service.get_app(app.extensions["gateway"].engine, "sneaky")
