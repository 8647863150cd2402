"""Notifications: queued with the write that caused them (one row per login that should hear about
it), sent by email through a real SMTP server (aiosmtpd) or SMS through a mocked provider
(responses), in the login's language, never with clinical details; preferences; retries; reminders."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from typing import Any

import pytest
import responses
from click.testing import CliRunner
from sqlalchemy import select, update

from gateway.portal import notifications
from gateway.portal.models import portal_notification, portal_preference
from gateway.smart_auth import people
from tests.conftest import free_port
from tests.portal.conftest import Portal, browser_sign_in, shot, text_of

SMS_URL = "https://sms.example/send"
CLINICAL = ("Glucose", "2345-7", "187", "mg/dL", "Robert", "Sofia", "Daniel", "Hola")


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp(settings: Any) -> Iterator[Inbox]:
    """A real SMTP server on 127.0.0.1, and the gateway's settings pointing at it."""
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    settings.smtp_host, settings.smtp_port, settings.smtp_from = "127.0.0.1", port, "portal@riverside.example"
    try:
        yield inbox
    finally:
        controller.stop()


def _lab(store: Any, rid: str, patient: str, hours_ago: float = 1, confidential: bool = False,
         origin: str | None = "hl7") -> None:
    when = (datetime.now(UTC) - timedelta(hours=hours_ago)).replace(microsecond=0).isoformat()
    resource: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glucose"},
        "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": when, "issued": when,
        "valueQuantity": {"value": 187, "unit": "mg/dL"},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                        "code": "H"}]}]}
    if confidential:
        resource["meta"] = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                          "code": "R"}]}
    with store.writing(origin=origin) as repo:
        repo.create(resource, resource_id=rid)


def _rows(app: Any) -> list[Any]:
    with app.extensions["gateway"].engine.connect() as conn:
        return list(conn.execute(select(portal_notification).order_by(portal_notification.c.id)).all())


def _user(app: Any, name: str) -> int:
    return people.find_user(app.extensions["gateway"].engine, name).id  # type: ignore[union-attr]


def _deliver(app: Any) -> notifications.Tally:
    services = app.extensions["gateway"]
    return notifications.deliver_due(services.store, services.settings)


def _text(message: Any) -> tuple[str, str]:
    subject = str(make_header(decode_header(message["Subject"])))
    return subject, message.get_payload(decode=True).decode("utf-8")


def test_a_new_result_emails_every_login_acting_for_the_patient_without_clinical_detail(
        app: Any, world: Any, store: Any, smtp: Inbox) -> None:
    _lab(store, "sofia-new-glucose", "sofia-garcia")
    rows = _rows(app)
    assert [(r.user_id, r.event, r.channel, r.address, r.status) for r in rows] == [
        (_user(app, "maria"), "new-result", "email", "maria.garcia@example.org", "pending")]
    assert rows[0].dedup_key == f"new-result:{_user(app, 'maria')}:Observation/sofia-new-glucose"
    tally = _deliver(app)
    assert tally.sent == 1 and tally.failed == 0
    [(to, message)] = smtp.messages
    subject, body = _text(message)
    assert to == ["maria.garcia@example.org"]
    # Maria's record prefers Spanish: the text is in Spanish, with the portal's address
    assert subject == "Nuevo resultado de prueba en Riverside MyChart"
    assert "http://testserver/" in body and "Hay un nuevo resultado de prueba" in body
    for detail in CLINICAL:
        assert detail not in subject and detail not in body, detail
    assert _rows(app)[0].status == "sent" and _rows(app)[0].sent_ms


def test_each_event_queues_once_per_login(app: Any, world: Any, store: Any) -> None:
    _lab(store, "robert-glucose", "robert-chen")
    with store.writing(origin="hl7") as repo:
        current = repo.read("Observation", "robert-glucose").resource()
        repo.update("Observation", "robert-glucose", {**current, "status": "amended"})
    rows = _rows(app)
    assert sorted(r.user_id for r in rows) == sorted([_user(app, "robert"), _user(app, "linda")])
    assert _user(app, "former") not in [r.user_id for r in rows]  # the relationship ended


