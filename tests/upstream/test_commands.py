"""`gateway outbox list|retry`, the outbox worker inside `gateway serve`, and FHIR batch fallbacks."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import responses
from click.testing import CliRunner
from sqlalchemy import select

from gateway import build_services, db
from gateway.cli import main
from gateway.config import Settings
from gateway.upstream.client import UpstreamClient
from gateway.upstream.outbox import Worker
from tests.conftest import free_port
from tests.processes import gateway_env, gateway_process
from tests.upstream import records
from tests.upstream.conftest import Receiver

ROOT = Path(__file__).resolve().parents[2]


def sqlite_services(tmp_path: Path, **overrides: Any) -> Any:
    url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    settings = Settings.from_env(environ={}, database_url=url, instance_path=str(tmp_path), audit_enabled=False,
                                 **overrides)
    services = build_services(settings)
    with services.store.writing() as repo:
        repo.update("Patient", "p1", records.patient())
        repo.update("Practitioner", "dr1", records.practitioner())
    return services


def test_outbox_list_and_retry_commands(tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "AR"
    services = sqlite_services(tmp_path, outbox_message="hl7", outbox_mllp_port=receiver.port)
    with services.store.writing() as repo:
        repo.create(records.message(), resource_id="c1")
    Worker(services.store, services.settings).run_once()
    env = {"GATEWAY_DATABASE_URL": services.settings.database_url, "GATEWAY_INSTANCE_PATH": str(tmp_path),
           "GATEWAY_AUDIT_ENABLED": "0"}
    runner = CliRunner(env=env)
    listed = runner.invoke(main, ["outbox", "list", "--status", "failed"], catch_exceptions=False)
    assert "failed    message" in listed.output and "Communication/c1" in listed.output
    assert "AR: rejected by test" in listed.output and "1 items with status failed" in listed.output
    item_id = listed.output.split()[0]
    assert runner.invoke(main, ["outbox", "retry", item_id]).output.strip().endswith("queued again")
    assert runner.invoke(main, ["outbox", "list", "--status", "failed"]).output.strip() == "0 items with status failed"
    assert runner.invoke(main, ["outbox", "retry", "999"]).exit_code != 0


@responses.activate
def test_fhir_batches_fall_back_to_single_creates_and_judge_each_entry(tmp_path: Path) -> None:
    """Batch Bundles (GATEWAY_OUTBOX_FHIR_BUNDLE_TYPE=batch): each entry's answer is its item's."""
    base = "https://ehr.example/fhir"
    services = sqlite_services(tmp_path, outbox_message="fhir", upstream_fhir_url=base,
                               outbox_fhir_bundle_type="batch")
    with services.store.writing() as repo:
        for n in range(3):
            repo.create(records.message(f"c{n}"), resource_id=f"c{n}")
    client = UpstreamClient(base, None, sleep=lambda _s: None)
    worker = Worker(services.store, services.settings, client)
    responses.post(base, status=501)  # no batch support
    for n in range(3):
        responses.post(f"{base}/Communication", status=201, headers={"Location": f"{base}/Communication/u{n}"},
                       json={"resourceType": "Communication", "id": f"u{n}"})
    assert worker.run_once() == 3 and worker.delivered == 3
    singles = [c.request for c in responses.calls if c.request.url.endswith("/Communication")]
    assert len(singles) == 3
    assert all(r.headers["If-None-Exist"].startswith("identifier=urn:fhir-gateway:outbox|GW") for r in singles)
    responses.reset()
    with services.store.writing() as repo:
        for n in range(3, 6):
            repo.create(records.message(f"c{n}"), resource_id=f"c{n}")
    responses.post(base, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "201 Created", "location": "Communication/x/_history/1"}},
        {"response": {"status": "422 Unprocessable Entity", "outcome": {
            "resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "bad recipient"}]}}},
        {"response": {"status": "503 Service Unavailable"}}]})
    worker.run_once()
    sent = json.loads(responses.calls[0].request.body)
    assert sent["type"] == "batch" and all(e["request"]["ifNoneExist"] for e in sent["entry"])
    with services.engine.connect() as conn:
        rows = conn.execute(select(db.outbox.c.resource_id, db.outbox.c.status, db.outbox.c.last_error)
                            .where(db.outbox.c.resource_id.in_(["c3", "c4", "c5"])).order_by(db.outbox.c.id)).all()
    assert [(r.resource_id, r.status) for r in rows] == [("c3", "delivered"), ("c4", "failed"), ("c5", "pending")]
    assert "bad recipient" in rows[1].last_error
    services.close()


def test_gateway_serve_runs_an_outbox_worker(tmp_path: Path, receiver: Receiver) -> None:
    services = sqlite_services(tmp_path)
    services.close()
    port = free_port()
    env = gateway_env(GATEWAY_DATABASE_URL=services.settings.database_url, GATEWAY_OPEN_ACCESS="1",
                      GATEWAY_INSTANCE_PATH=str(tmp_path), GATEWAY_OUTBOX_MESSAGE="hl7",
                      GATEWAY_OUTBOX_MLLP_PORT=str(receiver.port), GATEWAY_OUTBOX_POLL_INTERVAL="0.1")
    log_path = tmp_path / "serve.log"
    args = ["serve", "--port", str(port), "--mllp-port", "0", "--workers", "1", "--threads", "2"]
    with gateway_process(args, env, log_path, ports=(port,), stop_timeout=60):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/fhir/Communication", method="POST",
                                         data=json.dumps(records.message()).encode(),
                                         headers={"Content-Type": "application/fhir+json"})
        assert urllib.request.urlopen(request, timeout=30).status == 201
        deadline = time.monotonic() + 30
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(receiver.received) == 1 and "MDM^T02" in receiver.messages[0]
    assert "Outbox:    1 worker" in log_path.read_text(errors="replace")


@responses.activate
def test_a_refused_transaction_sends_its_items_one_by_one(tmp_path: Path) -> None:
    base = "https://ehr.example/fhir"
    services = sqlite_services(tmp_path, outbox_message="fhir", upstream_fhir_url=base)
    with services.store.writing() as repo:
        for n in range(3):
            repo.create(records.message(f"c{n}"), resource_id=f"c{n}")
    responses.post(base, status=422, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "Bundle.entry[1]: bad recipient"}]})
    responses.post(f"{base}/Communication", status=201, json={"resourceType": "Communication", "id": "u0"})
    responses.post(f"{base}/Communication", status=422, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "bad recipient"}]})
    responses.post(f"{base}/Communication", status=201, json={"resourceType": "Communication", "id": "u2"})
    worker = Worker(services.store, services.settings, UpstreamClient(base, None, sleep=lambda _s: None))
    assert worker.run_once() == 3
    assert json.loads(responses.calls[0].request.body)["type"] == "transaction"
    with services.engine.connect() as conn:
        rows = conn.execute(select(db.outbox.c.resource_id, db.outbox.c.status).order_by(db.outbox.c.id)).all()
    assert [tuple(r) for r in rows] == [("c0", "delivered"), ("c1", "failed"), ("c2", "delivered")]
    services.close()
