"""Staff logins of the operator console: a login (auth_user) with one or more roles, always with
a second factor. Staff sign in through the same login and MFA pages as patients; what they may open
is decided by gateway.access from their roles."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, delete, insert, select

from gateway import access
from gateway.admin.models import staff_role
from gateway.db import write_tx
from gateway.smart_auth import people
from gateway.smart_auth.models import auth_user
from gateway.smart_auth.people import AuthError


def roles_of(conn: Connection, user_id: int) -> frozenset[str]:
    return frozenset(conn.execute(select(staff_role.c.role).where(staff_role.c.user_id == user_id)).scalars())


def _check_roles(roles: list[str]) -> list[str]:
    unknown = sorted(set(roles) - set(access.STAFF_ROLES))
    if unknown or not roles:
        raise AuthError(f"roles must be among {', '.join(access.STAFF_ROLES)} (got {', '.join(unknown) or 'none'})")
    return sorted(set(roles))


def add_staff(engine: Engine, username: str, password: str, roles: list[str], *, totp_secret: str | None = None,
              practitioner: str | None = None) -> tuple[people.User, frozenset[str]]:
    """A new staff login with its roles. Staff always sign in with a second factor: without a given
    secret one is made (the caller shows its provisioning URI once)."""
    roles = _check_roles(roles)
    if len(password) < 12:
        raise AuthError("a staff password needs at least 12 characters")
    if practitioner is not None and (not practitioner.startswith("Practitioner/") or practitioner == "Practitioner/"):
        raise AuthError("--practitioner must be Practitioner/ID")
    with write_tx(engine) as conn:
        user = people.insert_login(conn, username, password, practitioner or "",
                                   totp_secret or people.new_totp_secret())
        conn.execute(insert(staff_role), [{"user_id": user.id, "role": role} for role in roles])
    return user, frozenset(roles)


def set_roles(engine: Engine, username: str, roles: list[str]) -> frozenset[str]:
    roles = _check_roles(roles)
    with write_tx(engine) as conn:
        user_id = conn.execute(select(auth_user.c.id).where(auth_user.c.username == username)).scalar()
        if user_id is None:
            raise AuthError(f"no login {username!r}")
        conn.execute(delete(staff_role).where(staff_role.c.user_id == user_id))
        conn.execute(insert(staff_role), [{"user_id": user_id, "role": role} for role in roles])
    return frozenset(roles)


# Demo only (`gateway serve --demo`): one login per role, sharing a published TOTP secret.
DEMO_STAFF_PASSWORD = "console demo 2026"
DEMO_TOTP_SECRET = "DEMOCONSOLESECRETDEMOCONSOLE2345"
DEMO_STAFF = (("operator", "operator"), ("frontdesk", "front-desk"), ("security", "security-officer"))


def load_demo_staff(engine: Engine) -> list[str]:
    """The demo's staff logins (idempotent); lines to print."""
    lines = []
    for username, role in DEMO_STAFF:
        if people.find_user(engine, username) is None:
            add_staff(engine, username, DEMO_STAFF_PASSWORD, [role], totp_secret=DEMO_TOTP_SECRET)
        lines.append(f"{username} / {DEMO_STAFF_PASSWORD}: {role}")
    lines.append(f"console TOTP secret {DEMO_TOTP_SECRET} (the current code: "
                 f"python3 -c 'import pyotp; print(pyotp.TOTP(\"{DEMO_TOTP_SECRET}\").now())')")
    return lines
