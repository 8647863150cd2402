#!/usr/bin/env python3
"""The console's HL7 message browser on a million stored messages: lookups through the service and
over HTTP, with the query plans behind them.

    python bench/admin_messages.py                          # SQLite, 1,000,000 messages
    python bench/admin_messages.py --database postgresql    # a fresh gw_bench_<random> database, dropped after
    python bench/admin_messages.py --rows 100000 --lookups 200 --http-lookups 100   # quick run

What it does:
1. Creates a fresh database (a SQLite file in a temporary folder, or a PostgreSQL database of its own
   on --pg-admin-url) at the latest migration.
2. Bulk-loads --rows hl7_message rows in batches of --batch: raw text from the fhir-converter corpus
   (every message there, each copy with its own MSH-3 sender, MSH-10 control id and PID-3 MRN), types
   and versions as in those messages, statuses processed 90%, duplicate 4%, failed 3%, ignored 1%,
   received 0.2% (with their errors, ACKs, notes), 100,000 patients, received times over 30 days in
   arrival order. The secondary indexes of hl7_message are dropped for the load and built after it,
   then the planner's statistics are refreshed (what `gateway db upgrade` and the app's analyser do).
3. Prints the plan of every browser query on the loaded table (EXPLAIN QUERY PLAN / EXPLAIN) and
   flags a scan of the whole table.
4. Random lookups, one at a time: by control id, by MRN, the first page of one day, a deep page of
   one day through the cursor, a deep page of the failed messages; baseline: one message fetched by
   primary key. Through gateway.admin.messages.find in this process (--lookups each), then over HTTP
   (--http-lookups each) against `gateway serve` (gunicorn, 2 workers) signed in as an operator
   through the login and TOTP forms, with /healthz as the baseline and the message page as an extra.
5. Prints p50/p95/p99 and each p95 as a ratio of its baseline's p95; the target is p95 <= 100 ms for
   every lookup. Writes bench/results/admin_messages-<database>-<time>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pyotp  # noqa: E402
import requests  # noqa: E402
from fhir_api import HOST, Server, free_port, machine_busy, self_cpu  # noqa: E402
from signin import sign_in  # noqa: E402
from sqlalchemy import Index, select, text  # noqa: E402

from gateway import db  # noqa: E402
from gateway.admin import messages as service  # noqa: E402
from gateway.admin.staff import add_staff  # noqa: E402
from gateway.hl7 import ack as acks  # noqa: E402
from gateway.hl7 import parse  # noqa: E402

CORPUS = Path("/work/shared/corpus/hl7/fhir-converter")
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS_DIR = ROOT / "bench" / "results"
TIMEZONE = "America/New_York"
DAYS = 30
PATIENTS = 100_000
TARGET_P95_MS = 100.0
STAFF_PASSWORD = "bench operator 2026"
TOTP_SECRET = pyotp.random_base32()
SENDERS = [("EPIC", "RIVERSIDE", 40), ("CERNER-LAB", "RIVERSIDE-LAB", 20), ("RADIANT", "RIVERSIDE-RAD", 10),
           ("PHARMACY", "RIVERSIDE-RX", 10), ("CADENCE", "RIVERSIDE", 8), ("MEDITECH", "NORTHSIDE", 7),
           ("OUTREACH-LIS", "QUESTLAB", 5)]
STATUSES = [("processed", 900), ("duplicate", 40), ("failed", 30), ("ignored", 10), ("received", 2)]
ERRORS = [("event ADT^A04 is not translated", "201", "MSH-9.2"),
          ("PID-7 is not a date: '19861340'", "102", "PID-7"),
          ("resource rejected: Observation.valueQuantity.value is not a number", "207", None),
          ("translation failed: KeyError: 'OBX-2'", "207", "OBX[3]-2")]
COLUMNS = ["id", "received_at", "received_ms", "channel", "peer", "sending_app", "sending_facility", "control_id",
           "message_type", "version", "content_hash", "status", "flagged", "duplicate_of", "error", "error_code",
           "error_location", "ack", "patient_id", "mrn", "raw", "ack_ms", "note"]


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] if ordered else 0.0


# --- the corpus, turned into row templates ---

@dataclass
class Template:
    msh: list[str]  # the MSH line split on the field separator: index n is MSH-(n+1)
    rest: str  # the segments after MSH, CR-separated
    separator: str
    component: str
    mrn: str | None
    message_type: str
    version: str
    ack: str  # an ACK for it (AA), with the template's control id in MSA-2
    control_id: str


def load_templates(corpus: Path) -> list[Template]:
    templates = []
    for path in sorted(corpus.glob("*.hl7")):
        try:
            text_ = parse.normalize(parse.decode(path.read_bytes())).strip("\r") + "\r"
            header = parse.read_header(text_)
        except parse.ParseError:
            continue
        if not text_.startswith("MSH") or not header.control_id:
            continue
        first, _, rest = text_.partition("\r")
        sep = header.field_separator
        templates.append(Template(
            msh=first.split(sep), rest=rest, separator=sep, component=header.separators.component,
            mrn=parse.first_mrn(text_), message_type=header.message_code_and_trigger or "UNKNOWN",
            version=header.version, ack=acks.build_ack(header, "AA"), control_id=header.control_id))
    if not templates:
        raise SystemExit(f"no HL7 messages in {corpus}")
    return templates


def weighted(choices: list[tuple[Any, int]], rng: random.Random, n: int) -> list[Any]:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices], k=n)


class Rows:
    """Generates rows in arrival order (ids and received times rise together, as the ingest makes them)."""

    def __init__(self, templates: list[Template], total: int, end: datetime, seed: int = 7) -> None:
        self.templates = templates
        self.total = total
        self.rng = random.Random(seed)
        start_ms = int((end - timedelta(days=DAYS)).timestamp() * 1000)
        end_ms = int(end.timestamp() * 1000)
        self.times = sorted(self.rng.randrange(start_ms, end_ms) for _ in range(total))
        self.mrns = [f"E{n:07d}" for n in self.rng.sample(range(1, 10_000_000), PATIENTS)]
        self.samples: dict[str, list[Any]] = {"control_id": [], "mrn": [], "id": []}

    def batch(self, first_id: int, count: int) -> list[tuple[Any, ...]]:
        rng = self.rng
        senders = weighted([((a, f), w) for a, f, w in SENDERS], rng, count)
        statuses = weighted(STATUSES, rng, count)
        out = []
        for n in range(count):
            row_id = first_id + n
            template = rng.choice(self.templates)
            app, facility = senders[n]
            control = f"{app[:3]}{row_id:09d}{rng.randrange(100):02d}"
            mrn = rng.choice(self.mrns)
            msh = list(template.msh)
            msh[2] = app + (msh[2][msh[2].find(template.component):] if template.component in msh[2] else "")
            msh[3] = facility
            msh[9] = control
            body = template.rest.replace(template.mrn, mrn) if template.mrn else template.rest
            raw = template.separator.join(msh) + "\r" + body
            status = statuses[n]
            received_ms = self.times[row_id - 1]
            instant = datetime.fromtimestamp(received_ms / 1000, UTC)
            received_at = instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{received_ms % 1000:03d}Z"
            error = error_code = error_location = note = duplicate_of = None
            ack = template.ack.replace(template.control_id, control)
            if status == "failed" or status == "ignored":
                error, error_code, error_location = rng.choice(ERRORS)
                ack = ack.replace("MSA|AA|", "MSA|AE|")
                note = "test feed from the vendor's validation system" if status == "ignored" else None
            elif status == "duplicate":
                duplicate_of = max(1, row_id - rng.randrange(1, 5000))
            elif status == "received":
                ack = None
            patient_id = f"RIVERSIDE-{mrn}" if status in ("processed", "duplicate") else None
            ack_ms = None if status == "received" else max(1, int(rng.lognormvariate(2.7, 0.5)))
            out.append((row_id, received_at, received_ms, "mllp" if rng.random() < 0.9 else "http",
                        f"10.20.{rng.randrange(8)}.{rng.randrange(2, 250)}", app, facility, control,
                        template.message_type, template.version, hashlib.sha256(raw.encode()).hexdigest(), status,
                        rng.random() < 0.002, duplicate_of, error, error_code, error_location, ack, patient_id, mrn,
                        raw, ack_ms, note))
            if rng.random() < 0.002:
                self.samples["control_id"].append(control)
                self.samples["mrn"].append(mrn)
        return out


# --- the database ---

class Database:
    def __init__(self, kind: str, pg_admin: str, workdir: Path) -> None:
        self.kind = kind
        self.pg_admin = pg_admin
        self.name = ""
        if kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'gateway.sqlite'}"
        else:
            import psycopg

            self.name = f"gw_bench_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = pg_admin.rsplit("/", 1)[0] + "/" + self.name

    def drop(self) -> None:
        if self.kind == "postgresql" and self.name:
            import psycopg

            with psycopg.connect(self.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def secondary_indexes() -> list[Index]:
    return sorted(db.hl7_message.indexes, key=lambda index: index.name or "")


def bulk_load(engine: Any, rows: Rows, batch: int) -> float:
    """Insert every row; returns the seconds spent (index builds and statistics included)."""
    started = time.perf_counter()
    with engine.begin() as conn:
        for index in secondary_indexes():
            index.drop(conn)
    placeholders = ", ".join("?" for _ in COLUMNS)
    done = 0
    next_report = rows.total // 20 or 1
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        if engine.dialect.name == "sqlite":
            driver.execute("PRAGMA synchronous=OFF")
            driver.execute("PRAGMA cache_size=-262144")
        while done < rows.total:
            count = min(batch, rows.total - done)
            data = rows.batch(done + 1, count)
            if engine.dialect.name == "sqlite":
                driver.execute("BEGIN")
                driver.executemany(f"INSERT INTO hl7_message ({', '.join(COLUMNS)}) VALUES ({placeholders})", data)
                driver.execute("COMMIT")
            else:
                with driver.cursor() as cursor, cursor.copy(
                        f"COPY hl7_message ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in data:
                        copy.write_row(row)
                driver.commit()
            done += count
            if done >= next_report or done == rows.total:
                elapsed = time.perf_counter() - started
                log(f"  loaded {done:,} / {rows.total:,} ({100 * done / rows.total:.0f}%), "
                    f"{done / elapsed:,.0f} rows/s")
                next_report += rows.total // 20 or 1
    finally:
        raw.close()
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:  # ids were given: the sequence must continue after them
            conn.execute(text("SELECT setval(pg_get_serial_sequence('hl7_message', 'id'), :n)"), {"n": rows.total})
    log("  building the secondary indexes of hl7_message ...")
    for index in secondary_indexes():
        began = time.perf_counter()
        with engine.begin() as conn:
            index.create(conn)
        log(f"    {index.name}: {time.perf_counter() - began:.1f} s")
    db.analyze(engine)
    return time.perf_counter() - started


# --- lookups ---

@dataclass
class Lookup:
    name: str
    label: str
    filters: Callable[[random.Random], service.Filters]
    cursor: Callable[[random.Random, service.Filters], str | None]


def day_of(rng: random.Random, end: datetime) -> date:
    zone = ZoneInfo(TIMEZONE)
    last = end.astimezone(zone).date()
    return last - timedelta(days=rng.randrange(1, DAYS - 1))  # whole days inside the loaded month


def lookups(rows: Rows, end: datetime, engine: Any) -> list[Lookup]:
    def day_filters(rng: random.Random) -> service.Filters:
        day = day_of(rng, end)
        return service.Filters(received_from=day, received_to=day)

    def inside_day(rng: random.Random, filters: service.Filters) -> str:
        start_ms, end_ms = service.day_bounds(filters, TIMEZONE)
        assert start_ms is not None and end_ms is not None
        with engine.connect() as conn:
            low = conn.execute(select(db.hl7_message.c.id).where(db.hl7_message.c.received_ms >= start_ms)
                               .order_by(db.hl7_message.c.received_ms).limit(1)).scalar()
            high = conn.execute(select(db.hl7_message.c.id).where(db.hl7_message.c.received_ms < end_ms)
                                .order_by(db.hl7_message.c.received_ms.desc()).limit(1)).scalar()
        return service.encode_cursor(rng.randrange(low, high))

    return [
        Lookup("control_id", "by control id", lambda rng: service.Filters(
            control_id=rng.choice(rows.samples["control_id"])), lambda rng, f: None),
        Lookup("mrn", "by MRN", lambda rng: service.Filters(mrn=rng.choice(rows.samples["mrn"])), lambda rng, f: None),
        Lookup("day_first", "a day, first page", day_filters, lambda rng, f: None),
        Lookup("day_deep", "a day, deep page (cursor)", day_filters, inside_day),
        Lookup("failed_deep", "failed, deep page (cursor)", lambda rng: service.Filters(status="failed"),
               lambda rng, f: service.encode_cursor(rng.randrange(1, rows.total))),
    ]


def plan_of(engine: Any, filters: service.Filters, cursor: str | None) -> list[str]:
    with engine.connect() as conn:
        query = service.list_query(conn, filters, TIMEZONE, cursor)
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        if engine.dialect.name == "postgresql":
            return list(conn.execute(text("EXPLAIN " + sql)).scalars())
        return [row[-1] for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql))]


def summarize(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 2), "p95_ms": round(percentile(values, 95), 2),
            "p99_ms": round(percentile(values, 99), 2), "max_ms": round(max(values, default=0.0), 2)}


def timed(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        out.append((time.perf_counter() - began) * 1000)
    return out


def prepared(kind: Lookup, rng: random.Random, n: int) -> list[tuple[service.Filters, str | None]]:
    """The lookups' arguments, made before the clock starts (a deep page's cursor costs queries of its own)."""
    out = []
    for _ in range(n):
        filters = kind.filters(rng)
        out.append((filters, kind.cursor(rng, filters)))
    return out


def service_phase(engine: Any, kinds: list[Lookup], n: int, total: int) -> dict[str, Any]:
    rng = random.Random(11)
    results: dict[str, Any] = {}
    columns = [c for c in db.hl7_message.c if c.name != "raw"]
    keys = [rng.randrange(1, total + 1) for _ in range(n + 50)]

    def by_key() -> None:
        with engine.connect() as conn:
            conn.execute(select(*columns).where(db.hl7_message.c.id == keys.pop())).one()

    timed(by_key, 50)  # warm the pool
    results["baseline_pk"] = summarize(timed(by_key, n))
    for kind in kinds:
        found: list[int] = []
        pending = iter(prepared(kind, rng, n))

        def one(pending: Any = pending, found: list[int] = found) -> None:
            filters, cursor = next(pending)
            found.append(len(service.find(engine, filters, cursor, TIMEZONE).messages))

        results[kind.name] = {**summarize(timed(one, n)), "rows_avg": round(sum(found) / len(found), 1)}
        if not any(found):
            raise RuntimeError(f"{kind.name}: every lookup came back empty; the benchmark is wrong")
    return results


def list_url(base: str, filters: service.Filters, cursor: str | None) -> str:
    query = filters.query() + ([("after", cursor)] if cursor else [])
    return f"{base}/admin/messages?" + urlencode(query)


def http_phase(base: str, session: requests.Session, kinds: list[Lookup], n: int, total: int) -> dict[str, Any]:
    rng = random.Random(13)
    results: dict[str, Any] = {}
    rows_seen = re.compile(r'<tr id="message-')

    def get(url: str, expect_rows: list[int] | None = None) -> None:
        reply = session.get(url, timeout=30)
        if reply.status_code != 200:
            raise RuntimeError(f"{url}: {reply.status_code}")
        if expect_rows is not None:
            expect_rows.append(len(rows_seen.findall(reply.text)))

    timed(lambda: get(f"{base}/healthz"), 50)
    results["baseline_healthz"] = summarize(timed(lambda: get(f"{base}/healthz"), n))
    for kind in kinds:
        urls = iter([list_url(base, f, c) for f, c in prepared(kind, rng, n)])
        found: list[int] = []
        results[kind.name] = summarize(timed(lambda urls=urls, found=found: get(next(urls), found), n))
        if not any(found):
            raise RuntimeError(f"{kind.name}: every page over HTTP was empty; the benchmark is wrong")
    ids = iter([rng.randrange(1, total + 1) for _ in range(n)])
    results["message_page"] = summarize(timed(lambda: get(f"{base}/admin/messages/{next(ids)}"), n))
    return results


class CpuWatch:
    """Where the machine's CPU went during a phase, as shares of all cores: this process, the server's
    process tree, and everything else (other work on the machine makes latencies worse)."""

    def __init__(self, server: Server | None = None) -> None:
        self.server = server
        self.began = time.monotonic()
        self.machine = machine_busy()
        self.own = self_cpu()
        self.served = server.cpu() if server else 0.0

    def shares(self) -> dict[str, float]:
        capacity = (time.monotonic() - self.began) * (os.cpu_count() or 1)
        machine = machine_busy() - self.machine
        own = self_cpu() - self.own
        served = (self.server.cpu() - self.served) if self.server else 0.0
        return {"bench": round(own / capacity, 3), "server": round(served / capacity, 3),
                "other": round(max(0.0, machine - own - served) / capacity, 3)}


def report(title: str, figures: dict[str, Any], baseline: str, labels: dict[str, str],
           cpu: dict[str, float]) -> dict[str, str]:
    base = figures[baseline]["p95_ms"] or 1e-9
    print(f"\n{title}")
    print(f"  CPU, share of all cores: bench {cpu['bench']:.0%}, server {cpu['server']:.0%}, "
          f"other processes {cpu['other']:.0%}")
    print(f"  {'lookup':<30} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  {'p95 / baseline':>14}  target")
    verdicts = {}
    for name, values in figures.items():
        ratio = values["p95_ms"] / base
        target = ""
        if name in labels and name not in (baseline, "message_page"):
            ok = values["p95_ms"] <= TARGET_P95_MS
            verdicts[name] = "PASS" if ok else "MISS"
            target = verdicts[name]
        print(f"  {labels.get(name, name):<30} {values['n']:>6} {values['p50_ms']:>8} {values['p95_ms']:>8} "
              f"{values['p99_ms']:>8}  {ratio:>13.1f}x  {target}")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=1000, help="per lookup kind, through the service")
    parser.add_argument("--http-lookups", type=int, default=300, help="per lookup kind, over HTTP")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-admin-messages-"))
    database = Database(args.database, args.pg_admin_url, workdir)
    server: Server | None = None
    results: dict[str, Any] = {"when": datetime.now().isoformat(timespec="seconds"), "database": args.database,
                               "rows": args.rows, "workers": args.workers}
    labels = {"baseline_pk": "baseline: one row by primary key", "baseline_healthz": "baseline: GET /healthz",
              "control_id": "by control id", "mrn": "by MRN", "day_first": "a day, first page",
              "day_deep": "a day, deep page (cursor)", "failed_deep": "failed, deep page (cursor)",
              "message_page": "(extra) one message's page"}
    try:
        engine = db.make_engine(database.url)
        db.upgrade(engine)
        templates = load_templates(args.corpus)
        end = datetime.now(UTC)
        log(f"{args.database}: generating {args.rows:,} messages from {len(templates)} corpus messages "
            f"over {DAYS} days")
        rows = Rows(templates, args.rows, end)
        seconds = bulk_load(engine, rows, args.batch)
        results["load_seconds"] = round(seconds, 1)
        results["load_rows_per_s"] = round(args.rows / seconds)
        if database.kind == "sqlite":
            size = Path(database.url.removeprefix("sqlite:///")).stat().st_size
        else:
            with engine.connect() as conn:
                size = conn.execute(text("SELECT pg_total_relation_size('hl7_message')")).scalar_one()
        results["table_bytes"] = size
        log(f"loaded {args.rows:,} messages in {seconds:.0f} s ({args.rows / seconds:,.0f}/s), "
            f"{size / 2**30:.2f} GiB")

        kinds = lookups(rows, end, engine)
        plan_rng = random.Random(5)
        print("\nquery plans on the loaded table")
        scans = []
        plans: dict[str, list[str]] = {}
        some_day = day_of(plan_rng, end)
        extra = [("sender", service.Filters(sender="RADIANT"), None),
                 ("type", service.Filters(message_type="ORU^R01"), None),
                 ("status", service.Filters(status="failed"), None),
                 ("sender+type", service.Filters(sender="CERNER-LAB", message_type="ORU^R01"), None),
                 ("failed+days", service.Filters(status="failed", received_from=some_day - timedelta(days=3),
                                                 received_to=some_day), None)]
        for name, filters, cursor in [(k.name, (f := k.filters(plan_rng)), k.cursor(plan_rng, f)) for k in kinds] \
                + extra:
            plan = plan_of(engine, filters, cursor)
            plans[name] = plan
            whole = any(("Seq Scan on hl7_message" in line) or line.strip() == "SCAN hl7_message" for line in plan)
            if whole:
                scans.append(name)
            print(f"  {name}{'  <-- SCANS THE TABLE' if whole else ''}")
            for line in plan:
                print(f"      {line}")
        results["plans"] = plans
        results["whole_table_scans"] = scans

        log(f"through the service: {args.lookups} lookups of each kind")
        watch = CpuWatch()
        results["service"] = service_phase(engine, kinds, args.lookups, args.rows)
        results["service_cpu"] = watch.shares()

        username = "bench-operator"
        add_staff(engine, username, STAFF_PASSWORD, ["operator"], totp_secret=TOTP_SECRET)
        port = free_port()
        env = dict(os.environ, GATEWAY_DATABASE_URL=database.url, GATEWAY_BASE_URL=f"http://{HOST}:{port}",
                   GATEWAY_SECRET_KEY="bench-admin-messages", GATEWAY_INSTANCE_PATH=str(workdir),
                   GATEWAY_OUTBOX_WORKER_IN_SERVE="0", GATEWAY_TIMEZONE=TIMEZONE,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        engine.dispose()
        server = Server(env, port, args.workers, workdir / "server.log", extra_args=("--mllp-port", "0"))
        log(f"starting gateway serve ({args.workers} workers)")
        server.start(ready_timeout=120)
        session = sign_in(server.base_url, username, STAFF_PASSWORD, totp_secret=TOTP_SECRET,
                          start="/admin/messages", expect='id="message-filters"')
        log(f"over HTTP: {args.http_lookups} lookups of each kind, signed in as an operator")
        watch = CpuWatch(server)
        results["http"] = http_phase(server.base_url, session, kinds, args.http_lookups, args.rows)
        results["http_cpu"] = watch.shares()
    finally:
        if server is not None:
            server.stop()
        database.drop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nHL7 message browser, {args.rows:,} messages, {args.database}; loaded in {results['load_seconds']} s "
          f"({results['load_rows_per_s']:,} rows/s), table {results['table_bytes'] / 2**30:.2f} GiB")
    verdicts = report("through the service (gateway.admin.messages.find, one at a time)", results["service"],
                      "baseline_pk", labels, results["service_cpu"])
    verdicts.update({f"http_{k}": v for k, v in report(
        f"over HTTP (gateway serve, {args.workers} workers, one signed-in operator, one request at a time)",
        results["http"], "baseline_healthz", labels, results["http_cpu"]).items()})
    print(f"\n  target: p95 <= {TARGET_P95_MS:.0f} ms for every lookup: "
          f"{'PASS' if all(v == 'PASS' for v in verdicts.values()) else 'MISS'}; "
          f"plans scanning the whole table: {', '.join(scans) or 'none'}")
    results["verdicts"] = verdicts
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"admin_messages-{args.database}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"  written to {out}")
    return 0 if all(v == "PASS" for v in verdicts.values()) and not scans else 1


if __name__ == "__main__":
    sys.exit(main())