def test_a_report_asks_once_who_hears_of_its_results_and_where(app: Any, world: Any, store: Any) -> None:
    """Three results written together (a lab report from the feed): a row for each result and login,
    but who acts for the patient, each login's channel and its address are asked once, not once a
    result (on PostgreSQL each ask is a round trip the feed's ACK waits on)."""
    from tests.conftest import sql_run

    when = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0).isoformat()
    results = [{"resourceType": "Observation", "id": f"robert-panel-{n}", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "laboratory"}]}],
                "code": {"text": f"Analyte {n}"}, "subject": {"reference": "Patient/robert-chen"},
                "effectiveDateTime": when, "issued": when, "valueQuantity": {"value": 10 + n, "unit": "mg/dL"}}
               for n in range(3)]
    with sql_run(app.extensions["gateway"].engine) as statements, store.writing(origin="hl7") as repo:
        repo.update_many([(result, None) for result in results])
    rows = _rows(app)
    assert sorted((r.user_id, r.dedup_key.rsplit("/", 1)[1]) for r in rows) == sorted(
        (_user(app, login), f"robert-panel-{n}") for login in ("robert", "linda") for n in range(3))
    asked = [" ".join(s.split()) for s in statements]
    assert sum("FROM auth_user" in s and "proxy_grant" in s for s in asked) == 1, asked
    assert sum("FROM portal_preference" in s for s in asked) == 2, asked  # one a login


def test_old_history_and_other_writes_notify_nobody(app: Any, world: Any, store: Any) -> None:
    _lab(store, "robert-old-glucose", "robert-chen", hours_ago=24 * 400)
    with store.writing() as repo:  # a message the patient sends is not news to the patient
        repo.create({"resourceType": "Communication", "status": "completed",
                     "subject": {"reference": "Patient/robert-chen"}, "sender": {"reference": "Patient/robert-chen"},
                     "recipient": [{"reference": "Practitioner/emily-carter"}],
                     "payload": [{"contentString": "Question"}]})
    assert _rows(app) == []


def test_a_teens_confidential_result_is_not_told_to_the_parent(app: Any, world: Any, store: Any) -> None:
    _lab(store, "daniel-private", "daniel-garcia", confidential=True)
    assert [r.user_id for r in _rows(app)] == [_user(app, "daniel")]
    _lab(store, "daniel-open", "daniel-garcia")
    assert sorted(r.user_id for r in _rows(app) if "daniel-open" in r.dedup_key) == sorted(
        [_user(app, "daniel"), _user(app, "maria")])


def test_a_new_message_to_the_patient(app: Any, world: Any, store: Any, smtp: Inbox) -> None:
    with store.writing() as repo:
        repo.create({"resourceType": "Communication", "status": "completed",
                     "subject": {"reference": "Patient/robert-chen"},
                     "sender": {"reference": "Practitioner/emily-carter"},
                     "recipient": [{"reference": "Patient/robert-chen"}],
                     "payload": [{"contentString": "Robert, your glucose of 187 mg/dL is high."}]})
    rows = _rows(app)
    assert sorted((r.user_id, r.event) for r in rows) == sorted(
        [(_user(app, "robert"), "new-message"), (_user(app, "linda"), "new-message")])
    assert _deliver(app).sent == 2
    for _, message in smtp.messages:
        subject, body = _text(message)
        assert subject == "New message in Riverside MyChart"
        for detail in CLINICAL:
            assert detail not in body, detail


def test_preferences_none_and_sms(app: Any, world: Any, store: Any, settings: Any) -> None:
    engine = app.extensions["gateway"].engine
    settings.sms_url, settings.sms_token, settings.sms_from = SMS_URL, "sms-secret", "+15550100"
    notifications.save_preferences(engine, _user(app, "robert"), {"new-result": "none"})
    notifications.save_preferences(engine, _user(app, "linda"), {"new-result": "sms"})
    _lab(store, "robert-glucose", "robert-chen")
    [row] = _rows(app)
    assert row.user_id == _user(app, "linda") and row.channel == "sms"
    assert row.address == "(413) 555-0162"  # her mobile phone
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, SMS_URL, json={"id": "m1"}, status=201)
        assert _deliver(app).sent == 1
        sent = mock.calls[0].request
    assert sent.headers["Authorization"] == "Bearer sms-secret"
    payload = json.loads(sent.body)
    assert set(payload) == {"to", "from", "body"} and payload["from"] == "+15550100"
    assert payload["to"] == row.address and "http://testserver/" in payload["body"]
    for detail in CLINICAL:
        assert detail not in payload["body"], detail


