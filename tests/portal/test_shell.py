"""The portal's frame: sign-in guard, whose record (picker, switcher), language, sign-out, errors."""

from __future__ import annotations

from typing import Any

from tests.portal.conftest import Portal, browser_sign_in, shot, text_of


def test_pages_need_sign_in_and_come_back_after_it(portal: Portal) -> None:
    reply = portal.client.get("/")
    assert reply.status_code == 302 and reply.headers["Location"].endswith("/auth/login")
    portal.sign_in("robert", otp=True)
    html = portal.get("/")
    assert "You are viewing your own record." in text_of(html)


def test_a_parent_picks_whose_record_and_switches(portal: Portal) -> None:
    portal.sign_in("maria")
    reply = portal.client.get("/")
    assert reply.status_code == 302 and "/choose" in reply.headers["Location"]
    picker = text_of(portal.get("/choose"))
    assert "Maria Elena Garcia (you)" in picker and "Sofia Isabel Garcia" in picker and "Daniel Jose Garcia" in picker
    assert "access until" in picker  # a minor's proxy access ends before the 18th birthday
    portal.choose("sofia-garcia")
    assert "You are viewing the record of Sofia Isabel Garcia." in text_of(portal.last_html)
    reply = portal.post("/switch", {"patient": "Patient/daniel-garcia", "next": "/"}, page="/")
    assert "You are viewing the record of Daniel Jose Garcia." in text_of(portal.last_html)


def test_nobody_switches_to_a_record_they_may_not_see(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    reply = portal.post("/switch", {"patient": "Patient/robert-chen", "next": "/"}, page="/")
    assert reply.status_code == 400
    assert "Choose one of the records listed." in text_of(portal.last_html)
    assert "You are viewing your own record." in text_of(portal.get("/"))
    reply = portal.post("/choose", {"patient": "Patient/robert-chen", "next": "/"})
    assert reply.status_code == 400


def test_an_ended_relationship_closes_the_record_at_once(portal: Portal, world: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    world.smart.revoke_proxy("linda", "robert-chen")
    html = portal.get("/")
    assert "You are viewing your own record." in text_of(html)
    assert "Robert" not in text_of(html)


def test_forms_refuse_a_missing_csrf_token(portal: Portal) -> None:
    portal.sign_in("maria")
    reply = portal.client.post("/choose", data={"patient": "Patient/maria-garcia"}, headers={"Accept": "text/html"})
    assert reply.status_code == 400
    assert "Traceback" not in reply.get_data(as_text=True)


def test_no_open_redirect_after_switching(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        reply = portal.post("/switch", {"patient": "Patient/sofia-garcia", "next": target}, page="/", follow=False)
        assert reply.headers["Location"] in ("/", "http://localhost/"), target


def test_spanish_by_choice_and_from_the_record(portal: Portal, app: Any) -> None:
    portal.sign_in("daniel")
    portal.post("/language", {"lang": "es", "next": "/"}, page="/")
    html = portal.get("/")
    assert 'lang="es"' in html and "Está viendo su propio expediente." in text_of(html)
    # Maria's record prefers Spanish (Patient.communication): her first page after sign-in is in Spanish.
    other = Portal(app.test_client(), portal.world)
    other.sign_in("maria", lang=None)
    other.choose("maria-garcia")
    assert "Está viendo su propio expediente." in text_of(other.get("/"))


def test_unknown_pages_and_failures_get_a_friendly_page(portal: Portal) -> None:
    portal.sign_in("maria")
    reply = portal.client.get("/no-such-page", headers={"Accept": "text/html"})
    assert reply.status_code == 404 and "There is no page at this address." in text_of(reply.get_data(as_text=True))


def test_sign_out_everywhere_ends_other_sessions(portal: Portal, app: Any) -> None:
    other = Portal(app.test_client(), portal.world)
    portal.sign_in("daniel")
    other.sign_in("daniel")
    assert other.client.get("/").status_code == 200
    portal.post("/sign-out-everywhere", {}, page="/")
    assert "You are signed out on every device and browser." in text_of(portal.last_html)
    reply = other.client.get("/")
    assert reply.status_code == 302 and "/auth/login" in reply.headers["Location"]
    login = text_of(other.get("/auth/login"))
    assert "signed out everywhere" in login


def test_idle_sessions_end(portal: Portal, app: Any) -> None:
    app.extensions["gateway"].settings.portal_idle_seconds = 0
    portal.sign_in("daniel")
    import time

    time.sleep(1.1)
    reply = portal.client.get("/")
    assert reply.status_code == 302
    assert "inactivity" in text_of(portal.get("/auth/login"))


def test_browser_parent_signs_in_picks_a_child_and_switches(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "maria", shots="shell")
    page.wait_for_selector("#record-picker")
    shot(page, "shell-choose")
    page.check("#pick-sofia-garcia")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#whose-record")
    assert "Sofia Isabel Garcia" in page.inner_text("#whose-record")
    shot(page, "shell-home-child")
    page.select_option("#switch-patient", "Patient/daniel-garcia")
    page.click("#record-switcher button[type=submit]")
    assert "Daniel Jose Garcia" in page.inner_text("#whose-record")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "shell-home-phone")
