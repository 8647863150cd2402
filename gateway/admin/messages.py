"""The HL7 message browser: find stored messages, show one with its segments and fields named, and
act on failed ones (reprocess, set aside with a reason) and on those left `received` (reprocess).

Plain functions over the engine and the ingest pipeline; the console's pages call them (and audit),
tests call them without HTTP. The list never counts or loads all rows: newest first by id (the
order of arrival), 50 a page, the next page after the last id shown (keyset), and every filter is
answered from an index of hl7_message (see `_conditions`; bench/admin_messages.py checks the plans
on a million rows).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hl7apy import SUPPORTED_LIBRARIES, load_reference
from hl7apy.exceptions import HL7apyException
from sqlalchemy import ColumnElement, Connection, Engine, select, update

from gateway import db
from gateway.hl7 import parse
from gateway.hl7.ingest import reprocessable, stored_acks

M = db.hl7_message.c
W = db.hl7_written.c

STATUSES = ("received", "processed", "failed", "duplicate", "ignored")
IGNORABLE = frozenset({"failed"})
PAGE_SIZE = 50
TRUNCATED = "truncated"  # why a message was skipped: only its start is stored (over the maximum size)
REPROCESS_LIMIT = 50  # messages one request may reprocess (one list page): each is a full translation
REASON_MAX = 500
FILTER_MAX = 255  # the widest filtered column
# A message's received_ms is stamped just before its row is inserted (inside the insert's transaction),
# so ids follow arrival to within this slack; the day filter turns into an id range with it.
ARRIVAL_SLACK_MS = 60_000
FALLBACK_VERSION = "2.5"  # hl7apy's definitions for a version it does not have (as the ACK builder does)


class BadFilter(ValueError):
    """A filter value the list cannot search by; `what` names the filter."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what


class BadCursor(ValueError):
    """A page link that is not one this service made."""


class NotFound(LookupError):
    pass


class NotAllowed(ValueError):
    """The message's status does not allow the action (e.g. ignoring a processed message)."""

    def __init__(self, message_id: int, status: str) -> None:
        super().__init__(f"message {message_id} is {status}")
        self.status = status


# --- the list ---

@dataclass(frozen=True)
class Filters:
    control_id: str = ""
    sender: str = ""  # MSH-3 sending application (its first component)
    message_type: str = ""  # MSH-9 code^trigger, e.g. ORU^R01
    mrn: str = ""
    status: str = ""
    received_from: date | None = None  # days in the clinic's time zone, both included
    received_to: date | None = None

    def __post_init__(self) -> None:
        for name in ("control_id", "sender", "message_type", "mrn"):
            value = getattr(self, name).strip()
            if len(value) > FILTER_MAX:
                raise BadFilter(name, f"at most {FILTER_MAX} characters")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "message_type", normal_type(self.message_type))
        if self.status and self.status not in STATUSES:
            raise BadFilter("status", f"one of {', '.join(STATUSES)}")
        if self.received_from and self.received_to and self.received_from > self.received_to:
            raise BadFilter("received_from", "the first day is after the last day")

    @property
    def empty(self) -> bool:
        return self == Filters()

    def query(self) -> list[tuple[str, str]]:
        """The filters as URL parameters (for the next page's link and for going back to the list)."""
        pairs = [(name, getattr(self, name)) for name in ("control_id", "sender", "message_type", "mrn", "status")]
        pairs += [(name, getattr(self, name).isoformat()) for name in ("received_from", "received_to")
                  if getattr(self, name)]
        return [(k, v) for k, v in pairs if v]


def normal_type(value: str) -> str:
    """ORU^R01 as people type it: "oru r01", "ORU_R01" (the structure's spelling) or "ORU^R01"."""
    return re.sub(r"[\s_]+", "^", value.strip()).upper()


@dataclass(frozen=True)
class Listed:
    id: int
    received: datetime  # aware, in the clinic's time zone
    status: str
    message_type: str | None
    control_id: str | None
    sending_app: str | None
    sending_facility: str | None
    mrn: str | None
    patient_id: str | None
    error_code: str | None
    error: str | None
    flagged: bool
    ack_ms: int | None
    truncated_from_bytes: int | None = None  # over the maximum size: only its start is stored

    @property
    def reprocessable(self) -> bool:
        return reprocessable(self.status, _epoch_ms(self.received), self.truncated_from_bytes)