def test_sms_without_a_provider_falls_back_to_email(app: Any, world: Any, store: Any) -> None:
    notifications.save_preferences(app.extensions["gateway"].engine, _user(app, "maria"), {"new-result": "sms"})
    _lab(store, "sofia-glucose", "sofia-garcia")
    [row] = _rows(app)
    assert row.channel == "email" and row.address == "maria.garcia@example.org"


def test_sms_provider_errors_retry_or_fail(app: Any, world: Any, store: Any, settings: Any) -> None:
    settings.sms_url = SMS_URL
    notifications.save_preferences(app.extensions["gateway"].engine, _user(app, "maria"), {"new-result": "sms"})
    _lab(store, "sofia-glucose", "sofia-garcia")
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, SMS_URL, status=503)
        tally = _deliver(app)
    [row] = _rows(app)
    assert tally.retried == 1 and row.status == "pending" and row.attempts == 1
    assert "503" in row.last_error and row.next_attempt_ms > notifications.now_ms() + 30_000
    _due_now(app)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, SMS_URL, status=400, json={"error": "bad number"})
        tally = _deliver(app)
    [row] = _rows(app)
    assert tally.failed == 1 and row.status == "failed" and "400" in row.last_error


def _due_now(app: Any) -> None:
    with app.extensions["gateway"].engine.begin() as conn:
        conn.execute(update(portal_notification).values(next_attempt_ms=0))


def test_an_unreachable_mail_server_is_retried_with_backoff_then_failed(app: Any, world: Any, store: Any,
                                                                       settings: Any) -> None:
    settings.smtp_host, settings.smtp_port = "127.0.0.1", free_port()  # nothing listens there
    _lab(store, "sofia-glucose", "sofia-garcia")
    waits = []
    for attempt in range(1, notifications.MAX_ATTEMPTS + 1):
        before = notifications.now_ms()
        _deliver(app)
        [row] = _rows(app)
        assert row.attempts == attempt and "ConnectionRefusedError" in row.last_error
        if attempt < notifications.MAX_ATTEMPTS:
            assert row.status == "pending"
            waits.append(row.next_attempt_ms - before)
            _due_now(app)
    assert row.status == "failed" and "gave up after" in row.last_error
    assert waits == sorted(waits) and waits[1] >= 2 * waits[0] * 0.9  # exponential backoff


def test_appointment_reminders_for_the_next_day(app: Any, world: Any, store: Any) -> None:
    # A day when the demo world has no appointment of its own (its dates are fixed; one of them is
    # always within a day of some real date), so that only the two made here count.
    now = datetime(2031, 3, 3, 12, 0, tzinfo=UTC)
    with store.writing() as repo:
        for rid, hours in (("soon", 3), ("later", 72)):
            repo.create({"resourceType": "Appointment", "status": "booked",
                         "start": (now + timedelta(hours=hours)).isoformat(),
                         "end": (now + timedelta(hours=hours, minutes=30)).isoformat(),
                         "participant": [{"actor": {"reference": "Patient/robert-chen"}, "status": "accepted"},
                                         {"actor": {"reference": "Practitioner/emily-carter"}, "status": "accepted"}]},
                        resource_id=rid)
    services = app.extensions["gateway"]
    assert notifications.scan_reminders(services.store, services.settings, now) == 2
    assert notifications.scan_reminders(services.store, services.settings, now) == 0  # once per login
    rows = _rows(app)
    assert {r.event for r in rows} == {"appointment-reminder"} and all("Appointment/soon" in r.dedup_key for r in rows)
    assert sorted(r.user_id for r in rows) == sorted([_user(app, "robert"), _user(app, "linda")])


