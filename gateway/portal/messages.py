"""Secure messages between a patient (or a proxy acting for them) and the care team.

Every message is a FHIR Communication in the patient's record. A thread is a first message (no
partOf) and the replies that point at it: `partOf` names the thread's first message and
`inResponseTo` the message answered. Communications from elsewhere - the clinic's notes for the
patient that the HL7 feed writes (NTE "patient instructions", MDM letters), or messages the EHR
sends - are threads of their own; without a sender they come from "your care team".

Who may be written to is derived from the record itself (CareTeam, Patient.generalPractitioner,
the practitioners of appointments, encounters and prescriptions), read through the same Record as
everything else, so a proxy who cannot see a confidential encounter does not learn of its
practitioner either. A message is unread for a login until that login opens its thread (per login,
gateway.portal.seen); what the patient's side wrote (the patient, or this login) is never unread.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine

from gateway.portal import seen
from gateway.portal.context import display_name
from gateway.portal.record import NotVisible, Record
from gateway.smart_auth.people import age_on

SUBJECT_MAX = 120
BODY_MAX = 5000
HIDDEN_STATUSES = frozenset({"preparation", "entered-in-error", "not-done"})
ONLINE_WRITTEN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
                              "code": "ONLINEWRIT", "display": "online written"}], "text": "online written"}
CARE_TEAM_TYPES = ("Practitioner", "PractitionerRole", "Organization", "CareTeam", "Device", "HealthcareService")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CONFIDENTIAL = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R",
                "display": "restricted"}


class NotACareTeamMember(Exception):
    """The chosen recipient is not one of the record's care team."""


@dataclass(frozen=True)
class Author:
    """Who writes: the login's fhirUser for this record (its Patient, or the RelatedPerson it acts as)."""

    reference: str
    name: str


@dataclass(frozen=True)
class Member:
    """One person of the care team who may be written to."""

    reference: str  # Practitioner/ID
    name: str
    role: str = ""


@dataclass(frozen=True)
class Document:
    reference: str  # DocumentReference/ID
    title: str
    content_type: str


@dataclass
class Message:
    id: str
    sender: str | None  # a name; None: the clinic (no sender recorded)
    sender_reference: str | None
    own: bool  # written by the patient's side (the patient, or this login)
    sent: str | None
    text: str
    documents: list[Document] = field(default_factory=list)
    unread: bool = False
    in_response_to: str | None = None

    @property
    def reference(self) -> str:
        return f"Communication/{self.id}"


@dataclass
class Thread:
    id: str  # the first message's id
    subject: str | None
    messages: list[Message]
    security: list[dict[str, Any]]
    recipients: list[dict[str, Any]]  # the first message's recipients (references)

    @property
    def unread(self) -> int:
        return sum(1 for m in self.messages if m.unread)

    @property
    def private(self) -> bool:
        """Labelled confidential (R or V): hidden from the proxies of a 12-17 year old."""
        return any(label.get("system") == CONFIDENTIAL["system"] and label.get("code") in ("R", "V")
                   for label in self.security)

    @property
    def last_activity(self) -> str | None:
        return self.messages[-1].sent if self.messages else None

    @property
    def participants(self) -> list[str | None]:
        names: list[str | None] = []
        for message in self.messages:
            if message.sender not in names:
                names.append(message.sender)
        return names


# --- reading ---

def _moment(value: Any) -> datetime:
    if not value:
        return _EPOCH
    text = str(value)
    try:
        if len(text) <= 10:
            text = (text + "-01-01"[len(text) - 4:] if len(text) < 10 else text) + "T00:00:00"
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _reference(value: Any) -> str | None:
    reference = (value or {}).get("reference") if isinstance(value, dict) else None
    return str(reference) if reference else None


def communications(record: Record) -> list[dict[str, Any]]:
    """Every message of the record this login may see (drafts and errors left out)."""
    found = record.search_all("Communication", [("subject", record.reference)])
    return [c for c in found.matches if c.get("status") not in HIDDEN_STATUSES]


