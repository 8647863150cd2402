"""Appointments: the record's visits, booking from open Slots (find, hold, book in the Argonaut
Scheduling style), cancel and reschedule, and the waitlist for an earlier time.

Everything is a FHIR resource written through a `Record`:
- a hold is an Appointment created `pending` (the outbox sends it to the EHR as SRM^S01) and its
  Slot set `busy-tentative` until the hold ends (extension slot-hold-until); booking sets the
  Appointment `booked` and the Slot `busy`; an abandoned hold is cancelled by the sweep and its
  Slot is free again (a cancellation of a request the EHR was sent goes out as SRM^S04);
- a waitlist entry is an Appointment `waitlist` with requestedPeriod (now to the start of the
  appointment it would replace, named in supportingInformation) and the same practitioner and
  location; an offer is the freed Slot held `busy-tentative` for it, named on the entry by the
  extension appointment-waitlist-offer (slot + until).

Two people racing for one Slot: every Slot change is an update with the version that was read
(If-Match), so the loser gets a 412 and is told the time was just taken. Holds and offers follow one
order, the Appointment (or waitlist entry) first and its Slot second, on both the patient's side and
the sweep's, so a booking and an expiry of the same hold can never both succeed.

Schedules lie in the patient compartment (Schedule.actor) and a portal login may not read one with
no patient in it; the clinic's catalogue (Schedules) and the waitlist across patients are read and
written through a Record with the gateway's own principal (`clinic_record`), never shown as a
whole to a patient.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway import access
from gateway.fhir.outcome import FhirError
from gateway.portal.record import NotVisible, Record

log = logging.getLogger(__name__)

SITE = "https://riverside.example.org/fhir/StructureDefinition"
EXT_VIDEO_URL = f"{SITE}/appointment-video-url"
EXT_HOLD_UNTIL = f"{SITE}/slot-hold-until"  # Slot: valueDateTime, the end of a hold or an offer
EXT_HOLD_KIND = f"{SITE}/slot-hold-kind"  # Slot: valueCode hold | offer
EXT_OFFER = f"{SITE}/appointment-waitlist-offer"  # waitlist Appointment: slot (valueReference), until
EXT_DECLINED = f"{SITE}/appointment-waitlist-declined"  # waitlist Appointment: Slots offered and not taken
CANCEL_REASONS = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
PORTAL_REASONS = "https://riverside.example.org/fhir/CodeSystem/portal-cancellation"
ACTIVE = ("proposed", "pending", "booked", "arrived", "checked-in")
ENDED = ("fulfilled", "cancelled", "noshow", "entered-in-error")


# --- errors the pages turn into messages ---

class AppointmentError(Exception):
    """Something the person asked for that cannot be done; `code` names which."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


# codes: no-slot, slot-gone, slot-past, slot-taken, too-late, not-active, hold-expired,
# already-waitlisted, offer-gone, bad-range, not-yours


# --- settings ---

@dataclass(frozen=True)
class Timing:
    hold: timedelta = timedelta(minutes=10)
    offer: timedelta = timedelta(hours=2)
    cutoff: timedelta = timedelta(hours=2)  # cancel or reschedule only this long before the start

    @classmethod
    def of(cls, settings: Any) -> Timing:
        return cls(timedelta(minutes=getattr(settings, "portal_hold_minutes", 10)),
                   timedelta(minutes=getattr(settings, "portal_offer_minutes", 120)),
                   timedelta(minutes=getattr(settings, "portal_change_cutoff_minutes", 120)))


def utcnow() -> datetime:
    return datetime.now(UTC)


