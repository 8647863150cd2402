"""The `gateway` command."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gateway.config import Settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _configure_logs(settings: Settings) -> None:
    """Structured logs for the long-running commands (GATEWAY_LOG_FORMAT json|text, GATEWAY_LOG_LEVEL)."""
    from gateway import logs

    logs.configure(settings.log_format, settings.log_level)


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError

        from gateway.db import DatabaseSettingError, unavailable

        try:
            return super().invoke(ctx)
        except DatabaseSettingError as exc:  # a setting to fix, not a fault: one line, no stack trace
            raise click.ClickException(str(exc)) from None
        except DBAPIError as exc:
            # Down, unreachable or full: something to fix outside the gateway, said in one line (the
            # driver's own first line names the host and port, never the password).
            reason = unavailable(exc)
            if reason is None:
                raise
            detail = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            what = "its disk is full" if reason == "full" else "it cannot be reached"
            raise click.ClickException(f"the database did not answer: {what} ({detail})") from None


@click.group(cls=_Commands)
def main() -> None:
    """FHIR gateway: HL7v2 in, FHIR R4 and SMART on FHIR out."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Bring the schema to the latest migration."""
    from gateway import db as database

    settings = _settings()
    engine = database.make_engine(settings.database_url)
    database.upgrade(engine, revision)
    click.echo(f"schema at {revision} on {engine.url.render_as_string(hide_password=True)}")


def _processor(settings: Settings) -> Any:
    from gateway import db as database
    from gateway.fhir.bundles import BundleProcessor
    from gateway.fhir.store import FhirStore

    engine = database.make_engine(settings.database_url, settings.sqlite_synchronous)
    return BundleProcessor(FhirStore(engine, settings.fhir_base))


def import_files(settings: Settings, files: list[str], echo: Any = click.echo,
                 adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, int]:
    from gateway.fhir.bundles import import_file
    from gateway.fhir.outcome import FhirError

    processor = _processor(settings)
    totals = {"files": 0, "entries": 0, "created": 0, "updated": 0, "failed": 0}
    started = time.monotonic()
    for path in files:
        begun = time.monotonic()

        def progress(done: int, path: str = path) -> None:
            echo(f"  {path}: {done} entries", err=True)

        try:
            counts = import_file(processor, path, progress=progress, adjust=adjust)
        except FhirError as exc:
            stored = getattr(exc, "stored", 0)
            what = f"{stored} entries of it were stored before the failure" if stored else \
                "nothing from this file was stored"
            echo(f"{path}: FAILED, {what}: {exc.diagnostics}", err=True)
            totals["failed"] += 1
            continue
        totals["files"] += 1
        for key in ("entries", "created", "updated", "failed"):
            totals[key] += counts[key]
        rate = counts["entries"] / max(time.monotonic() - begun, 1e-6)
        echo(f"{path}: {counts['entries']} entries ({counts['created']} created, {counts['updated']} "
             f"updated or unchanged, {counts['failed']} failed) at {rate:.0f}/s")
    from gateway import db as database

    database.analyze(processor.store.engine)
    elapsed = time.monotonic() - started
    echo(f"imported {totals['entries']} entries from {totals['files']} of {len(files)} files in "
         f"{elapsed:.1f}s: {totals['created']} created, {totals['updated']} updated or unchanged, "
         f"{totals['failed']} failed")
    return totals


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def import_command(files: tuple[str, ...]) -> None:
    """Load FHIR Bundles (transaction, batch, collection) or NDJSON files."""
    totals = import_files(_settings(), list(files))
    if totals["failed"]:
        sys.exit(1)


def load_demo(settings: Settings) -> None:
    from gateway import db as database

    engine = database.make_engine(settings.database_url)
    database.upgrade(engine)
    files = sorted(str(p) for p in (FIXTURES / "fhir").glob("*.json"))
    if files:
        from datetime import UTC, datetime
        from functools import partial

        from gateway.fhir.demo_calendar import keep_calendar_current, weeks_behind

        # one day for every file, so that slots and the appointments booking them move alike
        today = datetime.now(UTC).date()
        if weeks := weeks_behind(today):
            click.echo(f"demo calendar: slots and upcoming appointments moved {weeks} weeks ahead of "
                       "the fixtures' dates, to this week")
        import_files(settings, files, adjust=partial(keep_calendar_current, today=today))


