"""Appointments: list and detail, find-hold-book, cancel and reschedule with the 2-hour rule, the
waitlist and its offers, the race for one Slot, and who may book for whom."""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from gateway import db
from gateway.portal import appointments as service
from tests.portal.conftest import Portal, csrf_of, future_slots, text_of
from tests.smart_auth.conftest import FIXTURES, keep_current


def load_schedule_resources(store: Any) -> None:
    """The two Schedules of the demo clinic, without the fixture calendar's Slots."""
    bundle = keep_current(json.loads((FIXTURES / "05-schedules.json").read_text(encoding="utf-8")))
    with store.writing() as repo:
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Schedule":
                repo.update("Schedule", resource["id"], resource)


@pytest.fixture
def clinic(app: Any, portal: Portal) -> Any:
    services = app.extensions["gateway"]
    load_schedule_resources(services.store)
    return services


def slot_of(store: Any, slot_id: str) -> dict[str, Any]:
    with store.reading() as repo:
        return repo.find("Slot", slot_id).resource()


def appointment_of(store: Any, appointment_id: str) -> dict[str, Any]:
    with store.reading() as repo:
        return repo.find("Appointment", appointment_id).resource()


def appointments_of(store: Any, patient: str) -> list[dict[str, Any]]:
    from gateway.fhir.search import search

    with store.reading() as repo:
        _, result = search(repo, "Appointment", [("patient", f"Patient/{patient}"), ("_count", "200")])
    return [s.resource() for s in result.matches]


def find_url(schedule: str = "emily-carter-schedule", days: int = 3, span: int = 2, **extra: str) -> str:
    first = (datetime.now(UTC) + timedelta(days=days - 1)).date()
    last = first + timedelta(days=span)
    query = f"/appointments/find?schedule={schedule}&start={first.isoformat()}&end={last.isoformat()}"
    return query + "".join(f"&{k}={v}" for k, v in extra.items())


def hold_and_book(portal: Portal, slot_id: str, find: str | None = None, **extra: str) -> str:
    find = find or find_url()
    reply = portal.post("/appointments/hold", {"slot": slot_id, "schedule": "emily-carter-schedule", **extra},
                        page=find, follow=False)
    assert reply.status_code == 302, text_of(reply.get_data(as_text=True))[:400]
    detail = reply.headers["Location"].split("?")[0]
    reply = portal.post(detail.replace("http://localhost", "") + "/book", {},
                        page=detail.replace("http://localhost", ""), follow=True)
    assert reply.status_code == 200, text_of(portal.last_html)[:400]
    return detail.rsplit("/", 1)[1]


def test_the_list_shows_upcoming_and_past_with_details(portal: Portal, clinic: Any) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    html = text_of(portal.get("/appointments"))
    upcoming, past = html.split("Past and cancelled", 1)
    assert "Diabetes follow-up" in upcoming and "Dr. Emily Carter" in upcoming
    assert "Completed" in past
    assert "Dr. Emily Carter" in html
    detail = text_of(portal.get("/appointments/maria-garcia-appt-2026-12-08"))
    assert "Dr. Emily Carter, MD" in detail and "Riverside General Hospital - Main Clinic" in detail
    assert "1200 Riverside Avenue" in detail and "Please arrive 15 minutes early" in detail


def test_a_video_visit_has_its_link(portal: Portal, clinic: Any) -> None:
    portal.sign_in("robert", otp=True)
    html = portal.get("/appointments/robert-chen-appt-2026-12-10")
    assert 'id="video-link" href="https://video.riverside.example.org/join/' in html
    assert "https://video.riverside.example.org/join/" in portal.get("/")


