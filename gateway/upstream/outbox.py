"""The outbox: what patients do that the EHR must learn, queued with the change and delivered later.

Kinds, recognised by a store listener in the transaction of the local write (so an item exists
exactly when the change was committed), and only for writes that did not come from the EHR itself
(Repository.origin "hl7", "upstream", or "backend": a backend-services client writing through the
FHIR API, the way the EHR pushes):

- appointment-request (SRM^S01): an Appointment created with status proposed or pending;
- appointment-cancel (SRM^S04): an Appointment updated to cancelled, one the EHR knows (it has a
  filler id or an upstream id) or was asked for through the outbox;
- refill-request (OMP^O09, ORC-1 RF): a Task created with code fulfill (task-code), status
  requested, whose focus is a MedicationRequest;
- message (MDM^T02): a Communication created whose sender is a Patient, or a RelatedPerson of
  the Patient it is about (a parent or caregiver writing in the portal for the patient): the
  message goes to the EHR under the patient, with a first line naming who wrote it.

A refill request is a Task rather than a flagged MedicationRequest: the prescription stays as the
prescriber wrote it, and "please fulfil this request again" is what Task with code `fulfill` and
`focus` says in R4.

Per kind, GATEWAY_OUTBOX_<KIND> chooses `hl7` (MLLP to GATEWAY_OUTBOX_MLLP_HOST/PORT), `fhir` (a
write to the upstream FHIR API) or `off` (nothing queued). The HL7 message is built when the item is
queued (mappings/upstream/outbound.yaml, validated by hl7apy) and stored, so every retry sends the
same bytes with the same MSH-10; a FHIR create carries the item's key as an identifier
(urn:fhir-gateway:outbox) and If-None-Exist on it, so a retry never creates twice.

Delivery is at least once. A worker claims due items in a short transaction (SELECT ... FOR UPDATE
SKIP LOCKED on PostgreSQL; SQLite's single writer lock serialises claims) by pushing their
next_attempt_ms past the longest a delivery can take; no other worker sees them until then. The
outcome is written right after the ACK: AA delivered; AE/AR (or a 4xx from the FHIR API) failed,
kept with the reason and re-sendable (`gateway outbox retry ID`); a timeout, a refused connection, a
5xx or 429 is tried again with exponential backoff, up to GATEWAY_OUTBOX_MAX_ATTEMPTS.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import yaml
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import Connection, bindparam, insert, select, text, update

from gateway import db, metrics
from gateway.config import Settings
from gateway.fhir import jsonio
from gateway.fhir.dates import now_instant
from gateway.fhir.store import FhirStore, Repository, WriteResult
from gateway.hl7.mllp import Deframer, frame
from gateway.hl7.translate import mappings
from gateway.upstream.client import UpstreamClient, UpstreamError
from gateway.upstream.sync import UPSTREAM_SYSTEM

log = logging.getLogger(__name__)

KINDS = ("appointment-request", "appointment-cancel", "refill-request", "message")
MESSAGE_TYPES = {"appointment-request": "SRM^S01", "appointment-cancel": "SRM^S04",
                 "refill-request": "OMP^O09", "message": "MDM^T02"}
OUTBOX_SYSTEM = "urn:fhir-gateway:outbox"
EHR_ORIGINS = frozenset({"hl7", "upstream", "backend"})
TEMPLATES_FILE = Path(__file__).resolve().parent.parent.parent / "mappings" / "upstream" / "outbound.yaml"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"
CLAIM_BATCH = 16
OB = db.outbox.c


class BuildError(Exception):
    """The local record lacks what the outbound message needs (or hl7apy rejects the result)."""


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    channel: str
    resource_type: str
    resource_id: str
    version_id: int
    patient_id: str | None
    key: str
    payload: str
    attempts: int


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- recognising and queueing ---

def classify(action: str, resource: dict[str, Any], version_id: int) -> str | None:
    """The outbox kind of a local write, or None."""
    rtype = resource.get("resourceType")
    status = resource.get("status")
    if rtype == "Appointment":
        if status in ("proposed", "pending") and (action == "create" or version_id == 1):
            return "appointment-request"
        if status == "cancelled" and action == "update":
            return "appointment-cancel"
    elif rtype == "Task" and action == "create" and status == "requested":
        codes = {(c.get("system"), c.get("code")) for c in (resource.get("code") or {}).get("coding", [])}
        focus = (resource.get("focus") or {}).get("reference", "")
        if (TASK_CODES, "fulfill") in codes and focus.startswith("MedicationRequest/"):
            return "refill-request"
    elif rtype == "Communication" and action == "create" \
            and status not in ("preparation", "entered-in-error", "not-done"):
        sender = (resource.get("sender") or {}).get("reference", "")
        subject = (resource.get("subject") or {}).get("reference", "")
        if sender.startswith("Patient/") or (sender.startswith("RelatedPerson/") and subject.startswith("Patient/")):
            return "message"
    return None


def _proxy_of_subject(repo: Repository, resource: dict[str, Any]) -> bool:
    """A RelatedPerson sender must be related to the Communication's subject (on_write checks it:
    classify sees the resource only)."""
    sender = (resource.get("sender") or {}).get("reference", "")
    if not sender.startswith("RelatedPerson/"):
        return True
    related = _read(repo, sender)
    return related is not None and (related.get("patient") or {}).get("reference") == \
        (resource.get("subject") or {}).get("reference")


class Outbox:
    """Queues items from store writes; install() makes it a listener of the store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def install(self, store: FhirStore) -> Outbox:
        store.listeners.append(self.on_write)
        return self

    def on_write(self, action: str, result: WriteResult, repo: Repository) -> None:
        if repo.origin in EHR_ORIGINS or result.stored.deleted or not result.changed:
            return
        if result.stored.resource_type not in ("Appointment", "Task", "Communication"):
            return
        resource = result.stored.resource()
        kind = classify(action, resource, result.stored.version_id)
        if kind is None:
            return
        channel = self.settings.outbox_channel(kind)
        if channel not in ("hl7", "fhir"):
            return
        if kind == "appointment-cancel" and not _ehr_knows(repo, resource):
            return  # a request that never left, or an appointment the EHR never had
        if kind == "message" and not _proxy_of_subject(repo, resource):
            return  # a RelatedPerson of someone else: not a message of this patient's side
        enqueue(repo, self.settings, kind, channel, resource, result.stored.version_id)


