"""The upstream client against the error shapes an EHR's FHIR API produces (responses, no network)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from gateway.upstream.client import BackendServicesAuth, BearerAuth, DeadlineExceeded, UpstreamClient, UpstreamError

BASE = "https://ehr.example/fhir"


def client(auth: Any = None, **options: Any) -> tuple[UpstreamClient, list[float]]:
    slept: list[float] = []
    defaults = {"max_retries": 3, "backoff_base": 0.5}
    return UpstreamClient(BASE, auth or BearerAuth("static-secret"), sleep=slept.append,
                          **{**defaults, **options}), slept


def bundle(ids: list[str], next_url: str | None = None) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": next_url}] if next_url else [],
            "entry": [{"resource": {"resourceType": "Observation", "id": i}} for i in ids]}


@responses.activate
def test_429_is_retried_after_the_seconds_retry_after_names() -> None:
    responses.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    c, slept = client()
    assert c.read("Patient", "1") == {"resourceType": "Patient", "id": "1"}
    assert slept == [7.0]
    assert all(call.request.headers["Authorization"] == "Bearer static-secret" for call in responses.calls)


@responses.activate
def test_retry_after_as_an_http_date() -> None:
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    responses.get(f"{BASE}/Patient/1", status=503, headers={"Retry-After": when})
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    c, slept = client()
    c.read("Patient", "1")
    assert len(slept) == 1 and 3.0 <= slept[0] <= 5.5


@responses.activate
def test_5xx_backs_off_exponentially_then_gives_up() -> None:
    for _ in range(4):
        responses.get(f"{BASE}/Patient/1", status=502, body="bad gateway")
    c, slept = client()
    with pytest.raises(UpstreamError) as failure:
        c.read("Patient", "1")
    assert failure.value.transient and failure.value.status == 502
    assert len(responses.calls) == 4  # the first try and 3 retries
    assert [round(s / b, 1) >= 0.8 and s / b <= 1.2 for s, b in zip(slept, [0.5, 1.0, 2.0], strict=True)] == [True] * 3


@responses.activate
def test_a_timeout_is_retried_and_every_request_has_one() -> None:
    responses.get(f"{BASE}/Patient/1", body=requests.ReadTimeout("slow"))
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    c, slept = client(timeout=4.0)
    assert c.read("Patient", "1")["id"] == "1"
    assert len(slept) == 1
    assert all(call.request.req_kwargs["timeout"] == (4.0, 4.0) for call in responses.calls)


@responses.activate
def test_a_4xx_is_not_retried() -> None:
    responses.post(f"{BASE}/Appointment", status=422, json={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                       "diagnostics": "status is required"}]})
    c, slept = client()
    with pytest.raises(UpstreamError) as failure:
        c.create({"resourceType": "Appointment"}, if_none_exist="identifier=x|1")
    assert failure.value.status == 422 and not failure.value.transient
    assert "status is required" in str(failure.value)
    assert slept == [] and len(responses.calls) == 1
    assert responses.calls[0].request.headers["If-None-Exist"] == "identifier=x|1"


@responses.activate
def test_paging_follows_next_links() -> None:
    responses.get(f"{BASE}/Observation", json=bundle(["a", "b"], f"{BASE}?_getpages=x&page=2"),
                  match=[responses.matchers.query_param_matcher({"patient": "p1", "_count": "2"})])
    responses.get(f"{BASE}?_getpages=x&page=2", json=bundle(["c", "d"], f"{BASE}?_getpages=x&page=3"))
    responses.get(f"{BASE}?_getpages=x&page=3", json=bundle(["e"]))
    c, _ = client()
    assert [r["id"] for r in c.search("Observation", {"patient": "p1", "_count": 2})] == ["a", "b", "c", "d", "e"]


@responses.activate
def test_a_next_link_to_another_host_never_gets_the_token() -> None:
    responses.get(f"{BASE}/Observation", json=bundle(["a"], "https://elsewhere.example/steal?page=2"))
    c, _ = client()
    with pytest.raises(UpstreamError, match="another origin"):
        list(c.search("Observation", {}))
    assert len(responses.calls) == 1


@responses.activate
def test_the_deadline_bounds_waiting() -> None:
    responses.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": "30"})
    c, slept = client(backoff_max=60)
    with pytest.raises(DeadlineExceeded):
        c.read("Patient", "1", deadline=time.monotonic() + 2)
    assert slept == []


def _rsa_pem() -> tuple[bytes, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, key.public_key()


@responses.activate
@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_backend_services_token_from_discovery_cached_until_near_expiry(alg: str, caplog: Any) -> None:
    if alg == "RS384":
        pem, public = _rsa_pem()
    else:
        private = ec.generate_private_key(ec.SECP384R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = private.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_jwk = (RSAKey if alg == "RS384" else ECKey).import_key(public_pem)
    responses.get(f"{BASE}/.well-known/smart-configuration",
                  json={"token_endpoint": "https://auth.example/token"})
    issued = iter(["token-one", "token-two"])
    assertions: list[dict[str, Any]] = []

    def token(request: Any) -> tuple[int, dict[str, str], str]:
        form = dict(p.split("=", 1) for p in request.body.split("&"))
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        from urllib.parse import unquote

        token = jwt.decode(unquote(form["client_assertion"]), public_jwk, algorithms=[alg])
        assertions.append({**token.claims, "header": dict(token.header)})
        return 200, {}, json.dumps({"access_token": next(issued), "token_type": "bearer", "expires_in": 300})

    responses.add_callback(responses.POST, "https://auth.example/token", callback=token)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    now = [1_000_000.0]
    auth = BackendServicesAuth("gateway-client", pem, key_id="k1", alg=alg, scope="system/*.rs",
                               clock=lambda: now[0])
    c, _ = client(auth)
    caplog.set_level("DEBUG")
    c.read("Patient", "1")
    c.read("Patient", "1")
    assert len(assertions) == 1  # cached
    assert assertions[0]["iss"] == assertions[0]["sub"] == "gateway-client"
    assert assertions[0]["aud"] == "https://auth.example/token"
    assert assertions[0]["header"] == {"alg": alg, "typ": "JWT", "kid": "k1"}
    assert assertions[0]["exp"] - assertions[0]["iat"] <= 300
    now[0] += 260  # still valid for 40 s, more than a tenth of its 300 s lifetime: cached
    c.read("Patient", "1")
    assert len(assertions) == 1
    now[0] += 15  # within 30 s of expiry: renewed
    c.read("Patient", "1")
    assert len(assertions) == 2
    sent = [call.request.headers.get("Authorization") for call in responses.calls if "/Patient/" in call.request.url]
    assert sent == ["Bearer token-one", "Bearer token-one", "Bearer token-one", "Bearer token-two"]
    assert "token-one" not in caplog.text and "client_assertion" not in caplog.text and "BEGIN" not in caplog.text


@responses.activate
def test_a_401_renews_the_token_once() -> None:
    pem, _ = _rsa_pem()
    responses.post("https://auth.example/token", json={"access_token": "fresh", "expires_in": 3600})
    responses.get(f"{BASE}/Patient/1", status=401)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    auth = BackendServicesAuth("c", pem, token_endpoint="https://auth.example/token")
    c, _ = client(auth)
    assert c.read("Patient", "1")["id"] == "1"
    assert sum(1 for call in responses.calls if call.request.url.endswith("/token")) == 2
    assert "c" in repr(auth) and "fresh" not in repr(auth)
