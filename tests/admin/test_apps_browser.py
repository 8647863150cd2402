"""Browser journey (SQLite pass): a security officer signs in with password and TOTP, registers an app,
revokes an app's grant on the apps page, and the app's next FHIR request with its token is refused;
the revocation is then found in the audit log. A screenshot (and axe-core check) of every page."""

from __future__ import annotations

from typing import Any

import pyotp
import requests

from tests.admin.conftest import STAFF_PASSWORD, new_staff
from tests.portal.conftest import shot
from tests.smart_auth.conftest import TOTP_SECRET, RequestsHttp, authorize_params, exchange, run_launch

SOFIA = "/fhir/Patient/sofia-garcia"


def test_security_officer_revokes_an_apps_grant(browser: Any, site: tuple[str, Any], settings: Any) -> None:
    base, world = site
    page = browser
    # The app's side: Maria authorizes public-app for Sofia's record through a real launch over HTTP.
    app_http = RequestsHttp(base)
    params, verifier = authorize_params(settings.fhir_base)
    launch = run_launch(app_http, params, verifier, "maria", patient="Patient/sofia-garcia")
    token = exchange(app_http, launch).json()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert requests.get(base + SOFIA, headers=bearer, timeout=10).status_code == 200

    # The security officer signs in with password and the code from the authenticator app.
    username = new_staff(world.services.engine, "security-officer")
    page.goto("/admin/apps")
    page.fill("#login-form input[name=username]", username)
    page.fill("#login-form input[name=password]", STAFF_PASSWORD)
    page.click("#login-form button[type=submit]")
    page.fill("input[name=otp]", pyotp.TOTP(TOTP_SECRET).now())
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#apps-table")
    shot(page, "console-apps")

    # Registers a confidential app: the secret is on the page once.
    page.click("#register-app")
    page.check("#kind-confidential-symmetric")
    page.fill("#client_id", "billing")
    page.fill("#name", "Billing")
    page.fill("#redirect_uris", "not a url")
    page.click("#register-form button[type=submit]")
    assert "not a redirect URI" in page.inner_text("#apps-error")
    shot(page, "console-apps-register-error")
    page.fill("#redirect_uris", "https://billing.example/callback")
    page.click("#register-form button[type=submit]")
    assert len(page.inner_text("#client-secret").strip()) >= 40
    shot(page, "console-apps-secret")

    # Opens public-app and revokes Maria's authorization.
    page.goto("/admin/apps")
    page.click("tr[data-client-id='public-app'] th a")
    row = page.locator("#grants-table tr.grant", has_text="maria")
    assert "Patient/sofia-garcia" in row.inner_text()
    shot(page, "console-apps-client")
    row.locator("button[type=submit]").click()
    page.wait_for_selector("#apps-done")
    assert "revoked" in page.inner_text("#apps-done")
    assert page.locator("#no-grants").is_visible()
    shot(page, "console-apps-revoked")

    # The app's very next request with its token is refused.
    refused = requests.get(base + SOFIA, headers=bearer, timeout=10)
    assert refused.status_code == 401 and "invalid_token" in refused.headers.get("WWW-Authenticate", "")

    # The revocation is in the audit log (written off the request path: wait for the writer's batch).
    for _ in range(25):
        page.goto(f"/admin/audit?action=execute-revoke-grant&user={username}")
        if page.locator("tr.audit-event").count():
            break
        page.wait_for_timeout(200)
    assert "Patient/sofia-garcia" in page.inner_text("tr.audit-event")
    shot(page, "console-audit")
