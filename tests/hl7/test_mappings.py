"""The mapping data itself: ConceptMaps are valid FHIR and behave, YAML maps load and only name
maps, tables, vocabularies and computations that exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from gateway.hl7 import translate as t

MAPPINGS = t.MAPPINGS_DIR
CONCEPT_MAPS = sorted((MAPPINGS / "vocabulary").glob("*.json"))
YAML_FILES = sorted(MAPPINGS.rglob("*.yaml"))
V2_TYPES = {"ST", "TX", "FT", "ID", "IS", "NM", "SI", "DT", "DTM", "TS", "TM"}
FHIR_TYPES = {"string", "markdown", "code", "uri", "date", "dateTime", "instant", "time", "decimal", "integer",
              "positiveInt", "unsignedInt", "boolean", "base64Binary", "Coding", "CodeableConcept"}
V2 = "http://terminology.hl7.org/CodeSystem/v2-"

# One row per ConceptMap: a v2 code, the FHIR coding it must become, and a code the table does
# not map. A new ConceptMap without a row here fails test_every_concept_map_has_a_behaviour_test.
BEHAVIOUR: dict[str, tuple[str, str, str, str]] = {
    "v2-0001-administrative-gender": ("F", "http://hl7.org/fhir/administrative-gender", "female", "Z"),
    "v2-0002-marital-status": ("M", "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Q"),
    "v2-0003-event": ("A01", "http://hl7.org/fhir/encounter-status", "in-progress", "A08"),
    "v2-0004-patient-class": ("I", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "IMP", "R"),
    "v2-0038-order-status": ("CM", "http://hl7.org/fhir/CodeSystem/medicationrequest-status", "completed", "ZZ"),
    "v2-0063-relationship": ("MTH", "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH", "WRD"),
    "v2-0078-interpretation": ("HH", "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "HH",
                               "QCF"),
    "v2-0085-observation-status": ("C", "http://hl7.org/fhir/observation-status", "corrected", "Q"),
    "v2-0119-order-control": ("NW", "http://hl7.org/fhir/CodeSystem/medicationrequest-status", "active", "SN"),
    "v2-0123-report-status": ("F", "http://hl7.org/fhir/diagnostic-report-status", "final", "Y"),
    "v2-0190-address-type": ("H", "http://hl7.org/fhir/address-use", "home", "N"),
    "v2-0200-name-use": ("L", "http://hl7.org/fhir/name-use", "official", "I"),
    "v2-0201-telecom-use": ("WPN", "http://hl7.org/fhir/contact-point-use", "work", "ASN"),
    "v2-0202-telecom-equipment": ("FX", "http://hl7.org/fhir/contact-point-system", "fax", "ZZ"),
    "v2-0271-document-completion": ("LA", "http://hl7.org/fhir/composition-status", "final", "ZZ"),
    "v2-0273-document-availability": ("OB", "http://hl7.org/fhir/document-reference-status", "superseded", "UN"),
    "v2-0278-filler-status": ("Noshow", "http://hl7.org/fhir/appointmentstatus", "noshow", "Blocked"),
}


@pytest.fixture(scope="module")
def maps() -> t.Mappings:
    return t.load_mappings(MAPPINGS)


@pytest.mark.parametrize("path", CONCEPT_MAPS, ids=lambda p: p.stem)
def test_concept_map_is_valid_r4(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    get_fhir_model_class("ConceptMap").model_validate(data)
    assert data["id"] == path.stem, "the file is named after the ConceptMap id the YAML maps use"
    table = path.stem.split("-")[1]
    for group in data["group"]:
        assert group["source"] == f"{V2}{table}", "every group maps from the v2 table the file is named for"


def test_every_concept_map_has_a_behaviour_test() -> None:
    assert sorted(BEHAVIOUR) == [p.stem for p in CONCEPT_MAPS]


@pytest.mark.parametrize("map_id", sorted(BEHAVIOUR))
def test_vocabulary_maps_and_keeps_unmapped_codes_as_v2(maps: t.Mappings, map_id: str) -> None:
    code, system, target, unmapped = BEHAVIOUR[map_id]
    vocabulary = maps.vocabularies[map_id]
    table = map_id.split("-")[1]

    codings = vocabulary.translate(code)
    assert codings[0]["system"] == system and codings[0]["code"] == target
    assert codings[-1] == {"system": f"{V2}{table}", "code": code}, "the v2 code is kept after the mapped one"
    assert vocabulary.code(code, system) == target

    assert vocabulary.translate(unmapped) == [{"system": f"{V2}{table}", "code": unmapped}]
    assert vocabulary.code(unmapped) is None


def test_vocabulary_with_two_targets_answers_per_target(maps: t.Mappings) -> None:
    equipment = maps.vocabularies["v2-0202-telecom-equipment"]
    assert equipment.code("CP", "http://hl7.org/fhir/contact-point-system") == "phone"
    assert equipment.code("CP", "http://hl7.org/fhir/contact-point-use") == "mobile"
    assert equipment.code("FX", "http://hl7.org/fhir/contact-point-use") is None
    filler = maps.vocabularies["v2-0278-filler-status"]
    assert filler.code("Cancelled", "http://hl7.org/fhir/participationstatus") == "declined"


def test_coding_system_table_knows_names_and_hl7_tables(maps: t.Mappings) -> None:
    systems = maps.tables["coding-systems"]
    assert systems.get("LN") == "http://loinc.org"
    assert systems.get("sct") == "http://snomed.info/sct"
    assert systems.get("HL70078") == f"{V2}0078"
    assert systems.get("99LOCAL") is None


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(MAPPINGS)))
def test_yaml_file_loads(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and data


def _rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rule, nested groups included."""
    found = []
    for rule in rules or []:
        found.append(rule)
        found += _rules(rule.get("rules", []))
    return found


