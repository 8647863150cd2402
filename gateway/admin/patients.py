"""Patients and access, the front desk's side of the console: find a patient, see their record's
logins, sign-up codes and proxy relationships, issue a sign-up code, reset a login's second factor
after an identity check, and set up or end proxy access for a parent or guardian.

Patient data is read through gateway.portal.record.Record with the staff member's principal
(gateway.access.principal_for_staff): the policy is asked before every query and every read and
search leaves an AuditEvent. Logins, codes and grants are the SMART server's tables, changed only
through its own services (people, admin, SmartAuth.revoke_proxy), the same paths the CLI and the
portal take. The console's action audit events are written by the views (gateway.admin.web.audit).

Refusals raise DeskError with a code that the page turns into a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from babel.dates import format_date
from sqlalchemy import select, update

from gateway import access
from gateway.admin import staff
from gateway.db import write_tx
from gateway.portal import i18n, notifications
from gateway.portal.context import display_name
from gateway.portal.record import Record
from gateway.smart_auth import admin, people
from gateway.smart_auth.models import activation_code, auth_user, proxy_grant

RESULTS_SHOWN = 25
NAME_MAX = 100
MRN_MAX = 64
MRN_TYPE = "MR"  # v2 table 0203: the identifier type of a medical record number
# Relationships a proxy may have to the patient (v3 RoleCode, as `gateway proxy grant` and the
# portal's sharing page record them): parents and guardians first.
RELATIONSHIPS = ("MTH", "FTH", "PRN", "GUARD", "CAREGIVER", "SPS", "DOMPART", "CHILD", "DAU", "SON", "SIB",
                 "GRNDCHILD", "FAMMEMB", "FRND", "NBOR")
# What the staff member checked before resetting a login's second factor; at least MIN_CHECKS.
IDENTITY_CHECKS = ("photo-id", "birth-date", "address", "security-question")
MIN_CHECKS = 2
CHANNELS = ("email", "sms")


def _l(message: str) -> str:
    """Marks a string for the catalog; it is translated when the message is written, in the
    patient's language (there is no request language to go by)."""
    return message


CODE_SUBJECT = _l("Your sign-up code for Riverside MyChart")
CODE_LINE = _l("Your code to sign up for Riverside MyChart is %(code)s. It works once, until %(date)s.")
CODE_WHERE = _l("Sign up at %(url)s")


class DeskError(Exception):
    """An action that cannot go ahead; `code` names the reason (the page words it)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Match:
    """One patient in the lookup's results."""

    patient_id: str
    name: str
    birth_date: str | None
    mrn: str | None
    has_login: bool


@dataclass(frozen=True)
class Lookup:
    matches: list[Match]
    more: bool  # there are more matches than shown: the criteria should be narrowed


@dataclass(frozen=True)
class Login:
    id: int
    username: str
    mfa: bool
    locked_until_ms: int | None
    created_ms: int


@dataclass(frozen=True)
class IssuedCode:
    """A sign-up code as listed on the record: never the code itself (only its hash is stored)."""

    created_ms: int
    expires_ms: int
    used_ms: int | None
    used_by: str | None

    def status(self, now_ms: int) -> str:
        return "used" if self.used_ms is not None else "expired" if self.expires_ms <= now_ms else "open"


@dataclass(frozen=True)
class Relationship:
    """A current proxy grant, seen from one side: `username` acts for `patient_id`."""

    username: str
    name: str  # of the proxy (who may see this record) or of the patient (whose record the login sees)
    patient_id: str
    relationship: str
    since: str
    until: str | None


@dataclass
class PatientFile:
    """What the front desk sees about one patient."""

    patient_id: str
    patient: dict[str, Any]
    logins: list[Login]
    codes: list[IssuedCode]
    may_see_this: list[Relationship]  # logins that may act for this patient
    this_may_see: list[Relationship]  # records this patient's logins may act for
    addresses: dict[str, str] = field(default_factory=dict)  # where a sign-up code can be sent

    @property
    def name(self) -> str:
        return display_name(self.patient) or self.patient_id

    @property
    def birth_date(self) -> str | None:
        return self.patient.get("birthDate")

    @property
    def mrn(self) -> str | None:
        return mrn_of(self.patient)


