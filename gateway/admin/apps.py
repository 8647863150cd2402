"""SMART apps administration for the console: the registered clients, their active grants, and what a
security officer does to them (register, edit, disable, enable, rotate a secret, revoke a grant).

Plain functions over the SMART authorization server's tables (gateway.smart_auth); the pages call
them and audit what they did. Secrets are made here and returned once: the database keeps only
their argon2 hash (gateway.smart_auth.people.hash_secret). What takes access away (disabling a
client, revoking a grant) moves the revocation generation in its transaction, so every process
refuses the client's tokens on its next request (gateway.smart_auth.revocation).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine, and_, exists, func, or_, select, update

from gateway.db import write_tx
from gateway.smart_auth import admin, people, revocation
from gateway.smart_auth.models import auth_user, oauth_client, oauth_grant, oauth_token
from gateway.smart_auth.people import AuthError, now_ms
from gateway.smart_auth.scopes import parse_scopes

KINDS = ("public", "confidential-symmetric", "confidential-asymmetric")
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}")
MAX_JWKS_BYTES = 64 * 1024
MAX_URIS = 20


class AppError(Exception):
    """A request the console cannot carry out; `code` names the message the page shows, `detail`
    is the part of it that comes from the input (an unknown scope, the reason a JWKS is refused)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class App:
    client_id: str
    name: str | None
    client_type: str
    redirect_uris: list[str]
    scope: str
    launch_url: str | None
    jwks_url: str | None
    jwks: str | None  # the stored key set (public keys), as JSON
    created: str  # ISO instant
    disabled: str | None  # ISO instant it was disabled, None when enabled
    active_grants: int = 0

    @property
    def key_ids(self) -> list[str]:
        try:
            return [str(k.get("kid", "")) for k in json.loads(self.jwks or "{}").get("keys", [])]
        except (ValueError, AttributeError):
            return []


@dataclass(frozen=True)
class ActiveGrant:
    grant_id: str
    client_id: str
    username: str | None  # None: a backend service (no user)
    fhir_user: str | None
    patient_id: str | None
    scope: str
    issued: str  # when the user authorized the app
    last_expiry: str | None  # when the latest access token issued under it expires
    refreshable_until: str | None  # when its current refresh token expires (None: no refresh token)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _live_token(now: int) -> Any:
    """A token of the grant that still works, or can still be refreshed (the portal's own apps page
    counts an authorization the same way: SmartAuth.apps_of)."""
    t = oauth_token.c
    return exists().where(t.grant_id == oauth_grant.c.grant_id, t.revoked.is_(False),
                          or_(t.expires_ms > now, and_(t.refresh_expires_ms > now, t.refresh_used.is_(False))))


def _active(now: int) -> Any:
    return and_(oauth_grant.c.revoked_ms.is_(None), _live_token(now))


def _app(row: Any, active: int = 0) -> App:
    return App(row.client_id, row.name, row.client_type, json.loads(row.redirect_uris), row.scope, row.launch_url,
               row.jwks_url, row.jwks, _iso(row.created_ms) or "", _iso(row.disabled_ms), active)


def list_apps(engine: Engine) -> list[App]:
    """Every registered client with its number of active grants, by name."""
    now = now_ms()
    counts = (select(oauth_grant.c.client_id, func.count().label("n")).where(_active(now))
              .group_by(oauth_grant.c.client_id).subquery())
    with engine.connect() as conn:
        rows = conn.execute(select(oauth_client, counts.c.n).outerjoin(
            counts, counts.c.client_id == oauth_client.c.client_id)).all()
    apps = [_app(r, r.n or 0) for r in rows]
    return sorted(apps, key=lambda a: ((a.name or a.client_id).lower(), a.client_id))


def get_app(engine: Engine, client_id: str) -> App:
    with engine.connect() as conn:
        return _get(conn, client_id)


def _get(conn: Connection, client_id: str) -> App:
    row = conn.execute(select(oauth_client).where(oauth_client.c.client_id == client_id)).first()
    if row is None:
        raise AppError("unknown-client", client_id)
    n = conn.execute(select(func.count()).select_from(oauth_grant).where(
        oauth_grant.c.client_id == client_id, _active(now_ms()))).scalar_one()
    return _app(row, n)


