"""Authorization code flow end to end through the pages: login, MFA, picker, consent, token, API."""

from __future__ import annotations

import base64
import json
from typing import Any

import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.smart_auth.conftest import REDIRECT, FlaskHttp, authorize_params, exchange, run_launch


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_standalone_launch_parent_picks_child(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    assert "code" in launch.params, launch.location
    assert launch.params["state"] == params["state"]
    picker = next(p for p in launch.pages if 'id="patient-picker"' in p)
    for option in ("Patient/maria-garcia", "Patient/sofia-garcia", "Patient/daniel-garcia"):
        assert f'value="{option}"' in picker
    assert "Patient/robert-chen" not in picker
    reply = exchange(http, launch)
    assert reply.status == 200, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Pragma"] == "no-cache"
    token = reply.json()
    assert token["token_type"] == "Bearer"
    assert token["patient"] == "sofia-garcia"
    assert token["scope"].split() == params["scope"].split()
    assert token["expires_in"] > 0 and token["refresh_token"]
    assert token["need_patient_banner"] is True and token["smart_style_url"].startswith("http")
    assert token["fhirContext"] == []
    assert http.get("/fhir/Patient/sofia-garcia", _bearer(token["access_token"])).status == 200
    assert http.get("/fhir/Patient/robert-chen", _bearer(token["access_token"])).status == 403
    assert http.get("/fhir/Patient/daniel-garcia", _bearer(token["access_token"])).status == 403
    # Acting for Sofia, Maria (who acts for two children) is her Person; her own record is not in reach.
    from gateway.smart_auth import people, proxies

    person = proxies.person_id(people.find_user(world.smart.engine, "maria"))  # type: ignore[arg-type]
    assert http.get(f"/fhir/Person/{person}", _bearer(token["access_token"])).status == 200
    assert http.get("/fhir/RelatedPerson/maria-garcia-mother-of-sofia", _bearer(token["access_token"])).status == 200
    assert http.get("/fhir/Patient/maria-garcia", _bearer(token["access_token"])).status == 403
    assert http.get("/fhir/Observation/maria-garcia-hba1c-2026-11-10", _bearer(token["access_token"])).status == 403

    # id_token: RS256, signed by a key published in the JWKS, with fhirUser.
    jwks = KeySet.import_key_set(http.get("/auth/jwks").json())
    header = json.loads(base64.urlsafe_b64decode(token["id_token"].split(".")[0] + "=="))
    assert header["alg"] == "RS256"
    claims = jwt.decode(token["id_token"], jwks, algorithms=["RS256"]).claims
    assert claims["fhirUser"] == f"{fhir_base}/Person/{person}"
    assert claims["aud"] == "public-app" and claims["iss"] == fhir_base


def test_mfa_is_required_when_enrolled(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base)
    refused = run_launch(http, params, verifier, "robert", otp="000000")
    assert "code" not in refused.params
    assert any("The code is not valid" in p for p in refused.pages)

    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "robert", otp=pyotp.TOTP(_secret()).now())
    assert "code" in launch.params
    assert any('id="mfa-form"' in p for p in launch.pages)
    assert exchange(http, launch).json()["patient"] == "robert-chen"


def _secret() -> str:
    from tests.smart_auth.conftest import TOTP_SECRET

    return TOTP_SECRET


def test_consent_narrows_to_laboratory_observations(world: Any, http: Any, fhir_base: str) -> None:
    lab = ("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category"
           "|laboratory")
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia",
                        ticked=["launch/patient", lab])
    token = exchange(http, launch).json()
    assert token["scope"].split() == ["launch/patient", lab]
    headers = _bearer(token["access_token"])
    found = http.get("/fhir/Observation?patient=maria-garcia&_count=200&_total=accurate", headers).json()
    categories = {c["code"] for e in found["entry"] for cat in e["resource"]["category"] for c in cat["coding"]}
    assert categories == {"laboratory"}
    assert found["total"] == len(found["entry"])
    vital = http.get("/fhir/Observation?patient=maria-garcia&category=vital-signs&_count=1&_total=accurate",
                     _bearer(token["access_token"])).json()
    assert vital["total"] == 0
    # Other types were not granted at all.
    assert http.get("/fhir/Condition?patient=maria-garcia", headers).status == 403
    assert http.get("/fhir/Patient/maria-garcia", headers).status == 403


def test_consent_cannot_widen_what_the_app_asked_for(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/Observation.rs")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia",
                        ticked=["launch/patient", "patient/Observation.rs", "patient/*.cruds", "user/*.cruds"])
    assert exchange(http, launch).json()["scope"] == "launch/patient patient/Observation.rs"


