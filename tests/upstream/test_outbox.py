"""The outbox: queued with the local change, built and validated with hl7apy, delivered over MLLP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import select, update

from gateway import create_app, db
from gateway.config import Settings
from gateway.fhir.outcome import FhirError
from gateway.upstream.outbox import Worker, check_ack, list_items, retry
from tests.conftest import empty_tables
from tests.upstream import records
from tests.upstream.conftest import Receiver

KINDS = ("appointment_request", "appointment_cancel", "refill_request", "message")


@pytest.fixture
def services(settings: Settings, receiver: Receiver) -> Iterator[Any]:
    for kind in KINDS:
        setattr(settings, f"outbox_{kind}", "hl7")
    settings.outbox_mllp_port = receiver.port
    settings.outbox_ack_timeout = 1.0
    settings.outbox_backoff_base = 0.2
    settings.audit_enabled = False
    app = create_app(settings)
    services = app.extensions["gateway"]
    empty_tables(services.engine)
    with services.store.writing() as repo:
        repo.update("Patient", "p1", records.patient())
        repo.update("Practitioner", "dr1", records.practitioner())
        repo.update("MedicationRequest", "m1", records.medication_request())
    yield services
    services.close()


def items(services: Any) -> list[Any]:
    with services.engine.connect() as conn:
        return list(conn.execute(select(db.outbox).order_by(db.outbox.c.id)).all())


def segment(er7: str, name: str) -> Any:
    return hl7.parse(er7.replace("\n", "\r")).segment(name)


def validate(er7: str) -> None:
    parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def test_each_kind_is_queued_as_its_message_type_and_validates(services: Any) -> None:
    store = services.store
    with store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
        repo.create(records.refill_task(), resource_id="t1")
        repo.create(records.message(), resource_id="c1")
    with store.writing() as repo:
        repo.update("Appointment", "a1", {**records.appointment(), "status": "cancelled",
                                          "cancelationReason": {"text": "Feeling better"}})
    queued = items(services)
    assert [(i.kind, i.status, i.resource_type, i.resource_id) for i in queued] == [
        ("appointment-request", "pending", "Appointment", "a1"), ("refill-request", "pending", "Task", "t1"),
        ("message", "pending", "Communication", "c1"), ("appointment-cancel", "pending", "Appointment", "a1")]
    types = [str(segment(i.payload, "MSH")(9)) for i in queued]
    assert types == ["SRM^S01^SRM_S01", "OMP^O09^OMP_O09", "MDM^T02^MDM_T02", "SRM^S04^SRM_S01"]
    for item in queued:
        validate(item.payload)  # hl7apy, STRICT, independent of the build's own check
        assert str(segment(item.payload, "MSH")(10)) == item.idempotency_key
        pid = segment(item.payload, "PID")
        assert str(pid(3)) == "12345^^^HOSP&1.2.3.4&ISO^MR" and str(pid(5)) == "Garcia^Maria Elena"
    request = queued[0].payload
    arq = segment(request, "ARQ")
    assert str(arq(1)) == "a1^FHIR-GATEWAY" and str(arq(11)) == "20270201100000+0000^20270201103000+0000"
    assert str(arq(7)) == "30989003^Knee pain^SCT"
    assert str(segment(request, "NTE")(3)) == r"Knee pain \F\ worse on stairs"  # escaped, not a new field
    assert str(segment(request, "AIP")(3)) == "1234567893^Smith^John"
    refill = queued[1].payload
    assert str(segment(refill, "ORC")(1)) == "RF" and str(segment(refill, "ORC")(2)) == "ORD777^EHR"
    assert str(segment(refill, "RXO")(1)) == "197361^Amlodipine 5 MG Oral Tablet^RXNORM"
    assert str(segment(refill, "RXR")(1)) == "PO^Oral"
    note = queued[2].payload
    obx = [s for s in hl7.parse(note).segments("OBX")]
    assert [str(s(5)) for s in obx] == ["Subject: Blood pressure",
                                        r"My readings are 150/95 since Monday.\.br\Should I change the dose?"]
    assert str(segment(note, "TXA")(12)) == f"{queued[2].idempotency_key}^FHIR-GATEWAY"
    assert str(segment(note, "TXA")(5)) == "dr1^Smith^John"
    assert str(segment(queued[3].payload, "NTE")(3)) == "Feeling better"


def test_a_long_assigner_name_gives_the_oid_in_pid_3_not_a_refusal(services: Any) -> None:
    # The demo records name their MRN's assigner "Riverside General Hospital" (26 characters), more
    # than HD.1 holds: the message carries the OID as the universal id instead of being refused.
    patient = records.patient()
    patient["identifier"] = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                   "code": "MR"}]},
                              "system": "urn:oid:2.16.840.1.113883.3.4242.1.1", "value": "RG1001001",
                              "assigner": {"display": "Riverside General Hospital"}}]
    with services.store.writing() as repo:
        repo.update("Patient", "p1", patient)
        repo.create(records.appointment(), resource_id="a1")
    item, = items(services)
    assert item.status == "pending", item.last_error
    validate(item.payload)
    assert str(segment(item.payload, "PID")(3)) == "RG1001001^^^&2.16.840.1.113883.3.4242.1.1&ISO^MR"


def test_queued_in_the_same_transaction_as_the_change(services: Any) -> None:
    with pytest.raises(FhirError), services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
        raise FhirError(409, "the rest of the transaction failed")
    assert items(services) == []
    with services.store.reading() as repo:
        assert repo.find("Appointment", "a1") is None


def test_nothing_goes_back_for_what_came_from_the_ehr_or_is_switched_off(services: Any, settings: Settings) -> None:
    with services.store.writing(origin="hl7") as repo:
        repo.create(records.appointment("from-siu"), resource_id="from-siu")
    with services.store.writing(origin="upstream") as repo:
        repo.create(records.message("from-ehr"), resource_id="from-ehr")
    with services.store.writing() as repo:
        repo.create(records.appointment("booked", status="booked"), resource_id="booked")  # not a request
        # cancelling an appointment the EHR never heard of sends nothing
        repo.update("Appointment", "booked", {**records.appointment("booked"), "status": "cancelled"})
    settings.outbox_message = "off"
    with services.store.writing() as repo:
        repo.create(records.message("c2"), resource_id="c2")
    assert items(services) == []


def test_a_record_that_cannot_be_built_is_failed_visibly_and_retried_after_the_fix(services: Any,
                                                                                   receiver: Receiver) -> None:
    with services.store.writing() as repo:
        repo.update("MedicationRequest", "m2", records.medication_request("m2", route=False))
        repo.create(records.refill_task("t2", "MedicationRequest/m2"), resource_id="t2")
    (item,) = items(services)
    assert item.status == "failed" and "RXR-1" in item.last_error and item.payload == ""
    assert "still cannot be built" in retry(services.store, services.settings, item.id)
    with services.store.writing() as repo:
        repo.update("MedicationRequest", "m2", records.medication_request("m2"))
    assert retry(services.store, services.settings, item.id) == "queued again"
    worker = Worker(services.store, services.settings)
    assert worker.run_once() == 1
    (item,) = items(services)
    assert item.status == "delivered" and receiver.received == [item.idempotency_key]


def test_mllp_ack_delivers_and_the_item_is_not_sent_again(services: Any, receiver: Receiver) -> None:
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
        repo.create(records.message(), resource_id="c1")
    worker = Worker(services.store, services.settings)
    assert worker.run_once() == 2
    assert worker.run_once() == 0
    delivered = items(services)
    assert [i.status for i in delivered] == ["delivered", "delivered"]
    assert receiver.received == [i.idempotency_key for i in delivered]
    assert all(i.response.startswith("MSH") and i.attempts == 1 for i in delivered)
    assert receiver.messages[0] == delivered[0].payload  # the stored bytes, as queued


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_a_nak_fails_the_item_and_retry_resends_the_same_control_id(services: Any, receiver: Receiver,
                                                                    code: str) -> None:
    receiver.mode = code
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
    worker = Worker(services.store, services.settings)
    worker.run_once()
    (item,) = items(services)
    assert item.status == "failed" and item.last_error.startswith(code) and "rejected by test" in item.last_error
    assert worker.run_once() == 0  # failed items wait for a person
    with services.engine.connect() as conn:
        assert [r.id for r in list_items(conn, "failed")] == [item.id]
    receiver.mode = "AA"
    retry(services.store, services.settings, item.id)
    worker.run_once()
    (item,) = items(services)
    assert item.status == "delivered"
    assert receiver.received == [item.idempotency_key, item.idempotency_key]
    assert receiver.messages[0] == receiver.messages[1]


@pytest.mark.parametrize("mode", ["stall", "wrong"])
def test_a_stall_or_a_foreign_ack_retries_with_backoff(services: Any, receiver: Receiver, mode: str) -> None:
    receiver.mode = mode
    # A backoff far longer than a loaded machine takes between two steps of this test (0.2 s was not).
    services.settings.outbox_backoff_base = 30.0
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
    worker = Worker(services.store, services.settings)
    started = time.monotonic()
    before_ms = int(time.time() * 1000)
    worker.run_once()
    (item,) = items(services)
    assert item.status == "pending" and item.attempts == 1
    assert ("TimeoutError" in item.last_error) if mode == "stall" else ("expected" in item.last_error)
    if mode == "stall":
        assert time.monotonic() - started >= 0.9  # waited the ACK timeout (1 s)
    assert item.next_attempt_ms >= before_ms + 30_000  # due again a backoff after the failed attempt
    assert worker.run_once() == 0  # not due yet: backoff
    receiver.mode = "AA"
    with services.store.writing() as repo:  # the backoff has passed
        repo.conn.execute(update(db.outbox).values(next_attempt_ms=int(time.time() * 1000)))
    assert worker.run_once() == 1
    (item,) = items(services)
    assert item.status == "delivered" and item.attempts == 2
    assert receiver.received == [item.idempotency_key] * 2
    assert worker.backoff(1) == 30.0 and worker.backoff(2) == 60.0
    assert worker.backoff(30) == services.settings.outbox_backoff_max


def test_a_refused_connection_retries_until_the_limit(services: Any, receiver: Receiver) -> None:
    receiver.close()
    services.settings.outbox_max_attempts = 2
    services.settings.outbox_backoff_base = 0.0
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
    worker = Worker(services.store, services.settings)
    worker.run_once()
    assert items(services)[0].status == "pending"
    worker.run_once()
    (item,) = items(services)
    assert item.status == "failed" and item.last_error.startswith("gave up after 2 attempts")


def test_check_ack() -> None:
    ack = b"MSH|^~\\&|EHR|EHR|GW|GW|20260101||ACK|9|P|2.5\rMSA|AA|GW1\r"
    assert check_ack(ack, "GW1").outcome == "delivered"
    assert check_ack(ack, "GW2").outcome == "retry"
    assert check_ack(b"garbage", "GW1").outcome == "retry"
    nak = (b"MSH|^~\\&|EHR|EHR|GW|GW|20260101||ACK|9|P|2.5\rMSA|AE|GW1\r"
           b"ERR||ARQ^1^1|101^required^HL70357|E||||Unknown slot\r")
    result = check_ack(nak, "GW1")
    assert result.outcome == "failed" and "Unknown slot" in result.detail


def test_two_workers_never_deliver_one_item_twice(services: Any, receiver: Receiver, database_url: str) -> None:
    count = 120
    with services.store.writing() as repo:
        for n in range(count):
            repo.create(records.message(f"c{n}"), resource_id=f"c{n}")
    # every item due at once, so both workers race for the same rows
    with services.store.writing() as repo:
        repo.conn.execute(update(db.outbox).values(next_attempt_ms=0))
    workers = [Worker(services.store, services.settings, name=f"w{n}") for n in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    services.settings.outbox_poll_interval = 0.01
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(w.delivered for w in workers) < count:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    delivered = items(services)
    assert all(i.status == "delivered" and i.attempts == 1 for i in delivered)
    assert sorted(receiver.received) == sorted(i.idempotency_key for i in delivered)
    assert len(set(receiver.received)) == len(receiver.received) == count
    assert all(w.delivered > 0 for w in workers), [w.delivered for w in workers]


def test_a_cancellation_waits_for_its_request_and_fails_when_the_request_failed(services: Any,
                                                                               receiver: Receiver) -> None:
    receiver.close()  # the request cannot go yet
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a1")
    with services.store.writing() as repo:
        repo.update("Appointment", "a1", {**records.appointment(), "status": "cancelled"})
    with services.store.writing() as repo:
        repo.conn.execute(update(db.outbox).values(next_attempt_ms=0))
    worker = Worker(services.store, services.settings)
    worker.run_once()
    request, cancel = items(services)
    assert request.status == cancel.status == "pending"
    assert "waits for the appointment request" in cancel.last_error
    with services.store.writing() as repo:
        repo.conn.execute(update(db.outbox).where(db.outbox.c.id == request.id).values(status="failed"))
        repo.conn.execute(update(db.outbox).values(next_attempt_ms=0))
    worker.run_once()
    cancel = items(services)[1]
    assert cancel.status == "failed" and "never delivered" in cancel.last_error


def test_a_message_a_proxy_writes_for_the_patient_goes_as_the_patients(services: Any) -> None:
    """A parent or caregiver writing in the portal is the sender (a RelatedPerson of the patient);
    the EHR gets the MDM^T02 under the patient, with a line naming who wrote it."""
    with services.store.writing() as repo:
        repo.update("RelatedPerson", "mother", {
            "resourceType": "RelatedPerson", "id": "mother", "patient": {"reference": "Patient/p1"},
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                          "code": "MTH", "display": "mother"}]}],
            "name": [{"family": "Garcia", "given": ["Ana"]}]})
        repo.update("RelatedPerson", "stranger", {"resourceType": "RelatedPerson", "id": "stranger",
                                                  "patient": {"reference": "Patient/someone-else"}})
        repo.create({**records.message("c1"), "sender": {"reference": "RelatedPerson/mother"}}, resource_id="c1")
        # a RelatedPerson of another patient, or no patient as subject: not a message from the patient's side
        repo.create({**records.message("c2"), "sender": {"reference": "RelatedPerson/stranger"}}, resource_id="c2")
        no_subject = {**records.message("c3"), "sender": {"reference": "RelatedPerson/mother"}}
        del no_subject["subject"]
        repo.create(no_subject, resource_id="c3")
    queued = items(services)
    assert [(i.kind, i.resource_id, i.patient_id) for i in queued] == [("message", "c1", "p1")]
    validate(queued[0].payload)
    assert str(segment(queued[0].payload, "PID")(5)) == "Garcia^Maria Elena"
    lines = [str(s(5)) for s in hl7.parse(queued[0].payload).segments("OBX")]
    assert lines[:2] == ["Subject: Blood pressure", "From: Ana Garcia (mother), for the patient"]


def test_a_delivery_after_an_outage_makes_the_backlog_due_at_once_in_queue_order(services: Any,
                                                                                 receiver: Receiver) -> None:
    receiver.mode = "stall"
    services.settings.outbox_backoff_base = 300.0  # without the wake-up, the backlog would wait minutes
    with services.store.writing() as repo:
        for n in range(3):
            repo.create(records.appointment(), resource_id=f"a{n}")
    worker = Worker(services.store, services.settings)
    assert worker.run_once() == 3
    assert all(i.status == "pending" and i.claimed_ms is None and i.next_attempt_ms > time.time() * 1000 + 200_000
               for i in items(services))
    # An item held by another worker right now keeps its lease.
    with services.engine.begin() as conn:
        held_until = int(time.time() * 1000) + 60_000
        conn.execute(update(db.outbox).where(db.outbox.c.resource_id == "a2").values(
            claimed_ms=int(time.time() * 1000), next_attempt_ms=held_until))
    # The EHR is back: a new item goes through, and the waiting ones are due behind it, oldest first.
    receiver.mode = "AA"
    with services.store.writing() as repo:
        repo.create(records.appointment(), resource_id="a3")
    with services.engine.begin() as conn:
        conn.execute(update(db.outbox).where(db.outbox.c.resource_id.in_(["a0", "a1"])).values(
            next_attempt_ms=held_until + 1000))  # so the new one is the only item due
    assert worker.run_once() == 1
    by_id = {i.resource_id: i for i in items(services)}
    assert by_id["a3"].status == "delivered"
    assert by_id["a0"].next_attempt_ms <= time.time() * 1000 and by_id["a1"].next_attempt_ms <= time.time() * 1000
    assert by_id["a2"].next_attempt_ms == held_until
    receiver.received.clear()
    assert worker.run_once() == 2
    assert receiver.received == [by_id["a0"].idempotency_key, by_id["a1"].idempotency_key]
