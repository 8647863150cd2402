"""The outbox monitor: what waits to go to the EHR, per destination and item by item, and the two
things an operator does about it: retry (a failed or pending item becomes due now) and cancel (a
pending or failed item is never sent). The changes themselves are gateway.upstream.outbox's
retry_item and cancel_item, the ones `gateway outbox retry|cancel` use.

The items still to act on (pending, failed, cancelled: a small share of the table) are counted over
the status index. Delivered items are counted from the per-minute rollups that the workers'
deliveries feed (gateway.metrics), over the last minute, hour and day: counting them in the table
would read every item ever delivered (450 ms at 100,000 items on SQLite, growing for ever).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine, func, select

from gateway import db, metrics
from gateway.admin.models import metric_rollup
from gateway.config import Settings
from gateway.fhir.store import FhirStore
from gateway.upstream import outbox as worker
from gateway.upstream.outbox import Change

STATUSES = ("pending", "delivered", "failed", "cancelled")
OPEN_STATUSES = ("pending", "failed", "cancelled")  # counted in the table
CHANNELS = ("hl7", "fhir")
PAGE_SIZE = 50
MAX_ITEMS_PER_ACTION = 100
OB = db.outbox.c
# What the list shows of an item (the payload and the response only on its own page).
LIST_COLUMNS = (OB.id, OB.kind, OB.channel, OB.status, OB.resource_type, OB.resource_id, OB.version_id,
                OB.patient_id, OB.idempotency_key, OB.attempts, OB.next_attempt_ms, OB.created_at,
                OB.delivered_at, OB.last_error)


@dataclass
class Destination:
    """One kind of item over one channel: where it goes and how it is going."""

    kind: str
    channel: str
    endpoint: str  # where it is sent (no credentials); "" when the channel has no destination set
    configured: bool  # the kind is set to this channel now (GATEWAY_OUTBOX_<KIND>)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPEN_STATUSES, 0))
    due_now: int = 0  # pending items whose time has come (the others wait for their retry)
    last_error: str | None = None  # of the newest pending or failed item that has one
    last_error_item: int | None = None
    delivered_last_minute: int = 0  # in the last full minute
    delivered_last_hour: int = 0  # in this minute so far and the 59 before it
    delivered_last_day: int = 0  # in this minute so far and the 1,439 before it

    @property
    def depth(self) -> int:
        return self.counts["pending"]


def endpoint_of(settings: Settings, channel: str) -> str:
    if channel == "hl7":
        return f"{settings.outbox_mllp_host}:{settings.outbox_mllp_port}" if settings.outbox_mllp_port else ""
    url = settings.upstream_fhir_url
    if not url:
        return ""
    parts = urlsplit(url)  # never show credentials someone put in the URL
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname
                       else parts.netloc, parts.path, "", ""))


def destinations(engine: Engine, settings: Settings, now_ms: int | None = None) -> list[Destination]:
    """Every destination that is configured, holds items to act on or delivered some in the last day,
    configured ones first."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    found: dict[tuple[str, str], Destination] = {}

    def destination(kind: str, channel: str) -> Destination:
        if (kind, channel) not in found:
            found[(kind, channel)] = Destination(kind, channel, endpoint_of(settings, channel),
                                                 settings.outbox_channel(kind) == channel)
        return found[(kind, channel)]

    for kind in worker.KINDS:
        if settings.outbox_channel(kind) in CHANNELS:
            destination(kind, settings.outbox_channel(kind))
    minute = now_ms // metrics.MINUTE_MS * metrics.MINUTE_MS
    with engine.connect() as conn:
        for kind, channel, status, count in conn.execute(
                select(OB.kind, OB.channel, OB.status, func.count()).where(OB.status.in_(OPEN_STATUSES))
                .group_by(OB.kind, OB.channel, OB.status)):
            destination(kind, channel).counts[status] = int(count)
        for kind, channel, count in conn.execute(
                select(OB.kind, OB.channel, func.count()).where(OB.status == "pending", OB.next_attempt_ms <= now_ms)
                .group_by(OB.kind, OB.channel)):
            destination(kind, channel).due_now = int(count)
        newest = select(func.max(OB.id)).where(OB.status.in_(("pending", "failed")), OB.last_error.is_not(None)) \
            .group_by(OB.kind, OB.channel)
        for kind, channel, item_id, error in conn.execute(
                select(OB.kind, OB.channel, OB.id, OB.last_error).where(OB.id.in_(newest))):
            target = destination(kind, channel)
            target.last_error, target.last_error_item = error, item_id
        rc = metric_rollup.c
        for minute_ms, label, count in conn.execute(
                select(rc.minute_ms, rc.label, rc.count).where(
                    rc.minute_ms >= minute - 1439 * metrics.MINUTE_MS, rc.name == metrics.DELIVERY_ROLLUP,
                    rc.label.like("delivered %"))):
            _result, kind, channel = [*label.split(" "), "", ""][:3]
            target = destination(kind, channel)
            target.delivered_last_day += int(count)
            if minute_ms >= minute - 59 * metrics.MINUTE_MS:
                target.delivered_last_hour += int(count)
            if minute_ms == minute - metrics.MINUTE_MS:
                target.delivered_last_minute += int(count)
    return sorted(found.values(), key=lambda d: (not d.configured, worker.KINDS.index(d.kind)
                                                 if d.kind in worker.KINDS else 99, d.channel))


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    kind: str | None = None
    channel: str | None = None
    patient: str | None = None
    key: str | None = None  # the idempotency key: MSH-10 of an HL7 item, the outbox identifier of a FHIR one
    before: int | None = None  # the cursor: items with a smaller id (older)


