"""Logins and whom they may act for: argon2 passwords, TOTP, lockout, proxy grants.

A login acts for its own Patient record and for every patient it holds a current proxy grant for.
A grant for a minor ends the day before the 18th birthday whatever the grantor asked for; for a
patient aged 12 to 17 the proxy is "limited": records labelled confidential stay hidden.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, insert, select, update

from gateway.db import write_tx
from gateway.smart_auth import revocation
from gateway.smart_auth.models import activation_code, auth_user, proxy_grant

ACTIVATION_DAYS = 45
MAX_FAILURES = 5
LOCKOUT_MS = 15 * 60 * 1000
_hasher = PasswordHasher()


class AuthError(Exception):
    """A login, grant or registration that cannot go ahead; the message is safe to show."""


def now_ms() -> int:
    return int(time.time() * 1000)


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(hashed: str, secret: str) -> bool:
    try:
        return _hasher.verify(hashed, secret)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class User:
    id: int
    username: str
    fhir_user: str
    totp_secret: str | None
    session_epoch: int = 0

    @property
    def patient_id(self) -> str | None:
        kind, _, rid = self.fhir_user.partition("/")
        return rid if kind == "Patient" else None


def _user(row: object) -> User:
    return User(row.id, row.username, row.fhir_user, row.totp_secret,  # type: ignore[attr-defined]
                row.session_epoch or 0)  # type: ignore[attr-defined]


def add_user(engine: Engine, username: str, password: str, fhir_user: str, totp_secret: str | None = None) -> User:
    kind, _, rid = fhir_user.partition("/")
    if kind != "Patient" or not rid:
        raise AuthError("--fhir-user must be Patient/ID")
    if len(password) < 8:
        raise AuthError("the password needs at least 8 characters")
    with write_tx(engine) as conn:
        return insert_login(conn, username, password, fhir_user, totp_secret)


def insert_login(conn: Connection, username: str, password: str, fhir_user: str, totp_secret: str | None) -> User:
    """A new row of auth_user in the caller's transaction (argon2 hash; the TOTP secret checked)."""
    if totp_secret:
        try:
            pyotp.TOTP(totp_secret).now()
        except (ValueError, TypeError) as exc:
            raise AuthError(f"--totp-secret is not usable: {exc}") from None
    if conn.execute(select(auth_user.c.id).where(auth_user.c.username == username)).first():
        raise AuthError(f"user {username!r} exists already")
    conn.execute(insert(auth_user).values(
        username=username, password_hash=hash_secret(password), fhir_user=fhir_user,
        totp_secret=totp_secret or None, failed_logins=0, created_ms=now_ms()))
    return _user(conn.execute(select(auth_user).where(auth_user.c.username == username)).one())


def get_user(conn: Connection, user_id: int) -> User | None:
    row = conn.execute(select(auth_user).where(auth_user.c.id == user_id)).first()
    return _user(row) if row else None


def sign_out_everywhere(engine: Engine, user_id: int) -> None:
    """End every browser session of a login (each holds the epoch it started under)."""
    with write_tx(engine) as conn:
        conn.execute(update(auth_user).where(auth_user.c.id == user_id).values(
            session_epoch=auth_user.c.session_epoch + 1))


