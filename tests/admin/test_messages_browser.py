"""The operator's journey in a real browser (SQLite pass only, like the portal's journeys): sign in
with password and TOTP, find a failed message by its status, and after the test fixes the mapping
that made it fail, reprocess it from its page and see it processed with the resources it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyotp
from sqlalchemy import select

from gateway import db
from tests.admin.conftest import STAFF_PASSWORD, new_staff
from tests.admin.test_messages import adt, fix_mappings, mapping_dir  # noqa: F401  (the fixture)
from tests.portal.conftest import shot
from tests.smart_auth.conftest import TOTP_SECRET


def test_operator_reprocesses_a_failed_message_after_a_mapping_fix(mapping_dir: Path,  # noqa: F811
                                                                    browser: Any, site: Any) -> None:
    _base, world = site
    services = world.services
    username = new_staff(services.engine, "operator")
    ingest = services.hl7
    for n in range(3):  # the feed's ordinary traffic around it
        assert ingest.receive_one(adt(f"OK{n}", mrn=f"MRN20{n}"), "mllp", "10.1.2.3").status == "processed"
    failed = ingest.receive_one(adt("REG-0042", mrn="MRN777", event="A04"), "mllp", "10.1.2.3")
    assert failed.status == "failed"
    ingest.receive_one(adt("OK9", mrn="MRN209"), "mllp", "10.1.2.3")

    page = browser
    page.goto("/admin/messages")  # signed out: the login, then back here
    page.fill("#login-form input[name=username]", username)
    page.fill("#login-form input[name=password]", STAFF_PASSWORD)
    page.click("#login-form button[type=submit]")
    page.fill("input[name=otp]", pyotp.TOTP(TOTP_SECRET).now())
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#messages-table")
    assert page.locator("#messages-table tbody tr").count() == 5
    shot(page, "admin-messages-list")

    page.select_option("#status", "failed")
    page.click("#message-filters button[type=submit]")
    page.wait_for_url("**/admin/messages?*status=failed*")
    rows = page.locator("#messages-table tbody tr")
    assert rows.count() == 1 and "REG-0042" in rows.first.inner_text()
    shot(page, "admin-messages-failed")

    page.click(f"#message-{failed.message_id} a")
    page.wait_for_selector("#message-error")
    assert "event ADT^A04 is not translated" in page.inner_text("#message-error")
    assert "Message Type" in page.inner_text("#error-location")
    assert page.get_attribute("#raw-message span[title^='PID-5 ']", "title") == "PID-5 Patient Name (XPN)"
    assert "MSA" in page.inner_text("#message-ack")
    shot(page, "admin-messages-detail-failed")

    fix_mappings(mapping_dir)  # the integration engineer adds ADT^A04 to the ADT map
    page.click("#reprocess-form button[type=submit]")
    page.wait_for_selector(".notice")
    assert "was reprocessed: processed" in page.inner_text(".notice")
    assert page.inner_text("#message-status").strip().startswith("processed")
    written = page.locator("#written-table tbody tr")
    assert written.count() >= 2  # the Patient and the Encounter
    assert "created" in page.inner_text("#written-table")
    shot(page, "admin-messages-detail-processed")

    with services.engine.connect() as conn:
        patient_id = conn.execute(select(db.hl7_message.c.patient_id)
                                  .where(db.hl7_message.c.id == failed.message_id)).scalar()
    page.click("#patient-link")
    page.wait_for_selector("#resource-json")
    assert page.inner_text("#resource-heading") == f"Patient/{patient_id}"
    assert "MRN777" in page.inner_text("#resource-json")
    shot(page, "admin-resource-patient")

    page.goto("/admin/messages?status=failed")  # nothing left to fix
    assert page.locator("#no-messages").count() == 1