def _root_of(resource: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    """The thread a message belongs to: its partOf, else the first of its inResponseTo chain."""
    current = resource
    for _ in range(100):  # a cycle in someone else's data ends the walk
        parent = next((r for r in (_reference(p) for p in current.get("partOf") or [])
                       if r and r.startswith("Communication/")), None)
        if parent is not None:
            pid = parent.split("/", 1)[1]
            return pid if pid in by_id or pid == current["id"] else current["id"]
        answered = next((r for r in (_reference(p) for p in current.get("inResponseTo") or [])
                         if r and r.startswith("Communication/")), None)
        if answered is None or answered.split("/", 1)[1] not in by_id:
            return str(current["id"])
        current = by_id[answered.split("/", 1)[1]]
    return str(current["id"])


class _Names:
    """Names of senders, from the reference's display or the resource (read once per page)."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.cache: dict[str, str | None] = {}

    def of(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return None
        if value.get("display"):
            return str(value["display"])
        reference = _reference(value)
        if reference is None:
            return None
        if reference not in self.cache:
            resource = self.record.read_reference(reference)
            name = display_name(resource) if resource and resource.get("resourceType") != "Organization" \
                else (resource or {}).get("name")
            self.cache[reference] = str(name) if name else None
        return self.cache[reference]


def _text_and_documents(record: Record, resource: dict[str, Any]) -> tuple[str, list[Document]]:
    lines: list[str] = []
    documents: list[Document] = []
    for payload in resource.get("payload") or []:
        if payload.get("contentString"):
            lines.append(str(payload["contentString"]))
        attachment = payload.get("contentAttachment")
        if isinstance(attachment, dict) and attachment.get("contentType", "").startswith("text/plain") \
                and attachment.get("data"):
            lines.append(_decoded(attachment["data"]))
        reference = _reference(payload.get("contentReference"))
        if reference and reference.startswith("DocumentReference/"):
            document = record.read_reference(reference)
            if document is None:
                continue
            first = ((document.get("content") or [{}])[0]).get("attachment") or {}
            if str(first.get("contentType", "")).startswith("text/plain") and first.get("data"):
                lines.append(_decoded(first["data"]))
                continue
            title = first.get("title") or document.get("description") or \
                ((document.get("type") or {}).get("text")) or reference
            documents.append(Document(reference, str(title), str(first.get("contentType") or "")))
    return "\n\n".join(line for line in lines if line), documents


def _decoded(data: str) -> str:
    try:
        return base64.b64decode(data).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _subject(resource: dict[str, Any], text: str) -> str | None:
    topic = resource.get("topic") or {}
    if topic.get("text"):
        return str(topic["text"])
    for coding in topic.get("coding") or []:
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding.get("code"))
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first_line:
        return None
    return first_line if len(first_line) <= 80 else first_line[:79].rstrip() + "\u2026"


def threads(record: Record, engine: Engine, user_id: int, own: set[str]) -> list[Thread]:
    """The record's threads, the most recently active first; `own` are the references whose
    messages are never unread (the patient, this login's fhirUser for the record)."""
    resources = communications(record)
    by_id = {str(r["id"]): r for r in resources}
    groups: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        groups.setdefault(_root_of(resource, by_id), []).append(resource)
    opened = seen.seen_of(engine, user_id, (f"Communication/{rid}" for rid in by_id))
    names = _Names(record)
    out = []
    for root_id, members in groups.items():
        members.sort(key=lambda r: (_moment(r.get("sent") or (r.get("meta") or {}).get("lastUpdated")),
                                    r.get("id") != root_id, str(r.get("id"))))
        messages = []
        for resource in members:
            text, documents = _text_and_documents(record, resource)
            sender = _reference(resource.get("sender"))
            mine = sender in own
            messages.append(Message(
                str(resource["id"]), names.of(resource.get("sender")), sender, mine,
                resource.get("sent") or (resource.get("meta") or {}).get("lastUpdated"), text, documents,
                unread=not mine and f"Communication/{resource['id']}" not in opened,
                in_response_to=next((r for r in (_reference(p) for p in resource.get("inResponseTo") or []) if r),
                                    None)))
        root = by_id.get(root_id) or members[0]
        root_text = next((m.text for m in messages if m.id == root_id), messages[0].text)
        out.append(Thread(root_id, _subject(root, root_text), messages,
                          list((root.get("meta") or {}).get("security") or []), list(root.get("recipient") or [])))
    out.sort(key=lambda t: _moment(t.last_activity), reverse=True)
    return out


def find_thread(all_threads: list[Thread], message_id: str) -> Thread:
    """The thread holding a message (its first message or a reply); NotVisible when none does."""
    for thread in all_threads:
        if any(m.id == message_id for m in thread.messages):
            return thread
    raise NotVisible(f"Communication/{message_id}")


def mark_read(engine: Engine, user_id: int, thread: Thread) -> None:
    seen.mark_seen(engine, user_id, (m.reference for m in thread.messages))


def unread_total(all_threads: list[Thread]) -> int:
    return sum(t.unread for t in all_threads)


def document_of(record: Record, thread: Thread, document_id: str) -> tuple[bytes, str, str]:
    """A document shared in the thread: bytes, content type and a file name."""
    reference = f"DocumentReference/{document_id}"
    if not any(d.reference == reference for m in thread.messages for d in m.documents):
        raise NotVisible(reference)
    document = record.read("DocumentReference", document_id)
    attachment = ((document.get("content") or [{}])[0]).get("attachment") or {}
    if not attachment.get("data"):
        raise NotVisible(reference)
    data = base64.b64decode(attachment["data"])
    content_type = str(attachment.get("contentType") or "application/octet-stream")
    title = "".join(ch for ch in str(attachment.get("title") or document_id) if ch.isalnum() or ch in "-_. ")
    return data, content_type, title.strip() or document_id


# --- the care team ---

def care_team(record: Record) -> list[Member]:
    """The practitioners this record names: CareTeam members, the general practitioner, and the
    practitioners of its appointments, encounters and prescriptions (the GP first)."""
    patient = record.read("Patient", record.patient_id)
    order: list[str] = []

    def add(value: Any) -> None:
        reference = _reference(value)
        if reference and reference.count("/") == 1 and reference not in order \
                and reference.split("/")[0] in ("Practitioner", "PractitionerRole"):
            order.append(reference)

    for gp in patient.get("generalPractitioner") or []:
        add(gp)
    for team in record.search_all("CareTeam", [("patient", record.reference), ("status", "active")]).matches:
        for participant in team.get("participant") or []:
            add(participant.get("member"))
    for appointment in record.search_all("Appointment", [("patient", record.reference)]).matches:
        for participant in appointment.get("participant") or []:
            add(participant.get("actor"))
    for encounter in record.search_all("Encounter", [("patient", record.reference)]).matches:
        for participant in encounter.get("participant") or []:
            add(participant.get("individual"))
    for prescription in record.search_all("MedicationRequest", [("patient", record.reference)]).matches:
        add(prescription.get("requester"))
    members: dict[str, Member] = {}
    roles: dict[str, str] = {}
    for reference in order:
        role: dict[str, Any] | None = None
        if reference.startswith("PractitionerRole/"):
            role = record.read_reference(reference)
            reference = _reference((role or {}).get("practitioner")) or ""
            if not reference.startswith("Practitioner/"):
                continue
        if reference in members:
            continue
        practitioner = record.read_reference(reference)
        if practitioner is None or practitioner.get("active") is False:
            continue
        if role is not None:
            roles[reference] = _role_text(role)
        members[reference] = Member(reference, display_name(practitioner) or reference)
    wanted = [ref.split("/", 1)[1] for ref in members if ref not in roles]
    if wanted:
        for role in record.search_all("PractitionerRole", [("practitioner", ",".join(wanted))]).matches:
            practitioner_ref = _reference(role.get("practitioner"))
            if practitioner_ref in members and practitioner_ref not in roles and role.get("active") is not False:
                roles[practitioner_ref] = _role_text(role)
    return [Member(m.reference, m.name, roles.get(m.reference, "")) for m in members.values()]


def _role_text(role: dict[str, Any]) -> str:
    for concept in [*(role.get("specialty") or []), *(role.get("code") or [])]:
        text = concept.get("text") or next((c.get("display") for c in concept.get("coding") or [] if c.get("display")),
                                           None)
        if text:
            return str(text)
    return ""


# --- writing ---

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _message(record: Record, author: Author, patient_name: str, recipient: dict[str, Any], topic: str,
             body: str) -> dict[str, Any]:
    return {
        "resourceType": "Communication", "status": "completed",
        "medium": [ONLINE_WRITTEN],
        "subject": {"reference": record.reference, "display": patient_name},
        "topic": {"text": topic},
        "sent": _now(),
        "sender": {"reference": author.reference, "display": author.name},
        "recipient": [recipient],
        "payload": [{"contentString": body}],
    }


def may_keep_private(patient: dict[str, Any], writing_for_self: bool, today: date | None = None) -> bool:
    """A 12-17 year old writing in their own record may keep a conversation from their proxies
    (labelled R: the access policy hides it from a teen's proxies; an adult's proxies see it anyway,
    so the choice is not offered to them)."""
    if not writing_for_self or not patient.get("birthDate"):
        return False
    try:
        born = date.fromisoformat(str(patient["birthDate"])[:10])
    except ValueError:
        return False
    return 12 <= age_on(born, today or date.today()) < 18


def start_thread(record: Record, author: Author, patient_name: str, recipient_reference: str, subject: str,
                 body: str, team: list[Member] | None = None, private: bool = False) -> dict[str, Any]:
    """A new thread to one member of the care team (NotACareTeamMember for anyone else); private:
    labelled confidential (the caller checks may_keep_private)."""
    team = care_team(record) if team is None else team
    member = next((m for m in team if m.reference == recipient_reference), None)
    if member is None:
        raise NotACareTeamMember(recipient_reference)
    resource = _message(record, author, patient_name, {"reference": member.reference, "display": member.name},
                        subject, body)
    if private:
        resource["meta"] = {"security": [CONFIDENTIAL]}
    return record.create(resource)


def reply(record: Record, author: Author, patient_name: str, thread: Thread, body: str,
          answering: str | None = None, fallback_recipient: str | None = None) -> dict[str, Any]:
    """A reply in the thread: partOf its first message, inResponseTo the message answered (by
    default the latest from the care team), to that message's sender; confidentiality labels of
    the thread carry over, so a teen's private conversation stays private."""
    answered = next((m for m in thread.messages if m.id == answering), None) if answering else None
    if answered is None:
        answered = next((m for m in reversed(thread.messages) if not m.own), thread.messages[-1])
    recipient: dict[str, Any] | None = None
    candidates: list[tuple[str | None, str | None]] = [(answered.sender_reference, answered.sender)]
    candidates += [(m.sender_reference, m.sender) for m in reversed(thread.messages) if not m.own]
    candidates += [(_reference(r), r.get("display")) for r in thread.recipients]
    for reference, name in candidates:
        if reference and reference.split("/")[0] in CARE_TEAM_TYPES:
            recipient = {"reference": reference, **({"display": name} if name else {})}
            break
    if recipient is None and fallback_recipient:
        recipient = {"reference": fallback_recipient}
    topic = thread.subject or ""
    resource = _message(record, author, patient_name, recipient or {}, topic if topic.lower().startswith("re:")
                        else f"Re: {topic}".strip(), body)
    if not resource["recipient"][0]:
        del resource["recipient"]
    resource["partOf"] = [{"reference": f"Communication/{thread.id}"}]
    resource["inResponseTo"] = [{"reference": answered.reference}]
    if thread.security:
        resource["meta"] = {"security": thread.security}
    return record.create(resource)
