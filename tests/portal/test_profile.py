"""Profile: contact details (If-Match), language, linked apps, two-step verification, sign out
everywhere and the access log."""

from __future__ import annotations

from typing import Any

import pyotp
import pytest

from gateway.smart_auth import people
from tests.portal.conftest import Portal, csrf_of, text_of

CONTACT = {"phone": "(413) 555-0199", "email": "robert.new@example.org", "line": "7 Oak Road, Unit 3",
           "city": "Springfield", "state": "MA", "postal_code": "01109"}


def _version(html: str) -> str:
    import re

    match = re.search(r'name="version" value="([^"]*)"', html)
    assert match
    return match.group(1)


def _save(portal: Portal, **fields: str) -> Any:
    html = portal.get("/profile")
    return portal.client.post("/profile/contact", data={"csrf_token": csrf_of(html), "version": _version(html),
                                                        **CONTACT, **fields},
                              headers={"Accept": "text/html"}, follow_redirects=True)


def _patient(portal: Portal, patient_id: str) -> dict[str, Any]:
    import json

    with portal.world.store.reading() as repo:
        return json.loads(repo.read("Patient", patient_id).content or "{}")


def test_contact_details_are_shown_and_saved(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    html = portal.get("/profile")
    assert 'value="(413) 555-0161"' in html and 'value="robert.chen@example.org"' in html
    assert 'value="215 Elm Court"' in html
    reply = _save(portal)
    assert reply.status_code == 200 and "Your contact details are saved." in text_of(reply.get_data(as_text=True))
    patient = _patient(portal, "robert-chen")
    assert {"system": "phone", "value": "(413) 555-0199", "use": "home", "rank": 1} in patient["telecom"]
    assert any(t["value"] == "robert.new@example.org" for t in patient["telecom"] if t["system"] == "email")
    assert patient["address"][0]["line"] == ["7 Oak Road", "Unit 3"] and patient["address"][0]["city"] == "Springfield"
    assert patient["name"]  # everything else is kept


def test_a_concurrent_change_is_not_overwritten(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    html = portal.get("/profile")
    stale = _version(html)
    assert _save(portal, city="Holyoke").status_code == 200
    reply = portal.client.post("/profile/contact", data={"csrf_token": csrf_of(html), "version": stale, **CONTACT,
                                                         "city": "Chicopee"}, headers={"Accept": "text/html"})
    page = text_of(reply.get_data(as_text=True))
    assert reply.status_code == 409 and "Someone else changed these details" in page
    assert _patient(portal, "robert-chen")["address"][0]["city"] == "Holyoke"
    assert 'value="Holyoke"' in reply.get_data(as_text=True)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("email", "not-an-email", "Enter an email address like name@example.org."),
    ("email", "a@b." + "c" * 260, "An email address has at most 254 characters."),
    ("phone", "call me maybe", "A phone number has only digits"),
    ("phone", "12345", "A phone number has 7 to 15 digits."),
    ("phone", "1" * 31, "A phone number has at most 30 characters."),
    ("line", "x" * 201, "The street address has at most 200 characters."),
    ("city", "x" * 101, "The city has at most 100 characters."),
    ("state", "x" * 51, "The state has at most 50 characters."),
    ("postal_code", "0110<9>", "A ZIP code has only letters"),
])
def test_contact_form_refuses_a_bad_value(portal: Portal, field: str, value: str, message: str) -> None:
    portal.sign_in("robert", otp=True)
    reply = _save(portal, **{field: value})
    page = text_of(reply.get_data(as_text=True))
    assert reply.status_code == 400 and message in page
    assert _patient(portal, "robert-chen")["telecom"][0]["value"] == "(413) 555-0161"


