"""Requests to staff: a copy of the medical records and a chart correction become Tasks for staff;
the list shows their status; one test per bad input on each form."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from typing import Any

import pytest

from gateway.fhir.search import search
from gateway.portal.staff_requests import STAFF_REQUEST
from tests.portal.conftest import Portal, browser_sign_in, shot, text_of


def _tasks(app: Any, patient: str) -> list[dict[str, Any]]:
    with app.extensions["gateway"].store.reading() as repo:
        _, result = search(repo, "Task", [("patient", f"Patient/{patient}"), ("_count", "200")])
    return [json.loads(s.content) for s in result.matches]


def _inputs(task: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for item in task["input"]:
        (coding,) = item["type"]["coding"]
        assert coding["system"] == STAFF_REQUEST
        value = next(v for k, v in item.items() if k.startswith("value"))
        out.append((coding["code"], value))
    return out


RECORDS_OK = {"parts": ["visit-notes", "test-results"], "date_from": "2025-01-01", "date_to": "2026-06-30",
              "delivery": "email", "email": "linda.chen@example.org", "mail_address": "", "note": ""}
CORRECTION_OK = {"section": "allergies", "wrong": "It lists a penicillin allergy.",
                 "should_say": "No known drug allergies; the rash in 2019 was from a virus."}


def test_a_records_request_becomes_a_task_for_staff(portal: Portal, app: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    html = portal.get("/requests/records")
    form = re.search(r'<form id="records-request-form".*?</form>', html, re.S)
    assert form
    for name in ("parts", "date_from", "date_to", "delivery", "mail_address", "email", "note"):
        assert f'name="{name}"' in form.group(0)
    reply = portal.post("/requests/records", RECORDS_OK, follow=False)
    assert reply.status_code == 302 and "/requests?made=" in reply.headers["Location"]
    (task,) = _tasks(app, "robert-chen")
    assert (task["status"], task["intent"]) == ("requested", "order")
    assert task["for"] == {"reference": "Patient/robert-chen"}
    assert task["requester"]["reference"].startswith("RelatedPerson/")
    assert task["requester"]["display"] == "Linda Mei Chen"
    assert task["owner"] == {"reference": "Organization/riverside-general"}
    assert task["code"]["coding"][0] == {"system": STAFF_REQUEST, "code": "records-copy",
                                         "display": "Copy of medical records"}
    assert _inputs(task) == [("part", "visit-notes"), ("part", "test-results"), ("period-start", "2025-01-01"),
                             ("period-end", "2026-06-30"), ("delivery", "email"),
                             ("email-address", "linda.chen@example.org")]
    assert "linda.chen@example.org" in task["description"] and "visit-notes" in task["description"]
    # the outbox does not take it for a refill request
    listing = text_of(portal.get(reply.headers["Location"]))
    assert "Your request was sent to the clinic's staff." in listing
    assert "Copy of medical records" in listing and "Received" in listing and "By email" in listing


def test_a_correction_request_becomes_a_task_and_its_status_shows(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    html = portal.get("/requests/correction")
    form = re.search(r'<form id="correction-form".*?</form>', html, re.S)
    assert form and all(f'name="{n}"' in form.group(0) for n in ("section", "wrong", "should_say"))
    reply = portal.post("/requests/correction", CORRECTION_OK, follow=False)
    assert reply.status_code == 302
    (task,) = _tasks(app, "daniel-garcia")
    assert task["requester"]["reference"] == "Patient/daniel-garcia"
    assert task["code"]["coding"][0]["code"] == "chart-correction"
    assert _inputs(task) == [("chart-section", "allergies"), ("what-is-wrong", CORRECTION_OK["wrong"]),
                             ("should-say", CORRECTION_OK["should_say"])]
    # staff move it on and answer
    with app.extensions["gateway"].store.writing() as repo:
        repo.update("Task", task["id"], {**task, "status": "completed",
                                         "note": [{"text": "Corrected on December 1."}]}, None)
    listing = text_of(portal.get("/requests"))
    assert "Completed" in listing and "Corrected on December 1." in listing and "Received" not in listing


def test_the_list_shows_only_this_records_requests(portal: Portal, app: Any) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    portal.post("/requests/correction", CORRECTION_OK)
    assert "Correction to the chart" in text_of(portal.get("/requests"))
    portal.choose("daniel-garcia")
    assert "Correction to the chart" not in text_of(portal.get("/requests"))
    assert "There are no requests for this record yet." in text_of(portal.last_html)
    # another kind of Task in the record (a refill request) is not one of these
    with app.extensions["gateway"].store.writing() as repo:
        repo.create({"resourceType": "Task", "status": "requested", "intent": "order",
                     "for": {"reference": "Patient/daniel-garcia"},
                     "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}})
    assert "There are no requests for this record yet." in text_of(portal.get("/requests"))


def test_the_teens_confidential_request_is_hidden_from_his_mother(portal: Portal, app: Any) -> None:
    with app.extensions["gateway"].store.writing() as repo:
        repo.create({"resourceType": "Task", "status": "requested", "intent": "order",
                     "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                            "code": "R"}]},
                     "for": {"reference": "Patient/daniel-garcia"}, "authoredOn": "2026-11-01T10:00:00Z",
                     "code": {"coding": [{"system": STAFF_REQUEST, "code": "records-copy"}]}})
    portal.sign_in("maria")
    portal.choose("daniel-garcia")
    assert "Copy of medical records" not in text_of(portal.get("/requests"))
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    assert "Copy of medical records" in text_of(teen.get("/requests"))


def test_an_ended_relationship_closes_the_requests(portal: Portal, app: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    portal.world.smart.revoke_proxy("linda", "robert-chen")
    reply = portal.post("/requests/correction", CORRECTION_OK, page="/requests")
    assert reply.status_code == 200 and "You are viewing your own record." in text_of(portal.last_html)
    assert _tasks(app, "robert-chen") == []


def test_mail_and_portal_delivery(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    portal.post("/requests/records", {**RECORDS_OK, "parts": ["whole-record"], "date_from": "", "date_to": "",
                                      "delivery": "mail", "mail_address": "48 Maple Street\nSpringfield MA"})
    portal.post("/requests/records", {**RECORDS_OK, "parts": ["immunizations"], "delivery": "portal",
                                      "email": ""})
    tasks = sorted(_tasks(app, "daniel-garcia"), key=lambda t: len(t["input"]))
    assert [_inputs(t) for t in tasks] == [
        [("part", "whole-record"), ("delivery", "mail"), ("mail-address", "48 Maple Street\nSpringfield MA")],
        [("part", "immunizations"), ("period-start", "2025-01-01"), ("period-end", "2026-06-30"),
         ("delivery", "portal")]]


TOMORROW = (date.today() + timedelta(days=1)).isoformat()


@pytest.mark.parametrize(("change", "message"), [
    ({"parts": []}, "Choose at least one part of the record."),
    ({"parts": ["everything-ever"]}, "Choose parts of the record from the list."),
    ({"date_from": "01/02/2025"}, "Enter the date as YYYY-MM-DD."),
    ({"date_to": "2025-02-30"}, "Enter the date as YYYY-MM-DD."),
    ({"date_from": "1850-01-01"}, "The start date is too far in the past."),
    ({"date_from": TOMORROW, "date_to": ""}, "The start date cannot be in the future."),
    ({"date_to": TOMORROW}, "The end date cannot be in the future."),
    ({"date_from": "2026-01-01", "date_to": "2025-01-01"}, "The end date must be on or after the start date."),
    ({"delivery": ""}, "Choose how you would like to receive the copy."),
    ({"delivery": "fax"}, "Choose how you would like to receive the copy."),
    ({"delivery": "mail", "mail_address": "  "}, "Enter the mailing address for the copy."),
    ({"delivery": "mail", "mail_address": "x" * 501}, "The address can be at most 500 characters."),
    ({"email": ""}, "Enter the email address for the copy."),
    ({"email": "linda.example.org"}, "Enter a valid email address, like name@example.com."),
    ({"email": "a@" + "b" * 250 + ".org"}, "The email address can be at most 254 characters."),
    ({"note": "x" * 2001}, "The note can be at most 2,000 characters."),
], ids=["no-part", "unknown-part", "from-wrong-format", "to-not-a-date", "from-too-early", "from-future",
        "to-future", "to-before-from", "no-delivery", "unknown-delivery", "mail-without-address",
        "address-too-long", "email-without-address", "bad-email", "email-too-long", "note-too-long"])
def test_records_request_refuses_bad_input(portal: Portal, app: Any, change: dict[str, Any], message: str) -> None:
    portal.sign_in("daniel")
    reply = portal.post("/requests/records", {**RECORDS_OK, **change})
    assert reply.status_code == 400
    assert 'role="alert"' in portal.last_html and message in text_of(portal.last_html)
    assert _tasks(app, "daniel-garcia") == []


@pytest.mark.parametrize(("change", "message"), [
    ({"section": ""}, "Choose a part of the chart from the list."),
    ({"section": "the-whole-hospital"}, "Choose a part of the chart from the list."),
    ({"wrong": ""}, "Say what is wrong in the chart."),
    ({"wrong": " \n "}, "Say what is wrong in the chart."),
    ({"wrong": "x" * 2001}, "This can be at most 2,000 characters."),
    ({"should_say": ""}, "Say what the chart should say instead."),
    ({"should_say": "x" * 2001}, "This can be at most 2,000 characters."),
], ids=["no-section", "unknown-section", "no-wrong", "blank-wrong", "wrong-too-long", "no-should-say",
        "should-say-too-long"])
def test_correction_refuses_bad_input(portal: Portal, app: Any, change: dict[str, Any], message: str) -> None:
    portal.sign_in("daniel")
    reply = portal.post("/requests/correction", {**CORRECTION_OK, **change})
    assert reply.status_code == 400
    assert 'role="alert"' in portal.last_html and message in text_of(portal.last_html)
    assert _tasks(app, "daniel-garcia") == []


def test_request_forms_refuse_a_missing_csrf_token(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    assert portal.client.post("/requests/records", data=RECORDS_OK).status_code == 400
    assert portal.client.post("/requests/correction", data=CORRECTION_OK).status_code == 400
    assert _tasks(app, "daniel-garcia") == []


def test_browser_caregiver_sends_a_records_request(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "linda")
    page.check("#pick-robert-chen")
    page.click("#record-picker button[type=submit]")
    page.click("nav >> text=Requests")
    page.wait_for_selector("#new-records-request")
    shot(page, "requests-list-empty")
    page.click("#new-records-request")
    shot(page, "requests-records")
    page.check("#part-test-results")
    page.check("#delivery-email")
    page.fill("#email", "not-an-address")
    page.click("#records-request-form button[type=submit]")
    page.wait_for_selector("#form-errors")
    shot(page, "requests-records-errors")
    page.fill("#email", "linda.chen@example.org")
    page.fill("#date_from", "2025-01-01")
    page.click("#records-request-form button[type=submit]")
    page.wait_for_selector("#request-sent")
    assert "Copy of medical records" in page.inner_text("#staff-requests")
    assert "Received" in page.inner_text("#staff-requests")
    shot(page, "requests-list")
    page.click("#new-correction-request")
    shot(page, "requests-correction")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "requests-correction-phone")
    page.goto("/requests/records")
    shot(page, "requests-records-phone")
    page.goto("/requests")
    shot(page, "requests-list-phone")


def test_another_patients_task_is_not_in_this_record(app: Any, world: Any) -> None:
    """Task is outside R4's patient compartment; the gateway puts it in by Task.for, so a request
    for one patient is never readable or writable from another patient's record."""
    from gateway import access
    from gateway.fhir.outcome import FhirError
    from gateway.portal.record import NotVisible, Record

    services = app.extensions["gateway"]
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "for": {"reference": "Patient/robert-chen"},
            "code": {"coding": [{"system": STAFF_REQUEST, "code": "records-copy"}]}}
    with services.store.writing() as repo:
        task_id = repo.create(task).stored.id
    principal = access.principal_for_portal(fhir_user="Patient/maria-garcia", patient_id="sofia-garcia",
                                            acting_for={"maria-garcia": False, "sofia-garcia": False})
    record = Record(services, principal, "sofia-garcia")
    with pytest.raises(NotVisible):
        record.read("Task", task_id)
    assert record.search("Task", [("patient", "Patient/robert-chen")]).matches == []
    assert record.search("Task", []).matches == []
    with pytest.raises(FhirError):
        record.create(task)
