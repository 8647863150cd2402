"""Production serving: `gateway serve --workers 2` under gunicorn, replaced gracefully on SIGHUP.

While the arbiter replaces its workers, a client keeps asking (a new connection per request, as a load
balancer's health checks and most clients do) and an HL7 sender keeps sending, ten messages per
MLLP connection: no request may fail, no ACK may be missing, and afterwards the workers are new
processes while the MLLP listener is the same one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import db
from gateway.hl7.mllp import send_messages
from tests.conftest import free_port
from tests.processes import gateway_env, gateway_process


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _adt(n: int) -> bytes:
    return (f"MSH|^~\\&|ADMIT|RIVERSIDE|GW|GW|20261101080000||ADT^A04|HUP{n:05d}|P|2.5.1\r"
            f"PID|1||HUP{n:05d}^^^RIVERSIDE^MR||Reload^Person{n}||19800101|F\r").encode()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    http_port, mllp_port = free_port(), free_port()
    env = gateway_env(GATEWAY_DATABASE_URL=url, GATEWAY_BASE_URL=f"http://127.0.0.1:{http_port}",
                      GATEWAY_SECRET_KEY="serving-test", GATEWAY_INSTANCE_PATH=str(tmp_path),
                      GATEWAY_OUTBOX_WORKER_IN_SERVE="0", GATEWAY_LOG_FORMAT="text")
    log = tmp_path / "serve.log"
    args = ["serve", "--port", str(http_port), "--mllp-port", str(mllp_port), "--workers", "2"]
    with gateway_process(args, env, log, ports=(http_port, mllp_port)) as proc:
        send_messages("127.0.0.1", mllp_port, [_adt(0)], timeout=30)
        yield proc, http_port, mllp_port, log


def test_sighup_replaces_the_workers_without_failing_a_request_or_a_message(served: tuple) -> None:
    proc, http_port, mllp_port, log = served
    # The arbiter forks its workers once the MLLP listener accepts, which may be a moment after the
    # fixture's message got its ACK from the listener.
    deadline = time.monotonic() + 30
    while len(before := _children(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(before) >= 3, (before, log.read_text(errors="replace")[-2000:])  # two workers and the listener
    stop = threading.Event()
    answers: list[tuple[float, int | str]] = []
    acks: list[bytes] = []

    def ask() -> None:
        while not stop.is_set():
            try:
                answer: int | str = _get(http_port, "/readyz")
            except OSError as exc:
                answer = f"{type(exc).__name__}: {exc}"
            answers.append((time.monotonic(), answer))

    def feed() -> None:
        n = 1
        while not stop.is_set():
            for replies in send_messages("127.0.0.1", mllp_port, [_adt(n + k) for k in range(10)], timeout=30):
                acks.extend(replies)
            n += 10

    threads = [threading.Thread(target=ask), threading.Thread(target=feed)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    hup = time.monotonic()
    os.kill(proc.pid, signal.SIGHUP)
    # The old workers are gone once the arbiter has started new ones and the old ones finished.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _children(proc.pid)
        if len(before - now) >= 2 and len(now) >= len(before):
            break
        time.sleep(0.2)
    swapped = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    after = _children(proc.pid)
    assert len(before - after) == 2, (before, after, log.read_text(errors="replace")[-2000:])
    assert len(after - before) == 2  # two new workers, the MLLP listener kept
    failed = [a for _, a in answers if a != 200]
    assert not failed, failed[:5]
    assert any(hup <= at <= swapped for at, _ in answers)  # asked while the workers were replaced
    assert acks and all(b"MSA|AA|" in ack for ack in acks)
    assert proc.poll() is None


def test_serve_refuses_to_start_when_its_mllp_port_is_taken(tmp_path: Path) -> None:
    """Otherwise whatever holds the port would seem to be the listener, and take the feed's messages."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = gateway_env(GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'gateway.sqlite'}",
                          GATEWAY_INSTANCE_PATH=str(tmp_path), GATEWAY_LOG_FORMAT="text")
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()),
                               "--mllp-port", str(port)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"the MLLP port 127.0.0.1:{port} cannot be opened" in done.stderr


def test_gunicorn_builds_no_access_line_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app writes the access line; gunicorn, given a logging configuration, would build its own
    line's fields for every request and drop it."""
    from gunicorn.config import Config

    from gateway.serving import GatewayLogger

    cfg = Config()
    cfg.set("logconfig_dict", {"version": 1, "disable_existing_loggers": False})
    logger = GatewayLogger(cfg)

    def atoms(*_args: object) -> dict[str, str]:
        raise AssertionError("gunicorn built an access line")

    monkeypatch.setattr(logger, "atoms", atoms)
    logger.access(None, None, {}, None)


def test_serve_without_a_base_url_advertises_the_address_it_serves(tmp_path: Path) -> None:
    """An app developer running `gateway serve --port P` with no GATEWAY_BASE_URL gets SMART
    endpoints on port P, not the default's 8080 (where nothing answers)."""
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    port = free_port()
    env = gateway_env(GATEWAY_DATABASE_URL=url, GATEWAY_INSTANCE_PATH=str(tmp_path),
                      GATEWAY_OUTBOX_WORKER_IN_SERVE="0", GATEWAY_LOG_FORMAT="text")
    args = ["serve", "--port", str(port), "--mllp-port", "0", "--workers", "1", "--threads", "2"]
    discovery = f"http://127.0.0.1:{port}/fhir/.well-known/smart-configuration"
    with gateway_process(args, env, tmp_path / "serve.log", ports=(port,)), \
            urllib.request.urlopen(discovery, timeout=30) as reply:
        config = json.loads(reply.read())
    assert config["authorization_endpoint"].startswith(f"http://127.0.0.1:{port}/")
    assert config["token_endpoint"].startswith(f"http://127.0.0.1:{port}/")
    assert f"Portal:    http://127.0.0.1:{port}/" in (tmp_path / "serve.log").read_text(errors="replace")
