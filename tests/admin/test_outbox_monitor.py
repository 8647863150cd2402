"""The outbox monitor: destinations with their counts, last error and delivery rate; the item list
with filters and paging; retry and cancel through the console, which the worker then honours (a
cancelled item is never sent, a retried one is); every action audited."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, insert, select

from gateway import db, metrics
from gateway.admin import outbox as service
from gateway.upstream.outbox import Worker, cancel_item
from tests.portal.conftest import csrf_of, text_of
from tests.upstream import records
from tests.upstream.conftest import Receiver

KINDS = ("appointment_request", "appointment_cancel", "refill_request", "message")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def settings(settings: Any, receiver: Receiver) -> Any:
    for kind in KINDS:
        setattr(settings, f"outbox_{kind}", "hl7")
    settings.outbox_mllp_port = receiver.port
    settings.outbox_ack_timeout = 1.0
    return settings


@pytest.fixture
def services(app: Any, request: pytest.FixtureRequest) -> Any:
    """The gateway with the test's patient and an empty outbox. A test that signs in to the console
    gets the demo family (`world`) first: their messages to the care team are queued too, and are
    cleared here with the rest."""
    if "console" in request.fixturenames:
        request.getfixturevalue("world")
    services = app.extensions["gateway"]
    with services.store.writing() as repo:
        repo.update("Patient", "p1", records.patient())
        repo.update("Practitioner", "dr1", records.practitioner())
        repo.conn.execute(delete(db.outbox))
    return services


def queue(services: Any, *resources: dict[str, Any]) -> list[int]:
    """Write patient-side records; returns the ids of the outbox items they queued, in order."""
    with services.engine.connect() as conn:
        last = conn.execute(select(db.outbox.c.id).order_by(db.outbox.c.id.desc()).limit(1)).scalar() or 0
    for resource in resources:
        with services.store.writing() as repo:
            repo.create(resource, resource_id=resource["id"])
    with services.engine.connect() as conn:
        return list(conn.execute(select(db.outbox.c.id).where(db.outbox.c.id > last).order_by(db.outbox.c.id))
                    .scalars())


def status_of(services: Any, item_id: int) -> Any:
    with services.engine.connect() as conn:
        return conn.execute(select(db.outbox).where(db.outbox.c.id == item_id)).one()


def console_events(services: Any, action: str) -> list[dict[str, Any]]:
    services.audit.flush()
    with services.engine.connect() as conn:
        contents = conn.execute(select(db.resource.c.content).where(db.resource.c.resource_type == "AuditEvent"))
        events = [json.loads(c) for c in contents.scalars()]
    return [e for e in events if e["subtype"][0]["code"] == action]


def test_destinations_count_each_status_with_the_last_error_and_the_delivery_rate(services: Any,
                                                                                  receiver: Receiver) -> None:
    worker = Worker(services.store, services.settings)
    (delivered,) = queue(services, records.message("c1"))
    assert worker.run_once() == 1
    receiver.mode = "AE"
    (failed,) = queue(services, records.appointment("a1"))
    worker.run_once()
    pending, cancelled = queue(services, records.message("c2"), records.message("c3"))
    cancel_item(services.store, cancelled)
    metrics.flush()
    minute = int(time.time() * 1000) // 60_000 * 60_000
    metrics.add_rows(services.engine, [
        {"minute_ms": minute - ago * 60_000, "name": metrics.DELIVERY_ROLLUP, "label": "delivered message hl7",
         "count": count, "total": 0.0, "peak": 0.0} for ago, count in ((1, 7), (60, 5), (1440, 100))])
    found = {(d.kind, d.channel): d for d in service.destinations(services.engine, services.settings)}
    assert set(found) == {("appointment-request", "hl7"), ("appointment-cancel", "hl7"), ("refill-request", "hl7"),
                          ("message", "hl7")}  # configured ones even without items
    message = found[("message", "hl7")]
    assert message.counts == {"pending": 1, "failed": 0, "cancelled": 1}
    assert message.depth == 1 and message.due_now == 1 and message.last_error is None
    assert message.delivered_last_minute == 7 and message.delivered_last_hour == 8
    assert message.delivered_last_day == 8 + 5
    assert message.endpoint == f"127.0.0.1:{receiver.port}" and message.configured
    request = found[("appointment-request", "hl7")]
    assert request.counts["failed"] == 1 and request.last_error_item == failed
    assert request.last_error.startswith("AE") and request.delivered_last_hour == 0
    assert found[("refill-request", "hl7")].counts == dict.fromkeys(service.OPEN_STATUSES, 0)
    assert delivered and pending


def test_an_item_the_configuration_no_longer_sends_shows_where_it_would_go_without_credentials(
        services: Any) -> None:
    services.settings.upstream_fhir_url = "https://robot:hunter2@ehr.example:8443/fhir?tenant=1"
    with services.store.writing() as repo:
        repo.conn.execute(insert(db.outbox).values(
            kind="refill-request", channel="fhir", status="failed", resource_type="Task", resource_id="t9",
            version_id=1, patient_id="p1", idempotency_key="GWfhir1", payload="{}", attempts=3, next_attempt_ms=0,
            created_at="2026-11-01T10:00:00.000Z", last_error="422 Unprocessable"))
    found = {(d.kind, d.channel): d for d in service.destinations(services.engine, services.settings)}
    fhir = found[("refill-request", "fhir")]
    assert fhir.endpoint == "https://ehr.example:8443/fhir" and not fhir.configured
    assert fhir.counts["failed"] == 1 and fhir.last_error == "422 Unprocessable"
    assert [d.configured for d in found.values()].count(False) == 1


def test_a_cancelled_item_is_never_sent_and_a_retried_one_is(services: Any, console: Any,
                                                              receiver: Receiver) -> None:
    worker = Worker(services.store, services.settings)
    receiver.mode = "AE"
    (failed,) = queue(services, records.appointment("a1"))
    worker.run_once()
    assert status_of(services, failed).status == "failed"
    (waiting,) = queue(services, records.message("c1"))
    driver = console("operator")
    html = driver.get("/admin/outbox")
    assert f'id="tick-{failed}"' in html and f'id="tick-{waiting}"' in html
    # cancel asks first, and changes nothing until confirmed
    reply = driver.post("/admin/outbox", {"item": [str(waiting)], "action": "cancel"})
    assert reply.status_code == 200 and "Cancel 1 item?" in text_of(driver.last_html)
    assert status_of(services, waiting).status == "pending"
    reply = driver.client.post("/admin/outbox", data={"csrf_token": csrf_of(driver.last_html), "item": str(waiting),
                                                      "action": "cancel-confirmed"}, follow_redirects=True)
    assert reply.status_code == 200
    assert f"Item {waiting} is cancelled: it will not be sent." in text_of(reply.get_data(as_text=True))
    assert status_of(services, waiting).status == "cancelled"
    receiver.mode = "AA"
    reply = driver.post("/admin/outbox?status=failed", {"item": [str(failed)], "action": "retry"})
    assert f"Item {failed} will be sent again now." in text_of(driver.last_html)
    assert status_of(services, failed).status == "pending"
    assert worker.run_once() == 1  # the retried item; never the cancelled one
    assert worker.run_once() == 0
    sent = status_of(services, failed)
    assert sent.status == "delivered"
    assert receiver.received == [sent.idempotency_key, sent.idempotency_key]  # the NAKed try, then the retry
    assert status_of(services, waiting).status == "cancelled"
    (retried,) = console_events(services, "execute-retry")
    assert retried["agent"][0]["name"] == f"staff:{driver.username}"
    assert {e["what"]["reference"] for e in retried["entity"]} >= {"Appointment/a1", "Patient/p1"}
    (cancelled,) = console_events(services, "update-outbox")
    assert f"{waiting} cancelled" in cancelled["outcomeDesc"]


def test_a_request_cancelled_in_the_outbox_takes_its_cancellation_with_it(services: Any,
                                                                           receiver: Receiver) -> None:
    (request,) = queue(services, records.appointment("a1"))
    assert cancel_item(services.store, request).outcome == "cancelled"
    with services.store.writing() as repo:  # the patient cancels the appointment afterwards
        repo.update("Appointment", "a1", {**records.appointment("a1"), "status": "cancelled"})
    worker = Worker(services.store, services.settings)
    assert worker.run_once() == 1
    with services.engine.connect() as conn:
        cancellation = conn.execute(select(db.outbox).where(db.outbox.c.kind == "appointment-cancel")).one()
    assert cancellation.status == "failed" and "cancelled in the outbox" in cancellation.last_error
    assert receiver.received == []


def test_what_cannot_be_retried_or_cancelled_is_said_on_the_page(services: Any, console: Any) -> None:
    worker = Worker(services.store, services.settings)
    delivered, cancelled = queue(services, records.message("c1"), records.message("c2"))
    cancel_item(services.store, cancelled)
    worker.run_once()
    assert status_of(services, delivered).status == "delivered"
    driver = console("operator")
    driver.post("/admin/outbox", {"item": [str(delivered), str(cancelled), "999999"], "action": "retry"})
    said = text_of(driver.last_html)
    assert f"Item {delivered} was delivered already" in said
    assert f"Item {cancelled} is cancelled; a cancelled item is not sent again." in said
    assert "There is no item 999999." in said
    assert status_of(services, cancelled).status == "cancelled"
    for data, message in (({"action": "retry"}, "Tick the items to retry or cancel first."),
                          ({"action": "retry", "item": ["x1"]}, "could not be read"),
                          ({"action": "explode", "item": [str(delivered)]}, "Choose retry or cancel."),
                          ({"action": "retry", "item": [str(n) for n in range(1, 102)]}, "At most 100 items")):
        reply = driver.post("/admin/outbox", data)
        assert reply.status_code == 400 and message in text_of(driver.last_html), data
    assert console_events(services, "update-outbox") == []


def test_filters_and_pages_of_items(services: Any, console: Any) -> None:
    with services.store.writing() as repo:
        repo.conn.execute(insert(db.outbox), [
            {"kind": "message", "channel": "hl7", "status": "failed" if n % 5 == 0 else "delivered",
             "resource_type": "Communication", "resource_id": f"m{n}", "version_id": 1,
             "patient_id": "p2" if n == 7 else "p1", "idempotency_key": f"GWKEY{n:04d}", "payload": "MSH|",
             "attempts": 1, "next_attempt_ms": 0, "created_at": "2026-11-01T10:00:00.000Z"} for n in range(1, 61)])
    driver = console("operator")
    first = driver.get("/admin/outbox")
    assert len(re.findall(r'<tr id="item-', first)) == 50
    older = re.search(r'href="([^"]+)" id="older-items"', first)
    assert older is not None
    second = driver.get(older.group(1).replace("&amp;", "&"))
    assert len(re.findall(r'<tr id="item-', second)) == 10 and 'id="older-items"' not in second
    failed = driver.get("/admin/outbox?status=failed")
    assert len(re.findall(r'<tr id="item-', failed)) == 12 and "status-delivered" not in failed
    assert len(re.findall(r'<tr id="item-', driver.get("/admin/outbox?patient=p2"))) == 1
    assert len(re.findall(r'<tr id="item-', driver.get("/admin/outbox?key=GWKEY0042"))) == 1
    assert "No items match." in text_of(driver.get("/admin/outbox?kind=refill-request"))
    for bad, message in (("status=lost", "Choose a status from the list."),
                         ("patient=%3Cscript%3E", "A patient id has 1 to 64 letters"),
                         ("before=abc", "That page does not exist."),
                         ("channel=fax", "Choose a channel from the list.")):
        html = driver.get(f"/admin/outbox?{bad}", status=400)
        assert message in text_of(html) and '<tr id="item-' not in html, bad
    searches = console_events(services, "search-outbox")
    assert any((e.get("entity") or [{}])[-1].get("description") == "status=failed" for e in searches)


def test_an_item_page_shows_the_message_and_is_audited(services: Any, console: Any) -> None:
    (item,) = queue(services, records.appointment("a1"))
    driver = console("operator")
    html = driver.get(f"/admin/outbox/{item}")
    assert "SRM^S01" in html and 'id="item-payload"' in html and 'id="item-status" class="status-pending"' in html
    assert 'href="/admin/resources/Appointment/a1" id="item-record"' in html  # into the resource view
    assert text_of(html).count("Cancel: never send it") == 1
    driver.post(f"/admin/outbox/{item}", {"item": [str(item)], "action": "cancel"})
    assert "Cancel this item?" in text_of(driver.last_html)
    driver.get(f"/admin/outbox/{item + 1000}", status=404)
    (viewed, *_more) = console_events(services, "view-outbox")
    assert {e["what"]["reference"] for e in viewed["entity"]} >= {"Patient/p1", "Appointment/a1"}


def test_only_operators_reach_the_outbox(services: Any, console: Any) -> None:
    (item,) = queue(services, records.message("c1"))
    for role in ("front-desk", "security-officer"):
        driver = console(role)
        assert driver.client.get("/admin/outbox").status_code == 403
        token = csrf_of(driver.get("/admin/"))
        reply = driver.client.post("/admin/outbox", data={"csrf_token": token, "item": str(item),
                                                          "action": "cancel-confirmed"})
        assert reply.status_code == 403
    assert status_of(services, item).status == "pending"


def test_the_cli_cancels_as_the_console_does(services: Any, settings: Any) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    (item,) = queue(services, records.message("c1"))
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_AUDIT_ENABLED": "0",
                            "GATEWAY_INSTANCE_PATH": settings.instance_path})
    assert runner.invoke(main, ["outbox", "cancel", str(item)]).output.strip().endswith("it will not be sent")
    assert runner.invoke(main, ["outbox", "cancel", str(item)]).output.strip().endswith("cancelled already")
    assert runner.invoke(main, ["outbox", "retry", str(item)]).output.strip().endswith("not sent again")
    listed = runner.invoke(main, ["outbox", "list", "--status", "cancelled"]).output
    assert "1 items with status cancelled" in listed and "Communication/c1" in listed
    assert runner.invoke(main, ["outbox", "cancel", "999999"]).exit_code != 0