# --- HL7v2 ---

@main.group()
def hl7() -> None:
    """HL7v2 messages: send, list, show, reprocess."""


@hl7.command("send")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=2575, show_default=True, type=int)
@click.option("--timeout", default=30.0, show_default=True, type=float)
def hl7_send(files: tuple[str, ...], host: str, port: int, timeout: float) -> None:
    """Send message files over one MLLP connection and print each acknowledgement."""
    from gateway.hl7.mllp import msa_fields, send_messages

    payloads = [Path(f).read_bytes() for f in files]
    try:
        replies = send_messages(host, port, payloads, timeout=timeout)
    except OSError as exc:  # refused, reset, closed before an ACK, timed out
        raise click.ClickException(f"MLLP {host}:{port}: {exc}") from None
    codes: dict[str, int] = {}
    for path, acks in zip(files, replies, strict=True):
        if not acks:
            click.echo(f"{path}: no acknowledgement (none asked for in MSH-15/MSH-16)")
        for ack in acks:
            segments = [s for s in ack.decode("utf-8", "replace").replace("\n", "\r").split("\r") if s]
            msa = msa_fields(ack)
            code = msa[1] if msa and len(msa) > 1 and msa[1] else "??"  # MSA-1: AA, AE, AR, CA, ...
            codes[code] = codes.get(code, 0) + 1
            click.echo(f"{path}: {' '.join(s for s in segments if s.startswith(('MSA', 'ERR')))}")
    click.echo("sent " + str(len(files)) + " messages: " + ", ".join(f"{n} {c}" for c, n in sorted(codes.items())))


@hl7.command("list")
@click.option("--status", type=click.Choice(["received", "processed", "failed", "duplicate", "ignored"]))
@click.option("--limit", default=50, show_default=True, type=int)
def hl7_list(status: str | None, limit: int) -> None:
    """The most recent messages (optionally of one status)."""
    from sqlalchemy import select

    from gateway import build_services
    from gateway import db as database

    services = build_services(_settings())
    m = database.hl7_message.c
    query = select(m.id, m.received_at, m.status, m.message_type, m.control_id, m.sending_app,
                   m.sending_facility, m.error_code, m.error).order_by(m.id.desc()).limit(limit)
    if status:
        query = query.where(m.status == status)
    with services.engine.connect() as conn:
        rows = conn.execute(query).all()
    for r in rows:
        error = f"  {r.error_code} {r.error}" if r.error else ""
        click.echo(f"{r.id:>8}  {r.received_at}  {r.status:<10} {r.message_type or '?':<9} {r.control_id or '':<20} "
                   f"{r.sending_app or ''}|{r.sending_facility or ''}{error}")
    click.echo(f"{len(rows)} messages" + (f" with status {status}" if status else ""))


@hl7.command("show")
@click.argument("message_id", type=int)
def hl7_show(message_id: int) -> None:
    """A message's trace: raw text, ACK, error, and the resources it wrote."""
    from gateway import build_services
    from gateway.hl7.ingest import message_trace, summary_json

    trace = message_trace(build_services(_settings()).store, message_id)
    if trace is None:
        raise click.ClickException(f"no message {message_id}")
    click.echo(summary_json(trace))


@hl7.command("reprocess")
@click.argument("message_id", type=int, required=False)
@click.option("--failed", "all_failed", is_flag=True, help="every failed message, oldest first")
@click.option("--stuck", is_flag=True,
              help="every message left 'received' for 5 minutes or more (its process died, or the database "
                   "went away, before the result was committed), oldest first")
