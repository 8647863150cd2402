"""The patient portal at /: server-rendered pages over the same access policy as the FHIR API.

Layout: `record.py` is the one object pages read and write patient data through (access check,
store, audit); `context.py` knows who is signed in and whose record they are looking at; `web.py`
holds the blueprint and what pages share; `pages/` has one module per area; the services behind
the pages (results, medications, appointments, messages, sharing, notifications) are plain modules
beside them.
"""

from __future__ import annotations

import importlib

from flask import Flask

from gateway.portal import models  # noqa: F401  (registers the portal's tables in the metadata)

PAGES = ("home", "results", "medications", "appointments", "messages", "requests", "sharing", "profile",
         "notifications")


def init_app(app: Flask) -> None:
    from gateway.portal import i18n, web

    i18n.init_babel(app, app.extensions["gateway"].settings.timezone)
    for name in PAGES:
        importlib.import_module(f"gateway.portal.pages.{name}")
    app.register_blueprint(web.bp)