@dataclass
class Page:
    items: list[Any]
    next_before: int | None  # the cursor of the next (older) page; None when there is none


def items(engine: Engine, filters: Filters, limit: int = PAGE_SIZE) -> Page:
    """Newest first, `limit` at a time, by id (a status filter uses the status index)."""
    query = select(*LIST_COLUMNS).order_by(OB.id.desc()).limit(limit + 1)
    for column, value in ((OB.status, filters.status), (OB.kind, filters.kind), (OB.channel, filters.channel),
                          (OB.patient_id, filters.patient), (OB.idempotency_key, filters.key)):
        if value:
            query = query.where(column == value)
    if filters.before is not None:
        query = query.where(OB.id < filters.before)
    with engine.connect() as conn:
        rows = list(conn.execute(query).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].id if more and rows else None)


def item(engine: Engine, item_id: int) -> Any | None:
    with engine.connect() as conn:
        return conn.execute(select(db.outbox).where(OB.id == item_id)).first()


def items_by_id(engine: Engine, ids: list[int]) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(*LIST_COLUMNS).where(OB.id.in_(ids)).order_by(OB.id.desc())).all())


def retry(store: FhirStore, settings: Settings, ids: list[int]) -> list[Change]:
    """Retry each item (outcome "missing" for an id with no item, "gone" when its resource was deleted)."""
    changes = []
    for item_id in _bounded(ids):
        try:
            changes.append(worker.retry_item(store, settings, item_id))
        except KeyError:
            changes.append(Change(item_id, "missing"))
        except ValueError as exc:
            changes.append(Change(item_id, "gone", str(exc)))
    return changes


def cancel(store: FhirStore, ids: list[int]) -> list[Change]:
    changes = []
    for item_id in _bounded(ids):
        try:
            changes.append(worker.cancel_item(store, item_id))
        except KeyError:
            changes.append(Change(item_id, "missing"))
    return changes


def _bounded(ids: list[int]) -> list[int]:
    unique = list(dict.fromkeys(ids))
    if not unique or len(unique) > MAX_ITEMS_PER_ACTION:
        raise ValueError(f"between 1 and {MAX_ITEMS_PER_ACTION} items at a time")
    return unique
