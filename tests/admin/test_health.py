"""The health dashboard draws what the rollups hold: rows the test writes come out in the charts'
points and tables, per minute over the hour and in half hours over the day."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from gateway import metrics
from gateway.admin import health
from tests.portal.conftest import text_of

MINUTE = 60_000


def row(minute_ms: int, name: str, label: str, count: int, total: float = 0.0, peak: float = 0.0) -> dict[str, Any]:
    return {"minute_ms": minute_ms, "name": name, "label": label, "count": count, "total": total, "peak": peak}


def write_hour(engine: Any, now_ms: int) -> int:
    """Rows 10 and 3 minutes before the current minute; returns the current minute's start."""
    minute = now_ms // MINUTE * MINUTE
    metrics.add_rows(engine, [
        row(minute - 10 * MINUTE, metrics.HL7_ROLLUP, "processed", 12, total=12 * 40.0, peak=90.0),
        row(minute - 10 * MINUTE, metrics.HL7_ROLLUP, "failed", 3, total=3 * 20.0, peak=25.0),
        row(minute - 10 * MINUTE, metrics.HL7_ROLLUP, "unreadable", 2),  # no ACK: not in the latency
        row(minute - 3 * MINUTE, metrics.HL7_ROLLUP, "processed", 6, total=6 * 10.0, peak=15.0),
        row(minute - 3 * MINUTE, metrics.HTTP_ROLLUP, "fhir 2xx", 40, total=400.0, peak=30.0),
        row(minute - 3 * MINUTE, metrics.HTTP_ROLLUP, "fhir 4xx", 5, total=10.0, peak=3.0),
        row(minute - 3 * MINUTE, metrics.HTTP_ROLLUP, "fhir 5xx", 1, total=1.0, peak=1.0),
        row(minute - 3 * MINUTE, metrics.HTTP_ROLLUP, "portal 2xx", 99, total=99.0, peak=1.0),  # not the API
        row(minute - 3 * MINUTE, metrics.DEPTH_ROLLUP, "pending", 4, total=4 * 7.0, peak=11.0),
        row(minute - 3 * MINUTE, metrics.DEPTH_ROLLUP, "failed", 4, total=8.0, peak=2.0),
        row(minute - 2 * 3_600_000, metrics.HL7_ROLLUP, "processed", 600, total=600.0, peak=5.0),  # the day only
    ])
    return minute


def series(chart: health.Chart, key: str) -> list[float | None]:
    return next(s.values for s in chart.series if s.key == key)


def test_the_hour_shows_each_minute_of_the_rollups(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    now = int(time.time() * 1000)
    write_hour(engine, now)
    board = health.dashboard(engine, "hour", now)
    assert len(board.buckets) == 60 and board.buckets[-1] == now // MINUTE * MINUTE
    messages, latency, api, outbox = board.charts
    assert [s.key for s in messages.series] == ["processed", "failed", "unreadable"]  # rejected, duplicate: none
    assert series(messages, "processed")[-11] == 12 and series(messages, "processed")[-4] == 6
    assert series(messages, "failed")[-11] == 3 and series(messages, "unreadable")[-11] == 2
    assert series(messages, "processed")[-12] == 0  # a minute without messages is a zero, not a gap
    assert series(latency, "mean")[-11] == (12 * 40 + 3 * 20) / 15 and series(latency, "max")[-11] == 90
    assert series(latency, "mean")[-12] is None  # no message: no latency
    assert series(api, "requests")[-4] == 46 and series(api, "4xx")[-4] == 5 and series(api, "5xx")[-4] == 1
    assert series(outbox, "pending")[-4] == 7 and series(outbox, "pending-max")[-4] == 11
    assert series(outbox, "failed")[-4] == 2 and series(outbox, "pending")[-5] is None
    assert board.summary["messages"] == 23 and board.summary["failed"] == 5
    assert board.summary["ack_max_ms"] == 90 and board.summary["api_errors"] == 1
    # drawn: one polyline segment per run of known values; every point inside the plot area
    style, segments = outbox.lines[0]
    assert style == 0 and len(segments) == 1 and len(segments[0]) == 1
    for chart in board.charts:
        for _style, parts in chart.lines:
            for x, y in (p for part in parts for p in part):
                assert chart.left <= x <= chart.right and chart.top <= y <= chart.bottom


def test_the_day_adds_up_half_hours(app: Any) -> None:
    engine = app.extensions["gateway"].engine
    now = int(time.time() * 1000)
    write_hour(engine, now)
    board = health.dashboard(engine, "day", now)
    assert len(board.buckets) == 48 and board.buckets[1] - board.buckets[0] == 30 * MINUTE
    processed = series(board.charts[0], "processed")
    assert sum(v or 0 for v in processed) * 30 == pytest.approx(618)  # per minute in each half hour, times its minutes
    assert board.summary["messages"] == 600 + 12 + 3 + 2 + 6


def test_the_page_shows_the_charts_and_their_numbers(app: Any, console: Any) -> None:
    engine = app.extensions["gateway"].engine
    write_hour(engine, int(time.time() * 1000))
    driver = console("operator")
    html = driver.get("/admin/health")
    assert html.count('<svg class="chart" role="img"') == 4
    assert len(re.findall(r"<polyline", html)) >= 3
    text = text_of(html)
    assert "HL7 messages per minute" in text and "ACK latency" in text and "Outbox depth" in text
    table = html[html.index('id="table-messages"'):html.index("</table>", html.index('id="table-messages"'))]
    assert len(re.findall(r"<tr><th scope=\"row\">", table)) == 60
    cells = re.findall(r'<td class="num">([^<]*)</td>', table)
    assert "12" in cells and "6" in cells
    assert "HL7 messages received 23" in text
    day = driver.get("/admin/health?span=day")
    assert text_of(day).count("HL7 messages received 623") == 1
    assert driver.client.get("/admin/health?span=week").status_code == 400


def test_front_desk_does_not_see_the_health_dashboard(app: Any, console: Any) -> None:
    assert console("front-desk").client.get("/admin/health").status_code == 403
    assert console("security-officer").client.get("/admin/health").status_code == 200
