"""OperationOutcome and the one exception type FHIR services raise."""

from __future__ import annotations

from typing import Any


def operation_outcome(
    severity: str, code: str, diagnostics: str, expression: list[str] | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FhirError(Exception):
    """An error a FHIR client should see as an OperationOutcome with this HTTP status."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        code: str = "processing",
        expression: list[str] | None = None,
        outcome: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.outcome = outcome or operation_outcome("error", code, diagnostics, expression)
        self.headers = headers or {}


def not_found(resource_type: str, resource_id: str) -> FhirError:
    return FhirError(404, f"{resource_type}/{resource_id} is not known", code="not-found")


def gone(resource_type: str, resource_id: str) -> FhirError:
    return FhirError(410, f"{resource_type}/{resource_id} has been deleted", code="deleted")
