"""SMART test harness: the demo family, registered clients, and a driver for the login/consent pages.

The driver speaks to the gateway through a small HTTP adapter, so the same code drives the Flask
test client and a live server over real HTTP (requests). It fills the forms by their stable names
(login-form, patient-picker, consent-form, csrf_token), as a browser without JavaScript would.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey
from sqlalchemy import func, literal, select, text

from gateway import db
from gateway.fhir.bundles import BundleProcessor, import_file
from gateway.fhir.demo_calendar import keep_calendar_current
from gateway.smart_auth import admin, people

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "fhir"
REDIRECT = "http://app.example/callback"
PASSWORD = "correct horse battery"
TOTP_SECRET = pyotp.random_base32()
APP_SCOPE = ("launch launch/patient openid fhirUser profile offline_access online_access patient/*.cruds "
             "user/*.cruds")


# The day the tests' demo world is loaded as of, fixed once per test process: its Slots and the
# appointments booking them (in other files) move by the same weeks even in a run across a Monday.
WORLD_DAY = datetime.now(UTC).date()


def keep_current(bundle: dict[str, Any]) -> dict[str, Any]:
    """The demo world's calendar moved to WORLD_DAY's week (see gateway/fhir/demo_calendar.py)."""
    return keep_calendar_current(bundle, today=WORLD_DAY)


def load_family(store: Any) -> None:
    processor = BundleProcessor(store)
    for name in ("00-organization.json", "10-garcia-family.json", "20-chen-family.json"):
        import_file(processor, str(FIXTURES / name), adjust=keep_current)


@functools.cache
def _keys() -> tuple[RSAKey, ECKey]:
    """The demo clients' signing keys, made once per test process: an RSA key takes 40-120 ms to
    make, and every test that sets up the world registers clients with them."""
    return (RSAKey.generate_key(2048, {"kid": "rsa-1"}, private=True),
            ECKey.generate_key("P-384", {"kid": "ec-1"}, private=True))


# The demo world's rows per database, day (grants are dated from today), settings and client keys,
# per test process.
_SAVED_WORLDS: dict[tuple[str, date, str, str, str], dict[str, list[dict[str, Any]]]] = {}
WORLD_TABLES = {"resource", "resource_version", "compartment", "sp_token", "sp_string", "sp_date", "sp_quantity",
                "sp_reference", "sp_uri", "sp_composite", "auth_user", "proxy_grant", "oauth_client"}


def _settings_key(settings: Any) -> str:
    """The settings that can change what building the world writes: all but the per-test folder and
    addresses."""
    values = dataclasses.asdict(settings)
    return repr(sorted((k, v) for k, v in values.items()
                       if k not in ("instance_path", "base_url") and not k.endswith("_port")))


def _row_counts(engine: Any) -> dict[str, int]:
    with engine.connect() as conn:
        return {table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in db.metadata.sorted_tables}


def _rows(engine: Any, names: set[str]) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        return {table.name: [dict(row._mapping) for row in conn.execute(select(table))]
                for table in db.metadata.sorted_tables if table.name in names}


def _restore(engine: Any, saved: dict[str, list[dict[str, Any]]]) -> bool:
    """Copies saved rows back, parents first; False (nothing written) unless their tables are empty."""
    tables = [table for table in db.metadata.sorted_tables if table.name in saved]
    with engine.begin() as conn:
        if any(conn.execute(select(literal(1)).select_from(table).limit(1)).first() for table in tables):
            return False
        for table in tables:
            if conn.dialect.name != "postgresql":
                conn.execute(table.insert(), saved[table.name])
                continue
            # COPY: an INSERT per row, even pipelined, took 0.5-0.8 s a test for the world's rows
            names = [column.name for column in table.columns]
            with conn.connection.driver_connection.cursor() as cursor, cursor.copy(
                    f"COPY {table.name} ({', '.join(names)}) FROM STDIN") as copy:
                for row in saved[table.name]:
                    copy.write_row([row[name] for name in names])
            # Keep the serial columns' sequences ahead of the copied keys.
            for column in table.primary_key.columns:
                sequence = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                        {"t": table.name, "c": column.name}).scalar()
                if sequence:
                    conn.execute(text(f"SELECT setval('{sequence}', GREATEST((SELECT max({column.name}) "
                                      f"FROM {table.name}), (SELECT last_value FROM {sequence})))"))
    return True


@dataclass
class World:
    """The demo people and clients, registered in one gateway."""

    smart: Any
    store: Any
    rsa: RSAKey = field(default_factory=lambda: _keys()[0])
    ec: ECKey = field(default_factory=lambda: _keys()[1])

    def setup(self) -> World:
        """Registers the demo world. The first time in a test process and database it is built through
        the product's own code (import, add_user, grant_proxy, register_client) and the rows it
        wrote are kept; later tests get those rows copied back into their emptied tables, which is
        a tenth of the time (about 600 tests set the world up, twice with PostgreSQL)."""
        engine = self.smart.engine
        key = (engine.url.render_as_string(hide_password=False), date.today(), _settings_key(self.smart.settings),
               self.rsa.thumbprint(), self.ec.thumbprint())  # the clients' registered keys
        saved = _SAVED_WORLDS.get(key)
        if saved is not None and _restore(engine, saved):
            return self
        before = _row_counts(engine)
        self._build()
        after = _row_counts(engine)
        written = {name for name, count in after.items() if count != before[name]}
        # Only a world built into empty tables, and only when building it did nothing else (with the
        # outbox configured, it also queues the family's messages: then it is built every time).
        if written <= WORLD_TABLES and all(before[name] == 0 for name in written):
            _SAVED_WORLDS[key] = _rows(engine, written)
        return self

    def _build(self) -> None:
        engine = self.smart.engine
        load_family(self.store)
        people.add_user(engine, "maria", PASSWORD, "Patient/maria-garcia")
        people.add_user(engine, "daniel", PASSWORD, "Patient/daniel-garcia")
        people.add_user(engine, "robert", PASSWORD, "Patient/robert-chen", totp_secret=TOTP_SECRET)
        people.add_user(engine, "linda", PASSWORD, "Patient/linda-chen")
        people.add_user(engine, "former", PASSWORD, "Patient/linda-chen-other")
        admin.grant_proxy(engine, self.store, "maria", "Patient/sofia-garcia", "MTH")
        admin.grant_proxy(engine, self.store, "maria", "Patient/daniel-garcia", "MTH")
        admin.grant_proxy(engine, self.store, "linda", "Patient/robert-chen", "CHILD")
        # A caregiver whose relationship ended yesterday.
        admin.grant_proxy(engine, self.store, "former", "Patient/robert-chen", "CAREGIVER",
                          until=date.today() - timedelta(days=1), today=date.today() - timedelta(days=30))
        admin.register_client(engine, "public-app", [REDIRECT], public=True, scope=APP_SCOPE)
        admin.register_client(engine, "secret-app", [REDIRECT], secret="s3cret-value", scope=APP_SCOPE)
        admin.register_client(engine, "other-app", [REDIRECT], public=True, scope=APP_SCOPE)
        jwks = KeySet([self.rsa, self.ec]).as_dict(private=False)
        admin.register_client(engine, "backend", [REDIRECT], jwks=jwks, scope="system/*.rs system/Observation.c")
        admin.register_client(engine, "jwt-app", [REDIRECT], jwks=jwks, scope=APP_SCOPE)

    def assertion(self, client_id: str, token_url: str, *, key: Any = None, alg: str = "RS384",
                  exp_in: int = 240, jti: str | None = None, aud: str | None = None,
                  headers: dict[str, Any] | None = None) -> str:
        key = key or self.rsa
        now = int(time.time())
        header = {"alg": alg, "kid": key.kid, "typ": "JWT", **(headers or {})}
        claims = {"iss": client_id, "sub": client_id, "aud": aud or token_url, "exp": now + exp_in,
                  "iat": now, "jti": jti or uuid.uuid4().hex}
        return jwt.encode(header, claims, key, algorithms=[alg])


# --- an HTTP adapter over the Flask test client or requests ---

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        import json

        return json.loads(self.text)

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class FlaskHttp:
    def __init__(self, client: Any, base: str = "http://localhost") -> None:
        self.client = client
        self.base = base

    def _reply(self, r: Any) -> Reply:
        return Reply(r.status_code, dict(r.headers), r.get_data(as_text=True))

    def get(self, url: str, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.client.get(_path(url), headers=headers or {}))

    def post(self, url: str, data: Any = None, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.client.post(_path(url), data=data, headers=headers or {}))


class RequestsHttp:
    def __init__(self, base: str) -> None:
        import requests

        self.session = requests.Session()
        self.base = base

    def _reply(self, r: Any) -> Reply:
        return Reply(r.status_code, dict(r.headers), r.text)

    def get(self, url: str, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.session.get(urljoin(self.base, url), headers=headers, allow_redirects=False))

    def post(self, url: str, data: Any = None, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.session.post(urljoin(self.base, url), data=data, headers=headers,
                                             allow_redirects=False))


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert m, html
    return unescape(m.group(1))


def form_html(html: str, form_id: str) -> str:
    m = re.search(rf'<form id="{form_id}".*?</form>', html, re.S)
    assert m, f"no form {form_id} in page:\n{html}"
    return m.group(0)


@dataclass
class Launch:
    """One run through /authorize: what came back to the app's redirect URI."""

    location: str
    verifier: str
    pages: list[str]

    @property
    def params(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}


