"""Tables of the operator console (migration 0008_admin), in the store's metadata."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, String, Table

from gateway.db import metadata

# The console roles of a login (gateway.access.STAFF_ROLES); a login without a row is not staff.
staff_role = Table(
    "staff_role",
    metadata,
    Column("user_id", BigInteger, primary_key=True),
    Column("role", String(32), primary_key=True),
)

# Per-minute sums of the counters /metrics exposes (gateway.metrics), added to by every process, so
# the health dashboard can draw the last hour and day across all of them.
metric_rollup = Table(
    "metric_rollup",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),  # start of the minute, ms since the epoch
    Column("name", String(64), primary_key=True),
    Column("label", String(64), primary_key=True),  # e.g. an HL7 status or an HTTP status class
    Column("count", BigInteger, nullable=False),
    Column("total", Float, nullable=False),  # sum of the observed values (latencies in ms), 0 for counts
    Column("peak", Float, nullable=False),  # largest observed value in the minute
)