def active_grants(engine: Engine, client_id: str, *, limit: int | None = None,
                  grant_id: str | None = None) -> list[ActiveGrant]:
    """The client's grants that can still produce or use a token, newest first (at most `limit`;
    with `grant_id`, that one grant if it is one of them)."""
    now = now_ms()
    t = oauth_token.c
    last_access = select(func.max(t.expires_ms)).where(t.grant_id == oauth_grant.c.grant_id).scalar_subquery()
    refreshable = (select(func.max(t.refresh_expires_ms))
                   .where(t.grant_id == oauth_grant.c.grant_id, t.revoked.is_(False), t.refresh_used.is_(False))
                   .scalar_subquery())
    with engine.connect() as conn:
        rows = conn.execute(
            select(oauth_grant, auth_user.c.username, last_access.label("last_access"),
                   refreshable.label("refreshable"))
            .select_from(oauth_grant.outerjoin(auth_user, auth_user.c.id == oauth_grant.c.user_id))
            .where(oauth_grant.c.client_id == client_id, _active(now),
                   *([oauth_grant.c.grant_id == grant_id] if grant_id is not None else []))
            .order_by(oauth_grant.c.created_ms.desc(), oauth_grant.c.grant_id).limit(limit)).all()
    return [ActiveGrant(r.grant_id, r.client_id, r.username, r.fhir_user, r.patient_id, r.scope,
                        _iso(r.created_ms) or "", _iso(r.last_access), _iso(r.refreshable)) for r in rows]


# --- checking what the form gave ---

def _uri(value: str, *, custom_scheme: bool = False) -> bool:
    """An absolute http(s) URL with a host (or, for redirects of native apps, a private-use scheme
    such as com.example.app:/callback, RFC 8252 section 7.1); never a fragment or white space."""
    if not value or len(value) > 1024 or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    if parts.fragment or "#" in value:
        return False
    if parts.scheme in ("http", "https"):
        return bool(parts.hostname)
    return custom_scheme and "." in parts.scheme and bool(parts.path)


def redirect_uris_from(text: str) -> list[str]:
    uris = list(dict.fromkeys(line.strip() for line in (text or "").splitlines() if line.strip()))
    if not uris:
        raise AppError("no-redirect-uri")
    if len(uris) > MAX_URIS:
        raise AppError("too-many-redirect-uris", str(MAX_URIS))
    for uri in uris:
        if not _uri(uri, custom_scheme=True):
            raise AppError("bad-redirect-uri", uri)
    return uris


def _optional_url(value: str | None, code: str) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if not _uri(value):
        raise AppError(code, value)
    return value


def _scope(text: str | None, kind: str) -> str:
    scope = " ".join(dict.fromkeys((text or "").split()))
    if not scope:
        return admin.DEFAULT_APP_SCOPE + (" " + admin.DEFAULT_BACKEND_SCOPE if kind == "confidential-asymmetric"
                                          else "")
    parsed = parse_scopes(scope)
    if parsed.unknown:
        raise AppError("bad-scope", " ".join(sorted(parsed.unknown)))
    if kind != "confidential-asymmetric" and any(s.context == "system" for s in parsed.resources):
        raise AppError("system-scope")
    return scope