@dataclass(frozen=True)
class Page:
    messages: list[Listed]
    next_cursor: str | None  # None: this is the last page


_LIST_COLUMNS = (M.id, M.received_ms, M.status, M.message_type, M.control_id, M.sending_app, M.sending_facility,
                 M.mrn, M.patient_id, M.error_code, M.error, M.flagged, M.ack_ms, M.truncated_from_bytes)


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"before:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor(cursor) from None
    kind, _, number = text.partition(":")
    if kind != "before" or not number.isdigit() or len(number) > 19:
        raise BadCursor(cursor)
    return int(number)


def day_bounds(filters: Filters, timezone: str) -> tuple[int | None, int | None]:
    """The received-date filter as [start, end) in ms since the epoch (None: open)."""
    zone = ZoneInfo(timezone)

    def midnight(day: date) -> int:
        return int(datetime.combine(day, time.min, tzinfo=zone).timestamp() * 1000)

    start = midnight(filters.received_from) if filters.received_from else None
    end = midnight(filters.received_to + timedelta(days=1)) if filters.received_to else None
    return start, end


def _id_range(conn: Connection, start_ms: int | None, end_ms: int | None) -> tuple[int | None, int | None]:
    """Ids bounding the messages received in [start, end), from two probes of ix_hl7_received.

    Ids are assigned in arrival order, so a day's messages are one id range: scanning it backwards by
    primary key (or by (status, id), (sending_app, id), (message_type, id)) gives newest first without
    sorting the day. Bounds are exclusive and widened by ARRIVAL_SLACK_MS; the received_ms condition
    stays in the query, so the result is exact.
    """
    low = high = None
    if start_ms is not None:
        low = conn.execute(select(M.id).where(M.received_ms < start_ms - ARRIVAL_SLACK_MS)
                           .order_by(M.received_ms.desc()).limit(1)).scalar()
    if end_ms is not None:
        high = conn.execute(select(M.id).where(M.received_ms >= end_ms + ARRIVAL_SLACK_MS)
                            .order_by(M.received_ms).limit(1)).scalar()
    return low, high


def _conditions(conn: Connection, filters: Filters, timezone: str, before_id: int | None) -> list[ColumnElement[bool]]:
    """WHERE conditions; each filter has an index to start from: ix_hl7_control (control id),
    ix_hl7_sender, ix_hl7_type, ix_hl7_mrn, ix_hl7_status, and the primary key for dates and paging."""
    where: list[ColumnElement[bool]] = []
    if filters.control_id:
        where.append(M.control_id == filters.control_id)
    if filters.sender:
        where.append(M.sending_app == filters.sender)
    if filters.message_type:
        where.append(M.message_type == filters.message_type)
    if filters.mrn:
        where.append(M.mrn == filters.mrn)
    if filters.status:
        where.append(M.status == filters.status)
    start_ms, end_ms = day_bounds(filters, timezone)
    if start_ms is not None or end_ms is not None:
        low, high = _id_range(conn, start_ms, end_ms)
        if start_ms is not None:
            where.append(M.received_ms >= start_ms)
        if end_ms is not None:
            where.append(M.received_ms < end_ms)
        if low is not None:
            where.append(M.id > low)
        if high is not None:
            before_id = high if before_id is None else min(before_id, high)
    if before_id is not None:
        where.append(M.id < before_id)
    return where


def list_query(conn: Connection, filters: Filters, timezone: str, cursor: str | None = None,
               page_size: int = PAGE_SIZE) -> Any:
    """The SELECT of one page (also for EXPLAIN in the tests and the benchmark)."""
    before_id = decode_cursor(cursor) if cursor else None
    return (select(*_LIST_COLUMNS).where(*_conditions(conn, filters, timezone, before_id))
            .order_by(M.id.desc()).limit(page_size + 1))


def find(engine: Engine, filters: Filters, cursor: str | None = None, timezone: str = "UTC",
         page_size: int = PAGE_SIZE) -> Page:
    """One page of messages, newest first; BadCursor for a page link this service did not make."""
    zone = ZoneInfo(timezone)
    with engine.connect() as conn:
        rows = conn.execute(list_query(conn, filters, timezone, cursor, page_size)).all()
    more = len(rows) > page_size
    rows = rows[:page_size]
    listed = [Listed(r.id, _local(r.received_ms, zone), r.status, r.message_type, r.control_id, r.sending_app,
                     r.sending_facility, r.mrn, r.patient_id, r.error_code, r.error, bool(r.flagged), r.ack_ms,
                     r.truncated_from_bytes)
              for r in rows]
    return Page(listed, encode_cursor(rows[-1].id) if more else None)


