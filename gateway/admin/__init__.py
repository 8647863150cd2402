"""The operator console at /admin: the staff's side of the gateway (integration engineers, front
desk, security officers), server-rendered like the portal and over the same access policy.

Layout: `web.py` holds the blueprint, the staff guard and what pages share; `pages/` has one module
per area (messages, outbox, apps, patients, audit, health); the services behind them are plain modules
beside them, callable without HTTP.
"""

from __future__ import annotations

import importlib

from flask import Flask

from gateway.admin import models  # noqa: F401  (registers the console's tables in the metadata)

PAGES: tuple[str, ...] = ("messages", "resources", "patients", "outbox", "health", "apps", "audit")


def init_app(app: Flask) -> None:
    from gateway.admin import web

    for name in PAGES:
        importlib.import_module(f"gateway.admin.pages.{name}")
    app.register_blueprint(web.bp)