def test_maria_books_for_sofia_and_it_lands_in_sofias_record(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=3)
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    html = portal.get(find_url())
    assert f'id="slot-{slots[0]}"' in html
    appointment_id = hold_and_book(portal, slots[0], reason="Cough for two weeks")
    assert "Your appointment is booked." in text_of(portal.last_html)
    booked = appointment_of(clinic.store, appointment_id)
    assert booked["status"] == "booked"
    assert {p["actor"]["reference"] for p in booked["participant"]} == {
        "Patient/sofia-garcia", "Practitioner/emily-carter", "Location/riverside-main-clinic"}
    assert booked["slot"] == [{"reference": f"Slot/{slots[0]}"}]
    assert booked["reasonCode"] == [{"text": "Cough for two weeks"}]
    assert slot_of(clinic.store, slots[0])["status"] == "busy"
    assert appointment_id in [a["id"] for a in appointments_of(clinic.store, "sofia-garcia")]
    assert appointment_id not in [a["id"] for a in appointments_of(clinic.store, "maria-garcia")]


def test_linda_books_for_robert_then_reschedules_and_the_old_slot_is_free(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=4, count=4)
    portal.sign_in("linda")
    portal.choose("robert-chen")
    first = hold_and_book(portal, slots[0], find_url(days=4))
    assert appointment_of(clinic.store, first)["participant"][0]["actor"]["reference"] == "Patient/robert-chen"
    detail = portal.get(f"/appointments/{first}")
    assert 'id="reschedule-link"' in detail
    find = find_url(days=4, replaces=first)
    assert "The old one is cancelled only once the new one is booked." in text_of(portal.get(find))
    second = hold_and_book(portal, slots[2], find, replaces=first)
    assert "moved to the new time" in text_of(portal.last_html)
    assert appointment_of(clinic.store, second)["status"] == "booked"
    old = appointment_of(clinic.store, first)
    assert old["status"] == "cancelled" and old["cancelationReason"]["text"] == "Rescheduled by the patient"
    assert slot_of(clinic.store, slots[0])["status"] == "free"
    assert slot_of(clinic.store, slots[2])["status"] == "busy"


# --- the find form, one test per bad input ---

@pytest.mark.parametrize("query, message", [
    ("schedule=no-such-schedule", "Choose a kind of visit from the list."),
    ("schedule=emily-carter-schedule&start=2026-13-45", "Enter a valid date range"),
    ("schedule=emily-carter-schedule&start=tomorrow", "Enter a valid date range"),
    ("schedule=emily-carter-schedule&start=2099-02-10&end=2099-02-01", "Enter a valid date range"),
    ("schedule=emily-carter-schedule&start=2099-01-01&end=2099-12-31", "Enter a valid date range"),
    ("schedule=emily-carter-schedule&start=2020-01-01&end=2020-01-05", "Enter a valid date range"),
])
def test_find_refuses_a_bad_search(portal: Portal, clinic: Any, query: str, message: str) -> None:
    portal.sign_in("daniel")
    html = portal.get(f"/appointments/find?{query}", status=400)
    assert 'role="alert"' in html and message in text_of(html)
    assert 'id="hold-form"' not in html


def test_find_lists_only_free_future_slots_in_pages(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=6, count=14)
    past = future_slots(clinic.store, hours_from_now=-5, count=1)
    portal.sign_in("daniel")
    with clinic.store.writing() as repo:
        repo.update("Slot", slots[1], {**slot_of(clinic.store, slots[1]), "status": "busy"})
    # two days: the fourteen half hours may run past the clinic's midnight (from 23:00 UTC they do)
    html = portal.get(find_url(days=6, span=2))
    assert f'id="slot-{slots[0]}"' in html and f'id="slot-{slots[1]}"' not in html and past[0] not in html
    assert f'id="slot-{slots[12]}"' in html and f'id="slot-{slots[13]}"' not in html  # 12 a page
    more = re.search(r'href="([^"]+)" id="more-slots"', html).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    assert f'id="slot-{slots[13]}"' in portal.get(more)


# --- the hold form, one test per bad input ---

def test_hold_without_a_slot_is_refused(portal: Portal, clinic: Any) -> None:
    future_slots(clinic.store, days=3, count=2)
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"schedule": "emily-carter-schedule"}, page=find_url())
    assert reply.status_code == 400 and "Choose a time first." in text_of(portal.last_html)
    assert 'role="alert"' in portal.last_html


def test_hold_of_a_slot_in_the_past_is_refused(portal: Portal, clinic: Any) -> None:
    past = future_slots(clinic.store, hours_from_now=-3, count=1)
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": past[0]}, page=find_url())
    assert reply.status_code == 400 and "That time has already passed." in text_of(portal.last_html)
    assert slot_of(clinic.store, past[0])["status"] == "free"


