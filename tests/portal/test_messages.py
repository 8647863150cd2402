"""Messages with the care team: threads, compose, reply, unread per login, proxies and the teen's
confidential conversation, and one test per bad input on each form."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.smart_auth import admin, people
from tests.portal.conftest import Portal, browser_sign_in, shot, text_of
from tests.smart_auth.conftest import PASSWORD


def _store(app: Any) -> Any:
    return app.extensions["gateway"].store


def _read(app: Any, rtype: str, rid: str) -> dict[str, Any]:
    import json

    with _store(app).reading() as repo:
        return json.loads(repo.read(rtype, rid).content)


def _communications(app: Any, patient: str) -> list[dict[str, Any]]:
    import json

    from gateway.fhir.search import search

    with _store(app).reading() as repo:
        _, result = search(repo, "Communication", [("subject", f"Patient/{patient}"), ("_count", "500")])
    return [json.loads(s.content) for s in result.matches]


def _clinician_reply(app: Any, patient: str, thread: str, answering: str, text: str,
                     practitioner: str = "james-okafor") -> str:
    """A reply from the care team, as the EHR would write it into the store."""
    with _store(app).writing() as repo:
        result = repo.create({
            "resourceType": "Communication", "status": "completed",
            "partOf": [{"reference": f"Communication/{thread}"}],
            "inResponseTo": [{"reference": f"Communication/{answering}"}],
            "subject": {"reference": f"Patient/{patient}"},
            "sender": {"reference": f"Practitioner/{practitioner}"},
            "recipient": [{"reference": f"Patient/{patient}"}],
            "sent": "2026-11-30T09:00:00-05:00",
            "payload": [{"contentString": text}]})
    return str(result.stored.id)


def _maria_on(portal: Portal, patient: str) -> None:
    portal.sign_in("maria")
    portal.choose(patient)


def _new_thread(portal: Portal, to: str, subject: str = "Question about Sofia's cough",
                body: str = "She has been coughing at night for a week.") -> str:
    reply = portal.post("/messages/new", {"recipient": to, "subject": subject, "body": body}, follow=False)
    assert reply.status_code == 302, text_of(portal.last_html)[:400]
    match = re.search(r"/messages/([^/?#]+)\?sent=1", reply.headers["Location"])
    assert match, reply.headers["Location"]
    return match.group(1)


# --- the list and a thread ---

def test_threads_list_subject_participants_and_unread(portal: Portal) -> None:
    _maria_on(portal, "sofia-garcia")
    html = portal.get("/messages")
    text = text_of(html)
    assert "Messages are not for emergencies." in text and "call 911" in text
    assert "Sofia - ear pain on antibiotics" in text and "Sofia's lab results" in text
    assert "Dr. James Okafor, MD" in text and "Maria Garcia (mother)" in text
    # both threads have a message from the doctor maria has not opened; her own message is never unread
    assert "2 unread" in text
    ear = re.search(r'href="/messages/sofia-garcia-msg-ear-pain">.*?</li>', html, re.S)
    assert ear and "1 unread" in text_of(ear.group(0))
    # nothing from another record
    assert "Your recent lab results" not in text and "Private question" not in text


def test_a_thread_shows_every_message_in_order_and_opening_it_reads_it(portal: Portal) -> None:
    _maria_on(portal, "sofia-garcia")
    text = text_of(portal.get("/messages/sofia-garcia-msg-ear-pain"))
    first, answer = text.index("Sofia is on day 2 of the amoxicillin"), text.index("that is expected for the first")
    assert first < answer
    assert "Messages are not for emergencies." in text
    assert "New" in text
    assert "New" not in text_of(portal.get("/messages/sofia-garcia-msg-ear-pain"))
    listing = text_of(portal.get("/messages"))
    assert "1 unread" in listing and "2 unread" not in listing


def test_opening_a_reply_shows_its_whole_thread(portal: Portal) -> None:
    _maria_on(portal, "sofia-garcia")
    reply = portal.client.get("/messages/sofia-garcia-msg-ear-pain-reply")
    assert reply.status_code == 302
    assert reply.headers["Location"].endswith("/messages/sofia-garcia-msg-ear-pain#m-sofia-garcia-msg-ear-pain-reply")


def test_messages_from_the_clinic_without_a_sender_read_as_from_the_care_team(portal: Portal, app: Any) -> None:
    # an NTE "patient instructions" note as the HL7 feed writes it: no sender, no topic
    with _store(app).writing() as repo:
        repo.update("Communication", "hl7-note", {
                     "resourceType": "Communication", "id": "hl7-note", "status": "completed",
                     "subject": {"reference": "Patient/robert-chen"},
                     "recipient": [{"reference": "Patient/robert-chen"}],
                     "about": [{"reference": "Observation/x"}], "sent": "2026-11-29T10:00:00Z",
                     "payload": [{"contentString": "Repeat the test in 3 months.\nNo fasting needed."}]}, None)
    portal.sign_in("robert", otp=True)
    listing = text_of(portal.get("/messages"))
    assert "Repeat the test in 3 months." in listing and "Your care team" in listing
    text = text_of(portal.get("/messages/hl7-note"))
    assert "Your care team" in text and "No fasting needed." in text
    # answering it goes to the clinic's organisation
    portal.post("/messages/hl7-note", {"body": "Thank you, will do."})
    mine = [c for c in _communications(app, "robert-chen") if c.get("partOf")]
    sent = [c for c in mine if c["partOf"][0]["reference"] == "Communication/hl7-note"]
    assert sent and sent[0]["recipient"][0]["reference"] == "Organization/riverside-general"


def test_message_text_is_plain_text_never_html(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    thread = _new_thread(portal, "Practitioner/james-okafor", subject="<b>bold</b> subject",
                         body="<script>alert(1)</script>\nsecond line")
    html = portal.get(f"/messages/{thread}")
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt; subject" in html


# --- compose ---

def test_compose_offers_the_records_care_team_with_names(portal: Portal) -> None:
    _maria_on(portal, "maria-garcia")
    html = portal.get("/messages/new")
    form = re.search(r'<form id="compose-form".*?</form>', html, re.S)
    assert form
    options = dict(re.findall(r'<option[^>]*value="([^"]+)"[^>]*>([^<]+)</option>', form.group(0)))
    assert options == {"Practitioner/emily-carter": "Dr. Emily Carter, MD - Family practice"}
    for name in ("recipient", "subject", "body"):
        assert f'name="{name}"' in form.group(0) and f'for="{name}"' in form.group(0)
    _maria_on(portal, "sofia-garcia")
    assert "Practitioner/james-okafor" in portal.get("/messages/new")
    assert "Practitioner/emily-carter" not in portal.last_html


def test_care_team_from_care_team_resources_and_roles(portal: Portal, app: Any) -> None:
    with _store(app).writing() as repo:
        repo.create({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/robert-chen"},
                     "participant": [{"member": {"reference": "PractitionerRole/sarah-miller-role"}}]})
    portal.sign_in("robert", otp=True)
    html = portal.get("/messages/new")
    assert 'value="Practitioner/sarah-miller"' in html and "Sarah Miller, RN" in html


def test_a_new_message_starts_a_thread_sent_by_the_patient(portal: Portal, app: Any) -> None:
    _maria_on(portal, "maria-garcia")
    thread = _new_thread(portal, "Practitioner/emily-carter", "Metformin and travel", "Can I take it on the plane?")
    text = text_of(portal.get(f"/messages/{thread}?sent=1"))
    assert "Your message was sent." in text and "Can I take it on the plane?" in text
    sent = _read(app, "Communication", thread)
    assert sent["sender"]["reference"] == "Patient/maria-garcia"
    assert sent["subject"]["reference"] == "Patient/maria-garcia"
    assert sent["recipient"] == [{"reference": "Practitioner/emily-carter", "display": "Dr. Emily Carter, MD"}]
    assert sent["topic"] == {"text": "Metformin and travel"}
    assert sent["payload"] == [{"contentString": "Can I take it on the plane?"}]
    assert "partOf" not in sent and sent["status"] == "completed"
    assert "Metformin and travel" in text_of(portal.get("/messages"))


def test_a_proxy_writes_as_the_proxy_for_the_patient(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    thread = _new_thread(portal, "Practitioner/james-okafor")
    sent = _read(app, "Communication", thread)
    assert sent["sender"]["reference"].startswith("RelatedPerson/")
    related = _read(app, "RelatedPerson", sent["sender"]["reference"].split("/")[1])
    assert related["patient"]["reference"] == "Patient/sofia-garcia"
    assert sent["sender"]["display"] == "Maria Elena Garcia"
    assert sent["subject"]["reference"] == "Patient/sofia-garcia"
    # her own message is never unread
    assert "unread" not in text_of(re.search(rf'href="/messages/{thread}">.*?</li>', portal.get("/messages"),
                                             re.S).group(0))


def test_reply_points_at_the_thread_and_the_message_answered(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    portal.post("/messages/sofia-garcia-msg-ear-pain", {"body": "Thank you, she is better today."})
    assert "Your message was sent." in text_of(portal.last_html)
    replies = [c for c in _communications(app, "sofia-garcia")
               if c["payload"][0].get("contentString") == "Thank you, she is better today."]
    assert len(replies) == 1
    sent = replies[0]
    assert sent["partOf"] == [{"reference": "Communication/sofia-garcia-msg-ear-pain"}]
    assert sent["inResponseTo"] == [{"reference": "Communication/sofia-garcia-msg-ear-pain-reply"}]
    assert sent["recipient"][0]["reference"] == "Practitioner/james-okafor"
    assert sent["topic"] == {"text": "Re: Sofia - ear pain on antibiotics"}
    text = text_of(portal.get("/messages/sofia-garcia-msg-ear-pain"))
    assert text.index("that is expected") < text.index("Thank you, she is better today.")


def test_portal_messages_go_to_the_ehr_also_when_a_proxy_writes(portal: Portal, app: Any) -> None:
    from sqlalchemy import select

    from gateway import db

    services = app.extensions["gateway"]
    services.settings.outbox_message = "hl7"
    _maria_on(portal, "sofia-garcia")
    thread = _new_thread(portal, "Practitioner/james-okafor")
    portal.post(f"/messages/{thread}", {"body": "One more thing: she is 8."})
    _maria_on(portal, "maria-garcia")
    own = _new_thread(portal, "Practitioner/emily-carter", "Refill", "Please renew my metformin.")
    with services.engine.connect() as conn:
        queued = conn.execute(select(db.outbox.c.kind, db.outbox.c.resource_id, db.outbox.c.patient_id,
                                     db.outbox.c.payload).order_by(db.outbox.c.id)).all()
    assert [(q.kind, q.patient_id) for q in queued] == [("message", "sofia-garcia")] * 2 + [("message", "maria-garcia")]
    assert queued[0].resource_id == thread and queued[2].resource_id == own
    # (the demo patients' MRN authority, "Riverside General Hospital", is longer than HL7 v2.5.1's HD
    # allows, so hl7apy refuses to build their messages: the values the MDM^T02 is built from)
    from gateway.upstream import outbox

    with services.store.reading() as repo:
        lines = outbox.message_values(repo, services.settings, "message", _read(app, "Communication", thread),
                                      "key")["message_lines"]
    assert lines[:2] == ["Subject: Question about Sofia's cough", "From: Maria Elena Garcia (mother), for the patient"]


# --- who sees what ---

def test_another_familys_thread_is_not_found_and_cannot_be_answered(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    reply = portal.client.get("/messages/robert-chen-msg-ldl-result", headers={"Accept": "text/html"})
    assert reply.status_code == 404
    assert "We could not find that in this record." in text_of(reply.get_data(as_text=True))
    before = len(_communications(app, "robert-chen"))
    reply = portal.post("/messages/robert-chen-msg-ldl-result", {"body": "hello"}, page="/messages")
    assert reply.status_code == 404
    assert len(_communications(app, "robert-chen")) == before
    # nor a thread of her own record while she looks at sofia's
    assert portal.client.get("/messages/maria-garcia-msg-a1c-result").status_code == 404


def test_the_teens_confidential_conversation_is_hidden_from_his_mother(portal: Portal, app: Any) -> None:
    _maria_on(portal, "daniel-garcia")
    text = text_of(portal.get("/messages"))
    assert "Daniel's lab results" in text
    assert "Private question" not in text and "feeling really down" not in text
    assert portal.client.get("/messages/daniel-garcia-msg-private-question").status_code == 404
    assert portal.client.get("/messages/daniel-garcia-msg-private-question-reply").status_code == 404
    assert "1 unread" in text  # only the visible thread counts
    # daniel sees it, and his reply stays confidential
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    assert "Private question" in text_of(teen.get("/messages"))
    assert "This conversation is private" in text_of(teen.get("/messages/daniel-garcia-msg-private-question"))
    assert "This conversation is private" not in text_of(teen.get("/messages/daniel-garcia-msg-iron-result"))
    teen.post("/messages/daniel-garcia-msg-private-question", {"body": "Thank you, I will come on Tuesday."})
    answer = next(c for c in _communications(app, "daniel-garcia")
                  if c["payload"][0].get("contentString") == "Thank you, I will come on Tuesday.")
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R",
            "display": "restricted"} in answer["meta"]["security"]
    assert "Thank you, I will come on Tuesday." not in portal.get("/messages/daniel-garcia-msg-iron-result")


def test_a_teen_may_keep_a_new_conversation_private_from_his_mother(portal: Portal, app: Any) -> None:
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    assert 'name="private"' in teen.get("/messages/new")
    thread = _new_thread(teen, "Practitioner/james-okafor", "Just for the doctor", "A private question.")
    reply = teen.post("/messages/new", {"recipient": "Practitioner/james-okafor", "subject": "Private",
                                        "body": "Another private question.", "private": "y"}, follow=False)
    private = re.search(r"/messages/([^/?#]+)\?sent=1", reply.headers["Location"]).group(1)
    assert "meta" not in _read(app, "Communication", thread) or not _read(app, "Communication", thread)["meta"].get(
        "security")
    assert _read(app, "Communication", private)["meta"]["security"][0]["code"] == "R"
    _maria_on(portal, "daniel-garcia")
    listing = text_of(portal.get("/messages"))
    assert "Just for the doctor" in listing and "Another private question" not in listing
    assert portal.client.get(f"/messages/{private}").status_code == 404
    assert 'name="private"' not in portal.get("/messages/new")  # a proxy is not offered the choice


@pytest.mark.parametrize("patient", ["maria-garcia", "daniel-garcia"], ids=["an-adult", "a-proxy"])
def test_compose_refuses_privacy_to_whom_it_is_not_offered(portal: Portal, app: Any, patient: str) -> None:
    _maria_on(portal, patient)
    to = "Practitioner/emily-carter" if patient == "maria-garcia" else "Practitioner/james-okafor"
    before = len(_communications(app, patient))
    reply = portal.post("/messages/new", {**COMPOSE_OK, "recipient": to, "private": "y"})
    assert reply.status_code == 400 and 'role="alert"' in portal.last_html
    assert "Only a patient aged 12 to 17 writing in their own record can keep a conversation private." in text_of(
        portal.last_html)
    assert len(_communications(app, patient)) == before


def test_an_ended_relationship_closes_the_messages(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    assert "Your cholesterol" in text_of(portal.get("/messages"))
    portal.world.smart.revoke_proxy("linda", "robert-chen")
    html = portal.get("/messages")
    assert "Your cholesterol" not in text_of(html) and "You are viewing your own record." in text_of(html)
    assert portal.client.get("/messages/robert-chen-msg-ldl-result").status_code == 404


def test_unread_is_per_login(portal: Portal, app: Any) -> None:
    # a second parent with access to sofia's record
    engine = app.extensions["gateway"].smart.engine
    people.add_user(engine, "carlos", PASSWORD, "Patient/carlos-garcia")
    admin.grant_proxy(engine, _store(app), "carlos", "Patient/sofia-garcia", "FTH")
    _maria_on(portal, "sofia-garcia")
    portal.get("/messages/sofia-garcia-msg-ear-pain")
    assert "1 unread" in text_of(portal.get("/messages"))
    father = Portal(app.test_client(), portal.world)
    father.sign_in("carlos")
    father.choose("sofia-garcia")
    assert "2 unread" in text_of(father.get("/messages"))
    # what linda writes for robert is new to robert, never to linda
    linda = Portal(app.test_client(), portal.world)
    linda.sign_in("linda")
    linda.choose("robert-chen")
    thread = _new_thread(linda, "Practitioner/priya-raman", "Dad's dizziness", "He felt dizzy this morning.")
    assert "unread" not in text_of(re.search(rf'href="/messages/{thread}">.*?</li>', linda.get("/messages"),
                                             re.S).group(0))
    robert = Portal(app.test_client(), portal.world)
    robert.sign_in("robert", otp=True)
    row = re.search(rf'href="/messages/{thread}">.*?</li>', robert.get("/messages"), re.S)
    assert row and "1 unread" in text_of(row.group(0))


def test_home_shows_unread_and_latest_threads(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    home = portal.get("/")
    section = re.search(r'<section class="card" id="home-messages".*?</section>', home, re.S)
    assert section and "2 unread messages" in text_of(section.group(0))
    assert "Sofia - ear pain on antibiotics" in text_of(section.group(0))
    _clinician_reply(app, "sofia-garcia", "sofia-garcia-msg-vitamin-d-result", "sofia-garcia-msg-vitamin-d-result",
                     "Her next check is in February.")
    section = re.search(r'<section class="card" id="home-messages".*?</section>', portal.get("/"), re.S)
    assert section and "3 unread messages" in text_of(section.group(0))
    assert text_of(section.group(0)).index("Sofia's lab results") < text_of(section.group(0)).index("ear pain")


def test_a_document_letter_from_the_clinic_is_a_download(portal: Portal, app: Any) -> None:
    import base64

    with _store(app).writing() as repo:
        repo.update("DocumentReference", "letter-1", {
                     "resourceType": "DocumentReference", "id": "letter-1", "status": "current",
                     "subject": {"reference": "Patient/robert-chen"},
                     "content": [{"attachment": {"contentType": "application/pdf", "title": "Visit letter",
                                                 "data": base64.b64encode(b"%PDF-1.4 fake").decode()}}]}, None)
        repo.update("Communication", "letter-msg", {
                     "resourceType": "Communication", "id": "letter-msg", "status": "completed",
                     "subject": {"reference": "Patient/robert-chen"}, "topic": {"coding": [{"code": "LETTER"}]},
                     "sent": "2026-11-29T10:00:00Z",
                     "payload": [{"contentReference": {"reference": "DocumentReference/letter-1"}}]}, None)
    portal.sign_in("robert", otp=True)
    html = portal.get("/messages/letter-msg")
    assert "Download the document: Visit letter" in text_of(html) and "LETTER" in text_of(html)
    reply = portal.client.get("/messages/letter-msg/documents/letter-1")
    assert reply.status_code == 200 and reply.data == b"%PDF-1.4 fake"
    assert reply.headers["Content-Disposition"].startswith("attachment")
    assert portal.client.get("/messages/robert-chen-msg-ldl-result/documents/letter-1").status_code == 404


# --- one test per bad input ---

COMPOSE_OK = {"recipient": "Practitioner/james-okafor", "subject": "A question", "body": "Hello doctor"}


@pytest.mark.parametrize(("change", "message"), [
    ({"recipient": ""}, "Choose who the message is for."),
    ({"recipient": "Practitioner/emily-carter"}, "Choose a member of the care team listed."),
    ({"recipient": "Practitioner/no-such-doctor"}, "Choose a member of the care team listed."),
    ({"recipient": "Patient/robert-chen"}, "Choose a member of the care team listed."),
    ({"subject": ""}, "Write a subject."),
    ({"subject": "   "}, "Write a subject."),
    ({"subject": "x" * 121}, "The subject can be at most 120 characters."),
    ({"body": ""}, "Write your message."),
    ({"body": " \n\t "}, "Write your message."),
    ({"body": "x" * 5001}, "The message can be at most 5,000 characters."),
], ids=["no-recipient", "not-in-care-team", "unknown-practitioner", "a-patient", "no-subject", "blank-subject",
        "long-subject", "no-body", "blank-body", "long-body"])
def test_compose_refuses_bad_input(portal: Portal, app: Any, change: dict[str, str], message: str) -> None:
    _maria_on(portal, "sofia-garcia")
    before = len(_communications(app, "sofia-garcia"))
    reply = portal.post("/messages/new", {**COMPOSE_OK, **change})
    assert reply.status_code == 400
    html = portal.last_html
    assert 'role="alert"' in html and message in text_of(html)
    assert len(_communications(app, "sofia-garcia")) == before


def test_compose_limits_are_inclusive(portal: Portal) -> None:
    _maria_on(portal, "sofia-garcia")
    _new_thread(portal, "Practitioner/james-okafor", "s" * 120, "b" * 5000)


@pytest.mark.parametrize(("body", "message"), [
    ("", "Write your reply."), ("   ", "Write your reply."),
    ("x" * 5001, "The reply can be at most 5,000 characters."),
], ids=["empty", "blank", "too-long"])
def test_reply_refuses_bad_input(portal: Portal, app: Any, body: str, message: str) -> None:
    _maria_on(portal, "sofia-garcia")
    before = len(_communications(app, "sofia-garcia"))
    reply = portal.post("/messages/sofia-garcia-msg-ear-pain", {"body": body})
    assert reply.status_code == 400 and message in text_of(portal.last_html)
    assert 'role="alert"' in portal.last_html
    assert len(_communications(app, "sofia-garcia")) == before


def test_forms_refuse_a_missing_csrf_token(portal: Portal, app: Any) -> None:
    _maria_on(portal, "sofia-garcia")
    before = len(_communications(app, "sofia-garcia"))
    reply = portal.client.post("/messages/new", data=COMPOSE_OK)
    assert reply.status_code == 400
    reply = portal.client.post("/messages/sofia-garcia-msg-ear-pain", data={"body": "hi"})
    assert reply.status_code == 400
    assert len(_communications(app, "sofia-garcia")) == before


# --- the browser ---

def test_browser_parent_writes_to_the_doctor_and_reads_the_answer(browser: Any, site: Any) -> None:
    page = browser
    _, world = site
    browser_sign_in(page, "maria")  # her record prefers Spanish: the portal speaks Spanish to her
    page.check("#pick-sofia-garcia")
    page.click("#record-picker button[type=submit]")
    page.click("nav a[href='/messages']")
    page.wait_for_selector("#messages-emergency")
    shot(page, "messages-list")
    page.click("#new-message")
    shot(page, "messages-new")
    page.click("#compose-form button[type=submit]")  # empty: the errors
    page.wait_for_selector("#form-errors")
    shot(page, "messages-new-errors")
    page.select_option("#recipient", "Practitioner/james-okafor")
    page.fill("#subject", "Sofia's cough")
    page.fill("#body", "Sofia has been coughing at night for a week.\nNo fever.")
    page.click("#compose-form button[type=submit]")
    page.wait_for_selector("#sent-notice")
    shot(page, "messages-thread-sent")
    thread = page.url.split("/messages/")[1].split("?")[0]
    store = world.services.store  # type: ignore[attr-defined]
    with store.writing() as repo:
        repo.create({"resourceType": "Communication", "status": "completed",
                     "partOf": [{"reference": f"Communication/{thread}"}],
                     "inResponseTo": [{"reference": f"Communication/{thread}"}],
                     "subject": {"reference": "Patient/sofia-garcia"},
                     "sender": {"reference": "Practitioner/james-okafor", "display": "Dr. James Okafor, MD"},
                     "sent": "2026-11-30T09:00:00-05:00",
                     "payload": [{"contentString": "Please bring her in tomorrow at 9."}]})
    page.click("nav a[href='/']")
    page.wait_for_selector("#home-messages")
    # the doctor's answer, besides the two older messages from the clinic she has not opened
    assert "3 mensajes sin leer" in page.inner_text("#home-unread")
    shot(page, "messages-home-unread")
    page.click("#home-messages >> text=Sofia's cough")
    page.wait_for_selector("#thread-messages")
    assert "Please bring her in tomorrow at 9." in page.inner_text("#thread-messages")
    shot(page, "messages-thread")
    page.fill("#reply-body", "Thank you, we will be there.")
    page.click("#reply-form button[type=submit]")
    page.wait_for_selector("#sent-notice")
    assert "Thank you, we will be there." in page.inner_text("#thread-messages")
    page.click("nav a[href='/']")
    assert "2 mensajes sin leer" in page.inner_text("#home-unread")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "messages-home-phone")
    page.goto("/messages")
    shot(page, "messages-list-phone")
    page.goto(f"/messages/{thread}")
    shot(page, "messages-thread-phone")
    page.goto("/messages/new")
    shot(page, "messages-new-phone")
    # the teen's record: his private conversation is not among his mother's threads
    page.select_option("#switch-patient", "Patient/daniel-garcia")
    page.click("#record-switcher button[type=submit]")
    page.goto("/messages")
    assert "Daniel's lab results" in page.inner_text("#threads")
    assert "Private question" not in page.inner_text("main")
    shot(page, "messages-list-teen-phone")


def test_browser_teen_writes_privately_to_his_doctor(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "daniel")
    page.click("nav a[href='/messages']")
    page.wait_for_selector("#threads")
    assert "Private question" in page.inner_text("#threads")
    shot(page, "messages-list-teen-self")
    page.click("#new-message")
    page.select_option("#recipient", "Practitioner/james-okafor")
    page.fill("#subject", "Sleep")
    page.fill("#body", "I am sleeping better since the last visit.")
    page.check("#private")
    shot(page, "messages-new-private")
    page.click("#compose-form button[type=submit]")
    page.wait_for_selector("#sent-notice")
    assert "I am sleeping better" in page.inner_text("#thread-messages")
    assert page.is_visible("#private-notice")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "messages-thread-teen-phone")
