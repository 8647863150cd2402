"""The access policy: who is calling, and what they may do, decided in one place before any query.

Every FHIR interaction asks `authorize(principal, interaction, resource_type)` and gets back either
an exception (401/403) or a Grant whose `restrict` condition is added to every query the
interaction runs (matches, _include/_revinclude, totals, $everything). Anything not explicitly
allowed is refused.

Callers: a trusted in-process caller (CLI, HL7 ingest, the audit writer); an anonymous HTTP caller
with full access only when GATEWAY_OPEN_ACCESS is switched on (demo and tests); and bearer tokens
from the SMART authorization server (gateway.smart_auth), turned into a Principal here by
`principal_from_token`. A token Principal carries Rules, one per granted resource scope, each
confined to the patients the scope reaches:
- patient/ scopes: the launch patient, while the login may still act for that patient;
- user/ scopes: every patient the login may act for now (itself and current proxy grants);
- system/ scopes (backend services): every patient.
For a proxy of a patient aged 12 to 17 the rule is "limited": resources labelled confidential
(meta.security R or V) stay hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from flask import Request
from sqlalchemy import ColumnElement, and_, exists, false, not_, or_, select, true

from gateway import db
from gateway.config import Settings
from gateway.fhir.indexer import compartment_patients, param_rows
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import Restriction
from gateway.fhir.searchparams import params_for, patient_compartment
from gateway.smart_auth.scopes import INTERACTION_LETTER, parse_scopes

INTERACTIONS = frozenset({
    "read", "vread", "search", "history", "create", "update", "patch", "delete", "everything",
})
READ_FAMILY = frozenset({"read", "vread", "search", "history", "everything"})
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
# meta.security labels that proxies of a 12-17 year old never see: R and V always, plus the
# sensitivity categories configured with GATEWAY_SENSITIVE_LABELS (see configure_sensitive_labels).
# Types of the patient compartment that are nobody's data when no patient is in them: a clinician's
# or a room's Schedule (Schedule.actor) is the clinic's bookable calendar, which every patient and
# app may read; a Schedule with a patient among its actors stays that patient's.
SHARED_WHEN_UNOWNED = frozenset({"Schedule"})
ALWAYS_CONFIDENTIAL = frozenset({(CONFIDENTIALITY, "R"), (CONFIDENTIALITY, "V")})
_confidential_labels: frozenset[tuple[str, str]] = ALWAYS_CONFIDENTIAL


def configure_sensitive_labels(setting: str) -> frozenset[tuple[str, str]]:
    """Set the labels, from a setting such as
    "http://terminology.hl7.org/CodeSystem/v3-ActCode|PSY http://terminology.hl7.org/CodeSystem/v3-ActCode|ETH"
    (system|code, separated by spaces or commas). A process-wide policy, like the rest of this module."""
    global _confidential_labels
    labels = set(ALWAYS_CONFIDENTIAL)
    for item in setting.replace(",", " ").split():
        system, bar, code = item.rpartition("|")
        if not bar or not system or not code:
            raise ValueError(f"GATEWAY_SENSITIVE_LABELS: {item!r} is not system|code")
        labels.add((system, code))
    _confidential_labels = frozenset(labels)
    return _confidential_labels


def _is_confidential_label(system: Any, code: Any) -> bool:
    return (system, code) in _confidential_labels


@dataclass(frozen=True)
class Rule:
    """What one granted scope allows: letters on a type, for some patients (None: all)."""

    resource_type: str  # a type or "*"
    letters: frozenset[str]
    patients: frozenset[str] | None
    limited: frozenset[str] = frozenset()
    query: tuple[tuple[str, str | None, str], ...] = ()
    resource_id: str | None = None  # the fhirUser rule: exactly one resource

    def covers(self, resource_type: str | None) -> bool:
        if resource_type is None:
            return self.resource_type == "*" and self.patients is None and not self.query
        return self.resource_type in ("*", resource_type)


@dataclass(frozen=True)
class Principal:
    kind: str  # "system" (trusted, in-process), "open" (anonymous under open access), "user", "backend"
    subject: str
    client_id: str | None = None
    # None: every patient; otherwise the ids whose compartments this principal may reach.
    patients: frozenset[str] | None = None
    interactions: frozenset[str] = field(default=INTERACTIONS)
    # None: no scope limits (system, open); otherwise what the token's scopes grant.
    rules: tuple[Rule, ...] | None = None
    fhir_user: str | None = None

    @property
    def audit_name(self) -> str:
        return self.subject


@dataclass(frozen=True)
class Grant:
    principal: Principal
    restrict: Restriction | None = None
    rules: tuple[Rule, ...] = ()  # the rules that allow the interaction itself
    visible_rules: tuple[Rule, ...] = ()  # the rules `restrict` is built from


SYSTEM = Principal(kind="system", subject="gateway")


class TokenResolver(Protocol):
    def principal_for(self, access_token: str) -> Principal | None: ...


def _unauthorized(message: str, error: str | None = None) -> FhirError:
    challenge = f'Bearer realm="fhir", error="{error}"' if error else 'Bearer realm="fhir"'
    return FhirError(401, message, code="login", headers={"WWW-Authenticate": challenge})


def principal_from_request(request: Request, settings: Settings, tokens: TokenResolver | None = None) -> Principal:
    authorization = request.headers.get("Authorization", "")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        principal = tokens.principal_for(token.strip()) if tokens and scheme.lower() == "bearer" and token else None
        if principal is None:
            raise _unauthorized("The bearer token is not valid", "invalid_token")
        return principal
    if settings.open_access:
        return Principal(kind="open", subject="anonymous")
    raise _unauthorized("Authentication is required")


def principal_from_token(*, client_id: str, scope: str, patient_id: str | None, fhir_user: str | None,
                         acting_for: Mapping[str, bool] | None, backend: bool = False) -> Principal | None:
    """The Principal a token stands for now, or None when it no longer stands for anything.

    `acting_for` is patient id -> limited for the login behind the token (None for a backend
    client). A patient-context token whose patient the login may no longer act for is dead.
    """
    scopes = parse_scopes(scope)
    if acting_for is not None and patient_id is not None and patient_id not in acting_for:
        return None
    everyone = frozenset(acting_for or ())
    limited_all = frozenset(p for p, limited in (acting_for or {}).items() if limited)
    rules: list[Rule] = []
    for s in scopes.resources:
        if s.context == "system":
            if not backend:
                continue
            rules.append(Rule(s.resource_type, s.letters, None, query=s.query))
        elif backend:
            continue
        elif s.context == "patient":
            if patient_id is None:
                continue
            limited = frozenset({patient_id}) & limited_all
            rules.append(Rule(s.resource_type, s.letters, frozenset({patient_id}), limited, s.query))
        else:
            rules.append(Rule(s.resource_type, s.letters, everyone, limited_all, s.query))
    # The fhirUser resource (Patient, RelatedPerson or Person) is readable with the token it came
    # with: one granted fhirUser, or profile, under which the id_token names it as well.
    if fhir_user and not backend and (scopes.has("fhirUser") or scopes.has("profile")):
        ftype, _, fid = fhir_user.partition("/")
        rules.append(Rule(ftype, frozenset("r"), None, resource_id=fid))
    patients: frozenset[str] | None = frozenset().union(
        *(r.patients for r in rules if r.patients is not None and r.resource_id is None))
    if any(r.patients is None and r.resource_id is None for r in rules):
        patients = None
    subject = fhir_user or f"Device/{client_id}"
    return Principal(kind="backend" if backend else "user", subject=subject, client_id=client_id,
                     patients=patients, rules=tuple(rules), fhir_user=fhir_user)


def authorize(principal: Principal, interaction: str, resource_type: str | None) -> Grant:
    if interaction not in INTERACTIONS or interaction not in principal.interactions:
        raise FhirError(403, f"{interaction} is not permitted", code="forbidden")
    if principal.rules is None:
        if principal.kind in ("system", "open") and principal.patients is None:
            return Grant(principal)
        raise FhirError(403, "Access denied", code="forbidden")
    letter = INTERACTION_LETTER[interaction]
    covering = tuple(r for r in principal.rules if letter in r.letters and r.covers(resource_type))
    if not covering:
        what = resource_type or "the whole server"
        raise FhirError(403, f"The token's scopes do not allow {interaction} on {what}", code="forbidden")
    # Reads may include resources of other types: those must be readable under some rule too.
    visible = tuple(r for r in principal.rules if r.letters & {"r", "s"}) if interaction in READ_FAMILY \
        else covering
    return Grant(principal, _restriction(visible), covering, visible)


def allowed(principal: Principal, interaction: str, resource_type: str | None) -> bool:
    try:
        authorize(principal, interaction, resource_type)
    except FhirError:
        return False
    return True


def check_patient(grant: Grant, patient_id: str) -> None:
    """Refuse an operation on one patient's whole record ($everything) the principal cannot reach."""
    patients = grant.principal.patients
    if grant.restrict is not None and patients is not None and patient_id not in patients:
        raise FhirError(403, "Access denied", code="forbidden")