@dataclass(frozen=True)
class SentCode:
    code: str
    expires_ms: int
    channel: str | None = None
    address: str | None = None
    send_error: str | None = None  # the code was issued but the message could not be sent


@dataclass(frozen=True)
class Granted:
    username: str
    relationship: str
    valid_until: str | None
    capped: bool  # the end was set (or moved) to the day before the 18th birthday
    consent: str
    related_person: str


def record(services: Any, principal: access.Principal, patient_id: str, address: str | None) -> Record:
    """The staff member's reader for one patient (or for lookups, which name no patient)."""
    return Record(services, principal, patient_id, address)


def mrn_of(patient: dict[str, Any]) -> str | None:
    """The medical record number: the identifier typed MR, else the first identifier."""
    identifiers = [i for i in patient.get("identifier") or [] if i.get("value")]
    for identifier in identifiers:
        codes = {c.get("code") for c in (identifier.get("type") or {}).get("coding") or []}
        if MRN_TYPE in codes:
            return str(identifier["value"])
    return str(identifiers[0]["value"]) if identifiers else None


def _escape(value: str) -> str:
    """A FHIR search value taken literally (no OR on commas, no system on a bar)."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def find_patients(services: Any, principal: access.Principal, *, name: str = "", mrn: str = "",
                  birth_date: date | None = None, address: str | None = None) -> Lookup:
    """Patients matching every criterion given: each word of `name` starts a part of their name,
    `mrn` is one of their identifiers, `birth_date` their birth date."""
    name, mrn = name.strip(), mrn.strip()
    if not (name or mrn or birth_date):
        raise DeskError("no-criteria")
    if len(name) > NAME_MAX or len(mrn) > MRN_MAX:
        raise DeskError("too-long")
    params = [("name", _escape(word)) for word in re.findall(r"[^\s,]+", name)]
    if mrn:
        params.append(("identifier", _escape(mrn)))
    if birth_date:
        params.append(("birthdate", birth_date.isoformat()))
    params.append(("_sort", "family,given,birthdate"))  # a long list shows its alphabetical start
    found = record(services, principal, "", address).search("Patient", params, count=RESULTS_SHOWN)
    ids = [str(p.get("id")) for p in found.matches]
    with services.engine.connect() as conn:
        with_login = set(conn.execute(select(auth_user.c.fhir_user).where(
            auth_user.c.fhir_user.in_([f"Patient/{i}" for i in ids]))).scalars())
    matches = [Match(str(p.get("id")), display_name(p) or str(p.get("id")), p.get("birthDate"), mrn_of(p),
                     f"Patient/{p.get('id')}" in with_login) for p in found.matches]
    return Lookup(matches, found.next_cursor is not None)


def read_patient(services: Any, principal: access.Principal, patient_id: str, address: str | None) -> dict[str, Any]:
    """The Patient, read under the staff member's principal; NotVisible when there is none."""
    return record(services, principal, patient_id, address).read("Patient", patient_id)


def _current(today: date) -> tuple[Any, ...]:
    day = today.isoformat()
    return (proxy_grant.c.revoked_ms.is_(None), proxy_grant.c.valid_from <= day,
            proxy_grant.c.valid_until.is_(None) | (proxy_grant.c.valid_until >= day))


