"""Revocation is immediate in every process, while each process keeps its token cache.

Two gateway instances on one database stand for two gunicorn workers: separate engines, separate
SmartAuth objects, separate token caches. Worker B has already cached the token (and keeps cached
tokens for an hour here, so expiry of its cache cannot be what makes it refuse); the change is made
through worker A, or by the `gateway` command in another OS process, and B refuses the token on
its very next request, with no sleep in between.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import create_app
from gateway.smart_auth import people
from tests.smart_auth.conftest import FlaskHttp, authorize_params, exchange, run_launch

ROOT = Path(__file__).resolve().parents[2]
SOFIA = "/fhir/Patient/sofia-garcia"


@pytest.fixture
def worker_b(settings: Any) -> Iterator[Any]:
    """A second app instance on the same database, with its own token cache kept an hour."""
    app = create_app(dataclasses.replace(settings, token_cache_seconds=3600))
    yield app
    app.extensions["gateway"].audit.flush()
    app.extensions["gateway"].close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(http: Any, fhir_base: str) -> dict[str, Any]:
    """Maria's token for Sofia, issued through worker A."""
    params, verifier = authorize_params(fhir_base, scope="launch/patient patient/*.rs offline_access")
    launch = run_launch(http, params, verifier, "maria", patient="Patient/sofia-garcia")
    reply = exchange(http, launch)
    assert reply.status == 200, reply.text
    return reply.json()


def _resolutions(app: Any, monkeypatch: Any) -> list[str]:
    """Count how often a worker really resolves a token (rather than reusing its cache)."""
    smart = app.extensions["gateway"].smart
    calls: list[str] = []
    resolve = smart._resolve

    def counting(access_hash: str) -> Any:
        calls.append(access_hash)
        return resolve(access_hash)

    monkeypatch.setattr(smart, "_resolve", counting)
    return calls


def _revoke_by_endpoint(a: Any, token: dict[str, Any], world: Any) -> None:
    reply = a.post("/auth/revoke", {"token": token["access_token"], "client_id": "public-app"})
    assert reply.status == 200, reply.text


def _revoke_on_apps_page(a: Any, token: dict[str, Any], world: Any) -> None:
    import re

    from tests.smart_auth.conftest import csrf

    page = a.get("/auth/apps")  # A's browser session is Maria's, from the launch
    grant_id = re.search(r'name="grant_id" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    assert a.post("/auth/apps", {"csrf_token": csrf(page.text), "grant_id": grant_id}).status == 302


def _reuse_refresh_token(a: Any, token: dict[str, Any], world: Any) -> None:
    # The stolen-token pattern: a refresh token already rotated shows up again, and the grant goes.
    reuse = a.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["stale_refresh"],
                                   "client_id": "public-app"})
    assert reuse.status == 400 and reuse.json()["error"] == "invalid_grant"


def _end_proxy(a: Any, token: dict[str, Any], world: Any) -> None:
    world.smart.revoke_proxy("maria", "sofia-garcia")


REVOCATIONS = {"revocation-endpoint": _revoke_by_endpoint, "connected-apps-page": _revoke_on_apps_page,
               "refresh-token-reuse": _reuse_refresh_token, "proxy-ended": _end_proxy}


@pytest.mark.parametrize("how", list(REVOCATIONS))
def test_revocation_in_one_worker_is_honoured_by_another_at_once(
        how: str, world: Any, app: Any, worker_b: Any, fhir_base: str, monkeypatch: Any) -> None:
    a = FlaskHttp(app.test_client())
    b = FlaskHttp(worker_b.test_client())
    token = _token(a, fhir_base)
    if how == "refresh-token-reuse":
        # Rotate once; B caches the new access token; then the old refresh token is presented again.
        rotated = a.post("/auth/token", {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                         "client_id": "public-app"}).json()
        token = {**rotated, "stale_refresh": token["refresh_token"]}
    resolutions = _resolutions(worker_b, monkeypatch)
    assert b.get(SOFIA, _bearer(token["access_token"])).status == 200
    assert b.get(SOFIA, _bearer(token["access_token"])).status == 200
    assert len(resolutions) == 1  # the second request was answered from B's cache

    REVOCATIONS[how](a, token, world)

    assert b.get(SOFIA, _bearer(token["access_token"])).status == 401
    assert len(resolutions) == 2  # the revocation made B look again, and it found the token dead


