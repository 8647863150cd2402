"""Authlib, fitted to SMART: the models it works with and the grants and endpoints it runs.

Where Authlib's defaults fall short of SMART App Launch 2.x, a subclass says so:
- PKCE is S256 only and required of every client, confidential ones too (`S256Challenge`).
- aud must equal the FHIR base exactly; a launch parameter must name a stored launch context.
- Refresh tokens rotate on every use (`RotatingRefreshGrant`); the service revokes the whole grant
  when a used one comes back.
- private_key_jwt (`PrivateKeyJwt`): RS384/ES384, kid required, jku must be the registered JWKS
  URL, exp at most five minutes ahead, and a jti is never accepted twice (Authlib leaves jti to the
  application).
- Basic authentication together with client_id in the body (as fhirclient sends) is accepted when
  the two agree (`SmartServer.authenticate_client`).
- Backend services (`BackendServicesGrant`): client_credentials with private_key_jwt and system/
  scopes inside the registration.

Storage and policy live in the service (server.SmartAuth), reached as `self.server.smart`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Request,
    TokenMixin,
    UnauthorizedClientError,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, ClientCredentialsGrant, RefreshTokenGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7523.client import ASSERTION_TYPE
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from joserfc import jwt
from joserfc.errors import JoseError

from gateway.smart_auth import people
from gateway.smart_auth.people import now_ms
from gateway.smart_auth.scopes import allowed_subset, parse_scopes

if TYPE_CHECKING:
    from gateway.smart_auth.server import SmartAuth

ASSERTION_MAX_AHEAD = 300
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


# --- models Authlib works with ---

class Client(ClientMixin):
    def __init__(self, row: Any) -> None:
        self.client_id: str = row.client_id
        self.client_type: str = row.client_type
        self.secret_hash: str | None = row.secret_hash
        self.redirect_uris: list[str] = json.loads(row.redirect_uris)
        self.scope: str = row.scope
        self.jwks_url: str | None = row.jwks_url
        self.jwks: str | None = row.jwks
        self.launch_url: str | None = row.launch_url
        self.name: str | None = row.name
        # A disabled client (the console) is refused at the token endpoint and at /authorize, and its
        # tokens count as revoked; it may still introspect (to learn its tokens are inactive).
        self.disabled: bool = row.disabled_ms is not None

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        allowed = allowed_subset(scope, self.scope)
        return " ".join(allowed) if allowed else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.secret_hash) and people.verify_secret(self.secret_hash or "", client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in {
            "public": {"none"},
            "confidential-symmetric": {"client_secret_basic", "client_secret_post"},
            "confidential-asymmetric": {"private_key_jwt"},
        }.get(self.client_type, set())

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "client_credentials":
            return self.client_type == "confidential-asymmetric"
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class AuthCode(AuthorizationCodeMixin):
    row: Any

    def get_redirect_uri(self) -> str | None:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return self.row.scope

    @property
    def code_challenge(self) -> str:
        return self.row.code_challenge

    @property
    def code_challenge_method(self) -> str:
        return self.row.code_challenge_method


@dataclass
class StoredToken(TokenMixin):
    row: Any
    is_refresh: bool = False  # found by its refresh token rather than its access token

    def check_client(self, client: Client) -> bool:
        return self.row.client_id == client.client_id

    def get_scope(self) -> str:
        return self.row.scope

    def get_expires_in(self) -> int:
        return max(0, (self.row.expires_ms - now_ms()) // 1000)

    def is_expired(self) -> bool:
        return self.row.expires_ms <= now_ms()

    def is_revoked(self) -> bool:
        return bool(self.row.revoked)

    def get_client_id(self) -> str:
        return self.row.client_id


@dataclass(frozen=True)
class Authorizer:
    """The resource owner Authlib passes around, with the launch context the grant carries."""

    user_id: int
    username: str
    fhir_user: str
    patient_id: str | None
    encounter_id: str | None
    grant_id: str
    nonce: str | None = None


# --- Authlib subclasses ---

class S256Challenge(CodeChallenge):
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier'")
        super().validate_code_verifier(grant, result)


class SmartCodeGrant(AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def validate_authorization_request(self) -> str:
        redirect_uri = super().validate_authorization_request()
        if self.request.client.disabled:
            raise UnauthorizedClientError("This client is disabled", redirect_uri=redirect_uri)
        try:
            self.server.smart.check_smart_request(self.request)
        except InvalidRequestError as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        self.server.smart.save_code(code, request)

    def query_authorization_code(self, code: str, client: Client) -> AuthCode | None:
        return self.server.smart.claim_code(code, client)

    def delete_authorization_code(self, authorization_code: AuthCode) -> None:
        """Nothing to do: the code was marked used when it was claimed."""

    def authenticate_user(self, authorization_code: AuthCode) -> Authorizer:
        return self.server.smart.owner_of_grant(authorization_code.row.grant_id, authorization_code.row.nonce)


class RotatingRefreshGrant(RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def _validate_request_token(self, client: Client) -> StoredToken:
        presented = self.request.form.get("refresh_token")
        if not presented:
            raise InvalidRequestError("Missing 'refresh_token' in request.")
        return self.server.smart.claim_refresh_token(presented, client)

    def authenticate_user(self, refresh_token: StoredToken) -> Authorizer:
        return self.server.smart.owner_of_grant(refresh_token.row.grant_id)

    def revoke_old_credential(self, refresh_token: StoredToken) -> None:
        """Nothing to do: the refresh token was marked used when it was claimed."""


class BackendServicesGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]

    def validate_requested_scope(self) -> None:
        scope = self.request.payload.scope or ""
        parsed = parse_scopes(scope)
        requested = list(dict.fromkeys(scope.split()))
        if not requested or parsed.unknown or parsed.other or any(s.context != "system" for s in parsed.resources):
            raise InvalidScopeError("Backend services request system/ scopes only")
        if allowed_subset(scope, self.request.client.scope) != requested:
            raise InvalidScopeError("A requested scope is outside the client's registration")


class PrivateKeyJwt(JWTBearerClientAssertion):
    CLIENT_AUTH_METHOD = "private_key_jwt"
    ALGORITHMS = ("RS384", "ES384")

    def __init__(self, smart: SmartAuth) -> None:
        super().__init__(validate_jti=True, leeway=30)
        self.smart = smart

    def get_audiences(self) -> list[str]:
        return [self.smart.token_url]

    def validate_jti(self, claims: Any, jti: str) -> bool:
        return self.smart.remember_jti(claims["sub"], jti, int(claims["exp"]))

    def __call__(self, query_client: Any, request: OAuth2Request) -> Client | None:
        data = request.form
        assertion = data.get("client_assertion")
        if data.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
            return None
        headers, claims = self.extract_assertion(assertion)
        alg, kid = headers.get("alg"), headers.get("kid")
        if alg not in self.ALGORITHMS:
            raise InvalidClientError(description="The client assertion must be signed with RS384 or ES384")
        if not kid:
            raise InvalidClientError(description="The client assertion header needs a kid")
        issuer = claims.get("iss")
        client = query_client(issuer) if isinstance(issuer, str) else None
        if client is None or client.client_type != "confidential-asymmetric":
            raise InvalidClientError(description="Unknown client or not registered for private_key_jwt")
        jku = headers.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise InvalidClientError(description="jku does not match the client's registered JWKS URL")
        key = self.smart.client_key(client, kid)
        if key is None:
            raise InvalidClientError(description=f"No key with kid {kid!r} in the client's JWKS")
        try:
            token = jwt.decode(assertion, key, algorithms=[alg])
        except JoseError as exc:
            raise InvalidClientError(description="The client assertion signature is not valid") from exc
        exp = token.claims.get("exp")
        if not isinstance(exp, int) or exp > time.time() + ASSERTION_MAX_AHEAD + self.leeway:
            raise InvalidClientError(description="The client assertion exp must be at most 5 minutes ahead")
        self.verify_claims(token.claims)
        request.client = client
        return self.authenticate_client(client)


class SmartIntrospection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> StoredToken | None:
        return self.server.smart.find_token(token_string)

    def check_permission(self, token: StoredToken, client: Client, request: OAuth2Request) -> bool:
        return token.check_client(client)

    def create_introspection_payload(self, token: StoredToken | None) -> dict[str, Any]:
        if token is None:
            return {"active": False}
        return self.server.smart.introspect(token)


class SmartRevocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> StoredToken | None:
        return self.server.smart.find_token(token_string)

    def revoke_token(self, token: StoredToken, request: OAuth2Request) -> None:
        self.server.smart.revoke_grant(token.row.grant_id)


class SmartServer(AuthorizationServer):
    smart: SmartAuth

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return super().create_oauth2_request(request)

    def authenticate_client(self, request: OAuth2Request, methods: list[str], endpoint: str = "token") -> Client:
        client = super().authenticate_client(request, methods, endpoint)
        if client.disabled and endpoint == "token":
            raise InvalidClientError(description="This client is disabled")
        body_id = request.form.get("client_id")
        if body_id and body_id != client.client_id:
            raise InvalidClientError(description="client_id in the body differs from the authenticated client")
        return client


class StoredAuthorizationRequest(OAuth2Request):
    """An authorization request kept across the login and consent pages, replayed through Authlib."""

    def __init__(self, uri: str, args: dict[str, str]) -> None:
        super().__init__("GET", uri)
        self._args = args
        self.payload = BasicOAuth2Payload(args)

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return {}
