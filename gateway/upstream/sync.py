"""Pull a patient's records from the EHR's FHIR API into the store.

    summary = Synchronizer(store, client, audit).sync_patient("upstream-patient-id")

One sync reads the Patient, then per type (Appointment, Observation, DiagnosticReport,
MedicationRequest, Communication) every resource of the patient, by pages; the Practitioners,
Organizations, Locations, Encounters and Medications they reference are read too. Each page is
written in one transaction through the store (validated, versioned, indexed, audited as the
"upstream sync" agent). An incremental sync asks only for what changed since the newest
meta.lastUpdated it saw before (`_lastUpdated=ge<high-water mark>`, kept per patient and type in
the upstream_sync table); the boundary itself is read again, which changes nothing.

Identity: the upstream id is kept as an identifier (system urn:fhir-gateway:upstream:<type>), and a
resource's local id is chosen so that the HL7-fed and the FHIR-fed copy of one thing are one
resource (see mappings/upstream/identity.yaml). References are rewritten to the local ids; one to a
resource the sync does not bring along becomes an absolute reference to the upstream.

A sync started by a login must not hold the page up: sync_patient_async() runs it on a small
thread pool with a deadline and returns at once.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from sqlalchemy import insert, select, update

from gateway import db
from gateway.fhir import jsonio
from gateway.fhir.dates import now_instant
from gateway.fhir.outcome import FhirError
from gateway.fhir.store import FhirStore, Repository
from gateway.fhir.validate import ID_RE
from gateway.hl7.translate import make_id, mappings
from gateway.upstream.client import DeadlineExceeded, UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

UPSTREAM_SYSTEM = "urn:fhir-gateway:upstream:"
PATIENT_TYPES = ("Appointment", "Observation", "DiagnosticReport", "MedicationRequest", "Communication")
SUPPORTING_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "Encounter",
                              "Medication"})
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
IDENTITY_FILE = Path(__file__).resolve().parent.parent.parent / "mappings" / "upstream" / "identity.yaml"
PAGE_SIZE = 100
_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")

Progress = Callable[[str], None]


@dataclass
class SyncSummary:
    upstream_patient: str
    patient: str | None = None  # the local id
    fetched: dict[str, int] = field(default_factory=dict)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    merged: int = 0  # landed on a resource the HL7 feed (or anything else) had made
    rejected: list[str] = field(default_factory=list)
    complete: bool = False
    error: str | None = None
    seconds: float = 0.0

    def line(self) -> str:
        fetched = ", ".join(f"{n} {t}" for t, n in sorted(self.fetched.items()) if n) or "nothing"
        state = "complete" if self.complete else f"INCOMPLETE ({self.error})"
        return (f"patient {self.upstream_patient} -> Patient/{self.patient}: fetched {fetched}; "
                f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged, "
                f"{self.merged} merged with existing records, {len(self.rejected)} rejected; {state} "
                f"in {self.seconds:.1f}s")


def upstream_identifier(resource_type: str, upstream_id: str) -> dict[str, str]:
    return {"system": UPSTREAM_SYSTEM + resource_type, "value": upstream_id}


@functools.cache
def identity_rules() -> dict[str, list[dict[str, str]]]:
    return yaml.safe_load(IDENTITY_FILE.read_text(encoding="utf-8")) or {}


def hl7_id(resource: dict[str, Any]) -> str | None:
    """The id the HL7 maps give this record, from its business identifiers (identity.yaml)."""
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    for rule in identity_rules().get(resource.get("resourceType", ""), []):
        for identifier in identifiers:
            codes = {c.get("code") for c in (identifier.get("type") or {}).get("coding", [])
                     if c.get("system") in (V2_0203, None)}
            if rule["type"] not in codes:
                continue
            parts = [rule["prefix"]] if rule.get("prefix") else []
            authority = _authority(identifier)
            if authority:
                parts.append(authority)
            parts.append(str(identifier["value"]))
            return make_id(parts)
    return None


def _authority(identifier: dict[str, Any]) -> str | None:
    display = (identifier.get("assigner") or {}).get("display")
    if display:
        return str(display)
    system = identifier.get("system")
    if not system:
        return None
    table = mappings().tables.get("assigning-authorities")
    if table is not None:
        for namespace, mapped in table.entries.items():
            if mapped == system:
                return namespace
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:"):]
    return None


class Synchronizer:
    def __init__(self, store: FhirStore, client: UpstreamClient, audit: Any = None,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.client = client
        self.audit = audit
        self.progress = progress or (lambda _line: None)
        self.base = client.base_url

    # --- entry points ---

    def sync_patient(self, upstream_id: str, *, incremental: bool = True,
                     deadline: float | None = None) -> SyncSummary:
        """Everything of one upstream patient; deadline is a time.monotonic() value (None: no limit)."""
        started = time.monotonic()
        summary = SyncSummary(upstream_id)
        try:
            self._sync(upstream_id, incremental, deadline, summary)
            summary.complete = True
        except DeadlineExceeded as exc:
            summary.error = f"deadline: {exc}"
        except UpstreamError as exc:
            summary.error = str(exc)
            log.warning("sync of upstream patient %s stopped: %s", upstream_id, exc)
        summary.seconds = time.monotonic() - started
        return summary

    def sync_linked(self, deadline: float | None = None) -> list[SyncSummary]:
        """The periodic sync: every local patient linked to an upstream one, incrementally."""
        summaries = []
        for upstream_id in linked_patients(self.store):
            if deadline is not None and time.monotonic() >= deadline:
                break
            summaries.append(self.sync_patient(upstream_id, incremental=True, deadline=deadline))
        return summaries

    # --- one patient ---

    def _sync(self, upstream_id: str, incremental: bool, deadline: float | None, summary: SyncSummary) -> None:
        patient = self.client.read("Patient", upstream_id, deadline)
        if patient is None:
            raise UpstreamError(f"the upstream has no Patient/{upstream_id}")
        summary.fetched["Patient"] = 1
        mapping: dict[str, str] = {}
        with self.store.writing(origin="upstream") as repo:
            written = self._write(repo, [patient], mapping, summary)
        if not written:
            raise UpstreamError(f"Patient/{upstream_id} was rejected: {summary.rejected[-1:]}")
        local_patient = mapping[f"Patient/{upstream_id}"].split("/", 1)[1]
        summary.patient = local_patient
        self.progress(f"Patient/{upstream_id} -> Patient/{local_patient}")
        for resource_type in PATIENT_TYPES:
            high_water = self._high_water(local_patient, resource_type) if incremental else None
            params: dict[str, Any] = {"patient": upstream_id, "_count": PAGE_SIZE}
            if high_water:
                params["_lastUpdated"] = f"ge{high_water}"
            newest = high_water
            count = 0
            for page in self.client.search_pages(resource_type, params, deadline):
                resources = [e["resource"] for e in page.get("entry", [])
                             if isinstance(e.get("resource"), dict)
                             and e["resource"].get("resourceType") == resource_type]
                supporting = self._supporting(resources, mapping, deadline, summary)
                with self.store.writing(origin="upstream") as repo:
                    self._write(repo, supporting[::-1], mapping, summary)  # what others reference first
                    self._write(repo, resources, mapping, summary)
                count += len(resources)
                summary.fetched[resource_type] = count
                for resource in resources:
                    updated = (resource.get("meta") or {}).get("lastUpdated")
                    if updated and (newest is None or updated > newest):
                        newest = updated
            # only after every page of the type arrived: an interrupted sync asks again from the old mark
            self._save_high_water(local_patient, resource_type, newest)
            self.progress(f"  {resource_type}: {count}" + (f" changed since {high_water}" if high_water else ""))

    def _supporting(self, resources: list[dict[str, Any]], mapping: dict[str, str], deadline: float | None,
                    summary: SyncSummary) -> list[dict[str, Any]]:
        """The Practitioners, Organizations, ... these resources reference, not yet brought along
        (and what those reference in turn: an Encounter's Location, a PractitionerRole's Organization)."""
        fetched: list[dict[str, Any]] = []
        queue = list(resources)
        seen: set[str] = set()
        while queue:
            wanted = sorted({ref for r in queue for ref in self._references(r)
                             if ref.split("/")[0] in SUPPORTING_TYPES and ref not in mapping and ref not in seen})
            queue = []
            for ref in wanted:
                seen.add(ref)
                rtype, rid = ref.split("/", 1)
                resource = self.client.read(rtype, rid, deadline)
                if resource is None:
                    continue
                summary.fetched[rtype] = summary.fetched.get(rtype, 0) + 1
                fetched.append(resource)
                queue.append(resource)
        return fetched

    def _references(self, resource: Any) -> Iterable[str]:
        if isinstance(resource, dict):
            for key, value in resource.items():
                if key == "reference" and isinstance(value, str):
                    relative = self._relative(value)
                    if relative:
                        yield relative
                else:
                    yield from self._references(value)
        elif isinstance(resource, list):
            for item in resource:
                yield from self._references(item)

    def _relative(self, reference: str) -> str | None:
        """"Type/id" for a reference to a resource on the upstream (relative, or absolute on its base)."""
        if reference.startswith(self.base + "/"):
            reference = reference[len(self.base) + 1:]
        match = _RELATIVE.match(reference)
        return f"{match.group(1)}/{match.group(2)}" if match else None

    # --- writing ---

    def _write(self, repo: Repository, resources: list[dict[str, Any]], mapping: dict[str, str],
               summary: SyncSummary) -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        for resource in resources:
            rtype, upstream_id = resource.get("resourceType"), resource.get("id")
            if not rtype or not upstream_id:
                continue
            local_id, existed = self._local_id(repo, resource)
            mapping[f"{rtype}/{upstream_id}"] = f"{rtype}/{local_id}"
            current = repo.find(rtype, local_id)
            body = self._local_body(resource, local_id, current.resource() if current else None, mapping)
            try:
                result = repo.update(rtype, local_id, body)
            except FhirError as exc:
                summary.rejected.append(f"{rtype}/{upstream_id}: {exc.diagnostics}")
                mapping.pop(f"{rtype}/{upstream_id}", None)
                log.warning("upstream %s/%s rejected: %s", rtype, upstream_id, exc.diagnostics)
                continue
            if result.status == 201:
                summary.created += 1
            elif result.changed:
                summary.updated += 1
            else:
                summary.unchanged += 1
            if existed:
                summary.merged += 1
            written.append(result.stored.resource())
        if written and self.audit is not None:
            self.audit.record("update", "upstream sync", client_id=f"upstream:{self.base}",
                              entities=tuple(f"{r['resourceType']}/{r['id']}" for r in written),
                              contents=tuple(jsonio.dumps(r) for r in written),
                              description=f"synced from {self.base}")
        return written

    def _local_id(self, repo: Repository, resource: dict[str, Any]) -> tuple[str, bool]:
        """(local id, whether it lands on a record that came from elsewhere than this upstream id)."""
        rtype, upstream_id = resource["resourceType"], str(resource["id"])
        mine = repo.match(rtype, _identifier_criteria(UPSTREAM_SYSTEM + rtype, upstream_id))
        if mine:
            return mine[0].id, False
        derived = hl7_id(resource)
        if derived is not None and repo.find(rtype, derived) is not None:
            return derived, True
        for identifier in resource.get("identifier") or []:
            if not isinstance(identifier, dict) or not identifier.get("system") or not identifier.get("value"):
                continue
            if str(identifier["system"]).startswith(UPSTREAM_SYSTEM):
                continue
            matches = repo.match(rtype, _identifier_criteria(identifier["system"], identifier["value"]))
            if len(matches) == 1:
                return matches[0].id, True
        if derived is not None:
            return derived, False  # the id the HL7 feed will give it, should the feed send it later
        if ID_RE.match(upstream_id) and repo.find(rtype, upstream_id) is None:
            return upstream_id, False
        return make_id(["upstream", rtype, upstream_id]), False

    def _local_body(self, resource: dict[str, Any], local_id: str, current: dict[str, Any] | None,
                    mapping: dict[str, str]) -> dict[str, Any]:
        rtype, upstream_id = resource["resourceType"], str(resource["id"])
        body = {k: self._rewrite(v, mapping) for k, v in resource.items() if k not in ("meta", "id")}
        body["id"] = local_id
        # elements only the other source knows (the HL7 copy's) stay; what the upstream sends wins
        if current is not None:
            for key, value in current.items():
                if key not in body and key != "meta":
                    body[key] = value
        identifiers = [i for i in body.get("identifier") or [] if isinstance(i, dict)]
        for previous in (current or {}).get("identifier") or []:
            if (previous.get("system"), previous.get("value")) not in {(i.get("system"), i.get("value"))
                                                                        for i in identifiers}:
                identifiers.append(previous)
        mine = upstream_identifier(rtype, upstream_id)
        if not any(i.get("system") == mine["system"] for i in identifiers):
            identifiers.append(mine)
        body["identifier"] = identifiers
        meta = {k: v for k, v in ((current or {}).get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        for key in ("profile", "security", "tag"):
            if key in (resource.get("meta") or {}):
                meta[key] = resource["meta"][key]
        meta["source"] = f"{self.base}/{rtype}/{upstream_id}"
        body["meta"] = meta
        return body

    def _rewrite(self, value: Any, mapping: dict[str, str]) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    relative = self._relative(item)
                    if relative is not None:
                        item = mapping.get(relative) or f"{self.base}/{relative}"
                    out[key] = item
                else:
                    out[key] = self._rewrite(item, mapping)
            return out
        if isinstance(value, list):
            return [self._rewrite(v, mapping) for v in value]
        return value

    # --- high-water marks ---

    def _high_water(self, patient_id: str, resource_type: str) -> str | None:
        s = db.upstream_sync.c
        with self.store.reading() as repo:
            return repo.conn.execute(select(s.high_water).where(
                s.patient_id == patient_id, s.resource_type == resource_type)).scalar()

    def _save_high_water(self, patient_id: str, resource_type: str, value: str | None) -> None:
        s = db.upstream_sync.c
        with self.store.writing(origin="upstream") as repo:
            changed = repo.conn.execute(update(db.upstream_sync).where(
                s.patient_id == patient_id, s.resource_type == resource_type).values(
                high_water=value, synced_at=now_instant())).rowcount
            if not changed:
                repo.conn.execute(insert(db.upstream_sync).values(
                    patient_id=patient_id, resource_type=resource_type, high_water=value, synced_at=now_instant()))


def _escape(value: Any) -> str:
    """A token search value: \\, | , $ are escaped in FHIR search."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def _identifier_criteria(system: Any, value: Any) -> str:
    """identifier=system|value as conditional criteria (a query string: the token is URL-encoded)."""
    return "identifier=" + quote(f"{_escape(system)}|{_escape(value)}", safe="")


