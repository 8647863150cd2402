"""Sync and FHIR delivery end to end: a second gateway instance on another port is the EHR."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from gateway import create_app, db
from gateway.config import Settings
from gateway.upstream.client import UpstreamClient
from gateway.upstream.outbox import OUTBOX_SYSTEM, Worker, WorkerThreads
from gateway.upstream.sync import Synchronizer, hl7_id, linked_patients, sync_patient_async
from tests.conftest import empty_tables
from tests.upstream import records
from tests.upstream.conftest import UPSTREAM_TOKEN

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ADT = ("MSH|^~\\&|EHR|HOSP|GW|GW|20260101120000||ADT^A01^ADT_A01|MSG1|P|2.5.1\r"
       "EVN|A01|20260101120000\rPID|1||12345^^^HOSP^MR||Garcia^Maria||19800402|F\rPV1|1|O\r")
SIU = ("MSH|^~\\&|EHR|HOSP|GW|GW|20260102120000||SIU^S12^SIU_S12|MSG2|P|2.5.1\r"
       "SCH|PL1^EHR|FILL99^EHR|||||||||^^^20270301090000^20270301093000|||||||||||||Booked\r"
       "PID|1||12345^^^HOSP^MR||Garcia^Maria\r")
OBSERVATIONS = 130  # more than one page of 100


def ehr_records() -> list[dict[str, Any]]:
    patient = {**records.patient("ehr-p1"), "telecom": [{"system": "phone", "value": "555-0100"}]}
    patient["identifier"] = [{**patient["identifier"][0], "system": "urn:oid:1.2.3.4"}]
    out: list[dict[str, Any]] = [
        patient,
        {**records.practitioner("ehr-dr")},
        {"resourceType": "Organization", "id": "ehr-org", "name": "General Hospital"},
        {"resourceType": "Location", "id": "ehr-loc", "name": "Clinic 3", "managingOrganization":
            {"reference": "Organization/ehr-org"}},
        {"resourceType": "Encounter", "id": "ehr-enc", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "subject": {"reference": "Patient/ehr-p1"}, "location": [{"location": {"reference": "Location/ehr-loc"}}]},
        {"resourceType": "Appointment", "id": "ehr-appt", "status": "booked",
         "identifier": [{"value": "FILL99", "assigner": {"display": "EHR"},
                         "type": {"coding": [{"system": V2_0203, "code": "FILL"}]}}],
         "start": "2027-03-01T09:00:00Z", "end": "2027-03-01T09:30:00Z",
         "participant": [{"actor": {"reference": "Patient/ehr-p1"}, "status": "accepted"},
                         {"actor": {"reference": "Practitioner/ehr-dr"}, "status": "accepted"}]},
        {**records.medication_request("ehr-med"), "subject": {"reference": "Patient/ehr-p1"},
         "requester": {"reference": "Practitioner/ehr-dr"}},
        {"resourceType": "DiagnosticReport", "id": "ehr-dr1", "status": "final", "code": {"text": "CBC"},
         "subject": {"reference": "Patient/ehr-p1"}, "encounter": {"reference": "Encounter/ehr-enc"}},
        {**records.message("ehr-msg"), "sender": {"reference": "Practitioner/ehr-dr"},
         "recipient": [{"reference": "Patient/ehr-p1"}], "subject": {"reference": "Patient/ehr-p1"}},
    ]
    for n in range(OBSERVATIONS):
        out.append({"resourceType": "Observation", "id": f"ehr-obs{n}", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": "Patient/ehr-p1"}, "encounter": {"reference": "Encounter/ehr-enc"},
                    "performer": [{"reference": "Practitioner/ehr-dr"}],
                    "valueQuantity": {"value": 60 + n, "unit": "/min"}})
    return out


@pytest.fixture
def ehr(upstream: dict[str, Any]) -> dict[str, Any]:
    with upstream["store"].writing() as repo:
        for resource in ehr_records():
            repo.update(resource["resourceType"], resource["id"], resource)
    return upstream


@pytest.fixture
def local(settings: Settings, ehr: dict[str, Any]) -> Iterator[Any]:
    settings.upstream_fhir_url = ehr["base"]
    settings.upstream_bearer_token = UPSTREAM_TOKEN
    app = create_app(settings)
    services = app.extensions["gateway"]
    empty_tables(services.engine)
    yield services
    services.audit.flush()
    services.close()


def client_for(services: Any) -> UpstreamClient:
    return UpstreamClient.from_settings(services.settings)


def read(services: Any, rtype: str, rid: str) -> dict[str, Any] | None:
    with services.store.reading() as repo:
        stored = repo.find(rtype, rid)
    return stored.resource() if stored else None


def count(services: Any, rtype: str) -> int:
    with services.engine.connect() as conn:
        return len(conn.execute(select(db.resource.c.id).where(db.resource.c.resource_type == rtype,
                                                               db.resource.c.deleted.is_(False))).all())


def test_sync_merges_with_the_hl7_copy_pages_and_brings_the_supporting_resources(local: Any,
                                                                                 ehr: dict[str, Any]) -> None:
    assert local.hl7.receive_one(ADT, "cli", None).status == "processed"
    assert read(local, "Patient", "HOSP-12345") is not None
    lines: list[str] = []
    summary = Synchronizer(local.store, client_for(local), local.audit, progress=lines.append).sync_patient("ehr-p1")
    assert summary.complete, summary.error
    assert summary.patient == "HOSP-12345"  # the HL7-fed record, not a second Patient
    assert count(local, "Patient") == 1
    assert summary.fetched["Observation"] == OBSERVATIONS and count(local, "Observation") == OBSERVATIONS
    patient = read(local, "Patient", "HOSP-12345")
    assert patient["telecom"] == [{"system": "phone", "value": "555-0100"}]
    assert {"system": "urn:fhir-gateway:upstream:Patient", "value": "ehr-p1"} in patient["identifier"]
    assert patient["meta"]["source"] == ehr["base"] + "/Patient/ehr-p1"
    observation = read(local, "Observation", "ehr-obs7")
    assert observation["subject"] == {"reference": "Patient/HOSP-12345"}
    assert observation["encounter"] == {"reference": "Encounter/ehr-enc"}
    assert observation["performer"] == [{"reference": "Practitioner/ehr-dr"}]
    location = read(local, "Location", "ehr-loc")
    assert location["managingOrganization"] == {"reference": "Organization/ehr-org"}
    message = read(local, "Communication", "ehr-msg")
    assert message["recipient"] == [{"reference": "Patient/HOSP-12345"}]
    # the appointment got the id the HL7 SIU for the same filler number gives it
    assert read(local, "Appointment", "EHR-FILL99")["status"] == "booked"
    assert read(local, "MedicationRequest", "EHR-ORD777") is not None
    with local.store.reading() as repo:
        assert [s.id for s in repo.match("Observation", "patient=HOSP-12345&_count=200")][:1]
    assert any("Observation: 130" in line for line in lines)
    assert "merged" in summary.line() and summary.merged >= 1
    assert ehr["guard"].seen > 0  # every request carried the token
    local.audit.flush()
    with local.store.reading() as repo:
        events = [s.resource() for s in repo.match("AuditEvent", "patient=HOSP-12345")]
    agents = {e["agent"][0]["who"]["display"] for e in events}
    assert agents == {"HL7v2 EHR|HOSP", "upstream sync"}
    assert linked_patients(local.store) == ["ehr-p1"]


def test_incremental_sync_reads_only_what_changed_and_hl7_after_sync_converges(local: Any,
                                                                               ehr: dict[str, Any]) -> None:
    synchronizer = Synchronizer(local.store, client_for(local), local.audit)
    first = synchronizer.sync_patient("ehr-p1")
    assert first.complete and first.created > OBSERVATIONS
    versions = read(local, "Observation", "ehr-obs3")["meta"]["versionId"]
    with ehr["store"].writing() as repo:
        changed = ehr_records()[-1]
        repo.update("Observation", changed["id"], {**changed, "valueQuantity": {"value": 99, "unit": "/min"}})
    second = synchronizer.sync_patient("ehr-p1")
    assert second.complete
    assert second.fetched["Observation"] < 10  # from the high-water mark on, not all 130 again
    assert read(local, "Observation", changed["id"])["valueQuantity"]["value"] == 99
    assert read(local, "Observation", "ehr-obs3")["meta"]["versionId"] == versions
    full = synchronizer.sync_patient("ehr-p1", incremental=False)
    assert full.fetched["Observation"] == OBSERVATIONS and full.created == 0 and full.updated == 0
    # the EHR's SIU for the synced appointment lands on it
    assert local.hl7.receive_one(SIU, "cli", None).status == "processed"
    assert count(local, "Appointment") == 1
    assert read(local, "Appointment", "EHR-FILL99")["identifier"][0]["value"] == "PL1"  # the SIU's identifiers
    # (v2 semantics: the SIU's identifier list replaced the stored one); the next sync finds it by its id
    again = synchronizer.sync_patient("ehr-p1")
    assert again.complete and count(local, "Appointment") == 1
    appointment = read(local, "Appointment", "EHR-FILL99")
    assert {"system": "urn:fhir-gateway:upstream:Appointment", "value": "ehr-appt"} in appointment["identifier"]


def test_hl7_ids_follow_the_segment_maps() -> None:
    assert hl7_id(records.patient()) == "HOSP-12345"
    no_authority = {**records.patient(), "identifier": [{"value": "777", "type": {"coding": [{"code": "MR"}]}}]}
    assert hl7_id(no_authority) == "777"
    assert hl7_id({"resourceType": "Appointment", "identifier": [
        {"value": "P1", "type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}}]}) == "placer-P1"
    assert hl7_id({"resourceType": "Observation", "identifier": [{"value": "x"}]}) is None


def test_a_wrong_token_is_refused_and_the_sync_says_so(local: Any) -> None:
    local.settings.upstream_bearer_token = "wrong"
    summary = Synchronizer(local.store, client_for(local)).sync_patient("ehr-p1")
    assert not summary.complete and "401" in (summary.error or "")
    assert count(local, "Patient") == 0


def test_a_login_sync_returns_at_once_and_keeps_its_deadline(local: Any) -> None:
    local.hl7.receive_one(ADT, "cli", None)  # linked through the MRN the feed and the EHR share
    started = time.monotonic()
    future = sync_patient_async(local.store, client_for(local), "HOSP-12345", deadline=0.05)
    assert time.monotonic() - started < 0.05
    summary = future.result(timeout=30)
    assert summary is not None and not summary.complete and "deadline" in (summary.error or "")
    assert time.monotonic() - started < 5
    future = sync_patient_async(local.store, client_for(local), "HOSP-12345", deadline=60)
    summary = future.result(timeout=60)
    assert summary.complete and summary.upstream_patient == "ehr-p1" and summary.patient == "HOSP-12345"
    assert sync_patient_async(local.store, client_for(local), "nobody", deadline=5).result(timeout=10) is None


def test_fhir_writes_back_are_idempotent_and_cancellation_follows(local: Any, ehr: dict[str, Any]) -> None:
    settings = local.settings
    settings.outbox_appointment_request = settings.outbox_appointment_cancel = settings.outbox_message = "fhir"
    Synchronizer(local.store, client_for(local)).sync_patient("ehr-p1")
    with local.store.writing() as repo:
        repo.update("Practitioner", "dr1", records.practitioner())  # known here only
        repo.create(records.appointment("req1", patient_id="HOSP-12345"), resource_id="req1")
        repo.create({**records.message("msg1"), "sender": {"reference": "Patient/HOSP-12345"},
                     "subject": {"reference": "Patient/HOSP-12345"},
                     "recipient": [{"reference": "Practitioner/ehr-dr"}]}, resource_id="msg1")
    worker = Worker(local.store, settings, client_for(local))
    assert worker.run_once() == 2 and worker.delivered == 2
    # the answer was lost: the same items are sent again, and the EHR still holds one of each
    with local.store.writing() as repo:
        repo.conn.execute(update(db.outbox).values(status="pending", next_attempt_ms=0))
    assert worker.run_once() == 2
    with ehr["store"].reading() as repo:
        (key,) = [r.idempotency_key for r in local.engine.connect().execute(
            select(db.outbox).where(db.outbox.c.kind == "appointment-request")).all()]
        requested = repo.match("Appointment", f"identifier={OUTBOX_SYSTEM}|{key}")
        assert len(requested) == 1
        upstream_appt = requested[0].resource()
        assert upstream_appt["status"] == "proposed"
        actors = [p["actor"] for p in upstream_appt["participant"]]
        assert {"reference": "Patient/ehr-p1"} in actors  # the EHR's own id for the patient
        assert any(a.get("identifier", {}).get("value") == "1234567893" for a in actors)  # not known upstream
        assert len(repo.match("Communication", "sender=Patient/ehr-p1")) == 1
    with local.store.writing() as repo:
        repo.update("Appointment", "req1", {**records.appointment("req1", patient_id="HOSP-12345"),
                                            "status": "cancelled"})
    assert worker.run_once() == 1
    with ehr["store"].reading() as repo:
        assert repo.read("Appointment", requested[0].id).resource()["status"] == "cancelled"
    with local.engine.connect() as conn:
        statuses = conn.execute(select(db.outbox.c.kind, db.outbox.c.status).order_by(db.outbox.c.id)).all()
    assert [tuple(s) for s in statuses] == [("appointment-request", "delivered"), ("message", "delivered"),
                                            ("appointment-cancel", "delivered")]


def test_sync_command_prints_progress_and_a_summary(local: Any, ehr: dict[str, Any], settings: Settings) -> None:
    from gateway.cli import main

    env = {"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_UPSTREAM_FHIR_URL": ehr["base"],
           "GATEWAY_UPSTREAM_BEARER_TOKEN": UPSTREAM_TOKEN, "GATEWAY_AUDIT_ENABLED": "0"}
    result = CliRunner().invoke(main, ["sync", "--patient", "ehr-p1"], env=env)
    assert result.exit_code == 0, result.output
    assert "Observation: 130" in result.output
    assert "synced 1 of 1 patients completely" in result.output
    assert UPSTREAM_TOKEN not in result.output
    result = CliRunner().invoke(main, ["sync", "--patient", "missing"], env=env)
    assert result.exit_code == 1 and "INCOMPLETE" in result.output


def test_the_worker_runs_the_periodic_sync_of_linked_patients(local: Any, ehr: dict[str, Any]) -> None:
    Synchronizer(local.store, client_for(local)).sync_patient("ehr-p1")
    with ehr["store"].writing() as repo:
        repo.update("Observation", "ehr-new", {**ehr_records()[-1], "id": "ehr-new"})
    threads = WorkerThreads(local, workers=1, sync_interval=1).start()
    try:
        deadline = time.monotonic() + 30
        while read(local, "Observation", "ehr-new") is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        threads.stop()
    assert read(local, "Observation", "ehr-new")["subject"] == {"reference": "Patient/HOSP-12345"}


def test_business_identifiers_with_query_characters_still_match(local: Any) -> None:
    odd = {"system": "urn:example:mrn", "value": "A+B&C|D,E 1%"}
    with local.store.writing() as repo:
        repo.update("Patient", "local-odd", {"resourceType": "Patient", "id": "local-odd", "identifier": [odd]})
    synchronizer = Synchronizer(local.store, client_for(local))
    with local.store.writing(origin="upstream") as repo:
        assert synchronizer._local_id(repo, {"resourceType": "Patient", "id": "u9", "identifier": [odd]}) == \
            ("local-odd", True)
        assert synchronizer._local_id(repo, {"resourceType": "Patient", "id": "u9", "identifier": [
            {**odd, "value": "A B&C|D,E 1%"}]}) == ("u9", False)
