"""Production serving: gunicorn running create_app() in each worker process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication


class GatewayServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Called in each worker after the fork: engines and threads are never shared across processes.
        from gateway import create_app

        return create_app()


def run_gunicorn(host: str, port: int, workers: int, threads: int,
                 mllp: Callable[[], Any] | None = None, background: list[Callable[[], Any]] | None = None) -> None:
    """Serve HTTP; with `mllp`, the arbiter also runs the MLLP listener (one per server, not per
    worker) from when it is ready until it exits, stopping it gracefully after messages in flight.
    `background` starts more such services there (the outbox worker); each returns a handle with stop()."""
    listener: list[Any] = []

    def when_ready(_server: Any) -> None:
        if mllp is not None:
            listener.append(mllp())
        for start in background or []:
            listener.append(start())

    def on_exit(_server: Any) -> None:
        for handle in listener:
            handle.stop()

    GatewayServer({
        "when_ready": when_ready,
        "on_exit": on_exit,
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "graceful_timeout": 30,
        "timeout": 60,
        "accesslog": None,
    }).run()
