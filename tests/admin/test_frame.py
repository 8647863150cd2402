"""The console's frame: who gets in, and each role sees only its own areas."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from gateway import access
from gateway.admin import staff, web
from gateway.smart_auth.models import auth_user
from gateway.smart_auth.people import AuthError
from tests.admin.conftest import STAFF_PASSWORD, new_staff
from tests.portal.conftest import Portal, text_of
from tests.smart_auth.conftest import PASSWORD


def _console_urls(app: Any) -> list[tuple[str, str, bool]]:
    """(endpoint, url, takes no values) for every console page, with placeholder values."""
    urls = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("admin.") and rule.endpoint != "admin.static" and "GET" in rule.methods:
            values = {arg: "1" for arg in rule.arguments}
            with app.test_request_context():
                from flask import url_for

                urls.append((rule.endpoint, url_for(rule.endpoint, **values), not rule.arguments))
    return urls


def test_signed_out_visitors_are_sent_to_the_login_and_come_back(app: Any, client: Any) -> None:
    reply = client.get("/admin/")
    assert reply.status_code == 302 and reply.headers["Location"].endswith("/auth/login")


def test_a_patient_session_never_reaches_the_console(app: Any, portal: Portal) -> None:
    portal.sign_in("maria", PASSWORD)
    for endpoint, url, _plain in _console_urls(app):
        reply = portal.client.get(url)
        assert reply.status_code == 403, (endpoint, reply.status_code)
        assert "for hospital staff" in text_of(reply.get_data(as_text=True))


def test_staff_must_have_passed_the_second_factor(app: Any, console: Any) -> None:
    engine = app.extensions["gateway"].engine
    username = new_staff(engine, "operator")
    with engine.begin() as conn:  # MFA taken away behind the console's back: a password alone must not do
        conn.execute(update(auth_user).where(auth_user.c.username == username).values(totp_secret=None))
    app.config["WTF_CSRF_ENABLED"] = True
    driver = Portal(app.test_client(), None)  # type: ignore[arg-type]
    driver.sign_in(username, STAFF_PASSWORD)
    reply = driver.client.get("/admin/")
    assert reply.status_code == 403
    assert "two-step verification" in text_of(reply.get_data(as_text=True))


@pytest.mark.parametrize("role", access.STAFF_ROLES)
def test_each_role_sees_only_its_areas(app: Any, console: Any, role: str) -> None:
    driver = console(role)
    home = text_of(driver.get("/admin/"))
    for endpoint, url, plain in _console_urls(app):
        area = web.AREA_OF.get(endpoint)
        if endpoint == "admin.home":
            continue
        assert area is not None, f"{endpoint} has no area: the guard refuses it to everyone"
        reply = driver.client.get(url)
        if access.staff_may({role}, area):
            if plain:
                assert reply.status_code == 200, (role, endpoint, reply.status_code)
        else:
            assert reply.status_code == 403, (role, endpoint, reply.status_code)
    for _order, area, endpoint, label in web.NAV:
        assert (str(label) in home) == access.staff_may({role}, area), (role, endpoint)


def test_staff_logins_need_known_roles_and_long_passwords(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    with pytest.raises(AuthError, match="roles must be among"):
        staff.add_staff(engine, "x", STAFF_PASSWORD, ["janitor"])
    with pytest.raises(AuthError, match="roles must be among"):
        staff.add_staff(engine, "x", STAFF_PASSWORD, [])
    with pytest.raises(AuthError, match="12 characters"):
        staff.add_staff(engine, "x", "short", ["operator"])
    user, roles = staff.add_staff(engine, "ops", STAFF_PASSWORD, ["operator", "operator"])
    assert roles == {"operator"} and user.totp_secret  # a second factor is always set up
    with pytest.raises(AuthError, match="exists already"):
        staff.add_staff(engine, "ops", STAFF_PASSWORD, ["operator"])


def test_the_cli_creates_staff_with_a_second_factor(settings: Any, app: Any, monkeypatch: Any) -> None:
    import json

    from click.testing import CliRunner

    from gateway.cli import main

    monkeypatch.setenv("GATEWAY_DATABASE_URL", settings.database_url)
    result = CliRunner().invoke(main, ["staff", "add", "--username", "desk", "--password", STAFF_PASSWORD,
                                       "--role", "front-desk", "--role", "operator"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["roles"] == ["front-desk", "operator"] and out["totp_uri"].startswith("otpauth://totp/")
    result = CliRunner().invoke(main, ["staff", "add", "--username", "x", "--password", STAFF_PASSWORD,
                                       "--role", "janitor"])
    assert result.exit_code != 0


def test_the_demo_has_one_staff_login_per_role(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    first = staff.load_demo_staff(engine)
    assert staff.load_demo_staff(engine) == first  # idempotent
    with engine.connect() as conn:
        for username, role in staff.DEMO_STAFF:
            user = staff.people.find_user(engine, username)
            assert user is not None and user.totp_secret == staff.DEMO_TOTP_SECRET
            assert staff.roles_of(conn, user.id) == {role}


def test_staff_signing_in_on_the_login_page_itself_land_in_the_console(app: Any, console: Any) -> None:
    driver = console("front-desk")  # signed in through /auth/login and /auth/mfa, with no page to go back to
    reply = driver.client.get("/auth/continue")
    assert reply.status_code == 302 and reply.headers["Location"] == "/"
    reply = driver.client.get("/")
    assert reply.status_code == 302 and reply.headers["Location"] == "/admin/"
    assert "Signed in as" in text_of(driver.get("/admin/"))
