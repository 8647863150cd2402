"""The SMART authorization service: what the views, the CLI and the FHIR API's token check call.

It stores clients' codes, grants and tokens, runs the Authlib server assembled from grants.py,
and turns a bearer token into the access policy's Principal.
- Codes live 60 seconds and are claimed atomically: a second use fails and revokes what the first
  use produced.
- A refresh token is claimed atomically too; presenting a used one revokes the whole grant.
- Backend-services tokens live 300 seconds and come without a refresh token.

Tokens are opaque random strings; the database holds their SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from typing import Any

import requests
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749 import AccessDeniedError, InvalidGrantError, InvalidRequestError, OAuth2Request
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway import access, ratelimit
from gateway.config import Settings
from gateway.db import write_tx
from gateway.smart_auth import keys, people, proxies, reset, revocation
from gateway.smart_auth.grants import (
    AuthCode,
    Authorizer,
    BackendServicesGrant,
    Client,
    PrivateKeyJwt,
    RotatingRefreshGrant,
    S256Challenge,
    SmartCodeGrant,
    SmartIntrospection,
    SmartRevocation,
    SmartServer,
    StoredAuthorizationRequest,
    StoredToken,
)
from gateway.smart_auth.models import (
    auth_code,
    client_assertion_jti,
    launch_context,
    oauth_client,
    oauth_grant,
    oauth_token,
)
from gateway.smart_auth.people import now_ms
from gateway.smart_auth.scopes import parse_scopes

CODE_SECONDS = 60
BACKEND_TOKEN_SECONDS = 300
OFFLINE_REFRESH_SECONDS = 90 * 24 * 3600
ONLINE_REFRESH_SECONDS = 12 * 3600
JWKS_KEEP = 300
JWKS_MIN_REFETCH = 10


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --- the service ---

class SmartAuth:
    """Everything the SMART views, the CLI and the FHIR API's token check call."""

    def __init__(self, engine: Engine, settings: Settings, store: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store  # for the FHIR record of proxy relationships (Consent)
        self.server = SmartServer(query_client=self.query_client, save_token=self.save_token)
        self.server.smart = self
        self.server.register_token_generator("default", self.generate_token)
        self.server.register_grant(SmartCodeGrant, [S256Challenge(required=True)])
        self.server.register_grant(RotatingRefreshGrant)
        self.server.register_grant(BackendServicesGrant)
        self.server.register_client_auth_method("private_key_jwt", PrivateKeyJwt(self))
        self.server.register_endpoint(SmartIntrospection)
        self.server.register_endpoint(SmartRevocation)
        # token digest -> (principal, reuse until (monotonic s), revocation generation it was resolved under)
        self._cache: dict[str, tuple[access.Principal, float, int]] = {}
        self._cache_lock = threading.Lock()
        self.mailer = reset.smtp_mailer(settings)
        self.limiter = ratelimit.FailureLimiter(ratelimit.storage(settings))
        # JWKS URL -> (fetched at, key set), monotonic seconds.
        self._jwks_cache: dict[str, tuple[float, KeySet]] = {}

    # endpoints
    @property
    def issuer(self) -> str:
        return self.settings.fhir_base

    @property
    def token_url(self) -> str:
        return self.settings.base_url + "/auth/token"

    # clients
    def query_client(self, client_id: str) -> Client | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(oauth_client).where(oauth_client.c.client_id == client_id)).first()
        return Client(row) if row else None

    def client_key(self, client: Client, kid: str) -> Any:
        keyset = self._client_keyset(client, refresh=False)
        key = _by_kid(keyset, kid)
        if key is None and client.jwks_url:
            key = _by_kid(self._client_keyset(client, refresh=True), kid)
        return key

    def _client_keyset(self, client: Client, refresh: bool) -> KeySet | None:
        if client.jwks:
            return KeySet.import_key_set(json.loads(client.jwks))
        if not client.jwks_url:
            return None
        cached = self._jwks_cache.get(client.jwks_url)
        age = time.monotonic() - cached[0] if cached else None
        # Keys are kept 5 minutes; an unknown kid refetches, but at most every 10 seconds, so
        # assertions with made-up kids cannot turn the server into a fetcher of someone's URL.
        if cached and age is not None and (age < JWKS_MIN_REFETCH or (not refresh and age < JWKS_KEEP)):
            return cached[1]
        try:
            response = requests.get(client.jwks_url, timeout=5)
            response.raise_for_status()
            keyset = KeySet.import_key_set(response.json())
        except (requests.RequestException, ValueError, JoseError):
            return None
        self._jwks_cache[client.jwks_url] = (time.monotonic(), keyset)
        return keyset

    def remember_jti(self, client_id: str, jti: str, exp: int) -> bool:
        now = now_ms()
        try:
            with write_tx(self.engine) as conn:
                conn.execute(delete(client_assertion_jti).where(client_assertion_jti.c.expires_ms < now - 3600_000))
                conn.execute(insert(client_assertion_jti).values(client_id=client_id, jti=str(jti),
                                                                 expires_ms=exp * 1000))
        except IntegrityError:
            return False
        return True

    # authorization requests
    def check_smart_request(self, request: OAuth2Request) -> None:
        data = request.payload.data
        if data.get("aud") != self.settings.fhir_base:
            raise InvalidRequestError(f"aud must be this server's FHIR base URL, {self.settings.fhir_base}")
        launch = data.get("launch")
        if launch and self.launch_for(launch, request.payload.client_id) is None:
            raise InvalidRequestError("The launch parameter does not name a current launch for this client")

    def validate_authorization(self, uri: str, args: dict[str, str]) -> tuple[Client, str, str]:
        """Validate a request the way /authorize does; returns client, redirect_uri and allowed scope."""
        request = StoredAuthorizationRequest(uri, args)
        grant = self.server.get_consent_grant(request, end_user=None)
        return grant.client, grant.redirect_uri, grant.request.scope

    def authorization_redirect(self, uri: str, args: dict[str, str], owner: Authorizer | None,
                               granted_scope: str) -> str:
        """Issue a code (owner given) or refuse (owner None); returns the client redirect URL."""
        request = StoredAuthorizationRequest(uri, args)
        grant = self.server.get_consent_grant(request, end_user=owner)
        redirect_uri = grant.redirect_uri
        if owner is None:
            error = AccessDeniedError(redirect_uri=redirect_uri, state=args.get("state"))
            _, _, headers = error()
        else:
            request.scope = granted_scope
            _, _, headers = grant.create_authorization_response(redirect_uri, owner)
        return dict(headers)["Location"]

    def start_grant(self, client_id: str, user: people.User, patient_id: str | None, encounter_id: str | None,
                    scope: str, fhir_user: str | None = None) -> Authorizer:
        grant_id = secrets.token_urlsafe(24)
        fhir_user = fhir_user or user.fhir_user
        with write_tx(self.engine) as conn:
            conn.execute(insert(oauth_grant).values(
                grant_id=grant_id, client_id=client_id, user_id=user.id, scope=scope, patient_id=patient_id,
                encounter_id=encounter_id, fhir_user=fhir_user, created_ms=now_ms()))
        return Authorizer(user.id, user.username, fhir_user, patient_id, encounter_id, grant_id)

    def save_code(self, code: str, request: OAuth2Request) -> None:
        owner: Authorizer = request.user
        data = request.payload.data
        with write_tx(self.engine) as conn:
            conn.execute(update(oauth_grant).where(oauth_grant.c.grant_id == owner.grant_id).values(
                scope=request.scope))
            conn.execute(insert(auth_code).values(
                code_hash=digest(code), client_id=request.client.client_id, redirect_uri=request.payload.redirect_uri,
                scope=request.scope, user_id=owner.user_id, patient_id=owner.patient_id,
                encounter_id=owner.encounter_id, fhir_user=owner.fhir_user,
                code_challenge=data.get("code_challenge"), code_challenge_method=data.get("code_challenge_method"),
                nonce=data.get("nonce"), expires_ms=now_ms() + CODE_SECONDS * 1000, used=False,
                grant_id=owner.grant_id))

    def claim_code(self, code: str, client: Client) -> AuthCode | None:
        with write_tx(self.engine) as conn:
            row = conn.execute(select(auth_code).where(auth_code.c.code_hash == digest(code),
                                                       auth_code.c.client_id == client.client_id)).first()
            if row is None:
                return None
            claimed = conn.execute(update(auth_code).where(
                auth_code.c.code_hash == row.code_hash, auth_code.c.used.is_(False)).values(used=True)).rowcount
        if not claimed:
            # RFC 6749 4.1.2: a code used twice revokes what it produced.
            self.revoke_grant(row.grant_id)
            return None
        if row.expires_ms <= now_ms():
            return None
        return AuthCode(row)

    def owner_of_grant(self, grant_id: str, nonce: str | None = None) -> Authorizer:
        with self.engine.connect() as conn:
            row = conn.execute(select(oauth_grant).where(oauth_grant.c.grant_id == grant_id)).first()
            if row is None or row.revoked_ms is not None or row.user_id is None:
                raise InvalidGrantError("The authorization has been revoked")
            user = people.get_user(conn, row.user_id)
            acting = people.acting_for(conn, row.user_id)
        if user is None or (row.patient_id is not None and row.patient_id not in acting):
            # The relationship behind the launch has ended: nothing more is issued from it.
            raise InvalidGrantError("The user may no longer act for this patient")
        return Authorizer(user.id, user.username, row.fhir_user or user.fhir_user, row.patient_id, row.encounter_id,
                          grant_id, nonce)

    # tokens
    def generate_token(self, grant_type: str, client: Client, user: Authorizer | None = None,
                       scope: str | None = None, expires_in: int | None = None,
                       include_refresh_token: bool = True) -> dict[str, Any]:
        scopes = parse_scopes(scope)
        lifetime = BACKEND_TOKEN_SECONDS if grant_type == "client_credentials" else self.settings.access_token_seconds
        token: dict[str, Any] = {"token_type": "Bearer", "access_token": generate_token(48),
                                 "expires_in": lifetime, "scope": scope or ""}
        if user is None:
            return token
        if include_refresh_token and (scopes.has("offline_access") or scopes.has("online_access")):
            token["refresh_token"] = generate_token(48)
        if user.patient_id:
            token["patient"] = user.patient_id
            token["need_patient_banner"] = True
        if user.encounter_id:
            token["encounter"] = user.encounter_id
        token["fhirContext"] = [{"reference": f"Encounter/{user.encounter_id}"}] if user.encounter_id else []
        token["smart_style_url"] = self.settings.base_url + "/auth/smart-style.json"
        if scopes.has("openid") and (scopes.has("fhirUser") or scopes.has("profile")):
            token["id_token"] = self.id_token(client, user, lifetime)
        return token

    def id_token(self, client: Client, user: Authorizer, lifetime: int) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": user.username, "aud": client.client_id, "iat": now,
                                  "exp": now + lifetime, "fhirUser": f"{self.settings.fhir_base}/{user.fhir_user}"}
        if user.nonce:
            claims["nonce"] = user.nonce
        return keys.sign(self.engine, claims)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        owner: Authorizer | None = request.user
        now = now_ms()
        with write_tx(self.engine) as conn:
            if owner is None:
                grant_id = secrets.token_urlsafe(24)
                conn.execute(insert(oauth_grant).values(grant_id=grant_id, client_id=request.client.client_id,
                                                        scope=token["scope"], created_ms=now))
            else:
                grant_id = owner.grant_id
            refresh_seconds = OFFLINE_REFRESH_SECONDS if "offline_access" in token["scope"].split() \
                else ONLINE_REFRESH_SECONDS
            conn.execute(insert(oauth_token).values(
                grant_id=grant_id, client_id=request.client.client_id, access_hash=digest(token["access_token"]),
                refresh_hash=digest(token["refresh_token"]) if token.get("refresh_token") else None,
                scope=token["scope"], issued_ms=now, expires_ms=now + token["expires_in"] * 1000,
                refresh_expires_ms=now + refresh_seconds * 1000 if token.get("refresh_token") else None,
                revoked=False, refresh_used=False))

    def claim_refresh_token(self, presented: str, client: Client) -> StoredToken:
        with write_tx(self.engine) as conn:
            row = conn.execute(select(oauth_token).where(oauth_token.c.refresh_hash == digest(presented))).first()
            if row is None or row.client_id != client.client_id:
                raise InvalidGrantError("The refresh token is not valid for this client")
            claimed = conn.execute(update(oauth_token).where(
                oauth_token.c.id == row.id, oauth_token.c.refresh_used.is_(False)).values(refresh_used=True)).rowcount
        if not claimed:
            self.revoke_grant(row.grant_id)
            raise InvalidGrantError("The refresh token was used before; the authorization is revoked")
        if row.revoked or (row.refresh_expires_ms or 0) <= now_ms():
            raise InvalidGrantError("The refresh token has expired or was revoked")
        return StoredToken(row)

    def find_token(self, presented: str) -> StoredToken | None:
        h = digest(presented)
        with self.engine.connect() as conn:
            row = conn.execute(select(oauth_token).where(oauth_token.c.access_hash == h)).first()
            if row is not None:
                return StoredToken(row)
            row = conn.execute(select(oauth_token).where(oauth_token.c.refresh_hash == h)).first()
        return StoredToken(row, is_refresh=True) if row else None

    def revoke_grant(self, grant_id: str) -> None:
        with write_tx(self.engine) as conn:
            ended = conn.execute(update(oauth_grant).where(
                oauth_grant.c.grant_id == grant_id, oauth_grant.c.revoked_ms.is_(None)).values(
                revoked_ms=now_ms())).rowcount
            conn.execute(update(oauth_token).where(oauth_token.c.grant_id == grant_id).values(revoked=True))
            if ended:  # revoking what is revoked already must not empty every process's cache again
                revocation.bump(conn)
        if ended:
            revocation.publish(self.engine)

    def revoke_proxy(self, username: str, patient_id: str) -> list[str]:
        """End a proxy relationship; every process stops honouring its tokens at once. Returns the
        ids of the Consents it marked inactive."""
        consents = people.revoke_proxy(self.engine, username, patient_id)
        user = people.find_user(self.engine, username)
        if self.store is not None and user is not None:
            proxies.end_proxy_records(self.store, user, consents)
        return consents

    def apps_of(self, user_id: int) -> list[dict[str, Any]]:
        """The authorizations a user has given that can still produce or use a token."""
        now = now_ms()
        live = select(oauth_token.c.grant_id).where(
            oauth_token.c.revoked.is_(False),
            (oauth_token.c.expires_ms > now) | ((oauth_token.c.refresh_expires_ms > now) &
                                                oauth_token.c.refresh_used.is_(False)))
        with self.engine.connect() as conn:
            rows = conn.execute(select(oauth_grant).where(
                oauth_grant.c.user_id == user_id, oauth_grant.c.revoked_ms.is_(None),
                oauth_grant.c.grant_id.in_(live)).order_by(oauth_grant.c.created_ms.desc())).all()
        return [{"grant_id": r.grant_id, "client_id": r.client_id, "scope": r.scope, "patient_id": r.patient_id,
                 "created_ms": r.created_ms} for r in rows]

    def revoke_app(self, user_id: int, grant_id: str) -> bool:
        """A user withdraws one app's access (only their own authorizations)."""
        with self.engine.connect() as conn:
            owner = conn.execute(select(oauth_grant.c.user_id).where(oauth_grant.c.grant_id == grant_id)).scalar()
        if owner != user_id:
            return False
        self.revoke_grant(grant_id)
        return True

    # the resource server side
    def principal_for(self, access_token: str) -> access.Principal | None:
        """The Principal a bearer token stands for now, or None.

        What a token resolves to is reused for GATEWAY_TOKEN_CACHE_SECONDS (a proxy relationship
        also ends by date, with no event to announce it), but only while the revocation generation
        is the one it was resolved under: a revocation committed by any process is honoured here on
        the next request. The generation is read before the token: an entry resolved while a
        revocation commits carries the older generation and is not trusted again.
        """
        h = digest(access_token)
        generation = revocation.current(self.engine)
        cached = self._cache.get(h)
        if cached is not None and cached[2] == generation and cached[1] > time.monotonic():
            return cached[0]
        principal, expires_ms = self._resolve(h)
        if principal is not None:
            ttl = min(self.settings.token_cache_seconds, max(0.0, (expires_ms - now_ms()) / 1000))
            with self._cache_lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[h] = (principal, time.monotonic() + ttl, generation)
        return principal

    def _resolve(self, access_hash: str) -> tuple[access.Principal | None, int]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(oauth_token.c.expires_ms, oauth_token.c.revoked, oauth_token.c.scope, oauth_token.c.client_id,
                       oauth_grant.c.user_id, oauth_grant.c.patient_id, oauth_grant.c.fhir_user,
                       oauth_grant.c.revoked_ms, oauth_client.c.disabled_ms)
                .select_from(oauth_token.join(oauth_grant, oauth_grant.c.grant_id == oauth_token.c.grant_id)
                             .join(oauth_client, oauth_client.c.client_id == oauth_token.c.client_id))
                .where(oauth_token.c.access_hash == access_hash)).first()
            if row is None or row.revoked or row.revoked_ms is not None or row.disabled_ms is not None \
                    or row.expires_ms <= now_ms():
                return None, 0
            acting = people.acting_for(conn, row.user_id) if row.user_id is not None else None
        principal = access.principal_from_token(
            client_id=row.client_id, scope=row.scope, patient_id=row.patient_id, fhir_user=row.fhir_user,
            acting_for=acting, backend=row.user_id is None)
        return principal, row.expires_ms

    def introspect(self, token: StoredToken) -> dict[str, Any]:
        row = token.row
        with self.engine.connect() as conn:
            grant = conn.execute(select(oauth_grant).where(oauth_grant.c.grant_id == row.grant_id)).first()
            disabled = conn.execute(select(oauth_client.c.disabled_ms).where(
                oauth_client.c.client_id == row.client_id)).scalar() is not None
            acting = people.acting_for(conn, grant.user_id) if grant and grant.user_id is not None else None
            user = people.get_user(conn, grant.user_id) if grant and grant.user_id is not None else None
        expires_ms = row.refresh_expires_ms if token.is_refresh else row.expires_ms
        spent = token.is_refresh and row.refresh_used
        alive = (grant is not None and grant.revoked_ms is None and not row.revoked and not spent and not disabled
                 and (expires_ms or 0) > now_ms()
                 and access.principal_from_token(client_id=row.client_id, scope=row.scope,
                                                 patient_id=grant.patient_id, fhir_user=grant.fhir_user,
                                                 acting_for=acting, backend=grant.user_id is None) is not None)
        if not alive:
            return {"active": False}
        out: dict[str, Any] = {"active": True, "scope": row.scope, "client_id": row.client_id, "token_type": "Bearer",
                               "exp": (expires_ms or 0) // 1000, "iat": row.issued_ms // 1000, "iss": self.issuer,
                               "sub": user.username if user else row.client_id}
        if grant.fhir_user:
            out["fhirUser"] = f"{self.settings.fhir_base}/{grant.fhir_user}"
        if grant.patient_id:
            out["patient"] = grant.patient_id
        if grant.encounter_id:
            out["encounter"] = grant.encounter_id
        return out

    # EHR launch
    def create_launch(self, client_id: str, patient_id: str, encounter_id: str | None = None,
                      user_id: int | None = None, seconds: int = 3600) -> str:
        launch_id = secrets.token_urlsafe(24)
        now = now_ms()
        with write_tx(self.engine) as conn:
            conn.execute(insert(launch_context).values(
                launch_id=launch_id, client_id=client_id, patient_id=patient_id, encounter_id=encounter_id,
                user_id=user_id, created_ms=now, expires_ms=now + seconds * 1000))
        return launch_id

    def launch_for(self, launch_id: str, client_id: str | None) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(launch_context).where(and_(
                launch_context.c.launch_id == launch_id, launch_context.c.client_id == client_id,
                launch_context.c.expires_ms > now_ms()))).first()


def _by_kid(keyset: KeySet | None, kid: str) -> Any:
    if keyset is None:
        return None
    try:
        return keyset.get_by_kid(kid)
    except (ValueError, KeyError, JoseError):
        return None