def linked_patients(store: FhirStore) -> list[str]:
    """Upstream ids of the local patients linked to an upstream one."""
    t = db.sp_token.c
    with store.reading() as repo:
        return sorted(set(repo.conn.execute(select(t.code).where(
            t.resource_type == "Patient", t.param == "identifier", t.system == UPSTREAM_SYSTEM + "Patient")).scalars()))


def upstream_patient_id(store: FhirStore, client: UpstreamClient, local_patient_id: str,
                        deadline: float | None = None) -> str | None:
    """The upstream id of a local patient: its upstream identifier, else the one upstream Patient
    sharing one of its business identifiers (an MRN the HL7 feed set). An identifier the feed sent
    without a system is searched by value, and a candidate counts only if its own identifiers give
    the same id (identity.yaml) as the local patient has."""
    with store.reading() as repo:
        stored = repo.find("Patient", local_patient_id)
    if stored is None:
        return None
    identifiers = stored.resource().get("identifier") or []
    for identifier in identifiers:
        if identifier.get("system") == UPSTREAM_SYSTEM + "Patient" and identifier.get("value"):
            return str(identifier["value"])
    for identifier in identifiers:
        if not identifier.get("value"):
            continue
        if identifier.get("system"):
            token = f"{_escape(identifier['system'])}|{_escape(identifier['value'])}"
            found = list(client.search("Patient", {"identifier": token}, deadline))
        else:
            found = [p for p in client.search("Patient", {"identifier": _escape(identifier["value"])}, deadline)
                     if hl7_id(p) == local_patient_id]
        if len(found) == 1 and found[0].get("id"):
            return str(found[0]["id"])
    return None