def _ehr_knows(repo: Repository, appointment: dict[str, Any]) -> bool:
    if _identifier(appointment, "FILL") or any(str(i.get("system", "")).startswith(UPSTREAM_SYSTEM)
                                               for i in appointment.get("identifier") or []):
        return True
    return repo.conn.execute(select(OB.id).where(
        OB.kind == "appointment-request", OB.resource_type == "Appointment",
        OB.resource_id == appointment["id"])).first() is not None


def enqueue(repo: Repository, settings: Settings, kind: str, channel: str, resource: dict[str, Any],
            version_id: int) -> int | None:
    """Insert the item in the caller's transaction; None when this resource already has one of the kind."""
    rtype, rid = resource["resourceType"], resource["id"]
    if repo.conn.execute(select(OB.id).where(OB.kind == kind, OB.resource_type == rtype,
                                            OB.resource_id == rid)).first() is not None:
        return None
    key = "GW" + secrets.token_hex(9)  # 20 characters: MSH-10 is ST(20) before v2.7
    status, error, payload = "pending", None, ""
    try:
        payload = build_hl7(repo, settings, kind, resource, key) if channel == "hl7" else \
            jsonio.dumps({"resource": resource})
    except BuildError as exc:
        status, error = "failed", f"not built: {exc}"
        log.warning("outbox: %s for %s/%s cannot be built: %s", kind, rtype, rid, exc)
    return repo.conn.execute(insert(db.outbox).values(
        kind=kind, channel=channel, status=status, resource_type=rtype, resource_id=rid, version_id=version_id,
        patient_id=_patient_of(resource), idempotency_key=key, payload=payload, attempts=0,
        next_attempt_ms=_now_ms(), created_at=now_instant(), last_error=error,
    ).returning(OB.id)).scalar_one()


def _patient_of(resource: dict[str, Any]) -> str | None:
    candidates = [resource.get("subject"), resource.get("for"), resource.get("sender")]
    candidates += [p.get("actor") for p in resource.get("participant") or []]
    for ref in candidates:
        reference = (ref or {}).get("reference", "")
        if reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


# --- building HL7v2 ---

@functools.cache
def templates() -> dict[str, Any]:
    return yaml.safe_load(TEMPLATES_FILE.read_text(encoding="utf-8"))


def build_hl7(repo: Repository, settings: Settings, kind: str, resource: dict[str, Any], key: str) -> str:
    values = message_values(repo, settings, kind, resource, key)
    return render(kind, values)


def render(kind: str, values: dict[str, Any]) -> str:
    """ER7 from the kind's template and the values; validated by hl7apy (raises BuildError)."""
    template = templates()[kind]
    seps = ("|", "^", "~", "\\", "&")
    msh = "|".join(["MSH", "^~\\&", _esc(values["sending_app"]), _esc(values["sending_facility"]),
                    _esc(values["receiving_app"]), _esc(values["receiving_facility"]), values["now"], "",
                    template["message"], _esc(values["key"]), "P", values["version"]])
    segments = [msh]
    for entry in template["segments"]:
        (name, spec), = entry.items()
        if spec.get("when") and not values.get(spec["when"]):
            continue
        items = values.get(spec["each"]) or [] if spec.get("each") else [None]
        for n, item in enumerate(items, start=1):
            local = {**values, "n": str(n), "item": item}
            fields = {int(k): _EMPTY_SUBCOMPONENTS.sub("", _fill(str(v), local, seps))
                      for k, v in spec.items() if isinstance(k, int)}
            last = max((k for k, v in fields.items() if v), default=0)
            segments.append("|".join([name] + [fields.get(i, "") for i in range(1, last + 1)]))
    er7 = "\r".join(segments) + "\r"
    try:
        message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        message.validate()
    except Exception as exc:  # hl7apy raises many exception types for what it does not accept
        raise BuildError(f"hl7apy rejects the {template['message']}: {exc}") from None
    return er7


