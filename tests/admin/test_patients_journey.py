"""Browser journey (SQLite pass): the front desk signs in with password and TOTP, finds a patient who
has no login yet, issues a sign-up code, and the patient signs up with it in a browser of their own
and lands in their record. Every page is saved as a screenshot and checked with axe-core."""

from __future__ import annotations

from typing import Any

import pyotp

from tests.admin.conftest import STAFF_PASSWORD, new_staff
from tests.portal.conftest import TOTP_SECRET, shot


def _new_patient(world: Any) -> None:
    with world.services.store.writing() as repo:
        repo.update("Patient", "ana-ruiz", {
            "resourceType": "Patient", "id": "ana-ruiz", "birthDate": "1992-03-04", "gender": "female",
            "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "MR"}]},
                            "system": "urn:oid:2.16.840.1.113883.3.4242.1.1", "value": "RG1003001"}],
            "name": [{"use": "official", "given": ["Ana"], "family": "Ruiz"}],
            "telecom": [{"system": "email", "value": "ana.ruiz@example.org"}],
            "address": [{"use": "home", "line": ["12 Elm Street"], "city": "Springfield", "state": "MA",
                         "postalCode": "01103"}]}, None)


def test_front_desk_issues_a_code_and_the_patient_signs_up_with_it(browser: Any, site: tuple[str, Any],
                                                                   chromium: Any) -> None:
    base, world = site
    _new_patient(world)
    username = new_staff(world.services.engine, "front-desk", username="desk-ines")
    page = browser

    page.goto("/admin/patients")  # the console sends a signed-out visitor to the login, and back after it
    page.fill("#login-form input[name=username]", username)
    page.fill("#login-form input[name=password]", STAFF_PASSWORD)
    shot(page, "console-patients-sign-in")
    page.click("#login-form button[type=submit]")
    page.fill("input[name=otp]", pyotp.TOTP(TOTP_SECRET).now())
    shot(page, "console-patients-mfa")
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#patient-lookup")
    shot(page, "console-patients-lookup")

    page.fill("#name", "ruiz")
    page.fill("#birthdate", "1992-03-04")
    page.click("#patient-lookup button[type=submit]")
    row = page.locator("#match-ana-ruiz")
    assert "None yet" in row.inner_text() and "RG1003001" in row.inner_text()
    shot(page, "console-patients-found")
    row.locator("a").click()
    page.wait_for_selector("#no-logins")
    assert "Ana Ruiz" in page.inner_text("h1")
    shot(page, "console-patients-record")

    page.click("#code-form button[type=submit]")
    code = page.inner_text("#activation-code").strip()
    assert len(code) == 19
    shot(page, "console-patients-code")
    page.click("#back-to-patient")
    assert "Not used yet" in page.inner_text("#code-table") and code not in page.content()

    # Ana, in a browser of her own.
    context = chromium.new_context(base_url=base, viewport={"width": 375, "height": 800}, locale="en-US")
    context.set_default_timeout(15_000)
    ana = context.new_page()
    try:
        ana.goto("/auth/signup")
        ana.fill("#activation_code", code)
        ana.fill("#username", "ana")
        ana.fill("#password", "ana's long password")
        ana.click("#signup-form button[type=submit]")
        ana.wait_for_selector("#whose-record")
        assert "your own record" in ana.inner_text("#whose-record")
        assert "Ana Ruiz" in ana.inner_text("body")
        shot(ana, "console-patients-signed-up-phone")
    finally:
        context.close()

    page.reload()
    assert "ana" in page.inner_text("#login-table")
    assert "Used on" in page.inner_text("#code-table")
    shot(page, "console-patients-record-after-sign-up")

    # A record with a login using two-step verification and a caregiver: the reset refused with one check.
    page.goto("/admin/patients/robert-chen")
    assert "linda" in page.inner_text("#may-see-this")
    page.check("#check-photo-id")
    page.click("#mfa-reset-form button[type=submit]")
    assert "at least two checks" in page.inner_text("#patients-error")
    shot(page, "console-patients-record-mfa-refused")
