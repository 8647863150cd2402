"""The EHR's FHIR R4 API: authenticated requests with timeouts, retries and paging.

Authentication is either a static bearer token (GATEWAY_UPSTREAM_BEARER_TOKEN) or a SMART
backend-services client: a private_key_jwt client assertion (RS384 or ES384, signed with joserfc,
Authlib's JOSE library) is exchanged at the token endpoint named in
<upstream>/.well-known/smart-configuration for an access token, which is cached until shortly
before it expires (a minute, or a tenth of its lifetime if that is less) and fetched again after a 401.

Transport is a requests Session. fhirclient's FHIRServer is not used for the calls themselves: it
sets no timeouts, does not retry, and its search helpers build fhirclient models for every page,
which this gateway never does on a read path (the resources go into the store as received JSON).

Every request has a timeout (connect and read, shortened to what is left of a caller's deadline).
429 and 5xx answers and connection failures are retried with exponential backoff, honouring
Retry-After; a Bundle's next links are followed, but only on the upstream's own scheme and host,
so the token never goes anywhere else. Tokens, assertions and keys are never logged.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from gateway.config import Settings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CONNECT_TIMEOUT = 10.0
ASSERTION_LIFETIME = 300  # seconds; SMART backend services allows at most five minutes
TOKEN_MARGIN = 60  # renew this many seconds before the token expires


class UpstreamError(Exception):
    """The upstream answered with an error, or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.transient = transient  # worth trying again later (timeouts, 429, 5xx, connection refused)


class DeadlineExceeded(UpstreamError):
    def __init__(self, message: str = "the deadline passed") -> None:
        super().__init__(message, transient=True)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    url: str

    @property
    def location(self) -> str | None:
        return self.headers.get("Location") or self.headers.get("Content-Location")


# --- authentication ---

class BearerAuth:
    """A static token configured for the upstream."""

    def __init__(self, token: str) -> None:
        self._token = token

    def header(self, client: UpstreamClient, deadline: float | None) -> str:
        return f"Bearer {self._token}"

    def invalidate(self) -> bool:
        return False  # nothing to renew: a 401 stands

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"


class BackendServicesAuth:
    """SMART backend services (client credentials with a private_key_jwt assertion)."""

    def __init__(self, client_id: str, private_key_pem: bytes, *, key_id: str = "", alg: str = "RS384",
                 scope: str = "system/*.rs", token_endpoint: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if alg not in ("RS384", "ES384"):
            raise ValueError(f"SMART backend services signs with RS384 or ES384, not {alg}")
        self.client_id = client_id
        self.alg = alg
        self.key_id = key_id
        self.scope = scope
        self.token_endpoint = token_endpoint
        self._key = private_key_pem
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BackendServicesAuth(client_id={self.client_id!r}, alg={self.alg})"

    def assertion(self, audience: str) -> str:
        from joserfc import jwt
        from joserfc.jwk import ECKey, RSAKey

        key = (RSAKey if self.alg == "RS384" else ECKey).import_key(self._key)
        now = int(self._clock())
        header = {"alg": self.alg, "typ": "JWT"}
        if self.key_id:
            header["kid"] = self.key_id
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": audience, "iat": now,
                  "exp": now + ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}
        return jwt.encode(header, claims, key, algorithms=[self.alg])

    def header(self, client: UpstreamClient, deadline: float | None) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._expires:
                self._fetch(client, deadline)
            return f"Bearer {self._token}"

    def invalidate(self) -> bool:
        with self._lock:
            had = self._token is not None
            self._token = None
            return had

    def _fetch(self, client: UpstreamClient, deadline: float | None) -> None:
        if self.token_endpoint is None:
            config = client.get_json(client.base_url + "/.well-known/smart-configuration", deadline=deadline,
                                     authenticated=False)
            endpoint = config.get("token_endpoint") if isinstance(config, dict) else None
            if not endpoint:
                raise UpstreamError("the upstream's smart-configuration names no token_endpoint")
            self.token_endpoint = str(endpoint)
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": self.assertion(self.token_endpoint),
        }
        started = self._clock()
        response = client.send("POST", self.token_endpoint, data=form, deadline=deadline, authenticated=False,
                               accept="application/json")
        body = response.body if isinstance(response.body, dict) else {}
        if response.status != 200 or not body.get("access_token"):
            # the error code and description only: the answer carries no secret, but never echo the form
            raise UpstreamError(f"token request refused ({response.status}): {body.get('error', '')} "
                                f"{body.get('error_description', '')}".strip(), status=response.status)
        lifetime = float(body.get("expires_in") or 300)
        self._token = str(body["access_token"])
        self._expires = started + max(lifetime - min(TOKEN_MARGIN, lifetime / 10), 1.0)
        log.info("upstream access token obtained for client %s (valid %.0f s)", self.client_id, lifetime)


