"""The access policy: who is calling, and what they may do, decided in one place before any query.

Every FHIR interaction asks `authorize(principal, interaction, resource_type)` and gets back either
an exception (401/403) or a Grant whose `restrict` condition is added to every query the
interaction runs. Anything not explicitly allowed is refused.

Callers so far: a trusted in-process caller (CLI, HL7 ingest, the audit writer) and, only when
GATEWAY_OPEN_ACCESS is switched on, an anonymous HTTP caller with full access (demo and tests).
Bearer tokens from the SMART authorization server arrive with the SMART work; until then an HTTP
request without open access is answered 401.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Request

from gateway.config import Settings
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import Restriction

INTERACTIONS = frozenset({
    "read", "vread", "search", "history", "create", "update", "patch", "delete", "everything",
})


@dataclass(frozen=True)
class Principal:
    kind: str  # "system" (trusted, in-process), "open" (anonymous under open access)
    subject: str
    client_id: str | None = None
    # None: every patient; otherwise the ids whose compartments this principal may reach.
    patients: frozenset[str] | None = None
    interactions: frozenset[str] = field(default=INTERACTIONS)

    @property
    def audit_name(self) -> str:
        return self.subject


@dataclass(frozen=True)
class Grant:
    principal: Principal
    restrict: Restriction | None = None


SYSTEM = Principal(kind="system", subject="gateway")


def principal_from_request(request: Request, settings: Settings) -> Principal:
    authorization = request.headers.get("Authorization", "")
    if authorization:
        # No token issuer exists yet, so no token can be valid: refuse rather than ignore it.
        raise FhirError(401, "The bearer token is not valid", code="login",
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if settings.open_access:
        return Principal(kind="open", subject="anonymous")
    raise FhirError(401, "Authentication is required", code="login",
                    headers={"WWW-Authenticate": 'Bearer realm="fhir"'})


def authorize(principal: Principal, interaction: str, resource_type: str | None) -> Grant:
    if interaction not in INTERACTIONS or interaction not in principal.interactions:
        raise FhirError(403, f"{interaction} is not permitted", code="forbidden")
    if principal.kind in ("system", "open") and principal.patients is None:
        return Grant(principal)
    raise FhirError(403, "Access denied", code="forbidden")


def allowed(principal: Principal, interaction: str, resource_type: str | None) -> bool:
    try:
        authorize(principal, interaction, resource_type)
    except FhirError:
        return False
    return True


def describe(principal: Principal) -> dict[str, Any]:
    return {"kind": principal.kind, "subject": principal.subject, "client_id": principal.client_id}
