"""Medications: active and past prescriptions, refill requests (a Task the outbox sends on), their
status, the home page's refills due, and who may ask for what."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select

from gateway import db
from tests.portal.conftest import Portal, browser_sign_in, shot, text_of

TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"


def _tasks(store: Any, focus: str) -> list[dict[str, Any]]:
    with store.reading() as repo:
        rows = repo.conn.execute(select(db.resource.c.content).where(
            db.resource.c.resource_type == "Task", db.resource.c.deleted.is_(False))).scalars()
        import json

        return [t for t in (json.loads(r) for r in rows) if t.get("focus", {}).get("reference") == focus]


def _prescription(store: Any, rid: str, patient: str, days_ago: int, supply: int = 90, repeats: int = 3,
                  status: str = "active") -> None:
    authored = date.today() - timedelta(days=days_ago)
    with store.writing() as repo:
        repo.create({"resourceType": "MedicationRequest", "status": status, "intent": "order",
                     "medicationCodeableConcept": {"text": f"Test medicine {rid}"},
                     "subject": {"reference": f"Patient/{patient}"}, "authoredOn": authored.isoformat(),
                     "requester": {"reference": "Practitioner/emily-carter", "display": "Dr. Emily Carter, MD"},
                     "dosageInstruction": [{"text": "Take 1 tablet daily."}],
                     "dispenseRequest": {"validityPeriod": {"start": authored.isoformat(),
                                                            "end": (authored + timedelta(days=365)).isoformat()},
                                         "numberOfRepeatsAllowed": repeats,
                                         "expectedSupplyDuration": {"value": supply, "unit": "days",
                                                                    "system": "http://unitsofmeasure.org",
                                                                    "code": "d"}}}, resource_id=rid)


def _refill(portal: Portal, rid: str, note: str = "") -> Any:
    return portal.post(f"/medications/{rid}/refill", {"note": note}, page="/medications")


def test_active_and_past_prescriptions(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    html = portal.get("/medications")
    active = text_of(re.search(r'id="active-medications".*?</ul>\s*</section>', html, re.S).group(0))
    past = text_of(re.search(r'id="past-medications".*?</ul>\s*</section>', html, re.S).group(0))
    assert "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet" in active
    assert "Take 1 tablet (500 mg) by mouth once daily with the evening meal." in html or "metformin" in active
    assert "Dr. Emily Carter, MD" in active and "Refills left 3" in active
    assert "loratadine" in past.lower() and "Stopped" in past
    assert "loratadine" not in active.lower()
    assert 'id="refill-maria-garcia-rx-metformin-er-500"' in html
    assert "(expired)" in active  # atorvastatin 10 mg: valid until 2026-11-18
    assert 'id="refill-maria-garcia-rx-loratadine-10"' not in html  # past: nothing to request


def test_a_refill_request_is_a_task_for_the_care_team_and_goes_to_the_outbox(portal: Portal, store: Any,
                                                                            settings: Any) -> None:
    settings.outbox_refill_request = "hl7"
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    form = portal.get("/medications/sofia-garcia-rx-loratadine-5-chewable/refill")
    assert 'id="refill-form"' in form and 'name="note"' in form
    reply = _refill(portal, "sofia-garcia-rx-loratadine-5-chewable", "Pharmacy on Main Street, please")
    assert reply.status_code == 200
    page = text_of(portal.last_html)
    assert "Your refill request was sent to the care team." in page and "Requested" in page
    [task] = _tasks(store, "MedicationRequest/sofia-garcia-rx-loratadine-5-chewable")
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["code"]["coding"][0] == {"system": TASK_CODES, "code": "fulfill",
                                         "display": "Fulfill the focal request"}
    assert task["for"] == {"reference": "Patient/sofia-garcia"}
    # the signed-in login in her role for the child: Maria as Sofia's mother (RelatedPerson)
    kind, _, related = task["requester"]["reference"].partition("/")
    with store.reading() as repo:
        mother = repo.read("RelatedPerson", related).resource()
    assert kind == "RelatedPerson" and mother["patient"]["reference"] == "Patient/sofia-garcia"
    assert "Maria" in str(mother["name"])
    assert task["owner"]["reference"] == "Practitioner/james-okafor"  # the prescriber
    assert task["note"][0]["text"] == "Pharmacy on Main Street, please"
    assert abs(datetime.fromisoformat(task["authoredOn"].replace("Z", "+00:00")) - datetime.now(UTC)) \
        < timedelta(minutes=2)
    with store.reading() as repo:
        items = repo.conn.execute(select(db.outbox.c.kind, db.outbox.c.resource_id)).all()
    assert ("refill-request", task["id"]) in [tuple(i) for i in items]


def test_the_status_of_each_request_is_shown_and_a_completed_one_uses_a_refill(portal: Portal, store: Any) -> None:
    portal.sign_in("daniel")
    _refill(portal, "daniel-garcia-rx-albuterol-inhaler")
    [task] = _tasks(store, "MedicationRequest/daniel-garcia-rx-albuterol-inhaler")
    with store.writing() as repo:
        repo.update("Task", task["id"], {**task, "status": "in-progress",
                                         "businessStatus": {"text": "Sent to the pharmacy"}})
    html = portal.get("/medications")
    card = text_of(re.search(r'id="rx-daniel-garcia-rx-albuterol-inhaler".*?</li>\s*</ul>', html, re.S).group(0))
    assert "In progress · Sent to the pharmacy" in card and "Refills left 2" in card
    assert 'id="refill-daniel-garcia-rx-albuterol-inhaler"' not in html  # one open request at a time
    with store.writing() as repo:
        repo.update("Task", task["id"], {**task, "status": "completed"})
    html = portal.get("/medications")
    card = text_of(re.search(r'id="rx-daniel-garcia-rx-albuterol-inhaler".*?</li>\s*</ul>', html, re.S).group(0))
    assert "Done" in card and "Refills left 1" in card
    assert 'id="refill-daniel-garcia-rx-albuterol-inhaler"' in html


def test_refused_a_second_open_request(portal: Portal, store: Any) -> None:
    portal.sign_in("daniel")
    _refill(portal, "daniel-garcia-rx-albuterol-inhaler")
    reply = _refill(portal, "daniel-garcia-rx-albuterol-inhaler")
    assert reply.status_code == 400
    assert 'role="alert"' in portal.last_html and "already been requested" in text_of(portal.last_html)
    assert len(_tasks(store, "MedicationRequest/daniel-garcia-rx-albuterol-inhaler")) == 1


def test_refused_a_note_that_is_too_long(portal: Portal, store: Any) -> None:
    portal.sign_in("daniel")
    reply = _refill(portal, "daniel-garcia-rx-albuterol-inhaler", "x" * 501)
    assert reply.status_code == 400 and "at most 500 characters" in text_of(portal.last_html)
    assert 'aria-invalid="true"' in portal.last_html
    assert not _tasks(store, "MedicationRequest/daniel-garcia-rx-albuterol-inhaler")


def test_refused_an_inactive_prescription(portal: Portal, store: Any) -> None:
    portal.sign_in("daniel")
    reply = _refill(portal, "daniel-garcia-rx-fluticasone-44")
    assert reply.status_code == 400 and "no longer active" in text_of(portal.last_html)
    assert not _tasks(store, "MedicationRequest/daniel-garcia-rx-fluticasone-44")


def test_refused_an_expired_prescription(portal: Portal, store: Any) -> None:
    portal.sign_in("robert", otp=True)
    reply = _refill(portal, "robert-chen-rx-nitroglycerin-spray")  # active, valid until 2026-09-10
    assert reply.status_code == 400 and "has expired" in text_of(portal.last_html)
    assert not _tasks(store, "MedicationRequest/robert-chen-rx-nitroglycerin-spray")


def test_refused_without_refills_left(portal: Portal, store: Any) -> None:
    _prescription(store, "no-repeats", "robert-chen", days_ago=20, repeats=0)
    portal.sign_in("robert", otp=True)
    reply = _refill(portal, "no-repeats")
    assert reply.status_code == 400 and "no refills left" in text_of(portal.last_html)
    assert not _tasks(store, "MedicationRequest/no-repeats")


def test_refused_another_patients_prescription(portal: Portal, store: Any) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    page = portal.get("/medications")
    reply = portal.client.post("/medications/robert-chen-rx-lisinopril-10/refill",
                               data={"csrf_token": re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)},
                               headers={"Accept": "text/html"})
    assert reply.status_code == 404
    # and the child's prescription while looking at her own record
    reply = portal.client.post("/medications/sofia-garcia-rx-loratadine-5-chewable/refill",
                               data={"csrf_token": re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)},
                               headers={"Accept": "text/html"})
    assert reply.status_code == 404
    assert not _tasks(store, "MedicationRequest/robert-chen-rx-lisinopril-10")
    assert not _tasks(store, "MedicationRequest/sofia-garcia-rx-loratadine-5-chewable")


def test_refused_an_unknown_prescription(portal: Portal) -> None:
    portal.sign_in("daniel")
    reply = portal.client.get("/medications/no-such-rx/refill", headers={"Accept": "text/html"})
    assert reply.status_code == 404
    assert "We could not find that in this record." in text_of(reply.get_data(as_text=True))


def test_refused_without_the_csrf_token(portal: Portal, store: Any) -> None:
    portal.sign_in("daniel")
    reply = portal.client.post("/medications/daniel-garcia-rx-albuterol-inhaler/refill", data={"note": ""},
                               headers={"Accept": "text/html"})
    assert reply.status_code == 400 and "Traceback" not in reply.get_data(as_text=True)
    assert not _tasks(store, "MedicationRequest/daniel-garcia-rx-albuterol-inhaler")


def test_a_teens_confidential_prescription_is_hidden_from_the_parent(portal: Portal, app: Any, store: Any) -> None:
    portal.sign_in("maria")
    portal.choose("daniel-garcia")
    html = portal.get("/medications")
    assert "sertraline" not in html.lower() and "albuterol" in html.lower()
    reply = _refill(portal, "daniel-garcia-rx-sertraline-25")
    assert reply.status_code == 404
    assert "sertraline" not in portal.get("/").lower()
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    assert "sertraline" in teen.get("/medications").lower()
    assert _refill(teen, "daniel-garcia-rx-sertraline-25").status_code == 200
    [task] = _tasks(store, "MedicationRequest/daniel-garcia-rx-sertraline-25")
    assert task["meta"]["security"][0]["code"] == "R"  # as confidential as the prescription
    assert "sertraline" not in portal.get("/medications").lower()  # nor does the request show to her


def test_an_ended_relationship_closes_the_medications(portal: Portal, world: Any, store: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    assert "lisinopril" in portal.get("/medications").lower()
    world.smart.revoke_proxy("linda", "robert-chen")
    assert "lisinopril" not in portal.get("/medications").lower()
    reply = _refill(portal, "robert-chen-rx-lisinopril-10")
    assert reply.status_code == 404
    assert not _tasks(store, "MedicationRequest/robert-chen-rx-lisinopril-10")


def test_home_lists_refills_due(portal: Portal, store: Any) -> None:
    _prescription(store, "due-soon", "robert-chen", days_ago=80)  # a 90-day supply ends in 10 days
    _prescription(store, "not-due", "robert-chen", days_ago=30)
    _prescription(store, "due-none-left", "robert-chen", days_ago=85, repeats=0)
    portal.sign_in("robert", otp=True)
    home = portal.get("/")
    section = text_of(re.search(r'id="home-refills".*?</section>', home, re.S).group(0))
    assert "Test medicine due-soon" in section
    assert "Test medicine not-due" not in section and "Test medicine due-none-left" not in section
    ends = (date.today() - timedelta(days=80) + timedelta(days=90)).strftime("%b %-d, %Y")
    assert f"supply ends {ends}" in section
    _refill(portal, "due-soon")
    section = text_of(re.search(r'id="home-refills".*?</section>', portal.get("/"), re.S).group(0))
    assert re.search(r"Test medicine due-soon\s*:\s*refill requested", section)


def test_browser_refill_as_parent_and_as_caregiver(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "maria")
    page.check("#pick-sofia-garcia")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#home-refills")
    page.click("nav a[href='/medications']")
    page.wait_for_selector("#active-medications")
    shot(page, "medications-list-child")
    page.click("#refill-sofia-garcia-rx-loratadine-5-chewable")
    page.wait_for_selector("#refill-form")
    shot(page, "medications-refill-child")
    page.fill("#refill-note", "Same pharmacy as last time.")
    page.click("#refill-submit")
    page.wait_for_selector("#refill-requested")
    assert page.get_attribute("#rx-sofia-garcia-rx-loratadine-5-chewable .refill-request", "data-status") == "requested"
    shot(page, "medications-requested-child")
    page.select_option("#switch-patient", "Patient/daniel-garcia")
    page.click("#record-switcher button[type=submit]")
    page.wait_for_selector("#active-medications")
    assert "sertraline" not in page.content().lower()
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "medications-list-teen-phone")


def test_browser_refill_as_caregiver(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "linda")
    page.check("#pick-robert-chen")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#home-refills")
    shot(page, "medications-home-caregiver")
    page.goto("/medications")
    page.click("#refill-robert-chen-rx-lisinopril-10")
    page.wait_for_selector("#refill-form")
    page.fill("#refill-note", "x" * 10)
    page.click("#refill-submit")
    page.wait_for_selector("#refill-requested")
    shot(page, "medications-requested-caregiver")
    page.goto("/medications/robert-chen-rx-lisinopril-10/refill")
    page.wait_for_selector("#refill-error")
    shot(page, "medications-refill-refused-caregiver")
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto("/medications")
    shot(page, "medications-list-caregiver-phone")


def test_the_pharmacys_dispenses_set_refills_left_and_when_the_supply_ends(portal: Portal, store: Any) -> None:
    _prescription(store, "dispensed", "robert-chen", days_ago=200, supply=90, repeats=3)
    handed = date.today() - timedelta(days=85)
    with store.writing() as repo:
        for when in (date.today() - timedelta(days=200), handed):
            repo.create({"resourceType": "MedicationDispense", "status": "completed",
                         "medicationCodeableConcept": {"text": "Test medicine dispensed"},
                         "subject": {"reference": "Patient/robert-chen"},
                         "authorizingPrescription": [{"reference": "MedicationRequest/dispensed"}],
                         "whenHandedOver": when.isoformat(),
                         "daysSupply": {"value": 90, "unit": "days", "system": "http://unitsofmeasure.org",
                                        "code": "d"}})
    portal.sign_in("robert", otp=True)
    card = text_of(re.search(r'id="rx-dispensed".*?</li>', portal.get("/medications"), re.S).group(0))
    assert "Refills left 2" in card  # two fills: the first and one refill
    section = text_of(re.search(r'id="home-refills".*?</section>', portal.get("/"), re.S).group(0))
    ends = (handed + timedelta(days=90)).strftime("%b %-d, %Y")
    assert re.search(rf"Test medicine dispensed\s*:\s*supply ends {ends}", section), section
