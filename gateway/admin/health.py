"""The health dashboard: what gateway.metrics rolled up per minute, over the last hour (one point a
minute) or the last day (one point per half hour), as small server-drawn SVG charts with the same
numbers in tables.

Read from metric_rollup only (every process adds to it), grouped into buckets in SQL over its
primary key (minute_ms first), so a day costs one indexed range read whatever the traffic was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from gateway import metrics
from gateway.admin.models import metric_rollup

MINUTE_MS = metrics.MINUTE_MS
R = metric_rollup.c


@dataclass(frozen=True)
class Span:
    name: str
    minutes: int  # how far back
    bucket_minutes: int  # one point per this many minutes


SPANS = {"hour": Span("hour", 60, 1), "day": Span("day", 24 * 60, 30)}

# The outcomes of received HL7 messages, in the order the chart lists them; the first two are
# always drawn, the others when they happened in the span.
HL7_ALWAYS = ("processed", "failed")
API_BLUEPRINT = "fhir"


@dataclass
class Series:
    key: str  # what it is (a status, "mean", "max", ...): the page names it
    values: list[float | None]  # one per bucket; None: nothing measured (a gap in the line)
    style: int = 0  # 0 solid, 1 dashed, 2 dotted, 3 dash-dot: told apart without colour

    @property
    def total(self) -> float:
        return sum(v for v in self.values if v is not None)


@dataclass
class Chart:
    key: str  # messages, latency, api, outbox
    series: list[Series]
    unit: str  # per-minute, ms, items
    y_ticks: list[tuple[float, float]] = field(default_factory=list)  # (y, value)
    x_ticks: list[tuple[float, int]] = field(default_factory=list)  # (x, bucket start ms)
    lines: list[tuple[int, list[list[tuple[float, float]]]]] = field(default_factory=list)  # (style, segments)
    # Small: at phone width the drawing is scaled down little, so its 12-unit text stays readable.
    width: int = 380
    height: int = 200
    left: int = 46
    right: int = 372
    top: int = 10
    bottom: int = 168

    @property
    def empty(self) -> bool:
        """Nothing was measured in the span (a count of zero is a measurement; a missing sample is not)."""
        return all(v is None for s in self.series for v in s.values)


@dataclass
class Dashboard:
    span: Span
    start_ms: int
    buckets: list[int]  # start of each bucket, ms since the epoch
    charts: list[Chart]
    summary: dict[str, float | None]
    depth_now: dict[str, int]


def read_buckets(engine: Engine, start_ms: int, end_ms: int, bucket_ms: int,
                 names: tuple[str, ...]) -> dict[tuple[str, str], dict[int, tuple[int, float, float]]]:
    """{(name, label): {bucket index: (count, total, peak)}} for rollup minutes in [start, end)."""
    slot = ((R.minute_ms - start_ms) // bucket_ms).label("slot")
    query = select(slot, R.name, R.label, func.sum(R.count), func.sum(R.total), func.max(R.peak)) \
        .where(R.minute_ms >= start_ms, R.minute_ms < end_ms, R.name.in_(names)) \
        .group_by(slot, R.name, R.label)
    found: dict[tuple[str, str], dict[int, tuple[int, float, float]]] = {}
    with engine.connect() as conn:
        for index, name, label, count, total, peak in conn.execute(query):
            found.setdefault((name, label), {})[int(index)] = (int(count), float(total), float(peak))
    return found


def dashboard(engine: Engine, span_name: str = "hour", now_ms: int | None = None) -> Dashboard:
    span = SPANS[span_name]
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    bucket_ms = span.bucket_minutes * MINUTE_MS
    # Buckets end with the one holding the current minute, and start on a bucket boundary.
    end_ms = (now_ms // bucket_ms + 1) * bucket_ms
    count = span.minutes // span.bucket_minutes
    start_ms = end_ms - count * bucket_ms
    data = read_buckets(engine, start_ms, end_ms, bucket_ms, (metrics.HL7_ROLLUP, metrics.HTTP_ROLLUP,
                                                            metrics.DEPTH_ROLLUP))
    per_minute = float(span.bucket_minutes)

    def cells(name: str, labels: Callable[[str], bool]) -> list[dict[int, tuple[int, float, float]]]:
        return [by_slot for (n, label), by_slot in data.items() if n == name and labels(label)]

    def rate(parts: list[dict[int, tuple[int, float, float]]]) -> list[float | None]:
        return [sum(p.get(i, (0, 0.0, 0.0))[0] for p in parts) / per_minute for i in range(count)]

    # Messages per minute by outcome
    statuses = [s for s in metrics.HL7_STATUSES
                if s in HL7_ALWAYS or (metrics.HL7_ROLLUP, s) in data]
    messages = Chart("messages", [Series(s, rate(cells(metrics.HL7_ROLLUP, lambda label, s=s: label == s)), n % 4)
                                  for n, s in enumerate(statuses)], "per-minute")
    # ACK latency: mean and max over the messages that got an ACK
    acked = cells(metrics.HL7_ROLLUP, lambda label: label != "unreadable")
    mean: list[float | None] = []
    peak: list[float | None] = []
    for i in range(count):
        got = [p[i] for p in acked if i in p]
        n = sum(c for c, _t, _p in got)
        mean.append(sum(t for _c, t, _p in got) / n if n else None)
        peak.append(max(p for _c, _t, p in got) if n else None)
    latency = Chart("latency", [Series("mean", mean, 0), Series("max", peak, 1)], "ms")
    # FHIR API requests and errors per minute
    api = Chart("api", [
        Series("requests", rate(cells(metrics.HTTP_ROLLUP, lambda label: label.startswith(API_BLUEPRINT + " "))), 0),
        Series("4xx", rate(cells(metrics.HTTP_ROLLUP, lambda label: label == f"{API_BLUEPRINT} 4xx")), 1),
        Series("5xx", rate(cells(metrics.HTTP_ROLLUP, lambda label: label == f"{API_BLUEPRINT} 5xx")), 2),
    ], "per-minute")
    # Outbox depth: the samples' mean and largest, and failed items (mean)
    depth_series = []
    for key, label, use_peak, style in (("pending", "pending", False, 0), ("pending-max", "pending", True, 1),
                                        ("failed", "failed", False, 2)):
        samples = data.get((metrics.DEPTH_ROLLUP, label), {})
        depth_series.append(Series(key, [
            (samples[i][2] if use_peak else samples[i][1] / samples[i][0]) if i in samples and samples[i][0] else None
            for i in range(count)], style))
    outbox = Chart("outbox", depth_series, "items")
    charts = [messages, latency, api, outbox]
    for chart in charts:
        lay_out(chart, start_ms, bucket_ms, count, span)
    received = messages.series
    total_messages = sum(s.total for s in received) * per_minute
    acked_count = sum(c for p in acked for c, _t, _p in p.values())
    summary: dict[str, float | None] = {
        "messages": round(total_messages),
        "failed": round(sum(s.total for s in received if s.key in ("failed", "rejected", "unreadable")) * per_minute),
        "ack_mean_ms": (sum(t for p in acked for _c, t, _p in p.values()) / acked_count) if acked_count else None,
        "ack_max_ms": max((pk for p in acked for _c, _t, pk in p.values()), default=None),
        "api_requests": round(api.series[0].total * per_minute),
        "api_errors": round(api.series[2].total * per_minute),
    }
    with engine.connect() as conn:
        depth_now = metrics.outbox_counts(conn)
    return Dashboard(span, start_ms, [start_ms + i * bucket_ms for i in range(count)], charts, summary, depth_now)


def nice_step(span: float) -> float:
    raw = span / 4 if span > 0 else 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def lay_out(chart: Chart, start_ms: int, bucket_ms: int, count: int, span: Span) -> None:
    """Coordinates: a point at the middle of each bucket, y from 0 to a round maximum; lines broken
    where nothing was measured."""
    values = [v for s in chart.series for v in s.values if v is not None]
    top_value = max(values, default=0.0)
    step = nice_step(top_value) if top_value > 0 else 1.0
    if chart.unit == "items":
        step = max(step, 1.0)  # whole items
    y_max = max(math.ceil(top_value / step) * step, step)
    slot = (chart.right - chart.left) / count

    def x_of(i: float) -> float:
        return round(chart.left + (i + 0.5) * slot, 1)

    def y_of(v: float) -> float:
        return round(chart.bottom - v / y_max * (chart.bottom - chart.top), 1)

    value = 0.0
    while value <= y_max + step / 2:
        chart.y_ticks.append((y_of(value), value))
        value += step
    every = max(count // 4, 1)
    for i in range(0, count + 1, every):
        chart.x_ticks.append((round(chart.left + i * slot, 1), start_ms + i * bucket_ms))
    for series in chart.series:
        segments: list[list[tuple[float, float]]] = []
        current: list[tuple[float, float]] = []
        for i, v in enumerate(series.values):
            if v is None:
                if current:
                    segments.append(current)
                current = []
                continue
            current.append((x_of(i), y_of(v)))
        if current:
            segments.append(current)
        chart.lines.append((series.style, segments))
