"""The access policy's two evaluations of one grant agree: SQL (searches) and in hand (reads, writes).

For several principals built straight from token data, every resource of the demo family is judged
by the restriction in SQL and by access.visible over its stored JSON; the answers must be equal.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from gateway import access, db
from gateway.fhir.bundles import BundleProcessor, import_file
from gateway.fhir.outcome import FhirError
from tests.smart_auth.conftest import FIXTURES, keep_current, load_family

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
PROXY_OF_TEEN = {"maria-garcia": False, "sofia-garcia": False, "daniel-garcia": True}
PRINCIPALS = {
    "patient-self": dict(scope="patient/*.rs", patient_id="maria-garcia", acting_for=PROXY_OF_TEEN),
    "teen-proxy": dict(scope="patient/*.rs", patient_id="daniel-garcia", acting_for=PROXY_OF_TEEN),
    "user": dict(scope="user/*.rs fhirUser", patient_id=None, acting_for=PROXY_OF_TEEN),
    "granular": dict(scope=f"patient/Observation.rs?category={LAB} patient/Patient.rs fhirUser",
                     patient_id="maria-garcia", acting_for=PROXY_OF_TEEN),
    "types": dict(scope="patient/Condition.rs patient/Practitioner.rs", patient_id="sofia-garcia",
                  acting_for=PROXY_OF_TEEN),
    "system-granular": dict(scope=f"system/Observation.rs?category={LAB}", patient_id=None, acting_for=None,
                            backend=True),
}


@pytest.mark.parametrize("name", list(PRINCIPALS))
def test_sql_and_in_hand_decisions_agree(name: str, app: Any) -> None:
    services = app.extensions["gateway"]
    load_family(services.store)
    import_file(BundleProcessor(services.store), str(FIXTURES / "05-schedules.json"),
                adjust=keep_current)
    with services.store.writing() as repo:  # a patient's own Schedule is that patient's
        repo.create({"resourceType": "Schedule", "id": "own", "actor": [{"reference": "Patient/robert-chen"}]})
    principal = access.principal_from_token(client_id="app", fhir_user="Patient/maria-garcia", **PRINCIPALS[name])
    assert principal is not None
    grant = access.authorize(principal, "read", "Observation") if name != "types" else \
        access.authorize(principal, "read", "Condition")
    assert grant.restrict is not None
    r = db.resource.c
    with services.engine.connect() as conn:
        rows = conn.execute(select(r.pk, r.resource_type, r.id, r.content)).all()
        allowed = set(conn.execute(select(r.pk).where(grant.restrict(r.pk))).scalars())
    assert len(rows) > 350
    disagree = [(row.resource_type, row.id) for row in rows
                if access.visible(grant, row.resource_type, row.id, row.content, services.settings.fhir_base)
                != (row.pk in allowed)]
    assert disagree == []
    assert 0 < len(allowed) < len(rows)


def test_teen_proxy_rule_hides_exactly_the_labelled_records(app: Any) -> None:
    services = app.extensions["gateway"]
    load_family(services.store)
    principal = access.principal_from_token(client_id="app", fhir_user=None, **PRINCIPALS["teen-proxy"])
    grant = access.authorize(principal, "search", "Observation")  # type: ignore[arg-type]
    r = db.resource.c
    with services.engine.connect() as conn:
        seen = set(conn.execute(select(r.id).where(grant.restrict(r.pk), r.id.like("daniel-garcia%"))).scalars())
        every = set(conn.execute(select(r.id).where(r.id.like("daniel-garcia%"))).scalars())
    hidden = every - seen
    assert len(hidden) == 14  # fixtures/README.md: 14 confidential resources in Daniel's record
    assert "daniel-garcia-cond-depressive-disorder" in hidden and "daniel-garcia" in seen


def test_a_dead_patient_context_makes_no_principal() -> None:
    assert access.principal_from_token(client_id="app", scope="patient/*.rs", patient_id="robert-chen",
                                       fhir_user="Patient/linda-chen", acting_for={"linda-chen": False}) is None


def test_user_scopes_never_reach_backend_rules_and_vice_versa() -> None:
    user = access.principal_from_token(client_id="app", scope="system/*.cruds user/Observation.rs",
                                       patient_id=None, fhir_user="Patient/linda-chen",
                                       acting_for={"linda-chen": False})
    assert user is not None and user.patients == frozenset({"linda-chen"})
    with pytest.raises(FhirError):
        access.authorize(user, "create", "Observation")
    backend = access.principal_from_token(client_id="ehr", scope="patient/*.cruds system/Patient.rs",
                                          patient_id=None, fhir_user=None, acting_for=None, backend=True)
    assert backend is not None
    with pytest.raises(FhirError):
        access.authorize(backend, "read", "Observation")
    grant = access.authorize(backend, "read", "Patient")
    assert access.visible(grant, "Patient", "x", {"resourceType": "Patient", "id": "x"})
    # An _include of another type under a Patient-only scope is filtered out.
    assert not access.visible(grant, "Observation", "y", {"resourceType": "Observation", "id": "y"})


def test_configured_sensitive_labels_hide_more_from_teen_proxies(app: Any) -> None:
    """GATEWAY_SENSITIVE_LABELS adds sensitivity categories to R and V, for searches and reads alike."""
    services = app.extensions["gateway"]
    load_family(services.store)
    psy = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
    with services.store.writing() as repo:
        note = {"resourceType": "Observation", "id": "daniel-garcia-psy-note", "status": "final",
                "meta": {"security": [psy]}, "code": {"text": "Counselling note"},
                "subject": {"reference": "Patient/daniel-garcia"}}
        repo.update("Observation", note["id"], note)
    principal = access.principal_from_token(client_id="app", fhir_user=None, **PRINCIPALS["teen-proxy"])
    r = db.resource.c

    def seen_by_the_proxy() -> tuple[bool, bool]:
        grant = access.authorize(principal, "search", "Observation")  # type: ignore[arg-type]
        with services.engine.connect() as conn:
            row = conn.execute(select(r.pk, r.content).where(r.id == "daniel-garcia-psy-note")).one()
            in_search = conn.execute(select(r.pk).where(r.pk == row.pk, grant.restrict(r.pk))).first() is not None
        readable = access.visible(grant, "Observation", "daniel-garcia-psy-note", row.content,
                                  services.settings.fhir_base)
        return in_search, readable

    try:
        assert seen_by_the_proxy() == (True, True)  # PSY is not confidential by default
        access.configure_sensitive_labels(f"{psy['system']}|PSY {psy['system']}|ETH")
        assert seen_by_the_proxy() == (False, False)
    finally:
        access.configure_sensitive_labels("")
    with pytest.raises(ValueError):
        access.configure_sensitive_labels("PSY")  # a code without its system
    assert access.configure_sensitive_labels("") == access.ALWAYS_CONFIDENTIAL


def test_a_clinicians_schedule_is_readable_by_every_patient_but_a_patients_is_not(app: Any) -> None:
    services = app.extensions["gateway"]
    load_family(services.store)
    import_file(BundleProcessor(services.store), str(FIXTURES / "05-schedules.json"),
                adjust=keep_current)
    with services.store.writing() as repo:
        repo.create({"resourceType": "Schedule", "actor": [{"reference": "Patient/robert-chen"}]})
    principal = access.principal_from_token(client_id="app", fhir_user="Patient/maria-garcia",
                                            scope="patient/*.rs", patient_id="maria-garcia",
                                            acting_for={"maria-garcia": False})
    grant = access.authorize(principal, "search", "Schedule")
    r = db.resource.c
    with services.engine.connect() as conn:
        rows = conn.execute(select(r.pk, r.id, r.content).where(r.resource_type == "Schedule")).all()
        allowed = set(conn.execute(select(r.pk).where(r.resource_type == "Schedule", grant.restrict(r.pk))).scalars())
    visible = {row.pk for row in rows if access.visible(grant, "Schedule", row.id, row.content)}
    clinic = {row.pk for row in rows if "Patient/" not in row.content}
    assert len(clinic) == 2 and len(rows) == 3
    assert allowed == visible == clinic