def _local(ms: int, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(zone)


# --- one message, its segments and fields named ---

@dataclass(frozen=True)
class FieldView:
    position: str  # "PID-5"
    name: str | None  # "Patient Name" (hl7apy's definition for the message's version)
    datatype: str | None  # "XPN"
    value: str  # as sent (escaped)
    components: tuple[tuple[str, str | None, str], ...] = ()  # ("PID-5.1", "Family Name", "Lopez"), valued only
    at_error: bool = False

    @property
    def title(self) -> str:
        label = f"{self.position} {self.name}" if self.name else self.position
        return f"{label} ({self.datatype})" if self.datatype else label


@dataclass(frozen=True)
class SegmentView:
    name: str
    fields: tuple[FieldView, ...]  # every position up to the last one sent, empty ones included
    at_error: bool = False

    @property
    def valued(self) -> list[FieldView]:
        return [f for f in self.fields if f.value and not (self.name == "MSH" and f.position == "MSH-1")]


@dataclass(frozen=True)
class Written:
    resource_type: str
    resource_id: str
    version_id: int
    action: str


@dataclass
class Detail:
    id: int
    received: datetime
    channel: str
    peer: str | None
    sending_app: str | None
    sending_facility: str | None
    control_id: str | None
    message_type: str | None
    version: str | None
    status: str
    flagged: bool
    duplicate_of: int | None
    error: str | None
    error_code: str | None
    error_location: str | None
    error_name: str | None  # the field at the error's location, named
    patient_id: str | None
    mrn: str | None
    ack_ms: int | None
    note: str | None
    raw: str
    separator: str  # MSH-1, put between fields when the message is drawn
    segments: list[SegmentView] | None  # None: the message cannot be split (shown as sent)
    acks: list[list[SegmentView]]
    ack_text: list[str]
    written: list[Written] = field(default_factory=list)
    truncated_from_bytes: int | None = None  # over the maximum size: `raw` is only its start

    @property
    def reprocessable(self) -> bool:
        return reprocessable(self.status, _epoch_ms(self.received), self.truncated_from_bytes)

    @property
    def ignorable(self) -> bool:
        return self.status in IGNORABLE

    @property
    def error_text(self) -> str | None:
        return parse.TABLE_0357.get(self.error_code or "")


def reference_version(version: str | None) -> str:
    """The hl7apy definitions to name a message's fields with: its own version (MSH-12), else the
    same major.minor, else v2.5."""
    version = (version or "").strip()
    if version in SUPPORTED_LIBRARIES:
        return version
    short = ".".join(version.split(".")[:2])
    return short if short in SUPPORTED_LIBRARIES else FALLBACK_VERSION


_SMALL_WORDS = frozenset({"of", "or", "and", "the", "to", "for", "in", "by", "on", "at", "a", "an", "with"})


def humanize(long_name: str, segment: str = "") -> str:
    """hl7apy's long names as people read them: PATIENT_NAME -> Patient Name, MOTHER_S_MAIDEN_NAME ->
    Mother's Maiden Name, SET_ID_PID -> Set ID PID."""
    text = re.sub(r"_S_", "'s_", f"_{long_name}_").replace("_E_G_", "_e.g._").strip("_")
    words = []
    for n, word in enumerate(w for w in text.split("_") if w):
        lower = word.lower()
        if word in ("ID", segment) or (len(word) > 1 and word.isalpha() and not re.search(r"[AEIOUY]", word)):
            words.append(word)
        elif (n and lower in _SMALL_WORDS) or word == "e.g.":
            words.append(lower)
        else:
            words.append(lower[:1].upper() + lower[1:])
    return " ".join(words)


@dataclass(frozen=True)
class _FieldDefinition:
    name: str
    datatype: str | None
    components: tuple[str, ...]  # component names in order


@functools.lru_cache(maxsize=1024)
def field_definitions(segment: str, version: str) -> dict[int, _FieldDefinition]:
    """Field number -> name, data type and component names from hl7apy's reference for this segment in
    this version ({} for a segment it does not define, such as a Z-segment)."""
    try:
        reference = load_reference(segment, "Segment", version)
    except (HL7apyException, KeyError):
        return {}
    definitions = {}
    for child in reference[1]:
        number = int(child[0].rsplit("_", 1)[1])
        structure = child[1]
        withdrawn = child[2][1] == 0
        components: tuple[str, ...] = ()
        if structure[0] == "sequence":
            components = tuple(humanize(c[1][3], segment) for c in structure[1])
        name = humanize(structure[3], segment) + (" (withdrawn)" if withdrawn else "")
        definitions[number] = _FieldDefinition(name, None if withdrawn else structure[2], components)
    return definitions


def _error_position(location: str | None) -> tuple[str, int, int | None] | None:
    """"PID-5", "OBX[2]-5.1", "MSH-9.2" -> (segment, occurrence, field)."""
    match = re.match(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+))?", location or "")
    if not match:
        return None
    return match[1], int(match[2] or 1), int(match[3]) if match[3] else None


