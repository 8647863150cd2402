"""Signing in starts a background sync from the EHR of the user's records and those they act for."""

from __future__ import annotations

from typing import Any

from tests.smart_auth.conftest import PASSWORD, FlaskHttp, csrf


def _sign_in(http: Any, username: str) -> Any:
    page = http.get("/auth/login").text
    return http.post("/auth/login", {"csrf_token": csrf(page), "username": username, "password": PASSWORD})


def test_sign_in_syncs_the_user_and_the_people_they_act_for(app: Any, world: Any, http: Any,
                                                           monkeypatch: Any) -> None:
    from gateway.upstream import sync

    started: list[tuple[str, float]] = []
    monkeypatch.setattr(sync, "sync_patient_async",
                        lambda store, client, patient_id, deadline, audit=None: started.append((patient_id, deadline)))
    settings = app.extensions["gateway"].settings
    settings.upstream_fhir_url = "https://ehr.example/fhir"
    settings.upstream_bearer_token = "ehr-token"
    settings.upstream_login_sync_seconds = 7.5
    assert _sign_in(http, "maria").status == 302
    assert sorted(started) == [("daniel-garcia", 7.5), ("maria-garcia", 7.5), ("sofia-garcia", 7.5)]


def test_no_upstream_no_sync_and_a_failing_sync_never_fails_the_sign_in(app: Any, world: Any, http: Any,
                                                                      monkeypatch: Any) -> None:
    from gateway.upstream import sync

    calls: list[str] = []

    def broken(store: Any, client: Any, patient_id: str, deadline: float, audit: Any = None) -> None:
        calls.append(patient_id)
        raise RuntimeError("the EHR is down")

    monkeypatch.setattr(sync, "sync_patient_async", broken)
    assert _sign_in(http, "maria").status == 302
    assert calls == []  # no GATEWAY_UPSTREAM_FHIR_URL: nothing to sync with
    settings = app.extensions["gateway"].settings
    settings.upstream_fhir_url = "https://ehr.example/fhir"
    settings.upstream_bearer_token = "ehr-token"
    assert _sign_in(FlaskHttp(app.test_client()), "maria").status == 302
    assert calls == ["maria-garcia"]  # the first one raised; the sign-in went on regardless
