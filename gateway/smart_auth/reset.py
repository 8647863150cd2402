"""Password reset through an emailed link: single use, one hour, never revealing who has a login.

The address is the email in the user's own Patient record (Patient.telecom, system email). The
link is a secret: it goes into the mail only, never into a log.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from sqlalchemy import Engine, insert, select, update

from gateway.config import Settings
from gateway.db import write_tx
from gateway.fhir.outcome import FhirError
from gateway.smart_auth import people
from gateway.smart_auth.models import auth_user, password_reset
from gateway.smart_auth.people import AuthError, now_ms

RESET_SECONDS = 3600
Mailer = Callable[[str, str, str], None]  # to, subject, body


def smtp_mailer(settings: Settings) -> Mailer | None:
    if not settings.smtp_host:
        return None

    def send(to: str, subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = settings.smtp_from, to, subject
        message.set_content(body)
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=20) as smtp:
            if settings.smtp_starttls:
                smtp.starttls()
            if settings.smtp_username:
                smtp.login(settings.smtp_username, settings.smtp_password)
            smtp.send_message(message)

    return send


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def email_of(store: Any, user: people.User) -> str | None:
    if user.patient_id is None:
        return None
    try:
        with store.reading() as repo:
            patient = json.loads(repo.read("Patient", user.patient_id).content or "{}")
    except FhirError:
        return None
    return next((t.get("value") for t in patient.get("telecom") or []
                 if t.get("system") == "email" and t.get("value")), None)


def request_reset(engine: Engine, store: Any, mailer: Mailer, base_url: str, username: str) -> None:
    """Mail a reset link when the login exists and has an address; say nothing either way."""
    user = people.find_user(engine, username)
    address = email_of(store, user) if user else None
    if user is None or address is None:
        return
    token = secrets.token_urlsafe(32)
    with write_tx(engine) as conn:
        conn.execute(insert(password_reset).values(token_hash=_digest(token), user_id=user.id,
                                                   expires_ms=now_ms() + RESET_SECONDS * 1000))
    mailer(address, "Reset your password",
           f"Someone asked to reset the password of the login {user.username}.\n\n"
           f"To choose a new password, open this link within an hour:\n{base_url}/auth/reset/{token}\n\n"
           "If it was not you, ignore this message; your password stays as it is.\n")


def reset_is_valid(engine: Engine, token: str) -> bool:
    with engine.connect() as conn:
        row = conn.execute(select(password_reset).where(password_reset.c.token_hash == _digest(token))).first()
    return row is not None and row.used_ms is None and row.expires_ms > now_ms()


def complete_reset(engine: Engine, token: str, password: str) -> people.User:
    if len(password) < 8:
        raise AuthError("the password needs at least 8 characters")
    with write_tx(engine) as conn:
        claimed = conn.execute(update(password_reset).where(
            password_reset.c.token_hash == _digest(token), password_reset.c.used_ms.is_(None),
            password_reset.c.expires_ms > now_ms()).values(used_ms=now_ms())).rowcount
        if claimed == 1:
            user_id = conn.execute(select(password_reset.c.user_id).where(
                password_reset.c.token_hash == _digest(token))).scalar_one()
            conn.execute(update(auth_user).where(auth_user.c.id == user_id).values(
                password_hash=people.hash_secret(password), failed_logins=0, locked_until_ms=None,
                # Whoever knew the old password is signed out: every browser session ends (ASVS 3.3.3).
                session_epoch=auth_user.c.session_epoch + 1))
            user = people.get_user(conn, user_id)
    if claimed != 1 or user is None:
        raise AuthError("This reset link is not valid any more; ask for a new one")
    return user


def request_usernames(engine: Engine, store: Any, mailer: Mailer, base_url: str, email: str) -> None:
    """Mail the usernames whose own record has this email address (Patient.telecom) to that address;
    say nothing either way, so the page cannot tell who is a patient here."""
    from gateway.fhir.search import search

    address = email.strip()
    if not address or "@" not in address:
        return
    with store.reading() as repo:
        # Token search is exact; people type their address in any case.
        spellings = ",".join(dict.fromkeys(a.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$")
                                           .replace("|", "\\|") for a in (address, address.lower())))
        _, found = search(repo, "Patient", [("email", spellings)], default_count=50, max_count=50)
        patients = {f"Patient/{s.id}" for s in found.matches
                    if any(t.get("system") == "email" and str(t.get("value", "")).lower() == address.lower()
                           for t in (s.resource().get("telecom") or []))}
    if not patients:
        return
    with engine.connect() as conn:
        names = sorted(conn.execute(select(auth_user.c.username).where(auth_user.c.fhir_user.in_(patients)))
                       .scalars())
    if not names:
        return
    mailer(address, "Your username",
           "Someone asked which logins belong to this email address. They are:\n\n"
           + "".join(f"  {name}\n" for name in names)
           + f"\nSign in at {base_url}/auth/login\n\n"
           "If it was not you, ignore this message; nothing has changed.\n")
