"""Requests to staff: a copy of the medical record, or a correction to the chart.

Each becomes a FHIR Task in the patient's record for the clinic's staff: status requested, intent
order, `for` the patient, `requester` the login's fhirUser (its Patient, or the RelatedPerson a proxy
acts as), `owner` the clinic's Organization, `code` from the gateway's own small code system
(STAFF_REQUEST below, listed in the README), a `description` staff can read at a glance and one
`input` per detail of the form, typed by a code of the same system. Staff move the Task on
(accepted, in-progress, completed, rejected) and the patient sees its status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from gateway.portal.record import Record

STAFF_REQUEST = "urn:fhir-gateway:staff-request"
RECORDS_COPY = "records-copy"
CHART_CORRECTION = "chart-correction"
KINDS = {RECORDS_COPY: "Copy of medical records", CHART_CORRECTION: "Correction to the chart"}
# the parts of the record one may ask a copy of, and how a copy may be delivered
RECORD_PARTS = ("whole-record", "visit-notes", "test-results", "medications", "immunizations", "imaging",
                "billing")
DELIVERIES = ("portal", "mail", "email")
CHART_SECTIONS = ("demographics", "allergies", "medications", "problems", "test-results", "visit-notes",
                  "immunizations", "other")
TEXT_MAX = 2000


@dataclass(frozen=True)
class Requester:
    reference: str
    name: str


@dataclass
class StaffRequest:
    id: str
    kind: str  # RECORDS_COPY or CHART_CORRECTION
    status: str
    authored: str | None
    requester: str | None
    details: list[tuple[str, str]] = field(default_factory=list)  # (input code, value)
    staff_note: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _input(code: str, value: Any) -> dict[str, Any]:
    concept = {"coding": [{"system": STAFF_REQUEST, "code": code}], "text": code}
    if isinstance(value, date):
        return {"type": concept, "valueDate": value.isoformat()}
    if code in ("delivery", "part", "chart-section"):
        return {"type": concept, "valueCode": value}
    return {"type": concept, "valueString": value}


def _task(record: Record, requester: Requester, organization: str, kind: str, description: str,
          inputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine",
        "code": {"coding": [{"system": STAFF_REQUEST, "code": kind, "display": KINDS[kind]}], "text": KINDS[kind]},
        "description": description,
        "for": {"reference": record.reference},
        "authoredOn": _now(), "lastModified": _now(),
        "requester": {"reference": requester.reference, "display": requester.name},
        "owner": {"reference": f"Organization/{organization}"},
        "input": inputs,
    }


def request_records_copy(record: Record, requester: Requester, organization: str, parts: list[str],
                         start: date | None, end: date | None, delivery: str, address: str | None = None,
                         email: str | None = None, note: str | None = None) -> dict[str, Any]:
    """A Task asking staff for a copy of these parts of the record, for the dates, delivered so."""
    if not parts or any(p not in RECORD_PARTS for p in parts) or delivery not in DELIVERIES:
        raise ValueError("unknown part or delivery")
    if start and end and start > end:
        raise ValueError("the period ends before it starts")
    inputs = [_input("part", p) for p in parts]
    if start:
        inputs.append(_input("period-start", start))
    if end:
        inputs.append(_input("period-end", end))
    inputs.append(_input("delivery", delivery))
    if delivery == "mail" and address:
        inputs.append(_input("mail-address", address))
    if delivery == "email" and email:
        inputs.append(_input("email-address", email))
    if note:
        inputs.append(_input("note", note))
    period = f"{start.isoformat() if start else 'the beginning'} to {end.isoformat() if end else 'today'}"
    description = (f"Copy of medical records requested by {requester.name}: {', '.join(parts)}; {period}; "
                   f"deliver by {delivery}" + (f" to {email}" if delivery == "email" and email else "") + ".")
    return record.create(_task(record, requester, organization, RECORDS_COPY, description, inputs))


def request_correction(record: Record, requester: Requester, organization: str, section: str, wrong: str,
                       should_say: str) -> dict[str, Any]:
    """A Task asking staff to correct the chart: where, what is wrong, what it should say."""
    if section not in CHART_SECTIONS:
        raise ValueError("unknown chart section")
    inputs = [_input("chart-section", section), _input("what-is-wrong", wrong), _input("should-say", should_say)]
    description = f"Correction to the chart ({section}) requested by {requester.name}: {wrong}"
    if len(description) > 300:
        description = description[:299] + "\u2026"
    return record.create(_task(record, requester, organization, CHART_CORRECTION, description, inputs))


def requests_of(record: Record) -> list[StaffRequest]:
    """The record's requests to staff (this code system only), the newest first."""
    found = record.search_all("Task", [("patient", record.reference), ("code", f"{STAFF_REQUEST}|")])
    out = []
    for task in found.matches:
        kind = next((c.get("code") for c in (task.get("code") or {}).get("coding", [])
                     if c.get("system") == STAFF_REQUEST and c.get("code") in KINDS), None)
        if kind is None:
            continue
        details = []
        for item in task.get("input") or []:
            code = next((c.get("code") for c in (item.get("type") or {}).get("coding", [])
                         if c.get("system") == STAFF_REQUEST), None)
            value = item.get("valueString") or item.get("valueCode") or item.get("valueDate")
            if code and value:
                details.append((str(code), str(value)))
        notes = [n.get("text") for n in task.get("note") or [] if n.get("text")]
        reason = (task.get("statusReason") or {}).get("text")
        out.append(StaffRequest(str(task["id"]), kind, str(task.get("status") or ""), task.get("authoredOn"),
                                (task.get("requester") or {}).get("display"), details,
                                "\n".join([*([reason] if reason else []), *notes]) or None))
    out.sort(key=lambda r: r.authored or "", reverse=True)
    return out