def find_user(engine: Engine, username: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(select(auth_user).where(auth_user.c.username == username)).first()
    return _user(row) if row else None


def check_password(engine: Engine, username: str, password: str) -> User:
    """The user, or AuthError after counting a failure (five in a row lock the login 15 minutes)."""
    with write_tx(engine) as conn:
        row = conn.execute(select(auth_user).where(auth_user.c.username == username)).first()
        if row is None:
            _hasher.hash(password)  # the same work as a real check, so timing does not tell
            failure: str | None = "Unknown username or wrong password"
        else:
            failure = _judge(conn, row, lambda: verify_secret(row.password_hash, password),
                             "Unknown username or wrong password")
    # Raised after the commit: the failure count must survive the refusal.
    if failure:
        raise AuthError(failure)
    return _user(row)


def check_otp(engine: Engine, user: User, otp: str) -> None:
    with write_tx(engine) as conn:
        row = conn.execute(select(auth_user).where(auth_user.c.id == user.id)).one()
        failure = _judge(conn, row, lambda: bool(row.totp_secret) and pyotp.TOTP(row.totp_secret).verify(
            otp.strip(), valid_window=1), "The code is not valid")
    if failure:
        raise AuthError(failure)


def _judge(conn: Connection, row: Any, passes: Callable[[], bool], refusal: str) -> str | None:
    """One attempt at a locked-out-able check: None when it passes, else the message to show."""
    if row.locked_until_ms and row.locked_until_ms > now_ms():
        return "Too many failed attempts; try again later"
    if not passes():
        _count_failure(conn, row.id, row.failed_logins)
        return refusal
    conn.execute(update(auth_user).where(auth_user.c.id == row.id).values(failed_logins=0, locked_until_ms=None))
    return None


def _count_failure(conn: Connection, user_id: int, failures: int) -> None:
    failures += 1
    locked = now_ms() + LOCKOUT_MS if failures >= MAX_FAILURES else None
    conn.execute(update(auth_user).where(auth_user.c.id == user_id).values(
        failed_logins=0 if locked else failures, locked_until_ms=locked))


# --- proxies ---

def eighteenth_birthday(birth: date) -> date:
    try:
        return birth.replace(year=birth.year + 18)
    except ValueError:  # 29 February
        return date(birth.year + 18, 3, 1)


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def grant_proxy(engine: Engine, username: str, patient_id: str, relationship: str, birth_date: str | None,
                until: date | None = None, today: date | None = None, related_person: str | None = None,
                consent_id: str | None = None) -> dict[str, str | None]:
    """Let `username` act for `patient_id`. A minor's proxy ends the day before the 18th birthday."""
    user = find_user(engine, username)
    if user is None:
        raise AuthError(f"no user {username!r}")
    if user.patient_id == patient_id:
        raise AuthError("a user acts for their own record without a proxy grant")
    valid_from, valid_until = proxy_period(birth_date, until, today)
    with write_tx(engine) as conn:
        conn.execute(insert(proxy_grant).values(
            user_id=user.id, patient_id=patient_id, relationship=relationship, birth_date=birth_date,
            valid_from=valid_from, valid_until=valid_until, related_person=related_person,
            consent_id=consent_id, created_ms=now_ms()))
    return {"username": username, "patient": f"Patient/{patient_id}", "relationship": relationship,
            "valid_from": valid_from, "valid_until": valid_until}


def proxy_period(birth_date: str | None, until: date | None, today: date | None = None) -> tuple[str, str | None]:
    """(first day, last day or None) of a grant made today; a minor's ends before the 18th birthday."""
    today = today or date.today()
    if birth_date:
        birth = date.fromisoformat(birth_date[:10])
        if age_on(birth, today) < 18:
            adult_day = eighteenth_birthday(birth) - timedelta(days=1)
            until = min(until, adult_day) if until else adult_day
    return today.isoformat(), until.isoformat() if until else None


def revoke_proxy(engine: Engine, username: str, patient_id: str) -> list[str]:
    """End a login's proxy grants for a patient; returns the ids of their Consent records."""
    user = find_user(engine, username)
    if user is None:
        raise AuthError(f"no user {username!r}")
    current = (proxy_grant.c.user_id == user.id, proxy_grant.c.patient_id == patient_id,
               proxy_grant.c.revoked_ms.is_(None))
    with write_tx(engine) as conn:
        consents = list(conn.execute(select(proxy_grant.c.consent_id).where(*current)).scalars())
        ended = conn.execute(update(proxy_grant).where(*current).values(revoked_ms=now_ms())).rowcount
        if ended:
            revocation.bump(conn)  # every process drops what it cached about this user's tokens
    if ended:
        revocation.publish(engine)
    return [c for c in consents if c]


def proxy_record(conn: Connection, user_id: int, patient_id: str) -> str | None:
    """The RelatedPerson recorded for a login's current grant for a patient, if any."""
    return conn.execute(select(proxy_grant.c.related_person).where(
        proxy_grant.c.user_id == user_id, proxy_grant.c.patient_id == patient_id,
        proxy_grant.c.revoked_ms.is_(None)).order_by(proxy_grant.c.id.desc())).scalar()


def _current_grants(conn: Connection, user_id: int, today: date) -> list[Any]:
    day = today.isoformat()
    rows = conn.execute(select(proxy_grant).where(
        proxy_grant.c.user_id == user_id, proxy_grant.c.revoked_ms.is_(None), proxy_grant.c.valid_from <= day))
    return [row for row in rows if row.valid_until is None or row.valid_until >= day]


def current_proxy_records(conn: Connection, user_id: int, today: date | None = None) -> list[str]:
    """The RelatedPerson ids of a login's current proxy relationships, in a stable order."""
    grants = _current_grants(conn, user_id, today or date.today())
    return sorted({row.related_person for row in grants if row.related_person})


def acting_for(conn: Connection, user_id: int, today: date | None = None) -> dict[str, bool]:
    """Patient id -> limited (True: a proxy of a 12-17 year old, who does not see confidential data)."""
    today = today or date.today()
    user = get_user(conn, user_id)
    if user is None:
        return {}
    out: dict[str, bool] = {}
    for row in _current_grants(conn, user_id, today):
        limited = bool(row.birth_date) and 12 <= age_on(date.fromisoformat(row.birth_date[:10]), today) < 18
        out[row.patient_id] = out.get(row.patient_id, True) and limited
    if user.patient_id:
        out[user.patient_id] = False
    return out


# --- sign-up with an activation code ---

def _code_digest(code: str) -> str:
    return hashlib.sha256(code.replace("-", "").strip().upper().encode()).hexdigest()


def issue_activation_code(engine: Engine, patient_id: str, days: int = ACTIVATION_DAYS) -> tuple[str, int]:
    """A single-use sign-up code for one patient's record, and when it expires (epoch ms)."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode()  # 16 letters and digits, 80 bits
    code = "-".join(raw[i:i + 4] for i in range(0, 16, 4))
    now = now_ms()
    expires = now + days * 24 * 3600 * 1000
    with write_tx(engine) as conn:
        conn.execute(insert(activation_code).values(code_hash=_code_digest(code), patient_id=patient_id,
                                                    created_ms=now, expires_ms=expires))
    return code, expires


CODE_UNKNOWN = "This activation code is not valid: we do not know it. Check it and type it again"
CODE_USED = "This activation code is not valid any more: it has already been used. Sign in with the login made with it"
CODE_EXPIRED = "This activation code has expired. Ask your care team for a new one"
USERNAME_MAX = 64


def sign_up(engine: Engine, code: str, username: str, password: str) -> User:
    """Create the login the code was issued for; the code is spent only when the login is created."""
    if len(password) < 8:
        raise AuthError("the password needs at least 8 characters")
    if not username.strip():
        raise AuthError("choose a username")
    if len(username) > USERNAME_MAX or username != username.strip():
        raise AuthError("a username has at most 64 characters, without spaces at either end")
    with write_tx(engine) as conn:
        row = conn.execute(select(activation_code).where(activation_code.c.code_hash == _code_digest(code))).first()
        # Three distinct answers help a patient holding a real code; telling them apart needs a real
        # 80-bit code, and every refusal counts against the address (gateway.ratelimit.FailureLimiter in the views).
        if row is None:
            failure: str | None = CODE_UNKNOWN
        elif row.used_ms is not None:
            failure = CODE_USED
        elif row.expires_ms <= now_ms():
            failure = CODE_EXPIRED
        elif conn.execute(select(auth_user.c.id).where(auth_user.c.username == username)).first():
            failure = "That username is taken"
        else:
            failure = None
            conn.execute(insert(auth_user).values(
                username=username, password_hash=hash_secret(password), fhir_user=f"Patient/{row.patient_id}",
                failed_logins=0, created_ms=now_ms()))
            user_row = conn.execute(select(auth_user).where(auth_user.c.username == username)).one()
            claimed = conn.execute(update(activation_code).where(
                activation_code.c.code_hash == row.code_hash, activation_code.c.used_ms.is_(None)).values(
                used_ms=now_ms(), user_id=user_row.id)).rowcount
            if claimed != 1:
                raise AuthError(CODE_USED)  # rolls the new login back
    if failure:
        raise AuthError(failure)
    return _user(user_row)


# --- two-step verification (TOTP) ---

def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, username: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app reads (as a QR code or typed in)."""
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def enable_totp(engine: Engine, user_id: int, secret: str, otp: str) -> None:
    """Save the secret as the login's second step, only once a code made from it is shown to work
    (a wrong code counts as a failed attempt like any other)."""
    try:
        pyotp.TOTP(secret).now()
    except (ValueError, TypeError):
        raise AuthError("Start the set-up again") from None
    with write_tx(engine) as conn:
        row = conn.execute(select(auth_user).where(auth_user.c.id == user_id)).one()
        if row.totp_secret:
            failure: str | None = "Two-step verification is already on"
        else:
            failure = _judge(conn, row, lambda: pyotp.TOTP(secret).verify(otp.strip(), valid_window=1),
                             "The code is not valid")
            if failure is None:
                conn.execute(update(auth_user).where(auth_user.c.id == user_id).values(totp_secret=secret))
    if failure:
        raise AuthError(failure)


def disable_totp(engine: Engine, user: User, otp: str) -> None:
    """Turn the second step off after a current code from the enrolled app."""
    check_otp(engine, user, otp)
    with write_tx(engine) as conn:
        conn.execute(update(auth_user).where(auth_user.c.id == user.id).values(totp_secret=None))


def has_totp(engine: Engine, user_id: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(select(auth_user.c.totp_secret).where(auth_user.c.id == user_id)).scalar())
