"""Notifications: "there is something new in the portal", by email or SMS, never with clinical details.

Events:
- new-result: an Observation (laboratory or vital signs or uncategorised, with a value, final/amended/corrected/
  preliminary, dated within results.NEW_RESULT_DAYS) written to the store;
- new-message: a Communication created for the patient (recipient the Patient or a RelatedPerson,
  not sent by a patient; not a note the lab feed attached to a result without a sender, which the
  result's own notice covers);
- appointment-reminder: a booked Appointment starting within the next 24 hours (a periodic scan);
- appointment-offer: an earlier time offered to a waitlist entry (gateway.portal.appointments puts
  the offer on the waitlist Appointment when a slot frees up); once per offered slot.

Queueing: `Notifier.install(store)` makes a store listener (like the outbox) that inserts rows into
portal_notification in the transaction of the write, so a notification exists exactly when the
change was committed. One row per login that should hear about it: the patient's own login and
every login acting for the patient now (people.acting_for), except that a limited proxy (of a
12-17 year old) is not told about what the access policy hides from it (gateway.access.visible:
confidential labels). `dedup_key` (event, login, resource) makes each event queue once per login.

Channel: portal_preference per login and event (no row: email; none: nothing). The address is in
the login's own Patient.telecom (email; sms, or a mobile phone). SMS without a provider
(GATEWAY_SMS_URL) or without a number falls back to email; no address at all queues nothing.

Delivery (`deliver_due`, run by `gateway worker` and `gateway notify`): due rows are claimed by
pushing their next attempt past the longest a delivery can take; rows of one login, event and
address due together go out as one message. Email goes through the SMTP mailer of
gateway.smart_auth.reset; SMS is a JSON POST {"to", "from", "body"} with a bearer token. A
refused address or a 4xx is final (failed, with last_error); anything else is tried again with
exponential backoff up to MAX_ATTEMPTS. The text is in the login's language (Patient.communication).
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import requests
from babel.support import NullTranslations, Translations
from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway import access, db
from gateway.config import Settings
from gateway.fhir.search import search
from gateway.fhir.store import FhirStore, Repository, WriteResult
from gateway.portal import i18n
from gateway.portal.models import portal_notification, portal_preference
from gateway.portal.results import is_recent, is_result, result_of, when_of
from gateway.smart_auth import people, reset
from gateway.smart_auth.models import auth_user, proxy_grant

log = logging.getLogger(__name__)

EVENTS = ("new-result", "new-message", "appointment-reminder", "appointment-offer")
CHANNELS = ("email", "sms", "none")
RESULT_STATUSES = ("final", "amended", "corrected", "preliminary")
REMINDER_HOURS = 24
MAX_ATTEMPTS = 6
BACKOFF_BASE = 60.0
BACKOFF_MAX = 3600.0
CLAIM_MS = 5 * 60 * 1000
SEND_TIMEOUT = 20
TRANSLATIONS = Path(__file__).resolve().parent / "translations"
N = portal_notification.c


def _l(message: str) -> str:
    """Marks a string for the catalog; it is translated when the message is written (the login's
    language, not the request's: there is no request)."""
    return message


SUBJECTS = {
    "new-result": _l("New test result in Riverside MyChart"),
    "new-message": _l("New message in Riverside MyChart"),
    "appointment-reminder": _l("Appointment reminder from Riverside MyChart"),
    "appointment-offer": _l("An earlier appointment time in Riverside MyChart"),
}
LINES = {
    "new-result": _l("There is a new test result in Riverside MyChart."),
    "new-message": _l("There is a new message for you in Riverside MyChart."),
    "appointment-reminder": _l("You have an appointment coming up within a day. The details are in Riverside "
                               "MyChart."),
    "appointment-offer": _l("An earlier appointment time is being held for you for a short while. Accept or "
                            "decline it in Riverside MyChart."),
}
SIGN_IN = _l("Sign in to see it: %(url)s")
FOOTER = _l("You can change how you are told about new things under Profile, Notifications.")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- preferences ---

def preferences(engine: Engine, user_id: int) -> dict[str, str]:
    """The login's channel per event (email where nothing is saved)."""
    with engine.connect() as conn:
        saved = {row.event: row.channel for row in conn.execute(
            select(portal_preference).where(portal_preference.c.user_id == user_id))}
    return {event: saved.get(event, "email") for event in EVENTS}


def save_preferences(engine: Engine, user_id: int, chosen: dict[str, str]) -> None:
    unknown = {k: v for k, v in chosen.items() if k not in EVENTS or v not in CHANNELS}
    if unknown:
        raise ValueError(f"not an event and channel: {unknown}")
    with db.write_tx(engine) as conn:
        conn.execute(delete(portal_preference).where(portal_preference.c.user_id == user_id,
                                                     portal_preference.c.event.in_(list(chosen))))
        conn.execute(insert(portal_preference), [{"user_id": user_id, "event": e, "channel": c}
                                                 for e, c in chosen.items()])


def addresses(patient: dict[str, Any] | None) -> dict[str, str]:
    """{"email": ..., "sms": ...} from Patient.telecom (an sms entry, else a mobile phone)."""
    out: dict[str, str] = {}
    telecom = [t for t in (patient or {}).get("telecom") or []
               if t.get("value") and not (t.get("period") or {}).get("end")]
    for entry in sorted(telecom, key=lambda t: t.get("rank", 1000)):
        system, value = entry.get("system"), str(entry["value"]).strip()
        if system == "email":
            out.setdefault("email", value)
        elif system == "sms" or (system == "phone" and entry.get("use") == "mobile"):
            out.setdefault("sms", value)
    return out


# --- recognising events in store writes ---

def event_of(action: str, resource: dict[str, Any]) -> tuple[str, str] | None:
    """(event, patient id) for a write that someone should hear about, else None."""
    rtype = resource.get("resourceType")
    if rtype == "Observation":
        if resource.get("status") not in RESULT_STATUSES:
            return None
        if not is_result(resource) or result_of(resource) is None:
            return None
        if not is_recent(str(resource.get("issued") or "") or when_of(resource)):
            return None  # history being loaded, not a result that just came in
        patient = _patient(resource.get("subject"))
        return ("new-result", patient) if patient else None
    if rtype == "Communication" and action == "create":
        if resource.get("status") in ("preparation", "entered-in-error", "not-done"):
            return None
        patient = _patient(resource.get("subject"))
        if not patient or _patient(resource.get("sender")):
            return None
        about = [str(a.get("reference") or "") for a in resource.get("about") or []]
        if not resource.get("sender") and any(a.startswith(("Observation/", "DiagnosticReport/")) for a in about):
            return None  # a result's note from the lab feed (ORU NTE): the result's own notice covers it
        recipients = [str((r or {}).get("reference") or "") for r in resource.get("recipient") or []]
        if any(r == f"Patient/{patient}" or r.startswith("RelatedPerson/") for r in recipients):
            return "new-message", patient
    return None


def offered_slot(resource: dict[str, Any]) -> str | None:
    """The Slot a waitlist Appointment is being offered now, if any."""
    from gateway.portal.appointments import EXT_OFFER

    if resource.get("status") != "waitlist":
        return None
    for extension in resource.get("extension") or []:
        if extension.get("url") == EXT_OFFER:
            for part in extension.get("extension") or []:
                if part.get("url") == "slot":
                    return str((part.get("valueReference") or {}).get("reference") or "") or None
    return None


def _patient(reference: dict[str, Any] | None) -> str | None:
    ref = str((reference or {}).get("reference") or "")
    return ref.split("/", 1)[1] if ref.startswith("Patient/") and ref.count("/") == 1 else None


class Notifier:
    """Queues notifications from store writes; install() makes it a listener of the store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def install(self, store: FhirStore) -> Notifier:
        store.listeners.append(self.on_write)
        return self

    def on_write(self, action: str, result: WriteResult, repo: Repository) -> None:
        if result.stored.deleted or not result.changed or \
                result.stored.resource_type not in ("Observation", "Communication", "Appointment"):
            return
        resource = result.stored.resource()
        if result.stored.resource_type == "Appointment":
            offered = offered_slot(resource)
            patient = next((_patient(p.get("actor")) for p in resource.get("participant") or []
                            if _patient(p.get("actor"))), None)
            if offered and patient:
                queue(repo, self.settings, "appointment-offer", patient, resource, key_suffix=f":{offered}")
            return
        found = event_of(action, resource)
        if found is not None:
            queue(repo, self.settings, found[0], found[1], resource)


@dataclass(frozen=True)
class Listener:
    user_id: int
    fhir_user: str
    limited: bool
    acting: dict[str, bool] = field(default_factory=dict)


def listeners_for(conn: Connection, patient_id: str) -> list[Listener]:
    """The patient's own logins and every login that may act for the patient today."""
    users = select(auth_user.c.id).where(auth_user.c.fhir_user == f"Patient/{patient_id}").union(
        select(proxy_grant.c.user_id).where(proxy_grant.c.patient_id == patient_id,
                                            proxy_grant.c.revoked_ms.is_(None)))
    out = []
    for user_id in sorted(set(conn.execute(users).scalars())):
        acting = people.acting_for(conn, user_id)
        user = people.get_user(conn, user_id)
        if user is not None and patient_id in acting:
            out.append(Listener(user_id, user.fhir_user, acting[patient_id], acting))
    return out


def may_know(listener: Listener, patient_id: str, resource: dict[str, Any], base_url: str) -> bool:
    """What the access policy lets this login read in that record (a limited proxy: nothing confidential)."""
    principal = access.principal_for_portal(fhir_user=listener.fhir_user, patient_id=patient_id,
                                            acting_for=listener.acting)
    grant = access.authorize(principal, "read", resource["resourceType"])
    return access.visible(grant, resource["resourceType"], resource["id"], resource, base_url)


def _route(repo: Repository, settings: Settings, listener: Listener, event: str) -> tuple[str, str | None]:
    """How this login hears of this kind of event: the channel it chose (email unless it chose
    otherwise; SMS only with a provider and a number) and the address on its own record; no
    address when it chose none or its record has none."""
    channel = repo.conn.execute(select(portal_preference.c.channel).where(
        portal_preference.c.user_id == listener.user_id, portal_preference.c.event == event)).scalar() or "email"
    if channel == "none":
        return channel, None
    own = repo.find("Patient", listener.fhir_user.split("/", 1)[1])
    known = addresses(own.resource() if own is not None and own.content else None)
    if channel == "sms" and not (settings.sms_url and known.get("sms")):
        channel = "email"
    return channel, known.get(channel)


def queue(repo: Repository, settings: Settings, event: str, patient_id: str, resource: dict[str, Any],
          key_suffix: str = "") -> int:
    """Queue the event for everyone who should hear about it, in the caller's transaction; returns
    how many rows were added (0 for those queued before)."""
    conn = repo.conn
    reference = f"{resource['resourceType']}/{resource['id']}"
    added = 0
    # Who hears of it, and how, asked once a transaction: a lab report's results are all one patient's.
    listeners = repo.memoized(("notification listeners", patient_id), lambda: listeners_for(conn, patient_id))
    for listener in listeners:
        if not may_know(listener, patient_id, resource, repo.base_url):
            continue
        channel, address = repo.memoized(("notification route", listener.user_id, event),
                                         lambda listener=listener: _route(repo, settings, listener, event))
        if not address:
            continue
        now = now_ms()
        row = {"user_id": listener.user_id, "patient_id": patient_id, "event": event, "channel": channel,
               "address": address[:255], "dedup_key": f"{event}:{listener.user_id}:{reference}{key_suffix}"[:255],
               "status": "pending", "attempts": 0, "next_attempt_ms": now, "created_ms": now}
        dialect = postgresql if db.is_postgres(conn) else sqlite
        statement = dialect.insert(portal_notification).values(**row).on_conflict_do_nothing(
            index_elements=["dedup_key"]).returning(N.id)
        added += len(conn.execute(statement).all())  # none when this login was told before
    return added


def scan_reminders(store: FhirStore, settings: Settings, now: datetime | None = None) -> int:
    """Queue reminders for booked appointments starting within REMINDER_HOURS; returns rows added.
    The key carries the start, so a rescheduled appointment is reminded of again."""
    now = now or datetime.now(UTC)
    until = now + timedelta(hours=REMINDER_HOURS)
    added = 0
    params = [("status", "booked"), ("date", f"ge{now.strftime('%Y-%m-%dT%H:%M:%SZ')}"),
              ("date", f"le{until.strftime('%Y-%m-%dT%H:%M:%SZ')}"), ("_count", "200")]
    with store.writing() as repo:
        cursor: str | None = None
        while True:
            _, page = search(repo, "Appointment", params + ([("_cursor", cursor)] if cursor else []),
                             restrict=None, default_count=200, max_count=200)
            for stored in page.matches:
                appointment = stored.resource()
                for participant in appointment.get("participant") or []:
                    patient = _patient(participant.get("actor"))
                    if patient and participant.get("status") != "declined":
                        added += queue(repo, settings, "appointment-reminder", patient, appointment,
                                       f"@{appointment.get('start', '')}")
            cursor = page.next_cursor
            if cursor is None:
                break
    return added


# --- writing and sending ---

@cache
def translations(lang: str) -> NullTranslations:
    if lang == i18n.DEFAULT:
        return NullTranslations()
    return Translations.load(str(TRANSLATIONS), [lang])


def language_of(store: FhirStore, user_fhir: str) -> str:
    kind, _, rid = user_fhir.partition("/")
    with store.reading() as repo:
        stored = repo.find(kind, rid) if kind == "Patient" else None
    patient = stored.resource() if stored is not None and stored.content else {}
    return i18n.preferred_language(patient) or i18n.DEFAULT


def compose(event: str, lang: str, base_url: str, channel: str) -> tuple[str, str]:
    """(subject, body) with no clinical detail: only that there is something new, and where."""
    t = translations(lang)
    line = t.gettext(LINES[event])
    sign_in = t.gettext(SIGN_IN) % {"url": base_url + "/"}
    if channel == "sms":
        return "", f"{line} {sign_in}"
    return t.gettext(SUBJECTS[event]), f"{line}\n\n{sign_in}\n\n{t.gettext(FOOTER)}\n"


class Failed(Exception):
    """A delivery that will never work (a refused address, a 4xx from the provider)."""


class Retry(Exception):
    """A delivery that may work later (no server, a timeout, a 5xx)."""


Sender = Callable[[str, str, str], None]  # to, subject, body


def email_sender(settings: Settings) -> Sender:
    mailer = reset.smtp_mailer(settings)

    def send(to: str, subject: str, body: str) -> None:
        if mailer is None:
            raise Retry("no SMTP server configured (GATEWAY_SMTP_HOST)")
        try:
            mailer(to, subject, body)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused) as exc:
            raise Failed(f"the mail server refused the address: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from None

    return send


def sms_sender(settings: Settings) -> Sender:
    def send(to: str, _subject: str, body: str) -> None:
        if not settings.sms_url:
            raise Retry("no SMS provider configured (GATEWAY_SMS_URL)")
        headers = {"Authorization": f"Bearer {settings.sms_token}"} if settings.sms_token else {}
        try:
            reply = requests.post(settings.sms_url, json={"to": to, "from": settings.sms_from, "body": body},
                                  headers=headers, timeout=SEND_TIMEOUT)
        except requests.RequestException as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from None
        if reply.status_code == 429 or reply.status_code >= 500:
            raise Retry(f"the SMS provider answered {reply.status_code}")
        if reply.status_code >= 400:
            raise Failed(f"the SMS provider answered {reply.status_code}: {reply.text[:200]}")

    return send


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    retried: int = 0

    def line(self) -> str:
        return f"{self.sent} sent, {self.failed} failed, {self.retried} to try again"


def backoff(attempts: int) -> float:
    return min(BACKOFF_BASE * (2 ** max(attempts - 1, 0)), BACKOFF_MAX)


def _claim(engine: Engine, limit: int) -> list[Any]:
    now = now_ms()
    with db.write_tx(engine) as conn:
        query = select(portal_notification).where(N.status == "pending", N.next_attempt_ms <= now) \
            .order_by(N.next_attempt_ms, N.id).limit(limit)
        if db.is_postgres(conn):
            query = query.with_for_update(skip_locked=True)
        rows = list(conn.execute(query).all())
        if rows:
            conn.execute(update(portal_notification).where(N.id.in_([r.id for r in rows])).values(
                next_attempt_ms=now + CLAIM_MS, attempts=N.attempts + 1))
    return rows


def deliver_due(store: FhirStore, settings: Settings, limit: int = 50,
                senders: dict[str, Sender] | None = None,
                progress: Callable[[str], None] | None = None) -> Tally:
    """Send what is due now (at most `limit` rows), recording each outcome."""
    senders = senders or {"email": email_sender(settings), "sms": sms_sender(settings)}
    engine = store.engine
    tally = Tally()
    rows = _claim(engine, limit)
    groups: dict[tuple[int, str, str, str], list[Any]] = {}
    for row in rows:
        groups.setdefault((row.user_id, row.event, row.channel, row.address), []).append(row)
    users: dict[int, str] = {}
    for (user_id, event, channel, address), batch in groups.items():
        if user_id not in users:
            with engine.connect() as conn:
                user = people.get_user(conn, user_id)
            users[user_id] = user.fhir_user if user else ""
        lang = language_of(store, users[user_id]) if users[user_id] else i18n.DEFAULT
        subject, body = compose(event, lang, settings.base_url, channel)
        attempts = batch[0].attempts + 1
        values: dict[str, Any]
        try:
            senders[channel](address, subject, body)
            values = {"status": "sent", "sent_ms": now_ms(), "last_error": None}
            tally.sent += len(batch)
            outcome = "sent"
        except Failed as exc:
            values = {"status": "failed", "last_error": str(exc)}
            tally.failed += len(batch)
            outcome = f"failed: {exc}"
        except Retry as exc:
            if attempts >= MAX_ATTEMPTS:
                values = {"status": "failed", "last_error": f"gave up after {attempts} attempts: {exc}"}
                tally.failed += len(batch)
                outcome = f"failed: gave up after {attempts} attempts: {exc}"
            else:
                values = {"next_attempt_ms": now_ms() + int(backoff(attempts) * 1000), "last_error": str(exc)}
                tally.retried += len(batch)
                outcome = f"will try again: {exc}"
        with db.write_tx(engine) as conn:
            conn.execute(update(portal_notification).where(N.id.in_([r.id for r in batch])).values(**values))
        message = f"notification {','.join(str(r.id) for r in batch)} ({event} by {channel}): {outcome}"
        log.log(logging.INFO if outcome == "sent" else logging.WARNING, "%s", message)
        if progress:
            progress(message)
    return tally


def run_once(store: FhirStore, settings: Settings, progress: Callable[[str], None] | None = None,
             senders: dict[str, Sender] | None = None) -> Tally:
    """Scan for reminders, then send everything due until nothing is (each row is tried once)."""
    added = scan_reminders(store, settings)
    if progress:
        progress(f"appointment reminders queued: {added}")
    total = Tally()
    while True:
        tally = deliver_due(store, settings, senders=senders, progress=progress)
        total.sent, total.failed, total.retried = (total.sent + tally.sent, total.failed + tally.failed,
                                                   total.retried + tally.retried)
        if not (tally.sent or tally.failed or tally.retried):
            return total


class NotificationWorker:
    """The loop `gateway worker` runs on a thread: deliveries every poll, reminders every scan."""

    def __init__(self, store: FhirStore, settings: Settings, poll_seconds: float = 5.0,
                 scan_seconds: float = 300.0) -> None:
        self.store, self.settings = store, settings
        self.poll_seconds, self.scan_seconds = poll_seconds, scan_seconds
        self.tally = Tally()

    def run(self, stop: threading.Event, progress: Callable[[str], None] | None = None) -> None:
        next_scan = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_scan:
                    scan_reminders(self.store, self.settings)
                    next_scan = time.monotonic() + self.scan_seconds
                tally = deliver_due(self.store, self.settings, progress=progress)
                self.tally.sent += tally.sent
                self.tally.failed += tally.failed
                self.tally.retried += tally.retried
            except Exception:  # the loop must outlive one bad round; logged, tried at the next poll
                log.exception("notification round failed")
            stop.wait(self.poll_seconds)

