"""Which results and messages a login has opened: "new" is what it has not."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine, select

from gateway.db import write_tx
from gateway.portal.models import portal_seen
from gateway.smart_auth.people import now_ms


def seen_of(engine: Engine, user_id: int, references: Iterable[str]) -> set[str]:
    """The references among these that the login has opened."""
    wanted = sorted(set(references))
    seen: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            seen.update(conn.execute(select(portal_seen.c.reference).where(
                portal_seen.c.user_id == user_id, portal_seen.c.reference.in_(chunk))).scalars())
    return seen


def mark_seen(engine: Engine, user_id: int, references: Iterable[str]) -> None:
    """Mark these opened (idempotent: a second opening keeps the first time)."""
    wanted = set(references)
    if not wanted:
        return
    already = seen_of(engine, user_id, wanted)
    fresh = sorted(wanted - already)
    if not fresh:
        return
    now = now_ms()
    with write_tx(engine, durable=False) as conn:
        existing = set(conn.execute(select(portal_seen.c.reference).where(
            portal_seen.c.user_id == user_id, portal_seen.c.reference.in_(fresh))).scalars())
        rows = [{"user_id": user_id, "reference": ref, "seen_ms": now} for ref in fresh if ref not in existing]
        if rows:
            conn.execute(portal_seen.insert(), rows)
