"""AuditEvent for every read, search and write of patient data, written off the request path.

Writing one AuditEvent synchronously per read would cost as much as the read itself, so records
go into a bounded in-memory queue that a background thread drains in batches (one transaction per
batch). When the queue is full, request threads wait for room: records are never dropped. The
queue is flushed on shutdown (atexit), and `flush()` lets tests and commands wait for it.

When the writer cannot keep up, because the database does not take the records (down, or its disk
full, while reads still work) or it is far behind, new requests are refused before they touch any
data (`keeping_up()`, checked for every request in `gateway/__init__.py`): a 503 that says so, not
a request that hangs on a full queue until the server stops answering. The last tenth of the queue
is left for the requests already in flight, so theirs still go in.

The request pays only for putting a tuple on the queue. The writer thread gathers records for up
to `max_delay` seconds, works out the patients from the versions that were served, and writes the
batch with one multi-row insert in one transaction: one commit per batch rather than one fsync per
event, and as little Python work as possible (it holds the GIL that request threads wait for).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, func, insert, select

from gateway import db
from gateway.fhir.dates import now_instant
from gateway.fhir.indexer import compartment_patients
from gateway.fhir.store import FhirStore, NewResource, new_resources

log = logging.getLogger(__name__)

ACTIONS = {
    "read": "R", "vread": "R", "search": "E", "history": "R", "everything": "E", "create": "C",
    "update": "U", "patch": "U", "delete": "D", "transaction": "E", "batch": "E",
}
# Actions in the operator console are recorded as "console:<verb>-<what>" (e.g. console:update-message):
# their own event type, the action as subtype, the verb giving the CRUDE letter.
# While the database is down or full, a batch is tried again after 0.5 s, 1 s, 2 s ... at most 5 s.
UNAVAILABLE_RETRY_BASE, UNAVAILABLE_RETRY_MAX = 0.5, 5.0
CONSOLE = "console:"
CONSOLE_TYPE = {"system": "urn:gateway:audit-event-type", "code": "console", "display": "Operator console action"}
CONSOLE_ACTION_SYSTEM = "urn:gateway:console-action"
CONSOLE_VERBS = {"view": "R", "search": "E", "export": "E", "create": "C", "update": "U", "delete": "D",
                 "execute": "E"}
SUBTYPES = {
    "read": "read", "vread": "vread", "search": "search-type", "history": "history-instance",
    "everything": "operation", "create": "create", "update": "update", "patch": "patch",
    "delete": "delete", "transaction": "transaction", "batch": "batch",
}


@dataclass(frozen=True)
class AuditRecord:
    interaction: str
    agent: str
    client_id: str | None
    address: str | None
    outcome: str  # "0" success, "4" minor failure (refused), "8" serious failure
    query: str | None
    entities: tuple[str, ...]  # references of what was touched
    contents: tuple[str, ...]  # the JSON served or written, to find the patients it belongs to
    recorded: str
    description: str | None = None


def _patients(contents: tuple[str, ...]) -> set[str]:
    """Patients whose compartments the served versions lie in, read from those versions themselves:
    the database may already hold a later version (re-pointed or deleted) when the batch is written.
    orjson because this runs for every audited resource; decimals do not matter here."""
    patients: set[str] = set()
    for content in contents:
        try:
            patients |= compartment_patients(orjson.loads(content))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return patients


def audit_events(record: AuditRecord, patients: set[str]) -> list[dict[str, Any]]:
    """One AuditEvent per patient whose data the interaction touched (or one naming no patient).

    An AuditEvent lies in the compartment of every patient it names, and a patient may read their
    own access log; so one event never names two patients, nor lists the resources or the query of
    an interaction that reached several.
    """
    patients = set(patients)
    for ref in record.entities:
        if ref.startswith("Patient/"):
            patients.add(ref.split("/", 1)[1])
    if len(patients) <= 1:
        return [audit_event(record, patients)]
    shared = AuditRecord(record.interaction, record.agent, record.client_id, record.address, record.outcome,
                         None, (), (), record.recorded, record.description)
    return [audit_event(shared, {p}) for p in sorted(patients)]


def audit_event(record: AuditRecord, patients: set[str]) -> dict[str, Any]:
    entities: list[dict[str, Any]] = [{"what": {"reference": ref}} for ref in record.entities]
    entities += [
        {"what": {"reference": f"Patient/{p}"},
         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1",
                  "display": "Patient"}}
        for p in sorted(patients) if f"Patient/{p}" not in record.entities
    ]
    if record.query:
        entities.append({"type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                                  "code": "2", "display": "System Object"},
                         "query": _b64(record.query), "description": record.query[:1000]})
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser" if record.client_id is None else "dataprocessor"}]},
        "who": {"display": record.agent},
        "name": record.agent,  # searchable as agent-name
        "requestor": True,
    }
    if record.client_id:
        agent["who"]["identifier"] = {"system": "urn:gateway:client", "value": record.client_id}
        agent["altId"] = record.client_id  # searchable as altid
    if record.address:
        agent["network"] = {"address": record.address, "type": "2"}
    if record.interaction.startswith(CONSOLE):
        name = record.interaction[len(CONSOLE):]
        event_type: dict[str, Any] = CONSOLE_TYPE
        subtype = {"system": CONSOLE_ACTION_SYSTEM, "code": name}
        action = CONSOLE_VERBS.get(name.split("-", 1)[0], "E")
    else:
        event_type = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                      "display": "RESTful Operation"}
        subtype = {"system": "http://hl7.org/fhir/restful-interaction",
                   "code": SUBTYPES.get(record.interaction, record.interaction)}
        action = ACTIONS.get(record.interaction, "E")
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": event_type,
        "subtype": [subtype],
        "action": action,
        "recorded": record.recorded,
        "outcome": record.outcome,
        "agent": [agent],
        "source": {"observer": {"display": "FHIR gateway"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "3", "display": "Web Server"}]},
    }
    if record.description:
        event["outcomeDesc"] = record.description[:1000]
    if entities:
        event["entity"] = entities
    return event


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


class SpareCore:
    """Whether a core of this machine is free of other processes' work: the CPU time the machine
    spent since the last call (/proc/stat), less this process's own, against the wall time between.
    A process of the gateway may have nothing to do while its siblings (the web workers, the MLLP
    listener) are busy: storing spooled AuditEvents then would take their CPU. Where /proc/stat
    cannot be read, every core counts as free. The first call only takes the baseline."""

    def __init__(self, read_stat: Callable[[], list[int]] | None = None,
                 own_seconds: Callable[[], float] | None = None, clock: Callable[[], float] = time.monotonic,
                 cores: int | None = None) -> None:
        self._read_stat = read_stat or _machine_ticks
        self._own_seconds = own_seconds or (lambda: sum(os.times()[:2]))
        self._clock = clock
        self.cores = cores or os.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None
        self._answer = False

    def __call__(self) -> bool:
        try:
            ticks = self._read_stat()
        except (OSError, ValueError, IndexError):
            return True
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle, iowait
        busy = (sum(ticks[:8]) - idle) / _CLOCK_TICKS
        now, own = self._clock(), self._own_seconds()
        if self._last is not None and now - self._last[2] < 0.05:
            return self._answer  # too short a span to say anything new
        if self._last is not None:
            last_busy, last_own, last_now = self._last
            others = max(0.0, (busy - last_busy) - (own - last_own)) / (now - last_now)
            self._answer = others <= self.cores - 0.75  # three quarters of a core free, at least
        self._last = (busy, own, now)
        return self._answer


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_ticks() -> list[int]:
    with open("/proc/stat", "rb") as fh:
        return [int(field) for field in fh.readline().split()[1:]]


def _spool_text(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


_INSERT_SPOOLED = db.Prepared(insert(db.audit_spool).values(event=bindparam("event")))


def _spool_texts(repo: Any, texts: list[str]) -> None:
    """Append events (as _spool_text made them) to the spool in the transaction of `repo`, with its
    commit (db.at_commit: on PostgreSQL in the COMMIT's round trip)."""
    db.at_commit(repo.conn, _INSERT_SPOOLED, [{"event": text} for text in texts])


# New requests are refused while the queue is this full; the rest is for requests in flight.
HIGH_WATER = 0.9
# Spooled events stored as AuditEvent resources per transaction.
SPOOL_CHUNK = 500
# The same for a process storing while others may be serving: on SQLite the inserts of a chunk hold
# the only write lock (500 events held it for ~175 ms, when the index rows were still made under it:
# an HL7 message arriving then waited that long for its ACK). Fewer per chunk cost more per event
# (each transaction writes its index pages again): 5 took 1.2-1.4 ms an event, 25 0.55-0.75.
IDLE_SPOOL_CHUNK = 25
# Times store_spooled reads the spool again after another process stored what it had read.
SPOOL_RACE_ATTEMPTS = 3


class _StoredElsewhere(Exception):
    """Some spooled events read for storing were stored by another process meanwhile."""


# A process whose queue stayed empty this long (no audited request) stores what the spool holds.
IDLE_AFTER = 0.5


class AuditLog:
    def __init__(self, store: FhirStore, max_queue: int = 10_000, batch_size: int = 500,
                 enabled: bool = True, max_delay: float = 0.2, max_backlog: int = 100_000) -> None:
        self.max_delay = max_delay
        self.max_backlog = max_backlog
        self.high_water = max(1, int(max_queue * HIGH_WATER))
        self.store = store
        self.enabled = enabled
        self.batch_size = batch_size
        self.queue: queue.Queue[AuditRecord | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.spooled = 0  # events this process appended to the spool
        self.written = 0  # events this process stored as AuditEvent resources
        self.failures = 0
        store.audit_catch_up = self.catch_up
        self._active_at = 0.0  # time.monotonic() of the last request or record (note_activity)
        self._spare = SpareCore()
        self._closing = False  # set by close(): a batch the database cannot take is given up on
        # Set while someone waits in flush() or close(): the writer stops letting records gather.
        self._hurry = threading.Event()

    def note_activity(self) -> None:
        """A request started, or a record was made: the process is not idle (see _when_idle)."""
        self._active_at = time.monotonic()

    def _idle(self) -> bool:
        """This process had no request and made no record for IDLE_AFTER seconds, and the machine
        has a core its other processes leave free."""
        return time.monotonic() - self._active_at >= IDLE_AFTER and self._spare()

    def keeping_up(self) -> bool:
        """Whether a new request may start: its record will find room in the queue. False while the
        records not yet written fill nine tenths of it."""
        return not self.enabled or self.queue.qsize() < self.high_water

    def record(self, interaction: str, agent: str, *, client_id: str | None = None,
               address: str | None = None, outcome: str = "0", query: str | None = None,
               entities: tuple[str, ...] = (), contents: tuple[str, ...] = (),
               description: str | None = None) -> None:
        if not self.enabled:
            return
        self._ensure_thread()
        # put() blocks when the queue is full: back-pressure instead of losing records.
        self.queue.put(AuditRecord(interaction, agent, client_id, address, outcome, query, entities,
                                   contents, now_instant(), description))

    def prepare(self, interaction: str, agent: str, *, client_id: str | None = None,
                entities: tuple[str, ...] = (), patients: set[str] | frozenset[str] = frozenset(),
                description: str | None = None) -> list[str]:
        """The events of one record, as the spool keeps them, for record_in(). Built before the
        caller's transaction: on SQLite that transaction holds the only write lock. `patients` are
        those whose compartments the written resources lie in."""
        if not self.enabled:
            return []
        record = AuditRecord(interaction, agent, client_id, None, "0", None, entities, (), now_instant(),
                             description)
        return [_spool_text(event) for event in audit_events(record, set(patients))]

    def record_in(self, repo: Any, events: list[str]) -> None:
        """Record events from prepare() in the caller's own write transaction (`repo`), for writers
        that hold one anyway (the HL7 feed): they go into the spool with the data they record, or
        not at all, and cost no queue or thread hand-over."""
        if not events:
            return
        self.note_activity()
        _spool_texts(repo, events)
        self.spooled += len(events)

    def start(self) -> None:
        """Start the writer now rather than at the first record: a server's worker process, so that
        it stores the spooled events when it has time even before it serves an audited request."""
        if self.enabled:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        # Started lazily and per process: a thread does not survive gunicorn's fork.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=IDLE_AFTER)
            except queue.Empty:
                if self._idle():
                    self._when_idle()
                continue
            batch: list[AuditRecord] = []
            stop = item is None
            if item is not None:
                batch.append(item)
                # Let records gather, then take them all at once: waking for every record would
                # hand the GIL back and forth with the request threads once per request. Unless
                # someone waits for the queue to empty: then there is nothing to wait for.
                self._hurry.wait(self.max_delay)
            while not stop and len(batch) < self.batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                self._write(batch)
                self._bound_backlog()
            for _ in range(len(batch) + (1 if stop else 0)):
                self.queue.task_done()
            if stop:
                return

    def _when_idle(self) -> None:
        """No request came and no record was made for IDLE_AFTER seconds, and a core is free: store
        spooled events, a chunk at a time, until the spool is empty or there is work again."""
        with self._spool_kept_on_failure():
            self._store_spool_while(lambda: self.queue.empty() and self._idle(), wait=False,
                                    chunk=IDLE_SPOOL_CHUNK)

    def _bound_backlog(self) -> None:
        """Under sustained load the process is never idle: once the spool holds more than
        max_backlog events, every batch written also stores a chunk of them (what a request then
        costs is what it cost before there was a spool)."""
        with self._spool_kept_on_failure():
            if self.backlog() > self.max_backlog:
                self.store_spooled(wait=False)

    @contextlib.contextmanager
    def _spool_kept_on_failure(self) -> Iterator[None]:
        """For the writer thread's storing: it must outlive a failure, and the events stay in the
        spool (a database that is down or full is said elsewhere)."""
        try:
            yield
        except Exception as exc:
            if db.unavailable(exc) is None:
                log.exception("storing spooled audit events failed; they stay in the spool")

    def _store_spool_while(self, going_on: Callable[[], bool], wait: bool, chunk: int = SPOOL_CHUNK) -> None:
        """Store spooled events a chunk at a time while going_on() holds and the spool still has
        some (a chunk came back full)."""
        while going_on() and self.store_spooled(chunk, wait=wait) == chunk:
            pass

    def backlog(self) -> int:
        """Events in the spool, about (from the first and last sequence number: two index lookups;
        min and max in one SELECT would make SQLite read the whole spool)."""
        S = db.audit_spool.c
        with self.store.reading() as repo:
            first, last = repo.conn.execute(select(select(func.min(S.seq)).scalar_subquery(),
                                                   select(func.max(S.seq)).scalar_subquery())).one()
        return 0 if first is None else last - first + 1

    def store_spooled(self, limit: int = SPOOL_CHUNK, wait: bool = True) -> int:
        """Store up to `limit` spooled events, oldest first, as AuditEvent resources, and take them
        out of the spool in the same transaction; returns how many.

        On SQLite the events are read, and made into resources with their index rows (most of the
        work), before the writing transaction, which holds the database's only write lock: an HL7
        message arriving meanwhile waits for the inserts alone. Should another process have stored
        some of them in between, this transaction takes nothing and the spool is read again. On
        PostgreSQL, which has no such lock, they are read in the writing transaction, row-locked:
        wait=False skips events another process is storing at this moment, wait=True waits for it."""
        S = db.audit_spool.c
        postgres = db.is_postgres(self.store.engine)
        query = select(S.seq, S.event).order_by(S.seq).limit(limit)
        def as_resources(rows: list[Any]) -> list[NewResource]:
            return new_resources([orjson.loads(row.event) for row in rows], self.store.base_url)

        for _attempt in range(SPOOL_RACE_ATTEMPTS):
            rows: list[Any] = []
            with self.store.reading() as repo:  # most idle checks find nothing: no write lock for them
                if postgres:
                    if repo.conn.execute(select(S.seq).limit(1)).first() is None:
                        return 0
                else:
                    rows = list(repo.conn.execute(query).all())
                    if not rows:
                        return 0
            new = as_resources(rows)  # SQLite: outside the write lock; PostgreSQL: nothing read yet
            try:
                with self.store.writing(durable=False) as repo:
                    if postgres:
                        rows = list(repo.conn.execute(query.with_for_update(skip_locked=not wait)).all())
                        if not rows:
                            return 0
                        new = as_resources(rows)
                    taken = repo.conn.execute(delete(db.audit_spool).where(S.seq.in_([row.seq for row in rows])))
                    if taken.rowcount != len(rows):
                        raise _StoredElsewhere
                    repo.insert_new(new)
            except _StoredElsewhere:
                continue
            self.written += len(rows)
            return len(rows)
        return 0

    def catch_up(self) -> None:
        """Store every spooled event (searches of AuditEvent call this first)."""
        self._store_spool_while(lambda: True, wait=True)

    def _write(self, batch: list[AuditRecord]) -> None:
        events = [event for r in batch for event in audit_events(r, _patients(r.contents))]
        attempt = failed = 0
        while True:
            attempt += 1
            try:
                # Not durable: records wait in memory before this anyway (see write_tx).
                with self.store.writing(durable=False) as repo:
                    _spool_texts(repo, [_spool_text(event) for event in events])
                self.spooled += len(events)
                if attempt > 1:
                    log.info("wrote %d audit events after %d attempts", len(events), attempt)
                return
            except Exception as exc:  # the writer must outlive a failed batch; it is logged and retried
                if db.unavailable(exc) and not self._closing:
                    # The database is down or full: the events wait here (the bounded queue behind
                    # them slows requests) until it is back, instead of being dropped after 3 tries.
                    if attempt == 1:
                        log.warning("audit events wait: the database is %s (%s)", db.unavailable(exc),
                                    type(exc).__name__)
                    time.sleep(min(UNAVAILABLE_RETRY_BASE * 2 ** min(attempt - 1, 8), UNAVAILABLE_RETRY_MAX))
                    continue
                failed += 1
                log.exception("writing %d audit events failed (attempt %d)", len(events), attempt)
                if failed >= 3:
                    break
        self.failures += len(events)

    def flush(self) -> None:
        """Wait until every record so far is stored as an AuditEvent resource."""
        if self._thread is not None and self._thread.is_alive():
            self._hurry.set()
            try:
                self.queue.join()
            finally:
                self._hurry.clear()
        self.catch_up()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            self._closing = True
            self._hurry.set()
            self.queue.put(None)
            self._thread.join(timeout=30)
            self._hurry.clear()
            self._store_before_exit()

    def _store_before_exit(self, seconds: float = 5.0) -> None:
        """A command ending stores what the spool holds, for a few seconds at most: the rest waits
        for a server with time, or for the next AuditEvent search."""
        deadline = time.monotonic() + seconds
        try:
            self._store_spool_while(lambda: time.monotonic() < deadline, wait=False)
        except Exception as exc:
            log.warning("spooled audit events stay in the spool for now (%s)",
                        db.unavailable(exc) or type(exc).__name__)