def patient_file(services: Any, principal: access.Principal, patient_id: str, address: str | None,
                 today: date | None = None) -> PatientFile:
    """The patient's record and the access around it: its logins, the sign-up codes issued for it,
    and the proxy relationships current today in both directions."""
    today = today or date.today()
    reader = record(services, principal, patient_id, address)
    patient = reader.read("Patient", patient_id)
    reference = f"Patient/{patient_id}"
    with services.engine.connect() as conn:
        login_rows = conn.execute(select(auth_user).where(auth_user.c.fhir_user == reference)
                                  .order_by(auth_user.c.username)).all()
        code_rows = conn.execute(select(activation_code, auth_user.c.username).outerjoin(
            auth_user, auth_user.c.id == activation_code.c.user_id).where(
            activation_code.c.patient_id == patient_id).order_by(activation_code.c.created_ms.desc())).all()
        inward = conn.execute(select(proxy_grant, auth_user.c.username).join(
            auth_user, auth_user.c.id == proxy_grant.c.user_id).where(
            proxy_grant.c.patient_id == patient_id, *_current(today)).order_by(proxy_grant.c.id)).all()
        outward = conn.execute(select(proxy_grant, auth_user.c.username).join(
            auth_user, auth_user.c.id == proxy_grant.c.user_id).where(
            auth_user.c.fhir_user == reference, *_current(today)).order_by(proxy_grant.c.id)).all()
    logins = [Login(r.id, r.username, bool(r.totp_secret),
                    r.locked_until_ms if r.locked_until_ms and r.locked_until_ms > people.now_ms() else None,
                    r.created_ms) for r in login_rows]
    codes = [IssuedCode(r.created_ms, r.expires_ms, r.used_ms, r.username) for r in code_rows]
    proxies = _names(reader, "RelatedPerson", {r.related_person for r in inward if r.related_person})
    others = _names(reader, "Patient", {r.patient_id for r in outward})
    may_see_this = [Relationship(r.username, proxies.get(r.related_person or "") or r.username, patient_id,
                                 r.relationship, r.valid_from, r.valid_until) for r in inward]
    this_may_see = [Relationship(r.username, others.get(r.patient_id) or r.patient_id, r.patient_id,
                                 r.relationship, r.valid_from, r.valid_until) for r in outward]
    return PatientFile(patient_id, patient, logins, codes, may_see_this, this_may_see,
                       notifications.addresses(patient))


def _names(reader: Record, resource_type: str, ids: set[str]) -> dict[str, str]:
    """id -> display name, in one search (audited like any other)."""
    if not ids:
        return {}
    found = reader.search(resource_type, [("_id", ",".join(_escape(i) for i in sorted(ids)))], count=len(ids))
    return {str(r.get("id")): display_name(r) for r in found.matches}


# --- sign-up codes ---

def channels_available(services: Any, addresses: dict[str, str]) -> dict[str, str]:
    """channel -> address, for the channels configured here that the record has an address for."""
    settings = services.settings
    configured = {"email": bool(settings.smtp_host), "sms": bool(settings.sms_url)}
    return {c: addresses[c] for c in CHANNELS if configured[c] and addresses.get(c)}


def code_message(code: str, expires_ms: int, lang: str, base_url: str, channel: str) -> tuple[str, str]:
    """(subject, body) of the sign-up code message: the code, until when, where to sign up. Nothing
    about the patient's care, and no name (the address may be shared in a family)."""
    t = notifications.translations(lang)
    until = format_date(datetime.fromtimestamp(expires_ms / 1000, UTC).date(), "long", locale=lang)
    line = t.gettext(CODE_LINE) % {"code": code, "date": until}
    where = t.gettext(CODE_WHERE) % {"url": f"{base_url}/auth/signup"}
    if channel == "sms":
        return "", f"{line} {where}"
    return t.gettext(CODE_SUBJECT), f"{line}\n\n{where}\n"


def issue_code(services: Any, principal: access.Principal, patient_id: str, address: str | None,
               send: str | None = None, senders: dict[str, notifications.Sender] | None = None) -> SentCode:
    """Issue a single-use sign-up code (45 days) for the patient and, if asked, send it to the
    address on their record. The code is returned to be shown once; the store keeps only its hash.
    A failed send leaves the code issued (the page shows it and says the message did not go)."""
    patient = read_patient(services, principal, patient_id, address)
    target: str | None = None
    if send:
        target = channels_available(services, notifications.addresses(patient)).get(send)
        if target is None:
            raise DeskError("no-address")
    code, expires = people.issue_activation_code(services.engine, patient_id)
    if not send or target is None:
        return SentCode(code, expires)
    lang = i18n.preferred_language(patient) or i18n.DEFAULT
    subject, body = code_message(code, expires, lang, services.settings.base_url, send)
    senders = senders or {"email": notifications.email_sender(services.settings),
                          "sms": notifications.sms_sender(services.settings)}
    try:
        senders[send](target, subject, body)
    except (notifications.Failed, notifications.Retry) as exc:
        return SentCode(code, expires, send, target, str(exc))
    return SentCode(code, expires, send, target)


