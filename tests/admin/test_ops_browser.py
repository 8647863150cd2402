"""In a real browser: an operator opens the health dashboard, then the outbox, retries a failed item
and sees it delivered. Pages saved as screenshots (desktop and phone width) and checked with axe-core."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from gateway import db, metrics
from gateway.upstream.outbox import Worker
from tests.admin.conftest import STAFF_PASSWORD, new_staff
from tests.portal.conftest import browser_sign_in, shot
from tests.upstream.conftest import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver("AE")  # the EHR refuses at first
    yield r
    r.close()


@pytest.fixture
def settings(settings: Any, receiver: Receiver) -> Any:
    settings.outbox_message = "hl7"  # the demo family's messages to their care team go to the EHR
    settings.outbox_mllp_port = receiver.port
    settings.outbox_ack_timeout = 2.0
    return settings


def both_widths(page: Any, name: str) -> None:
    shot(page, name)
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, f"{name}-phone")
    page.set_viewport_size({"width": 1280, "height": 900})


def test_browser_operator_checks_health_and_retries_a_failed_outbox_item(browser: Any, site: Any,
                                                                          receiver: Receiver) -> None:
    page = browser
    services = site[1].services
    worker = Worker(services.store, services.settings)
    assert worker.run_once() > 0  # the family's messages, refused by the EHR
    with services.engine.connect() as conn:
        refused = list(conn.execute(select(db.outbox.c.id).where(db.outbox.c.status == "failed")
                                    .order_by(db.outbox.c.id.desc())).scalars())
    failed = refused[0]
    minute = int(time.time()) // 60 * 60_000
    metrics.add_rows(services.engine, [
        {"minute_ms": minute - n * 60_000, "name": metrics.HL7_ROLLUP, "label": label, "count": count,
         "total": count * (30.0 + n), "peak": 60.0 + 2 * n}
        for n in range(1, 40) for label, count in (("processed", 20 + n % 7), ("failed", n % 4))])
    username = new_staff(services.engine, "operator")
    browser_sign_in(page, username, STAFF_PASSWORD, otp=True)
    page.goto("/admin/health")
    page.wait_for_selector("#chart-messages svg")
    assert "Health" in page.inner_text("h1")
    assert page.locator("svg.chart").count() == 4
    both_widths(page, "console-health")
    page.click("#chart-latency summary")
    assert page.locator("#table-latency tbody tr").count() == 60
    shot(page, "console-health-table")
    page.click("header nav a[href='/admin/outbox']")
    page.wait_for_selector("#destinations")
    assert page.inner_text("#destination-message-hl7 .failed") == str(len(refused))
    both_widths(page, "console-outbox")
    page.check(f"#tick-{failed}")
    receiver.mode = "AA"  # the EHR is fixed
    page.click("#retry-selected")
    page.wait_for_selector("p.notice.ok")
    assert f"Item {failed} will be sent again now." in page.inner_text("main")
    shot(page, "console-outbox-retried")
    assert worker.run_once() == 1
    page.click(f"#item-{failed} th a")
    page.wait_for_selector("#item-facts")
    assert page.inner_text("#item-status") == "delivered"
    assert "MDM^T02" in page.inner_text("#item-payload")
    both_widths(page, "console-outbox-item")
