"""The one object every portal page reads and writes through.

A `Record` is one patient's record as seen by one signed-in login: it asks gateway.access for every
interaction before any query (the same policy, rules and SQL restriction as the FHIR API), runs the
query through the store, and leaves an AuditEvent for every read, search and write. Pages never
touch the store or the database for patient data any other way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from gateway import access
from gateway.fhir.indexer import compartment_patients
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import search
from gateway.fhir.store import Repository, Stored


@dataclass
class Found:
    """A page of search matches, the resources they _include'd by reference, and the next page."""

    matches: list[dict[str, Any]]
    included: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_cursor: str | None = None
    total: int | None = None


class NotVisible(Exception):
    """The resource does not exist, or this login may not see it (the page says the same for both)."""


@dataclass
class Record:
    services: Any  # gateway.Gateway
    principal: access.Principal
    patient_id: str
    address: str | None = None  # the browser's address, for the audit trail

    @property
    def reference(self) -> str:
        return f"Patient/{self.patient_id}"

    def _audit(self, interaction: str, *, entities: tuple[str, ...] = (), contents: tuple[str, ...] = (),
               query: str | None = None) -> None:
        self.services.audit.record(interaction, self.principal.audit_name, client_id=self.principal.client_id,
                                   address=self.address, query=query, entities=entities, contents=contents)

    def search(self, resource_type: str, params: list[tuple[str, str]], count: int = 50,
               cursor: str | None = None, total: bool = False) -> Found:
        grant = access.authorize(self.principal, "search", resource_type)
        params = [*params, ("_count", str(count))]
        if cursor:
            params.append(("_cursor", cursor))
        if total:
            params.append(("_total", "accurate"))
        settings = self.services.settings
        with self.services.store.reading() as repo:
            _, result = search(repo, resource_type, params, restrict=grant.restrict,
                               default_count=settings.default_page_size, max_count=settings.max_page_size)
        stored = result.matches + result.includes
        self._audit("search", query=f"/fhir/{resource_type}?{urlencode(params)}",
                    contents=tuple(s.content or "" for s in stored))
        return Found([s.resource() for s in result.matches], {s.reference: s.resource() for s in result.includes},
                     result.next_cursor, result.total)

    def search_all(self, resource_type: str, params: list[tuple[str, str]], limit: int = 1000) -> Found:
        """Every match up to `limit` (pages of 200), for pages that show a whole list or a trend."""
        found = Found([])
        cursor: str | None = None
        while len(found.matches) < limit:
            page = self.search(resource_type, params, count=min(200, limit - len(found.matches)), cursor=cursor)
            found.matches += page.matches
            found.included.update(page.included)
            cursor = page.next_cursor
            if cursor is None:
                break
        found.next_cursor = cursor
        return found

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        grant = access.authorize(self.principal, "read", resource_type)
        with self.services.store.reading() as repo:
            stored = repo.find(resource_type, resource_id)
        if stored is None or stored.content is None or not access.visible(
                grant, resource_type, resource_id, stored.content, self.services.settings.fhir_base):
            raise NotVisible(f"{resource_type}/{resource_id}")
        self._audit("read", entities=(stored.reference,), contents=(stored.content,))
        return stored.resource()

    def read_reference(self, reference: str | None) -> dict[str, Any] | None:
        """A relative reference (Type/id) read if visible; None for anything else."""
        if not reference or reference.count("/") != 1:
            return None
        rtype, rid = reference.split("/")
        try:
            return self.read(rtype, rid)
        except (NotVisible, FhirError):
            return None

    def _write(self, interaction: str, resource: dict[str, Any],
               operation: Callable[[Repository], Any]) -> dict[str, Any]:
        grant = access.authorize(self.principal, interaction, resource.get("resourceType"))
        base = self.services.settings.fhir_base
        access.check_write(grant, resource, lambda r: compartment_patients(r, base))
        result = self.services.store.write(operation)
        stored: Stored = result.stored
        self._audit(interaction, entities=(stored.reference,), contents=(stored.content or "",))
        return stored.resource()

    def create(self, resource: dict[str, Any], if_none_exist: str | None = None) -> dict[str, Any]:
        """With if_none_exist (FHIR conditional create), the one matching resource is returned instead
        when there is one, decided under a lock on the criteria (two requests at once make one)."""
        return self._write("create", resource, lambda repo: repo.create(resource, if_none_exist=if_none_exist))

    def update(self, resource: dict[str, Any], version_id: str | None = None) -> dict[str, Any]:
        """Write a new version of a resource this login can see now; with version_id, only if
        nobody changed it since (else FhirError 412)."""
        rtype, rid = resource["resourceType"], resource["id"]
        self.read(rtype, rid)  # the current version must be visible too, not only the new one
        return self._write("update", resource,
                           lambda repo: repo.update(rtype, rid, resource, f'W/"{version_id}"' if version_id else None))