def hl7_reprocess(message_id: int | None, all_failed: bool, stuck: bool) -> None:
    """Run stored messages through translation again (after a mapping fix, or an outage)."""
    from sqlalchemy import select

    from gateway import build_services
    from gateway import db as database
    from gateway.hl7.ingest import reprocessable, stuck_message_ids

    if (message_id is not None) + all_failed + stuck != 1:
        raise click.UsageError("give a message id, --failed or --stuck")
    services = build_services(_settings())
    ids = [message_id] if message_id is not None else []
    m = database.hl7_message.c
    with services.engine.connect() as conn:
        if all_failed:
            failed = conn.execute(select(m.id, m.status, m.received_ms, m.truncated_from_bytes)
                                  .where(m.status == "failed").order_by(m.id)).all()
            ids = [row.id for row in failed if reprocessable(row.status, row.received_ms, row.truncated_from_bytes)]
            left_out = len(failed) - len(ids)  # only their start is stored: the sender must send them again
            if left_out == 1:
                click.echo("left out 1 failed message over the maximum size: only its start was kept, so it "
                           "cannot be reprocessed")
            elif left_out:
                click.echo(f"left out {left_out} failed messages over the maximum size: only their start was kept, "
                           "so they cannot be reprocessed")
        elif stuck:
            ids = stuck_message_ids(conn)
    tally: dict[str, int] = {}
    for n, mid in enumerate(ids, 1):
        try:
            outcome = services.hl7.reprocess(mid)
        except KeyError:
            raise click.ClickException(f"no message {mid}") from None
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
        detail = f": {outcome.error}" if outcome.error else ""
        click.echo(f"[{n}/{len(ids)}] message {mid}: {outcome.status}{detail}")
    services.audit.close()
    click.echo(f"reprocessed {len(ids)} messages: " + ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))
    if tally.get("failed"):
        sys.exit(1)


# --- SMART clients, users, proxies, launches ---

def _smart_call(action: Any) -> None:
    """Run a provisioning action with the app's services and print its JSON (AuthError -> exit 1)."""
    import json

    from gateway import build_services
    from gateway.smart_auth.people import AuthError

    services = build_services(_settings())
    try:
        result = action(services)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.audit.close()
    click.echo(json.dumps(result, indent=2))


@main.group()
def client() -> None:
    """SMART client registrations."""


@client.command("add")
@click.option("--client-id", required=True)
@click.option("--redirect-uri", "redirect_uris", multiple=True, required=True, help="repeat for several")
@click.option("--public", is_flag=True, help="a public client (no secret; PKCE only)")
@click.option("--secret", default=None, help="a confidential symmetric client's secret")
@click.option("--jwks-url", default=None, help="a confidential asymmetric client's JWKS URL")
@click.option("--jwks-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a confidential asymmetric client's JWKS (public keys, each with a kid)")
@click.option("--scope", default=None, help="the scopes the client may be granted (default: all patient/ and "
                                            "user/ scopes; system/ too for JWKS clients)")
@click.option("--launch-url", default=None, help="where `gateway launch` sends the EHR launch")
def client_add(client_id: str, redirect_uris: tuple[str, ...], public: bool, secret: str | None,
               jwks_url: str | None, jwks_file: str | None, scope: str | None, launch_url: str | None) -> None:
    """Register a SMART client; prints its registration as JSON."""
    import json

    from gateway.smart_auth.admin import register_client

    jwks = json.loads(Path(jwks_file).read_text()) if jwks_file else None
    _smart_call(lambda s: register_client(s.engine, client_id, list(redirect_uris), public=public, secret=secret,
                                          jwks_url=jwks_url, jwks=jwks, scope=scope, launch_url=launch_url))


@main.group()
def user() -> None:
    """Logins for patients and their proxies."""


@user.command("add")
@click.option("--username", required=True)
@click.option("--password", required=True)
@click.option("--fhir-user", required=True, help="the user's own record, Patient/ID")
@click.option("--totp-secret", default=None, help="enrol in MFA with this base32 secret")
def user_add(username: str, password: str, fhir_user: str, totp_secret: str | None) -> None:
    """Create a login (argon2-hashed password, optional TOTP)."""
    from gateway.smart_auth.people import add_user

    def action(s: Any) -> dict[str, Any]:
        created = add_user(s.engine, username, password, fhir_user, totp_secret)
        return {"username": created.username, "fhir_user": created.fhir_user, "mfa": bool(created.totp_secret)}

    _smart_call(action)


@main.group()
def staff() -> None:
    """Staff logins of the operator console (/admin)."""


@staff.command("add")
@click.option("--username", required=True)
@click.option("--password", required=True, help="at least 12 characters")
@click.option("--role", "roles", multiple=True, required=True,
              type=click.Choice(["operator", "front-desk", "security-officer"]), help="repeat for several roles")
