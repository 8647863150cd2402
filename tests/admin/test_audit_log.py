"""The audit log in the console: each filter, paging, both export formats, and who may search."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from gateway import access
from gateway.admin import audit as service
from gateway.audit import AuditRecord, audit_events
from gateway.fhir.outcome import FhirError
from gateway.smart_auth.models import auth_user, proxy_grant
from tests.admin.conftest import new_staff
from tests.portal.conftest import text_of

YEAR = ("2020-01-01", "2020-12-31")  # the events below; whatever the test set-up itself audits is today


@pytest.fixture
def events(app: Any, world: Any) -> dict[str, str]:
    """Audit events with known agents, clients, patients and dates; name -> id."""
    services = app.extensions["gateway"]
    new_staff(services.engine, "security-officer", username="ana")
    with services.engine.connect() as conn:
        maria = conn.execute(select(auth_user.c.id).where(auth_user.c.username == "maria")).scalar_one()
        related = conn.execute(select(proxy_grant.c.related_person).where(
            proxy_grant.c.user_id == maria, proxy_grant.c.patient_id == "sofia-garcia")).scalar_one()
    plan = {  # name: (interaction, agent, client, entities, recorded)
        "maria-read": ("read", "Patient/maria-garcia", "portal", ("Patient/maria-garcia",), "2020-01-10T10:00:00Z"),
        "maria-as-proxy": ("search", f"RelatedPerson/{related}", "public-app", ("Patient/sofia-garcia",),
                           "2020-01-11T09:00:00Z"),
        "robert-app": ("search", "Patient/robert-chen", "other-app", ("Patient/robert-chen",), "2020-01-12T08:00:00Z"),
        "ana-create": ("console:create-client", "staff:ana", None, (), "2020-01-15T12:00:00Z"),
        "ana-revoke": ("console:execute-revoke-grant", "staff:ana", None, ("Patient/sofia-garcia",),
                       "2020-01-20T12:00:00Z"),
        "anabel-read": ("read", "staff:anabel", None, ("Patient/daniel-garcia",), "2020-01-20T13:00:00Z"),
        "formula": ("read", "=HYPERLINK(\"http://evil.example\")", "odd,client|id", ("Patient/linda-chen",),
                    "2020-02-01T00:00:00Z"),
    }
    ids = {}
    with services.store.writing() as repo:
        for name, (interaction, agent, client, entities, recorded) in plan.items():
            record = AuditRecord(interaction, agent, client, "10.0.0.9", "0", None, entities, (), recorded)
            (event,) = audit_events(record, set())
            ids[name] = repo.create(event).stored.id
    return ids


def _principal(*roles: str) -> access.Principal:
    return access.principal_for_staff(username="ana", roles=set(roles))


def _found(app: Any, **filters: str) -> list[str]:
    """The ids of the 2020 events matching the filters, newest first, through every page."""
    services = app.extensions["gateway"]
    args = {"from": YEAR[0], "to": YEAR[1], **filters}
    parsed = service.parse_filters(args)
    out: list[str] = []
    cursor = None
    while True:
        page = service.find(services, _principal("security-officer"), parsed, cursor=cursor, count=2)
        out += [e.id for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            return out


def test_each_filter_finds_its_events(app: Any, events: dict[str, str]) -> None:
    ids = {v: k for k, v in events.items()}

    def names(**filters: str) -> list[str]:
        return [ids.get(i, i) for i in _found(app, **filters)]

    # Newest first, paged two at a time without repeats.
    assert names() == ["formula", "anabel-read", "ana-revoke", "ana-create", "robert-app", "maria-as-proxy",
                       "maria-read"]
    assert names(patient="sofia-garcia") == ["ana-revoke", "maria-as-proxy"]
    assert names(patient="Patient/robert-chen") == ["robert-app"]
    # A username finds the login under every name it acts as: its own record and the RelatedPerson of
    # a proxy relationship; a staff login's console actions; "ana" is not a prefix of "anabel".
    assert names(user="maria") == ["maria-as-proxy", "maria-read"]
    assert names(user="ana") == ["ana-revoke", "ana-create"]
    assert names(user="staff:anabel") == ["anabel-read"]
    assert names(client="public-app") == ["maria-as-proxy"]
    assert names(client="odd,client|id") == ["formula"]
    assert names(action="create-client") == ["ana-create"]
    assert names(action="r") == ["formula", "anabel-read", "maria-read"]
    assert names(action="search-type") == ["robert-app", "maria-as-proxy"]
    assert names(**{"from": "2020-01-12", "to": "2020-01-20"}) == ["anabel-read", "ana-revoke", "ana-create",
                                                                    "robert-app"]
    assert names(user="ana", patient="sofia-garcia") == ["ana-revoke"]
    assert names(user="nobody-at-all") == []


def test_search_page_and_its_own_audit(app: Any, console: Any, events: dict[str, str]) -> None:
    officer = console("security-officer")
    # The first visit lists the last day: none of the 2020 events.
    html = officer.get("/admin/audit")
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    assert f'name="from" value="{yesterday}"' in html and events["formula"] not in html
    html = officer.get(f"/admin/audit?patient=sofia-garcia&from={YEAR[0]}&to={YEAR[1]}")
    assert html.count('class="audit-event"') == 2
    assert events["ana-revoke"] in html and events["maria-as-proxy"] in html
    assert "staff:ana" in text_of(html) and "execute-revoke-grant" in text_of(html)
    # The search itself is audited under the officer's name, in the log of the patient whose events it showed.
    app.extensions["gateway"].audit.flush()
    html = officer.get(f"/admin/audit?patient=sofia-garcia&user={officer.username}&action=search-audit")
    assert html.count('class="audit-event"') == 1
    # A page of 50 with more after it links to the older ones.
    services = app.extensions["gateway"]
    with services.store.writing() as repo:
        repo.create_many([audit_events(AuditRecord("read", "staff:bulk", None, None, "0", None, (), (),
                                                   f"2020-03-01T00:00:{i:02d}Z"), set())[0] for i in range(55)])
    html = officer.get("/admin/audit?user=staff:bulk")
    assert html.count('class="audit-event"') == 50 and 'id="audit-older"' in html


BAD_FILTERS = [
    ("from=2020-13-01", "first day as a date"),
    ("to=yesterday", "last day as a date"),
    ("from=2020-02-01&to=2020-01-01", "comes before the first day"),
    ("action=Z", "one of C, R, U, D or E"),
    ("patient=Patient/a/b", "Patient/ID"),
    ("cursor=not-a-cursor", "Invalid paging cursor"),
]


def test_bad_filters_say_why(console: Any) -> None:
    officer = console("security-officer")
    for query, message in BAD_FILTERS:
        reply = officer.client.get(f"/admin/audit?{query}")
        assert reply.status_code == 400, query
        assert message in text_of(reply.get_data(as_text=True)), query


def test_exports(app: Any, console: Any, events: dict[str, str]) -> None:
    officer = console("security-officer")
    filters = {"from": YEAR[0], "to": YEAR[1]}
    reply = officer.post("/admin/audit/export", {**filters, "format": "ndjson"}, page="/admin/audit")
    assert reply.status_code == 200 and reply.mimetype == "application/x-ndjson"
    assert reply.headers["Content-Disposition"].startswith('attachment; filename="audit-')
    lines = reply.get_data(as_text=True).splitlines()
    exported = [json.loads(line) for line in lines]
    assert [e["id"] for e in exported] == list(reversed(_found(app)))  # stored order, oldest first
    assert all(e["resourceType"] == "AuditEvent" for e in exported)

    reply = officer.post("/admin/audit/export", {**filters, "patient": "sofia-garcia", "format": "csv"},
                         page="/admin/audit")
    assert reply.status_code == 200 and reply.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(reply.get_data(as_text=True))))
    assert [r["id"] for r in rows] == [events["maria-as-proxy"], events["ana-revoke"]]
    assert rows[1]["agent"] == "staff:ana" and rows[1]["subtype"] == "execute-revoke-grant"
    assert rows[1]["patients"] == "Patient/sofia-garcia" and rows[0]["client"] == "public-app"
    # A cell a spreadsheet would run as a formula is written as text.
    reply = officer.post("/admin/audit/export", {"client": "odd,client|id", "format": "csv"}, page="/admin/audit")
    (row,) = list(csv.DictReader(io.StringIO(reply.get_data(as_text=True))))
    assert row["agent"] == "'=HYPERLINK(\"http://evil.example\")" and row["client"] == "odd,client|id"
    # Each export is audited with the search it ran.
    app.extensions["gateway"].audit.flush()
    assert len(_found(app, action="export-audit", **{"from": "", "to": ""})) == 3
    bad = officer.post("/admin/audit/export", {"format": "xml"}, page="/admin/audit")
    assert bad.status_code == 400


def test_an_export_is_read_and_sent_page_by_page(app: Any, events: dict[str, str]) -> None:
    services = app.extensions["gateway"]
    filters = service.parse_filters({"from": YEAR[0], "to": YEAR[1]})
    reads = []
    original = service._run

    def counting(*args: Any) -> Any:
        matches, cursor = original(*args)
        reads.append(len(matches))
        return matches, cursor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "_run", counting)
        _query, chunks = service.export(services, _principal("security-officer"), filters, "ndjson", page_size=3)
        first = next(chunks)
        assert reads == [3] and first.count("\n") == 3  # the first page is out before the second is read
        rest = list(chunks)
    assert reads == [3, 3, 1] and sum(c.count("\n") for c in rest) == 4


def test_only_the_security_officer_searches_the_audit_log(app: Any, console: Any, events: dict[str, str]) -> None:
    services = app.extensions["gateway"]
    with pytest.raises(FhirError) as refused:
        service.find(services, _principal("front-desk"), service.Filters())
    assert refused.value.status == 403
    for role in ("operator", "front-desk"):
        driver = console(role)
        assert driver.client.get("/admin/audit").status_code == 403
        reply = driver.post("/admin/audit/export", {"format": "ndjson"}, page="/admin/")
        assert reply.status_code == 403 and "application/x-ndjson" not in reply.content_type
