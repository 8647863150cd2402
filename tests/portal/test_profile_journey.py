"""Browser journeys through sign-up, two-step verification, profile and sharing, with a screenshot
(and an axe-core check) of every page at desktop and phone width."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyotp
import pytest

from gateway.smart_auth import people
from tests.portal.conftest import PASSWORD, TOTP_SECRET, browser_sign_in, shot

PHONE = {"width": 375, "height": 800}


@pytest.fixture
def mail_configured(settings: Any) -> Iterator[None]:
    """An SMTP host in the settings, so that the forgot-username and forgot-password pages are on
    (nothing is sent: the journey asks only about an address nobody has)."""
    settings.smtp_host = "127.0.0.1"
    settings.smtp_port = 9
    yield


def _both_widths(page: Any, name: str) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, name)
    page.set_viewport_size(PHONE)
    shot(page, f"{name}-phone")
    page.set_viewport_size({"width": 1280, "height": 900})


def _new_patient(world: Any, patient_id: str) -> str:
    with world.services.store.writing() as repo:
        repo.update("Patient", patient_id, {
            "resourceType": "Patient", "id": patient_id, "birthDate": "1990-06-01",
            "name": [{"use": "official", "given": ["Grace"], "family": "Park"}],
            "telecom": [{"system": "email", "value": "grace.park@example.org"}]}, None)
    return people.issue_activation_code(world.smart.engine, patient_id)[0]


def test_sign_up_mfa_grant_and_revoke(mail_configured: None, browser: Any, site: tuple[str, Any],
                                      chromium: Any) -> None:
    base, world = site
    page = browser
    # The sign-in pages.
    page.goto("/auth/login")
    _both_widths(page, "signin-login")
    page.click("#forgot-username-link")
    _both_widths(page, "signin-forgot-username")
    page.fill("#email", "nobody@example.org")
    page.click("#forgot-username-form button[type=submit]")
    assert "on their way" in page.inner_text("main")
    shot(page, "signin-forgot-username-sent")
    page.goto("/auth/login")
    page.click("#forgot-password-link")
    _both_widths(page, "signin-forgot-password")

    # Sign-up with an activation code, for a patient who has no login yet.
    code = _new_patient(world, "grace-park")
    page.goto("/auth/login")
    page.click("#signup-link")
    _both_widths(page, "signin-signup")
    page.fill("#activation_code", "AAAA-BBBB-CCCC-DDDD")
    page.fill("#username", "grace")
    page.fill("#password", "grace's long password")
    page.click("#signup-form button[type=submit]")
    assert "we do not know it" in page.inner_text("#signup-error")
    shot(page, "signin-signup-error")
    page.fill("#activation_code", code)
    page.fill("#password", "grace's long password")
    page.click("#signup-form button[type=submit]")
    page.wait_for_selector("#whose-record")
    assert "your own record" in page.inner_text("#whose-record")
    shot(page, "signin-signup-done-home")

    # Two-step verification from the profile.
    page.goto("/profile")
    _both_widths(page, "profile")
    page.click("#mfa-start-form button[type=submit]")
    secret = page.inner_text("#totp-secret").strip()
    assert page.inner_text("#totp-uri").startswith("otpauth://totp/")
    _both_widths(page, "profile-mfa-setup")
    page.fill("#mfa-otp", pyotp.TOTP(secret).now())
    page.click("#mfa-confirm-form button[type=submit]")
    assert "Two-step verification is on." in page.inner_text("#profile-done")
    shot(page, "profile-mfa-on")
    page.click("#sign-out-form button[type=submit]")
    browser_sign_in(page, "grace", "grace's long password")
    page.wait_for_selector("#mfa-form")
    shot(page, "signin-mfa")
    page.fill("#otp", pyotp.TOTP(secret).now())
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#whose-record")

    # Linda, Robert's caregiver, is looking at his record in another browser.
    linda_context = chromium.new_context(base_url=base, viewport={"width": 1280, "height": 900}, locale="en-US")
    linda = linda_context.new_page()
    try:
        browser_sign_in(linda, "linda")
        linda.check("#pick-robert-chen")
        linda.click("#record-picker button[type=submit]")
        assert "Robert Chen" in linda.inner_text("#whose-record")
        linda.goto("/sharing")
        assert "You are acting for someone else." in linda.inner_text("#grant-refused")
        _both_widths(linda, "sharing-caregiver-view")

        # Robert gives Grace access, then ends Linda's.
        robert_context = chromium.new_context(base_url=base, viewport={"width": 1280, "height": 900},
                                              locale="en-US")
        robert = robert_context.new_page()
        try:
            browser_sign_in(robert, "robert")
            # (conftest's browser_sign_in(otp=True) clicks the first form's button: the language switch)
            robert.fill("#otp", pyotp.TOTP(TOTP_SECRET).now())
            robert.click("#mfa-form button[type=submit]")
            robert.wait_for_selector("#whose-record")
            robert.goto("/sharing")
            _both_widths(robert, "sharing")
            robert.fill("#grant-username", "grace")
            robert.select_option("#grant-relationship", "FRND")
            robert.click("#grant-form button[type=submit]")
            assert "Access granted." in robert.inner_text("#sharing-done")
            assert "(grace)" in robert.inner_text("#proxies")
            shot(robert, "sharing-granted")
            robert.click("#revoke-linda")
            assert "Access ended." in robert.inner_text("#sharing-done")
            assert "(linda)" not in robert.inner_text("#proxies")
            _both_widths(robert, "sharing-revoked")
            robert.goto("/profile/access-log")
            assert "Linda Mei Chen" in robert.inner_text("#access-log-table")
            _both_widths(robert, "profile-access-log")
        finally:
            robert_context.close()

        # Linda's next page shows only her own record.
        linda.goto("/")
        assert "your own record" in linda.inner_text("#whose-record")
        assert linda.query_selector("#record-switcher") is None
        linda.goto("/sharing")
        assert "You do not act for anyone else." in linda.inner_text("#acting-for")
        shot(linda, "sharing-after-revoke")
    finally:
        linda_context.close()

    # Grace can now act for Robert: her next page asks whose record to see.
    page.goto("/sharing")
    page.wait_for_selector("#record-picker")
    page.check("#pick-grace-park")
    page.click("#record-picker button[type=submit]")
    assert "Robert Chen" in page.inner_text("#acting-for")
    _both_widths(page, "sharing-acting-for")


def test_a_parent_sees_sharing_for_herself_her_child_and_her_teen(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "maria", PASSWORD)
    page.check("#pick-maria-garcia")
    page.click("#record-picker button[type=submit]")
    page.goto("/sharing")
    # Maria's record prefers Spanish: the portal speaks it from her first page.
    assert page.get_attribute("html", "lang") == "es"
    assert "Sofia Isabel Garcia" in page.inner_text("#acting-for")
    assert "13 feb 2036" in page.inner_text("#acting-sofia-garcia")  # the day before her 18th birthday
    assert "permanece oculta" in page.inner_text("#acting-daniel-garcia")  # Daniel is 15
    _both_widths(page, "sharing-parent")
    page.select_option("#switch-patient", "Patient/daniel-garcia")
    page.click("#record-switcher button[type=submit]")
    assert "lo configura el consultorio" in page.inner_text("#grant-refused")
    _both_widths(page, "sharing-parent-teen")
    page.goto("/profile")
    _both_widths(page, "profile-parent-teen")
