"""Outbox delivery benchmark: how fast two workers empty the outbox, and that a receiver crash loses nothing.

    python bench/outbox.py [--items 2000] [--database postgresql|sqlite] [--workers 2]

Phases (each on a fresh database: a gw_bench_<random> PostgreSQL database dropped afterwards, or a
temporary SQLite file):
  mllp      N patient messages (Communication -> MDM^T02) queued, then delivered by `gateway worker`
            processes to a local MLLP receiver (its own process) that ACKs every message
  fhir      N messages delivered as FHIR creates (transaction Bundles of up to 16 entries, each
            with ifNoneExist) to a second gateway instance (`gateway serve`, open access, on its own
            fresh database: SQLite unless --ehr-database postgresql) acting as the EHR
  crash     N messages over MLLP; the receiver is killed (SIGKILL) a third of the way through and
            started again 2 s later. Every item must end delivered, and every queued MSH-10 must have
            reached the receiver; a message the receiver logged but could not ACK before it died is
            sent again with the same MSH-10 (at least once), which the count of resends shows.

Queueing is timed apart from delivery: each HL7 item is built and validated by hl7apy when queued
(about 10 ms), in the transaction of the patient's write. The rate is queued items / seconds from
starting the workers until the last item is delivered (worker start-up included), and the steady
rate from the first delivery to the last (what the target is judged on). Loopback only;
every wait is bounded. Run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fhir_api import free_port  # noqa: E402  (bench/ is on the path only now)

HOST = "127.0.0.1"
TARGET_RATE = 200.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the receiver (run as its own process: `python bench/outbox.py --receiver PORT FILE`) ---

def receiver_main(port: int, path: str) -> None:
    """An EHR's MLLP listener: logs each MSH-10 (flushed) before it ACKs, so a kill between the two
    shows up as a resend."""
    from gateway.hl7.mllp import Deframer, frame

    server = socket.create_server((HOST, port))
    out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        deframer = Deframer()
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                for message in deframer.feed(chunk):
                    msh = message.split(b"\r", 1)[0].decode()
                    control = msh.split("|")[9]
                    with lock:
                        out.write(control + "\n")
                    conn.sendall(frame((f"MSH|^~\\&|EHR|EHR|GW|GW|{time.strftime('%Y%m%d%H%M%S')}||ACK|A{control}|P|"
                                        f"2.5.1\rMSA|AA|{control}\r").encode()))

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class Receiver:
    def __init__(self, port: int, path: Path) -> None:
        self.port, self.path = port, path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--receiver", str(self.port), str(self.path)],
                                     cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError("the receiver did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def received(self) -> list[str]:
        return [line for line in self.path.read_text().splitlines() if line] if self.path.exists() else []


# --- processes of the gateway under test ---

def gateway(*args: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    out = log_path.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def fresh_database(kind: str, workdir: Path, admin_url: str) -> Iterator[str]:
    from gateway import db

    if kind == "sqlite":
        url = f"sqlite:///{workdir / f'outbox-{secrets.token_hex(3)}.sqlite'}"
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url
        return
    import psycopg

    if "127.0.0.1" not in admin_url and "localhost" not in admin_url:
        raise SystemExit("refusing a database that is not on loopback")
    name = f"gw_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queue_messages(url: str, count: int, channel: str) -> tuple[float, list[str]]:
    """count patient messages written through the store; returns (seconds, queued keys)."""
    from sqlalchemy import select

    from gateway import build_services, db
    from gateway.config import Settings

    settings = Settings.from_env(environ={}, database_url=url, outbox_message=channel, audit_enabled=False)
    services = build_services(settings)
    patient = {"resourceType": "Patient", "id": "bench-p",
               "identifier": [{"system": "urn:oid:1.2.3.4", "value": "B1000",
                               "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                    "code": "MR"}]}}],
               "name": [{"family": "Bench", "given": ["Pat"]}], "gender": "female", "birthDate": "1970-01-01"}
    with services.store.writing() as repo:
        repo.update("Patient", "bench-p", patient)
        repo.update("Practitioner", "bench-dr", {"resourceType": "Practitioner", "id": "bench-dr",
                                                 "name": [{"family": "Doc", "given": ["Ann"]}]})
    started = time.monotonic()
    for start in range(0, count, 50):
        with services.store.writing() as repo:
            for n in range(start, min(start + 50, count)):
                repo.create({"resourceType": "Communication", "status": "completed",
                             "sender": {"reference": "Patient/bench-p"}, "subject": {"reference": "Patient/bench-p"},
                             "recipient": [{"reference": "Practitioner/bench-dr"}],
                             "payload": [{"contentString": f"Benchmark message {n}: is my dose right?"}]})
    seconds = time.monotonic() - started
    with services.engine.connect() as conn:
        keys = list(conn.execute(select(db.outbox.c.idempotency_key).where(db.outbox.c.status == "pending")).scalars())
    services.engine.dispose()
    return seconds, keys


_engines: dict[str, Any] = {}


def counts(url: str) -> dict[str, int]:
    """Items per status; one pooled engine per database, so polling costs the workers little CPU."""
    from sqlalchemy import func, select

    from gateway import db

    if url not in _engines:
        _engines[url] = db.make_engine(url)
    with _engines[url].connect() as conn:
        rows = conn.execute(select(db.outbox.c.status, func.count()).group_by(db.outbox.c.status)).all()
    return {status: n for status, n in rows}


def forget(url: str) -> None:
    engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


def worker_env(url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_DATABASE_URL": url, "GATEWAY_OUTBOX_POLL_INTERVAL": "0.05",
                "GATEWAY_OUTBOX_BACKOFF_BASE": "0.2", "GATEWAY_OUTBOX_BACKOFF_MAX": "2",
                "GATEWAY_OUTBOX_ACK_TIMEOUT": "5", "PYTHONPATH": str(ROOT)}, **extra)
    return env


def deliver(url: str, count: int, workers: int, env: dict[str, str], logs: Path, limit: float,
            during: Any = None) -> dict[str, Any]:
    procs = [gateway("worker", "--workers", "1", "--sync-interval", "0", env=env, log_path=logs)
             for _ in range(workers)]
    started = time.monotonic()
    first: tuple[float, int] | None = None  # when deliveries began (worker start-up is over)
    seen = 0
    try:
        while time.monotonic() - started < limit:
            now = counts(url)
            delivered = now.get("delivered", 0)
            if first is None and delivered:
                first = (time.monotonic(), delivered)
            if during is not None:
                during(delivered)
            if delivered + now.get("failed", 0) >= count:
                break
            if delivered >= seen + count // 10:
                seen = delivered
                log(f"  {delivered}/{count} delivered")
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            stop(proc)
    final = counts(url)
    forget(url)  # before the database is dropped
    steady = None
    if first is not None and started + elapsed > first[0]:
        steady = round((final.get("delivered", 0) - first[1]) / (started + elapsed - first[0]), 1)
    return {"seconds": round(elapsed, 2), "delivered": final.get("delivered", 0), "failed": final.get("failed", 0),
            "pending": final.get("pending", 0), "rate": round(final.get("delivered", 0) / elapsed, 1),
            "steady_rate": steady}


def phase_mllp(args: argparse.Namespace, workdir: Path, crash: bool) -> dict[str, Any]:
    name = "crash" if crash else "mllp"
    with fresh_database(args.database, workdir, args.pg_admin_url) as url:
        queue_seconds, keys = queue_messages(url, args.items, "hl7")
        log(f"{name}: queued {len(keys)} MDM^T02 in {queue_seconds:.1f}s ({len(keys) / queue_seconds:.0f}/s, "
            "hl7apy build and validation included)")
        port = free_port()
        receiver = Receiver(port, workdir / f"{name}-received.txt")
        receiver.start()
        state = {"killed": False, "restarted": False, "killed_at": 0.0}

        def chaos(delivered: int) -> None:
            if not crash:
                return
            if not state["killed"] and delivered >= len(keys) // 3:
                receiver.kill()
                state.update(killed=True, killed_at=time.monotonic())
                log(f"crash: receiver killed after {delivered} deliveries")
            elif state["killed"] and not state["restarted"] and time.monotonic() - state["killed_at"] >= 2:
                receiver.start()
                state["restarted"] = True
                log("crash: receiver restarted")

        env = worker_env(url, {"GATEWAY_OUTBOX_MESSAGE": "hl7", "GATEWAY_OUTBOX_MLLP_PORT": str(port)})
        try:
            result = deliver(url, len(keys), args.workers, env, workdir / f"{name}-workers.log", args.limit, chaos)
        finally:
            receiver.kill()
        received = receiver.received()
        result.update(queue_rate=round(len(keys) / queue_seconds, 1), queued=len(keys),
                      received=len(received), unique_received=len(set(received)),
                      lost=len(set(keys) - set(received)), resends=len(received) - len(set(received)),
                      unknown=len(set(received) - set(keys)))
        if crash:
            result["receiver_killed_and_restarted"] = bool(state["killed"] and state["restarted"])
        return result


def phase_fhir(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with fresh_database(args.ehr_database, workdir, args.pg_admin_url) as ehr_url:
        return _phase_fhir(args, workdir, ehr_url)


def _phase_fhir(args: argparse.Namespace, workdir: Path, ehr_url: str) -> dict[str, Any]:
    import urllib.request

    port = free_port()
    ehr_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    ehr_env.update({"GATEWAY_DATABASE_URL": ehr_url, "GATEWAY_OPEN_ACCESS": "1",
                    "GATEWAY_BASE_URL": f"http://{HOST}:{port}", "GATEWAY_OUTBOX_WORKER_IN_SERVE": "0",
                    "PYTHONPATH": str(ROOT)})
    ehr = gateway("serve", "--host", HOST, "--port", str(port), "--mllp-port", "0", "--workers", "2",
                  env=ehr_env, log_path=workdir / "ehr-server.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline or ehr.poll() is not None:
                raise RuntimeError("the EHR instance did not start; see ehr-server.log")
            time.sleep(0.2)
        with fresh_database(args.database, workdir, args.pg_admin_url) as url:
            queue_seconds, keys = queue_messages(url, args.items, "fhir")
            log(f"fhir: queued {len(keys)} Communications in {queue_seconds:.1f}s")
            # the open-access EHR instance refuses any Authorization header, so no token is configured
            env = worker_env(url, {"GATEWAY_OUTBOX_MESSAGE": "fhir",
                                   "GATEWAY_UPSTREAM_FHIR_URL": f"http://{HOST}:{port}/fhir"})
            result = deliver(url, len(keys), args.workers, env, workdir / "fhir-workers.log", args.limit)
        with urllib.request.urlopen(f"http://{HOST}:{port}/fhir/Communication?_summary=count&_total=accurate",
                                    timeout=30) as response:
            result["ehr_communications"] = json.loads(response.read())["total"]
        result["queued"] = len(keys)
        return result
    finally:
        stop(ehr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="outbox items per phase (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="`gateway worker` processes (default 2)")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--ehr-database", choices=("postgresql", "sqlite"), default="sqlite",
                        help="the database of the second instance (the EHR) in the fhir phase (default sqlite)")
    parser.add_argument("--phases", default="mllp,fhir,crash")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds a phase may take (default 300)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--workdir", help="keep the logs (workers, EHR server, receiver) in this directory")
    parser.add_argument("--receiver", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver:
        receiver_main(int(args.receiver[0]), args.receiver[1])
        return 0
    results: dict[str, Any] = {"items": args.items, "workers": args.workers, "database": args.database,
                               "cpus": os.cpu_count(), "load_average_before": round(os.getloadavg()[0], 2)}
    if results["load_average_before"] > (os.cpu_count() or 1) / 2:
        log(f"WARNING: the machine is busy (load average {results['load_average_before']}): other processes "
            "take CPU from the workers and the receiver, and the rates will be lower than on a quiet machine")
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for phase in args.phases.split(","):
            log(f"--- phase {phase} ---")
            if phase == "fhir":
                results[phase] = phase_fhir(args, workdir)
            else:
                results[phase] = phase_mllp(args, workdir, crash=(phase == "crash"))
            results[phase]["load_average_after"] = round(os.getloadavg()[0], 2)
            log(f"{phase}: {json.dumps(results[phase])}")
    print("\nSummary")
    ok = True
    for phase in ("mllp", "fhir", "crash"):
        if phase not in results:
            continue
        r = results[phase]
        verdict = "meets" if (r["steady_rate"] or 0) >= TARGET_RATE else "BELOW"
        line = (f"  {phase:<6} {r['delivered']}/{r.get('queued', args.items)} delivered in {r['seconds']}s with "
                f"{args.workers} workers: {r['rate']}/s, {r['steady_rate']}/s once the workers were up "
                f"({verdict} the {TARGET_RATE:.0f}/s target)")
        if "lost" in r:
            line += f"; receiver got {r['unique_received']} distinct MSH-10, lost {r['lost']}, resent {r['resends']}"
            ok &= r["lost"] == 0 and r["unknown"] == 0
        if "ehr_communications" in r:
            line += f"; the EHR holds {r['ehr_communications']} Communications"
            ok &= r["ehr_communications"] == r["delivered"]
        ok &= r["delivered"] == r.get("queued", args.items)
        print(line + f" [load average {r['load_average_after']} on {os.cpu_count()} cores]")
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    out = results_dir / f"outbox-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"  no lost or duplicated delivery: {'yes' if ok else 'NO'}; results in {out.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