def jwks_from(data: bytes | str) -> dict[str, Any]:
    """An uploaded JWKS file, checked as `gateway client add --jwks-file` checks it."""
    if len(data) > MAX_JWKS_BYTES:
        raise AppError("jwks-too-large", str(MAX_JWKS_BYTES // 1024))
    try:
        jwks = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise AppError("bad-jwks", "it is not JSON") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise AppError("bad-jwks", 'it needs a "keys" list')
    try:
        admin.check_jwks(jwks)
    except AuthError as exc:
        raise AppError("bad-jwks", str(exc)) from None
    return jwks


def _name(name: str | None) -> str:
    name = (name or "").strip()
    if not name:
        raise AppError("no-name")
    if len(name) > 255:
        raise AppError("long-name")
    return name


# --- changes ---

@dataclass(frozen=True)
class Registered:
    app: App
    secret: str | None  # a confidential client's secret: shown once, then only its hash exists


def register(engine: Engine, *, kind: str, client_id: str, name: str, redirect_uris: str, scope: str = "",
             launch_url: str = "", jwks_url: str = "", jwks_file: bytes | None = None) -> Registered:
    """Register a client of one of KINDS. A confidential client's secret is made here and returned
    once; an asymmetric client gives a JWKS URL or a JWKS file (not both)."""
    if kind not in KINDS:
        raise AppError("bad-kind")
    client_id = (client_id or "").strip()
    if not CLIENT_ID.fullmatch(client_id):
        raise AppError("bad-client-id")
    values: dict[str, Any] = {
        "name": _name(name), "scope": _scope(scope, kind), "launch_url": _optional_url(launch_url, "bad-launch-url")}
    uris = redirect_uris_from(redirect_uris)
    secret = None
    if kind == "public":
        values["public"] = True
    elif kind == "confidential-symmetric":
        secret = values["secret"] = secrets.token_urlsafe(32)
    else:
        values.update(_key_source(jwks_url, jwks_file))
        if not values.get("jwks_url") and values.get("jwks") is None:
            raise AppError("no-jwks")
    if kind != "confidential-asymmetric" and ((jwks_url or "").strip() or jwks_file):
        raise AppError("jwks-not-for-kind")
    with engine.connect() as conn:
        if conn.execute(select(oauth_client.c.client_id).where(oauth_client.c.client_id == client_id)).first():
            raise AppError("duplicate", client_id)
    try:
        admin.register_client(engine, client_id, uris, **values)
    except AuthError as exc:  # a registration made at the same moment, or a check of the registry's own
        if "exists already" in str(exc):
            raise AppError("duplicate", client_id) from None
        raise AppError("refused", str(exc)) from None
    return Registered(get_app(engine, client_id), secret)


def _key_source(jwks_url: str | None, jwks_file: bytes | None) -> dict[str, Any]:
    if jwks_file and (jwks_url or "").strip():
        raise AppError("jwks-both")
    if jwks_file:
        return {"jwks": jwks_from(jwks_file)}
    url = _optional_url(jwks_url, "bad-jwks-url")
    return {"jwks_url": url} if url else {}


def update_app(engine: Engine, client_id: str, *, name: str, redirect_uris: str, scope: str, launch_url: str = "",
               jwks_url: str = "", jwks_file: bytes | None = None) -> tuple[App, list[str]]:
    """Change a client's registration; returns it and the names of the fields that changed. For an
    asymmetric client a new JWKS file or URL replaces the key source; with neither the stored one stays.

    Tokens already issued keep the scopes they were granted; revoke their grants to take those away."""
    current = get_app(engine, client_id)
    values: dict[str, Any] = {"name": _name(name), "redirect_uris": json.dumps(redirect_uris_from(redirect_uris)),
                              "scope": _scope(scope, current.client_type),
                              "launch_url": _optional_url(launch_url, "bad-launch-url")}
    if current.client_type == "confidential-asymmetric":
        source = _key_source(jwks_url, jwks_file)
        if "jwks" in source:
            values.update(jwks=json.dumps(source["jwks"]), jwks_url=None)
        elif "jwks_url" in source:
            values.update(jwks_url=source["jwks_url"], jwks=None)
    elif (jwks_url or "").strip() or jwks_file:
        raise AppError("jwks-not-for-kind")
    before = {"name": current.name, "redirect_uris": json.dumps(current.redirect_uris), "scope": current.scope,
              "launch_url": current.launch_url, "jwks_url": current.jwks_url, "jwks": current.jwks}
    changed = sorted(k for k, v in values.items() if before.get(k) != v)
    if changed:
        with write_tx(engine) as conn:
            conn.execute(update(oauth_client).where(oauth_client.c.client_id == client_id).values(**values))
    return get_app(engine, client_id), changed


def set_disabled(engine: Engine, client_id: str, disabled: bool) -> bool:
    """Disable or enable a client; False when it was so already. Disabling moves the revocation
    generation in the same transaction: every process stops honouring the client's tokens on its
    next request. Enabling lets tokens that have not expired work again (disabling suspends; to end
    an authorization for good, revoke its grant)."""
    c = oauth_client.c
    with write_tx(engine) as conn:
        if conn.execute(select(c.client_id).where(c.client_id == client_id)).first() is None:
            raise AppError("unknown-client", client_id)
        changed = conn.execute(update(oauth_client).where(
            c.client_id == client_id, c.disabled_ms.is_(None) if disabled else c.disabled_ms.is_not(None)).values(
            disabled_ms=now_ms() if disabled else None)).rowcount
        if changed and disabled:
            revocation.bump(conn)
    if changed and disabled:
        revocation.publish(engine)
    return bool(changed)


def rotate_secret(engine: Engine, client_id: str) -> str:
    """A new secret for a confidential client, returned once; the old one stops working at once."""
    app = get_app(engine, client_id)
    if app.client_type != "confidential-symmetric":
        raise AppError("no-secret")
    secret = secrets.token_urlsafe(32)
    with write_tx(engine) as conn:
        conn.execute(update(oauth_client).where(oauth_client.c.client_id == client_id).values(
            secret_hash=people.hash_secret(secret)))
    return secret


def revoke_grant(smart: Any, client_id: str, grant_id: str) -> ActiveGrant:
    """Revoke one active grant of the client with all its tokens, through the SMART server's own
    revocation (so every process refuses them on its next request); returns what was revoked."""
    found = active_grants(smart.engine, client_id, grant_id=grant_id) if grant_id else []
    if not found:
        raise AppError("unknown-grant")
    grant = found[0]
    smart.revoke_grant(grant_id)
    return grant
