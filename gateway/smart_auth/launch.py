"""Launch context: which patient an authorization is for, and what the consent page offers.

EHR launch: the `launch` parameter names a context made by `gateway launch` (patient, encounter,
optionally the user it is meant for). Standalone launch: an app asking for launch/patient or for
patient/ scopes gets the patient picker, listing the records the login may act for now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.smart_auth import people, proxies
from gateway.smart_auth.scopes import ResourceScope, is_within, narrowing_options, parse_scope, parse_scopes


class LaunchError(Exception):
    """The launch cannot go on for this user (access_denied to the app)."""


@dataclass(frozen=True)
class PatientContext:
    patient_id: str | None
    encounter_id: str | None
    # When the user must choose: (patient id, label) pairs for the picker.
    choices: tuple[tuple[str, str], ...] = ()


def needs_patient(scope: str) -> bool:
    parsed = parse_scopes(scope)
    return parsed.has("launch/patient") or any(s.context == "patient" for s in parsed.resources)


def patient_context(smart: Any, store: Any, args: dict[str, str], scope: str, user: people.User,
                    chosen: str | None) -> PatientContext:
    with smart.engine.connect() as conn:
        acting = people.acting_for(conn, user.id)
    launch_id = args.get("launch")
    if launch_id:
        launch = smart.launch_for(launch_id, args.get("client_id"))
        if launch is None:
            raise LaunchError("The launch has expired")
        if launch.user_id is not None and launch.user_id != user.id:
            raise LaunchError("This launch was made for another user")
        if launch.patient_id not in acting:
            raise LaunchError("You may not act for the patient of this launch")
        return PatientContext(launch.patient_id, launch.encounter_id)
    if not needs_patient(scope):
        return PatientContext(None, None)
    if chosen is not None:
        if chosen not in acting:
            raise LaunchError("You may not act for that patient")
        return PatientContext(chosen, None)
    if len(acting) == 1:
        return PatientContext(next(iter(acting)), None)
    choices = tuple((pid, _label(store, pid, pid == user.patient_id)) for pid in sorted(
        acting, key=lambda p: (p != user.patient_id, p)))
    return PatientContext(None, None, choices)


def _label(store: Any, patient_id: str, is_self: bool) -> str:
    name = patient_id
    try:
        with store.reading() as repo:
            resource = json.loads(repo.read("Patient", patient_id).content or "{}")
        names = resource.get("name") or []
        if names:
            first = names[0]
            name = " ".join([*first.get("given", []), first.get("family", "")]).strip() or patient_id
    except Exception:  # a record not in the store yet still gets a label
        pass
    return f"{name} (you)" if is_self else name


def fhir_user_for(smart: Any, store: Any, user: people.User, patient_id: str | None) -> str:
    """Who the user is, as a FHIR resource, in an authorization for `patient_id` (None: no patient).

    SMART allows Patient, RelatedPerson or Person for a patient-facing user, Person "only if the
    other resource types do not apply, for example the authorized representative for >1 patients":
    - the user's own Patient when acting for themselves, or when they act for no one else;
    - the RelatedPerson of the relationship when acting for another patient and that patient is the
      only one they act for besides themselves (the one the user's own Patient links to, as the
      demo data records a parent, else the one written when the grant was made);
    - their Person (written or brought up to date here) when they act for several other patients,
      or when the authorization has no single patient while they may act for others too.
    """
    if patient_id is not None and patient_id == user.patient_id:
        return user.fhir_user
    with smart.engine.connect() as conn:
        others = set(people.acting_for(conn, user.id)) - {user.patient_id}
    if not others:
        return user.fhir_user
    if patient_id is not None and others == {patient_id}:
        role = acting_as(smart, store, user, patient_id)
        if role != user.fhir_user:
            return role
    return f"Person/{proxies.record_person(store, user)}"


def acting_as(smart: Any, store: Any, user: people.User, patient_id: str) -> str:
    """The user's role in one patient's record, for what they write there (a message's sender, a
    request's requester): their own Patient, else the RelatedPerson of their relationship with the
    patient (the one their Patient links to, else the one written at the grant); without either,
    their Patient. Unlike fhir_user_for, never the Person: a message is written by a mother, not by
    the login that stands for several people."""
    if patient_id == user.patient_id:
        return user.fhir_user
    with store.reading() as repo:
        related = proxies.linked_related_person(repo, user, patient_id)
    if related is None:
        with smart.engine.connect() as conn:
            related = people.proxy_record(conn, user.id, patient_id)
    return f"RelatedPerson/{related}" if related else user.fhir_user


def consent_options(scope: str) -> list[str]:
    """The checkboxes of the consent page: each scope granted to the app, then narrower variants."""
    options = list(dict.fromkeys(scope.split()))
    for text in list(options):
        parsed = parse_scope(text)
        if isinstance(parsed, ResourceScope):
            options += [o for o in narrowing_options(parsed) if o not in options]
    return options


def granted_scopes(ticked: list[str], allowed_scope: str) -> str:
    """Exactly what the user ticked, provided each is what the app asked for or narrower."""
    requested = allowed_scope.split()
    return " ".join(s for s in dict.fromkeys(ticked) if is_within(s, requested))
