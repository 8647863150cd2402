"""HL7v2 -> FHIR translation: value types, escapes, explicit nulls, corrections, stable ids, merges,
patient-facing notes, and the whole sample corpus (every resource valid R4)."""

from __future__ import annotations

import base64
import copy
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import hl7
import pytest
from fhir.resources.R4B import get_fhir_model_class

from gateway.hl7 import parse
from gateway.hl7.translate import MappingError, Translation, UnsupportedMessage, make_id, supported, translate

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
CORPUS_FILES = sorted(CORPUS.glob("*.hl7"))
UCUM = "http://unitsofmeasure.org"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"

# Message types in the sample corpus that the gateway does not translate, and why (for the README).
OUT_OF_SCOPE = {
    # ADT events other than admit/register/update/person add-update/merge: transfers, discharges,
    # leaves, cancels, swaps, account and identifier changes - no Encounter-history mapping yet
    "ADT^A02", "ADT^A03", "ADT^A05", "ADT^A06", "ADT^A07", "ADT^A09", "ADT^A10", "ADT^A11", "ADT^A13",
    "ADT^A14", "ADT^A15", "ADT^A16", "ADT^A25", "ADT^A26", "ADT^A27", "ADT^A29", "ADT^A41", "ADT^A45",
    "ADT^A47", "ADT^A60",
    # billing and charges
    "BAR^P01", "BAR^P02", "BAR^P12", "DFT^P03", "DFT^P11",
    # document events other than T02 (original with content)
    "MDM^T01", "MDM^T05", "MDM^T06", "MDM^T09", "MDM^T10",
    # lab/general orders, lab automation, referrals, problems, immunizations, dispenses
    "OMG^O19", "OML^O21", "ORM^O01", "OUL^R22", "OUL^R23", "OUL^R24", "PPR^PC1", "PPR^PC2", "PPR^PC3",
    "RDE^O25", "RDS^O13", "REF^I12", "REF^I14", "SIU^S16", "SIU^S17", "VXU^V04",
}


