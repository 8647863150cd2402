"""Medications: the record's prescriptions (MedicationRequest), active and past, and refill requests.

A refill request is a Task (code `fulfill`, focus the MedicationRequest, status requested) created
through the visit's Record; the outbox (gateway/upstream/outbox.py) recognises it in the same
transaction and sends it to the EHR as OMP^O09 when GATEWAY_OUTBOX_REFILL_REQUEST says so. The
prescription itself is never changed by the portal.

Refills left: dispenseRequest.numberOfRepeatsAllowed less the refills already had: the pharmacy's
dispenses after the first (MedicationDispense.authorizingPrescription) when the record has them,
else the refill requests the care team has completed. The expected end of the supply: the last
dispense plus its daysSupply when there is one, else the start of the last fill (validityPeriod.start
or authoredOn, or the last completed refill) plus expectedSupplyDuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.portal.record import NotVisible, Record
from gateway.portal.results import concept_text

TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"
ACTIVE = ("active", "on-hold")
HIDDEN = ("entered-in-error", "draft")
OPEN_TASK = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")
DUE_DAYS = 14
NOTE_MAX = 500
UNIT_DAYS = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30,
             "a": 365, "year": 365, "years": 365, "h": 1 / 24}


class RefillRefused(Exception):
    """A refill request that cannot be made; the message is shown to the person."""

    def __init__(self, reason: str, message: Any) -> None:
        super().__init__(str(message))
        self.reason = reason  # inactive | expired | no-refills | already-requested
        self.message = message


@dataclass
class Refill:
    id: str
    status: str
    business_status: str
    authored: str
    note: str

    @property
    def open(self) -> bool:
        return self.status in OPEN_TASK


@dataclass
class Prescription:
    id: str
    name: str
    status: str
    instructions: str
    prescriber: str
    prescriber_reference: str
    authored: str
    valid_from: str
    valid_until: str
    refills_allowed: int | None
    supply_days: float | None
    refills: list[Refill] = field(default_factory=list)
    security: list[dict[str, Any]] = field(default_factory=list)
    dispenses: list[tuple[str, float | None]] = field(default_factory=list)  # (handed over, days supply)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def refills_left(self) -> int | None:
        if self.refills_allowed is None:
            return None
        used = len(self.dispenses) - 1 if self.dispenses else sum(1 for r in self.refills if r.status == "completed")
        return max(self.refills_allowed - used, 0)

    @property
    def open_request(self) -> Refill | None:
        return next((r for r in self.refills if r.open), None)

    @property
    def expired(self) -> bool:
        return bool(self.valid_until) and self.valid_until[:10] < date.today().isoformat()

    @property
    def can_request(self) -> bool:
        return self.active and not self.expired and self.open_request is None and self.refills_left != 0

    def supply_ends(self) -> date | None:
        handed = [(d, days) for d, days in ((_day(w), days) for w, days in self.dispenses) if d is not None]
        if handed:
            last, days = max(handed, key=lambda item: item[0])
            if days is not None or self.supply_days is not None:
                return last + timedelta(days=days if days is not None else self.supply_days or 0)
        if self.supply_days is None:
            return None
        start = _day(self.valid_from) or _day(self.authored)
        done = [_day(r.authored) for r in self.refills if r.status == "completed"]
        starts = [d for d in (start, *done) if d is not None]
        if not starts:
            return None
        return max(starts) + timedelta(days=self.supply_days)


def _day(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value[:10]) if value else None
    except ValueError:
        return None


def _instructions(request: dict[str, Any]) -> str:
    parts = []
    for dosage in request.get("dosageInstruction") or []:
        if dosage.get("text"):
            parts.append(str(dosage["text"]))
            continue
        bits = []
        for rate in dosage.get("doseAndRate") or []:
            dose = rate.get("doseQuantity") or {}
            if dose.get("value") is not None:
                bits.append(f"{dose['value']} {dose.get('unit') or ''}".strip())
        repeat = (dosage.get("timing") or {}).get("repeat") or {}
        if repeat.get("frequency") and repeat.get("periodUnit"):
            bits.append(f"{repeat['frequency']}x / {repeat.get('period', 1)} {repeat['periodUnit']}")
        if dosage.get("route"):
            bits.append(concept_text(dosage["route"]))
        if bits:
            parts.append(", ".join(bits))
    return " ".join(parts)


def _supply_days(request: dict[str, Any]) -> float | None:
    duration = (request.get("dispenseRequest") or {}).get("expectedSupplyDuration") or {}
    unit = str(duration.get("code") or duration.get("unit") or "").lower()
    try:
        value = float(duration["value"])
    except (KeyError, TypeError, ValueError):
        return None
    return value * UNIT_DAYS[unit] if unit in UNIT_DAYS else None


def _name(record: Record, request: dict[str, Any]) -> str:
    if request.get("medicationCodeableConcept"):
        return concept_text(request["medicationCodeableConcept"])
    reference = request.get("medicationReference") or {}
    medication = record.read_reference(reference.get("reference"))
    return concept_text((medication or {}).get("code")) or str(reference.get("display") or "")


def prescription_of(record: Record, request: dict[str, Any], refills: list[Refill] | None = None,
                    dispenses: list[tuple[str, float | None]] | None = None) -> Prescription:
    dispense = request.get("dispenseRequest") or {}
    validity = dispense.get("validityPeriod") or {}
    requester = request.get("requester") or {}
    prescriber = str(requester.get("display") or "")
    if not prescriber and requester.get("reference"):
        from gateway.portal.context import display_name

        prescriber = display_name(record.read_reference(requester["reference"]) or {})
    allowed = dispense.get("numberOfRepeatsAllowed")
    return Prescription(request["id"], _name(record, request), str(request.get("status") or ""),
                        _instructions(request), prescriber, str(requester.get("reference") or ""),
                        str(request.get("authoredOn") or ""), str(validity.get("start") or ""),
                        str(validity.get("end") or ""), int(allowed) if isinstance(allowed, int) else None,
                        _supply_days(request), refills or [],
                        list((request.get("meta") or {}).get("security") or []), dispenses or [])


def refill_of(task: dict[str, Any]) -> Refill:
    return Refill(task["id"], str(task.get("status") or ""), concept_text(task.get("businessStatus")),
                  str(task.get("authoredOn") or ""),
                  "; ".join(str(n.get("text") or "") for n in task.get("note") or []))


def _refills_by_order(record: Record) -> dict[str, list[Refill]]:
    """The record's refill requests by the prescription they are for, newest first. Task is outside
    the patient compartment in R4, so only Tasks whose focus is a prescription this login can see
    are ever shown (the caller matches them against the visible prescriptions)."""
    found = record.search_all("Task", [("patient", record.reference), ("code", f"{TASK_CODES}|fulfill"),
                                       ("_sort", "-authored-on")], limit=1000)
    out: dict[str, list[Refill]] = {}
    for task in found.matches:
        focus = str((task.get("focus") or {}).get("reference") or "")
        if focus.startswith("MedicationRequest/"):
            out.setdefault(focus.split("/", 1)[1], []).append(refill_of(task))
    return out


def _dispenses_by_order(record: Record) -> dict[str, list[tuple[str, float | None]]]:
    found = record.search_all("MedicationDispense", [("patient", record.reference), ("status", "completed")],
                              limit=1000)
    out: dict[str, list[tuple[str, float | None]]] = {}
    for dispense in found.matches:
        handed = str(dispense.get("whenHandedOver") or dispense.get("whenPrepared") or "")
        days = dispense.get("daysSupply") or {}
        unit = str(days.get("code") or days.get("unit") or "d").lower()
        try:
            supply: float | None = float(days["value"]) * UNIT_DAYS.get(unit, 1)
        except (KeyError, TypeError, ValueError):
            supply = None
        for prescription in dispense.get("authorizingPrescription") or []:
            reference = str(prescription.get("reference") or "")
            if reference.startswith("MedicationRequest/") and handed:
                out.setdefault(reference.split("/", 1)[1], []).append((handed, supply))
    return out


def prescriptions(record: Record) -> tuple[list[Prescription], list[Prescription]]:
    """(active, past), newest first."""
    found = record.search_all("MedicationRequest", [("patient", record.reference), ("_sort", "-authoredon")],
                              limit=1000)
    refills = _refills_by_order(record)
    dispenses = _dispenses_by_order(record)
    active, past = [], []
    for request in found.matches:
        if request.get("status") in HIDDEN or request.get("intent") not in (None, "order", "original-order",
                                                                              "reflex-order", "filler-order",
                                                                              "instance-order", "plan"):
            continue
        prescription = prescription_of(record, request, refills.get(request["id"], []),
                                       dispenses.get(request["id"], []))
        (active if prescription.active else past).append(prescription)
    return active, past


def refills_due(record: Record, today: date | None = None) -> list[tuple[Prescription, date]]:
    """Active prescriptions with refills left whose supply ends within DUE_DAYS days (or has ended)."""
    today = today or date.today()
    due = []
    for prescription in prescriptions(record)[0]:
        ends = prescription.supply_ends()
        if ends is None or prescription.expired or prescription.refills_left == 0:
            continue
        if ends <= today + timedelta(days=DUE_DAYS):
            due.append((prescription, ends))
    return sorted(due, key=lambda item: item[1])


def one(record: Record, request_id: str) -> Prescription:
    request = record.read("MedicationRequest", request_id)
    if request.get("status") in HIDDEN:
        raise NotVisible(f"MedicationRequest/{request_id}")
    return prescription_of(record, request, _refills_by_order(record).get(request_id, []),
                           _dispenses_by_order(record).get(request_id, []))


def request_refill(record: Record, requester: str, request_id: str, note: str = "",
                   messages: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create the refill Task; RefillRefused for an inactive or expired prescription, one without
    refills left, or one with a request still open. NotVisible for one this record does not hold."""
    messages = messages or {}
    prescription = one(record, request_id)  # NotVisible: another patient's, or hidden from this login
    if not prescription.active:
        raise RefillRefused("inactive", messages.get("inactive", "This prescription is not active."))
    if prescription.expired:
        raise RefillRefused("expired", messages.get("expired", "This prescription has expired."))
    if prescription.refills_left == 0:
        raise RefillRefused("no-refills", messages.get("no-refills", "No refills are left."))
    if prescription.open_request is not None:
        raise RefillRefused("already-requested", messages.get("already-requested", "A refill is already requested."))
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODES, "code": "fulfill", "display": "Fulfill the focal request"}],
                 "text": "Refill request"},
        "focus": {"reference": f"MedicationRequest/{request_id}", "display": prescription.name},
        "for": {"reference": record.reference},
        "authoredOn": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requester": {"reference": requester},
        "description": f"Refill request: {prescription.name}",
    }
    if prescription.security:  # a confidential prescription's request is as confidential
        task["meta"] = {"security": prescription.security}
    if prescription.prescriber_reference.split("/", 1)[0] in ("Practitioner", "PractitionerRole", "Organization"):
        task["owner"] = {"reference": prescription.prescriber_reference, "display": prescription.prescriber}
    if note.strip():
        task["note"] = [{"authorReference": {"reference": requester}, "text": note.strip()}]
    created = record.create(task, if_none_exist=f"focus=MedicationRequest/{request_id}&status=requested")
    if created.get("authoredOn") != task["authoredOn"] or (created.get("requester") or {}) != task["requester"]:
        # a request made at the same moment (a double click) won: this one was not created
        raise RefillRefused("already-requested", messages.get("already-requested", "A refill is already requested."))
    return created
