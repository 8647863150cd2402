"""Appointments in a real browser: a parent books for a child, cancels and joins the waitlist, then
takes an earlier time; a caregiver reschedules her father's video visit. Every page is saved as a
screenshot at desktop and phone width and checked with axe-core."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway.portal import appointments as service
from tests.portal.conftest import browser_sign_in, future_slots, shot


def both_widths(page: Any, name: str) -> None:
    shot(page, name)
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, f"{name}-phone")
    page.set_viewport_size({"width": 1280, "height": 900})


def search_from_slot(page: Any, services: Any, schedule: str, slot_id: str) -> None:
    """The find form for three clinic days from the day of the Slot `slot_id`. Not from the day
    before: the demo calendar has six slots a weekday for each doctor, and a window from the day
    before could fill the first page (12) before the test's own slots, depending on the hour the
    test runs."""
    with services.store.reading() as repo:
        start = repo.read("Slot", slot_id).resource()["start"]
    first = datetime.fromisoformat(start).astimezone(ZoneInfo(services.settings.timezone)).date()
    page.select_option("#find-schedule", schedule)
    page.fill("#find-start", first.isoformat())
    page.fill("#find-end", (first + timedelta(days=2)).isoformat())
    page.click("#find-form button[type=submit]")
    page.wait_for_selector("#slots-title")


def test_browser_parent_books_cancels_and_takes_an_earlier_time_for_a_child(browser: Any, site: Any) -> None:
    page = browser
    services = site[1].services
    slots = future_slots(services.store, schedule="james-okafor-schedule", days=3, count=2)
    browser_sign_in(page, "maria")
    page.check("#pick-sofia-garcia")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#whose-record")
    shot(page, "appointments-home-es")  # Maria's record prefers Spanish: her first page is in Spanish
    page.click("nav a[href='/appointments']")
    page.wait_for_selector("#upcoming-title")
    assert "Citas" in page.inner_text("h1")
    shot(page, "appointments-list-es")
    page.select_option("#lang-select", "en")
    page.click("form:has(#lang-select) button[type=submit]")
    page.wait_for_selector("#upcoming-title")
    assert "Sofia Isabel Garcia" in page.inner_text("#whose-record")
    both_widths(page, "appointments-list")
    page.click("#find-a-time")
    both_widths(page, "appointments-find")
    page.select_option("#find-schedule", "james-okafor-schedule")
    page.fill("#find-start", "2027-01-20")
    page.fill("#find-end", "2027-01-10")  # before the start
    page.click("#find-form button[type=submit]")
    assert "Enter a valid date range" in page.inner_text("#find-problem")
    shot(page, "appointments-find-error")
    search_from_slot(page, services, "james-okafor-schedule", slots[0])
    both_widths(page, "appointments-slots")
    page.click("#hold-form button[type=submit]")  # no time picked
    assert "Choose a time first." in page.inner_text("#find-problem")
    page.check(f"#slot-{slots[0]}")
    page.fill("#hold-reason", "Ear ache")
    page.click("#hold-form button[type=submit]")
    page.wait_for_selector("#book-form")
    assert "We are holding this time" in page.inner_text("#appointments-done")
    both_widths(page, "appointments-hold")
    page.click("#book-form button[type=submit]")
    assert "Your appointment is booked." in page.inner_text("#appointments-done")
    assert "Booked" in page.inner_text("#appointment-status")
    both_widths(page, "appointments-detail")
    page.select_option("#cancel-reason", "pat-fb")
    page.click("#cancel-form button[type=submit]")
    assert "The appointment is cancelled." in page.inner_text("#appointments-done")
    shot(page, "appointments-cancelled")
    # the waitlist for an earlier time than Sofia's January check-up
    page.goto("/appointments/sofia-garcia-appt-2027-01-12")
    page.click("#waitlist-form button[type=submit]")
    assert "You are on the waitlist" in page.inner_text("#appointments-done")
    both_widths(page, "appointments-waitlisted")
    # a time opens after she joined (the EHR opens a new slot): the sweep offers it
    opened = future_slots(services.store, schedule="james-okafor-schedule", days=5, count=1)
    offers = service.sweep(services).offers
    assert [o.slot_id for o in offers] == [opened[0]]
    page.goto("/")
    page.wait_for_selector("#home-appointments .offer")
    both_widths(page, "appointments-home-offer")
    page.click("nav a[href='/appointments']")
    page.wait_for_selector("#waitlist-offers")
    both_widths(page, "appointments-offer")
    page.click("#waitlist-offers form[id^=offer-accept] button")
    assert "The earlier time is booked" in page.inner_text("#appointments-done")
    shot(page, "appointments-offer-accepted")
    page.goto("/appointments/sofia-garcia-appt-2027-01-12")
    assert "Cancelled" in page.inner_text("#appointment-status")


def test_browser_caregiver_reschedules_her_fathers_visit(browser: Any, site: Any) -> None:
    page = browser
    services = site[1].services
    slots = future_slots(services.store, schedule="emily-carter-schedule", days=4, count=2)
    soon = future_slots(services.store, schedule="emily-carter-schedule", hours_from_now=1, count=1)
    browser_sign_in(page, "linda")
    page.check("#pick-robert-chen")
    page.click("#record-picker button[type=submit]")
    page.goto("/appointments/robert-chen-appt-2026-12-10")
    assert page.get_attribute("#video-link", "href").startswith("https://video.riverside.example.org/join/")
    both_widths(page, "appointments-video")
    page.click("#reschedule-link")
    page.wait_for_selector("#rescheduling")
    search_from_slot(page, services, "emily-carter-schedule", slots[0])
    shot(page, "appointments-reschedule-slots")
    page.check(f"#slot-{slots[1]}")
    page.click("#hold-form button[type=submit]")
    page.wait_for_selector("#book-form")
    both_widths(page, "appointments-reschedule-confirm")
    page.click("#book-form button[type=submit]")
    assert "moved to the new time" in page.inner_text("#appointments-done")
    page.goto("/appointments/robert-chen-appt-2026-12-10")
    assert "Cancelled" in page.inner_text("#appointment-status")
    # an appointment less than 2 hours away: the page says to call the office
    page.goto("/appointments/find?schedule=emily-carter-schedule")
    page.check(f"#slot-{soon[0]}")
    page.click("#hold-form button[type=submit]")
    page.click("#book-form button[type=submit]")
    assert "(413) 555-0120" in page.inner_text("#call-the-office")
    assert page.query_selector("#cancel-form") is None
    both_widths(page, "appointments-call-office")
