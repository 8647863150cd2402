"""_summary and _elements: the views of a resource that make the server parse what it serves."""

from __future__ import annotations

from functools import cache
from typing import Any

from gateway.fhir import jsonio
from gateway.fhir.validate import model_class

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
ALWAYS = {"resourceType", "id", "meta"}


@cache
def _element_flags(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary element names, mandatory element names) from the R4B model's field metadata."""
    model = model_class(resource_type)
    summary, required = set(), set()
    if model is None:
        return frozenset(), frozenset()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        alias = info.alias or name
        if alias.startswith("_") or alias == "fhir_comments":
            continue
        if extra.get("summary_element_property"):
            summary.add(alias)
        if extra.get("element_required") or info.is_required():
            required.add(alias)
    return frozenset(summary), frozenset(required)


def _keep(resource: dict[str, Any], names: set[str]) -> dict[str, Any]:
    kept = {}
    for key, value in resource.items():
        base = key
        if key not in names:
            # choice elements: valueQuantity is kept when value[x] is
            base = next((n for n in names if key.startswith(n) and key[len(n):][:1].isupper()), key)
        if key in ALWAYS or base in names:
            kept[key] = value
    return kept


def _mark_subsetted(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    resource["meta"] = meta
    return resource


def apply_view(content: str, summary: str | None, elements: list[str] | None) -> str:
    if summary in (None, "false") and not elements:
        return content
    resource = jsonio.loads(content)
    summary_names, required = _element_flags(resource.get("resourceType", ""))
    if summary == "true":
        resource = _keep(resource, set(summary_names) | set(required))
    elif summary == "text":
        resource = _keep(resource, {"text"} | set(required))
    elif summary == "data":
        resource.pop("text", None)
    if elements:
        resource = _keep(resource, {e.split(".")[-1] for e in elements} | set(required))
    return jsonio.dumps(_mark_subsetted(resource))
