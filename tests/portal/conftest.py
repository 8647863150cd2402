"""Portal test harness.

Two ways in, both against real components:
- `portal` (every database): the Flask test client with CSRF on, signed in through the real login
  form; fast enough for one test per bad input on every form.
- `browser` + `site` (SQLite run only): a live gateway over real HTTP on 127.0.0.1 at a free port,
  driven by Debian's Chromium through Playwright. Journeys save a screenshot of every page they
  visit under test-artifacts/screenshots/ and check it with axe-core (no serious or critical
  violations).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pyotp
import pytest

from gateway.fhir.bundles import BundleProcessor, import_file
from tests.smart_auth.conftest import FIXTURES, PASSWORD, TOTP_SECRET, World, keep_current

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert match, "the page has no CSRF token"
    return unescape(match.group(1))


def text_of(html: str) -> str:
    """The page's visible text, whitespace collapsed (for assertions on what a person reads)."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html))).strip()


def future_slots(store: Any, schedule: str = "emily-carter-schedule", days: int = 3, count: int = 6,
                 hours_from_now: float | None = None) -> list[str]:
    """Free Slots from `days` days ahead (or `hours_from_now`), made for the test so that it does
    not depend on the calendar the demo fixtures were built for. Returns their ids."""
    now = datetime.now(UTC).replace(microsecond=0, second=0, minute=0)
    first = now + (timedelta(hours=hours_from_now) if hours_from_now is not None else timedelta(days=days))
    ids = []
    with store.writing() as repo:
        for i in range(count):
            start = first + timedelta(minutes=30 * i)
            result = repo.create({"resourceType": "Slot", "schedule": {"reference": f"Schedule/{schedule}"},
                                  "status": "free", "start": start.isoformat(),
                                  "end": (start + timedelta(minutes=30)).isoformat()})
            ids.append(result.stored.id)
    return ids


class Portal:
    """A signed-in browser without JavaScript: the test client, forms filled by their field names."""

    def __init__(self, client: Any, world: World) -> None:
        self.client = client
        self.world = world
        self.last_html = ""

    def get(self, path: str, status: int | None = 200) -> str:
        reply = self.client.get(path, headers={"Accept": "text/html"})
        if status is not None:
            assert reply.status_code == status, (path, reply.status_code, text_of(reply.get_data(as_text=True))[:500])
        self.last_html = reply.get_data(as_text=True)
        return self.last_html

    def post(self, path: str, data: dict[str, Any], page: str | None = None, follow: bool = True) -> Any:
        """Submit a form with the CSRF token of `page` (default: the form's own page)."""
        html = self.get(page or path)
        reply = self.client.post(path, data={"csrf_token": csrf_of(html), **data}, headers={"Accept": "text/html"},
                                 follow_redirects=follow)
        self.last_html = reply.get_data(as_text=True)
        return reply

    def sign_in(self, username: str, password: str = PASSWORD, otp: bool = False, lang: str | None = "en") -> None:
        """Sign in through the login form; `lang` is the language picked on the sign-in page (None:
        none, so the first page takes the one the login's record prefers)."""
        if lang:
            html = self.get("/auth/login")
            self.client.post("/language", data={"csrf_token": csrf_of(html), "lang": lang, "next": "/auth/login"})
        html = self.get("/auth/login")
        reply = self.client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": username,
                                                      "password": password})
        assert reply.status_code == 302, text_of(reply.get_data(as_text=True))[:300]
        if otp:
            html = self.get("/auth/mfa")
            reply = self.client.post("/auth/mfa", data={"csrf_token": csrf_of(html),
                                                        "otp": pyotp.TOTP(TOTP_SECRET).now()})
            assert reply.status_code == 302

    def choose(self, patient_id: str) -> None:
        reply = self.post("/choose", {"patient": f"Patient/{patient_id}", "next": "/"})
        assert reply.status_code == 200, text_of(self.last_html)[:300]


def load_schedules(store: Any) -> None:
    import_file(BundleProcessor(store), str(FIXTURES / "05-schedules.json"), adjust=keep_current)


@pytest.fixture
def world(app: Any) -> World:
    services = app.extensions["gateway"]
    return World(services.smart, services.store).setup()


@pytest.fixture
def portal(app: Any, world: World) -> Portal:
    app.config["WTF_CSRF_ENABLED"] = True
    return Portal(app.test_client(), world)


# --- the real browser ---

@pytest.fixture
def site(database_url: str, live_server: str, settings: Any) -> Iterator[tuple[str, World]]:
    """The live gateway with the demo family (SQLite run only: the browser journeys take minutes,
    and every page they drive is also tested on both databases through `portal`)."""
    if not database_url.startswith("sqlite"):
        pytest.skip("browser journeys run on the SQLite pass; the test-client tests cover PostgreSQL")
    from gateway import build_services

    services = build_services(settings)
    world = World(services.smart, services.store).setup()
    load_schedules(services.store)
    world.services = services  # type: ignore[attr-defined]
    yield live_server, world
    services.close()


@pytest.fixture
def browser(chromium: Any, site: tuple[str, World], request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (own cookies) at phone width or desktop width."""
    context = chromium.new_context(base_url=site[0], viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A Content-Security-Policy refusal is only a console message: count it as an error too.
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Any, name: str, axe: bool = True) -> None:
    """Save a full-page screenshot as a test artifact and check the page with axe-core."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if axe:
        assert_accessible(page, name)


def assert_accessible(page: Any, name: str) -> None:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    bad = [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]
    assert not bad, f"{name}: " + "; ".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}" for v in bad)


def browser_sign_in(page: Any, username: str, password: str = PASSWORD, otp: bool = False,
                    shots: str | None = None) -> None:
    page.goto("/")
    page.fill("#login-form input[name=username]", username)
    page.fill("#login-form input[name=password]", password)
    if shots:
        shot(page, f"{shots}-sign-in")
    page.click("#login-form button[type=submit]")
    if otp:
        page.fill("input[name=otp]", pyotp.TOTP(TOTP_SECRET).now())
        if shots:
            shot(page, f"{shots}-mfa")
        page.click("#mfa-form button[type=submit]")
