"""The sign-in pages: translated, linked, sign-up with an activation code (distinct messages for
unknown, used and expired codes) and forgot-username by email."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.smart_auth import people
from tests.portal.conftest import Portal, csrf_of, text_of

NEW_PASSWORD = "a long enough password"


def _sign_up(portal: Portal, **fields: str) -> Any:
    html = portal.get("/auth/signup")
    data = {"csrf_token": csrf_of(html), "activation_code": "", "username": "newbie", "password": NEW_PASSWORD,
            **fields}
    return portal.client.post("/auth/signup", data=data, headers={"Accept": "text/html"})


def _code(portal: Portal, patient: str = "sofia-garcia") -> str:
    return people.issue_activation_code(portal.world.smart.engine, patient)[0]


@pytest.fixture
def mail(portal: Portal) -> list[tuple[str, str, str]]:
    sent: list[tuple[str, str, str]] = []
    portal.world.smart.mailer = lambda to, subject, body: sent.append((to, subject, body))
    return sent


def test_login_page_links_to_forgot_username_password_and_sign_up(portal: Portal) -> None:
    html = portal.get("/auth/login")
    assert 'id="login-form"' in html and 'name="username"' in html and 'name="password"' in html
    assert 'href="/auth/forgot-username"' in html and 'href="/auth/reset"' in html and 'href="/auth/signup"' in html


def test_sign_in_pages_are_in_spanish(portal: Portal, mail: list[Any]) -> None:
    html = portal.get("/auth/login")
    portal.client.post("/language", data={"csrf_token": csrf_of(html), "lang": "es", "next": "/auth/login"})
    assert "Iniciar sesión" in text_of(portal.get("/auth/login"))
    assert "¿Olvidó su nombre de usuario?" in text_of(portal.last_html)
    assert "Código de activación" in text_of(portal.get("/auth/signup"))
    assert "Correo electrónico" in text_of(portal.get("/auth/forgot-username"))
    reply = _sign_up(portal, activation_code="AAAA-BBBB-CCCC-DDDD")
    assert "no es válido" in text_of(reply.get_data(as_text=True))


def test_sign_up_with_an_activation_code(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code=_code(portal, "robert-chen"), username="bob")
    assert reply.status_code == 302
    user = people.find_user(portal.world.smart.engine, "bob")
    assert user is not None and user.fhir_user == "Patient/robert-chen"


def test_sign_up_refuses_an_unknown_code(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code="AAAA-BBBB-CCCC-DDDD")
    page = text_of(reply.get_data(as_text=True))
    assert reply.status_code == 400 and "we do not know it" in page
    assert people.find_user(portal.world.smart.engine, "newbie") is None


def test_sign_up_refuses_a_used_code(portal: Portal, app: Any) -> None:
    code = _code(portal)
    assert _sign_up(portal, activation_code=code, username="first").status_code == 302
    again = Portal(app.test_client(), portal.world)
    reply = _sign_up(again, activation_code=code, username="second")
    page = text_of(reply.get_data(as_text=True))
    assert reply.status_code == 400 and "it has already been used" in page and "expired" not in page
    assert people.find_user(portal.world.smart.engine, "second") is None


def test_sign_up_refuses_an_expired_code(portal: Portal, monkeypatch: Any) -> None:
    code = _code(portal)
    real = people.now_ms
    monkeypatch.setattr(people, "now_ms", lambda: real() + 45 * 86400_000 + 1000)
    reply = _sign_up(portal, activation_code=code)
    page = text_of(reply.get_data(as_text=True))
    assert reply.status_code == 400 and "This activation code has expired" in page and "already been used" not in page
    assert people.find_user(portal.world.smart.engine, "newbie") is None


def test_sign_up_refuses_an_empty_code(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code="")
    assert reply.status_code == 400 and "Enter the activation code" in text_of(reply.get_data(as_text=True))


def test_sign_up_refuses_a_too_long_code(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code="A" * 65)
    assert reply.status_code == 400 and "16 letters and digits" in text_of(reply.get_data(as_text=True))


def test_sign_up_refuses_an_empty_username(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code=_code(portal), username="")
    assert reply.status_code == 400 and "Choose a username." in text_of(reply.get_data(as_text=True))


def test_sign_up_refuses_a_too_long_username(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code=_code(portal), username="u" * 65)
    assert reply.status_code == 400 and "at most 64 characters" in text_of(reply.get_data(as_text=True))


def test_sign_up_refuses_a_short_password(portal: Portal) -> None:
    reply = _sign_up(portal, activation_code=_code(portal), password="short")
    assert reply.status_code == 400 and "8 to 256 characters" in text_of(reply.get_data(as_text=True))


def test_sign_up_refuses_a_taken_username(portal: Portal) -> None:
    code = _code(portal)
    reply = _sign_up(portal, activation_code=code, username="maria")
    assert reply.status_code == 400 and "That username is taken" in text_of(reply.get_data(as_text=True))
    assert _sign_up(portal, activation_code=code, username="sofia").status_code == 302  # the code is not spent


def test_guessing_codes_is_slowed(portal: Portal) -> None:
    from gateway import ratelimit

    smart = portal.world.smart
    smart.limiter = ratelimit.FailureLimiter(ratelimit.storage(smart.settings), limit=3)
    for i in range(3):
        _sign_up(portal, activation_code=f"AAAA-BBBB-CCCC-DDD{i}")
    reply = _sign_up(portal, activation_code=_code(portal))
    assert reply.status_code == 400 and "Too many failed attempts" in text_of(reply.get_data(as_text=True))
    assert people.find_user(portal.world.smart.engine, "newbie") is None


def _forgot(portal: Portal, email: str) -> Any:
    html = portal.get("/auth/forgot-username")
    return portal.client.post("/auth/forgot-username", data={"csrf_token": csrf_of(html), "email": email},
                              headers={"Accept": "text/html"})


def test_forgot_username_mails_the_usernames_and_tells_nobody_else(portal: Portal, mail: list[Any]) -> None:
    told = _forgot(portal, "Robert.Chen@example.org")
    unknown = _forgot(portal, "nobody@example.org")
    assert told.status_code == unknown.status_code == 200
    assert text_of(told.get_data(as_text=True)) == text_of(unknown.get_data(as_text=True))
    assert len(mail) == 1 and mail[0][0] == "Robert.Chen@example.org"
    assert "robert" in mail[0][2] and "linda" not in mail[0][2]


def test_forgot_username_refuses_an_empty_address(portal: Portal, mail: list[Any]) -> None:
    reply = _forgot(portal, "")
    assert reply.status_code == 400 and "Enter the email address" in text_of(reply.get_data(as_text=True))


def test_forgot_username_refuses_a_malformed_address(portal: Portal, mail: list[Any]) -> None:
    reply = _forgot(portal, "robert.chen at example.org")
    assert reply.status_code == 400 and "name@example.org" in text_of(reply.get_data(as_text=True))
    assert mail == []


def test_forgot_username_refuses_a_too_long_address(portal: Portal, mail: list[Any]) -> None:
    reply = _forgot(portal, "a@" + "b" * 250 + ".org")
    assert reply.status_code == 400 and "at most 254 characters" in text_of(reply.get_data(as_text=True))


def test_login_refuses_an_empty_username(portal: Portal) -> None:
    html = portal.get("/auth/login")
    reply = portal.client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "", "password": "x"})
    assert reply.status_code == 400 and "Enter your username." in text_of(reply.get_data(as_text=True))


def test_login_refuses_an_empty_password(portal: Portal) -> None:
    html = portal.get("/auth/login")
    reply = portal.client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "maria", "password": ""})
    assert reply.status_code == 400 and "Enter your password." in text_of(reply.get_data(as_text=True))