def test_a_revocation_by_another_os_process(world: Any, app: Any, worker_b: Any, settings: Any,
                                            fhir_base: str) -> None:
    """`gateway proxy revoke` in its own process; the caching worker here refuses on its next request."""
    a = FlaskHttp(app.test_client())
    b = FlaskHttp(worker_b.test_client())
    token = _token(a, fhir_base)
    assert b.get(SOFIA, _bearer(token["access_token"])).status == 200
    env = {**os.environ, "GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_INSTANCE_PATH": settings.instance_path,
           "GATEWAY_BASE_URL": settings.base_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "proxy", "revoke", "--username", "maria",
                           "--patient", "Patient/sofia-garcia"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert b.get(SOFIA, _bearer(token["access_token"])).status == 401


def test_unrelated_changes_leave_the_cache_in_use(world: Any, app: Any, worker_b: Any, fhir_base: str,
                                                  monkeypatch: Any) -> None:
    """Granting access, or revoking nothing, moves no generation: B keeps answering from its cache."""
    a = FlaskHttp(app.test_client())
    b = FlaskHttp(worker_b.test_client())
    token = _token(a, fhir_base)
    resolutions = _resolutions(worker_b, monkeypatch)
    assert b.get(SOFIA, _bearer(token["access_token"])).status == 200
    people.add_user(world.smart.engine, "newcomer", "a long password", "Patient/robert-chen")
    assert world.smart.revoke_proxy("linda", "sofia-garcia") == []  # no such relationship: nothing ends
    for _ in range(3):
        assert b.get(SOFIA, _bearer(token["access_token"])).status == 200
    assert len(resolutions) == 1


def test_the_generation_moves_on_once_per_revocation(app: Any) -> None:
    from gateway.db import write_tx
    from gateway.smart_auth import revocation

    engine = app.extensions["gateway"].engine
    start = revocation.current(engine)  # the tests empty every table: the upsert brings the row back
    for _ in range(2):
        with write_tx(engine) as conn:
            revocation.bump(conn)
        revocation.publish(engine)
    assert revocation.current(engine) == start + 2
    with pytest.raises(RuntimeError), write_tx(engine) as conn:
        revocation.bump(conn)
        raise RuntimeError("rolled back with the change it announced, so never published")
    assert revocation.current(engine) == start + 2


def test_a_cached_token_costs_no_database_call_on_sqlite(world: Any, app: Any, fhir_base: str,
                                                         monkeypatch: Any) -> None:
    """Checking a cached token: nothing asked of SQLite (a mapped counter), one read of PostgreSQL."""
    from sqlalchemy import event

    from gateway.smart_auth import revocation

    smart = app.extensions["gateway"].smart
    token = _token(FlaskHttp(app.test_client()), fhir_base)["access_token"]
    assert smart.principal_for(token) is not None
    statements: list[str] = []
    reads: list[int] = []
    read = revocation.DatabaseReader.read

    def counted(self: Any) -> int:
        reads.append(1)
        return read(self)

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    monkeypatch.setattr(revocation.DatabaseReader, "read", counted)
    event.listen(smart.engine, "before_cursor_execute", seen)
    try:
        for _ in range(3):
            assert smart.principal_for(token) is not None
    finally:
        event.remove(smart.engine, "before_cursor_execute", seen)
    assert statements == []  # the token itself is not looked up again
    assert len(reads) == (0 if smart.engine.dialect.name == "sqlite" else 3)


def test_the_migration_makes_the_counter_row(tmp_path: Path) -> None:
    from sqlalchemy import select

    from gateway import db
    from gateway.smart_auth.models import revocation_generation

    engine = db.make_engine(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    db.upgrade(engine)
    with engine.connect() as conn:
        assert [tuple(row) for row in conn.execute(select(revocation_generation))] == [(1, 0)]
    engine.dispose()


def test_the_shared_counter_loses_no_increment(tmp_path: Path) -> None:
    """Two mappings of one file stand for two processes; increments from both, in threads, all count."""
    import threading

    from gateway.smart_auth.revocation import SharedCounter

    path = str(tmp_path / "gateway.sqlite.revocations")
    one, other = SharedCounter(path), SharedCounter(path)
    assert one.read() == other.read() == 0

    def bump(counter: SharedCounter) -> None:
        for _ in range(200):
            counter.increment()

    threads = [threading.Thread(target=bump, args=(c,)) for c in (one, other, one, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert one.read() == other.read() == 800


def test_the_database_reader_replaces_a_lost_connection(app: Any) -> None:
    from gateway.smart_auth.revocation import DatabaseReader

    reader = DatabaseReader(app.extensions["gateway"].engine)
    first = reader.read()
    connection = reader._connection()
    if hasattr(connection, "autocommit"):
        assert connection.autocommit is True  # no transaction left open between reads
    connection.close()  # as a database restart would leave it
    assert reader.read() == first
    reader.close()