def instant(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_ms(moment: datetime) -> str:
    """To the millisecond, as the store's lastUpdated: for instants compared with a Slot's change."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clinic_record(services: Any) -> Record:
    """The gateway's own view, for the clinic's catalogue and the waitlist across patients."""
    return Record(services, access.SYSTEM, "", None)


def _ext(resource: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension") or [] if e.get("url") == url]


def _without(resource: dict[str, Any], *urls: str) -> dict[str, Any]:
    out = dict(resource)
    rest = [e for e in resource.get("extension") or [] if e.get("url") not in urls]
    if rest:
        out["extension"] = rest
    else:
        out.pop("extension", None)
    return out


def _version(resource: dict[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("versionId") or "")


def _text(concept: Any) -> str:
    if isinstance(concept, list):
        concept = concept[0] if concept else None
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display"):
            return str(coding["display"])
    return ""


def _actor(resource: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    for item in resource.get("participant") or []:
        actor = item.get("actor") or {}
        if str(actor.get("reference", "")).startswith(prefix):
            return dict(actor)
    for actor in resource.get("actor") or []:  # a Schedule
        if str(actor.get("reference", "")).startswith(prefix):
            return dict(actor)
    return None


# --- what the pages show ---

@dataclass
class Appointment:
    id: str
    status: str
    start: datetime | None
    end: datetime | None
    practitioner: str
    practitioner_ref: str | None
    location: str
    location_ref: str | None
    address: str
    kind: str  # the type of visit (serviceType, else appointmentType)
    reason: str
    description: str
    instructions: str
    video_url: str | None
    cancel_reason: str
    slot_id: str | None
    can_change: bool = False  # cancel / reschedule / waitlist allowed now
    waitlist_id: str | None = None  # an open waitlist entry for an earlier time
    resource: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def upcoming(self) -> bool:
        return self.status in ACTIVE and self.start is not None and self.start > utcnow()


@dataclass
class Slot:
    id: str
    start: datetime
    end: datetime | None
    schedule_id: str


@dataclass
class ScheduleChoice:
    id: str
    label: str  # "Family Medicine office visit with Dr. Emily Carter, MD"
    kind: str
    practitioner: str
    practitioner_ref: str | None
    location: str
    location_ref: str | None


@dataclass
class WaitlistEntry:
    id: str
    replaces: str | None  # Appointment id
    until: datetime | None  # requestedPeriod.end
    practitioner: str


@dataclass
class Offer:
    waitlist_id: str
    patient_id: str
    slot_id: str
    start: datetime
    end: datetime | None
    expires: datetime
    replaces: str | None
    practitioner: str


def to_view(resource: dict[str, Any], timing: Timing | None = None, now: datetime | None = None) -> Appointment:
    practitioner = _actor(resource, "Practitioner/") or {}
    location = _actor(resource, "Location/") or {}
    video = next((e.get("valueUrl") for e in _ext(resource, EXT_VIDEO_URL) if e.get("valueUrl")), None)
    slot_ref = ((resource.get("slot") or [{}])[0]).get("reference", "")
    view = Appointment(
        id=resource["id"], status=str(resource.get("status") or ""), start=instant(resource.get("start")),
        end=instant(resource.get("end")), practitioner=str(practitioner.get("display") or ""),
        practitioner_ref=practitioner.get("reference"), location=str(location.get("display") or ""),
        location_ref=location.get("reference"), address="",
        kind=_text(resource.get("serviceType")) or _text(resource.get("appointmentType")),
        reason=_text(resource.get("reasonCode")), description=str(resource.get("description") or ""),
        instructions=str(resource.get("patientInstruction") or ""), video_url=video,
        cancel_reason=_text(resource.get("cancelationReason")),
        slot_id=slot_ref.split("/", 1)[1] if slot_ref.startswith("Slot/") else None, resource=resource)
    view.can_change = may_change(view, timing or Timing(), now)
    return view


def may_change(view: Appointment, timing: Timing, now: datetime | None = None) -> bool:
    """Cancel, reschedule or ask for an earlier time: only an active appointment that starts at
    least `timing.cutoff` from now (closer than that, the office must be called)."""
    now = now or utcnow()
    return view.status in ("pending", "booked") and view.start is not None and view.start - now >= timing.cutoff


def _hidden_from_lists(resource: dict[str, Any]) -> bool:
    """An abandoned hold: never a visit, so not listed."""
    codes = {c.get("code") for c in (resource.get("cancelationReason") or {}).get("coding") or []}
    return resource.get("status") == "cancelled" and "hold-expired" in codes


def record_appointments(record: Record, timing: Timing, now: datetime | None = None
                        ) -> tuple[list[Appointment], list[Appointment], list[WaitlistEntry]]:
    """(upcoming soonest first, past most recent first, open waitlist entries) of the record."""
    now = now or utcnow()
    found = record.search_all("Appointment", [("patient", record.reference)])
    upcoming, past, waitlist = [], [], []
    waiting: dict[str, str] = {}
    for resource in found.matches:
        if resource.get("status") == "waitlist":
            entry = waitlist_entry(resource)
            waitlist.append(entry)
            if entry.replaces:
                waiting[entry.replaces] = entry.id
            continue
        if resource.get("status") == "entered-in-error" or _hidden_from_lists(resource):
            continue
        view = to_view(resource, timing, now)
        if view.status in ACTIVE and view.start is not None and view.start > now:
            upcoming.append(view)
        else:
            past.append(view)
    for view in upcoming:
        view.waitlist_id = waiting.get(view.id)
    far = datetime.max.replace(tzinfo=UTC)
    upcoming.sort(key=lambda v: v.start or far)
    past.sort(key=lambda v: v.start or datetime.min.replace(tzinfo=UTC), reverse=True)
    return upcoming, past, waitlist


def waitlist_entry(resource: dict[str, Any]) -> WaitlistEntry:
    replaces = next((r.get("reference", "").split("/", 1)[1] for r in resource.get("supportingInformation") or []
                     if str(r.get("reference", "")).startswith("Appointment/")), None)
    period = (resource.get("requestedPeriod") or [{}])[0]
    return WaitlistEntry(resource["id"], replaces, instant(period.get("end")),
                         str((_actor(resource, "Practitioner/") or {}).get("display") or ""))


def appointment(record: Record, appointment_id: str, timing: Timing, now: datetime | None = None) -> Appointment:
    """One appointment of the record, with its location's address and the waitlist entry for it
    (NotVisible for anything not in this record)."""
    resource = record.read("Appointment", appointment_id)
    if record.reference not in {(p.get("actor") or {}).get("reference") for p in resource.get("participant") or []}:
        raise NotVisible(f"Appointment/{appointment_id}")
    view = to_view(resource, timing, now)
    location = record.read_reference(view.location_ref)
    if location:
        address = location.get("address") or {}
        view.address = ", ".join([*address.get("line", []), *(x for x in (address.get("city"), address.get("state"))
                                                               if x)])
        view.location = view.location or str(location.get("name") or "")
    for entry in record.search_all("Appointment", [("patient", record.reference), ("status", "waitlist"),
                                                   ("supporting-info", f"Appointment/{view.id}")]).matches:
        view.waitlist_id = entry["id"]
    return view


def office_phone(record: Record, view: Appointment) -> str:
    """The phone number to call about an appointment: its Location's, else the managing
    Organization's, else any Organization's the record can read."""
    location = record.read_reference(view.location_ref)
    for resource in (location, record.read_reference(((location or {}).get("managingOrganization") or {})
                                                     .get("reference"))):
        for telecom in (resource or {}).get("telecom") or []:
            if telecom.get("system") == "phone" and telecom.get("value"):
                return str(telecom["value"])
    for org in record.search("Organization", [], count=5).matches:
        for telecom in org.get("telecom") or []:
            if telecom.get("system") == "phone" and telecom.get("value"):
                return str(telecom["value"])
    return ""


# --- finding open Slots ---

def schedules(services: Any) -> list[ScheduleChoice]:
    """The bookable kinds of visit: active Schedules of a practitioner (never a patient's)."""
    found = clinic_record(services).search_all("Schedule", [("active", "true")], limit=200)
    out = []
    for resource in found.matches:
        if _actor(resource, "Patient/"):
            continue
        practitioner = _actor(resource, "Practitioner/") or {}
        location = _actor(resource, "Location/") or {}
        kind = _text(resource.get("serviceType")) or _text(resource.get("specialty")) or str(resource["id"])
        who = str(practitioner.get("display") or "")
        out.append(ScheduleChoice(resource["id"], f"{kind} - {who}" if who else kind, kind, who,
                                  practitioner.get("reference"), str(location.get("display") or ""),
                                  location.get("reference")))
    return sorted(out, key=lambda s: s.label)


def schedule(services: Any, schedule_id: str) -> ScheduleChoice | None:
    return next((s for s in schedules(services) if s.id == schedule_id), None)


def parse_range(first: str | None, last: str | None, zone: str, today: date | None = None,
                longest: int = 92) -> tuple[date, date]:
    """The date range of a search (clinic dates, both included); AppointmentError bad-range."""
    today = today or utcnow().astimezone(ZoneInfo(zone)).date()
    try:
        start = date.fromisoformat(first) if first else today
        end = date.fromisoformat(last) if last else start + timedelta(days=13)
    except ValueError:
        raise AppointmentError("bad-range", "not a date") from None
    if end < start:
        raise AppointmentError("bad-range", "the end is before the start")
    if end < today:
        raise AppointmentError("bad-range", "the range is in the past")
    if (end - start).days >= longest:
        raise AppointmentError("bad-range", "the range is too long")
    return max(start, today), end


def find_slots(record: Record, schedule_id: str, start: date, end: date, zone: str, cursor: str | None = None,
               count: int = 12, now: datetime | None = None) -> tuple[list[Slot], str | None]:
    """Free Slots of the Schedule from `start` to `end` (clinic dates), not yet begun, soonest first."""
    now = now or utcnow()
    tz = ZoneInfo(zone)
    first = max(datetime.combine(start, time(0), tz), now)
    last = datetime.combine(end + timedelta(days=1), time(0), tz)
    found = record.search("Slot", [("schedule", f"Schedule/{schedule_id}"), ("status", "free"),
                                   ("start", f"ge{iso(first)}"), ("start", f"lt{iso(last)}"), ("_sort", "start")],
                          count=count, cursor=cursor)
    slots = [s for s in (_slot(r) for r in found.matches) if s is not None and s.start > now]
    return slots, found.next_cursor


def _slot(resource: dict[str, Any]) -> Slot | None:
    start = instant(resource.get("start"))
    if start is None:
        return None
    schedule_ref = str((resource.get("schedule") or {}).get("reference") or "")
    return Slot(resource["id"], start, instant(resource.get("end")), schedule_ref.split("/", 1)[-1])


# --- hold, book, release ---

def _read_slot(record: Record, slot_id: str) -> dict[str, Any]:
    if not slot_id:
        raise AppointmentError("no-slot")
    try:
        return record.read("Slot", slot_id)
    except (NotVisible, FhirError):
        raise AppointmentError("slot-gone") from None


def _claim(record: Record, slot: dict[str, Any], status: str, until: datetime | None = None,
           kind: str | None = None, comment: str | None = None) -> dict[str, Any]:
    """Set the Slot's status, only if nobody changed it since it was read (else slot-taken)."""
    updated = _without(slot, EXT_HOLD_UNTIL, EXT_HOLD_KIND)
    updated["status"] = status
    updated.pop("comment", None)
    if until is not None:
        updated["extension"] = [*updated.get("extension", []), {"url": EXT_HOLD_UNTIL, "valueDateTime": iso(until)},
                                {"url": EXT_HOLD_KIND, "valueCode": kind or "hold"}]
    if comment:
        updated["comment"] = comment
    try:
        return record.update(updated, version_id=_version(slot))
    except FhirError as exc:
        if exc.status == 412:
            raise AppointmentError("slot-taken") from None
        raise


def _participants(record: Record, practitioner: dict[str, Any] | None,
                  location: dict[str, Any] | None, status: str = "accepted") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"actor": {"reference": record.reference}, "required": "required",
                                  "status": status}]
    for actor in (practitioner, location):
        if actor:
            out.append({"actor": actor, "required": "required", "status": "needs-action"})
    return out


