"""The CapabilityStatement (/metadata), generated from what the server really supports."""

from __future__ import annotations

from functools import cache
from typing import Any

from gateway.config import Settings
from gateway.fhir.search import MODIFIERS
from gateway.fhir.searchparams import UNSUPPORTED, registry
from gateway.fhir.validate import is_resource_type
from gateway.smart_auth.discovery import security

INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type",
                "create", "search-type"]
VERSION = "0.1.0"


def supported_types() -> list[str]:
    return sorted(t for t in registry() if t != "*" and is_resource_type(t))


@cache
def _resources() -> tuple[dict[str, Any], ...]:
    out = []
    for rtype in supported_types():
        params = registry()[rtype]
        search_params = [
            {"name": code, "type": p.type, "definition": f"http://hl7.org/fhir/SearchParameter/{rtype}-{code}"
             if not code.startswith("_") else f"http://hl7.org/fhir/SearchParameter/Resource{code.replace('_', '-')}"}
            for code, p in sorted(params.items())
        ]
        references = sorted(code for code, p in params.items() if p.type == "reference")
        resource: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": c} for c in INTERACTIONS],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "modified-since",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "searchInclude": ["*"] + [f"{rtype}:{c}" for c in references],
            "searchParam": search_params,
        }
        if rtype == "Patient":
            resource["operation"] = [{"name": "everything",
                                      "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]
        out.append(resource)
    return tuple(out)


def capability_statement(settings: Settings) -> dict[str, Any]:
    modifiers = ", ".join(f"{t}: {' '.join(sorted(m))}" for t, m in sorted(MODIFIERS.items()))
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "FHIR gateway",
        "kind": "instance",
        "software": {"name": "FHIR gateway", "version": VERSION},
        "implementation": {"description": "FHIR R4 gateway", "url": settings.fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "security": security(settings),
            "documentation": (
                "Search: every parameter type with the modifiers " + modifiers + "; date and number prefixes "
                "eq ne gt lt ge le sa eb ap; _sort, _count (keyset paging), _total, _summary, _elements, "
                "_include and _revinclude (:iterate). Not supported: chained parameters, _has, _text, "
                "_content, Location near, " + ", ".join(UNSUPPORTED) + "."
            ),
            "resource": list(_resources()),
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [{"name": "everything",
                           "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}],
        }],
    }