# --- second factor ---

def _login_of(services: Any, patient_id: str, username: str) -> people.User:
    user = people.find_user(services.engine, username.strip())
    if user is None or user.fhir_user != f"Patient/{patient_id}":
        raise DeskError("not-this-login")
    with services.engine.connect() as conn:
        if staff.roles_of(conn, user.id):
            raise DeskError("staff-login")  # a staff login's factor is not the front desk's to reset
    return user


def reset_mfa(services: Any, patient_id: str, username: str, checks: list[str]) -> tuple[str, ...]:
    """After an identity check (at least two of IDENTITY_CHECKS), take the login's second factor
    away, clear its failed attempts and end every session it has; returns the checks recorded. The
    patient then signs in with the password alone and may set up a new authenticator."""
    made = tuple(c for c in IDENTITY_CHECKS if c in set(checks))
    if set(checks) - set(IDENTITY_CHECKS):
        raise DeskError("unknown-check")
    if len(made) < MIN_CHECKS:
        raise DeskError("too-few-checks")
    user = _login_of(services, patient_id, username)
    if not user.totp_secret:
        raise DeskError("no-mfa")
    with write_tx(services.engine) as conn:
        conn.execute(update(auth_user).where(auth_user.c.id == user.id).values(
            totp_secret=None, failed_logins=0, locked_until_ms=None))
    people.sign_out_everywhere(services.engine, user.id)
    return made


# --- proxies ---

def grant_proxy(services: Any, principal: access.Principal, patient_id: str, address: str | None,
                username: str, relationship: str, until: date | None, today: date | None = None) -> Granted:
    """Let an existing patient login act for this patient, through the same service as `gateway
    proxy grant` (the grant, its RelatedPerson and Consent, the login's Person): a minor's proxy
    ends the day before the 18th birthday whatever end is asked for."""
    today = today or date.today()
    username = username.strip()
    if relationship not in RELATIONSHIPS:
        raise DeskError("relationship")
    if until is not None and until < today:
        raise DeskError("past")
    read_patient(services, principal, patient_id, address)
    user = people.find_user(services.engine, username)
    if user is None:
        raise DeskError("unknown-user")
    if user.patient_id is None:
        raise DeskError("not-a-patient-login")
    if user.patient_id == patient_id:
        raise DeskError("self")
    with services.engine.connect() as conn:
        if conn.execute(select(proxy_grant.c.id).where(
                proxy_grant.c.user_id == user.id, proxy_grant.c.patient_id == patient_id, *_current(today))).first():
            raise DeskError("duplicate")
    try:
        granted = admin.grant_proxy(services.engine, services.store, user.username, f"Patient/{patient_id}",
                                    relationship, until=until, today=today)
    except people.AuthError:
        raise DeskError("unknown-user") from None
    valid_until = granted["valid_until"]
    capped = valid_until is not None and (until is None or valid_until < until.isoformat())
    return Granted(user.username, relationship, valid_until, capped, granted["consent"], granted["related_person"])


def end_proxy(services: Any, patient_id: str, username: str, today: date | None = None) -> list[str]:
    """End a login's proxy access to this patient at once, in every process (SmartAuth.revoke_proxy,
    as `gateway proxy revoke` and the portal do); returns the Consents marked inactive."""
    user = people.find_user(services.engine, username.strip())
    if user is None:
        raise DeskError("not-a-proxy")
    with services.engine.connect() as conn:
        current = conn.execute(select(proxy_grant.c.id).where(
            proxy_grant.c.user_id == user.id, proxy_grant.c.patient_id == patient_id,
            *_current(today or date.today()))).first()
    if current is None:
        raise DeskError("not-a-proxy")
    return [f"Consent/{c}" for c in services.smart.revoke_proxy(user.username, patient_id)]