def check_write(grant: Grant, resource: dict[str, Any], compartment_of: Callable[[dict[str, Any]], set[str]]) -> None:
    """A write must land inside the compartments its rules reach (not another patient's record)."""
    if grant.restrict is None:
        return
    rtype = resource.get("resourceType", "")
    owners = compartment_of(resource)
    labels = (resource.get("meta") or {}).get("security") or []
    confidential = any(isinstance(x, dict) and _is_confidential_label(x.get("system"), x.get("code"))
                       for x in labels)
    for rule in grant.rules:
        if rule.query or rule.resource_id is not None:
            continue  # granular and fhirUser rules never authorise writes
        if rule.patients is None:
            return
        if rtype != "Patient" and rtype not in _compartment_types():
            return
        # A limited proxy may write into the record, but not anything it could not read back.
        reachable = rule.patients - rule.limited if confidential else rule.patients
        if owners and owners <= reachable:
            return
    raise FhirError(403, "The resource would fall outside the patients this token may write for",
                    code="forbidden")


def visible(grant: Grant, resource_type: str, resource_id: str, content: str | dict[str, Any],
            base_url: str = "") -> bool:
    """The decision `grant.restrict` makes in SQL, for one resource already in hand: no query.

    Reads and writes by id use it; it evaluates the same rules over the same derived values the
    index tables hold (compartment_patients and param_rows are what the store indexes with), and a
    test checks the two agree on every resource of the demo data.
    """
    if grant.restrict is None:
        return True
    resource = json.loads(content) if isinstance(content, str) else content
    owners: set[str] | None = None
    for rule in grant.visible_rules:
        if rule.resource_type not in ("*", resource_type):
            continue
        if rule.resource_id is not None:
            if resource_id == rule.resource_id:
                return True
            continue
        if rule.query and not all(_token_admits(resource_type, q, resource, base_url) for q in rule.query):
            continue
        if rule.patients is None or resource_type not in _compartment_types():
            return True
        if owners is None:
            owners = compartment_patients(resource, base_url)
        if not owners and resource_type in SHARED_WHEN_UNOWNED:
            return True
        if owners & (rule.patients - rule.limited):
            return True
        if owners & rule.limited and not _labelled_confidential(resource_type, resource, base_url):
            return True
    return False


