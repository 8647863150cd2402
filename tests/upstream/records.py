"""Small FHIR records for the outbox and sync tests."""

from __future__ import annotations

from typing import Any

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def patient(pid: str = "p1", mrn: str = "12345") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid,
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": mrn, "assigner": {"display": "HOSP"},
                            "type": {"coding": [{"system": V2_0203, "code": "MR"}]}}],
            "name": [{"family": "Garcia", "given": ["Maria", "Elena"]}], "gender": "female",
            "birthDate": "1980-04-02"}


def practitioner(pid: str = "dr1") -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": pid,
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
            "name": [{"family": "Smith", "given": ["John"]}]}


def appointment(aid: str = "a1", status: str = "proposed", patient_id: str = "p1") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": aid, "status": status,
            "description": "Knee pain | worse on stairs",
            "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "30989003",
                                        "display": "Knee pain"}]}],
            "start": "2027-02-01T10:00:00Z", "end": "2027-02-01T10:30:00Z",
            "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"},
                            {"actor": {"reference": "Practitioner/dr1"}, "status": "needs-action"}]}


def medication_request(mid: str = "m1", route: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "MedicationRequest", "id": mid, "status": "active", "intent": "order",
        "identifier": [{"value": "ORD777", "assigner": {"display": "EHR"},
                        "type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}}],
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "197361", "display": "Amlodipine 5 MG Oral Tablet"}]},
        "subject": {"reference": "Patient/p1"},
        "dispenseRequest": {"quantity": {"value": 30}},
    }
    if route:
        body["dosageInstruction"] = [{"route": {"coding": [{"system": "http://snomed.info/sct", "code": "PO",
                                                            "display": "Oral"}]}}]
    return body


def refill_task(tid: str = "t1", focus: str = "MedicationRequest/m1") -> dict[str, Any]:
    return {"resourceType": "Task", "id": tid, "status": "requested", "intent": "order",
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
            "focus": {"reference": focus}, "for": {"reference": "Patient/p1"},
            "note": [{"text": "Running out next week"}]}


def message(cid: str = "c1") -> dict[str, Any]:
    return {"resourceType": "Communication", "id": cid, "status": "completed",
            "sender": {"reference": "Patient/p1"}, "subject": {"reference": "Patient/p1"},
            "recipient": [{"reference": "Practitioner/dr1"}], "sent": "2027-01-15T09:30:00+01:00",
            "topic": {"text": "Blood pressure"},
            "payload": [{"contentString": "My readings are 150/95 since Monday.\nShould I change the dose?"}]}
