"""Keys that sign id_tokens (RS256), kept in the database and rotated without breaking verifiers.

The newest unretired key signs. `rotate` adds a new key and retires all but the previous one, so
a token signed just before the rotation still verifies against the published JWKS.
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import Engine, insert, select, update

from gateway.db import write_tx
from gateway.smart_auth.models import signing_key
from gateway.smart_auth.people import now_ms


def _new_key(engine: Engine) -> RSAKey:
    kid = secrets.token_urlsafe(12)
    key = RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"}, private=True)
    with write_tx(engine) as conn:
        conn.execute(insert(signing_key).values(kid=kid, private_jwk=json.dumps(key.as_dict(private=True)),
                                                created_ms=now_ms()))
    return key


def _active_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(signing_key).where(signing_key.c.retired_ms.is_(None))
                                 .order_by(signing_key.c.created_ms.desc(), signing_key.c.kid)))


@lru_cache(maxsize=16)
def _parsed(private_jwk: str) -> RSAKey:
    """A stored key as an object, once per process: importing a private RSA key validates it, about
    45 ms of CPU, which every id_token (each code exchange and refresh with openid) paid before."""
    return RSAKey.import_key(json.loads(private_jwk))


def current(engine: Engine) -> RSAKey:
    rows = _active_rows(engine)
    if not rows:
        return _new_key(engine)
    return _parsed(rows[0].private_jwk)


def sign(engine: Engine, claims: dict[str, Any]) -> str:
    key = current(engine)
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, claims, key)


def jwks(engine: Engine) -> dict[str, Any]:
    if not _active_rows(engine):
        _new_key(engine)
    keys = [_parsed(row.private_jwk).as_dict(private=False) for row in _active_rows(engine)]
    return {"keys": keys}


def rotate(engine: Engine) -> str:
    """Start signing with a fresh key; the one before stays published, older ones are retired."""
    previous = _active_rows(engine)
    key = _new_key(engine)
    if len(previous) > 1:
        with write_tx(engine) as conn:
            conn.execute(update(signing_key).where(signing_key.c.kid.in_([r.kid for r in previous[1:]]))
                         .values(retired_ms=now_ms()))
    return key.kid or ""
