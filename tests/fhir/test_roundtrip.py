"""Every official R4 example of a served type survives create and read unchanged (but id and meta)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.fhir import jsonio

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "r4-examples"
SERVED = {
    "Patient", "Appointment", "Observation", "MedicationRequest", "Communication", "Practitioner",
    "PractitionerRole", "Organization", "Location", "RelatedPerson", "Person", "Consent", "Slot", "Schedule",
    "Encounter", "DiagnosticReport", "DocumentReference", "AuditEvent", "Task",
}


def _examples() -> list[Path]:
    if not EXAMPLES.is_dir():
        return []
    out = []
    for path in sorted(EXAMPLES.glob("*.json")):
        with open(path, encoding="utf-8") as fh:
            if json.load(fh).get("resourceType") in SERVED:
                out.append(path)
    return out


EXAMPLE_FILES = _examples()


def _strip(resource: dict) -> dict:
    resource = dict(resource)
    resource.pop("id", None)
    meta = dict(resource.pop("meta", {}) or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        resource["meta"] = meta
    return resource


@pytest.mark.skipif(not EXAMPLE_FILES, reason="../shared/corpus is not beside the checkout")
def test_examples_found() -> None:
    assert len(EXAMPLE_FILES) >= 200


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_create_then_read_returns_same_content(client, path: Path) -> None:
    raw = path.read_text(encoding="utf-8")
    original = jsonio.loads(raw)
    response = client.post(f"/fhir/{original['resourceType']}", data=raw,
                           headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 201, response.get_data(as_text=True)[:500]
    location = response.headers["Location"]
    read = client.get(location.split("/_history")[0].replace("http://testserver", ""))
    assert read.status_code == 200
    served = jsonio.loads(read.get_data())
    assert served["meta"]["versionId"] == "1"
    # Exact comparison with Decimal: 1.50 stays 1.50, not 1.5.
    assert _strip(served) == _strip(original)
