"""Sharing (proxy access): who may act for a record, whose records a login may act for, and an adult
granting or revoking a caregiver on their own record.

The grants themselves live in the SMART server's proxy_grant table (the access policy reads it on
every request); granting goes through gateway.smart_auth.admin.grant_proxy, which also writes the
FHIR record of the relationship (RelatedPerson and Consent), and revoking through
SmartAuth.revoke_proxy, which ends the grant at once and marks the Consent inactive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import select

from gateway.portal.context import Visit, display_name
from gateway.portal.record import NotVisible
from gateway.smart_auth import admin, people
from gateway.smart_auth.models import auth_user, proxy_grant

# Relationships an adult may pick for a caregiver (v3 RoleCode, as the proxy grants record them).
GRANTABLE = ("SPS", "DOMPART", "CHILD", "SIB", "PRN", "GRNDCHILD", "FAMMEMB", "FRND", "NBOR")
ADULT_AGE = 18


class SharingError(Exception):
    """A grant or revoke that cannot go ahead; `code` names the reason (the page words it)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Proxy:
    """A login that may act for the record."""

    username: str
    name: str
    relationship: str
    since: str
    until: str | None


@dataclass(frozen=True)
class ActingFor:
    """A record the login may act for (not its own)."""

    patient_id: str
    name: str
    relationship: str | None
    until: str | None
    limited: bool  # a 12-17 year old: confidential information stays hidden


def _current(today: date) -> Any:
    day = today.isoformat()
    return (proxy_grant.c.revoked_ms.is_(None), proxy_grant.c.valid_from <= day,
            (proxy_grant.c.valid_until.is_(None)) | (proxy_grant.c.valid_until >= day))


def proxies_of(services: Any, visit: Visit, today: date | None = None) -> list[Proxy]:
    """The logins that may act for the chosen record today, with their names as the record knows
    them (the RelatedPerson of the grant, read through the record)."""
    today = today or date.today()
    with services.engine.connect() as conn:
        rows = conn.execute(select(proxy_grant, auth_user.c.username).join(
            auth_user, auth_user.c.id == proxy_grant.c.user_id).where(
            proxy_grant.c.patient_id == visit.record.patient_id, *_current(today)).order_by(proxy_grant.c.id)).all()
    out: dict[str, Proxy] = {}
    for row in rows:
        related = visit.record.read_reference(f"RelatedPerson/{row.related_person}") if row.related_person else None
        name = (display_name(related) if related else "") or row.username
        out[row.username] = Proxy(row.username, name, row.relationship, row.valid_from, row.valid_until)
    return sorted(out.values(), key=lambda p: p.name.lower())


def acting_for(visit: Visit) -> list[ActingFor]:
    """The records the login may act for besides its own (from the visit's choices: the same grants
    the switcher offers)."""
    return [ActingFor(c.patient_id, c.name, c.relationship, c.until, c.limited)
            for c in visit.choices if not c.is_self]


def may_grant(visit: Visit, today: date | None = None) -> str | None:
    """None when this visit may grant and revoke caregivers, else the reason it may not: 'minor' (the
    record is a child's: the practice sets up its proxies), 'proxy' (acting for someone else) or
    'unknown-age'."""
    try:
        patient = visit.record.read("Patient", visit.record.patient_id)
    except NotVisible:
        patient = {}
    birth = str(patient.get("birthDate") or "")
    if len(birth) >= 10 and people.age_on(date.fromisoformat(birth[:10]), today or date.today()) < ADULT_AGE:
        return "minor"
    if visit.acting_for_someone_else:
        return "proxy"
    if len(birth) < 10:
        return "unknown-age"
    return None


def grant(services: Any, visit: Visit, username: str, relationship: str, until: date | None,
          today: date | None = None) -> dict[str, Any]:
    """An adult gives a caregiver's login access to their own record."""
    today = today or date.today()
    refusal = may_grant(visit, today)
    if refusal:
        raise SharingError(refusal)
    username = username.strip()
    if relationship not in GRANTABLE:
        raise SharingError("relationship")
    if until is not None and until < today:
        raise SharingError("past")
    user = people.find_user(services.engine, username)
    if user is None:
        raise SharingError("unknown-user")
    if user.id == visit.user.id or user.patient_id == visit.record.patient_id:
        raise SharingError("self")
    if any(p.username == user.username for p in proxies_of(services, visit, today)):
        raise SharingError("duplicate")
    try:
        return admin.grant_proxy(services.engine, services.store, user.username, visit.record.reference,
                                 relationship, until=until, today=today)
    except people.AuthError:
        raise SharingError("unknown-user") from None


def revoke(services: Any, visit: Visit, username: str, today: date | None = None) -> None:
    """An adult ends a caregiver's access to their own record, at once."""
    refusal = may_grant(visit, today)
    if refusal:
        raise SharingError(refusal)
    if all(p.username != username for p in proxies_of(services, visit, today)):
        raise SharingError("not-a-proxy")
    services.smart.revoke_proxy(username, visit.record.patient_id)