def hold(record: Record, services: Any, slot_id: str, reason: str = "", replaces: str | None = None,
         now: datetime | None = None) -> dict[str, Any]:
    """Hold a free Slot for this record: the Slot busy-tentative for the hold time and an Appointment
    `pending` for it (the request the outbox sends to the EHR). `replaces`: the appointment a
    reschedule will cancel once this one is booked (it must still be changeable)."""
    now = now or utcnow()
    timing = Timing.of(services.settings)
    if replaces:
        _check_changeable(appointment(record, replaces, timing, now))
    slot = _read_slot(record, slot_id)
    start = instant(slot.get("start"))
    if start is None or start <= now:
        raise AppointmentError("slot-past")
    if slot.get("status") != "free":
        raise AppointmentError("slot-taken")
    schedule_id = str((slot.get("schedule") or {}).get("reference") or "").split("/", 1)[-1]
    chosen = schedule(services, schedule_id)
    if chosen is None:
        raise AppointmentError("slot-gone")
    held = _claim(record, slot, "busy-tentative", now + timing.hold, "hold", "Held while a patient books")
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "status": "pending",
        "serviceType": [{"text": chosen.kind}],
        "description": chosen.kind,
        "start": slot["start"], "end": slot.get("end") or slot["start"],
        "slot": [{"reference": f"Slot/{slot_id}"}],
        "created": iso(now),
        "participant": _participants(record, {"reference": chosen.practitioner_ref, "display": chosen.practitioner}
                                     if chosen.practitioner_ref else None,
                                     {"reference": chosen.location_ref, "display": chosen.location}
                                     if chosen.location_ref else None),
    }
    if reason:
        resource["reasonCode"] = [{"text": reason}]
        resource["comment"] = reason
    if replaces:
        resource["supportingInformation"] = [{"reference": f"Appointment/{replaces}"}]
    try:
        return record.create(resource)
    except Exception:
        _claim(record, held, "free")  # the hold never became an appointment: give the time back
        raise