# --- syncs that must not block (a login) ---

_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="upstream-sync")
_running: dict[str, Future[SyncSummary | None]] = {}
_running_lock = threading.RLock()  # a done future runs its callback at once, under the lock


def sync_patient_async(store: FhirStore, client: UpstreamClient, local_patient_id: str, deadline: float,
                       audit: Any = None) -> Future[SyncSummary | None]:
    """Start an incremental sync of a local patient in the background and return at once.

    deadline is in seconds from now: the sync stops making requests when it passes (what arrived by
    then is stored). A sync of the same patient already running is returned instead of a second one.
    The result is None when the patient is not linked to an upstream one.
    """
    until = time.monotonic() + deadline
    with _running_lock:
        running = _running.get(local_patient_id)
        if running is not None and not running.done():
            return running

        def run() -> SyncSummary | None:
            try:
                upstream_id = upstream_patient_id(store, client, local_patient_id, until)
                if upstream_id is None:
                    return None
                return Synchronizer(store, client, audit).sync_patient(upstream_id, deadline=until)
            except UpstreamError as exc:
                log.warning("background sync of Patient/%s stopped: %s", local_patient_id, exc)
                return SyncSummary(upstream_patient="?", patient=local_patient_id, error=str(exc))

        future = _executor.submit(run)
        _running[local_patient_id] = future
        future.add_done_callback(lambda done: _forget(local_patient_id, done))
        return future


def _forget(local_patient_id: str, future: Future[SyncSummary | None]) -> None:
    with _running_lock:
        if _running.get(local_patient_id) is future:
            del _running[local_patient_id]