@click.option("--totp-secret", default=None, help="base32 TOTP secret; made up and printed when not given")
@click.option("--practitioner", default=None, help="the staff member's Practitioner/ID, if any")
def staff_add(username: str, password: str, roles: tuple[str, ...], totp_secret: str | None,
              practitioner: str | None) -> None:
    """Create a staff login with its roles; staff always sign in with a second factor."""
    from gateway.admin.staff import add_staff
    from gateway.smart_auth.people import totp_uri

    def action(s: Any) -> dict[str, Any]:
        created, granted = add_staff(s.engine, username, password, list(roles), totp_secret=totp_secret,
                                     practitioner=practitioner)
        out: dict[str, Any] = {"username": created.username, "roles": sorted(granted), "mfa": True}
        if not totp_secret:  # made here: shown this once, for the staff member's authenticator app
            out["totp_uri"] = totp_uri(created.totp_secret or "", created.username, "FHIR gateway console")
        return out

    _smart_call(action)


@main.group()
def proxy() -> None:
    """Proxy access: parents, caregivers."""


@proxy.command("grant")
@click.option("--username", required=True)
@click.option("--patient", required=True, help="Patient/ID the user may act for")
@click.option("--relationship", required=True, help="v3 RoleCode, e.g. MTH, FTH, GUARD, CHILD, CAREGIVER")
@click.option("--until", default=None, help="last day (YYYY-MM-DD); a minor's proxy ends before 18 anyway")
def proxy_grant(username: str, patient: str, relationship: str, until: str | None) -> None:
    """Let a login act for another patient."""
    from datetime import date

    from gateway.smart_auth.admin import grant_proxy

    last = date.fromisoformat(until) if until else None
    _smart_call(lambda s: grant_proxy(s.engine, s.store, username, patient, relationship, until=last))


@proxy.command("revoke")
@click.option("--username", required=True)
@click.option("--patient", required=True, help="Patient/ID")
def proxy_revoke(username: str, patient: str) -> None:
    """End a login's proxy access to a patient (its tokens stop working)."""
    def action(s: Any) -> dict[str, Any]:
        consents = s.smart.revoke_proxy(username, patient.partition("/")[2])
        return {"revoked": len(consents), "consents": [f"Consent/{c}" for c in consents]}

    _smart_call(action)


@main.command("activation-code")
@click.option("--patient", required=True, help="Patient/ID whose owner may sign up with the code")
def activation_code(patient: str) -> None:
    """Issue a single-use sign-up code (valid 45 days) and print it."""
    from datetime import UTC, datetime

    from gateway import build_services
    from gateway.smart_auth.admin import patient_birth_date
    from gateway.smart_auth.people import AuthError, issue_activation_code

    kind, _, patient_id = patient.partition("/")
    services = build_services(_settings())
    try:
        if kind != "Patient" or not patient_id:
            raise AuthError("--patient must be Patient/ID")
        patient_birth_date(services.store, patient_id)  # refuses a patient the store does not have
        code, expires = issue_activation_code(services.engine, patient_id)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.audit.close()
    click.echo(code)
    click.echo(f"valid until {datetime.fromtimestamp(expires / 1000, UTC).isoformat(timespec='minutes')}",
               err=True)


@main.command("launch")
@click.option("--client-id", required=True)
@click.option("--patient", required=True, help="Patient/ID in context")
@click.option("--user", "username", default=None, help="the login the launch is meant for")
@click.option("--encounter", default=None, help="Encounter/ID in context")
def launch_command(client_id: str, patient: str, username: str | None, encounter: str | None) -> None:
    """Create an EHR launch context and print the app's launch URL (launch_url?iss=...&launch=...)."""
    from gateway.smart_auth.admin import launch_url

    _smart_call(lambda s: launch_url(s.smart, client_id, patient, username, encounter))


@main.command("rotate-signing-key")
def rotate_signing_key() -> None:
    """Sign id_tokens with a new key; the previous key stays in the JWKS for tokens already out."""
    from gateway.smart_auth.keys import rotate

    _smart_call(lambda s: {"kid": rotate(s.engine)})
# --- the EHR connection ---

