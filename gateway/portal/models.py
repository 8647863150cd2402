"""Tables of the patient portal (migration 0005_portal), in the store's metadata.

What the portal shows is FHIR data in the store; these tables hold only what is about a login rather
than a record: which results and messages it has opened, how it wants to be told about new things,
and the notifications waiting to go out.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text

from gateway.db import PK, metadata

# A result or message a login has opened ("new" until then). Per login, not per record: a parent
# opening a child's result does not mark it read for the child.
portal_seen = Table(
    "portal_seen",
    metadata,
    Column("user_id", BigInteger, primary_key=True),
    Column("reference", String(200), primary_key=True),  # e.g. Observation/123
    Column("seen_ms", BigInteger, nullable=False),
)

# How a login wants to hear about each kind of event: email, sms or none (no row: email).
portal_preference = Table(
    "portal_preference",
    metadata,
    Column("user_id", BigInteger, primary_key=True),
    Column("event", String(32), primary_key=True),  # new-result | new-message | appointment-reminder
    Column("channel", String(8), nullable=False),  # email | sms | none
)

# Notifications queued in the transaction of the write that caused them, delivered by the worker.
# They never carry clinical details: the text says only that there is something new.
portal_notification = Table(
    "portal_notification",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("channel", String(8), nullable=False),
    Column("address", String(255), nullable=False),
    # a key that makes the same event for the same login queue once (e.g. the resource's reference)
    Column("dedup_key", String(255), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("sent_ms", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_portal_notification_due", "status", "next_attempt_ms"),
)
