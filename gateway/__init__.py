"""FHIR gateway: create_app() builds the Flask application; nothing runs at import time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify, request
from flask_cors import CORS
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import Engine

from gateway.config import Settings


@dataclass
class Gateway:
    """The services one application instance shares; found at app.extensions["gateway"]."""

    settings: Settings
    engine: Engine
    store: Any
    audit: Any
    hl7: Any
    smart: Any
    analyzer: Any = None  # the web app's (create_app)

    def close(self) -> None:
        """Finish with this database: queued AuditEvents and counted rollups are written, the audit
        writer stops, and the pool's connections are closed. For a process that goes on without
        these services (tests, commands); a process that ends gets the same at exit."""
        from gateway import metrics

        if self.analyzer is not None:
            self.analyzer.close()
        self.audit.close()
        metrics.detach(self.engine)
        self.engine.dispose()


def build_services(settings: Settings) -> Gateway:
    """The services of one process: the web app, the MLLP listener and the CLI all start here."""
    from gateway import access, db, metrics
    from gateway.audit import AuditLog
    from gateway.fhir.store import FhirStore
    from gateway.hl7.ingest import Ingestor
    from gateway.hl7.translate import configure_mappings
    from gateway.portal.notifications import Notifier
    from gateway.smart_auth.server import SmartAuth
    from gateway.upstream.outbox import Outbox

    access.configure_sensitive_labels(settings.sensitive_labels)
    configure_mappings(settings.hl7_mappings or None)
    engine = db.make_engine(settings.database_url, settings.sqlite_synchronous)
    store = FhirStore(engine, settings.fhir_base)
    metrics.attach(engine, settings)  # this process's per-minute rollups go to this database
    audit = AuditLog(store, settings.audit_queue_size, settings.audit_batch_size, settings.audit_enabled,
                     max_backlog=settings.audit_max_backlog)
    # patients' requests to the EHR are queued in the transaction of the local write
    Outbox(settings).install(store)
    # and the portal's notifications (new result, new message) in the same way
    Notifier(settings).install(store)
    return Gateway(settings, engine, store, audit, Ingestor(store, settings.base_url, audit),
                   SmartAuth(engine, settings, store))


# Endpoints that touch no patient data, served also while the audit log is behind.
UNAUDITED_ENDPOINTS = frozenset({"healthz", "readyz", "metrics.metrics"})


def create_app(settings: Settings | None = None, **overrides: Any) -> Flask:
    from gateway import db, metrics
    from gateway.fhir import api
    from gateway.hl7 import http as hl7_http
    from gateway.smart_auth import discovery as smart_discovery
    from gateway.smart_auth import views as smart_views

    settings = settings or Settings.from_env(**overrides)
    app = Flask(__name__, instance_path=None)
    app.config["SECRET_KEY"] = settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_SECURE"] = settings.base_url.startswith("https://")
    app.config["WTF_CSRF_TIME_LIMIT"] = 3600
    services = build_services(settings)
    engine = services.engine
    app.extensions["gateway"] = services
    metrics.init_app(app)
    services.analyzer = analyzer = db.Analyzer(engine)
    app.before_request(analyzer.tick)

    app.register_blueprint(api.bp)
    app.register_blueprint(hl7_http.bp)
    app.register_blueprint(smart_views.bp)
    app.register_blueprint(smart_discovery.bp)
    from gateway import portal

    portal.init_app(app)
    from gateway import admin

    admin.init_app(app)
    # Every browser form carries a CSRF token, checked before any view runs. The API, HL7 over HTTP,
    # discovery and the OAuth endpoints apps call (with bearer tokens or client credentials, never
    # cookies) are exempt; /auth/authorize is a redirect an app starts from its own page.
    csrf = CSRFProtect(app)
    for exempt in (api.bp, hl7_http.bp, smart_discovery.bp, smart_views.token, smart_views.introspect,
                   smart_views.revoke, smart_views.authorize):
        csrf.exempt(exempt)
    # Apps call the API, token and discovery endpoints from browsers on other origins with bearer
    # tokens (never cookies), so any origin may; the login and consent pages get no CORS at all.
    CORS(app, resources={r"/fhir/*": {}, r"/auth/token": {}, r"/auth/introspect": {}, r"/auth/revoke": {},
                         r"/auth/jwks": {}}, origins="*", supports_credentials=False,
         allow_headers=["Authorization", "Content-Type", "Accept", "Prefer", "If-Match", "If-None-Match",
                        "If-None-Exist", "If-Modified-Since"],
         expose_headers=["Location", "ETag", "Last-Modified", "Content-Location", "WWW-Authenticate"])
    api.register_error_handlers(app)
    from gateway import logs, ratelimit, security

    security.install(app, https=settings.base_url.startswith("https://"))
    logs.install(app)
    ratelimit.install(app, settings)

    @app.before_request
    def _audit_keeping_up() -> None:
        # Every request that may touch patient data leaves an AuditEvent: while the writer cannot
        # take more records, none starts (fail closed, before any query) rather than hang on a full
        # queue. Health, readiness, metrics, static files and CORS preflights touch no data.
        services.audit.note_activity()  # a busy process leaves spooled AuditEvents for later
        if not services.audit.keeping_up() and request.method != "OPTIONS" and \
                request.endpoint not in UNAUDITED_ENDPOINTS and not (request.endpoint or "").endswith(".static"):
            raise api.AuditBehind()

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Any:
        if not db.ping(engine):
            return jsonify(status="unavailable", database="unreachable"), 503
        if not services.audit.keeping_up():
            return jsonify(status="unavailable", database="reachable", audit="behind"), 503
        # AuditEvents captured but not yet stored as resources (about): a number that stays high
        # says the server has had no idle moment to store them in
        return jsonify(status="ready", database="reachable", audit_backlog=services.audit.backlog())

    return app