@main.command("sync")
@click.option("--patient", "patients", multiple=True, help="the upstream Patient id (repeatable)")
@click.option("--linked", is_flag=True, help="every local patient already linked to an upstream one")
@click.option("--full", is_flag=True, help="ignore the high-water marks and read everything again")
@click.option("--deadline", type=float, default=None, help="stop after this many seconds")
def sync_command(patients: tuple[str, ...], linked: bool, full: bool, deadline: float | None) -> None:
    """Pull patients' records from the EHR's FHIR API (GATEWAY_UPSTREAM_FHIR_URL) into the store."""
    from gateway import build_services
    from gateway.upstream.client import UpstreamClient
    from gateway.upstream.sync import Synchronizer, linked_patients

    if not patients and not linked:
        raise click.UsageError("give --patient ID or --linked")
    services = build_services(_settings())
    client = UpstreamClient.from_settings(services.settings)
    until = time.monotonic() + deadline if deadline else None
    synchronizer = Synchronizer(services.store, client, services.audit, progress=click.echo)
    ids = list(patients) + (linked_patients(services.store) if linked else [])
    summaries = []
    for n, upstream_id in enumerate(ids, 1):
        click.echo(f"[{n}/{len(ids)}] syncing upstream Patient/{upstream_id}")
        summary = synchronizer.sync_patient(upstream_id, incremental=not full, deadline=until)
        click.echo(summary.line())
        summaries.append(summary)
    services.audit.close()
    incomplete = [s for s in summaries if not s.complete]
    click.echo(f"synced {len(summaries) - len(incomplete)} of {len(ids)} patients completely: "
               f"{sum(s.created for s in summaries)} created, {sum(s.updated for s in summaries)} updated, "
               f"{sum(s.unchanged for s in summaries)} unchanged, {sum(s.merged for s in summaries)} merged, "
               f"{sum(len(s.rejected) for s in summaries)} rejected")
    if incomplete:
        sys.exit(1)


def start_workers(settings: Settings, workers: int = 1, sync_interval: int | None = None) -> Any:
    """Outbox workers (and the periodic sync) on threads of this process, with their own services."""
    from gateway import build_services
    from gateway.upstream.outbox import WorkerThreads

    services = build_services(settings)
    interval = settings.upstream_sync_interval if sync_interval is None else sync_interval
    handle = WorkerThreads(services, workers, interval)
    # the portal's notifications go out from the same process, stopped by the same event
    import threading

    from gateway.portal.notifications import NotificationWorker

    notifier = NotificationWorker(services.store, settings)
    handle.threads.append(threading.Thread(target=notifier.run, args=(handle.stop_event,), name="notifications",
                                           daemon=True))
    handle.notifier = notifier  # type: ignore[attr-defined]
    from gateway import metrics

    metrics.ROLLUPS.start(sample_depth=True)  # the outbox depth for the health dashboard, busy or not
    return handle.start()


def start_appointment_sweep(settings: Settings) -> Any:
    """The portal's appointment sweep (expired holds and waitlist offers, freed Slots offered to the
    waitlist) every GATEWAY_PORTAL_SWEEP_SECONDS on a thread; None when that is 0."""
    if settings.portal_sweep_seconds <= 0:
        return None
    from gateway import build_services
    from gateway.portal.appointments import Sweeper

    return Sweeper(build_services(settings), settings.portal_sweep_seconds).start()