def test_hold_of_a_slot_already_taken_is_refused(portal: Portal, clinic: Any, app: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=2)
    other = Portal(app.test_client(), portal.world)
    other.sign_in("maria")
    other.choose("maria-garcia")
    hold_and_book(other, slots[0])
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": slots[0], "schedule": "emily-carter-schedule",
                                               "start": "", "end": ""}, page=find_url())
    assert reply.status_code == 409
    assert "That time was just taken. Please pick another." in text_of(portal.last_html)
    assert not [a for a in appointments_of(clinic.store, "daniel-garcia") if a.get("slot")
                and a["slot"][0]["reference"] == f"Slot/{slots[0]}"]


def test_hold_of_an_unknown_slot_is_refused(portal: Portal, clinic: Any) -> None:
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": "no-such-slot"}, page=find_url())
    assert reply.status_code == 400 and "That time is not offered any more." in text_of(portal.last_html)


def test_hold_with_a_reason_too_long_is_refused(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": slots[0], "reason": "x" * 201}, page=find_url())
    assert reply.status_code == 400 and "at most 200 characters" in text_of(portal.last_html)
    assert slot_of(clinic.store, slots[0])["status"] == "free"


def test_hold_without_csrf_is_refused(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    reply = portal.client.post("/appointments/hold", data={"slot": slots[0]}, headers={"Accept": "text/html"})
    assert reply.status_code == 400 and slot_of(clinic.store, slots[0])["status"] == "free"


def test_a_hold_is_pending_and_tentative_and_goes_to_the_ehr_as_srm_s01(portal: Portal, clinic: Any) -> None:
    clinic.settings.outbox_appointment_request = "hl7"
    clinic.settings.outbox_appointment_cancel = "hl7"
    with clinic.store.writing() as repo:
        # PID-3.4 takes the assigner's display, and HD.1 holds 20 characters: a short one here (the
        # demo's "Riverside General Hospital" makes hl7apy refuse every outbound message; see README)
        patient = repo.find("Patient", "daniel-garcia").resource()
        patient["identifier"][0]["assigner"]["display"] = "RGH"
        repo.update("Patient", "daniel-garcia", patient)
    slots = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": slots[0], "reason": "Knee pain"}, page=find_url(),
                        follow=False)
    appointment_id = reply.headers["Location"].split("?")[0].rsplit("/", 1)[1]
    held = appointment_of(clinic.store, appointment_id)
    assert held["status"] == "pending" and held["slot"] == [{"reference": f"Slot/{slots[0]}"}]
    slot = slot_of(clinic.store, slots[0])
    assert slot["status"] == "busy-tentative"
    until = service.instant(next(e["valueDateTime"] for e in slot["extension"] if e["url"] == service.EXT_HOLD_UNTIL))
    assert timedelta(minutes=9) < until - datetime.now(UTC) <= timedelta(minutes=10)
    assert "We hold this time for you until" in text_of(portal.get(f"/appointments/{appointment_id}"))
    portal.post(f"/appointments/{appointment_id}/release", {}, page=f"/appointments/{appointment_id}")
    with clinic.engine.connect() as conn:
        items = conn.execute(select(db.outbox.c.kind, db.outbox.c.status, db.outbox.c.payload, db.outbox.c.last_error)
                             .where(db.outbox.c.resource_id == appointment_id).order_by(db.outbox.c.id)).all()
    assert [(i.kind, i.status, i.last_error) for i in items] == [("appointment-request", "pending", None),
                                                   ("appointment-cancel", "pending", None)]
    assert "SRM^S01" in items[0].payload and "Knee pain" in items[0].payload and "RG1001003" in items[0].payload
    assert "SRM^S04" in items[1].payload
    assert slot_of(clinic.store, slots[0])["status"] == "free"


def test_an_expired_hold_cannot_be_booked_and_the_sweep_frees_abandoned_ones(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=2)
    portal.sign_in("daniel")
    reply = portal.post("/appointments/hold", {"slot": slots[0]}, page=find_url(), follow=False)
    first = reply.headers["Location"].split("?")[0].rsplit("/", 1)[1]
    reply = portal.post("/appointments/hold", {"slot": slots[1]}, page=find_url(), follow=False)
    second = reply.headers["Location"].split("?")[0].rsplit("/", 1)[1]
    clinic.settings.portal_hold_minutes = 0  # both holds have run out
    with clinic.store.writing() as repo:  # as if the hold had ended a minute ago
        slot = slot_of(clinic.store, slots[0])
        slot["extension"] = [{"url": service.EXT_HOLD_UNTIL, "valueDateTime": service.iso(
            datetime.now(UTC) - timedelta(minutes=1))}, {"url": service.EXT_HOLD_KIND, "valueCode": "hold"}]
        repo.update("Slot", slots[0], slot)
    reply = portal.post(f"/appointments/{first}/book", {}, page=f"/appointments/{first}")
    assert reply.status_code == 400 and "Your hold on that time ran out." in text_of(portal.last_html)
    assert slot_of(clinic.store, slots[0])["status"] == "free"
    result = service.sweep(clinic, now=datetime.now(UTC) + timedelta(minutes=11))
    assert result.expired_holds == [second]
    assert appointment_of(clinic.store, second)["status"] == "cancelled"
    assert slot_of(clinic.store, slots[1])["status"] == "free"
    listed = portal.get("/appointments")
    assert first not in listed and second not in listed  # an abandoned hold was never a visit


# --- book / cancel / waitlist on someone else's appointment, and the 2-hour rule ---

@pytest.mark.parametrize("action", ["book", "release", "cancel", "waitlist"])
def test_nobody_acts_on_another_familys_appointment(portal: Portal, clinic: Any, action: str) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    reply = portal.post(f"/appointments/robert-chen-appt-2026-12-10/{action}", {"reason": "pat"},
                        page="/appointments")
    assert reply.status_code == 404
    assert appointment_of(clinic.store, "robert-chen-appt-2026-12-10")["status"] == "booked"
    portal.get("/appointments/robert-chen-appt-2026-12-10", status=404)


def test_an_appointment_of_another_record_of_the_same_login_is_not_reachable(portal: Portal, clinic: Any) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    portal.get("/appointments/maria-garcia-appt-2026-12-08", status=404)


def test_cancel_more_than_2_hours_ahead_frees_the_slot(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, hours_from_now=3, count=1)
    portal.sign_in("daniel")
    appointment_id = hold_and_book(portal, slots[0])
    reply = portal.post(f"/appointments/{appointment_id}/cancel", {"reason": "pat-fb"},
                        page=f"/appointments/{appointment_id}")
    assert reply.status_code == 200 and "The appointment is cancelled." in text_of(portal.last_html)
    cancelled = appointment_of(clinic.store, appointment_id)
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelationReason"]["coding"][0]["code"] == "pat-fb"
    assert cancelled["cancelationReason"]["text"] == "Feeling better"
    assert slot_of(clinic.store, slots[0])["status"] == "free"


def test_cancel_within_2_hours_is_refused_and_the_page_says_to_call(portal: Portal, clinic: Any) -> None:
    slots = future_slots(clinic.store, hours_from_now=1, count=1)
    portal.sign_in("daniel")
    appointment_id = hold_and_book(portal, slots[0])
    page = portal.get(f"/appointments/{appointment_id}")
    assert 'id="cancel-form"' not in page and 'id="reschedule-link"' not in page
    assert "please call the office at (413) 555-0120" in text_of(page)
    reply = portal.post(f"/appointments/{appointment_id}/cancel", {"reason": "pat"},
                        page="/appointments")
    assert reply.status_code == 400
    assert "Please call the office at (413) 555-0120." in text_of(portal.last_html)
    assert appointment_of(clinic.store, appointment_id)["status"] == "booked"
    assert slot_of(clinic.store, slots[0])["status"] == "busy"


def test_reschedule_within_2_hours_is_refused(portal: Portal, clinic: Any) -> None:
    soon = future_slots(clinic.store, hours_from_now=1, count=1)
    later = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    appointment_id = hold_and_book(portal, soon[0])
    reply = portal.post("/appointments/hold", {"slot": later[0], "replaces": appointment_id},
                        page=find_url(replaces=appointment_id))
    assert reply.status_code == 400 and "call the office" in text_of(portal.last_html)
    assert slot_of(clinic.store, later[0])["status"] == "free"


def test_cancel_with_a_reason_not_offered_is_refused(portal: Portal, clinic: Any) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    reply = portal.post("/appointments/maria-garcia-appt-2026-12-08/cancel", {"reason": "because"},
                        page="/appointments/maria-garcia-appt-2026-12-08")
    assert reply.status_code == 400 and "Choose a reason for cancelling." in text_of(portal.last_html)
    assert appointment_of(clinic.store, "maria-garcia-appt-2026-12-08")["status"] == "booked"


def test_a_cancelled_appointment_cannot_be_cancelled_again(portal: Portal, clinic: Any) -> None:
    portal.sign_in("linda")
    portal.choose("linda-chen")
    reply = portal.post("/appointments/linda-chen-appt-2026-11-05/cancel", {"reason": "pat"},
                        page="/appointments/linda-chen-appt-2026-11-05")
    assert reply.status_code == 400 and "cannot be changed any more" in text_of(portal.last_html)


# --- the race ---

def test_two_logins_racing_for_one_slot_exactly_one_gets_it(portal: Portal, clinic: Any, app: Any) -> None:
    slots = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    other = Portal(app.test_client(), portal.world)
    other.sign_in("linda")
    other.choose("linda-chen")
    tokens = []
    for who in (portal, other):
        html = who.get(find_url())
        assert f'id="slot-{slots[0]}"' in html

        tokens.append(csrf_of(html))
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def race(who: Portal, token: str) -> None:
        barrier.wait()
        reply = who.client.post("/appointments/hold", data={"csrf_token": token, "slot": slots[0]},
                                headers={"Accept": "text/html"})
        codes.append(reply.status_code)

    pairs = zip((portal, other), tokens, strict=True)
    threads = [threading.Thread(target=race, args=(who, token)) for who, token in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [302, 409]
    holders = [a for p in ("daniel-garcia", "linda-chen") for a in appointments_of(clinic.store, p)
               if a.get("slot") == [{"reference": f"Slot/{slots[0]}"}] and a["status"] == "pending"]
    assert len(holders) == 1


def test_a_stale_version_of_the_slot_loses(portal: Portal, clinic: Any) -> None:
    """The losing side of the race by construction: both read version 1, the first writes."""
    slots = future_slots(clinic.store, days=3, count=1)
    portal.sign_in("daniel")
    stale = slot_of(clinic.store, slots[0])
    with clinic.store.writing() as repo:
        repo.update("Slot", slots[0], {**stale, "status": "busy"})
    from gateway.portal.record import Record

    record = Record(clinic, service.access.SYSTEM, "daniel-garcia")
    with pytest.raises(service.AppointmentError) as caught:
        service._claim(record, stale, "busy-tentative")
    assert caught.value.code == "slot-taken"
    assert slot_of(clinic.store, slots[0])["status"] == "busy"


# --- the waitlist ---

def signed_in(app: Any, world: Any, username: str, patient: str, otp: bool = False) -> Portal:
    who = Portal(app.test_client(), world)
    who.sign_in(username, otp=otp)
    if username in ("maria", "linda"):
        who.choose(patient)
    return who


def waitlist_entries(store: Any, patient: str) -> list[dict[str, Any]]:
    return [a for a in appointments_of(store, patient) if a["status"] == "waitlist"]


def test_waitlist_offer_end_to_end(portal: Portal, clinic: Any, app: Any) -> None:
    early = future_slots(clinic.store, days=3, count=2)
    late = future_slots(clinic.store, days=8, count=1)
    linda = signed_in(app, portal.world, "linda", "linda-chen")
    taken = hold_and_book(linda, early[0])
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    mine = hold_and_book(portal, late[0], find_url(days=8))
    reply = portal.post(f"/appointments/{mine}/waitlist", {}, page=f"/appointments/{mine}")
    assert reply.status_code == 200 and "You are on the waitlist." in text_of(portal.last_html)
    entry, = waitlist_entries(clinic.store, "maria-garcia")
    assert entry["supportingInformation"] == [{"reference": f"Appointment/{mine}"}]
    assert service.instant(entry["requestedPeriod"][0]["end"]) == service.instant(
        appointment_of(clinic.store, mine)["start"])
    assert {p["actor"]["reference"] for p in entry["participant"]} >= {"Patient/maria-garcia",
                                                                       "Practitioner/emily-carter"}
    # joining twice is refused
    reply = portal.post(f"/appointments/{mine}/waitlist", {}, page=f"/appointments/{mine}")
    assert reply.status_code == 400 and "already on the waitlist" in text_of(portal.last_html)
    assert 'id="offer-' not in portal.get("/appointments")
    # Linda cancels the earlier time: it is offered to Maria at once, held for her
    linda.post(f"/appointments/{taken}/cancel", {"reason": "pat"}, page=f"/appointments/{taken}")
    slot = slot_of(clinic.store, early[0])
    assert slot["status"] == "busy-tentative"
    assert [o.slot_id for o in service.open_offers(service.clinic_record(clinic))] == []  # not the clinic's
    listing = portal.get("/appointments")
    assert f'id="offer-{entry["id"]}"' in listing and "An earlier time opened" in text_of(listing)
    assert f'id="offer-{entry["id"]}"' in portal.get("/")
    # ... and Maria is told (by email: her preference), once for this slot, with no details in the row
    from sqlalchemy import select

    from gateway.portal.models import portal_notification as n
    with clinic.engine.connect() as conn:
        told = conn.execute(select(n.c.event, n.c.patient_id, n.c.address, n.c.dedup_key).where(
            n.c.event == "appointment-offer")).all()
    assert [(r.patient_id, r.address) for r in told] == [("maria-garcia", "maria.garcia@example.org")]
    assert told[0].dedup_key.endswith(f"Slot/{early[0]}")
    # nobody else can hold the offered time
    daniel = signed_in(app, portal.world, "daniel", "daniel-garcia")
    reply = daniel.post("/appointments/hold", {"slot": early[0]}, page=find_url())
    assert reply.status_code == 409
    # Maria takes it: booked at the earlier time, the later appointment cancelled and its slot free
    reply = portal.post(f"/appointments/offers/{entry['id']}/accept", {}, page="/appointments")
    assert reply.status_code == 200 and "The earlier time is booked" in text_of(portal.last_html)
    booked = [a for a in appointments_of(clinic.store, "maria-garcia") if a["status"] == "booked"
              and a.get("slot") == [{"reference": f"Slot/{early[0]}"}]]
    assert len(booked) == 1
    assert appointment_of(clinic.store, mine)["status"] == "cancelled"
    assert appointment_of(clinic.store, entry["id"])["status"] == "cancelled"
    assert slot_of(clinic.store, early[0])["status"] == "busy"
    assert slot_of(clinic.store, late[0])["status"] == "free"
    assert not waitlist_entries(clinic.store, "maria-garcia")


def test_a_declined_or_expired_offer_goes_to_the_next_on_the_list(portal: Portal, clinic: Any, app: Any) -> None:
    early = future_slots(clinic.store, days=3, count=1)
    late = future_slots(clinic.store, days=8, count=2)
    daniel = signed_in(app, portal.world, "daniel", "daniel-garcia")
    taken = hold_and_book(daniel, early[0])
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    maria_late = hold_and_book(portal, late[0], find_url(days=8))
    portal.post(f"/appointments/{maria_late}/waitlist", {}, page=f"/appointments/{maria_late}")
    linda = signed_in(app, portal.world, "linda", "robert-chen")
    robert_late = hold_and_book(linda, late[1], find_url(days=8))
    linda.post(f"/appointments/{robert_late}/waitlist", {}, page=f"/appointments/{robert_late}")
    daniel.post(f"/appointments/{taken}/cancel", {"reason": "pat"}, page=f"/appointments/{taken}")
    maria_entry, = waitlist_entries(clinic.store, "maria-garcia")
    robert_entry, = waitlist_entries(clinic.store, "robert-chen")
    assert f"offer-{maria_entry['id']}" in portal.get("/appointments")  # first to join, first offered
    assert "offer-" not in linda.get("/appointments")
    portal.post(f"/appointments/offers/{maria_entry['id']}/decline", {}, page="/appointments")
    assert "You stay on the waitlist." in text_of(portal.last_html)
    assert f"offer-{robert_entry['id']}" in linda.get("/appointments")
    assert "offer-" not in portal.get("/appointments")
    # Robert's offer runs out: the sweep takes it back; Maria declined this time, so nobody is offered it
    result = service.sweep(clinic, now=datetime.now(UTC) + timedelta(hours=2, minutes=5))
    assert result.expired_offers == [robert_entry["id"]] and result.offers == []
    assert slot_of(clinic.store, early[0])["status"] == "free"
    assert "offer-" not in linda.get("/appointments")
    # an answer to an offer that is gone is refused
    reply = linda.post(f"/appointments/offers/{robert_entry['id']}/accept", {}, page="/appointments")
    assert reply.status_code == 409 and "That offer is no longer available." in text_of(linda.last_html)


def test_the_sweep_offers_a_slot_the_ehr_frees_but_not_one_free_before_joining(portal: Portal, clinic: Any) -> None:
    before = future_slots(clinic.store, days=3, count=1)
    busy = future_slots(clinic.store, days=4, count=1)
    late = future_slots(clinic.store, days=8, count=1)
    with clinic.store.writing() as repo:
        repo.update("Slot", busy[0], {**slot_of(clinic.store, busy[0]), "status": "busy"})
    portal.sign_in("daniel")
    mine = hold_and_book(portal, late[0], find_url(days=8))
    portal.post(f"/appointments/{mine}/waitlist", {}, page=f"/appointments/{mine}")
    assert service.sweep(clinic).offers == []  # the free slot was there already: book it directly
    with clinic.store.writing() as repo:  # the EHR frees a slot (e.g. a cancellation at the desk)
        repo.origin = "hl7"
        repo.update("Slot", busy[0], {**slot_of(clinic.store, busy[0]), "status": "free"})
    offers = service.sweep(clinic).offers
    assert [(o.slot_id, o.patient_id) for o in offers] == [(busy[0], "daniel-garcia")]
    assert "An earlier time opened" in text_of(portal.get("/"))
    assert slot_of(clinic.store, before[0])["status"] == "free"


def test_waitlist_within_2_hours_is_refused(portal: Portal, clinic: Any) -> None:
    soon = future_slots(clinic.store, hours_from_now=1, count=1)
    portal.sign_in("daniel")
    mine = hold_and_book(portal, soon[0])
    assert 'id="waitlist-form"' not in portal.get(f"/appointments/{mine}")
    reply = portal.post(f"/appointments/{mine}/waitlist", {}, page=f"/appointments/{mine}")
    assert reply.status_code == 400 and "call the office" in text_of(portal.last_html)
    assert not waitlist_entries(clinic.store, "daniel-garcia")


def test_leaving_the_waitlist(portal: Portal, clinic: Any) -> None:
    late = future_slots(clinic.store, days=8, count=1)
    portal.sign_in("daniel")
    mine = hold_and_book(portal, late[0], find_url(days=8))
    portal.post(f"/appointments/{mine}/waitlist", {}, page=f"/appointments/{mine}")
    entry, = waitlist_entries(clinic.store, "daniel-garcia")
    reply = portal.post(f"/appointments/waitlist/{entry['id']}/leave", {}, page=f"/appointments/{mine}")
    assert reply.status_code == 200 and "You have left the waitlist." in text_of(portal.last_html)
    assert not waitlist_entries(clinic.store, "daniel-garcia")
    assert 'id="waitlist-form"' in portal.last_html


# --- access ---

def test_a_teens_confidential_appointment_is_hidden_from_the_parent(portal: Portal, clinic: Any, app: Any) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=9)
    with clinic.store.writing() as repo:
        repo.update("Appointment", "daniel-private", {
            "resourceType": "Appointment", "id": "daniel-private", "status": "booked",
            "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                   "code": "R"}]},
            "serviceType": [{"text": "Confidential counselling visit"}],
            "start": start.isoformat(), "end": (start + timedelta(minutes=30)).isoformat(),
            "participant": [{"actor": {"reference": "Patient/daniel-garcia"}, "status": "accepted"},
                            {"actor": {"reference": "Practitioner/emily-carter", "display": "Dr. Emily Carter, MD"},
                             "status": "accepted"}]})
    portal.sign_in("maria")
    portal.choose("daniel-garcia")
    assert "Confidential counselling visit" not in portal.get("/appointments")
    assert "Confidential counselling visit" not in portal.get("/")
    portal.get("/appointments/daniel-private", status=404)
    reply = portal.post("/appointments/daniel-private/cancel", {"reason": "pat"}, page="/appointments")
    assert reply.status_code == 404
    daniel = signed_in(app, portal.world, "daniel", "daniel-garcia")
    assert "Confidential counselling visit" in daniel.get("/appointments")


def test_an_ended_relationship_closes_the_appointments_at_once(portal: Portal, clinic: Any, app: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    assert "Dr. Emily Carter" in portal.get("/appointments/robert-chen-appt-2026-12-10")
    portal.world.smart.revoke_proxy("linda", "robert-chen")
    portal.get("/appointments/robert-chen-appt-2026-12-10", status=404)
    former = signed_in(app, portal.world, "former", "linda-chen-other")
    former.get("/appointments/robert-chen-appt-2026-12-10", status=404)
    assert "robert-chen-appt" not in former.get("/appointments")


def test_the_worker_runs_the_sweep_on_a_thread(clinic: Any) -> None:
    import time

    from gateway.cli import start_appointment_sweep
    from gateway.portal.record import Record

    clinic.settings.portal_sweep_seconds = 0
    assert start_appointment_sweep(clinic.settings) is None
    assert service.sweep(clinic) == service.SweepResult()  # nothing to do
    slots = future_slots(clinic.store, days=3, count=1)
    record = Record(clinic, service.access.SYSTEM, "daniel-garcia")
    held = service.hold(record, clinic, slots[0], now=datetime.now(UTC) - timedelta(minutes=30))
    clinic.settings.portal_sweep_seconds = 1
    sweeper = start_appointment_sweep(clinic.settings)
    try:
        deadline = time.monotonic() + 20
        while appointment_of(clinic.store, held["id"])["status"] != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        sweeper.stop()
    assert appointment_of(clinic.store, held["id"])["status"] == "cancelled"
    assert slot_of(clinic.store, slots[0])["status"] == "free"


def test_nobody_answers_an_offer_made_to_another_family(portal: Portal, clinic: Any, app: Any) -> None:
    early = future_slots(clinic.store, days=3, count=1)
    late = future_slots(clinic.store, days=8, count=1)
    daniel = signed_in(app, portal.world, "daniel", "daniel-garcia")
    taken = hold_and_book(daniel, early[0])
    linda = signed_in(app, portal.world, "linda", "robert-chen")
    robert_late = hold_and_book(linda, late[0], find_url(days=8))
    linda.post(f"/appointments/{robert_late}/waitlist", {}, page=f"/appointments/{robert_late}")
    daniel.post(f"/appointments/{taken}/cancel", {"reason": "pat"}, page=f"/appointments/{taken}")
    entry, = waitlist_entries(clinic.store, "robert-chen")
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    for answer in ("accept", "decline"):
        reply = portal.post(f"/appointments/offers/{entry['id']}/{answer}", {}, page="/appointments")
        assert reply.status_code == 404
    reply = portal.post(f"/appointments/waitlist/{entry['id']}/leave", {}, page="/appointments")
    assert reply.status_code == 404
    assert slot_of(clinic.store, early[0])["status"] == "busy-tentative"
    assert appointment_of(clinic.store, entry["id"])["status"] == "waitlist"
    # and Linda's own answer must be one of the two
    reply = linda.post(f"/appointments/offers/{entry['id']}/maybe", {}, page="/appointments")
    assert reply.status_code == 404
    assert f"offer-{entry['id']}" in linda.get("/appointments")
