"""What flows through the gateway, counted: Prometheus metrics at GET /metrics and per-minute
rollups in the database for the console's health dashboard, both from the same calls.

Counted where it happens:
- HTTP requests by method, route template and status class, and their latency (init_app's hooks);
- HL7v2 messages by outcome (processed, failed, rejected, duplicate, unreadable) and the time from
  receipt to the ACK being ready (gateway.hl7.ingest, for MLLP and HTTP alike);
- outbox deliveries by result (delivered, failed, retry) (gateway.upstream.outbox);
- access tokens issued by grant type (gateway.smart_auth.views);
- the outbox depth (pending items) and failed items, read from the database at each scrape.

The instrumentation calls sit on hot paths (every FHIR read, every HL7 message), so each costs a
dictionary lookup of the label set's cached child, an increment or observation, and an addition to
an in-memory rollup under a lock: a few microseconds, no I/O. A daemon thread per process writes the
rollups every GATEWAY_METRICS_FLUSH_SECONDS with an upsert that adds to what is there (INSERT ... ON
CONFLICT DO UPDATE on SQLite and PostgreSQL), so every process (HTTP workers, the MLLP listener, the
outbox worker) contributes to the same minute; it also samples the outbox depth and prunes rollups
older than GATEWAY_METRICS_KEEP_DAYS. What is left is flushed at exit.

Several processes: Prometheus counters live in each process's memory, so a scrape that reaches one
of several gunicorn workers would see only that worker's counts. With PROMETHEUS_MULTIPROC_DIR set
(before the process starts: prometheus_client decides at import), every process writes its values
to files in that directory and /metrics adds them up (prometheus_client's multiprocess mode).
`gateway serve` sets it to a fresh directory of its own when it is not set.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Flask, Request, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, case, delete, func, select

from gateway import db
from gateway.admin.models import metric_rollup

log = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series would double /metrics and say nothing a restart does not

MINUTE_MS = 60_000
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GRANT_TYPES = frozenset({"authorization_code", "refresh_token", "client_credentials"})
HL7_STATUSES = ("processed", "failed", "rejected", "duplicate", "unreadable")
DELIVERY_RESULTS = ("delivered", "failed", "retry")
SAMPLE_SECONDS = 15.0  # how often a process samples the outbox depth into the rollups
PRUNE_SECONDS = 3600.0

# Rollup names (metric_rollup.name) and what their label holds.
HTTP_ROLLUP = "http_requests"  # "<blueprint> <status class>", e.g. "fhir 2xx"; total/peak: latency in ms
HL7_ROLLUP = "hl7_messages"  # the outcome; total/peak: ms from receipt to ACK ready (0 when unreadable)
DELIVERY_ROLLUP = "outbox_deliveries"  # "<result> <kind> <channel>"
DEPTH_ROLLUP = "outbox_depth"  # "pending" or "failed"; one sample per row count, total/peak: items
TOKEN_ROLLUP = "tokens_issued"  # the grant type

HTTP_REQUESTS = Counter("gateway_http_requests", "HTTP requests answered",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram("gateway_http_request_duration_seconds",
                         "Time from the request reaching the app to its response being ready",
                         ["method", "route"],
                         buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
HL7_MESSAGES = Counter("gateway_hl7_messages", "HL7v2 messages received, by outcome", ["status", "channel"])
HL7_ACK_SECONDS = Histogram("gateway_hl7_ack_seconds", "Time from receiving an HL7v2 message to its ACK being ready "
                            "(after the commit)", ["channel"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
OUTBOX_DELIVERIES = Counter("gateway_outbox_deliveries", "Outbox delivery attempts, by result",
                            ["result", "kind", "channel"])
TOKENS = Counter("gateway_tokens_issued", "Access tokens issued, by grant type", ["grant_type"])


# --- per-minute rollups ---

class Rollups:
    """Per-minute sums (count, total, peak) of this process, written to metric_rollup by a thread."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.flush_seconds = 5.0
        self.keep_days = 8
        self._pending: dict[tuple[int, str, str], list[float]] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # held by a round of the writer thread, and by detach()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._next_sample = 0.0
        self._next_prune = 0.0
        self._exit_hook = False
        self.sample_depth = False  # the outbox workers' processes sample it (one sampler is enough)

    def attach(self, engine: Engine, flush_seconds: float = 5.0, keep_days: int = 8) -> None:
        """Write this process's rollups to `engine` from now on (what was counted before goes to the
        database it was counted for)."""
        if engine is not self.engine:
            self.flush()
        self.engine, self.flush_seconds, self.keep_days = engine, flush_seconds, keep_days

    def add(self, name: str, label: str, value: float = 0.0) -> None:
        key = (int(time.time() // 60) * MINUTE_MS, name, label)
        with self._lock:
            if self._pid != os.getpid():
                self._forked()
            cell = self._pending.get(key)
            if cell is None:
                self._pending[key] = [1, value, value]
            else:
                cell[0] += 1
                cell[1] += value
                if value > cell[2]:
                    cell[2] = value
            running = self._thread is not None
        if not running:
            self.start()

    def _forked(self) -> None:
        """A forked child (a gunicorn worker) starts empty: what the parent counted is the parent's to
        write, its thread did not come along, and its lock may have been held at the fork."""
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._pid = os.getpid()
        self._pending = {}
        self._thread = None
        self._wake = threading.Event()

    def start(self, sample_depth: bool = False) -> None:
        """The writer thread of this process (started by the first count). `gateway worker` starts it
        at once, sampling the outbox depth, so that the depth is known while nothing else happens."""
        with self._lock:
            self.sample_depth = self.sample_depth or sample_depth
            if self._pid != os.getpid():
                self._forked()
            if self._thread is not None or self.engine is None:
                return
            self._thread = threading.Thread(target=self._run, name="metrics-rollups", daemon=True)
            self._thread.start()
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True

    def _run(self) -> None:
        while not self._wake.wait(self.flush_seconds):
            try:
                with self._writing:
                    self.maintain()
                    self.flush()
            except Exception as exc:  # the writer must outlive a database hiccup; it is logged and tried again
                db.log_failure(log, "writing metric rollups", exc)

    def maintain(self, now: float | None = None) -> None:
        """Sample the outbox depth and prune old rollups when they are due."""
        engine = self.engine
        if engine is None:
            return
        now = time.time() if now is None else now
        if self.sample_depth and now >= self._next_sample:
            self._next_sample = now + SAMPLE_SECONDS
            with engine.connect() as conn:
                counts = outbox_counts(conn)
            for status, items in counts.items():
                self.add(DEPTH_ROLLUP, status, float(items))
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_SECONDS
            prune(engine, int(now * 1000) - self.keep_days * 86_400_000)

    def flush(self) -> int:
        """Write what was counted; returns the number of rows written (added to)."""
        with self._lock:
            if self._pid != os.getpid():
                self._forked()
            pending, self._pending = self._pending, {}
            engine = self.engine
        if not pending or engine is None:
            return 0
        rows = [{"minute_ms": minute, "name": name, "label": label, "count": int(cell[0]), "total": cell[1],
                 "peak": cell[2]} for (minute, name, label), cell in sorted(pending.items())]
        try:
            add_rows(engine, rows)
        except Exception:
            with self._lock:  # keep them for the next round rather than lose them
                for key, cell in pending.items():
                    mine = self._pending.setdefault(key, [0, 0.0, cell[2]])
                    mine[0] += cell[0]
                    mine[1] += cell[1]
                    mine[2] = max(mine[2], cell[2])
            raise
        return len(rows)

    def detach(self, engine: Engine) -> None:
        """Write what was counted to `engine`, then nothing more, if the rollups go there. Waits
        for a round of the writer thread that may be using it."""
        if self.engine is not engine:
            return
        with self._writing:
            self.flush()
            with self._lock:
                if self.engine is engine:
                    self.engine = None

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        self._wake.set()
        try:
            self.flush()
        except Exception as exc:  # at exit there is nobody left to tell but the log
            log.warning("the last metric rollups of this process are lost: %s", str(exc).splitlines()[0])


ROLLUPS = Rollups()
os.register_at_fork(after_in_child=ROLLUPS._forked)


def add_rows(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Add rollup rows to what the table holds (count and total summed, peak the larger). Rows in
    key order, so that two processes adding to the same minutes never wait on each other in a cycle."""
    table = metric_rollup
    with db.write_tx(engine, durable=False) as conn:  # a lost minute of counts is no lost record
        if db.is_postgres(conn):
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        statement = insert(table)
        added = statement.excluded
        conn.execute(statement.on_conflict_do_update(
            index_elements=[table.c.minute_ms, table.c.name, table.c.label],
            set_={"count": table.c.count + added["count"], "total": table.c.total + added.total,
                  "peak": case((added.peak > table.c.peak, added.peak), else_=table.c.peak)}), rows)


def prune(engine: Engine, before_ms: int) -> int:
    with db.write_tx(engine, durable=False) as conn:
        return conn.execute(delete(metric_rollup).where(metric_rollup.c.minute_ms < before_ms)).rowcount or 0


def outbox_counts(conn: Connection) -> dict[str, int]:
    """Pending (the depth) and failed outbox items, counted over the (status, next_attempt_ms) index."""
    ob = db.outbox.c
    found = dict(conn.execute(select(ob.status, func.count()).where(ob.status.in_(("pending", "failed")))
                              .group_by(ob.status)).all())
    return {"pending": int(found.get("pending", 0)), "failed": int(found.get("failed", 0))}


def flush() -> int:
    """Write this process's rollups now (tests, commands that end)."""
    return ROLLUPS.flush()


def attach(engine: Engine, settings: Any) -> None:
    ROLLUPS.attach(engine, settings.metrics_flush_seconds, settings.metrics_keep_days)


def detach(engine: Engine) -> None:
    ROLLUPS.detach(engine)


# --- the instrumentation calls ---

_http_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """The metric's child for these label values, looked up once (labels() takes a lock each time)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def http_request(method: str, route: str, blueprint: str, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    status_class = f"{status // 100}xx"
    key = (method, route, status_class)
    children = _http_children.get(key)
    if children is None:
        children = (HTTP_REQUESTS.labels(method, route, status_class), HTTP_SECONDS.labels(method, route))
        _http_children[key] = children
    children[0].inc()
    children[1].observe(seconds)
    ROLLUPS.add(HTTP_ROLLUP, f"{blueprint} {status_class}", seconds * 1000)


def hl7_message(status: str, channel: str, seconds: float | None) -> None:
    """One received message's outcome; seconds from receipt to its ACK being ready (None: no ACK)."""
    _child(HL7_MESSAGES, status, channel).inc()
    if seconds is not None:
        _child(HL7_ACK_SECONDS, channel).observe(seconds)
    ROLLUPS.add(HL7_ROLLUP, status, (seconds or 0.0) * 1000)


def outbox_delivery(result: str, kind: str, channel: str) -> None:
    _child(OUTBOX_DELIVERIES, result, kind, channel).inc()
    ROLLUPS.add(DELIVERY_ROLLUP, f"{result} {kind} {channel}")


def token_issued(grant_type: str | None) -> None:
    grant = grant_type if grant_type in GRANT_TYPES else "other"
    _child(TOKENS, grant).inc()
    ROLLUPS.add(TOKEN_ROLLUP, grant)


# --- the web side: request hooks and GET /metrics ---

bp = Blueprint("metrics", __name__)


def init_app(app: Flask) -> None:
    """Count every request of the app, and serve GET /metrics."""
    app.request_class = CountedRequest
    app.wsgi_app = RequestCounter(app.wsgi_app)  # type: ignore[method-assign]
    app.register_blueprint(bp)


ROUTED = "gateway.request"


class CountedRequest(Request):
    """Flask's request, left in the WSGI environ for RequestCounter to read the matched route from
    once the response is made (Flask clears environ["werkzeug.request"] at the end of a request)."""

    def __init__(self, environ: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(environ, *args, **kwargs)
        environ[ROUTED] = self


class RequestCounter:
    """WSGI middleware around the Flask app: each request counted by method, route template and
    status class, with its latency from the request reaching the app to its response starting.
    Cheaper than Flask request hooks (no context-local lookups), and it also covers what runs
    before and after them."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        status = 500  # unless the app starts a response

        def counting_start_response(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status
            status = int(status_line[:3])
            return start_response(status_line, headers, exc_info)

        try:
            return self.wsgi_app(environ, counting_start_response)
        finally:
            # popped: the request and the environ must not keep each other alive
            rule = getattr(environ.pop(ROUTED, None), "url_rule", None)
            if rule is None:
                http_request(environ.get("REQUEST_METHOD", ""), "unmatched", "app", status,
                             time.perf_counter() - started)
            else:
                http_request(environ.get("REQUEST_METHOD", ""), rule.rule, rule.endpoint.rpartition(".")[0] or "app",
                             status, time.perf_counter() - started)


class OutboxCollector(Collector):
    """The outbox depth and failed items, read from the database when scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        with self.engine.connect() as conn:
            counts = outbox_counts(conn)
        depth = GaugeMetricFamily("gateway_outbox_depth", "Outbox items waiting to be delivered (status pending)")
        depth.add_metric([], counts["pending"])
        failed = GaugeMetricFamily("gateway_outbox_failed", "Outbox items that failed and wait for a person")
        failed.add_metric([], counts["failed"])
        return [depth, failed]


def exposition(engine: Engine) -> bytes:
    """The Prometheus text format: this process's metrics, or every process's in multiprocess mode,
    and the outbox gauges from the database."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    outbox = CollectorRegistry(auto_describe=False)
    outbox.register(OutboxCollector(engine))
    return generate_latest(registry) + generate_latest(outbox)


@bp.get("/metrics")
def metrics() -> Response:
    services = current_app.extensions["gateway"]
    token = services.settings.metrics_token
    if token:
        header = request.headers.get("Authorization", "")
        presented = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(presented.encode(), token.encode()):
            return Response("A bearer token is required (GATEWAY_METRICS_TOKEN).\n", 401,
                            {"WWW-Authenticate": 'Bearer realm="metrics"'}, content_type="text/plain; charset=utf-8")
    response = Response(exposition(services.engine), 200, content_type=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response