class ChildProcess:
    """A `gateway` command (the MLLP listener, the outbox worker) as a child process of `gateway
    serve`. Not a thread of the gunicorn arbiter: the arbiter forks HTTP workers at any time, and a
    fork while a thread of it is inside SQLite (or holds any other lock) would leave the child with
    that lock held for ever. The child exits by itself when the server is gone."""

    def __init__(self, *args: str, ready_at: tuple[str, int] | None = None) -> None:
        import os
        import socket
        import subprocess

        self.process = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args, "--parent", str(os.getpid())],
                                        stdin=subprocess.DEVNULL)
        # A listener counts as started when it accepts connections, as it did when it was a thread.
        deadline = time.monotonic() + 60
        while ready_at and time.monotonic() < deadline and self.process.poll() is None:
            host, port = ready_at
            try:
                socket.create_connection((host if host not in ("", "0.0.0.0", "::") else "127.0.0.1", port),
                                         timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: finish what is in hand (a message, an item), then exit
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _wait_for_stop(parent: int | None, name: str) -> None:
    """Block until Ctrl-C, SIGTERM, or (with parent) that process being gone."""
    import os
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(1.0):
            if parent is not None and os.getppid() != parent:
                click.echo(f"{name}: the server is gone; stopping")
                break


@main.command("worker")
@click.option("--workers", default=1, show_default=True, type=int, help="outbox worker threads")
@click.option("--sync-interval", default=None, type=int,
              help="seconds between periodic syncs (default GATEWAY_UPSTREAM_SYNC_INTERVAL; 0: none)")
@click.option("--parent", type=int, default=None, hidden=True, help="exit when this process is gone (serve)")
def worker_command(workers: int, sync_interval: int | None, parent: int | None) -> None:
    """Deliver the outbox to the EHR, send the portal's notifications, sweep the portal's expired
    appointment holds and waitlist offers (and run the periodic sync) until Ctrl-C or SIGTERM."""
    settings = _settings()
    _configure_logs(settings)
    handle = start_workers(settings, workers, sync_interval)
    click.echo(f"outbox: {workers} worker(s) running; notifications: running")
    sweeper = start_appointment_sweep(settings)
    _wait_for_stop(parent, "outbox")
    if sweeper is not None:
        sweeper.stop()
    handle.stop()
    click.echo(f"outbox: stopped ({sum(w.delivered for w in handle.workers)} delivered)")
    click.echo(f"notifications: stopped ({handle.notifier.tally.line()})")


@main.command("notify")
@click.option("--once", is_flag=True, help="queue due reminders, send what is due, print a summary and exit")
def notify_command(once: bool) -> None:
    """Send the portal's notifications (email, SMS): once, or until Ctrl-C or SIGTERM."""
    import threading

    from gateway import build_services
    from gateway.portal.notifications import NotificationWorker, run_once

    services = build_services(_settings())
    try:
        if once:
            tally = run_once(services.store, services.settings, progress=click.echo)
        else:
            worker = NotificationWorker(services.store, services.settings)
            stop = threading.Event()
            thread = threading.Thread(target=worker.run, args=(stop, click.echo), name="notifications", daemon=True)
            thread.start()
            click.echo("notifications: running (Ctrl-C to stop)")
            _wait_for_stop(None, "notifications")
            stop.set()
            thread.join(timeout=60)
            tally = worker.tally
    finally:
        services.audit.close()
    click.echo(f"notifications: {tally.line()}")


@main.group()
def outbox() -> None:
    """What goes back to the EHR: list, retry, cancel."""


@outbox.command("list")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed", "cancelled"]))
@click.option("--limit", default=50, show_default=True, type=int)
def outbox_list(status: str | None, limit: int) -> None:
    """The most recent outbox items (optionally of one status)."""
    from gateway import db as database
    from gateway.upstream.outbox import list_items

    engine = database.make_engine(_settings().database_url)
    with engine.connect() as conn:
        rows = list_items(conn, status, limit)
    for r in rows:
        error = f"  {r.last_error}" if r.last_error else ""
        click.echo(f"{r.id:>8}  {r.created_at}  {r.status:<9} {r.kind:<19} {r.channel:<4} "
                   f"{r.resource_type}/{r.resource_id}  key {r.idempotency_key}  attempts {r.attempts}{error}")
    click.echo(f"{len(rows)} items" + (f" with status {status}" if status else ""))


@outbox.command("retry")
@click.argument("item_id", type=int)
def outbox_retry(item_id: int) -> None:
    """Send a failed item again (with the same MSH-10 / idempotency key)."""
    from gateway import build_services
    from gateway.upstream.outbox import retry

    services = build_services(_settings())
    try:
        click.echo(f"outbox item {item_id}: {retry(services.store, services.settings, item_id)}")
    except KeyError:
        raise click.ClickException(f"no outbox item {item_id}") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@outbox.command("cancel")
@click.argument("item_id", type=int)
def outbox_cancel(item_id: int) -> None:
    """Never send a pending or failed item."""
    from gateway import build_services
    from gateway.upstream.outbox import cancel_item

    services = build_services(_settings())
    try:
        change = cancel_item(services.store, item_id)
    except KeyError:
        raise click.ClickException(f"no outbox item {item_id}") from None
    click.echo(f"outbox item {item_id}: " + {"cancelled": "cancelled; it will not be sent",
                                              "delivered": "delivered already; nothing to do"}
               .get(change.outcome, "cancelled already"))


def start_mllp(settings: Settings, host: str, port: int, **options: Any) -> Any:
    """The MLLP listener on its own thread and event loop, with its own services (options: see
    MLLPServer, e.g. the channels to worker processes)."""
    from gateway import build_services
    from gateway.hl7.ingest import warm_up
    from gateway.hl7.mllp import start_in_thread

    services = build_services(settings)
    services.audit.start()  # the feed's AuditEvents wait in the spool until the listener has time
    warm_up()  # maps, ACK templates, FHIR models loaded now, not on a sender's first message
    return start_in_thread(lambda raw: services.hl7.handle(raw, "mllp"), host, port,
                           oversized=lambda head, size: services.hl7.handle(head, "mllp", size=size),
                           read_timeout=settings.mllp_read_timeout,
                           max_message_bytes=settings.mllp_max_message_bytes,
                           max_workers=listener_handlers(settings.mllp_handlers, services.store.engine), **options)


def listener_processes(setting: int) -> int:
    """The MLLP listener processes to run for --processes / GATEWAY_MLLP_PROCESSES: 0 (the default)
    means one per CPU this process may run on. A message's translation is Python work that holds the
    interpreter's lock, so one process uses one core however many senders it serves."""
    import os

    if setting > 0:
        return setting
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(len(usable), 1)


def listener_handlers(setting: int, engine: Any) -> int:
    """Messages one listener process handles at a time for GATEWAY_MLLP_HANDLERS: 0 (the default)
    means one on SQLite and four on PostgreSQL.

    SQLite has one writer: a second handler thread in the same process only competes, for the
    interpreter lock, with the thread that holds the write lock, which then holds it longer (on two
    cores, four senders over two processes: about 470 messages/s with up to six threads a process,
    about 590 with one). On PostgreSQL a handler waits on round trips to the server, which other
    handlers' work fills."""
    from gateway import db

    if setting > 0:
        return setting
    return 4 if db.is_postgres(engine) else 1


@main.command("mllp")
@click.option("--host", default=None, help="default GATEWAY_MLLP_HOST (127.0.0.1)")
@click.option("--port", default=None, type=int, help="default GATEWAY_MLLP_PORT (2575)")
@click.option("--processes", default=None, type=int,
              help="listener processes sharing the connections (default GATEWAY_MLLP_PROCESSES, 0: one per CPU)")
@click.option("--parent", type=int, default=None, hidden=True, help="exit when this process is gone (serve)")
@click.option("--handoff-fd", type=int, default=None, hidden=True,
              help="a worker process: take connections from this channel to the listener")
def mllp_command(host: str | None, port: int | None, processes: int | None, parent: int | None,
                 handoff_fd: int | None) -> None:
    """Run the MLLP listener alone (Ctrl-C or SIGTERM stops it after messages in flight)."""
    import os
    import socket
    import subprocess

    settings = _settings()
    _configure_logs(settings)
    if handoff_fd is not None:
        worker = start_mllp(settings, "", 0, handoff=socket.socket(fileno=handoff_fd))
        _wait_for_stop(parent, "MLLP worker")
        worker.stop()
        return
    from gateway import db as database

    database.check_url(settings.database_url)  # once, before worker processes start and each fail on it
    children: list[subprocess.Popen[bytes]] = []
    channels: list[socket.socket] = []
    for _ in range(listener_processes(processes or settings.mllp_processes) - 1):
        ours, theirs = socket.socketpair()
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "mllp", "--handoff-fd", str(theirs.fileno()),
             "--parent", str(os.getpid())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL))
        theirs.close()
        channels.append(ours)
    listener = start_mllp(settings, host or settings.mllp_host, settings.mllp_port if port is None else port,
                          workers=channels)
    processes_note = f" ({len(children) + 1} processes)" if children else ""
    click.echo(f"MLLP listening on {host or settings.mllp_host}:{listener.port}{processes_note}")
    _wait_for_stop(parent, "MLLP")
    click.echo("MLLP: finishing messages in flight")
    for child in children:
        child.terminate()  # SIGTERM: each finishes the messages it has in hand
    listener.stop()
    for child in children:
        try:
            child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            child.kill()


