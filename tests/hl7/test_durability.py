"""kill -9 in the middle of a stream: every ACKed message survives, none is half-applied."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from gateway import db
from gateway.hl7.mllp import Deframer, frame
from tests.conftest import empty_tables, free_port

pytestmark = pytest.mark.slow

MESSAGE = (
    "MSH|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261101083000-0500||ADT^A01^ADT_A01|{n}|P|2.5.1\r"
    "EVN|A01|20261101083000-0500\r"
    "PID|1||K{n}^^^RIVERSIDE^MR||Durable^Test{n}||19800101|F\r"
    "PV1|1|O|CLINIC^1^A^RIVERSIDE\r"
)


def _start(database_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    # One process: the kill must land on the process that holds the connection.
    env = {**os.environ, "GATEWAY_DATABASE_URL": database_url, "GATEWAY_MLLP_PORT": str(port),
           "GATEWAY_AUDIT_ENABLED": "0", "GATEWAY_MLLP_PROCESSES": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "mllp"], env=env,
                               stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the MLLP listener did not start: {log.read_text()[-2000:]}")


def _stream(port: int, start: int, count: int, kill_pid: int | None = None) -> list[int]:
    """Send `count` messages one after another; return the ACKed numbers. With kill_pid, the
    listener is killed with SIGKILL right after the last message is sent, before its ACK comes,
    so the kill always lands with a message in flight."""
    acked: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        deframer = Deframer()
        for n in range(start, start + count):
            try:
                sock.sendall(frame(MESSAGE.format(n=n).encode()))
                if kill_pid is not None and n == start + count - 1:
                    os.kill(kill_pid, signal.SIGKILL)
                acks: list[bytes] = []
                while not acks:
                    data = sock.recv(65536)
                    if not data:
                        return acked
                    acks = deframer.feed(data)
            except OSError:
                return acked
            assert b"MSA|AA|" in acks[0], acks[0]
            acked.append(n)
    return acked


def test_kill_9_mid_stream_loses_no_acknowledged_message(database_url: str, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'durable.sqlite'}"
        db.upgrade(db.make_engine(database_url))
    else:
        engine = db.make_engine(database_url)
        empty_tables(engine)  # the session's database: earlier tests' messages must not count
        engine.dispose()
    port = free_port()
    log = tmp_path / "mllp.log"
    process = _start(database_url, port, log)
    try:
        # The first message pays for start-up (models, compiled parameters, mappings).
        assert _stream(port, 0, 1) == [0]
        acked = _stream(port, 1, 21, kill_pid=process.pid)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
        assert len(acked) >= 20, acked

        process = _start(database_url, port, log)
        after = _stream(port, 100_000, 5)
        assert len(after) == 5, "the restarted listener accepts messages again"
    finally:
        process.kill()
        process.wait(timeout=10)

    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        messages = {int(r.control_id): r.status for r in conn.execute(
            select(db.hl7_message.c.control_id, db.hl7_message.c.status)).all()}
        patients = {r.id for r in conn.execute(
            select(db.resource.c.id).where(db.resource.c.resource_type == "Patient")).all()}
        written = {(r.message_id, r.resource_type) for r in conn.execute(select(db.hl7_written)).all()}
        by_control = {int(r.control_id): r.id for r in conn.execute(
            select(db.hl7_message.c.control_id, db.hl7_message.c.id)).all()}
    engine.dispose()
    for n in [0, *acked, *after]:
        assert messages.get(n) == "processed", f"message {n} was ACKed but is {messages.get(n)}"
        assert (by_control[n], "Patient") in written
    # Nothing half-applied: a message is either processed with its resources, or only received.
    for n, status in messages.items():
        assert status in ("processed", "received"), (n, status)
        if status == "received":
            assert (by_control[n], "Patient") not in written
    assert len(patients) >= len(acked) + len(after) + 1


def test_restart_leaves_received_messages_reprocessable(database_url: str, tmp_path: Path) -> None:
    """A message stored as received when the process died is picked up by reprocess."""
    if not database_url.startswith("sqlite"):
        pytest.skip("the store-first path is the same on both databases; one is enough")
    from gateway import build_services
    from gateway.config import Settings
    from gateway.hl7 import parse
    from gateway.hl7.ingest import Ingestor

    url = f"sqlite:///{tmp_path / 'received.sqlite'}"
    db.upgrade(db.make_engine(url))
    services: Any = build_services(Settings.from_env(environ={}, database_url=url, audit_enabled=False))
    text = parse.normalize(MESSAGE.format(n=7))
    header = parse.read_header(text)
    ingestor: Ingestor = services.hl7
    with services.store.writing() as repo:
        message_id = ingestor._insert(repo, text, header, "mllp", None, "hash").fetchone()[0]
    assert ingestor.reprocess(message_id).status == "processed"


def test_reprocess_failed_leaves_out_messages_stored_truncated(tmp_path: Path) -> None:
    """`gateway hl7 reprocess --failed` after a mapping fix: a message over the maximum size failed
    with the others, but only its start is stored; it is left out, and counted."""
    from click.testing import CliRunner

    from gateway import build_services
    from gateway.cli import main
    from gateway.config import Settings
    from gateway.hl7 import parse

    url = f"sqlite:///{tmp_path / 'truncated.sqlite'}"
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": url, "GATEWAY_INSTANCE_PATH": str(tmp_path)})
    assert runner.invoke(main, ["db", "upgrade"], catch_exceptions=False).exit_code == 0
    services: Any = build_services(Settings.from_env(environ={}, database_url=url, audit_enabled=False))
    assert services.hl7.handle(MESSAGE.format(n=1).encode(), "mllp", size=20_000_000) is not None
    with services.store.writing() as repo:  # one failed for a reason a fix removes: left received, failed below
        text = parse.normalize(MESSAGE.format(n=2))
        message_id = services.hl7._insert(repo, text, parse.read_header(text), "mllp", None, "hash").fetchone()[0]
        repo.conn.execute(db.hl7_message.update().where(db.hl7_message.c.id == message_id).values(status="failed"))
    result = runner.invoke(main, ["hl7", "reprocess", "--failed"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "left out 1 failed message over the maximum size: only its start was kept" in result.output
    assert "reprocessed 1 messages: 1 processed" in result.output
    statuses = [(r.control_id, r.status, r.truncated_from_bytes) for r in _all(services.engine)]
    assert statuses == [("1", "failed", 20_000_000), ("2", "processed", None)]
    services.engine.dispose()


def test_reprocess_stuck_takes_up_messages_left_received(tmp_path: Path) -> None:
    """`gateway hl7 reprocess --stuck`: a message left received for 5 minutes is applied, or, when
    its sender's copy was processed meanwhile, marked a duplicate of it; one received a moment ago
    may still be in a listener's hands and is left alone."""
    from click.testing import CliRunner

    from gateway.cli import main
    from gateway.hl7 import parse
    from gateway.hl7.ingest import STUCK_AFTER_MS, _content_hash, is_stuck

    url = f"sqlite:///{tmp_path / 'stuck.sqlite'}"
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": url, "GATEWAY_INSTANCE_PATH": str(tmp_path)})
    assert runner.invoke(main, ["db", "upgrade"], catch_exceptions=False).exit_code == 0
    resent = tmp_path / "resent.hl7"
    resent.write_text(MESSAGE.format(n=2))
    engine = create_engine(url)
    old_ms = int(time.time() * 1000) - STUCK_AFTER_MS - 1000
    with engine.begin() as conn:
        for n, received_ms in ((1, old_ms), (2, old_ms), (3, int(time.time() * 1000))):
            text = parse.normalize(MESSAGE.format(n=n))
            header = parse.read_header(text)
            conn.execute(db.hl7_message.insert().values(
                received_at="2026-11-01T08:30:00Z", received_ms=received_ms, channel="mllp",
                sending_app=header.sending_app, sending_facility=header.sending_facility,
                control_id=header.control_id, message_type="ADT^A01", version="2.5.1",
                content_hash=_content_hash(text), status="received", raw=text, flagged=False))
    # message 2's sender got no ACK and sent it again: that copy was processed
    port = free_port()
    listener = _start(url, port, tmp_path / "mllp.log")
    try:
        sent = runner.invoke(main, ["hl7", "send", str(resent), "--port", str(port)], catch_exceptions=False)
        assert sent.exit_code == 0 and "AA" in sent.output, sent.output
    finally:
        listener.terminate()
        listener.wait(timeout=30)

    result = runner.invoke(main, ["hl7", "reprocess", "--stuck"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "reprocessed 2 messages: 1 duplicate, 1 processed" in result.output
    messages = _all(engine)
    rows = {r.control_id: r for r in messages}
    with engine.connect() as conn:
        patients = {r.id for r in conn.execute(select(db.resource.c.id).where(
            db.resource.c.resource_type == "Patient"))}
    copies = [r for r in messages if r.control_id == "2"]
    assert [r.status for r in copies] == ["duplicate", "processed"]
    assert copies[0].duplicate_of == copies[1].id
    assert rows["1"].status == "processed" and rows["3"].status == "received"
    assert not is_stuck(rows["3"].status, rows["3"].received_ms)
    assert len(patients) == 2  # messages 1 and 2; message 3 untouched
    again = runner.invoke(main, ["hl7", "reprocess", "--stuck"], catch_exceptions=False)
    assert "reprocessed 0 messages" in again.output
    usage = runner.invoke(main, ["hl7", "reprocess", "--stuck", "--failed"])
    assert usage.exit_code == 2 and "give a message id, --failed or --stuck" in usage.output
    engine.dispose()


def _all(engine: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(db.hl7_message).order_by(db.hl7_message.c.id)))