def test_gateway_notify_once_sends_and_sums_up(app: Any, world: Any, store: Any, smtp: Inbox, settings: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import main

    _lab(store, "sofia-glucose", "sofia-garcia")
    # the reminders due today for the demo world's own appointments (fixed dates: on the day before
    # one of them, there is one), queued now so that the command has only sending left to do for them
    services = app.extensions["gateway"]
    due = notifications.scan_reminders(services.store, services.settings)
    for name, value in (("DATABASE_URL", settings.database_url), ("SMTP_HOST", settings.smtp_host),
                        ("SMTP_PORT", str(settings.smtp_port)), ("BASE_URL", "https://portal.example"),
                        ("INSTANCE_PATH", settings.instance_path)):
        monkeypatch.setenv(f"GATEWAY_{name}", value)
    result = CliRunner().invoke(main, ["notify", "--once"])
    assert result.exit_code == 0, result.output
    assert "(new-result by email): sent" in result.output
    assert result.output.strip().endswith(f"notifications: {1 + due} sent, 0 failed, 0 to try again")
    _, body = _text(smtp.messages[0][1])
    assert "https://portal.example/" in body


# --- the preferences page ---

def test_the_preferences_page_saves_a_channel_per_event(portal: Portal, app: Any) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    html = portal.get("/profile/notifications")
    assert 'id="notification-form"' in html
    for event in ("new-result", "new-message", "appointment-reminder", "appointment-offer"):
        assert re.search(rf'<select[^>]*name="{event}"', html), event
    assert _selected(html, "new-result") == "email" and "maria.garcia@example.org" in text_of(html)
    reply = portal.post("/profile/notifications", {"new-result": "sms", "new-message": "none",
                                                   "appointment-reminder": "email", "appointment-offer": "none"})
    assert reply.status_code == 200 and "Your choices are saved." in text_of(portal.last_html)
    assert notifications.preferences(app.extensions["gateway"].engine, _user(app, "maria")) == {
        "new-result": "sms", "new-message": "none", "appointment-reminder": "email", "appointment-offer": "none"}
    assert _selected(portal.get("/profile/notifications"), "new-result") == "sms"


def _selected(html: str, name: str) -> str:
    select_html = re.search(rf'<select[^>]*name="{name}".*?</select>', html, re.S).group(0)
    return re.search(r'<option[^>]*\bselected\b[^>]*value="([^"]+)"|<option[^>]*value="([^"]+)"[^>]*\bselected\b',
                     select_html).group(0).split('value="')[1].split('"')[0]


def test_preferences_refuse_an_unknown_channel(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    reply = portal.post("/profile/notifications", {"new-result": "pigeon", "new-message": "email",
                                                   "appointment-reminder": "email", "appointment-offer": "email"})
    assert reply.status_code == 400 and 'role="alert"' in portal.last_html
    assert "Choose email, text message (SMS) or do not tell me." in text_of(portal.last_html)
    assert _saved(app, "daniel") == []


def test_preferences_refuse_a_missing_event(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    reply = portal.post("/profile/notifications", {"new-result": "email", "new-message": "email",
                                                   "appointment-offer": "email"})
    assert reply.status_code == 400 and "An appointment within the next day" in text_of(portal.last_html)
    assert _saved(app, "daniel") == []


def test_preferences_refuse_a_missing_csrf_token(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    reply = portal.client.post("/profile/notifications", data={"new-result": "none", "new-message": "none",
                                                              "appointment-reminder": "none"},
                               headers={"Accept": "text/html"})
    assert reply.status_code == 400 and _saved(app, "daniel") == []


def test_preferences_are_the_logins_own_whoever_record_is_shown(portal: Portal, app: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    portal.post("/profile/notifications", {"new-result": "none", "new-message": "none",
                                           "appointment-reminder": "none", "appointment-offer": "none"})
    assert _saved(app, "robert") == []  # Robert's own choices are untouched
    assert len(_saved(app, "linda")) == 4


def _saved(app: Any, name: str) -> list[Any]:
    with app.extensions["gateway"].engine.connect() as conn:
        return list(conn.execute(select(portal_preference).where(portal_preference.c.user_id == _user(app, name))))


def test_browser_notification_preferences(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "linda")
    page.check("#pick-robert-chen")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#whose-record")
    page.goto("/profile/notifications")
    page.wait_for_selector("#notification-form")
    shot(page, "notifications-preferences")
    page.select_option("#pref-new-result", "none")
    page.select_option("#pref-appointment-reminder", "sms")
    page.click("#notification-submit")
    page.wait_for_selector("#notification-saved")
    assert page.input_value("#pref-new-result") == "none"
    shot(page, "notifications-saved")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "notifications-preferences-phone")
