"""Provisioning used by the CLI (and tests): clients, launch URLs, proxies with the patient's age."""

from __future__ import annotations

import json
from datetime import date
from typing import Any
from urllib.parse import urlencode

from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, insert, select

from gateway.db import write_tx
from gateway.smart_auth import people, proxies
from gateway.smart_auth.models import oauth_client
from gateway.smart_auth.people import AuthError, now_ms

DEFAULT_APP_SCOPE = ("launch launch/patient openid fhirUser profile offline_access online_access "
                     "patient/*.cruds user/*.cruds")
DEFAULT_BACKEND_SCOPE = "system/*.cruds"


# Members of a JWK that hold private key material (RFC 7518 section 6).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def check_jwks(jwks: Any) -> None:
    """A client's JWKS as the token endpoint will use it: readable, every key with a kid, public keys
    only (a private key sent by mistake is refused rather than stored)."""
    try:
        keyset = KeySet.import_key_set(jwks)
    except (JoseError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AuthError(f"the JWKS cannot be read: {exc}") from None
    if not keyset.keys:
        raise AuthError("the JWKS has no keys")
    raw_keys = [raw for raw in jwks.get("keys", []) if isinstance(raw, dict)]
    # The kid as given: joserfc makes one up (the key's thumbprint) for a key that has none.
    if any(not key.kid for key in keyset.keys) or any(not raw.get("kid") for raw in raw_keys):
        raise AuthError("every key in the JWKS needs a kid")
    if any(PRIVATE_MEMBERS & set(raw) for raw in raw_keys):
        raise AuthError("the JWKS holds private or symmetric key material; give the public keys only")


def register_client(engine: Engine, client_id: str, redirect_uris: list[str], *, public: bool = False,
                    secret: str | None = None, jwks_url: str | None = None, jwks: dict[str, Any] | None = None,
                    scope: str | None = None, launch_url: str | None = None, name: str | None = None) -> dict[str, Any]:
    kinds = [public, bool(secret), bool(jwks_url), jwks is not None]
    if sum(kinds) != 1:
        raise AuthError("choose exactly one of --public, --secret, --jwks-url, --jwks-file")
    if jwks is not None:
        check_jwks(jwks)
    client_type = "public" if public else "confidential-symmetric" if secret else "confidential-asymmetric"
    if scope is None:
        scope = DEFAULT_APP_SCOPE + (" " + DEFAULT_BACKEND_SCOPE if client_type == "confidential-asymmetric" else "")
    with write_tx(engine) as conn:
        if conn.execute(select(oauth_client.c.client_id).where(oauth_client.c.client_id == client_id)).first():
            raise AuthError(f"client {client_id!r} exists already")
        conn.execute(insert(oauth_client).values(
            client_id=client_id, client_type=client_type, secret_hash=people.hash_secret(secret) if secret else None,
            redirect_uris=json.dumps(redirect_uris), scope=scope, jwks_url=jwks_url,
            jwks=json.dumps(jwks) if jwks is not None else None, launch_url=launch_url, created_ms=now_ms(),
            name=name or None))
    return {"client_id": client_id, "name": name or None, "client_type": client_type, "redirect_uris": redirect_uris,
            "scope": scope, "jwks_url": jwks_url, "launch_url": launch_url,
            "token_endpoint_auth_method": {"public": "none", "confidential-symmetric": "client_secret_basic",
                                           "confidential-asymmetric": "private_key_jwt"}[client_type]}


def patient_birth_date(store: Any, patient_id: str) -> str | None:
    """The Patient's birthDate; AuthError when the store has no such patient."""
    from gateway.fhir.outcome import FhirError

    try:
        with store.reading() as repo:
            resource = json.loads(repo.read("Patient", patient_id).content or "{}")
    except FhirError:
        raise AuthError(f"no Patient/{patient_id} in the store") from None
    return resource.get("birthDate")


def grant_proxy(engine: Engine, store: Any, username: str, patient: str, relationship: str,
                until: date | None = None, today: date | None = None) -> dict[str, Any]:
    """The grant (policy), then its FHIR record: RelatedPerson and Consent with the same period, and
    the login's Person linking its own Patient and the RelatedPerson of every current relationship."""
    kind, _, patient_id = patient.partition("/")
    if kind != "Patient" or not patient_id:
        raise AuthError("--patient must be Patient/ID")
    user = people.find_user(engine, username)
    if user is None:
        raise AuthError(f"no user {username!r}")
    if user.patient_id == patient_id:
        raise AuthError("a user acts for their own record without a proxy grant")
    birth_date = patient_birth_date(store, patient_id)
    planned = people.proxy_period(birth_date, until, today)
    related_id, consent_id = proxies.record_proxy(store, user, patient_id, relationship, *planned)
    granted = people.grant_proxy(engine, username, patient_id, relationship, birth_date, until=until, today=today,
                                 related_person=related_id, consent_id=consent_id)
    person_id = proxies.record_person(store, user)
    return {**granted, "related_person": f"RelatedPerson/{related_id}", "consent": f"Consent/{consent_id}",
            "person": f"Person/{person_id}"}


def launch_url(smart: Any, client_id: str, patient: str, username: str | None = None,
               encounter: str | None = None) -> dict[str, Any]:
    client = smart.query_client(client_id)
    if client is None:
        raise AuthError(f"no client {client_id!r}")
    kind, _, patient_id = patient.partition("/")
    if kind != "Patient" or not patient_id:
        raise AuthError("--patient must be Patient/ID")
    user_id = None
    if username:
        user = people.find_user(smart.engine, username)
        if user is None:
            raise AuthError(f"no user {username!r}")
        user_id = user.id
    encounter_id = encounter.partition("/")[2] if encounter else None
    launch_id = smart.create_launch(client_id, patient_id, encounter_id, user_id)
    base = client.launch_url or (client.redirect_uris[0] if client.redirect_uris else "")
    query = urlencode({"iss": smart.settings.fhir_base, "launch": launch_id})
    return {"launch": launch_id, "launch_url": f"{base}{'&' if '?' in base else '?'}{query}"}


DEMO_PASSWORD = "demo-password"
DEMO_LOGINS = (  # username, own record, proxies (patient, relationship)
    ("maria", "Patient/maria-garcia", (("Patient/sofia-garcia", "MTH"), ("Patient/daniel-garcia", "MTH"))),
    ("daniel", "Patient/daniel-garcia", ()),
    ("robert", "Patient/robert-chen", ()),
    ("linda", "Patient/linda-chen", (("Patient/robert-chen", "CHILD"),)),
)
DEMO_CLIENT = "demo-app"


def load_demo_logins(engine: Engine, store: Any, base_url: str) -> list[str]:
    """The demo family's logins and a public demo client (idempotent); lines to print."""
    lines = []
    for username, fhir_user, cared_for in DEMO_LOGINS:
        if people.find_user(engine, username) is None:
            people.add_user(engine, username, DEMO_PASSWORD, fhir_user)
            for patient, relationship in cared_for:
                grant_proxy(engine, store, username, patient, relationship)
        acts_for = ", ".join(p for p, _ in cared_for)
        lines.append(f"{username} / {DEMO_PASSWORD}: {fhir_user}" + (f", acts for {acts_for}" if acts_for else ""))
    with engine.connect() as conn:
        known = conn.execute(select(oauth_client.c.client_id).where(oauth_client.c.client_id == DEMO_CLIENT)).first()
    if known is None:
        register_client(engine, DEMO_CLIENT, ["http://localhost:9000/callback", "http://127.0.0.1:9000/callback"],
                        public=True)
    lines.append(f"SMART client {DEMO_CLIENT} (public, redirect http://localhost:9000/callback); "
                 f"discovery at {base_url}/fhir/.well-known/smart-configuration")
    return lines
