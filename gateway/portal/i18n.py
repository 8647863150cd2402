"""English and Spanish (flask-babel). The choice: the session's (set from the language switch or
from the login's Patient.communication at sign-in), else the browser's Accept-Language."""

from __future__ import annotations

from typing import Any

from flask import Flask, request, session
from flask_babel import Babel

LANGUAGES = {"en": "English", "es": "Español"}
DEFAULT = "en"


def select_locale() -> str:
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return str(chosen)
    return request.accept_languages.best_match(list(LANGUAGES)) or DEFAULT


def preferred_language(patient: dict[str, Any]) -> str | None:
    """The first supported language of Patient.communication, the preferred one first."""
    entries = sorted(patient.get("communication") or [], key=lambda c: not c.get("preferred"))
    for entry in entries:
        for coding in (entry.get("language") or {}).get("coding") or []:
            code = str(coding.get("code") or "").split("-")[0].lower()
            if code in LANGUAGES:
                return code
    return None


def with_language(patient: dict[str, Any], lang: str) -> dict[str, Any]:
    """The Patient with `lang` as its preferred language (BCP-47 code, urn:ietf:bcp:47)."""
    updated = dict(patient)
    others = [dict(c, preferred=False) for c in patient.get("communication") or []
              if str(((c.get("language") or {}).get("coding") or [{}])[0].get("code") or "").split("-")[0].lower()
              != lang]
    updated["communication"] = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang,
                                                           "display": LANGUAGES[lang]}],
                                              "text": LANGUAGES[lang]}, "preferred": True}, *others]
    return updated


def init_babel(app: Flask, timezone: str) -> None:
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", "portal/translations")
    app.config.setdefault("BABEL_DEFAULT_TIMEZONE", timezone)
    Babel(app, locale_selector=select_locale)
