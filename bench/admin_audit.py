"""The console's audit log at size: search latency per filter, and export throughput and memory.

Fills a fresh database with AuditEvents as gateway.audit writes them (one per patient touched; agents,
clients, actions and patients drawn from fixed pools; recorded spread over 90 days), then times
gateway.admin.audit.find (the console's search: the FHIR store's search with a security officer's
Principal, newest first, 50 a page) for each kind of filter, and exports a week and the whole log as
NDJSON and CSV (gateway.admin.audit.export), with the Python heap's peak during the export.

    python bench/admin_audit.py [--events 200000] [--database sqlite|postgresql] [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import access, build_services, db  # noqa: E402
from gateway.admin import audit as console_audit  # noqa: E402
from gateway.audit import AuditRecord, audit_events  # noqa: E402
from gateway.config import Settings  # noqa: E402

PATIENTS = 5000
STAFF = 30
CLIENTS = 12
DAYS = 90
END = datetime(2026, 6, 30, tzinfo=UTC)
INTERACTIONS = ["read"] * 60 + ["search"] * 25 + ["create"] * 6 + ["update"] * 5 + \
    ["console:search-audit", "console:execute-revoke-grant", "console:update-message", "console:view-client"]


def _records(count: int, rng: random.Random) -> list[AuditRecord]:
    out = []
    for _ in range(count):
        interaction = rng.choice(INTERACTIONS)
        patient = f"p{rng.randrange(PATIENTS)}"
        if interaction.startswith("console:"):
            agent, client = f"staff:staff{rng.randrange(STAFF)}", None
        elif rng.random() < 0.5:
            agent, client = f"Patient/{patient}", "portal"
        else:
            agent, client = f"Patient/{patient}", f"app-{rng.randrange(CLIENTS)}"
        when = END - timedelta(seconds=rng.randrange(DAYS * 86400))
        recorded = when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        out.append(AuditRecord(interaction, agent, client, "10.1.2.3", "0", f"/fhir/Observation?patient={patient}",
                               (f"Patient/{patient}",), (), recorded))
    return out


def _fill(services: Any, events: int) -> float:
    rng = random.Random(11)
    started = time.perf_counter()
    done = 0
    while done < events:
        batch = _records(min(2000, events - done), rng)
        with services.store.writing(durable=False) as repo:
            repo.create_many([e for r in batch for e in audit_events(r, set())])
        done += len(batch)
        if done % 20000 == 0:
            print(f"  {done:,} events stored", flush=True)
    return done / (time.perf_counter() - started)


def _timed(run: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    times, result = [], None
    run()  # warm (plans, caches)
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], result


def _drain(services: Any, officer: Any, filters: dict[str, str], fmt: str) -> tuple[int, int]:
    """Run an export to the end as a response would stream it; returns (bytes, lines)."""
    _query, chunks = console_audit.export(services, officer, console_audit.parse_filters(filters), fmt)
    size = lines = 0
    for chunk in chunks:
        size += len(chunk.encode())
        lines += chunk.count("\n")
    return size, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sqlite-file", default=None,
                        help="keep the SQLite database here; a file already filled is reused as it is")
    parser.add_argument("--pg-database", default=None,
                        help="use (and keep) this PostgreSQL database; one already filled is reused as it is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg_name = None
        if args.database == "sqlite":
            url = f"sqlite:///{args.sqlite_file or tmp + '/bench.sqlite'}"
        else:
            import psycopg

            name = args.pg_database or f"gw_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{name}"')
            pg_name = None if args.pg_database else name
            url = args.pg_admin_url.rsplit("/", 1)[0] + "/" + name
        try:
            _run(url, tmp, args)
        finally:
            if pg_name:
                import psycopg

                with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


def _run(url: str, tmp: str, args: argparse.Namespace) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    settings = Settings.from_env(environ={}, database_url=url, base_url="http://localhost", instance_path=tmp)
    services = build_services(settings)
    with services.engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(db.resource).where(
            db.resource.c.resource_type == "AuditEvent")).scalar_one()
    if stored:
        print(f"reusing the {stored:,} AuditEvents in {url}")
    else:
        print(f"filling {args.events:,} AuditEvents on {args.database} ...", flush=True)
        rate = _fill(services, args.events)
        with services.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        print(f"stored at {rate:,.0f} events/s")
    officer = access.principal_for_staff(username="bench", roles={"security-officer"})
    rng = random.Random(5)
    day = (END - timedelta(days=10)).date().isoformat()

    def find(**filters: str) -> Callable[[], Any]:
        parsed = console_audit.parse_filters(filters)
        return lambda: console_audit.find(services, officer, parsed)

    cases: list[tuple[str, Callable[[], Callable[[], Any]]]] = [
        ("newest 50, no filter", lambda: find()),
        ("the last day (the page's default)", lambda: find(**{"from": (END - timedelta(days=1)).date().isoformat()})),
        ("patient", lambda: find(patient=f"p{rng.randrange(PATIENTS)}")),
        ("user (staff, exact)", lambda: find(user=f"staff:staff{rng.randrange(STAFF)}")),
        ("user (patient login)", lambda: find(user=f"Patient/p{rng.randrange(PATIENTS)}")),
        ("client", lambda: find(client=f"app-{rng.randrange(CLIENTS)}")),
        ("action read (60% of events)", lambda: find(action="read")),
        ("action execute-revoke-grant", lambda: find(action="execute-revoke-grant")),
        ("one day", lambda: find(**{"from": day, "to": day})),
        ("patient + 30 days", lambda: find(patient=f"p{rng.randrange(PATIENTS)}", **{"from": "2026-06-01",
                                                                                    "to": "2026-06-30"})),
    ]
    print(f"\n{'search (50 a page, newest first)':40} {'p50 ms':>8} {'p95 ms':>8} {'rows':>6}")
    for label, make in cases:
        p50, p95, page = _timed(lambda make=make: make()(), args.repeats)  # type: ignore[misc]
        print(f"{label:40} {p50:8.1f} {p95:8.1f} {len(page.entries):6}")
    # The next page of a search costs what the first does (keyset: no offset to skip).
    first = console_audit.find(services, officer, console_audit.parse_filters({}))
    parsed = console_audit.parse_filters({})
    p50, p95, _ = _timed(lambda: console_audit.find(services, officer, parsed, cursor=first.next_cursor),
                         args.repeats)
    print(f"{'second page, no filter':40} {p50:8.1f} {p95:8.1f}")

    print(f"\n{'export':40} {'events':>9} {'events/s':>9} {'MB out':>7} {'peak heap MB':>13}")
    week = {"from": (END - timedelta(days=6)).date().isoformat(), "to": END.date().isoformat()}
    for label, filters in (("one week", week), ("whole log", {})):
        for fmt in ("ndjson", "csv"):
            # Timed without tracemalloc (it slows Python down), then run again to measure the heap.
            started = time.perf_counter()
            size, lines = _drain(services, officer, filters, fmt)
            seconds = time.perf_counter() - started
            tracemalloc.start()
            _drain(services, officer, filters, fmt)
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            events = lines - (1 if fmt == "csv" else 0)
            print(f"{label + ' ' + fmt:40} {events:9,} {events / seconds:9,.0f} {size / 1e6:7.1f} {peak / 1e6:13.1f}")
    services.audit.close()
    services.engine.dispose()


if __name__ == "__main__":
    main()
