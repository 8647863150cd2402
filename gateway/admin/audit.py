"""The audit log for the console: search AuditEvents and export a search, through the FHIR store.

A search is a FHIR search of AuditEvent made with the staff member's Principal, authorized by
gateway.access before any query, keyset paged newest first (the store's `_cursor`). The filters
become AuditEvent's R4 search parameters, which gateway.audit fills for every event it writes:

    patient   patient=Patient/ID        entity.what (and agent.who) that is a Patient
    user      agent-name:exact=...      agent.name: "staff:<username>" for console actions, the fhirUser
                                        (Patient, RelatedPerson or Person) for portal and app use
    client    altid=...                 agent.altId: the SMART client id ("portal" for the portal)
    action    subtype=... or action=X   a subtype code (read, search-type, create-client...) or a
                                        CRUDE letter
    from, to  date=ge... & date=le...   recorded, whole days inclusive

An export runs the same search page after page (each in its own short read transaction, the keyset
cursor carrying it on) and yields NDJSON or CSV text as it goes, so an export of any size holds one
page in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine, select

from gateway import access
from gateway.admin import staff
from gateway.fhir.search import search
from gateway.smart_auth.models import auth_user, proxy_grant
from gateway.smart_auth.people import User
from gateway.smart_auth.proxies import person_id

PAGE_SIZE = 50
FORMATS = {"ndjson": "application/x-ndjson", "csv": "text/csv"}
CRUDE = ("C", "R", "U", "D", "E")
CSV_COLUMNS = ("recorded", "id", "type", "subtype", "action", "outcome", "agent", "client", "address", "patients",
               "entities", "description")
NEWEST_FIRST = ("_sort", "-date")


class FilterError(Exception):
    """A filter that cannot be searched; `code` names the message the page shows."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Filters:
    patient: str = ""
    user: str = ""
    client: str = ""
    action: str = ""
    since: date | None = None
    until: date | None = None

    def args(self) -> dict[str, str]:
        """The filters as the search form's query arguments (for links to the next page, the export)."""
        values = {"patient": self.patient, "user": self.user, "client": self.client, "action": self.action,
                  "from": self.since.isoformat() if self.since else "",
                  "to": self.until.isoformat() if self.until else ""}
        return {k: v for k, v in values.items() if v}

    @property
    def empty(self) -> bool:
        return not self.args()


def _day(value: str, code: str) -> date | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise FilterError(code, value) from None


def parse_filters(args: Mapping[str, str]) -> Filters:
    """The search form's arguments, checked (FilterError for what cannot be searched)."""
    def text(name: str, limit: int = 255) -> str:
        value = (args.get(name) or "").strip()
        if len(value) > limit:
            raise FilterError("too-long", name)
        return value

    patient = text("patient", 70)
    if patient.startswith("Patient/"):
        patient = patient[len("Patient/"):]
    if patient and ("/" in patient or "," in patient):
        raise FilterError("bad-patient", patient)
    action = text("action", 64)
    if action and len(action) == 1:
        action = action.upper()
        if action not in CRUDE:
            raise FilterError("bad-action", action)
    since, until = _day(args.get("from", ""), "bad-from"), _day(args.get("to", ""), "bad-to")
    if since and until and until < since:
        raise FilterError("backwards")
    return Filters(patient, text("user"), text("client"), action, since, until)


def agent_names(engine: Engine, user: str) -> list[str]:
    """The agent names a login's events carry: "staff:<username>" for a staff login's console actions,
    and for its portal and app use every fhirUser it may appear as (its own record, the RelatedPerson of
    each proxy relationship it has had, and then its Person). A value that is not a username (an agent name as
    shown, such as staff:ana or Patient/123) is searched as it is."""
    if not user:
        return []
    with engine.connect() as conn:
        row = conn.execute(select(auth_user).where(auth_user.c.username == user)).first()
        if row is None:
            return [user]
        names = [f"staff:{row.username}"] if staff.roles_of(conn, row.id) else []
        if row.fhir_user:
            names.append(row.fhir_user)
        relationships = conn.execute(select(proxy_grant.c.related_person).where(
            proxy_grant.c.user_id == row.id)).scalars().all()
    names += [f"RelatedPerson/{r}" for r in relationships if r]
    if relationships:  # only a login that acts (or acted) for others is ever its Person
        names.append(f"Person/{person_id(User(row.id, row.username, row.fhir_user, None))}")
    return list(dict.fromkeys(names))