def test_deny_redirects_with_access_denied_and_state(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia", decision="deny")
    assert launch.params["error"] == "access_denied"
    assert launch.params["state"] == params["state"]
    assert "code" not in launch.params


def test_ehr_launch_binds_the_stored_context(world: Any, http: Any, fhir_base: str, app: Any) -> None:
    from gateway.smart_auth.admin import launch_url

    made = launch_url(world.smart, "public-app", "Patient/daniel-garcia", "maria", "Encounter/daniel-garcia-enc-x")
    assert made["launch_url"].startswith(REDIRECT + "?iss=")
    params, verifier = authorize_params(fhir_base, scope="launch patient/*.rs openid fhirUser", launch=made["launch"])
    launch = run_launch(http, params, verifier, "maria")
    assert not any('id="patient-picker"' in p for p in launch.pages)
    token = exchange(http, launch).json()
    assert token["patient"] == "daniel-garcia"
    assert token["encounter"] == "daniel-garcia-enc-x"
    assert token["fhirContext"] == [{"reference": "Encounter/daniel-garcia-enc-x"}]

    # The launch was made for maria: another user cannot use it.
    params, verifier = authorize_params(fhir_base, scope="launch patient/*.rs", launch=made["launch"])
    other = run_launch(FlaskHttp(app.test_client()), params, verifier, "linda")
    assert other.params.get("error") == "access_denied"


def test_unknown_launch_is_refused_with_state(world: Any, http: Any, fhir_base: str) -> None:
    params, _ = authorize_params(fhir_base, scope="launch patient/*.rs", launch="no-such-launch")
    reply = http.get("/auth/authorize?" + _q(params))
    assert reply.status == 302
    assert "error=invalid_request" in reply.location and f"state={params['state']}" in reply.location


def _q(params: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


def test_lockout_after_repeated_failures(world: Any, http: Any, fhir_base: str) -> None:
    from tests.smart_auth.conftest import csrf

    params, _ = authorize_params(fhir_base)
    http.get("/auth/authorize?" + _q(params))
    page = http.get("/auth/login").text
    for _ in range(5):
        reply = http.post("/auth/login", {"csrf_token": csrf(page), "username": "linda", "password": "wrong-pass"})
        assert reply.status == 401
        page = reply.text
    reply = http.post("/auth/login", {"csrf_token": csrf(page), "username": "linda",
                                      "password": "correct horse battery"})
    assert reply.status == 401 and "Too many failed attempts" in reply.text


def test_login_form_needs_csrf_token(world: Any, http: Any, fhir_base: str) -> None:
    params, _ = authorize_params(fhir_base)
    http.get("/auth/authorize?" + _q(params))
    reply = http.post("/auth/login", {"username": "maria", "password": "correct horse battery"})
    assert reply.status != 302


def test_discovery_documents(world: Any, http: Any, fhir_base: str, app: Any) -> None:
    conf = http.get("/fhir/.well-known/smart-configuration")
    assert conf.status == 200
    body = conf.json()
    for key in ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint", "grant_types_supported",
                "token_endpoint_auth_methods_supported", "scopes_supported", "response_types_supported",
                "capabilities", "code_challenge_methods_supported", "introspection_endpoint",
                "revocation_endpoint"):
        assert key in body
    assert body["code_challenge_methods_supported"] == ["S256"]
    assert body["issuer"] == fhir_base
    assert conf.headers.get("Access-Control-Allow-Origin") == "*" or \
        http.get("/fhir/.well-known/smart-configuration", {"Origin": "http://app.example"}).headers[
            "Access-Control-Allow-Origin"] in ("*", "http://app.example")
    oidc = http.get("/fhir/.well-known/openid-configuration").json()
    assert oidc["id_token_signing_alg_values_supported"] == ["RS256"]
    metadata = http.get("/fhir/metadata").json()
    security = metadata["rest"][0]["security"]
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["authorize"] == body["authorization_endpoint"] and uris["token"] == body["token_endpoint"]
    app.extensions["gateway"].settings.open_access = False  # a preflight must pass without credentials
    preflight = http.client.options("/fhir/Observation/x", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    token_cors = http.post("/auth/token", {}, {"Origin": "http://app.example"})
    assert token_cors.headers.get("Access-Control-Allow-Origin") in ("*", "http://app.example")


def test_patient_sees_connected_apps_and_revokes_one(world: Any, http: Any, fhir_base: str) -> None:
    from tests.smart_auth.conftest import csrf

    params, verifier = authorize_params(fhir_base)
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    token = exchange(http, launch).json()
    bearer = _bearer(token["access_token"])
    assert http.get("/fhir/Patient/sofia-garcia", bearer).status == 200
    page = http.get("/auth/apps")
    assert page.status == 200 and "public-app" in page.text and "Patient/sofia-garcia" in page.text
    import re

    grant_id = re.search(r'name="grant_id" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    from gateway.smart_auth import people

    linda = people.find_user(world.smart.engine, "linda")
    assert linda is not None and world.smart.revoke_app(linda.id, grant_id) is False
    assert http.get("/fhir/Patient/sofia-garcia", bearer).status == 200
    done = http.post("/auth/apps", {"csrf_token": csrf(page.text), "grant_id": grant_id})
    assert done.status == 302
    assert http.get("/fhir/Patient/sofia-garcia", bearer).status == 401
    assert "No app holds access now" in http.get("/auth/apps").text
    # Another user cannot revoke what is not theirs, and must sign in to see the page at all.
    from tests.smart_auth.conftest import FlaskHttp

    assert FlaskHttp(http.client.application.test_client()).get("/auth/apps").location.endswith("/auth/login")


def test_fhir_user_resource_is_readable_with_its_token(world: Any, http: Any, fhir_base: str) -> None:
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/Observation.rs openid fhirUser")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/maria-garcia")
    token = exchange(http, launch).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(http.get("/auth/jwks").json()),
                        algorithms=["RS256"]).claims
    assert claims["fhirUser"] == f"{fhir_base}/Patient/maria-garcia"
    # Only Observations were granted, yet the fhirUser resource itself is readable; others are not.
    assert http.get("/fhir/Patient/maria-garcia", _bearer(token["access_token"])).status == 200
    assert http.get("/fhir/Patient/sofia-garcia", _bearer(token["access_token"])).status == 403
    assert http.get("/fhir/Patient?_id=maria-garcia", _bearer(token["access_token"])).status == 403


def test_sign_up_with_an_activation_code(world: Any, http: Any, fhir_base: str, monkeypatch: Any) -> None:
    from gateway.smart_auth import people
    from tests.smart_auth.conftest import csrf

    code, expires = people.issue_activation_code(world.smart.engine, "sofia-garcia")
    assert 44 * 86400_000 < expires - people.now_ms() <= 45 * 86400_000
    page = http.get("/auth/signup").text
    form = {"csrf_token": csrf(page), "activation_code": code.lower(), "username": "sofia",
            "password": "a long enough password"}
    done = http.post("/auth/signup", form)
    assert done.status == 302
    user = people.check_password(world.smart.engine, "sofia", "a long enough password")
    assert user.fhir_user == "Patient/sofia-garcia"
    # Single use.
    again = FlaskHttp(http.client.application.test_client())
    page = again.get("/auth/signup").text
    reply = again.post("/auth/signup", {**form, "csrf_token": csrf(page), "username": "sofia2"})
    assert reply.status == 400 and "not valid" in reply.text
    assert people.find_user(world.smart.engine, "sofia2") is None
    # Expired after 45 days.
    late, _ = people.issue_activation_code(world.smart.engine, "daniel-garcia")
    real = people.now_ms
    monkeypatch.setattr(people, "now_ms", lambda: real() + 45 * 86400_000 + 1000)
    reply = again.post("/auth/signup", {**form, "csrf_token": csrf(page), "activation_code": late,
                                        "username": "daniel2"})
    assert reply.status == 400 and people.find_user(world.smart.engine, "daniel2") is None


def test_password_reset_through_an_emailed_link(world: Any, http: Any) -> None:
    import re

    from gateway.smart_auth import people
    from tests.smart_auth.conftest import PASSWORD, csrf

    sent: list[tuple[str, str, str]] = []
    world.smart.mailer = lambda to, subject, body: sent.append((to, subject, body))
    page = http.get("/auth/reset").text
    told = http.post("/auth/reset", {"csrf_token": csrf(page), "username": "maria"})
    unknown = http.post("/auth/reset", {"csrf_token": csrf(page), "username": "nobody-here"})
    assert told.status == unknown.status == 200
    # No hint who has a login: the two pages are the same but for the form's CSRF token, which carries
    # the second it was made in.
    def same(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r'name="csrf_token" type="hidden" value="[^"]+"', "", text))

    assert same(told.text) == same(unknown.text)
    assert len(sent) == 1 and sent[0][0] == "maria.garcia@example.org"
    link = re.search(r"http://\S+/auth/reset/(\S+)", sent[0][2])
    assert link is not None
    path = "/auth/reset/" + link.group(1)
    form = http.get(path).text
    assert 'id="new-password-form"' in form
    epoch = people.find_user(world.smart.engine, "maria").session_epoch
    done = http.post(path, {"csrf_token": csrf(form), "password": "a brand new password"})
    assert done.status == 200 and "password is changed" in done.text
    # Every browser session that began under the old password is over.
    assert people.find_user(world.smart.engine, "maria").session_epoch == epoch + 1
    assert people.check_password(world.smart.engine, "maria", "a brand new password").username == "maria"
    with pytest.raises(people.AuthError):
        people.check_password(world.smart.engine, "maria", PASSWORD)
    assert http.get(path).status == 400  # single use


def test_one_address_failing_on_many_logins_is_slowed(world: Any, http: Any, fhir_base: str) -> None:
    from gateway import ratelimit
    from tests.smart_auth.conftest import csrf

    world.smart.limiter = ratelimit.FailureLimiter(ratelimit.storage(world.smart.settings), limit=3)
    page = http.get("/auth/login").text
    for username in ("maria", "linda", "robert"):
        reply = http.post("/auth/login", {"csrf_token": csrf(page), "username": username, "password": "wrong-pass"})
        assert reply.status == 401 and "Unknown username or wrong password" in reply.text
    # Right password, but this address has failed too often: refused without even checking it.
    reply = http.post("/auth/login", {"csrf_token": csrf(page), "username": "daniel",
                                      "password": "correct horse battery"})
    assert reply.status == 401 and "from your address" in reply.text
