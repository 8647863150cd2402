"""HL7v2 inbound: store the raw message, translate, upsert, then acknowledge.

The order is what makes the gateway safe to send to:
1. the raw message is committed first (status received), so nothing that reached us is lost;
2. translation and every resource upsert run in one transaction with the status change to
   processed and the ACK text; a failure rolls all of it back and marks the message failed;
3. the ACK goes back only after that commit.

A message whose (MSH-3, MSH-4, MSH-10) and content equal a processed one is a duplicate: it is
recorded, changes nothing, and gets the stored ACK again. The same control id with other content
is processed and flagged.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from gateway import db, metrics
from gateway.fhir import jsonio
from gateway.fhir.dates import date_range, now_instant
from gateway.fhir.indexer import compartment_patients, index_rows
from gateway.fhir.outcome import FhirError
from gateway.fhir.store import FhirStore, Repository, Stored, WriteResult, same_content
from gateway.fhir.validate import load_models, validate
from gateway.hl7 import ack as acks
from gateway.hl7 import parse
from gateway.hl7.translate import (
    MappingError,
    Translation,
    UnsupportedMessage,
    mappings,
    reload_mappings_if_changed,
    translate,
    written_types,
)

log = logging.getLogger(__name__)

SOURCE_TIME_URL = "urn:fhir-gateway:hl7v2-source-time"
PROCESSING_IDS = {"P", "T", "D"}
SUPPORTED_VERSIONS = ("2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8")
M = db.hl7_message.c
RACE_ATTEMPTS = 3  # applying a message again after another writer created the same resource first
RETRYABLE = {"40P01", "40001"}  # PostgreSQL: deadlock detected, serialization failure
# Every message runs these: built once, run straight on the driver (db.Prepared).
# The processed message of the same (MSH-3, MSH-4, MSH-10) with the same content, if any (this one is
# its duplicate, whatever came under that control id between them), else the latest with that
# identity (this one is then processed, and flagged).
_PRIOR_QUERY = select(M.id, M.content_hash, M.ack).where(
    M.control_id == bindparam("control_id"), M.sending_app == bindparam("sending_app"),
    M.sending_facility == bindparam("sending_facility"), M.status == "processed",
).order_by(case((M.content_hash == bindparam("content_hash"), 0), else_=1), M.id.desc()).limit(1)
_PRIOR = db.Prepared(_PRIOR_QUERY)
# The same question asked again inside the applying transaction, leaving the message itself out.
_PRIOR_OTHER = db.Prepared(_PRIOR_QUERY.where(M.id != bindparam("message_id")))
_ADVISORY_LOCK = db.Prepared(select(func.pg_advisory_xact_lock(bindparam("key"))))
_MESSAGE_COLUMNS = ("received_at", "received_ms", "channel", "peer", "sending_app", "sending_facility", "control_id",
                    "message_type", "version", "content_hash", "status", "raw", "mrn", "flagged", "duplicate_of",
                    "ack", "ack_ms", "truncated_from_bytes")
_INSERT_MESSAGE = db.Prepared(insert(db.hl7_message).values({c: bindparam(c) for c in _MESSAGE_COLUMNS})
                              .returning(M.id))
_PROCESSED = db.Prepared(update(db.hl7_message).where(M.id == bindparam("message_id")).values(
    status="processed", ack=bindparam("ack"), error=None, error_code=None, error_location=None,
    patient_id=bindparam("patient_id"), ack_ms=bindparam("ack_ms")))
_DUPLICATE = db.Prepared(update(db.hl7_message).where(M.id == bindparam("message_id")).values(
    status="duplicate", duplicate_of=bindparam("duplicate_of"), ack=bindparam("ack"), ack_ms=bindparam("ack_ms")))
_FLAGGED = db.Prepared(update(db.hl7_message).where(M.id == bindparam("message_id")).values(flagged=True))
_INSERT_WRITTEN = db.Prepared(insert(db.hl7_written).values(
    {c.name: bindparam(c.name) for c in db.hl7_written.c}))


# A message is `received` only while a process works on it (milliseconds). One still received after
# this long was left behind: its process died, or the database went away, before the result was
# committed (its sender got no ACK, or an AE 207, and may have sent it again meanwhile).
STUCK_AFTER_MS = 5 * 60 * 1000


def _stuck_before(now_ms: int | None) -> int:
    """The latest receipt (ms since the epoch) of a message that is stuck if still `received`."""
    return (now_ms if now_ms is not None else time.time_ns() // 1_000_000) - STUCK_AFTER_MS


def is_stuck(status: str, received_ms: int, now_ms: int | None = None) -> bool:
    """Whether a message was left `received` (see STUCK_AFTER_MS)."""
    return status == "received" and received_ms <= _stuck_before(now_ms)


# An ignored message can be taken up again; so can one left `received` (is_stuck).
REPROCESSABLE = frozenset({"failed", "ignored"})


def reprocessable(status: str, received_ms: int, truncated_from_bytes: int | None = None,
                  now_ms: int | None = None) -> bool:
    """Failed or ignored, or left `received` by a crash or an outage (is_stuck). A message over the
    maximum size (only its start stored) never is, but when stuck: Ingestor.reprocess then fails it."""
    if truncated_from_bytes is not None:
        return is_stuck(status, received_ms, now_ms)
    return status in REPROCESSABLE or is_stuck(status, received_ms, now_ms)


def stuck_message_ids(conn: Any, now_ms: int | None = None) -> list[int]:
    """Messages left `received` (see STUCK_AFTER_MS), oldest first."""
    return list(conn.execute(select(M.id).where(M.status == "received", M.received_ms <= _stuck_before(now_ms))
                             .order_by(M.id)).scalars())


class _Prior(NamedTuple):
    """A processed message with the same (MSH-3, MSH-4, MSH-10)."""

    id: int
    content_hash: str
    ack: str | None


@dataclass(frozen=True)
class Outcome:
    message_id: int
    status: str
    acks: tuple[str, ...]  # what goes back, in order: none, one, or a commit ACK then an application ACK
    error: str | None = None
    unavailable: bool = False  # the database could not take it: not stored, the sender must send it again

    @property
    def stored_acks(self) -> str:
        return "\n".join(self.acks)  # ER7 separates segments with CR, so a line holds one message

    @property
    def counted_as(self) -> str:
        """The outcome as metrics count it: a failure acknowledged AR/CR (the message was refused: an
        unsupported type, version or processing id) is "rejected"; AE/CE is "failed"."""
        if self.status != "failed":
            return self.status
        for ack in self.acks:
            separator = ack[3:4] or "|"
            for segment in ack.split("\r"):
                if segment.startswith("MSA" + separator):
                    code = segment.split(separator)[1:2]
                    return "rejected" if code and code[0].endswith("R") else "failed"
        return "failed"


@dataclass(frozen=True)
class Answer:
    acks: list[bytes]  # encoded, in the order they go back
    unavailable: bool  # some message was not stored: the database is down or full


@dataclass(frozen=True)
class Truncated:
    """A message over the receiver's maximum size, of which only the first `kept` bytes were read."""

    size: int
    kept: int | None = None  # None: not known any more (a stored message's text is cut at a segment's end)

    @property
    def reason(self) -> str:
        limit = f"of {self.kept:,} bytes" if self.kept is not None else "size"
        return f"message of {self.size:,} bytes exceeds the maximum {limit}"


