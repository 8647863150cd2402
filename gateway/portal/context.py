"""Who is signed in, whose record they are looking at, and whose records they may pick.

The login comes from the shared browser session (gateway.smart_auth.sessions); the records it may act
for come from the proxy grants (people.acting_for), read again on every request so that an ended
relationship is gone at once; the chosen record is kept in the session and checked against them on
every request, failing closed to the login's own record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import request, session
from sqlalchemy import select

from gateway import access
from gateway.portal.record import NotVisible, Record
from gateway.smart_auth import people, sessions
from gateway.smart_auth.models import proxy_grant

PATIENT = "portal_patient"
LABELS = "portal_labels"


@dataclass(frozen=True)
class Choice:
    patient_id: str
    name: str
    is_self: bool
    relationship: str | None = None  # the proxy grant's relationship code
    until: str | None = None  # last day of the proxy's access (a minor's: the day before 18)
    limited: bool = False  # a 12-17 year old: confidential data hidden from the proxy


@dataclass
class Visit:
    """One request of a signed-in login."""

    user: people.User
    choices: list[Choice]
    record: Record

    @property
    def current(self) -> Choice:
        return next(c for c in self.choices if c.patient_id == self.record.patient_id)

    @property
    def acting_for_someone_else(self) -> bool:
        return not self.current.is_self


def signed_in_user(services: Any) -> people.User | None:
    return sessions.current_user(services.engine, services.settings.portal_idle_seconds)


def choices_for(services: Any, user: people.User) -> list[Choice]:
    """Self first, then the people the login may act for today, each with its name and end date."""
    with services.engine.connect() as conn:
        acting = people.acting_for(conn, user.id)
        grants = {row.patient_id: row for row in conn.execute(select(proxy_grant).where(
            proxy_grant.c.user_id == user.id, proxy_grant.c.revoked_ms.is_(None))
            .order_by(proxy_grant.c.id))}
    labels: dict[str, str] = session.get(LABELS) or {}
    out = []
    for pid, limited in acting.items():
        grant = grants.get(pid)
        out.append(Choice(pid, labels.get(pid) or _name(services, user, pid, acting), pid == user.patient_id,
                          grant.relationship if grant is not None else None,
                          grant.valid_until if grant is not None else None, limited))
    session[LABELS] = {c.patient_id: c.name for c in out}
    return sorted(out, key=lambda c: (not c.is_self, c.name))


def _name(services: Any, user: people.User, patient_id: str, acting: dict[str, bool]) -> str:
    record = record_for(services, user, patient_id, acting)
    try:
        patient = record.read("Patient", patient_id)
    except NotVisible:
        return patient_id
    return display_name(patient) or patient_id


def display_name(resource: dict[str, Any]) -> str:
    """The name of a Patient, Practitioner or RelatedPerson as people write it."""
    names = resource.get("name") or []
    if isinstance(names, dict):
        names = [names]
    official = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if not official:
        return ""
    if official.get("text"):
        return str(official["text"])
    return " ".join([*official.get("given", []), official.get("family", "")]).strip()


def record_for(services: Any, user: people.User, patient_id: str,
               acting: dict[str, bool] | None = None) -> Record:
    if acting is None:
        with services.engine.connect() as conn:
            acting = people.acting_for(conn, user.id)
    principal = access.principal_for_portal(fhir_user=user.fhir_user, patient_id=patient_id, acting_for=acting)
    return Record(services, principal, patient_id, request.remote_addr)


def visit(services: Any, user: people.User) -> Visit | None:
    """This request's view, or None when the login must first pick whose record to see."""
    choices = choices_for(services, user)
    acting = {c.patient_id: c.limited for c in choices}
    chosen = session.get(PATIENT)
    if chosen not in acting:
        session.pop(PATIENT, None)
        if len(choices) != 1:
            return None
        chosen = choices[0].patient_id
    return Visit(user, choices, record_for(services, user, chosen, acting))


def choose(patient_id: str, choices: list[Choice]) -> bool:
    if patient_id not in {c.patient_id for c in choices}:
        return False
    session[PATIENT] = patient_id
    return True
