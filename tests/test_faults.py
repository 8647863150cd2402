"""Fault tests (issue #8): the database restarted mid-stream, the disk full, the EHR down all along.

Each test runs real processes on real sockets (127.0.0.1, free ports) against a database of its own:
a private PostgreSQL cluster (initdb/pg_ctl as the postgres user in a temporary folder; the shared
server on 5432 is never touched), a SQLite file on a small tmpfs, or a SQLite file in tmp_path. They
take no `database_url`, so they run once, not once per database. What they hold the gateway to:
an HL7 message is acknowledged AA only once it is committed (never a false AA; a NAK AE with ERR
code 207, or a closed connection, when the database cannot take it), /readyz and the FHIR API say
503 (507 when the disk is full) instead of a stack trace, and the gateway recovers on its own once
the fault is gone. The outbox keeps everything while the EHR is down and delivers each item once
when it is back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from gateway import db
from gateway.hl7.mllp import Deframer, frame
from tests.conftest import free_port
from tests.processes import ROOT, gateway_env, gateway_process

INITDB, PG_CTL = "/usr/local/bin/initdb", "/usr/local/bin/pg_ctl"
# An audit record reaches PostgreSQL's disk within about 1 s of its message (0.2 s gathering in the
# writer, then asynchronous commit: up to 3 x wal_writer_delay).
AUDIT_SETTLE_SECONDS = 1.5

pytestmark = pytest.mark.slow


# --- processes ---


def _gateway_env(database_url: str, instance: Path, **extra: str) -> dict[str, str]:
    return gateway_env(GATEWAY_DATABASE_URL=database_url, GATEWAY_INSTANCE_PATH=str(instance),
                       GATEWAY_SECRET_KEY="faults", GATEWAY_OPEN_ACCESS="1", GATEWAY_LOG_FORMAT="text",
                       GATEWAY_OUTBOX_WORKER_IN_SERVE="0", GATEWAY_MLLP_READ_TIMEOUT="10", **extra)


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=60)
    if done.returncode:
        raise AssertionError(f"{args} failed: {(done.stdout + done.stderr).decode(errors='replace')[-2000:]}")


@dataclass
class Gateway:
    http: int
    mllp: int
    log: Path
    proc: subprocess.Popen[bytes]

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        return _http("GET", f"http://127.0.0.1:{self.http}{path}", None, timeout)

    def post(self, path: str, body: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        return _http("POST", f"http://127.0.0.1:{self.http}{path}", body, timeout)


def _http(method: str, url: str, body: bytes | None, timeout: float,
          content_type: str = "application/fhir+json") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={
        "Accept": "application/fhir+json", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, mllp: bool = True, worker: bool = False) -> Iterator[Gateway]:
    """`gateway serve` (one gunicorn worker, the MLLP listener) until the block ends, whatever happens."""
    http_port, mllp_port = free_port(), (free_port() if mllp else 0)
    env = {**env, "GATEWAY_BASE_URL": f"http://127.0.0.1:{http_port}",
           "GATEWAY_OUTBOX_WORKER_IN_SERVE": "1" if worker else "0"}
    args = ["serve", "--port", str(http_port), "--mllp-port", str(mllp_port), "--workers", "1", "--threads", "4"]
    with gateway_process(args, env, log, ports=(http_port, mllp_port) if mllp else (http_port,),
                         stop_timeout=15) as proc:
        yield Gateway(http_port, mllp_port, log, proc)


def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


# --- an HL7 sender that keeps going through faults ---


def adt(control: str, n: int) -> str:
    return (f"MSH|^~\\&|ADMIT|FAULTS|GW|GW|20261101083000||ADT^A04^ADT_A01|{control}|P|2.5.1\r"
            f"EVN|A04|20261101083000\r"
            f"PID|1||F{n:06d}^^^FAULTS^MR||Fault^Person{n}||19800101|F\r"
            f"PV1|1|O|CLINIC^1^1\r")


def oru(control: str, n: int, document: str | None = None) -> str:
    value = ("OBX|1|ED|11526-1^Pathology study^LN||LAB^AP^PDF^Base64^" + document + "||||||F") if document \
        else "OBX|1|NM|2345-7^Glucose^LN||5.5|mmol/L|3.9-6.1|N|||F"
    return (f"MSH|^~\\&|LAB|FAULTS|GW|GW|20261101090000||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
            f"PID|1||F{n:06d}^^^FAULTS^MR||Fault^Person{n}||19800101|F\r"
            f"OBR|1|P{control}^EHR|L{control}^LAB|24331-1^Lipid panel^LN|||20261101080000\r"
            f"{value}\r")


@dataclass
class Sent:
    control: str
    at: float
    outcome: str = ""  # AA, AE, AR, CA/CE/CR, timeout, closed, refused
    ack: str = ""


@dataclass
class Sender:
    """Streams messages over one MLLP connection, reconnecting whenever it closes; records each
    control id's outcome. make(n) gives message n's control id and text."""

    port: int
    make: Callable[[int], tuple[str, str]]
    timeout: float = 4.0
    pause: float = 0.0
    sent: list[Sent] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sock: socket.socket | None = None

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=self.timeout + 5)
        if self._sock is not None:
            self._sock.close()

    def count(self, *outcomes: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for s in list(self.sent) if s.outcome in outcomes and since <= s.at < until)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            control, message = self.make(n)
            n += 1
            record = Sent(control, time.monotonic())
            record.outcome, record.ack = self._exchange(message)
            self.sent.append(record)
            if record.outcome not in ("AA", "CA"):
                self.stop.wait(0.05)  # as a sender does before it sends the message again
            elif self.pause:
                self.stop.wait(self.pause)

    def _exchange(self, message: str) -> tuple[str, str]:
        try:
            if self._sock is None:
                self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                self._deframer = Deframer()
        except OSError:
            return "refused", ""
        sock = self._sock
        try:
            sock.settimeout(self.timeout)
            sock.sendall(frame(message.encode()))
            deadline = time.monotonic() + self.timeout
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError
                frames = self._deframer.feed(chunk)
                if frames:
                    ack = frames[0].decode()
                    msa = next(s for s in ack.split("\r") if s.startswith("MSA|"))
                    return msa.split("|")[1], ack
        except TimeoutError:
            outcome = "timeout"
        except OSError:
            outcome = "closed"
        sock.close()  # a late ACK must never be read as the next message's
        self._sock = None
        return outcome, ""


def _stored(database_url: str, controls: list[str]) -> dict[str, tuple[str, int, int]]:
    """control id -> (status, resources written, of those how many are in the store)."""
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    M, W, R = db.hl7_message.c, db.hl7_written.c, db.resource.c
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(M.id, M.control_id, M.status).where(M.control_id.in_(controls))).all()
            found: dict[str, tuple[str, int, int]] = {}
            for row in rows:
                written = conn.execute(select(W.resource_type, W.resource_id, W.version_id)
                                       .where(W.message_id == row.id)).all()
                present = sum(1 for w in written if conn.execute(select(R.version_id).where(
                    R.resource_type == w.resource_type, R.id == w.resource_id,
                    R.version_id >= w.version_id)).first() is not None)
                if row.status == "processed" or row.control_id not in found:
                    found[row.control_id] = (row.status, len(written), present)
            return found
    finally:
        engine.dispose()


def _assert_no_false_aa(database_url: str, sender: Sender) -> list[str]:
    acked = [s.control for s in sender.sent if s.outcome in ("AA", "CA")]
    stored = _stored(database_url, acked)
    missing = {c: stored.get(c) for c in acked if stored.get(c, ("", 0, 0))[0] != "processed"
               or stored[c][1] == 0 or stored[c][1] != stored[c][2]}
    assert not missing, f"AA but not stored with its resources: {missing}"
    return acked


def _operation_outcome(status: int, headers: dict[str, str], body: bytes, expected: tuple[int, ...]) -> None:
    import json

    assert status in expected, (status, body[:500])
    document = json.loads(body)
    assert document["resourceType"] == "OperationOutcome", document
    assert "Traceback" not in body.decode()
    if status == 503:
        assert headers.get("Retry-After"), headers


# --- 1. PostgreSQL restarted mid-stream ---


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A PostgreSQL cluster of this test's own: (url, stop immediately, start)."""
    if os.geteuid() != 0:
        pytest.skip("the private PostgreSQL cluster is run as the postgres user, which needs root")
    if not (os.access(INITDB, os.X_OK) and os.access(PG_CTL, os.X_OK)) or shutil.which("runuser") is None:
        pytest.skip(f"needs {INITDB}, {PG_CTL} and runuser")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres OS user to run the cluster as")
    base = Path(tempfile.mkdtemp(prefix="gw-faults-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    pg_log = base / "postgres.log"

    def start() -> None:
        _run([*as_postgres, PG_CTL, "-D", str(data), "-l", str(pg_log), "-w", "-t", "30", "-o",
              f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off", "start"])

    def stop() -> None:
        _run([*as_postgres, PG_CTL, "-D", str(data), "-m", "immediate", "-w", "stop"])

    try:
        _run([*as_postgres, INITDB, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        start()
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE gw")
        yield f"postgresql://postgres@127.0.0.1:{port}/gw", stop, start
    finally:
        subprocess.run([*as_postgres, PG_CTL, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_restarted_mid_stream(private_postgres: Any, tmp_path: Path) -> None:
    url, stop_db, start_db = private_postgres
    env = _gateway_env(url, tmp_path)
    _run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env)

    def make(n: int) -> tuple[str, str]:
        control = f"PGR{n:05d}"
        return control, (adt(control, n) if n % 2 == 0 else oru(control, n))

    with serving(env, tmp_path / "gateway.log") as gateway, Sender(gateway.mllp, make) as sender:
        _until(lambda: sender.count("AA") >= 10, 30)
        assert sender.count("AA") >= 10, sender.sent[-5:]
        assert gateway.get("/readyz")[0] == 200
        patient = _patient_id(url, sender.sent[0].control)
        stopping = time.monotonic()
        stop_db()
        down = time.monotonic()
        time.sleep(0.5)
        ready = gateway.get("/readyz")
        read = gateway.get(f"/fhir/Patient/{patient}")
        search = gateway.get("/fhir/Patient?family=Fault")
        create = gateway.post("/fhir/Patient", b'{"resourceType": "Patient", "name": [{"family": "Down"}]}')
        over_http = _http("POST", f"http://127.0.0.1:{gateway.http}/hl7/v2", adt("PGRHTTP", 90001).encode(), 10,
                          content_type="application/hl7-v2")
        time.sleep(2.5)
        starting = time.monotonic()
        start_db()
        up = time.monotonic()
        _until(lambda: sender.count("AA", since=up) >= 10, 20)
        ready_after = gateway.get("/readyz")
        read_after = gateway.get(f"/fhir/Patient/{patient}")
        over_http_after = _http("POST", f"http://127.0.0.1:{gateway.http}/hl7/v2", adt("PGRHTTP", 90001).encode(),
                                10, content_type="application/hl7-v2")
    log = gateway.log.read_text(errors="replace")
    outcomes = [(round(s.at - down, 2), s.control, s.outcome) for s in sender.sent]

    assert ready[0] == 503, ready
    _operation_outcome(*read, expected=(503,))
    _operation_outcome(*search, expected=(503,))
    _operation_outcome(*create, expected=(503,))
    assert ready_after[0] == 200 and read_after[0] == 200, (ready_after, read_after[:2])
    # HL7 over HTTP: 503 with Retry-After and the AE 207 NAK while down; the same message AA after.
    assert over_http[0] == 503 and over_http[1].get("Retry-After"), over_http
    assert b"MSA|AE|PGRHTTP" in over_http[2] and b"207" in over_http[2], over_http[2]
    assert over_http_after[0] == 200 and b"MSA|AA|PGRHTTP" in over_http_after[2], over_http_after
    acked = _assert_no_false_aa(url, sender)
    during = [s for s in sender.sent if down <= s.at < starting]
    assert during, outcomes
    assert all(s.outcome in ("AE", "AR", "CE", "CR", "timeout", "closed", "refused") for s in during), outcomes
    naks = [s for s in during if s.outcome == "AE"]
    assert all("207" in s.ack and "ERR|" in s.ack for s in naks), [s.ack for s in naks][:3]
    assert sender.count("AA", since=up) >= 10, outcomes[-20:]
    assert len(acked) >= 15
    assert "Traceback" not in log, log[-3000:]
    # Every processed message has its AuditEvent: those queued when the database went away waited
    # for it. Audit records are committed without waiting for the disk (write_tx durable=False), so
    # an immediate stop may lose those of the last moment before it: only older ones are counted.
    audited = _audited_messages(url)
    ids = _processed_ids(url)
    settled = {ids[s.control] for s in sender.sent
               if s.outcome == "AA" and (s.at < stopping - AUDIT_SETTLE_SECONDS or s.at > up)}
    assert len(settled) >= 10 and settled <= audited, sorted(settled - audited)[:10]


def _audited_messages(url: str) -> set[int]:
    import re

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            contents = conn.execute(select(db.resource.c.content).where(
                db.resource.c.resource_type == "AuditEvent")).scalars().all()
    finally:
        engine.dispose()
    return {int(m) for content in contents for m in re.findall(r"HL7 message (\d+) ", content)}


def _processed_ids(url: str) -> dict[str, int]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return {row.control_id: row.id for row in conn.execute(select(
                db.hl7_message.c.id, db.hl7_message.c.control_id).where(db.hl7_message.c.status == "processed"))}
    finally:
        engine.dispose()


def _patient_id(url: str, control: str) -> str:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT w.resource_id FROM hl7_written w JOIN hl7_message m "
                                     "ON m.id = w.message_id WHERE m.control_id = :c AND "
                                     "w.resource_type = 'Patient'"), {"c": control}).scalar_one()
    finally:
        engine.dispose()


# --- 2. the disk fills up under SQLite ---


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """An 8 MB tmpfs of this test's own (grown later with `mount -o remount,size=...`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="gw-faults-disk-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        folder.rmdir()
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_sqlite_disk_fills_up_and_the_gateway_recovers_when_it_grows(small_disk: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{small_disk / 'gateway.sqlite'}"
    env = _gateway_env(url, tmp_path)
    _run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env)
    document = base64.b64encode(os.urandom(150 * 1024)).decode()  # ~200 KB of base64 per message

    def make(n: int) -> tuple[str, str]:
        control = f"DSK{n:05d}"
        return control, oru(control, n, document)

    big_note = "x" * (1024 * 1024)
    refused_body = json.dumps({"resourceType": "Patient", "identifier": [{"system": "urn:faults", "value": "full"}],
                               "name": [{"family": "Full", "text": big_note}]}).encode()
    with serving(env, tmp_path / "gateway.log") as gateway, Sender(gateway.mllp, make, timeout=8) as sender:
        _until(lambda: sender.count("AE", "closed", "timeout") >= 4, 40)
        full_at = time.monotonic()
        assert sender.count("AA") >= 2, [(s.control, s.outcome) for s in sender.sent]
        create = gateway.post("/fhir/Patient", refused_body)
        ready_full = gateway.get("/readyz")
        _until(lambda: sender.count("AE", "closed", "timeout", since=full_at) >= 2, 10)
        _run(["mount", "-o", "remount,size=64m", str(small_disk)])
        grown = time.monotonic()
        _until(lambda: sender.count("AA", since=grown + 0.5) >= 3, 30)
        created_after = gateway.post("/fhir/Patient", json.dumps(
            {"resourceType": "Patient", "identifier": [{"system": "urn:faults", "value": "after"}]}).encode())
        refused_search = gateway.get("/fhir/Patient?identifier=urn:faults|full")
    log = gateway.log.read_text(errors="replace")
    outcomes = [(s.control, s.outcome) for s in sender.sent]

    acked = _assert_no_false_aa(url, sender)
    assert len(acked) >= 5, outcomes
    refused = [s for s in sender.sent if s.outcome not in ("AA", "CA")]
    assert refused and all(s.outcome in ("AE", "closed", "timeout") for s in refused), outcomes
    assert all("ERR|" in s.ack and "207" in s.ack for s in refused if s.outcome == "AE"), refused[:2]
    assert sender.count("refused") == 0  # the listener stayed up throughout
    assert sender.count("AA", since=grown + 0.5) >= 3, outcomes[-10:]
    _operation_outcome(*create, expected=(507, 503))
    assert ready_full[0] == 200  # reads still work on a full disk: the gateway is ready for them
    assert created_after[0] == 201, created_after
    assert refused_search[0] == 200 and json.loads(refused_search[2])["entry"] == [], refused_search
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert conn.execute(select(db.resource.c.id).where(
                db.resource.c.content.like('%"family":"Full"%'))).first() is None  # nothing half written
    finally:
        engine.dispose()
    assert "Traceback" not in log, log[-3000:]


# --- 3. the EHR down for the whole run: the outbox backs up, then drains ---


def _outbox_depth(gateway: Gateway) -> float:
    status, _, body = gateway.get("/metrics")
    assert status == 200, body[:300]
    for line in body.decode().splitlines():
        if line.startswith("gateway_outbox_depth "):
            return float(line.split()[1])
    raise AssertionError("no gateway_outbox_depth in /metrics")


def _outbox(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(db.outbox).order_by(db.outbox.c.id)).all())
    finally:
        engine.dispose()


def test_ehr_down_all_along_the_outbox_backs_up_and_drains_once_in_order(tmp_path: Path) -> None:
    from tests.upstream import records
    from tests.upstream.conftest import Receiver

    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    ehr_port = free_port()  # nothing listens there until the EHR comes back
    env = _gateway_env(url, tmp_path, GATEWAY_OUTBOX_MESSAGE="hl7", GATEWAY_OUTBOX_APPOINTMENT_REQUEST="hl7",
                       GATEWAY_OUTBOX_MLLP_PORT=str(ehr_port), GATEWAY_OUTBOX_ACK_TIMEOUT="2",
                       GATEWAY_OUTBOX_BACKOFF_BASE="0.2", GATEWAY_OUTBOX_BACKOFF_MAX="1",
                       GATEWAY_OUTBOX_MAX_ATTEMPTS="1000", GATEWAY_OUTBOX_POLL_INTERVAL="0.1")
    _run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env)
    receiver: Receiver | None = None
    try:
        with serving(env, tmp_path / "gateway.log", mllp=False, worker=True) as gateway:
            def put(resource: dict[str, Any]) -> None:
                path = f"/fhir/{resource['resourceType']}/{resource['id']}"
                status, _, body = _http("PUT", f"http://127.0.0.1:{gateway.http}{path}",
                                        json.dumps(resource).encode(), 10)
                assert status in (200, 201), body[:500]

            put(records.patient())
            put(records.patient("p2", "67890"))
            put(records.practitioner())
            started = time.monotonic()
            depths = [_outbox_depth(gateway)]
            queued = 0
            # A stream of patients' writes the EHR must learn: messages from two patients, and
            # appointment requests, some of them cancelled afterwards (the cancellation must reach
            # the EHR after its request).
            for n in range(24):
                patient = "p1" if n % 2 == 0 else "p2"
                message = {**records.message(f"c{n}"), "sender": {"reference": f"Patient/{patient}"},
                           "subject": {"reference": f"Patient/{patient}"},
                           "payload": [{"contentString": f"message {n} of {patient}"}]}
                put(message)
                queued += 1
                if n % 4 == 0:
                    put(records.appointment(f"a{n}", patient_id=patient))
                    queued += 1
                if n % 8 == 0:
                    put({**records.appointment(f"a{n}", patient_id=patient), "status": "cancelled"})
                    queued += 1
                if n % 6 == 5:
                    depths.append(_outbox_depth(gateway))
                time.sleep(0.1)
            _until(lambda: min(i.attempts for i in _outbox(url)) >= 2, 15)
            depths.append(_outbox_depth(gateway))
            down_for = time.monotonic() - started
            backed_up = _outbox(url)

            receiver = Receiver(port=ehr_port)  # the EHR is back where it was
            _until(lambda: _outbox_depth(gateway) == 0 and all(i.status != "pending" for i in _outbox(url)), 30)
            depth_after = _outbox_depth(gateway)
            time.sleep(1)  # anything sent twice would arrive now
        log = gateway.log.read_text(errors="replace")
        delivered = _outbox(url)
        arrived = list(receiver.received)
    finally:
        if receiver is not None:
            receiver.close()

    # While the EHR was down: everything kept, pending, tried again with backoff, nothing given up on.
    assert len(backed_up) == queued
    assert depths == sorted(depths) and depths[-1] == queued and depths[0] == 0, depths
    assert all(i.status == "pending" for i in backed_up), [(i.id, i.status, i.last_error) for i in backed_up]
    assert all(i.attempts >= 2 and ("Connection" in (i.last_error or "") or "waits for" in (i.last_error or ""))
               for i in backed_up), \
        [(i.id, i.attempts, i.last_error) for i in backed_up][:3]
    polls = down_for / 0.1
    assert max(i.attempts for i in backed_up) < polls / 3, (max(i.attempts for i in backed_up), polls)  # backoff
    # Once it was back: every item delivered exactly once, the depth down to zero.
    assert depth_after == 0
    assert all(i.status == "delivered" for i in delivered), [(i.id, i.status, i.last_error) for i in delivered]
    assert sorted(arrived) == sorted(i.idempotency_key for i in delivered), arrived
    assert len(arrived) == len(set(arrived)) == queued, arrived
    # The order the outbox promises: a cancellation reaches the EHR after the request it cancels.
    position = {key: n for n, key in enumerate(arrived)}
    for item in delivered:
        if item.kind == "appointment-cancel":
            request = next(i for i in delivered
                           if i.kind == "appointment-request" and i.resource_id == item.resource_id)
            assert position[request.idempotency_key] < position[item.idempotency_key], arrived
    assert "Traceback" not in log, log[-3000:]