def name_segments(text: str, version: str | None, error_location: str | None = None) -> list[SegmentView] | None:
    """The message split into segments and fields, each field named; None when it cannot be split."""
    try:
        message = parse.parse(text)
    except parse.ParseError:
        return None
    seps = message.separators
    library = reference_version(version)
    error_at = _error_position(error_location)
    seen: dict[str, int] = {}
    views = []
    for segment in message:
        name = segment.name or ""
        seen[name] = seen.get(name, 0) + 1
        definitions = field_definitions(name, library)
        segment_at_error = error_at is not None and error_at[0] == name and error_at[1] == seen[name]
        fields = []
        for number, value in enumerate(segment.fields, 1):
            definition = definitions.get(number)
            components: list[tuple[str, str | None, str]] = []
            splittable = not (name == "MSH" and number <= 2)
            repetitions = value.split(seps.repetition) if splittable and value else []
            if any(seps.component in r for r in repetitions) or len(repetitions) > 1:
                for rep_no, repetition in enumerate(repetitions, 1):
                    for comp_no, component in enumerate(repetition.split(seps.component), 1):
                        if not component:
                            continue
                        where = f"{name}-{number}" + (f"[{rep_no}]" if len(repetitions) > 1 else "") + f".{comp_no}"
                        label = None
                        if definition and comp_no <= len(definition.components):
                            label = definition.components[comp_no - 1]
                        components.append((where, label, parse.unescape(component, seps)))
            fields.append(FieldView(f"{name}-{number}", definition.name if definition else None,
                                    definition.datatype if definition else None, value, tuple(components),
                                    segment_at_error and error_at is not None and error_at[2] == number))
        # the whole segment is marked only when the location names no field in it
        whole = segment_at_error and error_at is not None and error_at[2] is None
        views.append(SegmentView(name, tuple(fields), whole))
    return views


def _named(position: str | None, version: str | None) -> str | None:
    at = _error_position(position)
    if at is None or at[2] is None:
        return None
    definition = field_definitions(at[0], reference_version(version)).get(at[2])
    return definition.name if definition else None


def detail(engine: Engine, message_id: int, timezone: str = "UTC") -> Detail:
    """One message with everything the browser shows about it; NotFound when there is none."""
    with engine.connect() as conn:
        row = conn.execute(select(db.hl7_message).where(M.id == message_id)).first()
        if row is None:
            raise NotFound(message_id)
        written = conn.execute(select(W.resource_type, W.resource_id, W.version_id, W.action)
                               .where(W.message_id == message_id)
                               .order_by(W.resource_type, W.resource_id, W.version_id)).all()
    ack_text = list(stored_acks(row.ack))
    acks = []
    for ack in ack_text:
        try:
            ack_version = parse.read_header(ack).version
        except parse.ParseError:
            ack_version = row.version
        named = name_segments(ack, ack_version)
        if named is not None:
            acks.append(named)
    separator = "|"
    with contextlib.suppress(parse.ParseError):
        separator = parse.read_header(row.raw).field_separator
    return Detail(
        id=row.id, received=_local(row.received_ms, ZoneInfo(timezone)), channel=row.channel, peer=row.peer,
        sending_app=row.sending_app, sending_facility=row.sending_facility, control_id=row.control_id,
        message_type=row.message_type, version=row.version, status=row.status, flagged=bool(row.flagged),
        duplicate_of=row.duplicate_of, error=row.error, error_code=row.error_code,
        error_location=row.error_location, error_name=_named(row.error_location, row.version),
        patient_id=row.patient_id, mrn=row.mrn, ack_ms=row.ack_ms, note=row.note, raw=row.raw,
        separator=separator, segments=name_segments(row.raw, row.version, row.error_location),
        acks=acks, ack_text=ack_text, written=[Written(*w) for w in written],
        truncated_from_bytes=row.truncated_from_bytes,
    )