def authorize_params(fhir_base: str, client_id: str = "public-app", scope: str = "launch/patient patient/*.rs "
                     "openid fhirUser offline_access", **extra: str) -> tuple[dict[str, str], str]:
    verifier, challenge = pkce()
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": scope,
              "state": secrets.token_urlsafe(8), "aud": fhir_base, "code_challenge": challenge,
              "code_challenge_method": "S256"}
    params.update(extra)
    return params, verifier


def run_launch(http: Any, params: dict[str, str] | str, verifier: str, username: str = "maria",
               patient: str | None = None, ticked: list[str] | None = None, decision: str = "approve",
               otp: str | None = None) -> Launch:
    """Drive authorize -> login (-> MFA) (-> picker) -> consent until the app's redirect URI is reached.

    `params` are the authorize parameters, or the whole authorize URL an app (fhirclient) built.
    """
    pages: list[str] = []
    reply = http.get(params if isinstance(params, str) else "/auth/authorize?" + urlencode(params))
    for _ in range(12):
        if reply.status != 302 and reply.status != 200 and reply.status != 401:
            return Launch(reply.location or f"status:{reply.status}", verifier, [*pages, reply.text])
        if reply.status == 302:
            location = reply.location
            if location.startswith(REDIRECT):
                return Launch(location, verifier, pages)
            reply = http.get(location)
            continue
        html = reply.text
        pages.append(html)
        if 'role="alert"' in html or 'id="error-message"' in html:
            return Launch(f"page:{reply.status}", verifier, pages)
        if 'id="login-form"' in html:
            reply = http.post("/auth/login", {"csrf_token": csrf(html), "username": username, "password": PASSWORD})
        elif 'id="mfa-form"' in html:
            reply = http.post("/auth/mfa", {"csrf_token": csrf(html), "otp": otp or pyotp.TOTP(TOTP_SECRET).now()})
        elif 'id="patient-picker"' in html:
            assert patient is not None, "the picker appeared but the test chose no patient"
            assert f'value="{patient}"' in form_html(html, "patient-picker")
            reply = http.post("/auth/patient", {"csrf_token": csrf(html), "patient": patient})
        elif 'id="consent-form"' in html:
            form = form_html(html, "consent-form")
            offered = re.findall(r'name="scope" value="([^"]+)" checked', form)
            chosen = offered if ticked is None else ticked
            reply = http.post("/auth/consent", {"csrf_token": csrf(html), "scope": [unescape(s) for s in chosen],
                                                "decision": decision})
        else:
            return Launch(f"page:{reply.status}", verifier, pages)
    raise AssertionError("the authorization never reached the redirect URI")


def exchange(http: Any, launch: Launch, client_id: str = "public-app", **extra: Any) -> Reply:
    data = {"grant_type": "authorization_code", "code": launch.params["code"], "redirect_uri": REDIRECT,
            "client_id": client_id, "code_verifier": launch.verifier}
    data.update(extra)
    return http.post("/auth/token", {k: v for k, v in data.items() if v is not None})


@pytest.fixture
def world(app: Any) -> World:
    services = app.extensions["gateway"]
    return World(services.smart, services.store).setup()


@pytest.fixture
def http(app: Any) -> FlaskHttp:
    return FlaskHttp(app.test_client())


@pytest.fixture
def fhir_base(app: Any) -> str:
    return app.extensions["gateway"].settings.fhir_base


@pytest.fixture
def live_world(live_server: str, settings: Any) -> Any:
    """A gateway over real HTTP, with the demo people and clients registered in its database."""
    from gateway import build_services

    services = build_services(settings)
    world = World(services.smart, services.store).setup()
    yield live_server, world
    services.close()
