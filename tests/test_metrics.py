"""Metrics: counted where things happen, exposed at /metrics in the Prometheus text format, and
rolled up per minute into metric_rollup by every process (gateway.metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import KeySet, RSAKey
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from gateway import db, metrics
from gateway.admin.models import metric_rollup
from gateway.smart_auth import admin
from tests.hl7.test_ingest import adt
from tests.smart_auth.conftest import REDIRECT, World

ROOT = Path(__file__).resolve().parents[1]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rollups(engine: Any, name: str) -> dict[str, tuple[int, float, float]]:
    """{label: (count, total, peak)} of a rollup summed over its minutes."""
    out: dict[str, tuple[int, float, float]] = {}
    with engine.connect() as conn:
        for row in conn.execute(select(metric_rollup).where(metric_rollup.c.name == name)):
            count, total, peak = out.get(row.label, (0, 0.0, 0.0))
            out[row.label] = (count + row.count, total + row.total, max(peak, row.peak))
    return out


def post_hl7(client: Any, text: str) -> Any:
    return client.post("/hl7/v2", data=text, content_type="application/hl7-v2")


def test_an_hl7_message_over_http_is_counted_and_rolled_up(app: Any, client: Any) -> None:
    engine = app.extensions["gateway"].engine
    processed = value("gateway_hl7_messages_total", status="processed", channel="http")
    acks = value("gateway_hl7_ack_seconds_count", channel="http")
    requests = value("gateway_http_requests_total", method="POST", route="/hl7/v2", status="2xx")
    assert post_hl7(client, adt("M1")).status_code == 200
    assert post_hl7(client, adt("M1")).status_code == 200  # the same again: a duplicate
    assert post_hl7(client, adt("M2").replace("|P|2.5.1", "|X|2.5.1")).status_code == 200  # refused: AR
    assert post_hl7(client, "no header at all").status_code == 400
    assert value("gateway_hl7_messages_total", status="processed", channel="http") == processed + 1
    assert value("gateway_hl7_messages_total", status="duplicate", channel="http") >= 1
    assert value("gateway_hl7_ack_seconds_count", channel="http") == acks + 3  # the unreadable one got no ACK
    assert value("gateway_http_requests_total", method="POST", route="/hl7/v2", status="2xx") == requests + 3
    metrics.flush()
    rolled = rollups(engine, metrics.HL7_ROLLUP)
    assert {label: c for label, (c, _t, _p) in rolled.items()} == \
        {"processed": 1, "duplicate": 1, "rejected": 1, "unreadable": 1}
    _count, total, peak = rolled["processed"]
    assert 0 < peak == total < 60_000  # milliseconds from receipt to the ACK
    assert rolled["unreadable"][1] == 0  # no ACK, no latency
    http = rollups(engine, metrics.HTTP_ROLLUP)
    assert http["hl7 2xx"][0] == 3 and http["hl7 4xx"][0] == 1


def test_metrics_is_the_prometheus_text_format_without_patient_data(app: Any, client: Any) -> None:
    with app.extensions["gateway"].store.writing() as repo:
        for status in ("pending", "pending", "failed", "delivered"):
            repo.conn.execute(insert(db.outbox).values(
                kind="message", channel="hl7", status=status, resource_type="Communication",
                resource_id=f"c-{status}-{time.monotonic_ns()}", version_id=1, patient_id="mrn-secret-patient",
                idempotency_key=f"K{time.monotonic_ns()}", payload="MSH|...", attempts=0, next_attempt_ms=0,
                created_at="2026-01-01T00:00:00.000Z"))
    post_hl7(client, adt("P1", mrn="MRN-VISIBLE-NOWHERE", family="Secretname"))
    client.get("/fhir/Patient/nobody")
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.content_type.startswith("text/plain; version=")
    text = reply.get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"gateway_http_requests", "gateway_http_request_duration_seconds", "gateway_hl7_messages",
            "gateway_hl7_ack_seconds", "gateway_outbox_deliveries", "gateway_tokens_issued",
            "gateway_outbox_depth", "gateway_outbox_failed"} <= set(families)
    assert families["gateway_outbox_depth"].samples[0].value == 2
    assert families["gateway_outbox_failed"].samples[0].value == 1
    routes = {s.labels.get("route") for s in families["gateway_http_requests"].samples}
    assert "/fhir/<rtype>/<rid>" in routes and "/fhir/Patient/nobody" not in routes  # templates, not paths
    for secret in ("MRN-VISIBLE-NOWHERE", "Secretname", "mrn-secret-patient", "nobody"):
        assert secret not in text


def test_metrics_can_require_a_token(app: Any, client: Any) -> None:
    app.extensions["gateway"].settings.metrics_token = "scrape-token-123"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-token-123"}).status_code == 200


def test_tokens_are_counted_by_grant_type(app: Any, client: Any) -> None:
    key = RSAKey.generate_key(2048, {"kid": "k1"}, private=True)
    engine = app.extensions["gateway"].engine
    admin.register_client(engine, "backend", [REDIRECT], jwks=KeySet([key]).as_dict(private=False),
                          scope="system/*.rs")
    world = World(None, None, rsa=key)
    before = value("gateway_tokens_issued_total", grant_type="client_credentials")
    token_url = "http://testserver/auth/token"
    form = {"grant_type": "client_credentials", "scope": "system/*.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
    assert client.post("/auth/token", data={**form, "client_assertion": world.assertion("backend", token_url)}) \
        .status_code == 200
    assert client.post("/auth/token", data={**form, "client_assertion": "not a jwt"}).status_code in (400, 401)
    assert value("gateway_tokens_issued_total", grant_type="client_credentials") == before + 1  # refusals are not
    metrics.flush()
    assert rollups(engine, metrics.TOKEN_ROLLUP) == {"client_credentials": (1, 0.0, 0.0)}


def test_rollups_add_to_what_the_table_holds(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    minute = int(time.time()) // 60 * 60_000 - 3_600_000  # recent: the writer's pruning leaves it alone
    metrics.add_rows(engine, [{"minute_ms": minute, "name": "x", "label": "a", "count": 2, "total": 30.0,
                               "peak": 20.0}])
    metrics.add_rows(engine, [{"minute_ms": minute, "name": "x", "label": "a", "count": 1, "total": 50.0,
                               "peak": 50.0},
                              {"minute_ms": minute, "name": "x", "label": "b", "count": 1, "total": 1.0,
                               "peak": 1.0}])
    metrics.add_rows(engine, [{"minute_ms": minute, "name": "x", "label": "a", "count": 1, "total": 5.0,
                               "peak": 5.0}])
    assert rollups(engine, "x") == {"a": (4, 85.0, 50.0), "b": (1, 1.0, 1.0)}
    assert metrics.prune(engine, minute) == 0
    assert metrics.prune(engine, minute + 1) == 2 and rollups(engine, "x") == {}


def test_the_writer_samples_the_outbox_depth_and_prunes_old_minutes(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    now = time.time()
    old = int(now * 1000) - 9 * 86_400_000
    metrics.add_rows(engine, [{"minute_ms": old // 60_000 * 60_000, "name": "x", "label": "", "count": 1,
                               "total": 0.0, "peak": 0.0}])
    rollup = metrics.Rollups()
    rollup.attach(engine, 3600, keep_days=8)  # no thread (nothing was counted): the test drives it
    rollup.sample_depth = True
    rollup.maintain(now)
    rollup.flush()
    assert rollups(engine, "x") == {}
    assert rollups(engine, metrics.DEPTH_ROLLUP) == {"pending": (1, 0.0, 0.0), "failed": (1, 0.0, 0.0)}
    rollup.maintain(now + 1)  # the next sample is not due yet
    assert rollup.flush() == 0


def test_several_processes_add_up_in_metrics_and_in_the_rollups(app: Any, settings: Any, tmp_path: Path) -> None:
    """Two processes count HL7 messages in multiprocess mode; a third renders /metrics: the sum of
    both. Both processes' rollups land in the same minute row."""
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc), "PYTHONPATH": str(ROOT)}
    count = textwrap.dedent(f"""
        import sys
        from gateway import db, metrics
        from gateway.config import Settings
        engine = db.make_engine({settings.database_url!r})
        metrics.ROLLUPS.attach(engine, 3600)
        for _ in range(int(sys.argv[1])):
            metrics.hl7_message("processed", "mllp", 0.01)
        metrics.flush()
    """)
    for n in ("2", "3"):
        subprocess.run([sys.executable, "-c", count, n], env=env, check=True, timeout=60)
    render = textwrap.dedent(f"""
        import json
        from prometheus_client.parser import text_string_to_metric_families
        from gateway import db, metrics
        text = metrics.exposition(db.make_engine({settings.database_url!r})).decode()
        samples = {{s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.labels.get("channel") == "mllp" and s.labels.get("status", "processed") == "processed"}}
        print(json.dumps(samples))
    """)
    out = subprocess.run([sys.executable, "-c", render], env=env, check=True, timeout=60, capture_output=True,
                         text=True).stdout
    samples = json.loads(out.strip().splitlines()[-1])
    assert samples["gateway_hl7_messages_total"] == 5
    assert samples["gateway_hl7_ack_seconds_count"] == 5
    rolled = rollups(app.extensions["gateway"].engine, metrics.HL7_ROLLUP)
    assert rolled["processed"][0] == 5  # (unless the minute turned between the two: then two rows)


@pytest.mark.parametrize("method", ["GET", "BREW"])
def test_unknown_methods_and_routes_do_not_grow_the_label_sets(client: Any, method: str) -> None:
    before = value("gateway_http_requests_total", method="other" if method == "BREW" else "GET",
                   route="unmatched", status="4xx")
    client.open(f"/no/such/path/{time.monotonic_ns()}", method=method)
    after = value("gateway_http_requests_total", method="other" if method == "BREW" else "GET",
                  route="unmatched", status="4xx")
    assert after == before + 1