def _token_admits(resource_type: str, query: tuple[str, str | None, str], resource: dict[str, Any],
                  base_url: str) -> bool:
    name, system, code = query
    param = params_for(resource_type).get(name)
    if param is None or param.type != "token":
        return False
    return any(row["code"] == code and (system is None or row["system"] == system)
               for row in param_rows(param, resource, base_url))


def _labelled_confidential(resource_type: str, resource: dict[str, Any], base_url: str) -> bool:
    param = params_for(resource_type).get("_security")
    return param is not None and any(_is_confidential_label(row["system"], row["code"])
                                     for row in param_rows(param, resource, base_url))


def describe(principal: Principal) -> dict[str, Any]:
    return {"kind": principal.kind, "subject": principal.subject, "client_id": principal.client_id}


# --- rules -> SQL ---

@cache
def _compartment_types() -> frozenset[str]:
    return frozenset(patient_compartment()) | {"Patient"}


def _restriction(rules: tuple[Rule, ...]) -> Restriction | None:
    if any(r.resource_type == "*" and r.patients is None and not r.query and r.resource_id is None for r in rules):
        return None

    def restrict(pk: Any) -> ColumnElement[bool]:
        groups: dict[tuple[frozenset[str] | None, frozenset[str], str | None], list[Rule]] = {}
        for rule in rules:
            groups.setdefault((rule.patients, rule.limited, rule.resource_id), []).append(rule)
        conditions = [and_(_types(group, pk), _patients(patients, limited, pk), _single(group[0], pk))
                      for (patients, limited, _), group in groups.items()]
        return or_(*conditions) if conditions else false()

    return restrict