_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Trailing empty subcomponents a template leaves when optional parts are empty ("HOSP&&^MR" ->
# "HOSP^MR"). Values are escaped (\T\), so every "&" left in a field is the template's own.
_EMPTY_SUBCOMPONENTS = re.compile(r"&+(?=[\^~]|$)")


def _fill(template: str, values: dict[str, Any], seps: tuple[str, ...]) -> str:
    text = _PLACEHOLDER.sub(lambda m: _esc(values.get(m.group(1))), template)
    # components left empty at the end ("^^") say nothing
    return "~".join(rep.rstrip("^") for rep in text.split("~")).rstrip("~")


def _esc(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    for char, sequence in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, sequence)
    return text.replace("\r\n", "\n").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _dtm(value: str | None) -> str:
    """A FHIR date/dateTime/instant as an HL7 DTM (YYYYMMDD[HHMM[SS]][+ZZZZ])."""
    if not value:
        return ""
    match = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?(?:T(\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?"
                         r"(Z|[+-]\d{2}:\d{2})?)?", value)
    if not match:
        return ""
    year, month, day, hour, minute, second, zone = match.groups()
    text = year + (month or "") + (day or "")
    if hour:
        text += hour + minute + (second or "00")
        if zone:
            text += "+0000" if zone == "Z" else zone.replace(":", "")
    return text


def _identifier(resource: dict[str, Any], type_code: str) -> dict[str, Any] | None:
    for identifier in resource.get("identifier") or []:
        codes = {c.get("code") for c in (identifier.get("type") or {}).get("coding", [])}
        if type_code in codes and identifier.get("value"):
            return identifier
    return None


def _authority(identifier: dict[str, Any] | None) -> str:
    from gateway.upstream.sync import _authority as authority_of

    return (authority_of(identifier) or "") if identifier else ""


HD_NAMESPACE_MAX = 20  # HD.1 (IS) in v2.5.1


def _assigning_authority(identifier: dict[str, Any]) -> dict[str, str]:
    """CX-4 as HD parts: the namespace (HD.1, at most 20 characters: the authority's name only when
    it fits, never cut short) and, for an OID system, the universal id (HD.2) with type ISO (HD.3)."""
    namespace = _authority(identifier)
    system = str(identifier.get("system") or "")
    oid = system[len("urn:oid:"):] if system.startswith("urn:oid:") else ""
    if len(namespace) > HD_NAMESPACE_MAX or namespace == oid:
        namespace = ""
    return {"authority": namespace, "authority_uid": oid, "authority_uid_type": "ISO" if oid else ""}


def _system_name(system: str | None) -> str:
    """A code system URI as an HL7 coding system name (coding-systems.yaml read backwards)."""
    if not system:
        return ""
    table = mappings().tables.get("coding-systems")
    for name, uri in (table.entries.items() if table else []):
        if uri == system:
            return name
    return ""


def _coding(concept: dict[str, Any] | None) -> tuple[str, str, str]:
    concept = concept or {}
    coding = (concept.get("coding") or [{}])[0]
    return (str(coding.get("code") or ""), str(coding.get("display") or concept.get("text") or ""),
            _system_name(coding.get("system")))


def _read(repo: Repository, reference: str | None) -> dict[str, Any] | None:
    if not reference or "/" not in reference:
        return None
    rtype, rid = reference.split("/", 1)
    stored = repo.find(rtype, rid)
    return stored.resource() if stored else None


def _person(resource: dict[str, Any] | None) -> tuple[str, str]:
    name = ((resource or {}).get("name") or [{}])[0]
    return str(name.get("family") or ""), " ".join(name.get("given") or [])


def message_values(repo: Repository, settings: Settings, kind: str, resource: dict[str, Any],
                   key: str) -> dict[str, Any]:
    """The values the kind's template places, read from the resource and what it references."""
    values: dict[str, Any] = {
        "key": key, "now": _dtm(now_instant()), "version": settings.outbox_hl7_version,
        "sending_app": settings.outbox_sending_application, "sending_facility": settings.outbox_sending_facility,
        "receiving_app": settings.outbox_receiving_application,
        "receiving_facility": settings.outbox_receiving_facility,
    }
    patient_id = _patient_of(resource)
    patient = _read(repo, f"Patient/{patient_id}") if patient_id else None
    if patient is None:
        raise BuildError(f"{resource['resourceType']}/{resource['id']} names no Patient the store holds")
    mrn = _identifier(patient, "MR") or next((i for i in patient.get("identifier") or [] if i.get("value")), None)
    if mrn is None:
        raise BuildError(f"Patient/{patient_id} has no identifier to send as PID-3")
    family, given = _person(patient)
    values.update({f"patient_{k}": v for k, v in _assigning_authority(mrn).items()})
    values.update(patient_mrn=mrn["value"], patient_family=family,
                  patient_given=given, birth_date=_dtm(patient.get("birthDate")),
                  gender={"male": "M", "female": "F", "other": "O", "unknown": "U"}.get(patient.get("gender", ""), ""))
    if kind in ("appointment-request", "appointment-cancel"):
        filler = _identifier(resource, "FILL")
        code, text, system = _coding((resource.get("reasonCode") or [None])[0])
        values.update(appointment_id=resource["id"], start=_dtm(resource.get("start")), end=_dtm(resource.get("end")),
                      reason_code=code, reason_text=text, reason_system=system,
                      comment=resource.get("comment") or resource.get("description"),
                      filler_id=filler["value"] if filler else "", filler_authority=_authority(filler),
                      cancel_reason=_coding(resource.get("cancelationReason"))[1])
        service = _coding((resource.get("serviceType") or [None])[0])
        values.update(service_code=service[0] or service[1], service_text=service[1])
        for participant in resource.get("participant") or []:
            ref = (participant.get("actor") or {}).get("reference", "")
            if ref.startswith("Practitioner/"):
                practitioner = _read(repo, ref) or {}
                values["practitioner_family"], values["practitioner_given"] = _person(practitioner)
                npi = next((i for i in practitioner.get("identifier") or [] if i.get("value")), None)
                values["practitioner_id"] = npi["value"] if npi else ref.split("/", 1)[1]
                break
    elif kind == "refill-request":
        order = _read(repo, (resource.get("focus") or {}).get("reference"))
        if order is None or order.get("resourceType") != "MedicationRequest":
            raise BuildError(f"Task/{resource['id']}: focus is no MedicationRequest the store holds")
        placer, filler = _identifier(order, "PLAC"), _identifier(order, "FILL")
        code, text, system = _coding(order.get("medicationCodeableConcept"))
        if not (code or text):
            raise BuildError(f"MedicationRequest/{order['id']} has no medicationCodeableConcept (RXO-1)")
        dosage = (order.get("dosageInstruction") or [{}])[0]
        route = _coding(dosage.get("route"))
        if not (route[0] or route[1]):
            raise BuildError(f"MedicationRequest/{order['id']} has no dosageInstruction.route, which OMP^O09 "
                             "requires (RXR-1)")
        quantity = ((order.get("dispenseRequest") or {}).get("quantity") or {}).get("value")
        values.update(order_placer=placer["value"] if placer else order["id"],
                      order_placer_authority=_authority(placer) if placer else settings.outbox_sending_application,
                      order_filler=filler["value"] if filler else "", order_filler_authority=_authority(filler),
                      medication_code=code or text, medication_text=text, medication_system=system,
                      route_code=route[0] or route[1], route_text=route[1], quantity=quantity,
                      refill_note="; ".join(n.get("text", "") for n in resource.get("note") or []) or None)
    elif kind == "message":
        lines = [str(p["contentString"]) for p in resource.get("payload") or [] if p.get("contentString")]
        if not lines:
            raise BuildError(f"Communication/{resource['id']} has no text payload")
        topic = (resource.get("topic") or {}).get("text") or _coding(resource.get("topic"))[1]
        sender = (resource.get("sender") or {}).get("reference", "")
        if sender.startswith("RelatedPerson/"):
            related = _read(repo, sender) or {}
            family, given = _person(related)
            relation = next((c.get("display") or c.get("code") for concept in related.get("relationship") or []
                             for c in concept.get("coding") or [] if c.get("display") or c.get("code")), None)
            writer = " ".join(part for part in (given, family) if part) or \
                str((resource.get("sender") or {}).get("display") or sender)
            lines.insert(0, f"From: {writer}" + (f" ({relation})" if relation else "") + ", for the patient")
        values.update(message_lines=([f"Subject: {topic}"] if topic else []) + lines, topic=topic,
                      sent=_dtm(resource.get("sent")) or values["now"])
        for recipient in resource.get("recipient") or []:
            ref = recipient.get("reference", "")
            if ref.startswith("Practitioner/"):
                practitioner = _read(repo, ref) or {}
                values["recipient_family"], values["recipient_given"] = _person(practitioner)
                values["recipient_id"] = ref.split("/", 1)[1]
                break
    return values


# --- delivering ---

class Outcome:
    DELIVERED, FAILED, RETRY = "delivered", "failed", "retry"


@dataclass(frozen=True)
class Result:
    outcome: str
    detail: str = ""
    response: str | None = None


class MllpSender:
    """One persistent MLLP connection; reconnects after any failure."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._deframer = Deframer()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def exchange(self, message: bytes) -> bytes:
        """Send one message, return its ACK. OSError/TimeoutError/ConnectionError when it does not come."""
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._deframer = Deframer()
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(frame(message))
            deadline = time.monotonic() + self.timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no ACK within {self.timeout} s")
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the receiver closed the connection before acknowledging")
                frames = self._deframer.feed(chunk)
                if frames:
                    return frames[0]
        except BaseException:
            self.close()  # the stream is in an unknown state: never read a late ACK as the next one's
            raise


def check_ack(ack: bytes, key: str) -> Result:
    """AA (or CA) naming our MSH-10 delivers; AE/AR/CE/CR fail; anything else is retried."""
    text = ack.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
    try:
        message = hl7.parse(text)
        msa = message.segment("MSA")
    except Exception:
        return Result(Outcome.RETRY, "the answer is no readable ACK", text)
    code, control = str(msa(1)).strip(), str(msa(2)).strip()
    if control != key:
        return Result(Outcome.RETRY, f"ACK names MSH-10 {control!r}, expected {key!r}", text)
    if code in ("AA", "CA"):
        return Result(Outcome.DELIVERED, code, text)
    reason = str(msa(3)) if len(msa) > 3 else ""
    try:
        err = message.segment("ERR")
        reason = reason or (str(err(8)) if len(err) > 8 else "") or str(err(3))
    except KeyError:
        pass
    return Result(Outcome.FAILED, f"{code}: {reason}".strip().rstrip(":"), text)


_RECORD = update(db.outbox).where(
    OB.id == bindparam("o_id"), OB.attempts == bindparam("o_attempts"), OB.status == "pending",
).values(status=bindparam("status"), delivered_at=bindparam("delivered_at"), last_error=bindparam("last_error"),
         response=bindparam("response"), next_attempt_ms=bindparam("next_attempt_ms"), claimed_ms=None)


def _wake_channel(channel: str, now: int) -> Any:
    """Items of a channel waiting out a backoff become due now (and go in the order they were queued):
    a delivery just went through, so the destination is back."""
    return update(db.outbox).where(OB.status == "pending", OB.channel == channel, OB.claimed_ms.is_(None),
                                   OB.next_attempt_ms > now).values(next_attempt_ms=now)


class Worker:
    """Claims due items and delivers them; several may run against one database."""

    def __init__(self, store: FhirStore, settings: Settings, client: UpstreamClient | None = None,
                 audit: Any = None, name: str = "outbox") -> None:
        self.store = store
        self.settings = settings
        self.client = client
        self.audit = audit
        self.name = name
        self._mllp: MllpSender | None = None
        self.delivered = 0
        self.failed = 0
        self.retried = 0

    # claim -> deliver -> record

    def lease_ms(self) -> int:
        """Longer than one delivery can take (connect + send + ACK wait, or the HTTP timeouts and retries)."""
        slowest = max(self.settings.outbox_ack_timeout * 2, self.settings.upstream_timeout * 2) + 30
        return int(slowest * 1000)

    def claim(self, limit: int = CLAIM_BATCH) -> list[Item]:
        now = _now_ms()
        # not durable: a claim lost with the machine only means the item is claimed again
        with self.store.writing(durable=False) as repo:
            query = select(db.outbox).where(OB.status == "pending", OB.next_attempt_ms <= now) \
                .order_by(OB.next_attempt_ms, OB.id).limit(limit)
            if db.is_postgres(repo.conn):
                query = query.with_for_update(skip_locked=True)
            rows = repo.conn.execute(query).all()
            if not rows:
                return []
            repo.conn.execute(update(db.outbox).where(OB.id.in_([r.id for r in rows])).values(
                next_attempt_ms=now + self.lease_ms(), claimed_ms=now, attempts=OB.attempts + 1))
        return [Item(r.id, r.kind, r.channel, r.resource_type, r.resource_id, r.version_id, r.patient_id,
                     r.idempotency_key, r.payload, r.attempts + 1) for r in rows]

    def run_once(self, limit: int = CLAIM_BATCH) -> int:
        """Deliver what is due now; returns how many items were attempted."""
        items = self.claim(limit)
        batched: dict[int, Result] = {}
        creates = [i for i in items if i.channel == "fhir" and i.kind != "appointment-cancel"]
        size = max(self.settings.outbox_fhir_batch, 1)
        if self.client is not None and size > 1 and len(creates) > 1:
            for start in range(0, len(creates), size):
                batched.update(self._deliver_fhir_batch(creates[start:start + size]))
        if batched:
            self.record_many([(i, batched[i.id]) for i in items if i.id in batched])
        for item in items:
            if item.id not in batched:
                self.record(item, self.deliver(item))
        return len(items)

    def run(self, stop: threading.Event) -> None:
        log.info("outbox worker %s running", self.name)
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the worker must survive a database hiccup; it is logged and retried
                log.exception("outbox worker %s: a round failed", self.name)
                busy = 0
            if not busy:
                stop.wait(self.settings.outbox_poll_interval)
        if self._mllp is not None:
            self._mllp.close()

    def deliver(self, item: Item) -> Result:
        if item.kind == "appointment-cancel":
            request = self._request_status(item)
            if request == "pending":
                return Result(Outcome.RETRY, "waits for the appointment request to be delivered first")
            if request == "failed":
                return Result(Outcome.FAILED, "the appointment request it cancels was never delivered (failed)")
            if request == "cancelled":
                return Result(Outcome.FAILED, "the appointment request it cancels was cancelled in the outbox, "
                                              "so the EHR never had it")
        try:
            if item.channel == "hl7":
                return self._deliver_hl7(item)
            return self._deliver_fhir(item)
        except UpstreamError as exc:
            return Result(Outcome.RETRY if exc.transient else Outcome.FAILED, str(exc))
        except BuildError as exc:
            return Result(Outcome.FAILED, str(exc))

    def _request_status(self, item: Item) -> str | None:
        """The status of the outbox request a cancellation follows (None: the EHR made the appointment)."""
        with self.store.reading() as repo:
            return repo.conn.execute(select(OB.status).where(
                OB.kind == "appointment-request", OB.resource_type == item.resource_type,
                OB.resource_id == item.resource_id)).scalar()

    def _deliver_hl7(self, item: Item) -> Result:
        if not self.settings.outbox_mllp_port:
            return Result(Outcome.RETRY, "no MLLP destination configured (GATEWAY_OUTBOX_MLLP_PORT)")
        if self._mllp is None:
            self._mllp = MllpSender(self.settings.outbox_mllp_host, self.settings.outbox_mllp_port,
                                    self.settings.outbox_ack_timeout)
        try:
            ack = self._mllp.exchange(item.payload.encode("utf-8"))
        except (OSError, TimeoutError, ConnectionError) as exc:
            return Result(Outcome.RETRY, f"{type(exc).__name__}: {exc}")
        result = check_ack(ack, item.key)
        if result.outcome == Outcome.RETRY:
            self._mllp.close()  # out of step with the receiver: start a fresh connection
        return result

    # FHIR

    def _deliver_fhir(self, item: Item) -> Result:
        if self.client is None:
            return Result(Outcome.RETRY, "no upstream FHIR API configured (GATEWAY_UPSTREAM_FHIR_URL)")
        local = jsonio.loads(item.payload)["resource"]
        if item.kind == "appointment-cancel":
            return self._cancel_upstream(item, local)
        body = self._upstream_body(local, item.key)
        response = self.client.create(body, if_none_exist=f"identifier={OUTBOX_SYSTEM}|{item.key}")
        return Result(Outcome.DELIVERED, f"{response.status}", response.location)

    def _deliver_fhir_batch(self, items: list[Item]) -> dict[int, Result]:
        """Several creates in one Bundle, each entry with its own ifNoneExist, so that sending the
        group again never creates twice: the outcome of each entry is its item's. A refused Bundle
        (an upstream without batches, or a transaction one entry of which is rejected) sends its
        items one by one ({}), so only the bad one fails."""
        assert self.client is not None
        entries = []
        with self.store.reading() as repo:  # one read transaction for the references of the whole group
            bodies = [self._upstream_body(jsonio.loads(item.payload)["resource"], item.key, repo) for item in items]
        for item, body in zip(items, bodies, strict=True):
            entries.append({"resource": body, "request": {"method": "POST", "url": body["resourceType"],
                                                          "ifNoneExist": f"identifier={OUTBOX_SYSTEM}|{item.key}"}})
        try:
            response = self.client.bundle(entries, self.settings.outbox_fhir_bundle_type)
        except UpstreamError as exc:
            outcome = Outcome.RETRY if exc.transient else Outcome.FAILED
            return {item.id: Result(outcome, str(exc)) for item in items}
        answers = (response.body or {}).get("entry") if isinstance(response.body, dict) else None
        if response.status != 200 or not isinstance(answers, list) or len(answers) != len(items):
            log.info("outbox: the upstream answered a %s of %d with %s; sending them one by one",
                     self.settings.outbox_fhir_bundle_type, len(items), response.status)
            return {}
        results: dict[int, Result] = {}
        for item, answer in zip(items, answers, strict=True):
            reply = answer.get("response") or {}
            status = int(str(reply.get("status", "0")).split(" ", 1)[0] or 0)
            if status in (200, 201):
                results[item.id] = Result(Outcome.DELIVERED, str(status), reply.get("location"))
            else:
                detail = f"batch entry answered {reply.get('status')}"
                outcome = reply.get("outcome") or {}
                issues = "; ".join(str(i.get("diagnostics", "")) for i in outcome.get("issue") or [])
                results[item.id] = Result(Outcome.RETRY if status in (0, 429) or status >= 500 else Outcome.FAILED,
                                          f"{detail}: {issues}" if issues else detail)
        return results

    def _upstream_body(self, local: dict[str, Any], key: str, repo: Repository | None = None) -> dict[str, Any]:
        if repo is None:
            with self.store.reading() as reading:
                return self._upstream_body(local, key, reading)
        body = self._upstream_references(copy.deepcopy(local), repo)
        body.pop("id", None)
        body.pop("meta", None)
        body["identifier"] = [i for i in body.get("identifier") or []
                              if not str(i.get("system", "")).startswith(UPSTREAM_SYSTEM)]
        body["identifier"].append({"system": OUTBOX_SYSTEM, "value": key})
        return body

    def _upstream_references(self, value: Any, repo: Repository) -> Any:
        """Local references -> the upstream's ids (kept as identifiers by the sync); a resource the
        upstream does not know is referred to by its business identifier instead."""
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str) and re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", reference):
                target = _read(repo, reference)
                rtype = reference.split("/", 1)[0]
                upstream = next((i["value"] for i in (target or {}).get("identifier") or []
                                 if i.get("system") == UPSTREAM_SYSTEM + rtype), None)
                out = {k: v for k, v in value.items() if k != "reference"}
                if upstream:
                    out["reference"] = f"{rtype}/{upstream}"
                else:
                    business = next((i for i in (target or {}).get("identifier") or []
                                     if i.get("system") and i.get("value")
                                     and not str(i["system"]).startswith(UPSTREAM_SYSTEM)), None)
                    if business is not None:
                        out["identifier"] = {"system": business["system"], "value": business["value"]}
                    out["type"] = rtype
                    if not business and "display" not in out:
                        out["display"] = reference  # nothing the EHR can resolve: say what it was here
                return out
            return {k: self._upstream_references(v, repo) for k, v in value.items()}
        if isinstance(value, list):
            return [self._upstream_references(v, repo) for v in value]
        return value

    def _cancel_upstream(self, item: Item, local: dict[str, Any]) -> Result:
        assert self.client is not None
        upstream_id = next((i["value"] for i in local.get("identifier") or []
                            if i.get("system") == UPSTREAM_SYSTEM + "Appointment"), None)
        if upstream_id is None:
            with self.store.reading() as repo:
                request_key = repo.conn.execute(select(OB.idempotency_key).where(
                    OB.kind == "appointment-request", OB.resource_type == "Appointment",
                    OB.resource_id == item.resource_id)).scalar()
            found = list(self.client.search("Appointment", {"identifier": f"{OUTBOX_SYSTEM}|{request_key}"})) \
                if request_key else []
            if len(found) != 1:
                return Result(Outcome.FAILED, f"the upstream holds {len(found)} Appointments for this request")
            upstream = found[0]
        else:
            upstream = self.client.read("Appointment", upstream_id)
            if upstream is None:
                return Result(Outcome.FAILED, f"the upstream has no Appointment/{upstream_id}")
        if upstream.get("status") == "cancelled":
            return Result(Outcome.DELIVERED, "already cancelled upstream", f"Appointment/{upstream['id']}")
        upstream["status"] = "cancelled"
        if local.get("cancelationReason"):
            upstream["cancelationReason"] = local["cancelationReason"]
        response = self.client.update(upstream)
        return Result(Outcome.DELIVERED, f"{response.status}", f"Appointment/{upstream['id']}")

    # recording

    def record(self, item: Item, result: Result) -> None:
        self.record_many([(item, result)])

    def record_many(self, outcomes: list[tuple[Item, Result]]) -> None:
        """Write the outcomes in one transaction (an MLLP item's right after its ACK; a batch's together)."""
        rows = [self._outcome_row(item, result) for item, result in outcomes]
        with self.store.writing() as repo:
            # only while the claim is still ours (the attempt we made): a late worker records nothing
            repo.conn.execute(_RECORD, rows)
            # A delivery after an outage: the backlog on that channel need not wait out its backoff.
            now = _now_ms()
            for channel in {item.channel for (item, result) in outcomes if result.outcome == Outcome.DELIVERED}:
                repo.conn.execute(_wake_channel(channel, now))
        for (item, result), row in zip(outcomes, rows, strict=True):
            metrics.outbox_delivery(row["status"] if row["status"] != "pending" else "retry", item.kind, item.channel)
            if self.audit is not None and result.outcome == Outcome.DELIVERED:
                entities = (f"{item.resource_type}/{item.resource_id}",) + \
                    ((f"Patient/{item.patient_id}",) if item.patient_id else ())
                how = MESSAGE_TYPES[item.kind] if item.channel == "hl7" else "a FHIR write"
                self.audit.record("read", f"outbox worker {self.name}", client_id=f"outbox:{item.channel}",
                                  entities=entities,
                                  description=f"sent to the EHR as {how} (outbox item {item.id}, key {item.key})")

    def _outcome_row(self, item: Item, result: Result) -> dict[str, Any]:
        row: dict[str, Any] = {"o_id": item.id, "o_attempts": item.attempts, "status": "pending",
                               "delivered_at": None, "response": result.response, "next_attempt_ms": 0,
                               "last_error": None if result.outcome == Outcome.DELIVERED else result.detail}
        if result.outcome == Outcome.DELIVERED:
            row.update(status="delivered", delivered_at=now_instant())
            self.delivered += 1
        elif result.outcome == Outcome.FAILED or item.attempts >= self.settings.outbox_max_attempts:
            row["status"] = "failed"
            if result.outcome != Outcome.FAILED:
                row["last_error"] = f"gave up after {item.attempts} attempts: {result.detail}"
            self.failed += 1
        else:
            row["next_attempt_ms"] = _now_ms() + int(self.backoff(item.attempts) * 1000)
            self.retried += 1
        log.log(logging.INFO if result.outcome == Outcome.DELIVERED else logging.WARNING,
                "outbox item %s (%s via %s) attempt %d: %s %s", item.id, item.kind, item.channel, item.attempts,
                row["status"] if row["status"] != "pending" else "retry", result.detail)
        return row

    def backoff(self, attempts: int) -> float:
        return min(self.settings.outbox_backoff_base * (2 ** max(attempts - 1, 0)), self.settings.outbox_backoff_max)


# --- commands ---

def list_items(conn: Connection, status: str | None = None, limit: int = 50) -> list[Any]:
    query = select(OB.id, OB.kind, OB.channel, OB.status, OB.resource_type, OB.resource_id, OB.attempts,
                   OB.idempotency_key, OB.created_at, OB.delivered_at, OB.last_error)
    query = query.order_by(OB.id.desc()).limit(limit)
    if status:
        query = query.where(OB.status == status)
    return list(conn.execute(query).all())


@dataclass(frozen=True)
class Change:
    """What a retry or a cancel did to one item. outcome: queued (a failed item pending again, its
    attempts afresh), due (a pending item due now), cancelled (never sent from now on), delivered or
    was-cancelled (nothing to do), unbuildable (still cannot be built: detail says why)."""

    item_id: int
    outcome: str
    detail: str = ""


def retry_item(store: FhirStore, settings: Settings, item_id: int) -> Change:
    """Make a failed or pending item due now; an item never built is built from the current version.
    A pending item keeps its attempt count: one a worker is sending at this moment may then go a
    second time, which the receiver recognises (the same MSH-10, the same outbox identifier).
    KeyError: no such item; ValueError: its resource is gone."""
    with store.writing() as repo:
        row = repo.conn.execute(select(db.outbox).where(OB.id == item_id).with_for_update()).first() \
            if db.is_postgres(repo.conn) else repo.conn.execute(select(db.outbox).where(OB.id == item_id)).first()
        if row is None:
            raise KeyError(item_id)
        if row.status in ("delivered", "cancelled"):
            return Change(item_id, "delivered" if row.status == "delivered" else "was-cancelled")
        if row.status == "pending":
            repo.conn.execute(update(db.outbox).where(OB.id == item_id, OB.status == "pending")
                              .values(next_attempt_ms=_now_ms()))
            return Change(item_id, "due")
        values: dict[str, Any] = {"status": "pending", "next_attempt_ms": _now_ms(), "attempts": 0,
                                  "last_error": None}
        if not row.payload:
            stored = repo.find(row.resource_type, row.resource_id)
            if stored is None:
                raise ValueError(f"{row.resource_type}/{row.resource_id} no longer exists")
            resource = stored.resource()
            try:
                values["payload"] = build_hl7(repo, settings, row.kind, resource, row.idempotency_key) \
                    if row.channel == "hl7" else jsonio.dumps({"resource": resource})
            except BuildError as exc:
                repo.conn.execute(update(db.outbox).where(OB.id == item_id).values(last_error=f"not built: {exc}"))
                return Change(item_id, "unbuildable", str(exc))
        repo.conn.execute(update(db.outbox).where(OB.id == item_id).values(**values))
    return Change(item_id, "queued")


def retry(store: FhirStore, settings: Settings, item_id: int) -> str:
    """retry_item, said in a line (`gateway outbox retry`)."""
    change = retry_item(store, settings, item_id)
    return {"queued": "queued again", "due": "queued again", "delivered": "delivered already; nothing to do",
            "was-cancelled": "cancelled; it is not sent again"}.get(change.outcome,
                                                                    f"still cannot be built: {change.detail}")


def cancel_item(store: FhirStore, item_id: int) -> Change:
    """A pending or failed item becomes cancelled: no worker claims it again (claims take pending
    items only) and an outcome of a delivery under way is not recorded over it (records need pending).
    KeyError: no such item."""
    with store.writing() as repo:
        changed = repo.conn.execute(update(db.outbox).where(OB.id == item_id, OB.status.in_(("pending", "failed")))
                                    .values(status="cancelled")).rowcount
        if changed:
            return Change(item_id, "cancelled")
        status = repo.conn.execute(select(OB.status).where(OB.id == item_id)).scalar()
    if status is None:
        raise KeyError(item_id)
    return Change(item_id, "delivered" if status == "delivered" else "was-cancelled")


class WorkerThreads:
    """Outbox workers (and the periodic sync) on daemon threads; stop() ends them."""

    def __init__(self, services: Any, workers: int = 1, sync_interval: int = 0) -> None:
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.workers: list[Worker] = []
        settings = services.settings
        client = UpstreamClient.from_settings(settings) if settings.upstream_fhir_url else None
        for n in range(workers):
            worker = Worker(services.store, settings, client, services.audit, name=f"outbox-{n + 1}")
            self.workers.append(worker)
            self.threads.append(threading.Thread(target=worker.run, args=(self.stop_event,), name=worker.name,
                                                 daemon=True))
        if sync_interval and client is not None:
            self.threads.append(threading.Thread(target=self._sync_loop, args=(services, client, sync_interval),
                                                 name="upstream-sync", daemon=True))

    def _sync_loop(self, services: Any, client: UpstreamClient, interval: int) -> None:
        while not self.stop_event.wait(interval):
            try:
                periodic_sync(services, client, deadline=time.monotonic() + interval)
            except Exception:  # the loop must outlive one failed round; it is logged and tried next time
                log.exception("periodic sync failed")

    def start(self) -> WorkerThreads:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)


SYNC_LOCK = 0x6761746577617901  # pg advisory lock: one periodic sync at a time across processes


def periodic_sync(services: Any, client: UpstreamClient, deadline: float) -> list[Any] | None:
    """One round of the periodic sync; None when another process is running one (PostgreSQL)."""
    from gateway.upstream.sync import Synchronizer

    with services.engine.connect() as conn:
        postgres = db.is_postgres(conn)
        if postgres:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": SYNC_LOCK}).scalar()
            conn.commit()
            if not got:
                return None
        try:
            summaries = Synchronizer(services.store, client, services.audit).sync_linked(deadline=deadline)
            for summary in summaries:
                log.info("periodic sync: %s", summary.line())
            return summaries
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SYNC_LOCK})
                conn.commit()