def _multiprocess_metrics() -> str:
    """PROMETHEUS_MULTIPROC_DIR for the server's processes (gunicorn workers, the MLLP listener, the
    outbox worker), each of which writes its counters there for /metrics to add up. Set before
    anything imports prometheus_client, which decides at import; the workers fork from this process
    and the child processes inherit the environment. Emptied at start: counters begin at zero when a
    server starts, as Prometheus expects. Without the variable, a fresh directory of our own."""
    import atexit
    import os
    import shutil
    import tempfile

    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise click.ClickException("internal: prometheus_client was imported before its multiprocess "
                                   "directory was chosen")
    chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        for stale in Path(chosen).glob("*.db"):
            stale.unlink()
        return chosen
    made = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(made, ignore_errors=True))
    return made


def served_url(host: str, port: int) -> str:
    """http://HOST:PORT for a listening address: a wildcard address names this machine's loopback,
    an IPv6 address goes in brackets."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--mllp-port", default=None, type=int, help="MLLP listener port (default 2575; 0 disables it)")
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per worker")
@click.option("--demo", is_flag=True, help="create the schema, load fixtures/ and allow unauthenticated access")
def serve(host: str, port: int, mllp_port: int | None, workers: int, threads: int, demo: bool) -> None:
    """Run the gateway (gunicorn)."""
    import os
    import secrets

    metrics_dir = _multiprocess_metrics()
    if demo:
        os.environ["GATEWAY_OPEN_ACCESS"] = "1"
    # Without a configured public address, the address served here (not the default's port 8080):
    # the banner, SMART discovery, OAuth redirects and links in e-mails must name one that answers.
    os.environ.setdefault("GATEWAY_BASE_URL", served_url(host, port))
    # Every worker must sign and check login sessions and CSRF tokens with the same key: without a
    # configured one, pick it here, before the workers fork, rather than one per worker.
    os.environ.setdefault("GATEWAY_SECRET_KEY", secrets.token_urlsafe(32))
    settings = _settings()
    _configure_logs(settings)
    from gateway import db as database

    database.check_url(settings.database_url)  # before any worker forks and fails to boot on it
    if demo:
        load_demo(settings)
    from gateway.serving import run_gunicorn

    if demo:
        from gateway import build_services
        from gateway.admin.staff import load_demo_staff
        from gateway.smart_auth.admin import load_demo_logins

        services = build_services(settings)
        for line in load_demo_logins(services.engine, services.store, settings.base_url):
            click.echo(f"Demo:      {line}")
        for line in load_demo_staff(services.engine):
            click.echo(f"Console:   {line}")
        services.audit.close()
        services.engine.dispose()

    click.echo(f"Portal:    {settings.base_url}/  (patients, parents and caregivers sign in here)")
    click.echo(f"Console:   {settings.base_url}/admin/  (staff: operators, front desk, security officers)")
    click.echo(f"FHIR API:  {settings.fhir_base}  (CapabilityStatement at {settings.fhir_base}/metadata)")
    click.echo(f"Health:    {settings.base_url}/healthz  {settings.base_url}/readyz")
    click.echo(f"HL7v2:     POST {settings.base_url}/hl7/v2")
    click.echo(f"Metrics:   {settings.base_url}/metrics  (all processes, from {metrics_dir})")
    mllp_port = settings.mllp_port if mllp_port is None else mllp_port
    if mllp_port:
        # The listener is a child process, counted as started once its port accepts: with the port
        # already taken by something else, that something would answer for it. Refuse to start.
        import socket

        try:
            socket.create_server((host, mllp_port)).close()
        except OSError as exc:
            raise click.ClickException(f"the MLLP port {host}:{mllp_port} cannot be opened: "
                                       f"{exc.strerror or exc}") from None
        click.echo(f"MLLP:      {host}:{mllp_port}")
    if settings.open_access:
        click.echo("WARNING: open access is on: anyone who reaches this port can read and write every "
                   "record. For demos only.")
    background: list[Callable[[], Any]] = []
    if mllp_port:
        background.append(lambda: ChildProcess("mllp", "--host", host, "--port", str(mllp_port),
                                               ready_at=(host, mllp_port)))
    if settings.outbox_worker_in_serve:
        background.append(lambda: ChildProcess("worker"))
        click.echo("Outbox:    1 worker (GATEWAY_OUTBOX_WORKER_IN_SERVE=0 turns it off)")
    from gateway import logs

    run_gunicorn(host, port, workers, threads, background, logs.logconfig(settings.log_format, settings.log_level),
                 keepalive=settings.http_keepalive)


if __name__ == "__main__":
    main()