def _resource_where(pk: Any, *conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    r = db.resource.alias("acl_resource")
    where = [r.c.pk == pk]
    for build in conditions:
        where.append(build(r) if callable(build) else build)
    return exists(select(1).select_from(r).where(*where))


def _types(rules: list[Rule], pk: Any) -> ColumnElement[bool]:
    plain = {r.resource_type for r in rules if not r.query}
    if "*" in plain:
        return true()
    conditions = []
    if plain:
        conditions.append(_resource_where(pk, lambda r: r.c.resource_type.in_(sorted(plain))))
    for rule in rules:
        if rule.query:
            conditions.append(and_(_resource_where(pk, lambda r, t=rule.resource_type: r.c.resource_type == t),
                                   *(_token_match(rule.resource_type, q, pk) for q in rule.query)))
    return or_(*conditions) if conditions else false()


def _token_match(resource_type: str, query: tuple[str, str | None, str], pk: Any) -> ColumnElement[bool]:
    name, system, code = query
    param = params_for(resource_type).get(name)
    if param is None or param.type != "token":
        return false()  # a granular scope this server cannot evaluate grants nothing
    t = db.sp_token.alias("acl_token")
    where = [t.c.resource_pk == pk, t.c.param == name, t.c.code == code]
    if system is not None:
        where.append(t.c.system == system)
    return exists(select(1).select_from(t).where(*where))


def _in_compartment(patients: frozenset[str], pk: Any) -> ColumnElement[bool]:
    c = db.compartment.alias("acl_compartment")
    return exists(select(1).select_from(c).where(c.c.resource_pk == pk, c.c.patient_id.in_(sorted(patients))))


def _confidential(pk: Any) -> ColumnElement[bool]:
    t = db.sp_token.alias("acl_security")
    labels = or_(*(and_(t.c.system == system, t.c.code == code) for system, code in sorted(_confidential_labels)))
    return exists(select(1).select_from(t).where(t.c.resource_pk == pk, t.c.param == "_security", labels))


def _patients(patients: frozenset[str] | None, limited: frozenset[str], pk: Any) -> ColumnElement[bool]:
    if patients is None:
        return true()
    full = patients - limited
    c = db.compartment.alias("acl_owner")
    conditions = [_resource_where(pk, lambda r: r.c.resource_type.not_in(sorted(_compartment_types()))),
                  and_(_resource_where(pk, lambda r: r.c.resource_type.in_(sorted(SHARED_WHEN_UNOWNED))),
                       not_(exists(select(1).select_from(c).where(c.c.resource_pk == pk))))]
    if full:
        conditions.append(_in_compartment(full, pk))
    if limited:
        conditions.append(and_(_in_compartment(limited, pk), not_(_confidential(pk))))
    return or_(*conditions)


def _single(rule: Rule, pk: Any) -> ColumnElement[bool]:
    if rule.resource_id is None:
        return true()
    return _resource_where(pk, lambda r: r.c.resource_type == rule.resource_type,
                           lambda r: r.c.id == rule.resource_id)


# --- the patient portal ---

# A portal page never deletes: cancelling an appointment or ending a request is an update.
PORTAL_INTERACTIONS = frozenset({"read", "vread", "search", "history", "create", "update"})


def principal_for_portal(*, fhir_user: str, patient_id: str, acting_for: Mapping[str, bool]) -> Principal:
    """A signed-in portal session looking at one record: what a user/*.crus token confined to that
    patient would be, under the same rules (a proxy of a 12-17 year old does not see confidential
    data). Refused when the login may not act for the patient (any more)."""
    if patient_id not in acting_for:
        raise FhirError(403, "You do not have access to this record", code="forbidden")
    chosen = frozenset({patient_id})
    limited = chosen if acting_for[patient_id] else frozenset()
    rule = Rule("*", frozenset("crus"), chosen, limited)
    return Principal(kind="user", subject=fhir_user, client_id="portal", patients=chosen,
                     interactions=PORTAL_INTERACTIONS, rules=(rule,), fhir_user=fhir_user)


# --- the operator console (/admin) ---

# Staff roles and the console areas each may open. A login holds any number of roles; an area not
# named here, or a role not listed for it, is refused.
STAFF_ROLES = ("operator", "front-desk", "security-officer")
STAFF_AREAS: dict[str, frozenset[str]] = {
    "messages": frozenset({"operator"}),
    "outbox": frozenset({"operator"}),
    "health": frozenset({"operator", "security-officer"}),
    "apps": frozenset({"security-officer"}),
    "audit": frozenset({"security-officer"}),
    "patients": frozenset({"front-desk"}),
    "resources": frozenset({"operator", "front-desk", "security-officer"}),
}
# What each role may read in the store through the console (every patient: staff work across records;
# every read is audited under the staff member's name).
_STAFF_READS: dict[str, tuple[str, ...]] = {
    "operator": ("*",),
    "front-desk": ("Patient", "RelatedPerson", "Consent", "Person"),
    "security-officer": ("AuditEvent", "Patient"),
}


def staff_may(roles: frozenset[str] | set[str], area: str) -> bool:
    """May a login with these roles open this console area?"""
    allowed_roles = STAFF_AREAS.get(area)
    return bool(allowed_roles and allowed_roles & set(roles))


def check_staff(roles: frozenset[str] | set[str], area: str) -> None:
    if not staff_may(roles, area):
        raise FhirError(403, f"The console area {area!r} is not open to this login", code="forbidden")


def principal_for_staff(*, username: str, roles: frozenset[str] | set[str]) -> Principal:
    """A staff member's reads through the console: the types their roles need, on every patient,
    read-only (changes go through the console's own services, each audited)."""
    rules = tuple(Rule(rtype, frozenset("rs"), None) for role in sorted(roles) if role in _STAFF_READS
                  for rtype in _STAFF_READS[role])
    return Principal(kind="staff", subject=f"staff:{username}", client_id=None, patients=None,
                     interactions=READ_FAMILY, rules=rules)
