"""Health dashboard (/admin/health): messages per minute by outcome, ACK latency, FHIR API requests and
errors, and the outbox depth, over the last hour or day (gateway.admin.health)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Response, request
from flask_babel import format_datetime, format_decimal, format_time
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l

from gateway.admin import health as service
from gateway.admin.web import area, bp, error_page, nav_item, page, services

nav_item(60, "health", "admin.health", _l("Health"))

CHARTS = {
    "messages": (_l("HL7 messages per minute"), _l("Messages received per minute, by outcome.")),
    "latency": (_l("ACK latency"), _l("Milliseconds from receiving a message to its acknowledgement being ready: "
                                      "the mean and the slowest.")),
    "api": (_l("FHIR API requests per minute"), _l("Requests to the FHIR API per minute, and those answered "
                                                   "with a client error (4xx) or a server error (5xx).")),
    "outbox": (_l("Outbox depth"), _l("Items waiting to be sent to the EHR (mean and largest of the samples), "
                                      "and failed items waiting for a person.")),
}
SERIES = {
    "processed": _l("processed"), "failed": _l("failed"), "rejected": _l("rejected"),
    "duplicate": _l("duplicate"), "unreadable": _l("unreadable"), "mean": _l("mean"), "max": _l("slowest"),
    "requests": _l("all requests"), "4xx": _l("client errors (4xx)"), "5xx": _l("server errors (5xx)"),
    "pending": _l("waiting (mean)"), "pending-max": _l("waiting (largest)"), "failed-items": _l("failed items"),
}
UNITS = {"per-minute": _l("per minute"), "ms": _l("milliseconds"), "items": _l("items")}
STYLES = [("#0b4f8a", ""), ("#9e1c1c", "7 4"), ("#5b3f8c", "2 3"), ("#2f6b2f", "9 3 2 3")]


def series_name(chart_key: str, series_key: str) -> str:
    if chart_key == "outbox" and series_key == "failed":
        series_key = "failed-items"
    return str(SERIES.get(series_key, series_key))


def number(value: float | None) -> str:
    if value is None:
        return _("no data")
    return format_decimal(round(value, 1), format="#,##0.#")


def moment(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@bp.get("/health")
@area("health")
def health() -> Response:
    span = request.args.get("span", "hour")
    if span not in service.SPANS:
        return error_page(400, _("Choose the last hour or the last day."))
    board = service.dashboard(services().engine, span)
    day = span == "day"

    def tick(ms: int) -> str:
        return format_time(moment(ms), "short")

    def when(ms: int) -> str:
        return format_datetime(moment(ms), "short") if day else format_time(moment(ms), "short")

    values: dict[str, Any] = {"board": board, "charts": CHARTS, "series_name": series_name, "units": UNITS,
                              "styles": STYLES, "number": number, "tick": tick, "when": when,
                              "bucket_minutes": board.span.bucket_minutes}
    return page("health.html", **values)
