"""Profile: the chosen record's contact details and language (Patient.telecom, address,
communication, written through the Record with If-Match), and the access log of the record from
its AuditEvents."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.portal.context import Visit, display_name
from gateway.portal.i18n import LANGUAGES, preferred_language, with_language
from gateway.portal.record import NotVisible
from gateway.smart_auth.models import auth_user, proxy_grant

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE_CHARS = re.compile(r"^[0-9 ()+.\-]*$")
PAGE_SIZE = 20


@dataclass(frozen=True)
class Contact:
    phone: str
    email: str
    line: str
    city: str
    state: str
    postal_code: str
    version: str
    language: str | None


def _first(items: list[dict[str, Any]], system: str) -> dict[str, Any] | None:
    ranked = sorted((t for t in items if t.get("system") == system), key=lambda t: t.get("rank", 99))
    return ranked[0] if ranked else None


def _home_address(patient: dict[str, Any]) -> dict[str, Any]:
    addresses = patient.get("address") or []
    return next((a for a in addresses if a.get("use") == "home"), addresses[0] if addresses else {})


def contact_of(visit: Visit) -> Contact:
    """The contact details shown (all empty when the record has no Patient resource yet)."""
    try:
        patient = visit.record.read("Patient", visit.record.patient_id)
    except NotVisible:
        patient = {}
    telecom = patient.get("telecom") or []
    address = _home_address(patient)
    phone, email = _first(telecom, "phone"), _first(telecom, "email")
    return Contact((phone or {}).get("value", ""), (email or {}).get("value", ""),
                   ", ".join(address.get("line") or []), address.get("city", ""), address.get("state", ""),
                   address.get("postalCode", ""), str((patient.get("meta") or {}).get("versionId", "")),
                   preferred_language(patient))


def phone_problem(phone: str) -> str | None:
    """'chars' or 'digits' when the number is not a phone number (7 to 15 digits), else None."""
    if not PHONE_CHARS.match(phone):
        return "chars"
    digits = re.sub(r"\D", "", phone)
    if not 7 <= len(digits) <= 15:
        return "digits"
    return None


def email_is_valid(email: str) -> bool:
    return bool(EMAIL.match(email))


def _replace_first(items: list[dict[str, Any]], system: str, value: str) -> list[dict[str, Any]]:
    """The telecom list with the first (best ranked) entry of `system` set to `value`; others kept."""
    out = [dict(t) for t in items]
    current = _first(out, system)
    if current is not None:
        if value:
            current["value"] = value
        else:
            out.remove(current)
    elif value:
        out.append({"system": system, "value": value, "use": "mobile" if system == "phone" else "home",
                    "rank": 1 if system == "phone" else 2})
    return out


def update_contact(visit: Visit, version: str, phone: str, email: str, line: str, city: str, state: str,
                   postal_code: str) -> dict[str, Any]:
    """Write the new contact details on the version the person saw (FhirError 412 when someone
    changed the record since). The caller has validated the values."""
    patient = visit.record.read("Patient", visit.record.patient_id)
    updated = dict(patient)
    updated["telecom"] = _replace_first(_replace_first(patient.get("telecom") or [], "phone", phone), "email", email)
    addresses = [dict(a) for a in patient.get("address") or []]
    home = _home_address({"address": addresses})
    if not home:
        home = {"use": "home"}
        addresses.insert(0, home)
    lines = [part.strip() for part in line.split(",") if part.strip()]
    for key, value in (("line", lines), ("city", city), ("state", state), ("postalCode", postal_code)):
        if value:
            home[key] = value
        else:
            home.pop(key, None)
    home.pop("text", None)  # the text was a rendering of the old parts
    updated["address"] = [a for a in addresses if len(a) > 1 or "use" not in a]
    updated.pop("meta", None)
    return visit.record.update(updated, version or None)


def set_language(visit: Visit, lang: str) -> dict[str, Any]:
    """Make `lang` the record's preferred language (Patient.communication)."""
    if lang not in LANGUAGES:
        raise ValueError(lang)
    patient = visit.record.read("Patient", visit.record.patient_id)
    updated = with_language(patient, lang)
    updated.pop("meta", None)
    return visit.record.update(updated)


# --- the access log ---

ACTIONS = {"R": "read", "C": "create", "U": "update", "D": "delete", "E": "execute"}


@dataclass(frozen=True)
class Access:
    recorded: str
    who: str
    app: str | None
    action: str  # read | search | create | update | delete | execute
    what: str


@dataclass(frozen=True)
class AccessLog:
    entries: list[Access]
    next_cursor: str | None


def _known_people(services: Any, visit: Visit) -> dict[str, str]:
    """fhirUser reference -> name, for the people the record knows: the patient and the logins that
    hold or held a proxy grant for it (named by their RelatedPerson in this record)."""
    names = {visit.record.reference: visit.current.name}
    with services.engine.connect() as conn:
        rows = conn.execute(select(auth_user.c.fhir_user, auth_user.c.username, proxy_grant.c.related_person).join(
            proxy_grant, proxy_grant.c.user_id == auth_user.c.id).where(
            proxy_grant.c.patient_id == visit.record.patient_id).order_by(proxy_grant.c.id)).all()
    for row in rows:
        related = visit.record.read_reference(f"RelatedPerson/{row.related_person}") if row.related_person else None
        name = display_name(related) if related else ""
        names[row.fhir_user] = name or row.username
        if row.related_person:
            names[f"RelatedPerson/{row.related_person}"] = name or row.username
    return names


def _subtype(event: dict[str, Any]) -> str:
    for coding in event.get("subtype") or []:
        if coding.get("code"):
            return str(coding["code"])
    return ACTIONS.get(str(event.get("action")), "execute")


def _what(event: dict[str, Any], patient_ref: str) -> str:
    for entity in event.get("entity") or []:
        ref = (entity.get("what") or {}).get("reference")
        if ref and ref != patient_ref:
            return str(ref).split("/")[0]
        if entity.get("description"):
            path = str(entity["description"]).split("?")[0]
            return path.rsplit("/", 1)[-1]
    return "Patient"


def access_log(services: Any, visit: Visit, cursor: str | None = None) -> AccessLog:
    """Who viewed or changed the record and when (newest first, one page), from its AuditEvents."""
    found = visit.record.search("AuditEvent", [("patient", visit.record.reference), ("_sort", "-date")],
                                count=PAGE_SIZE, cursor=cursor)
    known = _known_people(services, visit)
    entries = []
    for event in found.matches:
        agent = next((a for a in event.get("agent") or [] if a.get("requestor")), (event.get("agent") or [{}])[0])
        who = agent.get("who") or {}
        reference = str(who.get("reference") or who.get("display") or "")
        client = (who.get("identifier") or {}).get("value")
        name = known.get(reference)
        if name is None:
            related = visit.record.read_reference(reference) if reference.startswith("RelatedPerson/") else None
            name = display_name(related) if related else ""
        entries.append(Access(str(event.get("recorded") or ""), name or client or reference,
                              client if client and client != "portal" else None,
                              _subtype(event), _what(event, visit.record.reference)))
    return AccessLog(entries, found.next_cursor)
