"""Settings from GATEWAY_* environment variables, read in one place."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Settings:
    database_url: str = ""
    base_url: str = "http://127.0.0.1:8080"
    secret_key: str = ""
    instance_path: str = "instance"
    # A caller without a bearer token gets no access at all unless this is switched on explicitly
    # (demo mode and tests do). A request that carries a token is always judged by its token.
    open_access: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    # Rate-limit counters (gateway/ratelimit.py): memory:// in one process, redis://host:6379/0 shared.
    ratelimit_storage: str = "memory://"
    ratelimit_prefix: str = "gateway"
    ratelimit_sign_in: str = "60 per minute"
    # Logs of the long-running commands (serve, mllp, worker): "json" lines or "text", on stderr.
    log_format: str = "json"
    log_level: str = "INFO"
    # Seconds `gateway serve` keeps an idle HTTP connection open. Longer than the idle timeout of the
    # proxy or client in front (60 s is common), so the server never closes a connection just as a
    # request is sent on it (a reset the client sees as an error).
    http_keepalive: int = 75
    default_page_size: int = 20
    max_page_size: int = 1000
    sqlite_synchronous: str = "FULL"
    audit_queue_size: int = 10_000
    audit_batch_size: int = 500
    audit_max_backlog: int = 100_000
    audit_enabled: bool = True
    # The EHR's FHIR R4 API (gateway/upstream): a static bearer token, or SMART backend services
    # (private_key_jwt signed with the PEM key file; token endpoint from .well-known/smart-configuration).
    upstream_fhir_url: str = ""
    upstream_bearer_token: str = ""
    upstream_client_id: str = ""
    upstream_private_key_file: str = ""
    upstream_key_id: str = ""
    upstream_jwt_alg: str = "RS384"
    upstream_scope: str = "system/*.rs system/*.cu"
    upstream_timeout: float = 30.0
    upstream_max_retries: int = 5
    # Seconds between periodic syncs by _lastUpdated in `gateway worker` / `serve` (0: none).
    upstream_sync_interval: int = 0
    # A sign-in starts a background sync of the user's records (and those they act for), which stops
    # making requests after this many seconds; the page never waits for it.
    upstream_login_sync_seconds: float = 20.0
    # Outbox: per kind "hl7" (MLLP), "fhir" (upstream API) or "off" (not queued). The cancel kind
    # follows the appointment request's setting unless it is set itself.
    outbox_appointment_request: str = "off"
    outbox_appointment_cancel: str = ""
    outbox_refill_request: str = "off"
    outbox_message: str = "off"
    outbox_mllp_host: str = "127.0.0.1"
    outbox_mllp_port: int = 0
    outbox_ack_timeout: float = 30.0
    outbox_sending_application: str = "FHIR-GATEWAY"
    outbox_sending_facility: str = "GATEWAY"
    outbox_receiving_application: str = "EHR"
    outbox_receiving_facility: str = "EHR"
    outbox_hl7_version: str = "2.5.1"
    # Retries after a timeout or connection failure: exponential from base to max seconds.
    outbox_backoff_base: float = 2.0
    outbox_backoff_max: float = 600.0
    outbox_max_attempts: int = 20
    outbox_poll_interval: float = 1.0
    # FHIR creates due together go to the upstream in one Bundle of at most this many entries (each
    # with its own ifNoneExist; 1 sends each alone): a "transaction" (one commit upstream; when it is
    # refused, the items go one by one so that only the bad one fails) or a "batch".
    outbox_fhir_batch: int = 16
    outbox_fhir_bundle_type: str = "transaction"
    # `gateway serve` runs one outbox worker thread in the arbiter unless this is off.
    outbox_worker_in_serve: bool = True
    mllp_port: int = 2575
    mllp_host: str = "127.0.0.1"
    mllp_read_timeout: int = 60
    mllp_max_message_bytes: int = 16 * 1024 * 1024
    # Listener processes: connections are spread over them (each one's messages stay in order in one
    # process), so that several senders use several CPUs. 0: one per CPU this process may run on;
    # 1: the listener alone.
    mllp_processes: int = 0
    # Messages one listener process handles at a time (its handler threads). 0: by database, one on
    # SQLite (its single write lock is held longer, not shared, when a second thread of the same
    # process competes for the interpreter lock), four on PostgreSQL (round trips to the server
    # overlap). Several processes (mllp_processes) are what use several CPUs.
    mllp_handlers: int = 0
    # Bearer secret for HL7v2 over HTTP (EHR senders without a SMART backend-services client).
    hl7_http_secret: str = ""
    # The folder of translation maps (mappings/README.md); empty: the mappings/ shipped beside the
    # package. Edited maps are read again before a reprocess (console or CLI), without a restart.
    hl7_mappings: str = ""
    # SMART: access-token lifetime for apps (backend-services tokens always live 300 seconds), and
    # how long one process may reuse what it learnt about a token before asking the database again
    # (revocations in the same process take effect at once; in other processes within this time).
    access_token_seconds: int = 3600
    token_cache_seconds: int = 5
    # More meta.security labels (system|code, space separated) that proxies of 12-17 year olds never
    # see, besides v3-Confidentiality R and V; e.g. v3-ActCode PSY, ETH, HIV, SDV.
    sensitive_labels: str = ""
    # Outgoing mail (password reset links). Without a host no mail is sent and reset is unavailable.
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "no-reply@localhost"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    # Patient portal: a signed-in browser session ends after this many idle seconds (the page warns
    # a minute before); notifications by SMS go to this HTTP provider (JSON POST of to/body, with
    # the bearer token when set). Without a URL, SMS preferences fall back to email.
    portal_idle_seconds: int = 900
    timezone: str = "America/New_York"  # the clinic's: times on pages and in messages
    sms_url: str = ""
    sms_token: str = ""
    sms_from: str = ""
    # Portal appointments: a hold keeps a Slot this many minutes while the patient books; a time
    # offered to the waitlist is kept this long; cancel and reschedule close this many minutes
    # before the start; `gateway worker` sweeps expired holds and offers every this many seconds.
    portal_hold_minutes: int = 10
    portal_offer_minutes: int = 120
    portal_change_cutoff_minutes: int = 120
    portal_sweep_seconds: int = 60
    # The Organization (id) that portal requests to staff are addressed to (Task.owner), and that a
    # reply goes to when its thread names nobody of the care team.
    portal_staff_organization: str = "riverside-general"
    # Metrics (gateway/metrics.py): each process adds its per-minute rollups to the database every this
    # many seconds (the console's health dashboard reads them) and rollups older than this many days
    # are pruned; with a token set, GET /metrics wants it as a bearer token.
    metrics_flush_seconds: float = 5.0
    metrics_keep_days: int = 8
    metrics_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get("GATEWAY_" + f.name.upper())
            if raw is None:
                continue
            if f.type in ("bool", bool):
                values[f.name] = _bool(raw)
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        settings = cls(**values)
        settings.base_url = settings.base_url.rstrip("/")
        if not settings.database_url:
            Path(settings.instance_path).mkdir(parents=True, exist_ok=True)
            db_file = Path(settings.instance_path).resolve() / "gateway.sqlite"
            settings.database_url = f"sqlite:///{db_file}"
        if not settings.outbox_appointment_cancel:
            settings.outbox_appointment_cancel = settings.outbox_appointment_request
        if not settings.secret_key:
            settings.secret_key = secrets.token_urlsafe(32)
        return settings

    def outbox_channel(self, kind: str) -> str:
        """hl7, fhir or off for an outbox kind (appointment-request, refill-request, ...)."""
        return str(getattr(self, "outbox_" + kind.replace("-", "_"), "off") or "off").strip().lower()

    @property
    def fhir_base(self) -> str:
        return self.base_url + "/fhir"
