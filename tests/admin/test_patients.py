"""Patients and access (front desk): lookups, the patient page, sign-up codes (shown once, emailed
through a real SMTP server or texted through a mocked provider), MFA reset after an identity check,
proxy access with the 18th-birthday limit and its end, and who may do any of it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import date, timedelta
from typing import Any

import pytest
import responses
from sqlalchemy import select

from gateway import access
from gateway.admin import patients
from gateway.admin.staff import set_roles
from gateway.fhir.outcome import FhirError
from gateway.smart_auth import people
from gateway.smart_auth.models import activation_code, auth_user, proxy_grant
from tests.portal.conftest import Portal, csrf_of, text_of
from tests.portal.test_notifications import Inbox, _text, smtp  # noqa: F401  (the real SMTP server fixture)
from tests.smart_auth.conftest import PASSWORD, FlaskHttp, authorize_params, exchange, run_launch
from tests.smart_auth.test_revocation import worker_b  # noqa: F401  (a second process's app, own token cache)

SMS_URL = "https://sms.example/send"
CODE = re.compile(r'id="activation-code"[^>]*>\s*([A-Z2-7]{4}(?:-[A-Z2-7]{4}){3})\s*<')


def _services(app: Any) -> Any:
    return app.extensions["gateway"]


def _audit_events(app: Any, action: str) -> list[dict[str, Any]]:
    from gateway import db

    _services(app).audit.flush()
    with _services(app).engine.connect() as conn:
        rows = conn.execute(select(db.resource.c.content).where(db.resource.c.resource_type == "AuditEvent")).scalars()
        events = [json.loads(r) for r in rows]
    return [e for e in events if any(s.get("code") == action for s in e.get("subtype") or [])]


def _issue(desk: Portal, patient_id: str, send: str = "") -> tuple[Any, str]:
    reply = desk.post(f"/admin/patients/{patient_id}/activation-code", {"send": send},
                      page=f"/admin/patients/{patient_id}")
    match = CODE.search(desk.last_html)
    return reply, match.group(1) if match else ""


# --- lookups ---

def test_lookup_by_name_mrn_and_birth_date(app: Any, console: Any) -> None:
    desk = console("front-desk")

    def found(query: str) -> list[str]:
        html = desk.get(f"/admin/patients?{query}")
        return re.findall(r'id="match-([^"]+)"', html)

    assert found("name=garcia") == ["daniel-garcia", "maria-garcia", "sofia-garcia"]  # by family, then given name
    assert found("name=Maria+Garcia") == ["maria-garcia"]  # every word must match a part of the name
    assert found("mrn=RG1002001") == ["robert-chen"]
    assert found("birthdate=2018-02-14") == ["sofia-garcia"]
    assert found("name=garcia&birthdate=2011-05-10") == ["daniel-garcia"]
    assert found("name=chen&mrn=RG1001001") == []  # all criteria at once
    html = desk.get("/admin/patients?name=garcia")
    assert "None yet" in text_of(re.search(r'id="match-sofia-garcia".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert "Yes" in text_of(re.search(r'id="match-maria-garcia".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert "RG1001001" in html and "1986-04-12" in html
    assert "No patient matches" in text_of(desk.get("/admin/patients?name=zzyzx"))
    assert found("mrn=RG1001001,RG1002001") == []  # a comma is part of the value, not an OR
    assert desk.get("/admin/patients").count('id="match-') == 0  # the bare form


def test_lookup_bad_input_gives_a_message(app: Any, console: Any) -> None:
    desk = console("front-desk")
    reply = desk.client.get("/admin/patients?birthdate=2020-13-45")
    assert reply.status_code == 400
    assert "year-month-day" in text_of(reply.get_data(as_text=True))
    reply = desk.client.get("/admin/patients?name=+++")
    assert reply.status_code == 400
    assert "Enter a name, an MRN or a date of birth" in text_of(reply.get_data(as_text=True))
    reply = desk.client.get("/admin/patients?mrn=" + "x" * 65)
    assert reply.status_code == 400 and "at most 64" in text_of(reply.get_data(as_text=True))


def test_reads_go_through_the_access_policy_and_are_audited(app: Any, world: Any) -> None:
    services = _services(app)
    desk = access.principal_for_staff(username="desk", roles={"front-desk"})
    found = patients.find_patients(services, desk, mrn="RG1001003")
    assert [(m.patient_id, m.name, m.birth_date, m.mrn) for m in found.matches] == [
        ("daniel-garcia", "Daniel Jose Garcia", "2011-05-10", "RG1001003")]
    nobody = access.principal_for_staff(username="nobody", roles=set())
    with pytest.raises(FhirError):
        patients.find_patients(services, nobody, name="garcia")
    with pytest.raises(FhirError):
        patients.patient_file(services, nobody, "maria-garcia", None)
    services.audit.flush()
    with services.engine.connect() as conn:
        from gateway import db

        events = [json.loads(c) for c in conn.execute(select(db.resource.c.content).where(
            db.resource.c.resource_type == "AuditEvent")).scalars()]
    searches = [e for e in events if e["agent"][0]["name"] == "staff:desk"]
    assert searches and all(e["subtype"][0]["code"] == "search-type" for e in searches)
    assert any(ent["what"]["reference"] == "Patient/daniel-garcia" for e in searches for ent in e.get("entity", []))


# --- the patient page ---

def test_the_patient_page_shows_record_logins_codes_and_proxies(app: Any, console: Any) -> None:
    engine = _services(app).engine
    spent, _ = people.issue_activation_code(engine, "sofia-garcia")
    people.sign_up(engine, spent, "sofia-login", "sofia's password")
    open_code, _ = people.issue_activation_code(engine, "sofia-garcia")
    desk = console("front-desk")

    html = desk.get("/admin/patients/sofia-garcia")
    page = text_of(html)
    assert "Sofia Isabel Garcia" in page and "2018-02-14" in page and "RG1001002" in page
    assert "sofia.garcia@example.org" in page and "(413) 555-0140" in page
    login = text_of(re.search(r'id="login-sofia-login".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert "Off" in login and "No" in login
    codes = text_of(re.search(r'id="code-table".*?</table>', html, re.S).group(0))  # type: ignore[union-attr]
    assert "Used on" in codes and "by sofia-login" in codes and "Not used yet" in codes
    for code in (spent, open_code):
        assert code not in html and code.replace("-", "") not in html
    mother = text_of(re.search(r'id="proxy-maria".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert "Maria Elena Garcia" in mother and "MTH" in mother and "2036-02-13" in mother  # before her 18th

    html = desk.get("/admin/patients/robert-chen")
    assert "On" in text_of(re.search(r'id="login-robert".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert 'id="proxy-linda"' in html and 'id="proxy-former"' not in html  # an ended relationship is not listed
    assert 'id="mfa-reset-form"' in html

    html = desk.get("/admin/patients/maria-garcia")
    assert 'id="acts-for-sofia-garcia"' in html and 'id="acts-for-daniel-garcia"' in html
    assert "Nobody else can see this record" in text_of(html)

    with engine.begin() as conn:  # a login locked after failed attempts says so
        conn.execute(auth_user.update().where(auth_user.c.username == "linda").values(
            locked_until_ms=people.now_ms() + 600_000))
    html = desk.get("/admin/patients/linda-chen")
    assert "Locked until" in text_of(re.search(r'id="login-linda".*?</tr>', html, re.S).group(0))  # type: ignore[union-attr]
    assert 'id="acts-for-robert-chen"' in html and "Son or daughter" in text_of(html)

    assert desk.client.get("/admin/patients/nobody-here").status_code == 404
    [event] = [e for e in _audit_events(app, "view-patient-access")
               if any(ent["what"]["reference"] == "Patient/sofia-garcia" for ent in e["entity"])]
    assert event["agent"][0]["name"] == f"staff:{desk.username}"  # type: ignore[attr-defined]


# --- sign-up codes ---

def test_a_code_is_shown_once_stored_as_a_hash_and_audited(app: Any, console: Any, world: Any,
                                                         caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    desk = console("front-desk")
    reply, code = _issue(desk, "sofia-garcia")
    assert reply.status_code == 200 and code
    assert reply.headers["Cache-Control"] == "no-store"
    engine = _services(app).engine
    with engine.connect() as conn:
        [row] = conn.execute(select(activation_code)).all()
    assert row.code_hash == hashlib.sha256(code.replace("-", "").encode()).hexdigest()
    assert row.patient_id == "sofia-garcia" and row.used_ms is None
    assert row.expires_ms - row.created_ms == people.ACTIVATION_DAYS * 24 * 3600 * 1000
    html = desk.get("/admin/patients/sofia-garcia")
    assert code not in html and "Not used yet" in text_of(html)

    [event] = _audit_events(app, "create-activation-code")
    assert event["entity"][0]["what"]["reference"] == "Patient/sofia-garcia" and event["action"] == "C"
    from gateway import db

    with engine.connect() as conn:  # nowhere in the store (audit events included), nor in any log line
        leaks = conn.execute(select(db.resource_version.c.id).where(
            db.resource_version.c.content.contains(code) | db.resource_version.c.content.contains(
                code.replace("-", "")))).all()
    assert leaks == []
    assert all(code not in r.getMessage() and code.replace("-", "") not in r.getMessage() for r in caplog.records)

    # The patient's sign-up consumes it, once.
    user = people.sign_up(engine, code, "sofia-login", "sofia's password")
    assert user.fhir_user == "Patient/sofia-garcia"
    with pytest.raises(people.AuthError, match="already been used"):
        people.sign_up(engine, code, "another", "sofia's password")


def test_a_code_is_emailed_to_the_address_on_the_record(app: Any, console: Any, smtp: Inbox) -> None:  # noqa: F811
    desk = console("front-desk")
    assert 'id="send-email"' in desk.get("/admin/patients/robert-chen")
    reply, code = _issue(desk, "robert-chen", send="email")
    assert reply.status_code == 200 and code
    assert "Also sent by Email to robert.chen@example.org" in text_of(desk.last_html)
    [(recipients, message)] = smtp.messages
    assert recipients == ["robert.chen@example.org"]
    subject, body = _text(message)
    assert subject == "Your sign-up code for Riverside MyChart"
    assert code in body and "http://testserver/auth/signup" in body and "once" in body
    assert "Robert" not in body and "Chen" not in body  # nothing about the person or their care
    [event] = _audit_events(app, "create-activation-code")
    assert "sent by email to robert.chen@example.org" in event["outcomeDesc"] and code not in json.dumps(event)


def test_a_code_is_texted_through_the_sms_provider(app: Any, console: Any, settings: Any) -> None:
    desk = console("front-desk")
    assert 'id="send-sms"' not in desk.get("/admin/patients/linda-chen")  # no provider set up
    reply, code = _issue(desk, "linda-chen", send="sms")
    assert reply.status_code == 400 and not code and "no address for that" in text_of(desk.last_html)
    with _services(app).engine.connect() as conn:
        assert conn.execute(select(activation_code)).all() == []  # refused before any code was made

    settings.sms_url, settings.sms_token, settings.sms_from = SMS_URL, "sms-secret", "+15550100"
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, SMS_URL, json={"id": "m1"}, status=201)
        reply, code = _issue(desk, "linda-chen", send="sms")
        sent = json.loads(mock.calls[0].request.body)
    assert reply.status_code == 200 and code
    assert sent["to"] == "(413) 555-0162" and sent["from"] == "+15550100"  # her mobile phone
    assert code in sent["body"] and "http://testserver/auth/signup" in sent["body"] and "Linda" not in sent["body"]

    with responses.RequestsMock() as mock:  # the provider refuses: the code is still shown, and why it did not go
        mock.add(responses.POST, SMS_URL, status=400, json={"error": "bad number"})
        reply, code = _issue(desk, "linda-chen", send="sms")
    assert reply.status_code == 200 and code
    assert "could not be sent" in text_of(desk.last_html) and "400" in text_of(desk.last_html)


# --- second factor ---

def test_mfa_reset_needs_two_checks_then_ends_every_session(app: Any, console: Any, world: Any) -> None:
    engine = _services(app).engine
    robert = Portal(app.test_client(), world)
    robert.sign_in("robert", PASSWORD, otp=True)
    robert.get("/")
    desk = console("front-desk")
    path, page = "/admin/patients/robert-chen/mfa-reset", "/admin/patients/robert-chen"

    for checks in ([], ["photo-id"], ["photo-id", "photo-id"]):
        reply = desk.post(path, {"username": "robert", "checks": checks}, page=page)
        assert reply.status_code == 400 and "at least two checks" in text_of(desk.last_html), checks
    reply = desk.post(path, {"username": "robert", "checks": ["photo-id", "dna-test"]}, page=page)
    assert reply.status_code == 400 and "from the list" in text_of(desk.last_html)
    reply = desk.post(path, {"username": "maria", "checks": ["photo-id", "address"]}, page=page)
    assert reply.status_code == 400 and "does not belong to this record" in text_of(desk.last_html)
    assert people.has_totp(engine, people.find_user(engine, "robert").id)  # type: ignore[union-attr]
    assert robert.client.get("/").status_code == 200  # nothing happened yet

    reply = desk.post(path, {"username": "robert", "checks": ["photo-id", "birth-date"]}, page=page)
    assert reply.status_code == 200 and "Two-step verification is off for robert" in text_of(desk.last_html)
    assert not people.has_totp(engine, people.find_user(engine, "robert").id)  # type: ignore[union-attr]
    gone = robert.client.get("/")
    assert gone.status_code == 302 and gone.headers["Location"].endswith("/auth/login")  # old session over

    again = Portal(app.test_client(), world)  # the password alone now signs in, no code asked
    html = again.get("/auth/login")
    reply = again.client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "robert",
                                                   "password": PASSWORD})
    assert reply.status_code == 302 and "/auth/mfa" not in reply.headers["Location"]
    assert again.client.get("/").status_code == 200

    reply = desk.post(path, {"username": "robert", "checks": ["photo-id", "address"]}, page=page)
    assert reply.status_code == 400 and "does not use two-step verification" in text_of(desk.last_html)
    done = [e for e in _audit_events(app, "delete-mfa") if e["outcome"] == "0"]
    assert len(done) == 1 and "photo-id, birth-date" in done[0]["outcomeDesc"]
    assert done[0]["entity"][0]["what"]["reference"] == "Patient/robert-chen"
    assert len([e for e in _audit_events(app, "delete-mfa") if e["outcome"] == "4"]) == 6  # the refusals too

    set_roles(engine, "robert", ["operator"])  # a staff login's second factor is not the front desk's to reset
    with pytest.raises(patients.DeskError, match="staff-login"):
        patients.reset_mfa(_services(app), "robert-chen", "robert", ["photo-id", "address"])


# --- proxies ---

def _token_for_sofia(http: Any, fhir_base: str) -> str:
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs")
    launch = run_launch(http, params, verifier, "linda", patient="Patient/sofia-garcia")
    reply = exchange(http, launch)
    assert reply.status == 200, reply.text
    return str(reply.json()["access_token"])


def test_a_guardian_until_the_18th_birthday_and_ending_it_at_once(app: Any, console: Any, world: Any,
                                                                  worker_b: Any) -> None:  # noqa: F811
    services = _services(app)
    desk = console("front-desk")
    path, page = "/admin/patients/sofia-garcia/proxies", "/admin/patients/sofia-garcia"
    reply = desk.post(path, {"username": "linda", "relationship": "GUARD", "until": "2040-01-01"}, page=page)
    assert reply.status_code == 200
    assert "It ends on 2036-02-13, the day before the patient's 18th birthday" in text_of(desk.last_html)
    assert 'id="proxy-linda"' in desk.last_html
    linda = people.find_user(services.engine, "linda")
    with services.engine.connect() as conn:
        row = conn.execute(select(proxy_grant).where(proxy_grant.c.user_id == linda.id,  # type: ignore[union-attr]
                                                     proxy_grant.c.patient_id == "sofia-garcia")).one()
        assert people.acting_for(conn, linda.id)["sofia-garcia"] is False  # type: ignore[union-attr]
    assert (row.relationship, row.valid_from, row.valid_until) == ("GUARD", date.today().isoformat(), "2036-02-13")
    with services.store.reading() as repo:  # the same FHIR record as `gateway proxy grant` writes
        consent = repo.read("Consent", row.consent_id).resource()
        related = repo.read("RelatedPerson", row.related_person).resource()
    assert consent["status"] == "active" and consent["provision"]["period"]["end"] == "2036-02-13"
    assert consent["provision"]["actor"][0]["reference"]["reference"] == f"RelatedPerson/{row.related_person}"
    assert related["patient"]["reference"] == "Patient/sofia-garcia"
    assert related["relationship"][0]["coding"][0]["code"] == "GUARD"

    # Linda's app reads Sofia in another process, which keeps the token cached ...
    token = _token_for_sofia(FlaskHttp(app.test_client()), services.settings.fhir_base)
    other = worker_b.test_client()
    bearer = {"Authorization": f"Bearer {token}"}
    assert other.get("/fhir/Patient/sofia-garcia", headers=bearer).status_code == 200
    reply = desk.post(path + "/end", {"username": "linda"}, page=page)
    assert reply.status_code == 200 and "Proxy access ended for linda" in text_of(desk.last_html)
    assert 'id="proxy-linda"' not in desk.last_html
    # ... and is refused on its very next request.
    assert other.get("/fhir/Patient/sofia-garcia", headers=bearer).status_code in (401, 403)
    with services.engine.connect() as conn:
        assert "sofia-garcia" not in people.acting_for(conn, linda.id)  # type: ignore[union-attr]
    with services.store.reading() as repo:
        assert repo.read("Consent", row.consent_id).resource()["status"] == "inactive"
    [granted] = _audit_events(app, "create-proxy")
    [ended] = _audit_events(app, "delete-proxy")
    assert "linda as GUARD, until 2036-02-13" in granted["outcomeDesc"]
    assert f"Consent/{row.consent_id}" in [e["what"]["reference"] for e in ended["entity"]]


def test_an_adult_guardian_with_no_end_date(app: Any, console: Any) -> None:
    desk = console("front-desk")
    reply = desk.post("/admin/patients/robert-chen/proxies", {"username": "maria", "relationship": "CAREGIVER"},
                      page="/admin/patients/robert-chen")
    assert reply.status_code == 200 and "with no end date" in text_of(desk.last_html)
    granted = patients.grant_proxy(_services(app), access.principal_for_staff(username="d", roles={"front-desk"}),
                                   "linda-chen", None, "daniel", "SIB", date.today() + timedelta(days=30))
    assert not granted.capped and granted.valid_until == (date.today() + timedelta(days=30)).isoformat()


REFUSED_GRANTS = [
    ({"username": "nobody", "relationship": "GUARD"}, "no portal login with that username"),
    ({"username": "", "relationship": "GUARD"}, "Enter the parent's or guardian's username"),
    ({"username": "linda", "relationship": "BOSS"}, "Choose one of the relationships listed"),
    ({"username": "linda", "relationship": "GUARD", "until": "2001-01-01"}, "cannot be in the past"),
    ({"username": "linda", "relationship": "GUARD", "until": "2030-02-31"}, "year-month-day"),
    ({"username": "maria", "relationship": "MTH"}, "already has access"),
    ({"username": "sofia-login", "relationship": "MTH"}, "own login sees their record"),
]


def test_proxy_changes_that_cannot_go_ahead(app: Any, console: Any) -> None:
    engine = _services(app).engine
    code, _ = people.issue_activation_code(engine, "sofia-garcia")
    people.sign_up(engine, code, "sofia-login", "sofia's password")
    desk = console("front-desk")
    with engine.connect() as conn:
        before = conn.execute(select(proxy_grant)).all()
    for data, message in REFUSED_GRANTS:
        reply = desk.post("/admin/patients/sofia-garcia/proxies", data, page="/admin/patients/sofia-garcia")
        assert reply.status_code == 400 and message in text_of(desk.last_html), data
    reply = desk.post("/admin/patients/sofia-garcia/proxies/end", {"username": "linda"},
                      page="/admin/patients/sofia-garcia")
    assert reply.status_code == 400 and "does not have access to this record" in text_of(desk.last_html)
    reply = desk.post("/admin/patients/robert-chen/proxies/end", {"username": "former"},
                      page="/admin/patients/robert-chen")
    assert reply.status_code == 400  # ended by date already
    with engine.connect() as conn:
        assert conn.execute(select(proxy_grant)).all() == before


# --- who may ---

def test_only_the_front_desk_acts_on_patients(app: Any, console: Any) -> None:
    for role in ("operator", "security-officer"):
        other = console(role)
        _post_everything(other, role)
    engine = _services(app).engine
    with engine.connect() as conn:
        assert conn.execute(select(activation_code)).all() == []
        assert "sofia-garcia" in people.acting_for(conn, people.find_user(engine, "maria").id)  # type: ignore[union-attr]
    assert people.has_totp(engine, people.find_user(engine, "robert").id)  # type: ignore[union-attr]


def _post_everything(other: Portal, role: str) -> None:
    token = csrf_of(other.get("/admin/"))
    for path, data in (("/admin/patients/robert-chen/activation-code", {}),
                       ("/admin/patients/robert-chen/mfa-reset", {"username": "robert",
                                                                  "checks": ["photo-id", "address"]}),
                       ("/admin/patients/sofia-garcia/proxies", {"username": "linda", "relationship": "GUARD"}),
                       ("/admin/patients/sofia-garcia/proxies/end", {"username": "maria"})):
        reply = other.client.post(path, data={"csrf_token": token, **data})
        assert reply.status_code == 403, (role, path)
