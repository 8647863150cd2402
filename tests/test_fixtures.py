"""Consistency checks for the demo FHIR fixtures in ``fixtures/fhir/`` (see ``fixtures/README.md``).

These tests only read JSON files; they need no database or running gateway.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = ROOT / "fixtures" / "fhir"
BUILD_SCRIPT = ROOT / "fixtures" / "build_fixtures.py"
FIXTURE_FILES = sorted(FIXTURE_DIR.glob("*.json"))
SYNTHEA_FILES = ("30-synthea-85.json", "31-synthea-355.json")

TODAY = date(2026, 11, 23)
ID_RE = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")
RELATIVE_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-\.]{1,64})$")

MR_TYPE = ("http://terminology.hl7.org/CodeSystem/v2-0203", "MR")
CONFIDENTIAL_R = ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R")
MOTHER = ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH")
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

FAMILY_AGES = {
    "maria-garcia": 40,
    "sofia-garcia": 8,
    "daniel-garcia": 15,
    "robert-chen": 77,
    "linda-chen": 48,
}

Resource = dict[str, Any]


@cache
def load_bundle(path: Path) -> Resource:
    return json.loads(path.read_text(encoding="utf-8"))


def entries() -> Iterator[tuple[int, Path, Resource]]:
    """(file position in load order, file, entry) for every entry of every fixture file."""
    for position, path in enumerate(FIXTURE_FILES):
        for entry in load_bundle(path)["entry"]:
            yield position, path, entry


@cache
def index() -> dict[str, tuple[int, Resource]]:
    """'Type/id' -> (file position, resource)."""
    out: dict[str, tuple[int, Resource]] = {}
    for position, _path, entry in entries():
        resource = entry["resource"]
        out.setdefault(f"{resource['resourceType']}/{resource['id']}", (position, resource))
    return out


def resources_of(rtype: str) -> list[Resource]:
    return [res for key, (_pos, res) in index().items() if key.startswith(f"{rtype}/")]


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def has_coding(concept: Resource | None, system_code: tuple[str, str]) -> bool:
    system, code = system_code
    return any(c.get("system") == system and c.get("code") == code for c in (concept or {}).get("coding", []))


def is_confidential(resource: Resource) -> bool:
    return any(
        (label.get("system"), label.get("code")) == CONFIDENTIAL_R
        for label in resource.get("meta", {}).get("security", [])
    )


def subject_of(resource: Resource) -> str | None:
    for key in ("subject", "patient"):
        if key in resource:
            return resource[key].get("reference")
    return None


def for_patient(rtype: str, patient_id: str) -> list[Resource]:
    return [r for r in resources_of(rtype) if subject_of(r) == f"Patient/{patient_id}"]


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------
# Bundle shape
# --------------------------------------------------------------------------


def test_fixture_files_present_and_small() -> None:
    names = [p.name for p in FIXTURE_FILES]
    for expected in ("00-organization.json", "05-schedules.json", "10-garcia-family.json", "20-chen-family.json"):
        assert expected in names
    for expected in SYNTHEA_FILES:
        assert expected in names
    total = sum(p.stat().st_size for p in FIXTURE_FILES)
    assert total < 3_000_000, f"fixtures are {total} bytes"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_bundle_is_transaction_of_puts(path: Path) -> None:
    bundle = load_bundle(path)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert bundle["entry"], "empty bundle"
    full_urls = Counter()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        key = f"{resource['resourceType']}/{resource['id']}"
        assert entry["request"] == {"method": "PUT", "url": key}
        full_url = entry["fullUrl"]
        assert full_url == key or re.fullmatch(r"urn:uuid:[0-9a-f\-]{36}", full_url), full_url
        full_urls[full_url] += 1
    assert [u for u, n in full_urls.items() if n > 1] == []


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_resources_validate_against_r4b_models(path: Path) -> None:
    errors = []
    for entry in load_bundle(path)["entry"]:
        resource = entry["resource"]
        try:
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        except Exception as exc:  # pydantic ValidationError or unknown resource type
            errors.append(f"{resource['resourceType']}/{resource.get('id')}: {exc}")
    assert errors == [], "\n".join(errors[:10])


def test_ids_are_valid_and_unique() -> None:
    seen: Counter[str] = Counter()
    for _pos, path, entry in entries():
        resource = entry["resource"]
        assert ID_RE.match(resource["id"]), f"{path.name}: bad id {resource['id']!r}"
        seen[f"{resource['resourceType']}/{resource['id']}"] += 1
    duplicates = [key for key, n in seen.items() if n > 1]
    assert duplicates == [], "the same Type/id is PUT twice (one silently overwrites the other)"


def test_references_resolve_in_load_order() -> None:
    problems = []
    for position, path, entry in entries():
        resource = entry["resource"]
        for target in references(resource):
            if target.startswith("#") or target.startswith(("http://", "https://")):
                continue  # contained resource or absolute URL
            if not RELATIVE_REF_RE.match(target):
                problems.append(f"{path.name} {resource['id']}: not a relative reference: {target}")
                continue
            found = index().get(target)
            if found is None:
                problems.append(f"{path.name} {resource['id']}: dangling reference {target}")
            elif found[0] > position:
                problems.append(f"{path.name} {resource['id']}: {target} is only loaded by a later file")
    assert problems == [], "\n".join(problems[:20])


def test_no_consent_or_person_resources() -> None:
    assert resources_of("Consent") == []
    assert resources_of("Person") == []


def test_generated_files_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("build_fixtures", BUILD_SCRIPT)
    assert spec and spec.loader
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    for name, bundle in module.build_core_bundles().items():
        on_disk = (FIXTURE_DIR / name).read_text(encoding="utf-8")
        assert module.serialize(bundle) == on_disk, f"{name} is stale: run python fixtures/build_fixtures.py"


def test_synthea_bundles_rewritten() -> None:
    for name, prefix in zip(SYNTHEA_FILES, ("syn85-", "syn355-"), strict=True):
        bundle = load_bundle(FIXTURE_DIR / name)
        types = {e["resource"]["resourceType"] for e in bundle["entry"]}
        assert {"Patient", "Encounter", "Observation", "DiagnosticReport", "MedicationRequest"} <= types
        for entry in bundle["entry"]:
            assert entry["resource"]["id"].startswith(prefix)
            assert not any(ref.startswith("urn:uuid:") for ref in references(entry["resource"]))


# --------------------------------------------------------------------------
# The demo people
# --------------------------------------------------------------------------


def test_family_ages_on_reference_date() -> None:
    for patient_id, expected in FAMILY_AGES.items():
        patient = index()[f"Patient/{patient_id}"][1]
        age = age_on(date.fromisoformat(patient["birthDate"]), TODAY)
        assert age == expected, f"{patient_id} is {age} on {TODAY}"
    assert FAMILY_AGES["sofia-garcia"] < 12
    assert 12 <= FAMILY_AGES["daniel-garcia"] < 18


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_patient_demographics(patient_id: str) -> None:
    patient = index()[f"Patient/{patient_id}"][1]
    assert any(has_coding(i.get("type"), MR_TYPE) and i.get("system") and i.get("value") for i in patient["identifier"])
    systems = {t["system"] for t in patient["telecom"]}
    assert {"phone", "email"} <= systems
    assert all(t["value"].endswith("@example.org") for t in patient["telecom"] if t["system"] == "email")
    assert all("555-" in t["value"] for t in patient["telecom"] if t["system"] == "phone")
    assert patient["name"] and patient["address"] and patient["gender"] in ("female", "male")
    for gp in patient["generalPractitioner"]:
        assert gp["reference"].startswith("Practitioner/")


def test_maria_prefers_spanish_and_is_mother_of_both_children() -> None:
    maria = index()["Patient/maria-garcia"][1]
    preferred = [c for c in maria["communication"] if c.get("preferred")]
    assert [c["language"]["coding"][0]["code"] for c in preferred] == ["es"]
    assert any(c["language"]["coding"][0]["code"] == "en" for c in maria["communication"])
    for child in ("sofia-garcia", "daniel-garcia"):
        mothers = [
            rp
            for rp in resources_of("RelatedPerson")
            if rp["patient"]["reference"] == f"Patient/{child}"
            and any(has_coding(rel, MOTHER) for rel in rp["relationship"])
        ]
        assert len(mothers) == 1, child
        assert mothers[0]["name"][0]["family"] == "Garcia"
        assert mothers[0]["birthDate"] == maria["birthDate"]


def test_daniel_has_confidential_observation_and_communication() -> None:
    observations = [o for o in for_patient("Observation", "daniel-garcia") if is_confidential(o)]
    messages = [c for c in for_patient("Communication", "daniel-garcia") if is_confidential(c)]
    assert observations and messages
    # ... while the non-confidential part of his record is still there for his mother to see.
    assert [o for o in for_patient("Observation", "daniel-garcia") if not is_confidential(o)]


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_lab_trends_and_reports(patient_id: str) -> None:
    labs = [
        o
        for o in for_patient("Observation", patient_id)
        if any(c["coding"][0]["code"] == "laboratory" for c in o["category"])
    ]
    dates_per_code: dict[str, set[str]] = {}
    for obs in labs:
        code = obs["code"]["coding"][0]
        assert code["system"] == "http://loinc.org"
        assert obs["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        assert obs["interpretation"][0]["coding"][0]["code"] in ("H", "L", "N")
        assert obs["referenceRange"]
        dates_per_code.setdefault(code["code"], set()).add(obs["effectiveDateTime"][:10])
    assert max(len(d) for d in dates_per_code.values()) >= 3, "need a 3-point trend"
    assert any("note" in o for o in labs), "at least one provider note"

    reports = for_patient("DiagnosticReport", patient_id)
    reported = {r["reference"] for rep in reports for r in rep["result"]}
    assert {f"Observation/{o['id']}" for o in labs} <= reported, "every lab result belongs to a report"
    for rep in reports:
        assert rep["status"] == "final"
        assert has_coding(rep["category"][0], ("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB"))


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_vitals(patient_id: str) -> None:
    vitals = [
        o
        for o in for_patient("Observation", patient_id)
        if any(c["coding"][0]["code"] == "vital-signs" for c in o["category"])
    ]
    bp = [o for o in vitals if o["code"]["coding"][0]["code"] == "85354-9"]
    assert bp
    for obs in bp:
        codes = {c["code"]["coding"][0]["code"] for c in obs["component"]}
        assert codes == {"8480-6", "8462-4"}
    assert any(o["code"]["coding"][0]["code"] == "29463-7" for o in vitals), "body weight"


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_medications(patient_id: str) -> None:
    meds = for_patient("MedicationRequest", patient_id)
    statuses = {m["status"] for m in meds}
    assert "active" in statuses and statuses & {"completed", "stopped"}
    for med in meds:
        assert med["medicationCodeableConcept"]["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
        assert med["dosageInstruction"][0]["text"]
        assert med["dispenseRequest"]["numberOfRepeatsAllowed"] >= 0
        assert med["dispenseRequest"]["quantity"]["value"] > 0
        assert med["requester"]["reference"].startswith("Practitioner/")
        assert med["authoredOn"]


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_appointments(patient_id: str) -> None:
    appointments = [
        a
        for a in resources_of("Appointment")
        if any(p["actor"].get("reference") == f"Patient/{patient_id}" for p in a["participant"])
    ]
    past = [a for a in appointments if a["status"] == "fulfilled"]
    upcoming = [a for a in appointments if a["status"] == "booked"]
    assert past and upcoming
    assert all(parse_instant(a["start"]).date() < TODAY for a in past)
    for appt in upcoming:
        start, end = parse_instant(appt["start"]), parse_instant(appt["end"])
        assert date(2026, 12, 1) <= start.date() <= date(2027, 1, 31)
        actor_types = {p["actor"]["reference"].split("/")[0] for p in appt["participant"]}
        assert {"Patient", "Practitioner", "Location"} <= actor_types
        (slot_ref,) = appt["slot"]
        slot = index()[slot_ref["reference"]][1]
        assert slot["status"] == "busy"
        assert (parse_instant(slot["start"]), parse_instant(slot["end"])) == (start, end)


def test_one_upcoming_video_visit() -> None:
    video = [
        a
        for a in resources_of("Appointment")
        if a["status"] == "booked" and any(e.get("valueUrl", "").startswith("https://") for e in a.get("extension", []))
    ]
    assert video
    assert all("https://" in a["comment"] for a in video)


@pytest.mark.parametrize("patient_id", sorted(FAMILY_AGES))
def test_secure_messages(patient_id: str) -> None:
    messages = for_patient("Communication", patient_id)
    assert messages
    by_ref = {f"Communication/{m['id']}": m for m in messages}
    for msg in messages:
        assert msg["status"] == "completed"
        assert msg["payload"][0]["contentString"]
        assert parse_instant(msg["sent"]).tzinfo is not None
        for parent in msg.get("inResponseTo", []):
            assert parent["reference"] in by_ref
    assert any("inResponseTo" in m for m in messages), "at least one thread"
    assert any(m["sender"]["reference"].startswith("Practitioner/") and m.get("about") for m in messages), (
        "at least one message from the care team about a result"
    )


def test_slots_cover_weekday_mornings() -> None:
    slots = resources_of("Slot")
    free = [s for s in slots if s["status"] == "free"]
    busy = [s for s in slots if s["status"] == "busy"]
    schedules = {s["schedule"]["reference"] for s in slots}
    assert len(schedules) >= 2
    day, weekdays = date(2026, 11, 30), 0
    while day <= date(2027, 1, 29):
        weekdays += day.weekday() < 5
        day += timedelta(days=1)
    assert len(slots) == weekdays * 6 * len(schedules)
    for slot in slots:
        start, end = parse_instant(slot["start"]), parse_instant(slot["end"])
        assert slot["start"].endswith("-05:00")
        assert end - start == timedelta(minutes=30)
        assert start.weekday() < 5
        assert start.hour >= 9 and end.hour * 60 + end.minute <= 12 * 60
        assert date(2026, 11, 30) <= start.date() <= date(2027, 1, 29)
    booked_slot_refs = {
        s["reference"] for a in resources_of("Appointment") if a["status"] == "booked" for s in a["slot"]
    }
    assert {f"Slot/{s['id']}" for s in busy} == booked_slot_refs
    assert len(free) == len(slots) - len(busy)


def test_sofia_has_pediatric_data() -> None:
    codes = {o["code"]["coding"][0]["code"] for o in for_patient("Observation", "sofia-garcia")}
    assert {"8302-2", "29463-7", "59576-9"} <= codes  # height, weight, BMI percentile
    assert for_patient("Immunization", "sofia-garcia")
    encounter_types = {
        c["code"] for e in for_patient("Encounter", "sofia-garcia") for t in e["type"] for c in t["coding"]
    }
    assert "410620009" in encounter_types  # well child visit