def test_a_proxy_edits_the_chosen_record_only(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    assert 'value="sofia.garcia@example.org"' in portal.get("/profile")
    assert _save(portal, email="sofia.new@example.org").status_code == 200
    assert any(t["value"] == "sofia.new@example.org" for t in _patient(portal, "sofia-garcia")["telecom"])
    assert all(t["value"] != "sofia.new@example.org" for t in _patient(portal, "maria-garcia")["telecom"])


def test_an_ended_caregiver_cannot_reach_the_record(portal: Portal) -> None:
    portal.sign_in("former")  # whose own record has no Patient resource
    html = portal.get("/profile")
    assert "robert.chen@example.org" not in html and "(413) 555-0161" not in html
    assert 'id="mfa-start-form"' in html  # the login's own settings still work
    reply = portal.post("/switch", {"patient": "Patient/robert-chen", "next": "/profile"}, page="/profile")
    assert reply.status_code == 400 and "robert.chen@example.org" not in portal.last_html


def test_language_is_stored_in_the_record_and_applied_at_once(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.post("/profile/language", {"lang": "es"}, page="/profile")
    html = portal.last_html
    assert reply.status_code == 200 and 'lang="es"' in html and "Su idioma está guardado." in text_of(html)
    patient = _patient(portal, "robert-chen")
    assert patient["communication"][0]["language"]["coding"][0]["code"] == "es"
    assert patient["communication"][0]["preferred"] is True


def test_language_refuses_one_not_offered(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.post("/profile/language", {"lang": "fr"}, page="/profile")
    assert reply.status_code == 400 and "Choose one of the languages listed." in text_of(portal.last_html)
    assert _patient(portal, "robert-chen")["communication"][0]["language"]["coding"][0]["code"] == "en"


def test_linked_apps_are_listed_and_revoked(portal: Portal) -> None:
    smart = portal.world.smart
    robert = people.find_user(smart.engine, "robert")
    assert robert is not None
    grant_id = smart.start_grant("public-app", robert, "robert-chen", None, "patient/*.rs",
                                 "Patient/robert-chen").grant_id
    _token_for(smart, grant_id)
    portal.sign_in("robert", otp=True)
    page = text_of(portal.get("/profile"))
    assert "public-app" in page and "Disconnect public-app" in page
    reply = portal.post("/profile/apps/revoke", {"grant_id": grant_id}, page="/profile")
    assert reply.status_code == 200 and "The app's access has ended." in text_of(portal.last_html)
    assert smart.apps_of(robert.id) == []


def test_revoking_someone_elses_app_is_refused(portal: Portal) -> None:
    smart = portal.world.smart
    maria = people.find_user(smart.engine, "maria")
    assert maria is not None
    grant_id = smart.start_grant("public-app", maria, "maria-garcia", None, "patient/*.rs",
                                 "Patient/maria-garcia").grant_id
    _token_for(smart, grant_id)
    portal.sign_in("robert", otp=True)
    reply = portal.post("/profile/apps/revoke", {"grant_id": grant_id}, page="/profile")
    assert reply.status_code == 400 and "That app is not one of yours." in text_of(portal.last_html)
    assert len(smart.apps_of(maria.id)) == 1


def _token_for(smart: Any, grant_id: Any) -> None:
    """A live token for the grant, as the token endpoint would store it (apps_of lists live ones)."""
    from sqlalchemy import insert, select

    from gateway.db import write_tx
    from gateway.smart_auth.models import oauth_grant, oauth_token

    with write_tx(smart.engine) as conn:
        row = conn.execute(select(oauth_grant).where(oauth_grant.c.grant_id == grant_id)).one()
        conn.execute(insert(oauth_token).values(
            grant_id=grant_id, client_id=row.client_id, access_hash=f"h-{grant_id}"[:64], scope=row.scope,
            issued_ms=people.now_ms(), expires_ms=people.now_ms() + 3_600_000, revoked=False, refresh_used=False))


def test_totp_enrolment_end_to_end(portal: Portal, app: Any) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    assert "Two-step verification is off." in text_of(portal.get("/profile"))
    portal.post("/profile/mfa/start", {}, page="/profile")
    html = portal.last_html
    import re

    secret = re.search(r'id="totp-secret">([A-Z2-7]+)<', html)
    uri = re.search(r'id="totp-uri"[^>]*>([^<]+)<', html)
    assert secret and uri and uri.group(1).startswith("otpauth://totp/")
    assert f"secret={secret.group(1)}" in uri.group(1)
    assert not people.has_totp(portal.world.smart.engine, people.find_user(portal.world.smart.engine, "linda").id)
    reply = portal.post("/profile/mfa/confirm", {"otp": pyotp.TOTP(secret.group(1)).now()}, page="/profile")
    assert reply.status_code == 200 and "Two-step verification is on." in text_of(portal.last_html)
    linda = people.find_user(portal.world.smart.engine, "linda")
    assert linda is not None and linda.totp_secret == secret.group(1)
    # The next sign-in asks for a code.
    other = Portal(app.test_client(), portal.world)
    html = other.get("/auth/login")
    reply = other.client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "linda",
                                                   "password": "correct horse battery"})
    assert reply.status_code == 302 and reply.headers["Location"].endswith("/auth/mfa")
    # Turning it off needs a current code.
    reply = portal.post("/profile/mfa/off", {"otp": "000000" if pyotp.TOTP(secret.group(1)).now() != "000000"
                                             else "111111"}, page="/profile")
    assert reply.status_code == 400 and "The code is not valid" in text_of(portal.last_html)
    reply = portal.post("/profile/mfa/off", {"otp": pyotp.TOTP(secret.group(1)).now()}, page="/profile")
    assert reply.status_code == 200 and "Two-step verification is off." in text_of(portal.last_html)
    assert people.find_user(portal.world.smart.engine, "linda").totp_secret is None  # type: ignore[union-attr]


def test_totp_confirm_refuses_a_wrong_code(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    portal.post("/profile/mfa/start", {}, page="/profile")
    html = portal.get("/profile")
    import re

    match = re.search(r'id="totp-secret">([A-Z2-7]+)<', html)
    assert match
    right = pyotp.TOTP(match.group(1))
    wrong = next(c for c in ("123456", "654321", "111111") if not right.verify(c, valid_window=1))
    reply = portal.post("/profile/mfa/confirm", {"otp": wrong}, page="/profile")
    assert reply.status_code == 400 and "The code is not valid" in text_of(portal.last_html)
    assert people.find_user(portal.world.smart.engine, "linda").totp_secret is None  # type: ignore[union-attr]


def test_totp_confirm_refuses_an_empty_code(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    portal.post("/profile/mfa/start", {}, page="/profile")
    reply = portal.post("/profile/mfa/confirm", {"otp": ""}, page="/profile")
    assert reply.status_code == 400 and "Enter the 6-digit code" in text_of(portal.last_html)


def test_totp_confirm_refuses_a_code_that_is_not_six_digits(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    portal.post("/profile/mfa/start", {}, page="/profile")
    reply = portal.post("/profile/mfa/confirm", {"otp": "12ab"}, page="/profile")
    assert reply.status_code == 400 and "The code is 6 digits." in text_of(portal.last_html)


def test_totp_confirm_without_starting_is_refused(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    reply = portal.post("/profile/mfa/confirm", {"otp": "123456"}, page="/profile")
    assert reply.status_code == 400 and "Start the set-up again." in text_of(portal.last_html)


def test_totp_start_refused_when_already_on(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    assert "Two-step verification is on" in text_of(portal.get("/profile"))
    reply = portal.post("/profile/mfa/start", {}, page="/profile")
    assert reply.status_code == 400 and "already on" in text_of(portal.last_html)


def test_totp_off_refuses_an_empty_code(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.post("/profile/mfa/off", {"otp": ""}, page="/profile")
    assert reply.status_code == 400 and people.find_user(portal.world.smart.engine, "robert").totp_secret


def test_profile_links_to_notifications_and_signs_out_everywhere(portal: Portal) -> None:
    portal.sign_in("daniel")
    html = portal.get("/profile")
    assert 'href="/profile/notifications"' in html
    portal.post("/sign-out-everywhere", {}, page="/profile")
    assert "You are signed out on every device and browser." in text_of(portal.last_html)
    assert portal.client.get("/profile").status_code == 302


def test_access_log_names_the_people_who_looked(portal: Portal, app: Any) -> None:
    other = Portal(app.test_client(), portal.world)
    other.sign_in("linda")
    other.choose("robert-chen")
    other.get("/profile")
    portal.sign_in("robert", otp=True)
    portal.get("/profile")
    app.extensions["gateway"].audit.flush()
    page = text_of(portal.get("/profile/access-log"))
    assert "Linda Mei Chen" in page and "Robert Chen" in page and "Viewed personal details" in page
    assert "this portal" in page
    # Newest first.
    assert page.index("Robert Chen") < page.index("Linda Mei Chen")


def test_access_log_is_paged(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    for _ in range(25):
        portal.get("/profile")
    app.extensions["gateway"].audit.flush()
    html = portal.get("/profile/access-log")
    assert 'id="access-log-older"' in html
    import re

    older = re.search(r'id="access-log-older" href="([^"]+)"|href="([^"]+)" id="access-log-older"', html)
    assert older
    portal.get(unescape(older.group(1) or older.group(2)))
    assert 'id="access-log-newest"' in portal.last_html


def test_access_log_of_a_teen_is_not_reachable_by_another_family(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    page = text_of(portal.get("/profile/access-log"))
    assert "Daniel" not in page and "Maria" not in page


def unescape(text: str) -> str:
    from html import unescape as html_unescape

    return html_unescape(text)


def test_a_teens_access_log_is_not_shown_to_a_parent(portal: Portal, app: Any) -> None:
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    teen.get("/profile")
    app.extensions["gateway"].audit.flush()
    assert "Daniel Jose Garcia" in text_of(teen.get("/profile/access-log"))
    portal.sign_in("maria")
    portal.choose("daniel-garcia")
    page = text_of(portal.get("/profile/access-log"))
    assert "shown only to them" in page and "Viewed" not in page
    portal.post("/switch", {"patient": "Patient/sofia-garcia", "next": "/profile/access-log"}, page="/")
    assert "shown only to them" not in text_of(portal.last_html)