def _escape_token(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def search_params(engine: Engine, filters: Filters) -> tuple[list[tuple[str, str]], list[str]]:
    """The FHIR search parameters for the filters, and the agent names a user filter stands for."""
    params: list[tuple[str, str]] = []
    if filters.patient:
        params.append(("patient", f"Patient/{filters.patient}"))
    names = agent_names(engine, filters.user)
    if names:
        # :exact, so that staff:ana does not also find staff:anabel; a comma inside a name is escaped.
        params.append(("agent-name:exact", ",".join(n.replace(",", "\\,") for n in names)))
    if filters.client:
        params.append(("altid", _escape_token(filters.client)))
    if filters.action:
        params.append(("action", filters.action) if filters.action in CRUDE
                      else ("subtype", _escape_token(filters.action)))
    if filters.since:
        params.append(("date", f"ge{filters.since.isoformat()}"))
    if filters.until:
        params.append(("date", f"le{filters.until.isoformat()}"))
    return params, names


@dataclass(frozen=True)
class Entry:
    """One AuditEvent as the console lists and exports it."""

    id: str
    recorded: str
    type: str
    subtype: str
    action: str
    outcome: str
    agent: str
    client: str
    address: str
    patients: tuple[str, ...]
    entities: tuple[str, ...]
    description: str

    def row(self) -> list[str]:
        return [self.recorded, self.id, self.type, self.subtype, self.action, self.outcome, self.agent, self.client,
                self.address, " ".join(self.patients), " ".join(self.entities), self.description]


def entry(event: dict[str, Any]) -> Entry:
    agents = event.get("agent") or [{}]
    agent = next((a for a in agents if a.get("requestor")), agents[0])
    who = agent.get("who") or {}
    patients: list[str] = []
    entities: list[str] = []
    described = ""
    for item in event.get("entity") or []:
        ref = str((item.get("what") or {}).get("reference") or "")
        if ref.startswith("Patient/"):
            patients.append(ref)
        elif ref:
            entities.append(ref)
        if item.get("description") and not described:
            described = str(item["description"])
    subtype = next((str(c.get("code")) for c in event.get("subtype") or [] if c.get("code")), "")
    return Entry(
        id=str(event.get("id") or ""), recorded=str(event.get("recorded") or ""),
        type=str((event.get("type") or {}).get("code") or ""), subtype=subtype, action=str(event.get("action") or ""),
        outcome=str(event.get("outcome") or ""), agent=str(agent.get("name") or who.get("display") or ""),
        client=str(agent.get("altId") or (who.get("identifier") or {}).get("value") or ""),
        address=str((agent.get("network") or {}).get("address") or ""),
        patients=tuple(dict.fromkeys(patients)), entities=tuple(dict.fromkeys(entities)),
        description=str(event.get("outcomeDesc") or described))


@dataclass
class Page:
    entries: list[Entry]
    next_cursor: str | None
    query: str  # the FHIR search it ran, for the audit trail
    agent_names: list[str] = field(default_factory=list)
    contents: tuple[str, ...] = ()  # the events' JSON, so that the console's own audit names their patients


def _run(services: Any, grant: access.Grant, params: list[tuple[str, str]], count: int,
         cursor: str | None) -> tuple[list[Any], str | None]:
    page_params = [*params, ("_count", str(count))] + ([("_cursor", cursor)] if cursor else [])
    settings = services.settings
    with services.store.reading() as repo:
        _, result = search(repo, "AuditEvent", page_params, restrict=grant.restrict, strict=True,
                           default_count=settings.default_page_size, max_count=settings.max_page_size)
    return result.matches, result.next_cursor


def find(services: Any, principal: access.Principal, filters: Filters, cursor: str | None = None,
         count: int = PAGE_SIZE) -> Page:
    """One page of the AuditEvents matching the filters, newest first."""
    grant = access.authorize(principal, "search", "AuditEvent")
    params, names = search_params(services.engine, filters)
    params.append(NEWEST_FIRST)
    matches, next_cursor = _run(services, grant, params, count, cursor)
    contents = tuple(s.content or "" for s in matches)
    return Page([entry(json.loads(c)) for c in contents], next_cursor, "/fhir/AuditEvent?" + urlencode(params),
                names, contents)


def export(services: Any, principal: access.Principal, filters: Filters, fmt: str,
           page_size: int | None = None) -> tuple[str, Iterator[str]]:
    """The search's query and its export as chunks of text, one page of events per chunk (NDJSON: the
    AuditEvents as stored, one a line; CSV: CSV_COLUMNS). Authorized before anything is returned,
    so a refusal is an error rather than a broken download.

    Exported in the order they were stored (oldest first), not newest first as the page lists them:
    the store's keyset then steps along the primary key, where a page sorted by date would look up
    the date of every match again for every page (several times slower, bench/admin_audit.py)."""
    if fmt not in FORMATS:
        raise FilterError("bad-format", fmt)
    grant = access.authorize(principal, "search", "AuditEvent")
    params, _names = search_params(services.engine, filters)
    query = "/fhir/AuditEvent?" + urlencode(params)
    # The largest page the store serves: each page is a query whose cost grows with the matches
    # (the store's keyset paging), so fewer, larger pages; one holds about 1 MB of events.
    size = page_size or services.settings.max_page_size

    def chunks() -> Iterator[str]:
        if fmt == "csv":
            yield _csv([list(CSV_COLUMNS)])
        cursor: str | None = None
        while True:
            matches, cursor = _run(services, grant, params, size, cursor)
            if fmt == "ndjson":
                yield "".join(_one_line(s.content or "") + "\n" for s in matches)
            else:
                yield _csv([entry(json.loads(s.content or "{}")).row() for s in matches])
            if cursor is None:
                return
    return query, chunks()


def _one_line(content: str) -> str:
    """Stored JSON is compact already; anything else is made so (NDJSON is one resource a line)."""
    return content if "\n" not in content and "\r" not in content else json.dumps(json.loads(content))


# Spreadsheet programs run a cell that starts with one of these as a formula (CSV injection): such a
# cell is written with a leading apostrophe, which they show as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerows([["'" + v if v.startswith(_FORMULA_START) else v for v in row] for row in rows])
    return out.getvalue()


def filename(fmt: str, now: datetime) -> str:
    return f"audit-{now.strftime('%Y%m%dT%H%M%SZ')}.{fmt}"
