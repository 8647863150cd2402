"""What the health dashboard and the outbox monitor cost at a realistic size: 8 days of per-minute
rollups (what the gateway keeps) and an outbox of many items, mostly delivered.

    python bench/admin_ops.py [--database sqlite|postgresql] [--labels 24] [--items 100000] [--runs 20]

Loads the rows straight into a fresh database (a temporary SQLite file, or a gw_bench_<random>
PostgreSQL database dropped afterwards), then times the services the pages call (p50/p95 over
--runs calls): the dashboard over the last hour and the last day, the destinations panel, the first
page of items, a status-filtered page and a patient-filtered page. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import db, metrics  # noqa: E402
from gateway.admin import health  # noqa: E402
from gateway.admin import outbox as monitor  # noqa: E402
from gateway.admin.models import metric_rollup  # noqa: E402
from gateway.config import Settings  # noqa: E402

PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("appointment-request", "appointment-cancel", "refill-request", "message")


def load(engine: Any, labels: int, items: int) -> None:
    now = int(time.time()) // 60 * 60_000
    names = [(metrics.HL7_ROLLUP, s) for s in ("processed", "failed", "duplicate", "rejected")] + \
        [(metrics.HTTP_ROLLUP, f"{bp} {c}") for bp in ("fhir", "portal", "admin", "hl7", "smart_auth")
         for c in ("2xx", "3xx", "4xx", "5xx")] + \
        [(metrics.DEPTH_ROLLUP, "pending"), (metrics.DEPTH_ROLLUP, "failed")] + \
        [(metrics.DELIVERY_ROLLUP, f"delivered {k} hl7") for k in KINDS]
    names = names[:labels]
    rng = random.Random(3)
    minutes = 8 * 24 * 60
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    for m in range(minutes):
        for name, label in names:
            count = rng.randint(1, 60)
            batch.append({"minute_ms": now - m * 60_000, "name": name, "label": label, "count": count,
                          "total": count * rng.uniform(5, 80), "peak": rng.uniform(80, 400)})
        if len(batch) >= 20_000:
            with engine.begin() as conn:
                conn.execute(metric_rollup.insert(), batch)
            batch = []
    if batch:
        with engine.begin() as conn:
            conn.execute(metric_rollup.insert(), batch)
    print(f"rollups: {minutes * len(names):,} rows ({len(names)} labels a minute, 8 days) "
          f"in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    rows = []
    for n in range(items):
        status = "delivered" if n % 50 else rng.choice(("pending", "failed", "cancelled"))
        rows.append({"kind": KINDS[n % 4], "channel": "hl7", "status": status, "resource_type": "Communication",
                     "resource_id": f"r{n}", "version_id": 1, "patient_id": f"p{n % 5000}",
                     "idempotency_key": f"GW{n:018d}", "payload": "MSH|^~\\&|FHIR-GATEWAY|" + "x" * 400,
                     "attempts": 1, "next_attempt_ms": 0, "created_at": "2026-11-01T10:00:00.000Z",
                     "last_error": "AE: refused" if status == "failed" else None})
        if len(rows) >= 10_000:
            with engine.begin() as conn:
                conn.execute(db.outbox.insert(), rows)
            rows = []
    if rows:
        with engine.begin() as conn:
            conn.execute(db.outbox.insert(), rows)
    print(f"outbox: {items:,} items (2% not delivered) in {time.perf_counter() - started:.0f} s")
    db.analyze(engine)  # as the running gateway does once the tables have grown


def timed(runs: int, call: Callable[[], Any]) -> tuple[float, float]:
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(int(len(times) * 0.95), len(times) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--labels", type=int, default=24, help="rollup rows per minute (at most 34)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    pg_name = None
    if args.database == "sqlite":
        url = f"sqlite:///{tmp.name}/bench.sqlite"
    else:
        import psycopg

        pg_name = f"gw_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + pg_name
    try:
        engine = db.make_engine(url)
        db.upgrade(engine)
        load(engine, args.labels, args.items)
        settings = Settings.from_env(environ={}, database_url=url, instance_path=tmp.name,
                                     outbox_message="hl7", outbox_appointment_request="hl7", outbox_mllp_port=2576)
        print(f"\n{args.database}: p50 / p95 ms over {args.runs} calls")
        for name, call in (
                ("dashboard, last hour", lambda: health.dashboard(engine, "hour")),
                ("dashboard, last day", lambda: health.dashboard(engine, "day")),
                ("destinations panel", lambda: monitor.destinations(engine, settings)),
                ("items, first page", lambda: monitor.items(engine, monitor.Filters())),
                ("items, status failed", lambda: monitor.items(engine, monitor.Filters(status="failed"))),
                ("items, one patient", lambda: monitor.items(engine, monitor.Filters(patient="p4321")))):
            p50, p95 = timed(args.runs, call)
            print(f"  {name:<24} {p50:8.1f} {p95:8.1f}")
        engine.dispose()
    finally:
        if pg_name:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        tmp.cleanup()


if __name__ == "__main__":
    main()
