"""The real SMART client, fhirclient, against the gateway over HTTP: launch, read, refresh, revocation."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from fhirclient import client
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRPermissionDeniedException, FHIRUnauthorizedException

from gateway.smart_auth.admin import launch_url
from tests.smart_auth.conftest import REDIRECT, RequestsHttp, run_launch

pytestmark = pytest.mark.slow


def _client(base: str, client_id: str = "public-app", **extra: Any) -> client.FHIRClient:
    settings = {"app_id": client_id, "api_base": base + "/fhir", "redirect_uri": REDIRECT,
                "scope": "patient/*.rs openid fhirUser offline_access", **extra}
    return client.FHIRClient(settings=settings)


def test_standalone_launch_read_refresh_and_revocation(live_world: Any) -> None:
    base, _ = live_world
    smart = _client(base)
    url = smart.authorize_url
    assert url.startswith(base + "/auth/authorize?") and "code_challenge=" in url
    launch = run_launch(RequestsHttp(base), url, "", "maria", patient="Patient/sofia-garcia")
    smart.handle_callback(launch.location)
    assert smart.ready and smart.patient_id == "sofia-garcia"
    patient = smart.patient
    assert patient is not None and patient.birthDate.isostring == "2018-02-14"
    found = list(Observation.where(struct={"patient": "sofia-garcia", "category": "laboratory"})
                 .perform_resources_iter(smart.server))
    assert found and all(o.subject.reference == "Patient/sofia-garcia" for o in found)
    with pytest.raises(FHIRPermissionDeniedException):
        Patient.read("robert-chen", smart.server)  # the token's patient is Sofia

    old_access, old_refresh = smart.server.auth.access_token, smart.server.auth.refresh_token
    assert smart.reauthorize()
    assert smart.server.auth.access_token != old_access and smart.server.auth.refresh_token != old_refresh
    assert smart.launch_context["patient"] == "sofia-garcia"
    assert Patient.read("sofia-garcia", smart.server).id == "sofia-garcia"

    revoked = requests.post(base + "/auth/revoke", data={"token": smart.server.auth.access_token,
                                                         "client_id": "public-app"}, timeout=10)
    assert revoked.status_code == 200
    with pytest.raises(FHIRUnauthorizedException):
        Patient.read("sofia-garcia", smart.server)
    with pytest.raises(requests.HTTPError):
        smart.reauthorize()  # the refresh token went with the revoked authorization


def test_ehr_launch_with_a_confidential_client(live_world: Any) -> None:
    base, world = live_world
    made = launch_url(world.smart, "secret-app", "Patient/daniel-garcia", "maria")
    assert made["launch_url"].startswith(REDIRECT)
    smart = _client(base, "secret-app", app_secret="s3cret-value", launch_token=made["launch"])
    launch = run_launch(RequestsHttp(base), smart.authorize_url, "", "maria")
    smart.handle_callback(launch.location)  # HTTP Basic plus client_id in the body
    assert smart.patient_id == "daniel-garcia"
    assert smart.patient.id == "daniel-garcia"
    assert smart.reauthorize()
    assert smart.patient_id == "daniel-garcia"
