"""Browser sessions of a login, shared by the authorization pages and the patient portal.

A session starts at sign-in (password, then MFA when enrolled, or sign-up) and lives in the signed
session cookie. It ends at sign-out, after GATEWAY_PORTAL_IDLE_SECONDS without a request, or when
the login signs out everywhere (the session's epoch is then older than the login's).
"""

from __future__ import annotations

import time

from flask import session
from sqlalchemy import Engine

from gateway.smart_auth import people

USER = "smart_uid"
EPOCH = "smart_epoch"
SEEN = "smart_seen"
MFA = "smart_mfa"  # the session began with the second factor (the operator console requires it)
ENDED = "smart_ended"  # why the last session ended ("idle" or "elsewhere"), shown at the next sign-in


def start(user: people.User, *, mfa: bool = False) -> None:
    """Begin a signed-in session (the caller has cleared the old one: no fixation)."""
    session[USER] = user.id
    session[MFA] = mfa
    session[EPOCH] = user.session_epoch
    session[SEEN] = int(time.time())


def current_user(engine: Engine, idle_seconds: int) -> people.User | None:
    """The signed-in login, or None; a session past its idle time or epoch is ended here."""
    user_id = session.get(USER)
    if user_id is None:
        return None
    now = int(time.time())
    if now - int(session.get(SEEN, 0)) > idle_seconds:
        end("idle")
        return None
    with engine.connect() as conn:
        user = people.get_user(conn, user_id)
    if user is None or user.session_epoch != session.get(EPOCH):
        end("elsewhere")
        return None
    if now - int(session.get(SEEN, 0)) >= 15:  # do not rewrite the cookie on every request
        session[SEEN] = now
    return user


def passed_mfa() -> bool:
    return bool(session.get(MFA))


def end(reason: str | None = None) -> None:
    lang = session.get("lang")
    session.clear()
    if reason:
        session[ENDED] = reason
    if lang:
        session["lang"] = lang  # the language choice outlives the session
