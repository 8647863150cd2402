"""The demo world's calendar (fixtures/fhir) kept current.

The fixtures are written as of one week (fixtures/README.md): the Slots of the two schedules start
on Monday 2026-11-30 and the booked appointments fall in the weeks after it. Loaded later, that
calendar would lie in the past: nothing to book, no upcoming visit to show, cancel or be reminded
of. So when the demo world is loaded, its calendar (every Slot, the Schedules' planning horizons,
and the appointments still to come: booked, proposed, pending) moves forward by the whole weeks
since that Monday, keeping weekdays and times of day. Ids stay as written (they name the dates of
the fixtures); the rest of the record (visits, results, messages) keeps its own dates, in the past.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

CALENDAR_WEEK = date(2026, 11, 30)  # the Monday of the fixtures' first calendar week
UPCOMING = frozenset({"booked", "proposed", "pending"})


def weeks_behind(today: date | None = None) -> int:
    """Whole weeks from the fixtures' first calendar week to the week of `today` (UTC), at least 0."""
    today = today or datetime.now(UTC).date()
    monday = today - timedelta(days=today.weekday())
    return max(0, (monday - CALENDAR_WEEK).days // 7)


def keep_calendar_current(bundle: dict[str, Any], today: date | None = None) -> dict[str, Any]:
    """The bundle with its calendar moved forward by weeks_behind(today) weeks (changed in place)."""
    days = 7 * weeks_behind(today)
    if not days:
        return bundle
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType")
        if kind == "Slot" or (kind == "Appointment" and resource.get("status") in UPCOMING):
            _move(resource, days)
        elif kind == "Schedule" and isinstance(resource.get("planningHorizon"), dict):
            _move(resource["planningHorizon"], days)
    return bundle


def _move(element: dict[str, Any], days: int) -> None:
    for name in ("start", "end"):
        value = element.get(name)
        if isinstance(value, str) and "T" in value:  # instants: date, time and offset
            element[name] = (datetime.fromisoformat(value.replace("Z", "+00:00")) + timedelta(days=days)).isoformat()
        elif isinstance(value, str) and len(value) == 10:  # a date
            element[name] = (date.fromisoformat(value) + timedelta(days=days)).isoformat()