# --- actions ---

def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Reprocessed:
    message_id: int
    status: str  # processed, failed, duplicate; "skipped" when its status did not allow a reprocess
    error: str | None  # skipped: TRUNCATED when that is why
    patient_id: str | None
    duplicate_of: int | None = None  # duplicate: the copy of it that was processed


def reprocess(ingest: Any, engine: Engine, message_ids: Iterable[int]) -> list[Reprocessed]:
    """Run failed, ignored or stuck messages (see `reprocessable`) through translation again, oldest
    first, with the pipeline the CLI's `gateway hl7 reprocess` uses (maps changed on disk are read
    again first). Other messages are skipped. At most REPROCESS_LIMIT at once (ValueError beyond)."""
    wanted = sorted(set(message_ids))
    if len(wanted) > REPROCESS_LIMIT:
        raise ValueError(f"at most {REPROCESS_LIMIT} messages at once")
    if not wanted:
        return []
    with engine.connect() as conn:
        found = {r.id: r for r in conn.execute(select(M.id, M.status, M.received_ms, M.truncated_from_bytes)
                                               .where(M.id.in_(wanted)))}
    missing = [m for m in wanted if m not in found]
    if missing:
        raise NotFound(missing[0])
    now_ms = _epoch_ms(datetime.now(UTC))
    outcomes = {}
    for message_id in wanted:
        row = found[message_id]
        if not reprocessable(row.status, row.received_ms, row.truncated_from_bytes, now_ms):
            outcomes[message_id] = ("skipped", TRUNCATED if row.truncated_from_bytes is not None else None)
            continue
        outcome = ingest.reprocess(message_id)
        outcomes[message_id] = (outcome.status, outcome.error)
    with engine.connect() as conn:
        after = {r.id: r for r in conn.execute(select(M.id, M.patient_id, M.duplicate_of).where(M.id.in_(wanted)))}
    return [Reprocessed(m, outcomes[m][0], outcomes[m][1], after[m].patient_id,
                        after[m].duplicate_of if outcomes[m][0] == "duplicate" else None) for m in wanted]


def clean_reason(reason: str | None) -> str:
    """The reason as stored: whitespace collapsed; ValueError when empty or longer than REASON_MAX."""
    text = " ".join((reason or "").split())
    if not text:
        raise ValueError("a reason is required")
    if len(text) > REASON_MAX:
        raise ValueError(f"at most {REASON_MAX} characters")
    return text


def ignore(engine: Engine, message_id: int, reason: str | None) -> str | None:
    """Set a failed message aside (status ignored, the reason in its note); returns its patient id.
    ValueError for a missing or too long reason, NotFound, NotAllowed when it is not failed."""
    text = clean_reason(reason)
    with db.write_tx(engine) as conn:
        changed = conn.execute(update(db.hl7_message).where(M.id == message_id, M.status.in_(sorted(IGNORABLE)))
                               .values(status="ignored", note=text)).rowcount
        row = conn.execute(select(M.status, M.patient_id).where(M.id == message_id)).first()
    if row is None:
        raise NotFound(message_id)
    if not changed:
        raise NotAllowed(message_id, row.status)
    return row.patient_id  # type: ignore[no-any-return]


def written_by(engine: Engine, resource_type: str, resource_id: str, limit: int = 20) -> list[tuple[int, int, str]]:
    """The newest messages that wrote this resource: (message id, version, action)."""
    with engine.connect() as conn:
        rows = conn.execute(select(W.message_id, W.version_id, W.action)
                            .where(W.resource_type == resource_type, W.resource_id == resource_id)
                            .order_by(W.message_id.desc()).limit(limit)).all()
    return [(r.message_id, r.version_id, r.action) for r in rows]


def reprocessable_ids(page: Page) -> list[int]:
    return [m.id for m in page.messages if m.reprocessable]


def parse_ids(values: Sequence[str]) -> list[int]:
    """Message ids from a form's checkboxes; ValueError for anything else."""
    ids = []
    for value in values:
        if not value.isdigit() or len(value) > 19:
            raise ValueError(f"not a message id: {value!r}")
        ids.append(int(value))
    return ids
