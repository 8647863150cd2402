"""Gateway commands as real processes in tests: each in a process group of its own with its output in a
log file (never a pipe nobody reads), waited for until its ports listen, and never left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gateway_env(**settings: str) -> dict[str, str]:
    """This process's environment without the caller's GATEWAY_* (and prometheus_client's) settings,
    plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
    env.update({"PYTHONPATH": str(ROOT), **settings})
    return env


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path, seconds: float = 120) -> None:
    """Until something accepts on 127.0.0.1:port; fails with the log's tail if the process ends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the process group (a graceful stop), SIGKILL when it takes longer than `timeout`,
    and SIGKILL to any child that outlived its parent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def gateway_process(args: Sequence[str], env: dict[str, str], log: Path, ports: Sequence[int] = (),
                    stop_timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """`gateway ARGS...` running until the block ends, after each of `ports` listens."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        for port in ports:
            wait_port(port, proc, log)
        yield proc
    finally:
        stop(proc, stop_timeout)
