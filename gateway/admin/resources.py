"""The console's view of one FHIR resource (a version of it, and its history), read through the store
under the staff member's principal: gateway.access decides, before any query, whether the login's
roles may read the type, exactly as it does for the FHIR API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway import access
from gateway.fhir import jsonio
from gateway.fhir.outcome import FhirError
from gateway.fhir.store import Stored, known_type

HISTORY_SHOWN = 100  # versions listed under a resource; older ones are reachable by number


@dataclass(frozen=True)
class Version:
    version_id: int
    last_updated: str
    method: str
    deleted: bool


@dataclass(frozen=True)
class ResourceView:
    resource_type: str
    id: str
    version_id: int
    last_updated: str
    content: str  # the stored JSON (for the audit record: it names the patient)
    pretty: str
    current_version: int
    versions: list[Version]
    more_versions: bool

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def is_current(self) -> bool:
        return self.version_id == self.current_version


def read(services: Any, principal: access.Principal, resource_type: str, resource_id: str,
         version: int | None = None) -> ResourceView:
    """The current version (or `version`) with the list of versions. FhirError 403 when the principal
    may not read the type or this resource, 404/410 when there is none."""
    known_type(resource_type)
    grant = access.authorize(principal, "read" if version is None else "vread", resource_type)
    access.authorize(principal, "history", resource_type)  # the list of versions shown with it
    base = services.settings.fhir_base
    with services.store.reading() as repo:
        current = repo.read(resource_type, resource_id)
        stored: Stored = current if version is None else repo.vread(resource_type, resource_id, version)
        # Judged on the current version, as the API does for history by id, and on the version shown.
        for checked in (current, stored):
            if not access.visible(grant, resource_type, resource_id, checked.content or "{}", base):
                raise FhirError(403, "Access denied", code="forbidden")
        page, cursor = repo.history(resource_type, resource_id, count=HISTORY_SHOWN)
    content = stored.content or "{}"
    return ResourceView(
        resource_type=resource_type, id=resource_id, version_id=stored.version_id,
        last_updated=stored.last_updated, content=content, pretty=jsonio.pretty(content),
        current_version=current.version_id,
        versions=[Version(s.version_id, s.last_updated, s.method or ("POST" if s.version_id == 1 else "PUT"),
                          s.deleted) for s in page],
        more_versions=cursor is not None,
    )
