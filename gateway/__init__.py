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


def create_app(settings: Settings | None = None, **overrides: Any) -> Flask:
    from gateway import db
    from gateway.audit import AuditLog
    from gateway.fhir import api
    from gateway.fhir.store import FhirStore

    settings = settings or Settings.from_env(**overrides)
    app = Flask(__name__, instance_path=None)
    app.config["SECRET_KEY"] = settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    engine = db.make_engine(settings.database_url, settings.sqlite_synchronous)
    store = FhirStore(engine, settings.fhir_base)
    audit = AuditLog(store, settings.audit_queue_size, settings.audit_batch_size, settings.audit_enabled)
    app.extensions["gateway"] = Gateway(settings, engine, store, audit)
    analyzer = db.Analyzer(engine)
    app.before_request(analyzer.tick)

    app.register_blueprint(api.bp)
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