def _check_changeable(view: Appointment) -> None:
    if view.status not in ("pending", "booked"):
        raise AppointmentError("not-active")
    if not view.can_change:
        raise AppointmentError("too-late")


def held_until(record: Record, view: Appointment) -> datetime | None:
    """When the hold of a pending appointment ends (None: no hold on its Slot)."""
    if not view.slot_id:
        return None
    slot = record.read_reference(f"Slot/{view.slot_id}")
    if not slot or slot.get("status") != "busy-tentative":
        return None
    return next((instant(e.get("valueDateTime")) for e in _ext(slot, EXT_HOLD_UNTIL)), None)


def book(record: Record, services: Any, appointment_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Confirm a hold: the Appointment booked, its Slot busy; then the appointment it replaces (a
    reschedule) is cancelled, so the patient never ends with none."""
    now = now or utcnow()
    timing = Timing.of(services.settings)
    view = appointment(record, appointment_id, timing, now)
    if view.status != "pending":
        raise AppointmentError("not-active")
    until = held_until(record, view)
    if until is None or until <= now:
        release(record, services, appointment_id, expired=True, now=now)
        raise AppointmentError("hold-expired")
    replaces = next((r.get("reference", "").split("/", 1)[1] for r in view.resource.get("supportingInformation") or []
                     if str(r.get("reference", "")).startswith("Appointment/")), None)
    if replaces:
        _check_changeable(appointment(record, replaces, timing, now))
    slot = record.read("Slot", view.slot_id or "")
    booked = _set_status(record, view.resource, "booked")
    _claim(record, slot, "busy", comment=None)
    if replaces:
        cancel(record, services, replaces, "pat", "Rescheduled by the patient", now=now, check_cutoff=False)
    return booked


def _set_status(record: Record, resource: dict[str, Any], status: str, **changes: Any) -> dict[str, Any]:
    """The Appointment in a new status, only if nobody changed it since it was read (else
    not-active): booked, everyone has accepted; cancelled, the patient has declined."""
    updated = {**resource, "status": status, **changes}
    participants = []
    for item in resource.get("participant") or []:
        patient = str((item.get("actor") or {}).get("reference") or "").startswith("Patient/")
        if status == "booked":
            item = {**item, "status": "accepted"}
        elif status == "cancelled" and patient:
            item = {**item, "status": "declined"}
        participants.append(item)
    updated["participant"] = participants
    try:
        return record.update(updated, version_id=_version(resource))
    except FhirError as exc:
        if exc.status == 412:
            raise AppointmentError("not-active") from None
        raise


def release(record: Record, services: Any, appointment_id: str, expired: bool = False,
            now: datetime | None = None) -> None:
    """Give up a hold (the person changed their mind, or it ran out): the pending Appointment
    cancelled, then its Slot free again and offered to the waitlist."""
    resource = record.read("Appointment", appointment_id)
    if resource.get("status") != "pending":
        raise AppointmentError("not-active")
    code = ("hold-expired", "The hold ran out before booking") if expired else \
        ("hold-released", "Released by the patient before booking")
    _set_status(record, resource, "cancelled", cancelationReason={
        "coding": [{"system": CANCEL_REASONS, "code": "pat", "display": "Patient"},
                   {"system": PORTAL_REASONS, "code": code[0], "display": code[1]}], "text": code[1]})
    _free_slot_of(record, services, resource, now, holding=True)


def _free_slot_of(record: Record, services: Any, resource: dict[str, Any], now: datetime | None,
                  holding: bool = False) -> str | None:
    """Free the appointment's Slot: a hold's only while it is still held (busy-tentative), a booked
    appointment's while busy; a Slot the EHR has since given to something else is left alone."""
    slot_ref = str(((resource.get("slot") or [{}])[0]).get("reference") or "")
    if not slot_ref.startswith("Slot/"):
        return None
    slot = record.read_reference(slot_ref)
    if not slot or slot.get("status") not in (("busy-tentative",) if holding else ("busy", "busy-tentative")):
        return None
    try:
        _claim(record, slot, "free")
    except AppointmentError:
        log.info("%s changed while it was being freed; left as it is", slot_ref)
        return None
    offer_freed_slot(services, slot["id"], now=now)
    return str(slot["id"])


# --- cancel ---

CANCEL_CHOICES = ("pat", "pat-fb", "pat-lt", "other")


def cancel(record: Record, services: Any, appointment_id: str, reason_code: str, reason_text: str,
           now: datetime | None = None, check_cutoff: bool = True) -> dict[str, Any]:
    """Cancel a booked appointment at least the cutoff before it starts (else too-late): status
    cancelled with the reason, its Slot free and offered to the waitlist, its waitlist entry ended."""
    now = now or utcnow()
    timing = Timing.of(services.settings)
    view = appointment(record, appointment_id, timing, now)
    if view.status not in ("pending", "booked"):
        raise AppointmentError("not-active")
    if check_cutoff and not view.can_change:
        raise AppointmentError("too-late")
    cancelled = _set_status(record, view.resource, "cancelled", cancelationReason={
        "coding": [{"system": CANCEL_REASONS, "code": reason_code}], "text": reason_text})
    if view.waitlist_id:
        leave_waitlist(record, services, view.waitlist_id, now=now)
    _free_slot_of(record, services, view.resource, now)
    return cancelled


# --- the waitlist ---

def join_waitlist(record: Record, services: Any, appointment_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Ask for an earlier time than this appointment: a waitlist entry from now to its start."""
    now = now or utcnow()
    timing = Timing.of(services.settings)
    view = appointment(record, appointment_id, timing, now)
    if view.status != "booked":
        raise AppointmentError("not-active")
    if not view.can_change:
        raise AppointmentError("too-late")
    if view.waitlist_id:
        raise AppointmentError("already-waitlisted")
    resource = {
        "resourceType": "Appointment", "status": "waitlist",
        "serviceType": view.resource.get("serviceType") or [{"text": view.kind}],
        "description": "Waitlist for an earlier time",
        "requestedPeriod": [{"start": iso(now), "end": iso(view.start or now)}],
        "supportingInformation": [{"reference": f"Appointment/{view.id}"}],
        "created": iso_ms(now),
        "participant": _participants(record, _actor(view.resource, "Practitioner/"),
                                     _actor(view.resource, "Location/")),
    }
    if view.resource.get("reasonCode"):
        resource["reasonCode"] = view.resource["reasonCode"]
    return record.create(resource)


def leave_waitlist(record: Record, services: Any, waitlist_id: str, now: datetime | None = None) -> None:
    """End a waitlist entry (and give back a time offered to it)."""
    resource = record.read("Appointment", waitlist_id)
    if resource.get("status") != "waitlist":
        raise AppointmentError("not-active")
    offer = _offer_of(resource)
    _set_status(record, _without(resource, EXT_OFFER), "cancelled", cancelationReason={
        "coding": [{"system": CANCEL_REASONS, "code": "pat"}], "text": "Left the waitlist"})
    if offer:
        _free_offered(record, services, offer[0], now)


def _offer_of(resource: dict[str, Any]) -> tuple[str, datetime] | None:
    for ext in _ext(resource, EXT_OFFER):
        parts = {e.get("url"): e for e in ext.get("extension") or []}
        ref = str((parts.get("slot") or {}).get("valueReference", {}).get("reference") or "")
        until = instant((parts.get("until") or {}).get("valueDateTime"))
        if ref.startswith("Slot/") and until is not None:
            return ref.split("/", 1)[1], until
    return None


def _free_offered(record: Record, services: Any, slot_id: str, now: datetime | None) -> None:
    slot = record.read_reference(f"Slot/{slot_id}")
    if slot and slot.get("status") == "busy-tentative" and \
            any(e.get("valueCode") == "offer" for e in _ext(slot, EXT_HOLD_KIND)):
        try:
            _claim(record, slot, "free")
        except AppointmentError:
            return
        offer_freed_slot(services, slot_id, now=now)


def offer_freed_slot(services: Any, slot_id: str, now: datetime | None = None) -> Offer | None:
    """A Slot just became free: hold it for the earliest waitlist entry whose requestedPeriod covers
    it (same practitioner, the appointment it would replace still booked and later, not offered this
    Slot before). Returns the offer (for a notification sender), or None when nobody gets it."""
    now = now or utcnow()
    timing = Timing.of(services.settings)
    clinic = clinic_record(services)
    slot = clinic.read_reference(f"Slot/{slot_id}")
    if not slot or slot.get("status") != "free":
        return None
    start, end = instant(slot.get("start")), instant(slot.get("end"))
    if start is None or start - now < timing.cutoff:
        return None
    chosen = schedule(services, str((slot.get("schedule") or {}).get("reference") or "").split("/", 1)[-1])
    if chosen is None or not chosen.practitioner_ref:
        return None
    entries = clinic.search_all("Appointment", [("status", "waitlist"),
                                                ("practitioner", chosen.practitioner_ref)]).matches
    entries.sort(key=lambda r: (str(r.get("created") or ""), r["id"]))
    for entry in entries:
        if _offer_of(entry) is not None:
            continue
        if any((e.get("valueReference") or {}).get("reference") == f"Slot/{slot_id}"
               for e in _ext(entry, EXT_DECLINED)):
            continue
        period = (entry.get("requestedPeriod") or [{}])[0]
        first, last = instant(period.get("start")), instant(period.get("end"))
        if first is None or last is None or start < first or (end or start) > last:
            continue
        info = waitlist_entry(entry)
        current = clinic.read_reference(f"Appointment/{info.replaces}") if info.replaces else None
        if current is None or current.get("status") != "booked" or \
                (instant(current.get("start")) or start) <= start:
            continue
        patient = str((_actor(entry, "Patient/") or {}).get("reference") or "").split("/", 1)[-1]
        until = min(now + timing.offer, start - timing.cutoff) if start - timing.cutoff > now else now + timing.offer
        try:
            updated = dict(entry)
            updated["extension"] = [*entry.get("extension", []), {"url": EXT_OFFER, "extension": [
                {"url": "slot", "valueReference": {"reference": f"Slot/{slot_id}"}},
                {"url": "until", "valueDateTime": iso(until)}]}]
            clinic.update(updated, version_id=_version(entry))
        except FhirError as exc:
            if exc.status == 412:
                continue  # the entry changed (left, or offered something else): the next one
            raise
        try:
            _claim(clinic, slot, "busy-tentative", until, "offer", "Offered to the waitlist")
        except AppointmentError:
            clinic.update(_without(clinic.read("Appointment", entry["id"]), EXT_OFFER))
            return None  # someone booked the time meanwhile
        log.info("waitlist: Slot/%s offered to Appointment/%s until %s", slot_id, entry["id"], iso(until))
        return Offer(entry["id"], patient, slot_id, start, end, until, info.replaces, info.practitioner)
    return None


def open_offers(record: Record, now: datetime | None = None) -> list[Offer]:
    """The times offered to this record's waitlist entries, not yet answered or expired."""
    now = now or utcnow()
    out = []
    for entry in record.search_all("Appointment", [("patient", record.reference),
                                                   ("status", "waitlist")]).matches:
        offer = _offer_of(entry)
        if offer is None or offer[1] <= now:
            continue
        slot = record.read_reference(f"Slot/{offer[0]}")
        if not slot or slot.get("status") != "busy-tentative":
            continue
        info = waitlist_entry(entry)
        out.append(Offer(entry["id"], record.patient_id, offer[0], instant(slot.get("start")) or now,
                         instant(slot.get("end")), offer[1], info.replaces, info.practitioner))
    return sorted(out, key=lambda o: o.start)


def _offer_for(record: Record, waitlist_id: str, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = record.read("Appointment", waitlist_id)
    if entry.get("status") != "waitlist" or record.reference not in {
            (p.get("actor") or {}).get("reference") for p in entry.get("participant") or []}:
        raise AppointmentError("offer-gone")
    offer = _offer_of(entry)
    if offer is None or offer[1] <= now:
        raise AppointmentError("offer-gone")
    slot = record.read_reference(f"Slot/{offer[0]}")
    if not slot or slot.get("status") != "busy-tentative":
        raise AppointmentError("offer-gone")
    return entry, slot


def accept_offer(record: Record, services: Any, waitlist_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Take the offered time: the waitlist entry ends, the Slot is booked for a new Appointment
    (created pending, the EHR's request, then booked), and the old appointment is cancelled."""
    now = now or utcnow()
    entry, slot = _offer_for(record, waitlist_id, now)
    info = waitlist_entry(entry)
    _set_status(record, _without(entry, EXT_OFFER), "cancelled", cancelationReason={
        "coding": [{"system": CANCEL_REASONS, "code": "pat-swl", "display": "Patient: Scheduled from Wait List"}],
        "text": "An earlier time was booked from the waitlist"})
    try:
        taken = _claim(record, slot, "busy")
    except AppointmentError:
        back = {**record.read("Appointment", waitlist_id), "status": "waitlist"}
        back.pop("cancelationReason", None)
        record.update(back)
        raise
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "status": "pending",
        "serviceType": entry.get("serviceType") or [], "description": entry.get("serviceType", [{}])[0].get(
            "text", "") if entry.get("serviceType") else "",
        "start": taken["start"], "end": taken.get("end") or taken["start"],
        "slot": [{"reference": f"Slot/{slot['id']}"}], "created": iso(now),
        "participant": _participants(record, _actor(entry, "Practitioner/"), _actor(entry, "Location/")),
    }
    if entry.get("reasonCode"):
        resource["reasonCode"] = entry["reasonCode"]
    if info.replaces:
        resource["supportingInformation"] = [{"reference": f"Appointment/{info.replaces}"}]
    created = record.create(resource)
    booked = _set_status(record, created, "booked")
    if info.replaces:
        old = record.read("Appointment", info.replaces)
        if old.get("status") in ("booked", "pending"):
            _set_status(record, old, "cancelled", cancelationReason={
                "coding": [{"system": CANCEL_REASONS, "code": "pat-swl",
                            "display": "Patient: Scheduled from Wait List"}],
                "text": "Moved to an earlier time from the waitlist"})
            _free_slot_of(record, services, old, now)
    return booked


def decline_offer(record: Record, services: Any, waitlist_id: str, now: datetime | None = None) -> None:
    """Say no to the offered time: the entry stays on the waitlist (never offered that Slot again)
    and the Slot goes to the next person."""
    now = now or utcnow()
    entry, slot = _offer_for(record, waitlist_id, now)
    _drop_offer(record, entry, slot["id"])
    _free_offered(record, services, slot["id"], now)


def _drop_offer(record: Record, entry: dict[str, Any], slot_id: str) -> None:
    updated = _without(entry, EXT_OFFER)
    updated["extension"] = [*updated.get("extension", []),
                            {"url": EXT_DECLINED, "valueReference": {"reference": f"Slot/{slot_id}"}}]
    try:
        record.update(updated, version_id=_version(entry))
    except FhirError as exc:
        if exc.status == 412:
            raise AppointmentError("offer-gone") from None
        raise


# --- the periodic sweep ---

@dataclass
class SweepResult:
    expired_holds: list[str] = field(default_factory=list)  # Appointment ids cancelled
    expired_offers: list[str] = field(default_factory=list)  # waitlist entry ids whose offer ran out
    offers: list[Offer] = field(default_factory=list)


def sweep(services: Any, now: datetime | None = None) -> SweepResult:
    """Expire holds and offers whose time ran out (their Slots free again), then offer the Slots
    that became free since each waitlist entry joined (a portal cancellation, an expired hold, a
    Slot set free or newly opened by the EHR) to the waitlist. Safe to run from several processes:
    every change is conditional on the version it read."""
    now = now or utcnow()
    clinic = clinic_record(services)
    result = SweepResult()
    for slot in clinic.search_all("Slot", [("status", "busy-tentative")]).matches:
        until = next((instant(e.get("valueDateTime")) for e in _ext(slot, EXT_HOLD_UNTIL)), None)
        if until is None or until > now:
            continue
        kind = next((e.get("valueCode") for e in _ext(slot, EXT_HOLD_KIND)), "hold")
        try:
            if kind == "offer":
                result.expired_offers += _expire_offer(clinic, services, slot, now)
            else:
                result.expired_holds += _expire_hold(clinic, services, slot, now)
        except (AppointmentError, FhirError, NotVisible) as exc:
            log.info("sweep: Slot/%s left for the next round (%s)", slot["id"], exc)
    result.offers += _offer_free_slots(clinic, services, now)
    return result


def _expire_hold(clinic: Record, services: Any, slot: dict[str, Any], now: datetime) -> list[str]:
    holders = clinic.search_all("Appointment", [("slot", f"Slot/{slot['id']}"), ("status", "pending")]).matches
    done = []
    for resource in holders:
        _set_status(clinic, resource, "cancelled", cancelationReason={
            "coding": [{"system": CANCEL_REASONS, "code": "pat", "display": "Patient"},
                       {"system": PORTAL_REASONS, "code": "hold-expired",
                        "display": "The hold ran out before booking"}],
            "text": "The hold ran out before booking"})
        done.append(str(resource["id"]))
    current = clinic.read("Slot", slot["id"])
    if current.get("status") == "busy-tentative":
        _claim(clinic, current, "free")
        offer_freed_slot(services, slot["id"], now=now)
    return done


def _expire_offer(clinic: Record, services: Any, slot: dict[str, Any], now: datetime) -> list[str]:
    done = []
    for entry in clinic.search_all("Appointment", [("status", "waitlist")]).matches:
        offer = _offer_of(entry)
        if offer and offer[0] == slot["id"]:
            _drop_offer(clinic, entry, slot["id"])
            done.append(str(entry["id"]))
    current = clinic.read("Slot", slot["id"])
    if current.get("status") == "busy-tentative":
        _claim(clinic, current, "free")
        offer_freed_slot(services, slot["id"], now=now)
    return done


def _offer_free_slots(clinic: Record, services: Any, now: datetime) -> list[Offer]:
    timing = Timing.of(services.settings)
    made: list[Offer] = []
    by_practitioner = {s.practitioner_ref: s for s in schedules(services) if s.practitioner_ref}
    entries = clinic.search_all("Appointment", [("status", "waitlist")]).matches
    entries.sort(key=lambda r: (str(r.get("created") or ""), r["id"]))
    for entry in entries:
        if _offer_of(entry) is not None:
            continue
        chosen = by_practitioner.get(str((_actor(entry, "Practitioner/") or {}).get("reference") or ""))
        period = (entry.get("requestedPeriod") or [{}])[0]
        first, last, joined = instant(period.get("start")), instant(period.get("end")), instant(entry.get("created"))
        if chosen is None or first is None or last is None:
            continue
        earliest = max(first, now + timing.cutoff)
        if earliest >= last:
            continue
        found = clinic.search("Slot", [("schedule", f"Schedule/{chosen.id}"), ("status", "free"),
                                       ("start", f"ge{iso(earliest)}"), ("start", f"lt{iso(last)}"),
                                       ("_sort", "start")], count=50)
        for slot in found.matches:
            changed = instant((slot.get("meta") or {}).get("lastUpdated"))
            if joined is not None and changed is not None and changed < joined:
                continue  # free before they joined: they could have booked it themselves
            offer = offer_freed_slot(services, slot["id"], now=now)
            if offer is not None:
                made.append(offer)
                if offer.waitlist_id == entry["id"]:
                    break
    return made


class Sweeper:
    """`sweep` every `interval` seconds on a daemon thread (gateway worker); stop() ends it and
    closes the services, which are the sweeper's own (start_appointment_sweep builds them for it):
    the AuditEvents of its last rounds are stored then, not left to the process's exit."""

    def __init__(self, services: Any, interval: float) -> None:
        self.services = services
        self.interval = interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="appointments-sweep", daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                result = sweep(self.services)
                if result.expired_holds or result.expired_offers or result.offers:
                    log.info("appointments sweep: %d holds and %d offers expired, %d offers made",
                             len(result.expired_holds), len(result.expired_offers), len(result.offers))
            except Exception:  # the loop must outlive one failed round; it is logged and tried next time
                log.exception("appointments sweep failed")

    def start(self) -> Sweeper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        self.services.close()