def message(*segments: str, kind: str = "ORU^R01^ORU_R01", control: str = "CTRL1",
            sent: str = "20240102030405+0100", version: str = "2.5.1") -> hl7.Message:
    header = f"MSH|^~\\&|LAB|HOSP|GW|HOSP|{sent}||{kind}|{control}|P|{version}"
    return parse.parse("\r".join([header, *segments]))


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment from its valued fields, so tests name fields by number instead of counting bars."""
    return "|".join([name, *(fields.get(n, "") for n in range(1, max(fields) + 1))])


def corpus_message(path: Path) -> hl7.Message:
    return parse.parse(parse.decode(path.read_bytes()))


def validate(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def of_type(result: Translation, resource_type: str) -> list[dict[str, Any]]:
    return [r for r in result.resources if r["resourceType"] == resource_type]


def one(result: Translation, resource_type: str) -> dict[str, Any]:
    found = of_type(result, resource_type)
    assert len(found) == 1, f"{len(found)} {resource_type}"
    return found[0]


PID = "PID|1||MRN123^^^HOSP^MR||Doe^Jane^Q||19800101|F"
OBR = "OBR|1|PLC1^EHR|FIL1^LAB|24331-1^Lipid panel^LN|||20240102010000+0100|||||||||||||||20240102030000+0100|||F"


def obx(kind: str, value: str, units: str = "", reference: str = "", flags: str = "", status: str = "F",
        code: str = "2345-7^Glucose^LN", sub_id: str = "", set_id: str = "1") -> str:
    return f"OBX|{set_id}|{kind}|{code}|{sub_id}|{value}|{units}|{reference}|{flags}|||{status}|||20240102020000+0100"


def result_for(segment: str) -> tuple[Translation, dict[str, Any]]:
    result = translate(message(PID, OBR, segment))
    validate(result.resources)
    return result, one(result, "Observation")


# --- one test per OBX value type -----------------------------------------------------------------

def test_nm_is_a_quantity_with_ucum_units_range_and_interpretation() -> None:
    _, observation = result_for(obx("NM", "182", "mg/dL^milligrams per deciliter^UCUM", "70-105", "H"))
    assert observation["valueQuantity"] == {"value": Decimal("182"), "unit": "milligrams per deciliter",
                                            "code": "mg/dL", "system": UCUM}
    assert observation["referenceRange"][0]["low"]["value"] == Decimal("70")
    assert observation["referenceRange"][0]["high"]["code"] == "mg/dL"
    assert observation["interpretation"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H", "display": "High"}
    assert observation["status"] == "final"
    assert observation["effectiveDateTime"] == "2024-01-02T02:00:00+01:00"


def test_nm_keeps_the_digits_sent() -> None:
    _, observation = result_for(obx("NM", "4.10", "g/dL^^UCUM"))
    assert str(observation["valueQuantity"]["value"]) == "4.10"


def test_nm_that_is_not_a_number_is_a_data_type_error() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message(PID, OBR, obx("NM", "high")))
    assert caught.value.code == "102" and caught.value.location == "OBX-5"


def test_st_is_a_string() -> None:
    _, observation = result_for(obx("ST", "Positive"))
    assert observation["valueString"] == "Positive"


def test_tx_repetitions_are_lines() -> None:
    _, observation = result_for(obx("TX", "Many spherocytes present.~Reactive lymphocytes."))
    assert observation["valueString"] == "Many spherocytes present.\nReactive lymphocytes."


def test_ft_formatting_becomes_plain_text() -> None:
    _, observation = result_for(obx("FT", r"Impression:\.br\No acute \H\findings\N\."))
    assert observation["valueString"] == "Impression:\nNo acute findings."


@pytest.mark.parametrize("kind", ["CE", "CWE", "CNE"])
def test_coded_values_are_codeable_concepts(kind: str) -> None:
    _, observation = result_for(obx(kind, "260385009^Negative^SCT^NEG^Negative^L^^^Negative result"))
    assert observation["valueCodeableConcept"] == {
        "coding": [{"code": "260385009", "display": "Negative", "system": "http://snomed.info/sct"},
                   {"code": "NEG", "display": "Negative"}],
        "text": "Negative result",
    }


@pytest.mark.parametrize(("value", "expected_key", "expected"), [
    (">^100", "valueQuantity", {"comparator": ">", "value": Decimal("100"), "unit": "mg/L"}),
    ("<=^0.5", "valueQuantity", {"comparator": "<=", "value": Decimal("0.5"), "unit": "mg/L"}),
    ("^182", "valueQuantity", {"value": Decimal("182"), "unit": "mg/L"}),
    ("=^7", "valueQuantity", {"value": Decimal("7"), "unit": "mg/L"}),
    ("^10^-^20", "valueRange", {"low": {"value": Decimal("10"), "unit": "mg/L"},
                                "high": {"value": Decimal("20"), "unit": "mg/L"}}),
    ("^1^:^128", "valueRatio", {"numerator": {"value": Decimal("1"), "unit": "mg/L"},
                                "denominator": {"value": Decimal("128"), "unit": "mg/L"}}),
    ("<>^3", "valueString", "<> 3"),
    ("^2^+", "valueString", "2+"),
], ids=["greater", "at-most", "plain", "equals", "range", "ratio", "not-equal", "plus"])
def test_sn_comparators_ranges_and_ratios(value: str, expected_key: str, expected: Any) -> None:
    _, observation = result_for(obx("SN", value, "mg/L"))
    assert observation[expected_key] == expected
    assert not [k for k in observation if k.startswith("value") and k != expected_key]


@pytest.mark.parametrize(("kind", "value", "expected"), [
    ("DT", "20240101", "2024-01-01"),
    ("DTM", "202401021530+0100", "2024-01-02T15:30:00+01:00"),
    ("TS", "20240102153045.25-0500", "2024-01-02T15:30:45.25-05:00"),
    ("TS", "20240102153045", "2024-01-02T15:30:45+00:00"),  # no offset sent: settings.yaml's zone
    ("DTM", "202401", "2024-01"),
])
def test_dates_keep_their_precision_and_zone(kind: str, value: str, expected: str) -> None:
    _, observation = result_for(obx(kind, value))
    assert observation["valueDateTime"] == expected


def test_invalid_date_is_a_data_type_error_with_its_location() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message(PID, OBR, obx("DT", "20240231")))
    assert caught.value.code == "102" and caught.value.location == "OBX-5"


def test_nr_is_a_range() -> None:
    _, observation = result_for(obx("NR", "3.5^7.2", "mmol/L^^UCUM"))
    assert observation["valueRange"] == {
        "low": {"value": Decimal("3.5"), "unit": "mmol/L", "code": "mmol/L", "system": UCUM},
        "high": {"value": Decimal("7.2"), "unit": "mmol/L", "code": "mmol/L", "system": UCUM},
    }


def test_ed_base64_pdf_becomes_a_document_reference_the_observation_derives_from() -> None:
    data = base64.b64encode(PDF).decode("ascii")
    result, observation = result_for(obx("ED", f"LAB^AP^PDF^Base64^{data}", code="11526-1^Pathology study^LN"))
    document = one(result, "DocumentReference")
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "application/pdf"
    assert base64.b64decode(attachment["data"]) == PDF
    assert attachment["size"] == len(PDF)
    assert observation["derivedFrom"] == [{"reference": f"DocumentReference/{document['id']}"}]
    assert not [k for k in observation if k.startswith("value")]
    report = one(result, "DiagnosticReport")
    assert document["context"]["related"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
    assert document["subject"] == {"reference": f"Patient/{result.patient_id}"}


def test_ed_that_is_not_base64_is_a_data_type_error() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message(PID, OBR, obx("ED", "LAB^AP^PDF^Base64^not*base64!")))
    assert (caught.value.code, caught.value.location) == ("102", "OBX-5")


def test_repeating_numeric_value_becomes_components() -> None:
    _, observation = result_for(obx("NM", "120~80", "mm[Hg]^^UCUM", code="85354-9^Blood pressure^LN"))
    assert [c["valueQuantity"]["value"] for c in observation["component"]] == [Decimal("120"), Decimal("80")]
    assert observation["component"][0]["code"]["coding"][0]["code"] == "85354-9"


# --- report structure, ids, corrections ----------------------------------------------------------

def test_oru_links_report_observations_and_patient_by_deterministic_ids() -> None:
    result = translate(message(PID, OBR, obx("NM", "5", set_id="1"),
                               obx("NM", "6", code="2093-3^Cholesterol^LN", set_id="2")))
    validate(result.resources)
    patient = one(result, "Patient")
    report = one(result, "DiagnosticReport")
    observations = of_type(result, "Observation")
    assert patient["id"] == "HOSP-MRN123" == result.patient_id
    assert report["id"] == "LAB-FIL1"
    # business key: report (filler number and its namespace) + test code; "-" in a LOINC code
    # could make two keys join alike, so such keys are hashed
    assert [o["id"] for o in observations] == [make_id(["LAB", "FIL1", "2345-7"]), make_id(["LAB", "FIL1", "2093-3"])]
    assert report["result"] == [{"reference": f"Observation/{o['id']}"} for o in observations]
    assert all(o["subject"] == {"reference": "Patient/HOSP-MRN123"} for o in observations)
    assert report["subject"] == {"reference": "Patient/HOSP-MRN123"}
    assert result.source_time == "2024-01-02T03:04:05+01:00"


def test_corrected_result_updates_the_same_observation() -> None:
    original = translate(message(PID, OBR, obx("NM", "182", status="F")))
    corrected = translate(message(PID, OBR.replace("|||F", "|||C"), obx("NM", "128", status="C"),
                                  control="CTRL2", sent="20240103000000+0100"))
    before, after = one(original, "Observation"), one(corrected, "Observation")
    assert before["id"] == after["id"]
    assert (before["status"], after["status"]) == ("final", "corrected")
    assert after["valueQuantity"]["value"] == Decimal("128")
    assert one(corrected, "DiagnosticReport")["status"] == "corrected"
    assert one(original, "DiagnosticReport")["id"] == one(corrected, "DiagnosticReport")["id"]


def test_same_test_twice_in_one_report_gets_two_observations() -> None:
    result = translate(message(PID, OBR, obx("NM", "5"), obx("NM", "6", set_id="2")))
    ids = [o["id"] for o in of_type(result, "Observation")]
    assert len(set(ids)) == 2
    validate(result.resources)


def test_resent_message_gives_identical_ids_even_with_a_new_control_id() -> None:
    segments = (PID, segment("PV1", {2: "I", 3: "WARD^12^A", 7: "1234^House^Greg", 19: "V555^^^HOSP^VN"}), OBR,
                obx("NM", "5"), "NTE|1||Fasting sample")
    first = translate(message(*segments))
    again = translate(message(*segments, control="CTRL9", sent="20240105000000+0100"))
    assert [(r["resourceType"], r["id"]) for r in first.resources] == \
        [(r["resourceType"], r["id"]) for r in again.resources]


def test_translation_is_pure_and_repeatable() -> None:
    msg = message(PID, OBR, obx("TX", "text"))
    assert translate(msg) == translate(copy.deepcopy(msg))


# --- escapes and explicit nulls ------------------------------------------------------------------

def test_escape_sequences_are_decoded_in_fhir_strings() -> None:
    result = translate(message(
        r"PID|1||MRN123^^^HOSP^MR||O\T\Brien^Ann||19800101|F",
        OBR, obx("ST", "Na\\S\\K ratio \\T\\ more\\F\\less \\E\\ \\X4F4B\\ \\R\\"),
    ))
    assert one(result, "Patient")["name"][0]["family"] == "O&Brien"
    assert one(result, "Observation")["valueString"] == "Na^K ratio & more|less \\ OK ~"


def test_explicit_null_clears_the_element_on_update() -> None:
    result = translate(message(
        "EVN|A08|20240102030405",
        'PID|1||MRN123^^^HOSP^MR||Doe^Jane||19800101|F|||""||""|||""',
        kind="ADT^A08^ADT_A01",
    ))
    assert result.clears == {"Patient/HOSP-MRN123": ["address", "maritalStatus", "telecom"]}
    patient = one(result, "Patient")
    assert "telecom" not in patient and "address" not in patient
    validate(result.resources)


def test_explicit_null_does_not_clear_what_another_field_fills() -> None:
    result = translate(message(
        'PID|1||MRN123^^^HOSP^MR||Doe^Jane||19800101|F|||||""|(555)555-1234^WPN^PH',
        kind="ADT^A08^ADT_A01",
    ))
    assert result.clears == {}
    assert one(result, "Patient")["telecom"] == [{"value": "(555)555-1234", "system": "phone", "use": "work"}]


def test_empty_field_is_not_a_clear() -> None:
    result = translate(message("PID|1||MRN123^^^HOSP^MR||Doe^Jane||19800101|F", kind="ADT^A08^ADT_A01"))
    assert result.clears == {}


# --- ADT -----------------------------------------------------------------------------------------

def test_adt_a01_builds_patient_encounter_and_related_person() -> None:
    result = translate(message(
        "EVN|A01|20240102030405",
        "PID|1||MRN123^^^HOSP^MR~999-99-9999^^^USSSA^SS||Doe^Jane^Q^^Ms.^^L||19800101123000|F|||"
        "1 Main St^Apt 2^Springfield^IL^62701^USA^H||^PRN^PH^^1^217^5551234~jane@example.org^NET^Internet|"
        "^WPN^PH^^1^217^5559999||M^Married^HL70002",
        "NK1|1|Doe^John|SPO^Spouse^HL70063|||||||||||||||||||||||||||||||||",
        segment("PV1", {1: "1", 2: "I", 3: "WARD^12^A", 7: "1234^House^Greg^^^Dr^MD^^HOSP", 10: "MED",
                        19: "V555^^^HOSP^VN", 44: "20240102010000+0100"}),
        kind="ADT^A01^ADT_A01",
    ))
    validate(result.resources)
    patient = one(result, "Patient")
    assert patient["gender"] == "female" and patient["birthDate"] == "1980-01-01"
    assert patient["_birthDate"]["extension"][0]["valueDateTime"] == "1980-01-01T12:30:00+00:00"
    assert patient["name"][0] == {"family": "Doe", "given": ["Jane", "Q"], "prefix": ["Ms."], "use": "official"}
    assert {"system": "email", "value": "jane@example.org", "use": "home"} in patient["telecom"]
    assert {"system": "phone", "value": "1 217 5551234", "use": "home"} in patient["telecom"]
    assert patient["maritalStatus"]["coding"][0]["code"] == "M"
    encounter = one(result, "Encounter")
    assert encounter["id"] == "HOSP-V555"
    assert encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP"
    assert encounter["subject"] == {"reference": "Patient/HOSP-MRN123"}
    assert encounter["participant"][0]["individual"]["reference"] == "Practitioner/HOSP-1234"
    related = one(result, "RelatedPerson")
    assert related["patient"] == {"reference": "Patient/HOSP-MRN123"}
    assert related["relationship"][0]["coding"][0]["code"] == "SPS"
    assert one(result, "Practitioner")["name"] == [{"family": "House", "given": ["Greg"], "prefix": ["Dr"],
                                                    "suffix": ["MD"]}]


def test_a28_placeholder_visit_makes_no_encounter() -> None:
    result = translate(message("PID|1||MRN123^^^HOSP^MR||Doe^Jane", "PV1|1|N", kind="ADT^A28^ADT_A05"))
    assert not of_type(result, "Encounter")


def test_a40_reports_the_merge() -> None:
    result = translate(message(
        "EVN|A40|20240102030405",
        "PID|1||NEW1^^^HOSP^MR||Doe^Jane",
        "MRG|OLD9^^^HOSP^MR",
        kind="ADT^A40^ADT_A39",
    ))
    assert result.merges == [("HOSP-OLD9", "HOSP-NEW1")]
    assert result.patient_id == "HOSP-NEW1"


def test_bad_birth_date_names_its_field() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message("PID|1||MRN123^^^HOSP^MR||Doe^Jane||19801341", kind="ADT^A04^ADT_A01"))
    assert (caught.value.code, caught.value.location) == ("102", "PID-7")


def test_patient_without_identifier_is_a_missing_required_field() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message("PID|1||||Doe^Jane", kind="ADT^A04^ADT_A01"))
    assert (caught.value.code, caught.value.location) == ("101", "PID-3")


def test_adt_without_pid_is_a_missing_required_segment() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message("EVN|A04|20240102030405", kind="ADT^A04^ADT_A01"))
    assert (caught.value.code, caught.value.location) == ("101", "PID")


def test_report_without_test_code_is_a_missing_required_field() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message(PID, "OBR|1|PLC1|FIL1", obx("ST", "x")))
    assert (caught.value.code, caught.value.location) == ("101", "OBR-4")


# --- patient-facing notes and documents ----------------------------------------------------------

def test_result_note_for_the_patient_becomes_a_communication() -> None:
    result = translate(message(PID, OBR, obx("NM", "5"),
                               "NTE|1|L|Repeat the test in 3 months.|PI^Patient Instructions^HL70364",
                               "NTE|2|L|Lipemic sample.|RE^Remark^HL70364"))
    validate(result.resources)
    observation = one(result, "Observation")
    assert [n["text"] for n in observation["note"]] == ["Repeat the test in 3 months.", "Lipemic sample."]
    communication = one(result, "Communication")
    assert communication["payload"] == [{"contentString": "Repeat the test in 3 months."}]
    assert communication["recipient"] == [{"reference": "Patient/HOSP-MRN123"}]
    assert communication["about"] == [{"reference": f"Observation/{observation['id']}"}]
    assert communication["status"] == "completed"


def test_report_level_note_goes_on_the_report() -> None:
    result = translate(message(PID, OBR, "NTE|1||Specimen hemolyzed", obx("NM", "5")))
    report = one(result, "DiagnosticReport")
    assert report["extension"][0]["valueAnnotation"] == {"text": "Specimen hemolyzed"}
    assert "note" not in one(result, "Observation")


MDM_TXA = segment("TXA", {1: "1", 2: "{kind}", 3: "TX", 4: "20240102030000+0100", 6: "20240102031500+0100",
                          9: "1234^House^Greg", 12: "DOC77^EHR", 17: "AU", 19: "AV"})


def test_mdm_text_document_is_one_document_reference() -> None:
    result = translate(message(
        "EVN|T02|20240102030405", PID, "PV1|1|O",
        MDM_TXA.format(kind="DS"),
        r"OBX|1|TX|DS^Discharge summary||Patient seen \T\ discharged.||||||F",
        "OBX|2|TX|DS^Discharge summary||Follow up in 2 weeks.||||||F",
        kind="MDM^T02^MDM_T02",
    ))
    validate(result.resources)
    document = one(result, "DocumentReference")
    assert document["id"] == "EHR-DOC77"
    assert document["status"] == "current" and document["docStatus"] == "final"
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "text/plain"
    assert base64.b64decode(attachment["data"]).decode() == "Patient seen & discharged.\nFollow up in 2 weeks."
    assert document["author"][0]["reference"] == "Practitioner/1234"
    assert not of_type(result, "Communication")


def test_mdm_pdf_and_patient_letter_becomes_a_communication() -> None:
    data = base64.b64encode(PDF).decode("ascii")
    result = translate(message(
        PID, MDM_TXA.format(kind="LETTER"), f"OBX|1|ED|LETTER||^application^pdf^Base64^{data}||||||F",
        kind="MDM^T02^MDM_T02",
    ))
    validate(result.resources)
    document = one(result, "DocumentReference")
    assert base64.b64decode(document["content"][0]["attachment"]["data"]) == PDF
    communication = one(result, "Communication")
    assert communication["payload"] == [{"contentReference": {"reference": f"DocumentReference/{document['id']}"}}]
    assert communication["recipient"] == [{"reference": "Patient/HOSP-MRN123"}]


def test_mdm_without_content_is_a_missing_required_field() -> None:
    with pytest.raises(MappingError) as caught:
        translate(message(PID, MDM_TXA.format(kind="DS"), kind="MDM^T02^MDM_T02"))
    assert (caught.value.code, caught.value.location) == ("101", "OBX-5")


# --- scheduling and pharmacy ---------------------------------------------------------------------

SCH = "SCH|P1^EHR|F1^SCHED||||||CHECKUP|30|min|||||||||||||||Booked"
TQ1 = "TQ1|||||||20240110093000+0100|20240110100000+0100"


@pytest.mark.parametrize(("event", "status"), [("S12", "booked"), ("S14", "booked"), ("S15", "cancelled"),
                                                ("S26", "noshow")])
def test_siu_trigger_decides_appointment_status(event: str, status: str) -> None:
    result = translate(message(SCH, TQ1, PID, "RGS|1", "AIP|1||1234^House^Greg|D^Doctor||20240110093000+0100|||30|min",
                               kind=f"SIU^{event}^SIU_{event}"))
    validate(result.resources)
    appointment = one(result, "Appointment")
    assert appointment["status"] == status
    assert appointment["id"] == "SCHED-F1"
    assert appointment["start"] == "2024-01-10T09:30:00+01:00"
    assert appointment["minutesDuration"] == 30
    actors = [p["actor"].get("reference") for p in appointment["participant"]]
    assert actors == ["Practitioner/1234", "Patient/HOSP-MRN123"]
    assert appointment["participant"][0]["period"] == {"start": "2024-01-10T09:30:00+01:00",
                                                       "end": "2024-01-10T10:00:00+01:00"}


def test_rde_order_becomes_a_medication_request() -> None:
    result = translate(message(
        PID,
        "ORC|NW|ORD1^EHR||||||||||1234^House^Greg",
        "RXE||00069015001^Amoxicillin 500 mg^NDC|500||mg^milligram^UCUM|CAP|Take one capsule three times daily~"
        "With food|||30|CAP^capsule|2",
        "TQ1|||TID|||||||||",
        "RXR|PO^Oral",
        kind="RDE^O11^RDE_O11",
    ))
    validate(result.resources)
    request = one(result, "MedicationRequest")
    assert request["id"] == "EHR-ORD1"
    assert (request["status"], request["intent"]) == ("active", "order")
    assert request["medicationCodeableConcept"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/ndc"
    assert request["dispenseRequest"] == {"quantity": {"value": Decimal("30"), "unit": "capsule"},
                                          "numberOfRepeatsAllowed": 2}
    dosage = request["dosageInstruction"][0]
    assert dosage["text"] == "Take one capsule three times daily\nWith food"
    assert dosage["doseAndRate"][0]["doseQuantity"] == {"value": Decimal("500"), "unit": "milligram", "code": "mg",
                                                        "system": UCUM}
    assert dosage["route"]["coding"][0]["code"] == "PO"
    assert dosage["timing"]["code"]["coding"][0]["code"] == "TID"
    assert request["subject"] == {"reference": "Patient/HOSP-MRN123"}


def test_order_status_wins_over_order_control() -> None:
    result = translate(message(PID, "ORC|NW|ORD1^EHR|||DC", "RXO|00069015001^Amoxicillin^NDC|500",
                               kind="OMP^O09^OMP_O09"))
    assert one(result, "MedicationRequest")["status"] == "stopped"


# --- what is not translated ----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "code"), [("ACK^A01^ACK", "200"), ("ADT^A03^ADT_A03", "201"),
                                            ("ZZZ^Z01", "200")])
def test_unsupported_type_or_event(kind: str, code: str) -> None:
    with pytest.raises(UnsupportedMessage) as caught:
        translate(message(PID, kind=kind))
    assert caught.value.code == code
    assert caught.value.location.startswith("MSH-9")


def test_supported_names_the_message_maps() -> None:
    assert "ADT^A01" in supported() and "MDM^T02" in supported()


# --- the sample corpus ---------------------------------------------------------------------------

def _kind(msg: hl7.Message) -> str:
    return f"{parse.get(msg, 'MSH-9.1')}^{parse.get(msg, 'MSH-9.2')}"


def _count(msg: hl7.Message, name: str) -> int:
    return len(parse.segments(msg, name))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_message(path: Path) -> None:
    msg = corpus_message(path)
    kind = _kind(msg)
    if kind not in supported():
        assert kind in OUT_OF_SCOPE
        with pytest.raises(UnsupportedMessage) as caught:
            translate(msg)
        assert caught.value.code in ("200", "201")
        return
    result = translate(msg)
    validate(result.resources)
    counts = Counter(r["resourceType"] for r in result.resources)
    keys = [(r["resourceType"], r["id"]) for r in result.resources]
    assert len(keys) == len(set(keys)), "one resource per id"
    assert result.patient_id is not None and ("Patient", result.patient_id) in keys
    assert result.source_time
    code = kind.split("^")[0]
    if code == "ORU":
        assert counts["Observation"] == _count(msg, "OBX")
        assert counts["DiagnosticReport"] == _count(msg, "OBR")
    elif code == "SIU":
        assert counts["Appointment"] == 1
    elif code in ("RDE", "OMP"):
        assert counts["MedicationRequest"] == _count(msg, "ORC")
    elif code == "MDM":
        assert counts["DocumentReference"] == 1
    elif kind == "ADT^A40":
        assert len(result.merges) == _count(msg, "MRG")
    assert translate(corpus_message(path)) == result, "a re-sent message gives the same resources and ids"


@pytest.mark.skipif(not CORPUS_FILES, reason="the sample corpus (../shared/corpus) is not checked out")
def test_corpus_out_of_scope_list_is_complete() -> None:
    kinds = {_kind(corpus_message(path)) for path in CORPUS_FILES}
    assert kinds - set(supported()) == OUT_OF_SCOPE
