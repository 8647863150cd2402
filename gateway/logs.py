"""Structured logs: one JSON object a line, each request's lines tagged with its request id.

A request id comes from the caller's X-Request-ID (when it is a plain token of at most 64
characters) or is made here; it is echoed in the response and on every log line written while the
request runs. One access line per request names the route *template* (`/fhir/<type>/<id>`), never
the path or query, which may carry names, MRNs or ids of patients; its status and duration. A
redacting filter masks bearer tokens, passwords, secrets and codes should any message carry one.

`configure()` is called by the long-running commands (serve, mllp, worker); the app factory only
installs the request hooks, so tests and embedding applications keep their own logging.
"""

from __future__ import annotations

import itertools
import logging
import logging.config
import os
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

access_log = logging.getLogger("gateway.access")

# Request ids made here: a random prefix per process and a counter (unique across processes without
# a system call per request: os.urandom costs as much as a FHIR read on some kernels).
_PROCESS = uuid.uuid4().hex[:20]
_sequence = itertools.count(1)


def route() -> str:
    """The request's route template (/fhir/<resource_type>/<resource_id>) for a log line: never the path,
    which can name a patient."""
    return request.url_rule.rule if request.url_rule is not None else "(no route)"


def _new_process_prefix() -> None:
    global _PROCESS, _sequence
    _PROCESS = uuid.uuid4().hex[:20]
    _sequence = itertools.count(1)


os.register_at_fork(after_in_child=_new_process_prefix)  # gunicorn workers fork after this import
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECRETS = re.compile(
    r"(?i)(bearer\s+|(?:password|passwd|secret|client_secret|token|access_token|refresh_token|code|otp|"
    r"activation_code)[\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;]+)")


def request_id() -> str | None:
    return g.get("request_id") if has_request_context() else None


class RequestContext(logging.Filter):
    """Adds request_id to every record and masks secrets in the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id()
        message = record.getMessage()
        masked = _SECRETS.sub(lambda m: m.group(1) + "***", message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def formatter(fmt: str = "json") -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter("{asctime}{levelname}{name}{message}{request_id}", style="{",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")


def logconfig(fmt: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig document: everything (gunicorn's own loggers included) to stderr
    through one handler, as JSON lines or plain text. gunicorn takes it as logconfig_dict."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": {"()": "gateway.logs.formatter", "fmt": fmt}},
        "filters": {"request": {"()": "gateway.logs.RequestContext"}},
        "handlers": {"gateway": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": "gateway", "filters": ["request"]}},
        "root": {"level": level.upper(), "handlers": ["gateway"]},
        "loggers": {"gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
                    "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False}},
    }


def configure(fmt: str = "json", level: str = "INFO") -> None:
    logging.config.dictConfig(logconfig(fmt, level))


def install(app: Flask) -> None:
    @app.before_request
    def _begin() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else f"{_PROCESS}{next(_sequence):012x}"
        g.request_started = time.perf_counter()

    @app.after_request
    def _end(response: Response) -> Response:
        rid = g.get("request_id")
        if rid:
            response.headers["X-Request-ID"] = rid
        if access_log.isEnabledFor(logging.INFO):
            started: Any = g.get("request_started")
            access_log.info("request", extra={
                "method": request.method,
                "route": route(),
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
            })
        return response
