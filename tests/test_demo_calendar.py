"""The demo world's calendar moves to the week it is loaded in (gateway/fhir/demo_calendar.py)."""

from __future__ import annotations

import copy
import json
from datetime import date, datetime
from typing import Any

import pytest

from gateway.fhir.bundles import BundleProcessor, import_file
from gateway.fhir.demo_calendar import keep_calendar_current, weeks_behind
from gateway.fhir.validate import validate
from tests.smart_auth.conftest import FIXTURES


def bundles() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(FIXTURES.glob("*.json"))}


def resources(bundle: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind}


@pytest.mark.parametrize(("today", "weeks"), [(date(2026, 11, 23), 0), (date(2026, 12, 2), 0), (date(2026, 12, 6), 0),
                                               (date(2026, 12, 7), 1), (date(2026, 12, 13), 1), (date(2027, 3, 3), 13)])
def test_whole_weeks_from_the_fixtures_first_calendar_week(today: date, weeks: int) -> None:
    assert weeks_behind(today) == weeks


def test_in_the_fixtures_own_week_nothing_moves() -> None:
    for name, bundle in bundles().items():
        assert keep_calendar_current(copy.deepcopy(bundle), date(2026, 12, 2)) == bundle, name


def test_later_the_calendar_is_ahead_again_with_its_weekdays_and_times() -> None:
    today = date(2027, 3, 3)  # 13 weeks on: every fixture appointment and slot would be past
    original = bundles()
    moved = {name: keep_calendar_current(copy.deepcopy(bundle), today) for name, bundle in original.items()}
    slots = resources(moved["05-schedules.json"], "Slot")
    before_slots = resources(original["05-schedules.json"], "Slot")
    upcoming = []
    for name in ("10-garcia-family.json", "20-chen-family.json"):
        for rid, appointment in resources(moved[name], "Appointment").items():
            was = resources(original[name], "Appointment")[rid]
            if appointment["status"] != "booked":  # a visit that happened, or a cancelled one, keeps its date
                assert appointment == was
                continue
            start, was_start = datetime.fromisoformat(appointment["start"]), datetime.fromisoformat(was["start"])
            assert (start - was_start).days == 91 and start.date() > today and start.weekday() == was_start.weekday()
            assert start.utcoffset() == was_start.utcoffset() and start.time() == was_start.time()
            (slot_ref,) = [s["reference"] for s in appointment["slot"]]
            slot = slots[slot_ref.split("/")[1]]
            assert (slot["start"], slot["end"]) == (appointment["start"], appointment["end"])
            validate(appointment)
            upcoming.append(rid)
    assert len(upcoming) == 5
    # the whole schedule: its first slot in the week of today, its last 13 weeks after the fixtures' last
    starts = sorted(datetime.fromisoformat(s["start"]) for s in slots.values())
    assert starts[0].date() == date(2027, 3, 1) and len(slots) == len(before_slots)
    for slot in list(slots.values())[:5]:
        validate(slot)
    for schedule in resources(moved["05-schedules.json"], "Schedule").values():
        assert schedule["planningHorizon"]["start"].startswith("2027-03-01")
        validate(schedule)
    # the rest of the record keeps its dates
    for kind in ("Observation", "Encounter", "Communication"):
        assert resources(moved["10-garcia-family.json"], kind) == resources(original["10-garcia-family.json"], kind)


def test_importing_the_world_applies_it(store: Any) -> None:
    counts = import_file(BundleProcessor(store), str(FIXTURES / "05-schedules.json"),
                         adjust=lambda bundle: keep_calendar_current(bundle, date(2027, 3, 3)))
    assert counts["failed"] == 0 and counts["entries"] == 542
    with store.reading() as repo:
        slot = repo.find("Slot", "slot-emily-carter-20261208-0930").resource()
    assert slot["start"] == "2027-03-09T09:30:00-05:00" and slot["status"] == "busy"
