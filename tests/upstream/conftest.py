"""Fixtures for the EHR connection: an MLLP receiver on a real socket, a second gateway as the EHR."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import hl7
import pytest
from werkzeug.serving import make_server

from gateway import create_app, db
from gateway.config import Settings
from gateway.hl7.mllp import Deframer, frame
from tests.conftest import empty_tables, free_port

UPSTREAM_TOKEN = "upstream-test-token"


class Receiver:
    """An EHR's MLLP listener: answers AA, AE or AR, answers for another MSH-10, or stalls."""

    def __init__(self, mode: str = "AA", port: int = 0) -> None:
        """port 0: a free one; another: that one (an EHR coming back where it was)."""
        self.mode = mode
        self.received: list[str] = []  # MSH-10 of every message, in arrival order
        self.messages: list[str] = []
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        deframer = Deframer()
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                for message in deframer.feed(chunk):
                    text = message.decode()
                    control = str(hl7.parse(text).segment("MSH")(10))
                    with self._lock:
                        self.received.append(control)
                        self.messages.append(text)
                    if self.mode == "stall":
                        continue
                    code = self.mode if self.mode in ("AA", "AE", "AR") else "AA"
                    answered = control if self.mode != "wrong" else "SOMETHING-ELSE"
                    ack = (f"MSH|^~\\&|EHR|EHR|FHIR-GATEWAY|GATEWAY|20260101000000||ACK^S01^ACK|A{control}|P|2.5.1\r"
                           f"MSA|{code}|{answered}|{'rejected by test' if code != 'AA' else ''}\r")
                    try:
                        conn.sendall(frame(ack.encode()))
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class TokenCheck:
    """In front of the upstream gateway: the static bearer token must be presented (and is then
    removed, as the gateway itself refuses every token until the SMART work lands)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token
        self.seen = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("HTTP_AUTHORIZATION") != f"Bearer {self.token}":
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [b'{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}']
        environ.pop("HTTP_AUTHORIZATION")
        self.seen += 1
        return self.app(environ, start_response)


@pytest.fixture
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second gateway instance on its own SQLite database and port, acting as the EHR's FHIR API."""
    path = tmp_path_factory.mktemp("upstream") / "ehr.sqlite"
    url = f"sqlite:///{path}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    port = free_port()
    settings = Settings.from_env(environ={}, database_url=url, open_access=True,
                                 base_url=f"http://127.0.0.1:{port}", instance_path=str(path.parent),
                                 secret_key="ehr", audit_enabled=False)
    app = create_app(settings)
    empty_tables(app.extensions["gateway"].engine)
    guard = TokenCheck(app.wsgi_app, UPSTREAM_TOKEN)
    app.wsgi_app = guard  # type: ignore[method-assign]
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield {"base": settings.fhir_base, "store": app.extensions["gateway"].store, "guard": guard}
    finally:
        server.shutdown()
        app.extensions["gateway"].close()