def whole_segments(head: bytes) -> bytes:
    """The start of a message cut off after `head`, without its last, partly received segment."""
    cut = max(head.rfind(b"\r"), head.rfind(b"\n"))
    return head[:cut + 1] if cut > 0 else head


def stored_acks(text: str | None) -> tuple[str, ...]:
    return tuple(line for line in (text or "").split("\n") if line)


class Ingestor:
    def __init__(self, store: FhirStore, base_url: str, audit: Any = None) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.audit = audit

    # --- entry points ---

    def handle(self, raw: bytes, channel: str = "mllp", peer: str | None = None,
               size: int | None = None) -> list[bytes] | None:
        """MLLP handler: raw bytes in, the acknowledgements to send back out (none when the sender
        asked for none); None when no MSH can be read. `size`: the message was longer than the
        receiver takes, `size` bytes, of which `raw` is the start (see answer)."""
        answer = self.answer(raw, channel, peer, size)
        return None if answer is None else answer.acks

    def answer(self, raw: bytes, channel: str, peer: str | None, size: int | None = None) -> Answer | None:
        """handle(), also telling whether the database could not take a message (HTTP answers 503).

        With `size`, `raw` is only the first bytes of a message of that length, over the receiver's
        maximum: it is not processed, but stored by its whole segments as failed (and marked so:
        it cannot be reprocessed), and answered AE (CE) with ERR code 104, so that the sender learns
        why and an operator finds it among the failed messages. An FHS/BHS batch over the maximum is
        refused whole, the same way, with that NAK (to its first message) in a batch ACK."""
        try:
            text = parse.normalize(parse.decode(raw if size is None else whole_segments(raw)))
            header = parse.read_header(text)
            if size is None:
                replies, unavailable = self.receive(text, channel, peer)
            else:
                outcome = self._counted(text, channel, peer, Truncated(size, len(raw)))
                replies, unavailable = outcome.acks, outcome.unavailable
                if parse.is_batch(text):
                    # A batch sender reads a batch back, the NAK in it; an empty one would say that
                    # every message was accepted, so the NAK is there even when MSH-15/16 asked for none.
                    code = "207" if outcome.unavailable else parse.VALUE_TOO_LONG
                    nak = list(replies) or [acks.build_ack(header, "AE", (outcome.error or "")[:80],
                                                           error=(code, None, "E"))]
                    replies = (acks.build_batch_ack(text, nak),)
            return Answer([acks.encode_ack(ack, header) for ack in replies], unavailable)
        except parse.ParseError as exc:
            metrics.hl7_message("unreadable", channel, None)
            log.warning("closing %s connection from %s: no readable MSH (%s)", channel, peer, exc.reason)
            return None

    def receive(self, text: str, channel: str, peer: str | None) -> tuple[tuple[str, ...], bool]:
        """Ingest one message or batch; returns the acknowledgements (one batch ACK for an FHS/BHS
        batch, holding those of its messages), and whether the database could not take one."""
        messages = parse.split_batch(text)
        if len(messages) == 1 and messages[0] == text:
            outcome = self._counted(text, channel, peer)
            return outcome.acks, outcome.unavailable
        outcomes = [self._counted(m, channel, peer) for m in messages]
        return ((acks.build_batch_ack(text, [ack for o in outcomes for ack in o.acks]),),
                any(o.unavailable for o in outcomes))

    def _counted(self, text: str, channel: str, peer: str | None, truncated: Truncated | None = None) -> Outcome:
        """receive_one, counted by outcome with the time from receipt to the ACK being ready."""
        started = time.perf_counter()
        outcome = self.receive_one(text, channel, peer, truncated)
        metrics.hl7_message(outcome.counted_as, channel, time.perf_counter() - started)
        return outcome

    def receive_one(self, text: str, channel: str, peer: str | None, truncated: Truncated | None = None) -> Outcome:
        started = time.perf_counter()  # the receipt, for hl7_message.ack_ms
        header = parse.read_header(text)  # ParseError: no readable MSH, nothing to store under
        try:
            if truncated is not None:
                return self._receive_truncated(text, header, channel, peer, started, truncated)
            return self._receive_one(text, header, channel, peer, started)
        except DBAPIError as exc:
            reason = db.unavailable(exc)
            if reason is None:
                raise
            return self._unavailable(header, reason, peer)

    def _unavailable(self, header: parse.Header, reason: str, peer: str | None) -> Outcome:
        """The database cannot take the message (down, or its disk full): a NAK (AE, or CE in
        enhanced mode) with ERR code 207, so that the sender keeps the message and sends it again.
        Nothing was committed for it, or only its raw receipt (status received), which a later
        copy does not count as a duplicate of."""
        what = "the database is unreachable" if reason == "unreachable" else "the database disk is full"
        log.warning("message %s%s not accepted: %s; answered AE 207", header.control_id,
                    f" from {peer}" if peer else "", what)
        diagnostics = f"not stored: {what}; send it again later"
        return Outcome(0, "failed", self._acks(header, "E", diagnostics, ("207", None, "E")), diagnostics,
                       unavailable=True)

    def _receive_one(self, text: str, header: parse.Header, channel: str, peer: str | None,
                     started: float) -> Outcome:
        content_hash = _content_hash(text)
        # Not durable on its own: it must survive the process dying while the message is worked
        # on (a message that crashes us stays on file); the durable commit that precedes its ACK
        # takes it to the disk. A duplicate acknowledges data that was made durable before.
        with self.store.writing(durable=False) as repo:
            # Stored as received while the earlier copy is asked for (PostgreSQL: in one round trip;
            # the question looks at processed messages only), then made what the answer says.
            with db.pipeline(repo.conn):
                answer = _PRIOR.send(repo.conn, {**_identity(header), "content_hash": content_hash})
                inserted = self._insert(repo, text, header, channel, peer, content_hash)
            prior, message_id = _read_prior(answer), inserted.fetchone()[0]
            if prior is not None and prior.content_hash == content_hash:
                return _duplicate(repo, message_id, prior, started)
            if prior is not None:  # the same control id with other content: processed, and flagged
                db.at_commit(repo.conn, _FLAGGED, {"message_id": message_id})
        return self.process(message_id, text, header, started, content_hash)

    def _receive_truncated(self, text: str, header: parse.Header, channel: str, peer: str | None, started: float,
                           truncated: Truncated) -> Outcome:
        """Store the start of a message over the maximum size, and fail it (see answer). It is no
        duplicate of anything, whatever its start resembles."""
        with self.store.writing(durable=False) as repo:
            message_id = self._insert(repo, text, header, channel, peer, _content_hash(text),
                                      truncated.size).fetchone()[0]
        log.warning("message %s%s is %d bytes long, over the maximum of %d: stored truncated, not processed",
                    header.control_id, f" from {peer}" if peer else "", truncated.size, truncated.kept)
        return self._fail(message_id, header, "E", truncated.reason, parse.VALUE_TOO_LONG, None, started)

    def reprocess(self, message_id: int) -> Outcome:
        """Run a stored message through translation again (after a mapping fix: maps changed on disk
        since they were read are read again first). Its ack_ms then counts from the reprocess's start."""
        started = time.perf_counter()
        reload_mappings_if_changed()
        with self.store.reading() as repo:
            row = repo.conn.execute(select(M.raw, M.status, M.ack, M.truncated_from_bytes)
                                    .where(M.id == message_id)).first()
        if row is None:
            raise KeyError(message_id)
        if row.truncated_from_bytes is not None:  # only its start is here: it stays failed
            if row.status == "received":  # left behind (stuck) before it was failed
                return self._fail(message_id, parse.read_header(row.raw), "E",
                                  Truncated(row.truncated_from_bytes).reason, parse.VALUE_TOO_LONG, None, started)
            return Outcome(message_id, row.status, stored_acks(row.ack),
                           f"only the start of this message of {row.truncated_from_bytes:,} bytes was kept (over "
                           "the maximum size); it cannot be reprocessed: the sender must send it again")
        header = parse.read_header(row.raw)
        return self.process(message_id, row.raw, header, started)

    # --- processing ---

    def process(self, message_id: int, text: str, header: parse.Header, started: float,
                content_hash: str | None = None) -> Outcome:
        """Translate and write a stored message; `started` (perf_counter) is its receipt, and the
        milliseconds from it to the ACK go into the status update that ends the transaction (no
        statement of their own: only the commit after it is not counted). `content_hash`: the
        text's SHA-256 when the caller has it."""
        try:
            self._check_header(header)
            translation = translate(parse.parse(text))
            content_hash = content_hash or _content_hash(text)
            # Built before the transaction: on SQLite every moment in it holds the only write lock.
            accepted = Outcome(message_id, "processed", self._acks(header, "A"))
            audit_events = self._audit_events(header, message_id, translation)
            for attempt in range(1, RACE_ATTEMPTS + 1):
                try:
                    with self.store.writing(origin="hl7") as repo:
                        # Is another copy finished meanwhile? And the current versions of the
                        # resources, read for update (PostgreSQL: locked until the commit, so that what
                        # _apply decides on them, unchanged or older, still holds when it writes,
                        # whatever another process applies meanwhile). One round trip for both.
                        with db.pipeline(repo.conn):
                            twin_answer = _ask_processed_twin(repo, header, message_id, content_hash)
                            found = repo.send_find_many([(r["resourceType"], r["id"]) for r in translation.resources],
                                                       for_update=True, deleted=True)
                        twin = _processed_twin(twin_answer, content_hash)
                        if twin is not None:  # the same message, finished meanwhile by another connection
                            return _duplicate(repo, message_id, twin, started)
                        written = self._apply(repo, message_id, translation, found())
                        outcome = accepted
                        # what nobody reads back goes with the commit (PostgreSQL: one round trip)
                        if written:
                            db.at_commit(repo.conn, _INSERT_WRITTEN, written)
                        if self.audit is not None:
                            self.audit.record_in(repo, audit_events)
                        db.at_commit(repo.conn, _PROCESSED, {
                            "message_id": message_id, "ack": outcome.stored_acks,
                            "patient_id": translation.patient_id, "ack_ms": _ms_since(started)})
                    break
                except (IntegrityError, OperationalError) as exc:
                    # Another process created one of these resources (same deterministic id) in the
                    # same moment, or two messages locked the same resources in opposite orders;
                    # everything here was rolled back: apply again, now as an update.
                    if attempt == RACE_ATTEMPTS or (isinstance(exc, OperationalError) and
                                                    getattr(exc.orig, "sqlstate", None) not in RETRYABLE):
                        raise
                    log.info("message %s raced another writer for its resources; applying it again", message_id)
            log.debug("message %s processed in %.1f ms", message_id, (time.perf_counter() - started) * 1000)
            return outcome
        except UnsupportedMessage as exc:
            return self._fail(message_id, header, "R", str(exc), exc.code, exc.location, started)
        except (MappingError, parse.ParseError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            return self._fail(message_id, header, "E", reason, exc.code, exc.location, started)
        except FhirError as exc:
            return self._fail(message_id, header, "E", f"resource rejected: {exc.diagnostics}", "207", None,
                              started)
        except Exception as exc:  # the listener must answer every message; the cause is logged
            if isinstance(exc, DBAPIError) and db.unavailable(exc):
                raise  # nothing can be recorded now: receive_one NAKs it, the sender sends it again
            log.exception("message %s failed unexpectedly", message_id)
            return self._fail(message_id, header, "E", f"internal error: {type(exc).__name__}", "207", None,
                              started)

    def _audit_events(self, header: parse.Header, message_id: int, translation: Translation) -> list[str]:
        """The feed writes patient data, so it leaves AuditEvents like any other writer. They are
        spooled in the transaction that writes the data, so that no message's data is ever stored
        without them; built before it (see AuditLog.prepare)."""
        if self.audit is None:
            return []
        sender = "|".join(p for p in (header.sending_app, header.sending_facility) if p) or "unknown sender"
        patients: set[str] = set()
        for resource in translation.resources:
            patients |= compartment_patients(resource)
        return self.audit.prepare("update", f"HL7v2 {sender}", client_id=f"hl7:{sender}",
                                  entities=tuple(f"{r['resourceType']}/{r['id']}" for r in translation.resources),
                                  patients=patients,
                                  description=f"HL7 message {message_id} {header.message_code_and_trigger}")

    def _check_header(self, header: parse.Header) -> None:
        if header.processing_id and header.processing_id[:1] not in PROCESSING_IDS:
            raise UnsupportedMessage(f"processing id {header.processing_id!r} is not accepted", "202", "MSH-11")
        if header.version and not header.version.startswith(SUPPORTED_VERSIONS):
            raise UnsupportedMessage(f"version {header.version!r} is not supported", "203", "MSH-12")

    @staticmethod
    def _acks(header: parse.Header, outcome: str, text: str | None = None,
              error: tuple[str, str | None, str] | None = None) -> tuple[str, ...]:
        """The acknowledgements the sender asked for; outcome is A (accepted), E (error) or R (rejected).

        Original mode (MSH-15 and MSH-16 empty): one ACK, AA/AE/AR. Enhanced mode: a commit ACK
        (CA/CE/CR) as MSH-15 asks (empty means AL), then an application ACK (AA/AE/AR) as MSH-16 asks
        (empty means NE). Both are only sent after the commit, so both go back at once, on the same
        connection, in that order; AL always, NE never, ER on error or rejection, SU on success.
        """
        accept, application = header.accept_ack_type.upper(), header.app_ack_type.upper()
        if not accept and not application:
            return (acks.build_ack(header, "A" + outcome, text, error=error),)

        def wanted(condition: str) -> bool:
            return condition == "AL" or (condition == "ER" and outcome != "A") or (condition == "SU" and outcome == "A")

        out = []
        if wanted(accept or "AL"):
            out.append(acks.build_ack(header, "C" + outcome, text, error=error))
        if wanted(application or "NE"):
            out.append(acks.build_ack(header, "A" + outcome, text, error=error))
        return tuple(out)

    def _fail(self, message_id: int, header: parse.Header, outcome: str, reason: str, code: str,
              location: str | None, started: float) -> Outcome:
        result = Outcome(message_id, "failed", self._acks(header, outcome, reason[:80], (code, location, "E")),
                         reason)
        with self.store.writing() as repo:
            repo.conn.execute(update(db.hl7_message).where(M.id == message_id).values(
                status="failed", ack=result.stored_acks, error=reason, error_code=code, error_location=location,
                ack_ms=_ms_since(started),
            ))
        log.info("message %s failed (%s at %s): %s", message_id, code, location, reason)
        return result

    def _insert(self, repo: Repository, text: str, header: parse.Header, channel: str, peer: str | None,
                content_hash: str, truncated_from: int | None = None) -> Any:
        """Store the raw message (status received); the driver's cursor, whose one row is its id.
        truncated_from: the text is only the start of a message that many bytes long."""
        received = now_instant()
        row = {"received_at": received, "received_ms": date_range(received)[0], "channel": channel, "peer": peer,
               "sending_app": header.sending_app, "sending_facility": header.sending_facility,
               "control_id": header.control_id, "message_type": header.message_code_and_trigger,
               "version": header.version, "content_hash": content_hash, "status": "received", "raw": text,
               "mrn": parse.first_mrn(text), "flagged": False, "duplicate_of": None, "ack": None, "ack_ms": None,
               "truncated_from_bytes": truncated_from}
        return _INSERT_MESSAGE.send(repo.conn, row)

    # --- writing the resources ---

    def _apply(self, repo: Repository, message_id: int, translation: Translation,
               found: dict[tuple[str, str], Stored]) -> list[dict[str, Any]]:
        """Write the translation's resources, given their current versions (read for update, deleted
        ones too); returns the hl7_written rows saying what became of each."""
        source = f"{self.base_url}/hl7/messages/{message_id}"
        written: list[dict[str, Any] | None] = []
        writes: list[tuple[dict[str, Any], Stored | None]] = []
        for resource in translation.resources:
            rtype, rid = resource["resourceType"], resource["id"]
            stored = found.get((rtype, rid))  # the update below goes from it: not read again
            existing = stored if stored is not None and not stored.deleted else None
            current = existing.resource() if existing else None
            if current is not None and _is_newer(current, translation.source_time):
                written.append(_written(message_id, rtype, rid, existing.version_id, "skipped-older"))
                continue
            body = _merge(current, resource, translation.clears.get(f"{rtype}/{rid}", []))
            meta = dict(body.get("meta") or {})
            meta["source"] = source
            if translation.source_time:
                extensions = [e for e in meta.get("extension", []) if e.get("url") != SOURCE_TIME_URL]
                meta["extension"] = [*extensions, {"url": SOURCE_TIME_URL, "valueDateTime": translation.source_time}]
            body["meta"] = meta
            # The same data from a message of the same time (a re-send under a new control id): no new
            # version just to name another message as the source. The source-time extension still
            # counts: data confirmed by a newer message is written, so that an older message arriving
            # later cannot overwrite it.
            if current is not None and same_content(current, body, ("source", "versionId", "lastUpdated")):
                written.append(_written(message_id, rtype, rid, existing.version_id, "unchanged"))
                continue
            written.append(None)  # filled in below, once written
            writes.append((body, stored))
        results = iter(repo.update_many(writes))
        rows = [row if row is not None else _written_result(message_id, next(results)) for row in written]
        for old_id, surviving_id in translation.merges:
            rows += merge_patients(repo, message_id, old_id, surviving_id, source)
        return rows


def _written_result(message_id: int, result: WriteResult) -> dict[str, Any]:
    action = "created" if result.status == 201 else ("updated" if result.changed else "unchanged")
    return _written(message_id, result.stored.resource_type, result.stored.id, result.stored.version_id, action)


def _ask_processed_twin(repo: Repository, header: parse.Header, message_id: int, content_hash: str) -> Any:
    """Ask for a processed message with this one's (MSH-3, MSH-4, MSH-10) and content, other than
    itself; the driver cursor that _processed_twin reads.

    Asked inside the transaction that would apply the message, after waiting for any other
    transaction applying a message of the same identity (a PostgreSQL advisory lock; SQLite has one
    writer at a time anyway): two copies sent at once through two connections or two processes are
    applied once, and the second is the duplicate."""
    if db.is_postgres(repo.conn):
        identity = f"{header.sending_app}|{header.sending_facility}|{header.control_id}"
        key = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big", signed=True)
        _ADVISORY_LOCK.execute(repo.conn, {"key": key})
    return _PRIOR_OTHER.send(repo.conn, {**_identity(header), "message_id": message_id, "content_hash": content_hash})


def _processed_twin(answer: Any, content_hash: str) -> _Prior | None:
    """The message _ask_processed_twin found, if it has this content."""
    prior = _read_prior(answer)
    return prior if prior is not None and prior.content_hash == content_hash else None


def _duplicate(repo: Repository, message_id: int, original: _Prior, started: float) -> Outcome:
    """The message is a copy of a processed one: marked so at the commit, answered with its ACK."""
    db.at_commit(repo.conn, _DUPLICATE, {"message_id": message_id, "duplicate_of": original.id,
                                         "ack": original.ack, "ack_ms": _ms_since(started)})
    return Outcome(message_id, "duplicate", stored_acks(original.ack))


def _content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_prior(answer: Any) -> _Prior | None:
    """The processed message a _PRIOR or _PRIOR_OTHER query found (its driver cursor), if any."""
    row = answer.fetchone()
    return None if row is None else _Prior(*row)


def _identity(header: parse.Header) -> dict[str, Any]:
    """The (MSH-3, MSH-4, MSH-10) that the duplicate checks ask about."""
    return {"control_id": header.control_id, "sending_app": header.sending_app,
            "sending_facility": header.sending_facility}


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _written(message_id: int, rtype: str, rid: str, version: int, action: str) -> dict[str, Any]:
    return {"message_id": message_id, "resource_type": rtype, "resource_id": rid, "version_id": version,
            "action": action}


def _source_time(resource: dict[str, Any]) -> str | None:
    for extension in (resource.get("meta") or {}).get("extension", []):
        if extension.get("url") == SOURCE_TIME_URL:
            return extension.get("valueDateTime")
    return None


def _is_newer(current: dict[str, Any], incoming_time: str | None) -> bool:
    """True when the stored resource came from a message newer than this one (out-of-order delivery)."""
    stored_time = _source_time(current)
    if not stored_time or not incoming_time:
        return False
    try:
        return date_range(stored_time)[0] > date_range(incoming_time)[0]
    except ValueError:
        return False


def _merge(current: dict[str, Any] | None, incoming: dict[str, Any], clears: list[str]) -> dict[str, Any]:
    """v2 update semantics: an element the message leaves empty keeps its value, one it sends as
    "" (explicit null) is removed, and one it sends replaces what was there."""
    body = dict(current) if current else {}
    for key, value in incoming.items():
        if key != "meta":
            body[key] = value
    if current is not None and "meta" in current:
        body["meta"] = {k: v for k, v in current["meta"].items() if k not in ("versionId", "lastUpdated")}
    for element in clears:
        body.pop(element, None)
    return body


def _repoint(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: (new if k == "reference" and v == old else _repoint(v, old, new)) for k, v in value.items()}
    if isinstance(value, list):
        return [_repoint(v, old, new) for v in value]
    return value


def merge_patients(repo: Repository, message_id: int, old_id: str, surviving_id: str,
                   source: str) -> list[dict[str, Any]]:
    """A40: the old record's resources now point at the surviving patient; the two are linked.

    A merge already made (the same A40 sent again under a new control id) writes nothing: what it
    would write equals what is there but for meta.source, and is recorded as unchanged."""
    written: list[dict[str, Any]] = []
    old_ref, new_ref = f"Patient/{old_id}", f"Patient/{surviving_id}"

    def write(stored: Stored, body: dict[str, Any]) -> None:
        if same_content(stored.resource(), body, ("source", "versionId", "lastUpdated")):
            written.append(_written(message_id, stored.resource_type, stored.id, stored.version_id, "unchanged"))
            return
        result = repo.update(stored.resource_type, stored.id, body)
        written.append(_written(message_id, stored.resource_type, stored.id, result.stored.version_id, "merged"))

    def linked(stored: Stored, other: str, link_type: str) -> dict[str, Any]:
        body = stored.resource()
        links = [link for link in body.get("link", []) if link.get("other", {}).get("reference") != other]
        body["link"] = [*links, {"other": {"reference": other}, "type": link_type}]
        body.setdefault("meta", {})["source"] = source
        return body

    repo.flush()
    pks = [r.resource_pk for r in repo.conn.execute(
        select(db.compartment.c.resource_pk).where(db.compartment.c.patient_id == old_id)).all()]
    for stored in repo.read_many(pks):
        if stored.resource_type != "Patient":
            write(stored, _repoint(stored.resource(), old_ref, new_ref))
    old = repo.find("Patient", old_id)
    if old is not None:
        body = linked(old, new_ref, "replaced-by")
        body["active"] = False
        write(old, body)
    survivor = repo.find("Patient", surviving_id)
    if survivor is not None:
        write(survivor, linked(survivor, old_ref, "replaces"))
    return written


def warm_up() -> None:
    """Get a listener ready before its first sender: load what the first messages would otherwise
    load while their senders wait (the maps, the ACK templates, and for every resource type the maps
    write the FHIR model and its search parameters), then freeze the garbage collector's view of it.

    The interpreter's full collections look at every object the process holds; with the models and
    maps loaded that took 100-220 ms here, now and then, during which no message was answered (an
    ACK p99 of its own). Frozen objects are left out of them, so a full collection only looks at what
    the process made since."""
    acks.warm_up()
    for resource_type in sorted(written_types(mappings()) | {"AuditEvent"}):
        load_models(resource_type)
        resource = {"resourceType": resource_type, "id": "warm-up"}
        index_rows(resource)  # the search parameters, compiled
        with contextlib.suppress(FhirError):  # required elements missing: the model was still used
            validate(resource)
    gc.collect()
    gc.freeze()


def message_trace(store: FhirStore, message_id: int) -> dict[str, Any] | None:
    """A stored message with what it wrote: the raw text first, then the resources."""
    with store.reading() as repo:
        row = repo.conn.execute(select(db.hl7_message).where(M.id == message_id)).first()
        if row is None:
            return None
        written = repo.conn.execute(select(db.hl7_written).where(db.hl7_written.c.message_id == message_id)).all()
    trace = {k: v for k, v in row._mapping.items()}
    trace["written"] = [dict(w._mapping) for w in written]
    return trace


def summary_json(trace: dict[str, Any]) -> str:
    return jsonio.dumps(trace, pretty=True)