def _check_rules(maps: t.Mappings, rules: list[dict[str, Any]], where: str) -> None:
    for rule in _rules(rules):
        assert "target" in rule, f"{where}: rule without target {rule}"
        kind = rule.get("type")
        if kind is not None:
            assert kind in maps.datatypes or kind in V2_TYPES, f"{where}: unknown datatype {kind}"
        if "fhir" in rule:
            assert rule["fhir"] in FHIR_TYPES, f"{where}: unknown FHIR type {rule['fhir']}"
        if "vocabulary" in rule:
            vocabulary = maps.vocabularies.get(rule["vocabulary"])
            assert vocabulary is not None, f"{where}: unknown vocabulary {rule['vocabulary']}"
            if "vocabulary_target" in rule:
                assert rule["vocabulary_target"] in vocabulary.targets, f"{where}: {rule['vocabulary_target']}"
        for key in ("table", "units"):
            if key in rule:
                assert rule[key] in maps.tables, f"{where}: unknown table {rule[key]}"
        if "compute" in rule:
            assert rule["compute"] in t.COMPUTE, f"{where}: unknown computation {rule['compute']}"
        for key in ("units_type", "spec"):
            if key in rule:
                assert rule[key] in maps.datatypes, f"{where}: unknown datatype {rule[key]}"
        for spec in (rule.get("types") or {}).values():
            assert "type" not in spec or spec["type"] in maps.datatypes, f"{where}: {spec}"
        t._parse_target(rule["target"]) if rule["target"] != "." else None


def test_datatype_maps_reference_what_exists(maps: t.Mappings) -> None:
    for name, spec in maps.datatypes.items():
        if "same_as" in spec:
            assert spec["same_as"] in maps.datatypes
            continue
        for variant in [spec, *spec.get("variants", [])]:
            _check_rules(maps, variant.get("rules", []), f"datatype {name}")
        if "creates" in spec:
            get_fhir_model_class(spec["creates"]["resource"])
            _check_rules(maps, spec["creates"]["rules"], f"datatype {name} creates")


def test_segment_maps_reference_what_exists(maps: t.Mappings) -> None:
    for name, spec in maps.segments.items():
        if "resource" in spec:
            get_fhir_model_class(spec["resource"])
        _check_rules(maps, spec.get("rules", []), f"segment map {name}")
        for alternative in spec.get("id", []):
            parts = alternative["parts"] if isinstance(alternative, dict) else alternative
            assert isinstance(parts, list) and parts, f"{name}: id alternatives are lists of parts"


def _entries(message_map: dict[str, Any]) -> list[dict[str, Any]]:
    entries = []
    for spec in message_map["segments"].values():
        for entry in spec if isinstance(spec, list) else [spec]:
            entries.append(entry)
            entries += entry.get("also", [])
    return entries


def test_message_maps_reference_what_exists(maps: t.Mappings) -> None:
    for message_map in maps.messages:
        for entry in _entries(message_map):
            if "map" in entry:
                assert entry["map"] in maps.segments, f"{message_map['message']}: unknown map {entry['map']}"
            for key in ("into", "merge"):
                if key in entry:
                    get_fhir_model_class(entry[key])
            for resource_type in entry.get("attach", {}):
                get_fhir_model_class(resource_type)
            for link in entry.get("links", []):
                other = link.get("to", link.get("of"))
                assert other == "@owner" or get_fhir_model_class(other), link
        for spec in (message_map.get("events") or {}).values():
            for resource_type in (spec or {}).get("set", {}):
                get_fhir_model_class(resource_type)


def test_supported_lists_every_event_once() -> None:
    events = t.supported()
    assert len(events) == len(set(events))
    assert set(events) == {
        "ADT^A01", "ADT^A04", "ADT^A08", "ADT^A28", "ADT^A31", "ADT^A40", "ORU^R01",
        "SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S26", "RDE^O11", "OMP^O09", "MDM^T02",
    }
