"""The portal's blueprint and what every page shares: the sign-in guard, the visit (who is looking
at whose record), rendering with the security headers, friendly error pages, and the sections the
home page gathers from each area."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, session, url_for
from flask_babel import format_date, format_datetime
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFError

from gateway.fhir.outcome import FhirError
from gateway.portal import context
from gateway.portal.record import NotVisible
from gateway.smart_auth import views as smart_views

bp = Blueprint("portal", __name__, template_folder="templates", static_folder="static",
               static_url_path="/portal-static")

# Endpoints reachable without signing in.
PUBLIC = {"portal.static", "portal.language", "portal.signed_out", "portal.login"}
# Endpoints a login that has not yet picked whose record to see may use.
BEFORE_CHOICE = PUBLIC | {"portal.choose", "portal.keepalive", "portal.sign_out", "portal.sign_out_everywhere"}


class CsrfForm(FlaskForm):
    """A form whose fields the view reads itself; the CSRF token is still checked."""


def services() -> Any:
    return current_app.extensions["gateway"]


def visit() -> context.Visit:
    return g.visit  # type: ignore[no-any-return]


@dataclass(frozen=True)
class HomeSection:
    """One block of the home page: a template under portal/ and the function that fills it
    (returning None leaves the block out)."""

    order: int
    template: str
    build: Callable[[context.Visit], dict[str, Any] | None]


HOME_SECTIONS: list[HomeSection] = []
NAV: list[tuple[int, str, Any]] = []  # (order, endpoint, label): the main menu, filled by the areas


def nav_item(order: int, endpoint: str, label: Any) -> None:
    """Add an area to the main menu (label: a lazy_gettext string)."""
    if all(e != endpoint for _, e, _l in NAV):
        NAV.append((order, endpoint, label))
        NAV.sort(key=lambda item: item[0])


def home_section(order: int, template: str) -> Callable[[Callable[[context.Visit], dict[str, Any] | None]],
                                                         Callable[[context.Visit], dict[str, Any] | None]]:
    def register(build: Callable[[context.Visit], dict[str, Any] | None]) -> Callable[..., Any]:
        HOME_SECTIONS.append(HomeSection(order, template, build))
        HOME_SECTIONS.sort(key=lambda s: s.order)
        return build
    return register


def safe_next(target: str | None, default: str) -> str:
    """Only a path on this site (no scheme, no host, no //): never an open redirect."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


@bp.before_request
def _guard() -> Response | None:
    if request.endpoint in PUBLIC:
        return None
    user = context.signed_in_user(services())
    if user is None:
        if request.method == "GET":
            session[smart_views.NEXT] = safe_next(request.full_path.rstrip("?"), url_for("portal.home"))
        else:
            session[smart_views.NEXT] = url_for("portal.home")
        return redirect(url_for("smart_auth.login"))
    g.user = user
    if request.endpoint in BEFORE_CHOICE:
        return None
    current = context.visit(services(), user)
    if current is None:
        if user.patient_id is None and not context.choices_for(services(), user):
            return redirect(url_for("admin.home"))  # a login with no record to see: staff, the console's guard decides
        return redirect(url_for("portal.choose", next=safe_next(request.full_path.rstrip("?"), "/")))
    g.visit = current
    return None


def page(template: str, http_status: int = 200, **values: Any) -> Response:
    response = Response(render_template(f"portal/{template}", **values), http_status)
    response.headers["Cache-Control"] = "no-store"
    return response


def error_page(status: int, message: str) -> Response:
    return page("error.html", status, status=status, message=message)


def friendly_error(status: int, error: Exception | None = None) -> Response:
    """The page for an error outside any view's own handling (unknown page, a crash)."""
    messages = {404: _("There is no page at this address."), 405: _("That is not something this page does."),
                413: _("What you sent is too large."), 429: _("Too many attempts; please wait a few minutes."),
                400: _("We could not understand that request. Please go back and try again."),
                503: _("This service cannot take requests at the moment; nothing was changed. Please try again "
                       "in a few minutes.")}
    message = messages.get(status, _("Something went wrong on our side. It has been logged; please try again."))
    if status == 400 and isinstance(error, CSRFError):
        message = _("This form has expired or was not sent from this site. Please go back, reload the page "
                    "and try again.")
    try:
        return error_page(status, message)
    except Exception:  # the error page itself failed (e.g. no session): plain text, still no trace
        current_app.logger.exception("the error page could not be shown")
        return Response(str(message), status, content_type="text/plain; charset=utf-8")


@bp.errorhandler(NotVisible)
def _not_visible(error: NotVisible) -> Response:
    return error_page(404, _("We could not find that in this record."))


@bp.errorhandler(FhirError)
def _fhir_error(exc: FhirError) -> Response:
    if exc.status in (401, 403):
        return error_page(403, _("You do not have access to this."))
    if exc.status == 412:
        return error_page(409, _("Someone changed this while you were looking at it. Please go back and try "
                                 "again."))
    current_app.logger.info("portal request refused: %s", exc.diagnostics)
    return error_page(400, _("We could not do that: %(reason)s", reason=exc.diagnostics))


@bp.app_context_processor
def _shared() -> dict[str, Any]:
    from gateway.portal.i18n import LANGUAGES, select_locale

    settings = services().settings
    return {"current_visit": g.get("visit"), "signed_in": g.get("user") is not None,
            "languages": LANGUAGES, "current_language": select_locale(),
            "idle_seconds": settings.portal_idle_seconds, "csrf_form": CsrfForm(),
            "portal_nav": [(endpoint, label) for _, endpoint, label in NAV]}


def parse_instant(value: Any) -> datetime | date | None:
    """A FHIR date, dateTime or instant as a date or an aware datetime (None when unreadable)."""
    if not value:
        return None
    text = str(value)
    try:
        if len(text) <= 10:
            return date.fromisoformat(text + "-01-01"[len(text) - 4:] if len(text) < 10 else text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:
        return None


@bp.app_template_filter("portal_date")
def portal_date(value: Any, style: str = "medium") -> str:
    moment = parse_instant(value)
    if moment is None:
        return str(value or "")
    return format_date(moment.date() if isinstance(moment, datetime) else moment, style)


@bp.app_template_filter("portal_datetime")
def portal_datetime(value: Any, style: str = "medium") -> str:
    moment = parse_instant(value)
    if moment is None:
        return str(value or "")
    if not isinstance(moment, datetime):
        return format_date(moment, style)
    return format_datetime(moment, style)
