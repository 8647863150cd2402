"""The revocation generation: how a revocation in one process reaches the token caches of all.

Each process keeps what it learnt about a bearer token for a few seconds (SmartAuth.principal_for),
so that a request does not re-run the token, grant and proxy queries. Every change that takes
access away (a grant revoked through the revocation endpoint, the connected-apps page, a reused
refresh token or code; a proxy relationship ended) calls `bump` in its own transaction, so the new
value is visible exactly when the change is. A cached token is reused only while `current` still
returns the value it was cached under: one primary-key read per request, and a revocation committed
by any process is honoured by every process on its next request.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from gateway.smart_auth.models import revocation_generation

ROW_ID = 1
_CURRENT = f"SELECT generation FROM revocation_generation WHERE id = {ROW_ID}"


def current(engine: Engine) -> int:
    """The generation now (0 before the first bump).

    Every request with a cached token pays for this, so it is one statement outside any
    transaction on a pooled DBAPI connection: a transaction around it would add BEGIN and ROLLBACK,
    and each call into the database driver releases the GIL and may wait for it to come back
    (under load, behind the audit writer's thread), which costs more than the read itself.
    """
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        autocommit = getattr(driver, "autocommit", None)
        if autocommit is False:  # psycopg; SQLite connections here run outside transactions already
            driver.autocommit = True
        try:
            cursor = raw.cursor()
            cursor.execute(_CURRENT)
            row = cursor.fetchone()
            cursor.close()
        finally:
            if autocommit is False:
                driver.autocommit = False
    finally:
        raw.close()
    return int(row[0]) if row else 0


def bump(conn: Connection) -> None:
    """Move the generation on, inside the caller's transaction; call it last in that transaction,
    after the change it announces (the row lock is then held only until the commit)."""
    table = revocation_generation
    # An upsert: the row is made by the migration, but a database emptied table by table (tests)
    # must not lose the announcement.
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(id=ROW_ID, generation=1)
    conn.execute(statement.on_conflict_do_update(index_elements=[table.c.id],
                                                 set_={"generation": table.c.generation + 1}))
