"""FHIR gateway: create_app() builds the Flask application; nothing runs at import time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify
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


def build_services(settings: Settings) -> Gateway:
    """The services of one process: the web app, the MLLP listener and the CLI all start here."""
    from gateway import db
    from gateway.audit import AuditLog
    from gateway.fhir.store import FhirStore
    from gateway.hl7.ingest import Ingestor
    from gateway.upstream.outbox import Outbox

    engine = db.make_engine(settings.database_url, settings.sqlite_synchronous)
    store = FhirStore(engine, settings.fhir_base)
    audit = AuditLog(store, settings.audit_queue_size, settings.audit_batch_size, settings.audit_enabled)
    # patients' requests to the EHR are queued in the transaction of the local write
    Outbox(settings).install(store)
    return Gateway(settings, engine, store, audit, Ingestor(store, settings.base_url, audit))


def create_app(settings: Settings | None = None, **overrides: Any) -> Flask:
    from gateway import db
    from gateway.fhir import api
    from gateway.hl7 import http as hl7_http

    settings = settings or Settings.from_env(**overrides)
    app = Flask(__name__, instance_path=None)
    app.config["SECRET_KEY"] = settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    services = build_services(settings)
    engine = services.engine
    app.extensions["gateway"] = services
    analyzer = db.Analyzer(engine)
    app.before_request(analyzer.tick)

    app.register_blueprint(api.bp)
    app.register_blueprint(hl7_http.bp)
    api.register_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Any:
        if db.ping(engine):
            return jsonify(status="ready", database="reachable")
        return jsonify(status="unavailable", database="unreachable"), 503

    return app
