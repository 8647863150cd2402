"""The compiled search-parameter extractors against fhirpathpy, the reference FHIRPath engine.

Every parameter of every served type is evaluated on the official R4 examples by both. fhirpathpy
has no resolve(), so `.where(resolve() is T)` is evaluated as a plain path and filtered on the
reference's type here; and it refuses `as` on a collection, where the search definitions mean a
per-item filter, so such members are evaluated as ofType().
"""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

fhirpathpy = pytest.importorskip("fhirpathpy")
from fhirpathpy.models import models  # noqa: E402

from gateway.fhir.searchparams import _split_top, params_for, reference_type, registry  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "r4-examples"
SERVED = [
    "Patient", "Appointment", "Observation", "MedicationRequest", "Communication", "Practitioner",
    "PractitionerRole", "Organization", "Location", "RelatedPerson", "Person", "Consent", "Slot", "Schedule",
    "Encounter", "DiagnosticReport", "DocumentReference", "AuditEvent", "Task",
]
RESOLVE = re.compile(r"\.where\(resolve\(\) is (\w+)\)")


def _plain(value: object) -> object:
    """Numbers as floats on both sides (fhirpathpy hands decimals back as Decimal)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return float(value)
    return value


def _canonical(values: list) -> Counter:
    return Counter(json.dumps(_plain(v), sort_keys=True, default=str) for v in values)


def _reference(resource: dict, expression: str, resource_type: str) -> list:
    model = models["r4"]
    out: list = []
    if re.fullmatch(r"([\w.]+)\.exists\(\) and \1 != false", expression):
        return fhirpathpy.evaluate(resource, expression, model=model)
    for member in _split_top(expression, "|"):
        stripped = member.strip().strip("()") if member.strip().startswith("(") else member.strip()
        if not (stripped.startswith(resource_type + ".") or stripped.startswith("Resource.")):
            continue
        if stripped.startswith("Resource."):
            member = member.replace("Resource.", resource_type + ".", 1)
        wanted = RESOLVE.search(member)
        path = RESOLVE.sub("", member)
        try:
            found = fhirpathpy.evaluate(resource, path, model=model)
        except Exception:
            path = re.sub(r"\(?([\w.]+) as (\w+)\)?", r"\1.ofType(\2)", path)
            found = fhirpathpy.evaluate(resource, path, model=model)
        if wanted:
            found = [f for f in found if reference_type(f) == wanted.group(1)]
        out += found
    return out


def _examples() -> list[tuple[str, Path]]:
    if not EXAMPLES.is_dir():
        return []
    cases = []
    for path in sorted(EXAMPLES.glob("*.json")):
        rtype = json.loads(path.read_text(encoding="utf-8")).get("resourceType")
        if rtype in SERVED:
            cases.append((rtype, path))
    return cases


CASES = _examples()


@pytest.mark.skipif(not CASES, reason="../shared/corpus is not beside the checkout")
@pytest.mark.parametrize(("rtype", "path"), CASES, ids=[p.stem for _, p in CASES])
def test_extractors_agree_with_fhirpathpy(rtype: str, path: Path) -> None:
    resource = json.loads(path.read_text(encoding="utf-8"))
    checked = 0
    for code, param in params_for(rtype).items():
        if param.type == "composite":
            continue
        ours = [value for value, _ in param.extract(resource)]
        reference = _reference(resource, param.expression, rtype)
        assert _canonical(ours) == _canonical(reference), f"{rtype}.{code}: {param.expression}"
        checked += 1
    assert checked > 0


def test_every_served_type_has_its_standard_parameters() -> None:
    for rtype in SERVED:
        params = registry()[rtype]
        assert {"_id", "_lastUpdated", "_tag", "_security", "_profile"} <= set(params)
    assert {"patient", "code", "date", "category", "value-quantity", "component-code-value-quantity"} <= set(
        registry()["Observation"])
    assert {"name", "family", "given", "birthdate", "identifier", "gender", "email", "phone"} <= set(
        registry()["Patient"])


def test_choice_element_list_matches_the_models() -> None:
    """The extractors look for valueX-style keys only under these names, so the list kept in
    definitions/ must be exactly the choice elements fhir.resources' R4B models declare."""
    import importlib
    import pkgutil

    import fhir.resources.R4B as r4b

    from gateway.fhir.searchparams import choice_elements

    declared: set[str] = set()
    for module_info in pkgutil.iter_modules(r4b.__path__):
        if module_info.name.startswith(("tests", "_")):
            continue
        module = importlib.import_module(f"fhir.resources.R4B.{module_info.name}")
        for value in vars(module).values():
            fields = getattr(value, "model_fields", None)
            if not isinstance(fields, dict):
                continue
            for model_field in fields.values():
                extra = model_field.json_schema_extra
                if isinstance(extra, dict) and extra.get("one_of_many"):
                    declared.add(extra["one_of_many"])
    assert set(choice_elements()) == declared


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/corpus is not beside the checkout")
def test_a_parameter_finds_nothing_without_the_elements_it_needs() -> None:
    """Indexing skips a parameter when the resource has none of the elements in `needs`: on every
    official example (contained and bundled resources too), a parameter that finds a value has one."""
    from gateway.fhir.searchparams import element_names

    resources: list[dict] = []

    def collect(value: object) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("resourceType"), str):
                resources.append(value)
            for child in value.values():
                collect(child)
        elif isinstance(value, list):
            for child in value:
                collect(child)

    for path in sorted(EXAMPLES.glob("*.json")):
        collect(json.loads(path.read_text(encoding="utf-8")))
    checked = 0
    for resource in resources:
        present = element_names(resource)
        for code, param in params_for(resource["resourceType"]).items():
            if param.needs is not None and param.extract(resource):
                assert not present.isdisjoint(param.needs), (resource["resourceType"], code, param.needs)
                checked += 1
    assert len(resources) > 500 and checked > 5000
