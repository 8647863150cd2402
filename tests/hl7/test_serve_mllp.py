"""`gateway serve` runs the MLLP listener as a child process of its own.

A thread of the gunicorn arbiter would be inside SQLite whenever a message is being stored, and the
arbiter forks HTTP workers at any time: a worker forked then would inherit SQLite's locks held for
ever. So the listener is a separate process that stops with the server, and by itself when the
server dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.hl7.mllp import send_messages
from tests.conftest import free_port
from tests.processes import ROOT, gateway_env, gateway_process

ADT = ("MSH|^~\\&|APP|FAC|GW|GW|20261101083000||ADT^A04|SERVE1|P|2.5.1\r"
       "PID|1||MRN77^^^HOSP^MR||Serve^Test||19800101|F\r")


def _listener_pid(port: int) -> int | None:
    """The process holding the listening socket on this port (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_the_mllp_listener_is_a_child_process_that_outlives_no_server(tmp_path: Path) -> None:
    http_port, mllp_port = free_port(), free_port()
    env = gateway_env(GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.sqlite'}", GATEWAY_OPEN_ACCESS="1",
                      GATEWAY_INSTANCE_PATH=str(tmp_path), GATEWAY_OUTBOX_WORKER_IN_SERVE="0")
    subprocess.run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    args = ["serve", "--port", str(http_port), "--mllp-port", str(mllp_port), "--workers", "1", "--threads", "2"]
    with gateway_process(args, env, tmp_path / "serve.log", ports=(mllp_port,)) as server:
        ((ack,),) = send_messages("127.0.0.1", mllp_port, [ADT.encode()], timeout=30)
        assert b"|AA|SERVE1" in ack
        listener = _listener_pid(mllp_port)
        assert listener is not None and listener != server.pid and _parent(listener) == server.pid
        # The arbiter dies without a chance to stop anything: the listener notices and goes too.
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _listening(mllp_port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(mllp_port), "the MLLP listener outlived the server"
