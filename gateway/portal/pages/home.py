"""Home, whose record is shown (picker and switcher), language, and the session's end."""

from __future__ import annotations

from typing import Any

from flask import Response, g, redirect, request, session, url_for
from flask_babel import gettext as _

from gateway.portal import context, i18n
from gateway.portal.record import NotVisible
from gateway.portal.web import HOME_SECTIONS, CsrfForm, bp, error_page, page, safe_next, services, visit
from gateway.smart_auth import people, sessions


@bp.get("/")
def home() -> Response:
    current = visit()
    _language_from_record(current)
    sections = []
    for section in HOME_SECTIONS:
        values = section.build(current)
        if values is not None:
            sections.append((section.template, values))
    return page("home.html", sections=sections)


def _language_from_record(current: context.Visit) -> None:
    """At the first page after sign-in, take the language the login's own record prefers."""
    if "lang" in session or current.user.patient_id is None:
        return
    own = context.record_for(services(), current.user, current.user.patient_id)
    try:
        preferred = i18n.preferred_language(own.read("Patient", current.user.patient_id))
    except NotVisible:
        preferred = None
    session["lang"] = preferred or i18n.select_locale()


@bp.route("/login")
def login() -> Response:
    session[_next_key()] = url_for("portal.home")
    return redirect(url_for("smart_auth.login"))


def _next_key() -> str:
    from gateway.smart_auth.views import NEXT

    return NEXT


@bp.route("/choose", methods=["GET", "POST"])
def choose() -> Response:
    """Whose record: shown after sign-in to a login that may act for more than one person."""
    choices = context.choices_for(services(), g.user)
    form = CsrfForm()
    error = None
    target = safe_next(request.values.get("next"), url_for("portal.home"))
    if form.validate_on_submit():
        if context.choose((request.form.get("patient") or "").removeprefix("Patient/"), choices):
            return redirect(target)
        error = _("Choose one of the records listed.")
    return page("choose.html", 200 if error is None else 400, choices=choices, form=form, error=error,
                target=target)


@bp.post("/switch")
def switch() -> Response:
    """The header's switcher: the same check as the picker, then back to the page it came from
    (its list page when the item shown belonged to the other record)."""
    form = CsrfForm()
    if not form.validate_on_submit() or not context.choose(
            (request.form.get("patient") or "").removeprefix("Patient/"), visit().choices):
        return error_page(400, _("Choose one of the records listed."))
    return redirect(safe_next(request.form.get("next"), url_for("portal.home")))


@bp.post("/language")
def language() -> Response:
    form = CsrfForm()
    lang = request.form.get("lang", "")
    if form.validate_on_submit() and lang in i18n.LANGUAGES:
        session["lang"] = lang
    return redirect(safe_next(request.form.get("next"), url_for("portal.home")))


@bp.get("/keepalive")
def keepalive() -> Response:
    """The idle warning's "stay signed in": any signed-in request renews the session."""
    return Response(status=204, headers={"Cache-Control": "no-store"})


@bp.post("/sign-out")
def sign_out() -> Response:
    if CsrfForm().validate_on_submit():
        sessions.end("signed-out")
    return redirect(url_for("portal.signed_out"))


@bp.post("/sign-out-everywhere")
def sign_out_everywhere() -> Response:
    if CsrfForm().validate_on_submit():
        people.sign_out_everywhere(services().engine, g.user.id)
        sessions.end("signed-out")
    return redirect(url_for("portal.signed_out", everywhere=1))


@bp.get("/signed-out")
def signed_out() -> Response:
    if context.signed_in_user(services()) is not None:  # not idle after all (another tab was in use)
        return redirect(url_for("portal.home"))
    reason: Any = session.pop(sessions.ENDED, None)
    return page("signed_out.html", everywhere=bool(request.args.get("everywhere")), idle=reason == "idle")
