"""Console test harness: staff logins with roles, signed in through the real login and MFA forms.

`console("operator")` gives a signed-in test client (CSRF on) for a new staff login with those roles,
on every database; the browser journeys reuse the portal's Chromium fixtures (SQLite pass only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from gateway.admin.staff import add_staff
from tests.portal.conftest import Portal, browser, portal, site  # noqa: F401  (fixtures shared with the portal)
from tests.smart_auth.conftest import TOTP_SECRET, World

STAFF_PASSWORD = "staff password 2026"
_numbers = itertools.count(1)


def new_staff(engine: Any, *roles: str, username: str | None = None) -> str:
    username = username or f"{'-'.join(roles) or 'nobody'}-{next(_numbers)}"
    add_staff(engine, username, STAFF_PASSWORD, list(roles), totp_secret=TOTP_SECRET)
    return username


@pytest.fixture
def world(app: Any) -> World:
    services = app.extensions["gateway"]
    return World(services.smart, services.store).setup()


@pytest.fixture
def console(app: Any, world: World) -> Callable[..., Portal]:
    """console(*roles) -> a test client signed in (password and TOTP) as a new staff login."""
    app.config["WTF_CSRF_ENABLED"] = True
    engine = app.extensions["gateway"].engine

    def sign_in(*roles: str) -> Portal:
        username = new_staff(engine, *roles)
        driver = Portal(app.test_client(), world)
        driver.sign_in(username, STAFF_PASSWORD, otp=True)
        driver.username = username  # type: ignore[attr-defined]
        return driver
    return sign_in
