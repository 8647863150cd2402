"""Production serving: gunicorn running create_app() in each worker process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger


class GatewayLogger(Logger):  # type: ignore[misc]
    """The gateway writes its own access line (gateway.logs: route templates, no paths). Given a
    logging configuration, gunicorn would build its own line's fields for every request (about 3% of
    a request's CPU) and then drop it at the WARNING level its logger has."""

    def access(self, *args: Any, **kwargs: Any) -> None:
        return None


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

        app = create_app()
        # the worker stores spooled AuditEvents whenever it has time, from the start
        app.extensions["gateway"].audit.start()
        return app


def run_gunicorn(host: str, port: int, workers: int, threads: int,
                 background: list[Callable[[], Any]] | None = None, logconfig: dict[str, Any] | None = None,
                 keepalive: int = 75) -> None:
    """Serve HTTP. `background` starts services beside the workers once the arbiter is ready (the
    MLLP listener and the outbox worker, each a child process) and each handle's stop() runs when it
    exits (the MLLP listener finishes the messages in flight)."""
    handles: list[Any] = []

    def when_ready(_server: Any) -> None:
        for start in background or []:
            handles.append(start())

    def on_exit(_server: Any) -> None:
        for handle in handles:
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
        "keepalive": int(keepalive),  # idle keep-alive connections wait in the gthread poller, not in a thread
        # gunicorn's control socket sits at one fixed path for every instance on the machine; the
        # gateway is driven by signals (HUP, TERM), so it has none
        "control_socket_disable": True,
        "accesslog": None,  # the app writes its own access line (gateway.logs): route templates, no paths
        "logger_class": GatewayLogger,
        **({"logconfig_dict": logconfig} if logconfig else {}),
    }).run()
