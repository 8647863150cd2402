"""The FHIR record of a proxy relationship: the proxy as a RelatedPerson, the grant as a Consent,
and the login as a Person linking its own Patient to the RelatedPerson of each relationship.

The access policy reads the proxy_grant table (fast, and it ends by date on its own); these
resources make the same relationship visible in the record, to the EHR and to FHIR clients.
A RelatedPerson the proxy's own Patient already links to (Patient.link) is reused. The Person is
written when a relationship is granted or ended and when the login authorizes an app with it as
fhirUser (launch.fhir_user_for), so its links also catch up with relationships that ended by date.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from gateway.fhir.outcome import FhirError
from gateway.smart_auth import people
from gateway.smart_auth.people import User

ROLE_CODES = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


def _read(repo: Any, resource_type: str, resource_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(repo.read(resource_type, resource_id).content or "{}")
    except FhirError:
        return None


def linked_related_person(repo: Any, user: User, patient_id: str) -> str | None:
    """The RelatedPerson for `patient_id` that the user's own Patient links to, if any."""
    own = _read(repo, "Patient", user.patient_id) if user.patient_id else None
    for link in (own or {}).get("link") or []:
        kind, _, rid = ((link.get("other") or {}).get("reference") or "").partition("/")
        related = _read(repo, "RelatedPerson", rid) if kind == "RelatedPerson" and rid else None
        if related and (related.get("patient") or {}).get("reference") == f"Patient/{patient_id}":
            return rid
    return None


def record_proxy(store: Any, user: User, patient_id: str, relationship: str, valid_from: str,
                 valid_until: str | None) -> tuple[str, str]:
    """Write (or reuse) the RelatedPerson and write an active Consent; returns both ids."""
    consent_id = f"proxy-{secrets.token_hex(8)}"

    def write(repo: Any) -> str:
        related_id = linked_related_person(repo, user, patient_id)
        if related_id is None:
            related_id = f"proxy-{user.id}-{patient_id}"[:64]
            own = (_read(repo, "Patient", user.patient_id) if user.patient_id else None) or {}
            related: dict[str, Any] = {
                "resourceType": "RelatedPerson", "id": related_id, "active": True,
                "patient": {"reference": f"Patient/{patient_id}"},
                "relationship": [{"coding": [{"system": ROLE_CODES, "code": relationship}]}],
            }
            for key in ("name", "telecom", "gender", "birthDate"):
                if own.get(key):
                    related[key] = own[key]
            repo.update("RelatedPerson", related_id, related, None)
        period = {"start": valid_from, **({"end": valid_until} if valid_until else {})}
        repo.update("Consent", consent_id, {
            "resourceType": "Consent", "id": consent_id, "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient_id}"},
            "dateTime": datetime.now(UTC).isoformat(timespec="seconds"),
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN"}]},
            "provision": {"type": "permit", "period": period, "actor": [{
                "role": {"coding": [{"system": ROLE_CODES, "code": relationship}]},
                "reference": {"reference": f"RelatedPerson/{related_id}"}}]},
        }, None)
        return related_id

    return store.write(write), consent_id


def person_id(user: User) -> str:
    """The id of the Person that stands for a login (one per login, never reused by another)."""
    return f"login-{user.id}"


def _write_person(repo: Any, user: User) -> str:
    pid = person_id(user)
    repo.lock(f"Person/{pid}")  # two grants at once: the second rewrites after the first commits
    own = (_read(repo, "Patient", user.patient_id) if user.patient_id else None) or {}
    person: dict[str, Any] = {"resourceType": "Person", "id": pid, "active": True}
    for key in ("name", "telecom", "gender", "birthDate"):
        if own.get(key):
            person[key] = own[key]
    targets = [user.fhir_user, *(f"RelatedPerson/{rid}" for rid in people.current_proxy_records(repo.conn, user.id))]
    person["link"] = [{"target": {"reference": target}} for target in targets]
    repo.update("Person", pid, person, None)  # unchanged content writes no new version
    return pid


def record_person(store: Any, user: User) -> str:
    """Write the login's Person as its relationships stand now; returns its id."""
    return store.write(lambda repo: _write_person(repo, user))


def end_proxy_records(store: Any, user: User, consent_ids: list[str]) -> None:
    """After proxy grants ended: their Consents inactive, and the login's Person without their links."""
    def write(repo: Any) -> None:
        for consent_id in consent_ids:
            consent = _read(repo, "Consent", consent_id)
            if consent and consent.get("status") == "active":
                repo.update("Consent", consent_id, {**consent, "status": "inactive"}, None)
        if consent_ids or repo.find("Person", person_id(user)) is not None:
            _write_person(repo, user)

    store.write(write)