def auth_from_settings(settings: Settings) -> BearerAuth | BackendServicesAuth | None:
    if settings.upstream_client_id and settings.upstream_private_key_file:
        return BackendServicesAuth(
            settings.upstream_client_id, Path(settings.upstream_private_key_file).read_bytes(),
            key_id=settings.upstream_key_id, alg=settings.upstream_jwt_alg, scope=settings.upstream_scope)
    if settings.upstream_bearer_token:
        return BearerAuth(settings.upstream_bearer_token)
    return None


# --- the client ---

class UpstreamClient:
    def __init__(self, base_url: str, auth: BearerAuth | BackendServicesAuth | None = None, *,
                 timeout: float = 30.0, max_retries: int = 5, backoff_base: float = 0.5,
                 backoff_max: float = 60.0, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not base_url:
            raise ValueError("no upstream FHIR URL is configured (GATEWAY_UPSTREAM_FHIR_URL)")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.session = session or requests.Session()
        self._sleep = sleep
        origin = urlsplit(self.base_url)
        self._origin = (origin.scheme, origin.netloc)

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamClient:
        return cls(settings.upstream_fhir_url, auth_from_settings(settings), timeout=settings.upstream_timeout,
                   max_retries=settings.upstream_max_retries)

    def url(self, path: str) -> str:
        if not path:
            return self.base_url  # batch and transaction Bundles go to the base itself
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.base_url + "/", path.lstrip("/"))

    # --- one request, with retries ---

    def send(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None,
             data: dict[str, str] | None = None, headers: dict[str, str] | None = None,
             deadline: float | None = None, authenticated: bool = True,
             accept: str = FHIR_JSON) -> Response:
        """One request, retried on 429/5xx/connection failures; returns the final answer whatever its
        status (callers decide what a 404 or 412 means). Raises UpstreamError (transient) when the
        retries or the deadline (time.monotonic() value) run out."""
        url = self.url(path)
        if authenticated and (urlsplit(url).scheme, urlsplit(url).netloc) != self._origin:
            raise UpstreamError(f"refusing to send credentials to another origin: {urlsplit(url).netloc}")
        renewed = False
        attempt = 0
        while True:
            request_headers = {"Accept": accept, **(headers or {})}
            if json_body is not None:
                request_headers["Content-Type"] = FHIR_JSON
            if authenticated and self.auth is not None:
                request_headers["Authorization"] = self.auth.header(self, deadline)
            try:
                raw = self.session.request(method, url, params=params, json=json_body, data=data,
                                           headers=request_headers, timeout=self._timeout(deadline),
                                           allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__} on {method} {_path_only(url)}"
                delay = self._backoff(attempt)
                attempt += 1
                if attempt > self.max_retries:
                    raise UpstreamError(f"{problem}; gave up after {attempt} attempts", transient=True) from None
                self._wait(delay, deadline, problem)
                continue
            response = Response(raw.status_code, dict(raw.headers), _json(raw), raw.url)
            if response.status == 401 and authenticated and self.auth is not None and not renewed \
                    and self.auth.invalidate():
                renewed = True  # an expired or revoked token: fetch a new one once
                continue
            if response.status in RETRY_STATUSES:
                problem = f"{response.status} on {method} {_path_only(url)}"
                attempt += 1
                if attempt > self.max_retries:
                    raise UpstreamError(f"{problem}; gave up after {attempt} attempts", status=response.status,
                                        body=raw.text[:2000], transient=True)
                delay = _retry_after(response.headers.get("Retry-After"))
                if delay is not None and delay > self.backoff_max:
                    raise UpstreamError(f"{problem}; Retry-After asks for {delay:.0f} s", status=response.status,
                                        transient=True)
                self._wait(self._backoff(attempt - 1) if delay is None else delay, deadline, problem)
                continue
            return response

    def _timeout(self, deadline: float | None) -> tuple[float, float]:
        read = self.timeout
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded()
            read = min(read, remaining)
        return (min(CONNECT_TIMEOUT, read), read)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_base * (2 ** attempt), self.backoff_max)
        return delay * random.uniform(0.8, 1.2)

    def _wait(self, delay: float, deadline: float | None, problem: str) -> None:
        delay = max(delay, 0.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise DeadlineExceeded(f"{problem}; retrying in {delay:.1f} s would pass the deadline")
        log.info("upstream: %s; retrying in %.1f s", problem, delay)
        self._sleep(delay)

    # --- FHIR interactions ---

    def get_json(self, path: str, *, params: dict[str, Any] | None = None, deadline: float | None = None,
                 authenticated: bool = True) -> Any:
        response = self.send("GET", path, params=params, deadline=deadline, authenticated=authenticated,
                             accept=FHIR_JSON + ", application/json")
        _raise_for(response, "GET", path)
        return response.body

    def read(self, resource_type: str, resource_id: str, deadline: float | None = None) -> dict[str, Any] | None:
        """The resource, or None when the upstream says 404 or 410."""
        response = self.send("GET", f"{resource_type}/{resource_id}", deadline=deadline)
        if response.status in (404, 410):
            return None
        _raise_for(response, "GET", f"{resource_type}/{resource_id}")
        return response.body

    def search_pages(self, resource_type: str, params: dict[str, Any],
                     deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """Each searchset Bundle, following next links."""
        path: str | None = resource_type
        query: dict[str, Any] | None = params
        pages = 0
        while path is not None:
            bundle = self.get_json(path, params=query, deadline=deadline)
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise UpstreamError(f"search {resource_type} did not answer with a Bundle")
            pages += 1
            yield bundle
            path = next((link.get("url") for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            query = None  # the next link carries the whole query
            if pages > 10_000:
                raise UpstreamError(f"search {resource_type} pages without end")

    def search(self, resource_type: str, params: dict[str, Any],
               deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """Every resource a search matches (and what it _includes), across all pages."""
        for bundle in self.search_pages(resource_type, params, deadline):
            for entry in bundle.get("entry", []):
                resource = entry.get("resource")
                if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
                    yield resource

    def create(self, resource: dict[str, Any], if_none_exist: str | None = None,
               deadline: float | None = None) -> Response:
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = self.send("POST", resource["resourceType"], json_body=resource, headers=headers,
                             deadline=deadline)
        _raise_for(response, "POST", resource["resourceType"])
        return response

    def bundle(self, entries: list[dict[str, Any]], bundle_type: str = "batch",
               deadline: float | None = None) -> Response:
        """A batch or transaction Bundle of these entries; the answer's status is the caller's to judge."""
        return self.send("POST", "", json_body={"resourceType": "Bundle", "type": bundle_type, "entry": entries},
                         deadline=deadline)

    def update(self, resource: dict[str, Any], deadline: float | None = None) -> Response:
        path = f"{resource['resourceType']}/{resource['id']}"
        response = self.send("PUT", path, json_body=resource, headers={"Prefer": "return=representation"},
                             deadline=deadline)
        _raise_for(response, "PUT", path)
        return response


def _json(raw: requests.Response) -> Any:
    if not raw.content:
        return None
    try:
        return raw.json()
    except ValueError:
        return None


def _raise_for(response: Response, method: str, path: str) -> None:
    if response.status < 400:
        return
    diagnostics = ""
    if isinstance(response.body, dict):
        issues = response.body.get("issue") or []
        diagnostics = "; ".join(str(i.get("diagnostics") or i.get("code") or "") for i in issues)[:500]
    raise UpstreamError(f"{method} {_path_only(path)} answered {response.status}"
                        + (f": {diagnostics}" if diagnostics else ""), status=response.status,
                        transient=response.status in RETRY_STATUSES)


def _path_only(url: str) -> str:
    """A URL for logs and errors without its query string (search parameters name patients)."""
    return url.split("?", 1)[0]


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
