"""Three gateway processes against one PostgreSQL database, as a scaled-out deployment runs them.

Each process is a full `gateway serve` (gunicorn worker, MLLP listener), all with the same secret
key and base URL as they would have behind a load balancer. An HL7 feed is spread over the three
MLLP listeners with every message sent twice at once to two different listeners (a sender retrying
on another node): each message must be stored once as processed and once as a duplicate, its
resources written once (version 1), and every ACK positive. A SMART token issued by one process is
honoured by the others, and revoked at a third it is refused by all of them on the next request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway import build_services, db
from gateway.config import Settings
from gateway.hl7.mllp import send_messages
from tests.conftest import empty_tables, free_port
from tests.processes import gateway_env, gateway_process
from tests.smart_auth.conftest import REDIRECT, RequestsHttp, World, authorize_params, exchange, run_launch

PATIENTS = 12


def _adt(n: int, event: str = "A04", control: str = "SCALE", name: str = "Person") -> bytes:
    return (f"MSH|^~\\&|ADMIT|RIVERSIDE|GW|GW|2026110108{n:02d}00||ADT^{event}|{control}{n:04d}|P|2.5.1\r"
            f"PID|1||SC{n:05d}^^^RIVERSIDE^MR||Scale^{name}{n}||19800101|F\r"
            f"PV1|1|O|CLINIC^1^1\r").encode()


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[tuple[list[tuple[int, int]], Settings]]:
    """Three `gateway serve` processes on one PostgreSQL database: [(http port, mllp port)] and settings."""
    if not database_url.startswith("postgresql"):
        pytest.skip("several processes share a PostgreSQL database; SQLite is the one-process default")
    ports = [(free_port(), free_port()) for _ in range(3)]
    base = f"http://127.0.0.1:{ports[0][0]}"
    settings = Settings.from_env(environ={}, database_url=database_url, base_url=base, secret_key="shared-key",
                                 instance_path=str(tmp_path))
    engine = db.make_engine(database_url)
    empty_tables(engine)
    engine.dispose()
    env = gateway_env(GATEWAY_DATABASE_URL=database_url, GATEWAY_BASE_URL=base, GATEWAY_SECRET_KEY="shared-key",
                      GATEWAY_INSTANCE_PATH=str(tmp_path), GATEWAY_OUTBOX_WORKER_IN_SERVE="0",
                      GATEWAY_LOG_FORMAT="text")
    with contextlib.ExitStack() as nodes:
        for number, (http_port, mllp_port) in enumerate(ports):
            args = ["serve", "--port", str(http_port), "--mllp-port", str(mllp_port), "--workers", "1",
                    "--threads", "4"]
            log = tmp_path / f"node{number}.log"
            nodes.enter_context(gateway_process(args, env, log, ports=(http_port, mllp_port)))
        yield ports, settings


def test_three_processes_lose_nothing_apply_nothing_twice_and_agree_on_tokens(cluster: Any) -> None:
    ports, settings = cluster
    # Every message twice, at the same moment, through two different nodes.
    jobs = [(ports[n % 3][1], _adt(n)) for n in range(PATIENTS)] + \
           [(ports[(n + 1) % 3][1], _adt(n)) for n in range(PATIENTS)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        acks = list(pool.map(lambda job: send_messages("127.0.0.1", job[0], [job[1]], timeout=60)[0][0], jobs))
    assert all(b"MSA|AA|" in ack for ack in acks), [a for a in acks if b"MSA|AA|" not in a][:2]

    services = build_services(settings)
    try:
        with services.engine.connect() as conn:
            statuses = conn.execute(select(db.hl7_message.c.control_id, db.hl7_message.c.status,
                                           func.count()).group_by(db.hl7_message.c.control_id,
                                                                  db.hl7_message.c.status)).all()
            versions = dict(conn.execute(select(db.resource.c.id, db.resource.c.version_id)
                                         .where(db.resource.c.resource_type == "Patient")).all())
        by_id: dict[str, dict[str, int]] = {}
        for control_id, status, count in statuses:
            by_id.setdefault(control_id, {})[status] = count
        assert len(by_id) == PATIENTS
        assert all(seen == {"processed": 1, "duplicate": 1} for seen in by_id.values()), by_id
        assert len(versions) == PATIENTS and set(versions.values()) == {1}, versions

        # The same update re-sent at once under a new control id through another node: both are
        # processed (different messages), the Patient changes once.
        updates = [(ports[n % 3][1], _adt(n, "A08", "UPD", "Renamed")) for n in range(PATIENTS)] + \
                  [(ports[(n + 2) % 3][1], _adt(n, "A08", "RESEND", "Renamed")) for n in range(PATIENTS)]
        with ThreadPoolExecutor(max_workers=len(updates)) as pool:
            acks = list(pool.map(lambda job: send_messages("127.0.0.1", job[0], [job[1]], timeout=60)[0][0],
                                 updates))
        assert all(b"MSA|AA|" in ack for ack in acks), [a for a in acks if b"MSA|AA|" not in a][:2]
        with services.engine.connect() as conn:
            versions = dict(conn.execute(select(db.resource.c.id, db.resource.c.version_id)
                                         .where(db.resource.c.resource_type == "Patient")).all())
            processed = conn.execute(select(func.count()).where(db.hl7_message.c.status == "processed")).scalar()
        assert set(versions.values()) == {2}, versions
        assert processed == 3 * PATIENTS

        # Tokens: issued through node 0, used at nodes 1 and 2, revoked at node 2.
        World(services.smart, services.store).setup()
        nodes = [RequestsHttp(f"http://127.0.0.1:{http_port}") for http_port, _ in ports]
        params, verifier = authorize_params(settings.fhir_base)
        launch = run_launch(nodes[0], params, verifier, patient="Patient/maria-garcia")
        assert launch.location.startswith(REDIRECT)
        token = exchange(nodes[0], launch).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        for node in nodes:
            assert node.get("/fhir/Patient/maria-garcia", headers=bearer).status == 200
        assert nodes[2].post("/auth/revoke", {"token": token, "client_id": "public-app"}).status == 200
        for node in nodes:
            assert node.get("/fhir/Patient/maria-garcia", headers=bearer).status == 401
    finally:
        services.close()
