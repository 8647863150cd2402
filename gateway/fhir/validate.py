"""Validation of incoming resources with fhir.resources' R4B models (write path only)."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import ValidationError

from gateway.fhir.outcome import FhirError

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@cache
def model_class(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError):
        return None


# fhir.resources names an element's type in its annotation as abc.<FHIR type>Type, and imports
# that type's module the first time such an element is validated.
_ELEMENT_TYPE = re.compile(r"\babc\.(\w+)Type\b")


def load_models(resource_type: str) -> int:
    """Import now the models of this resource type and of every element type it can hold, which
    fhir.resources would import during the first validations that meet them (a request waits
    meanwhile); returns how many types are loaded. Types the annotations do not name this way are
    loaded when first met, as before."""
    seen: set[str] = set()
    pending = [resource_type]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        model = model_class(name)
        if model is None:
            continue
        for field in model.model_fields.values():
            pending.extend(_ELEMENT_TYPE.findall(str(field.annotation)))
    return len(seen)


def is_resource_type(name: str) -> bool:
    return bool(name) and name[:1].isupper() and name.isalnum() and model_class(name) is not None


def _expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "__root__" or str(part).startswith("function-"):
            continue
        else:
            path += f".{part}"
    return path


def validate(resource: Any) -> None:
    """Raise FhirError 422 naming the element at fault, or 400 when it is no resource at all."""
    if not isinstance(resource, dict):
        raise FhirError(400, "The body is not a JSON object", code="structure")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not is_resource_type(resource_type):
        raise FhirError(400, f"Unknown resourceType {resource_type!r}", code="structure",
                        expression=["resourceType"])
    if "id" in resource and (not isinstance(resource["id"], str) or not ID_RE.match(resource["id"])):
        raise FhirError(422, "id must be 1-64 characters of A-Z a-z 0-9 - .", code="value",
                        expression=[f"{resource_type}.id"])
    try:
        model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        issues = []
        for err in exc.errors()[:20]:
            expression = _expression(resource_type, tuple(err.get("loc", ())))
            issues.append({
                "severity": "error",
                "code": "required" if err.get("type") == "missing" else "value",
                "diagnostics": f"{expression}: {err.get('msg')}",
                "expression": [expression],
            })
        outcome = {"resourceType": "OperationOutcome", "issue": issues}
        raise FhirError(422, issues[0]["diagnostics"], outcome=outcome) from None
    except (ValueError, TypeError) as exc:
        raise FhirError(422, f"{resource_type}: {exc}", code="value", expression=[resource_type]) from None
