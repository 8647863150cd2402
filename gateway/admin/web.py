"""The console's blueprint and what every page shares: the staff guard (signed in, second factor,
a role that opens the page's area), rendering, friendly errors, the menu, and auditing of actions.

Every view belongs to an area (`@area("messages")`); the guard asks gateway.access whether the
login's roles open it before the view runs. A view registered without an area is refused (fail
closed), except the console's home, which shows each login the areas it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError

from gateway import access
from gateway.admin import staff
from gateway.fhir.outcome import FhirError
from gateway.portal.web import safe_next
from gateway.smart_auth import people, sessions
from gateway.smart_auth import views as smart_views

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates", static_folder="static",
               static_url_path="/static")

F = TypeVar("F", bound=Callable[..., Any])
AREA_OF: dict[str, str] = {}  # endpoint -> area
OPEN_TO_STAFF = {"admin.home"}
NAV: list[tuple[int, str, str, Any]] = []  # (order, area, endpoint, label)


@dataclass(frozen=True)
class Staff:
    """The signed-in staff member of this request."""

    user: people.User
    roles: frozenset[str]

    @property
    def name(self) -> str:
        return f"staff:{self.user.username}"

    def principal(self) -> access.Principal:
        return access.principal_for_staff(username=self.user.username, roles=self.roles)

    def may(self, area_name: str) -> bool:
        return access.staff_may(self.roles, area_name)


def area(name: str) -> Callable[[F], F]:
    """Put a view in a console area (gateway.access.STAFF_AREAS decides which roles open it)."""
    if name not in access.STAFF_AREAS:
        raise ValueError(f"unknown console area {name!r}")

    def register(view: F) -> F:
        AREA_OF[f"admin.{view.__name__}"] = name
        return view
    return register


def nav_item(order: int, area_name: str, endpoint: str, label: Any) -> None:
    """Add an area's entry page to the console menu (label: a lazy_gettext string)."""
    if all(e != endpoint for _o, _a, e, _l in NAV):
        NAV.append((order, area_name, endpoint, label))
        NAV.sort(key=lambda item: item[0])


def services() -> Any:
    return current_app.extensions["gateway"]


def current_staff() -> Staff:
    return g.staff  # type: ignore[no-any-return]


def address() -> str | None:
    return request.remote_addr


def audit(action: str, *, entities: tuple[str, ...] = (), contents: tuple[str, ...] = (),
          description: str | None = None, query: str | None = None, outcome: str = "0") -> None:
    """Record a console action as an AuditEvent: action is "<verb>-<what>", verb one of view, search,
    export, create, update, delete, execute (gateway.audit.CONSOLE_VERBS). `entities` are the
    references touched (a Patient reference puts the event in that patient's access log)."""
    services().audit.record(f"console:{action}", current_staff().name, address=address(), outcome=outcome,
                            query=query, entities=entities, contents=contents, description=description)


def page(template: str, http_status: int = 200, **values: Any) -> Response:
    response = Response(render_template(f"admin/{template}", **values), http_status)
    response.headers["Cache-Control"] = "no-store"
    return response


def error_page(status: int, message: str) -> Response:
    return page("error.html", status, status=status, message=message)


@bp.before_request
def _guard() -> Response | None:
    if request.endpoint == "admin.static":
        return None
    user = sessions.current_user(services().engine, services().settings.portal_idle_seconds)
    if user is None:
        session[smart_views.NEXT] = safe_next(request.full_path.rstrip("?"), url_for("admin.home")) \
            if request.method == "GET" else url_for("admin.home")
        return redirect(url_for("smart_auth.login"))
    with services().engine.connect() as conn:
        roles = staff.roles_of(conn, user.id)
    g.user = user
    if not roles:
        return error_page(403, _("This area is for hospital staff. Your patient portal is at the home page."))
    if not sessions.passed_mfa():
        return error_page(403, _("Staff must sign in with two-step verification. Sign out, then sign in again "
                                 "with the code from your authenticator app."))
    g.staff = Staff(user, roles)
    endpoint = request.endpoint or ""
    if endpoint in OPEN_TO_STAFF:
        return None
    area_name = AREA_OF.get(endpoint)
    if area_name is None or not access.staff_may(roles, area_name):
        return error_page(403, _("Your role does not open this page."))
    return None


@bp.errorhandler(FhirError)
def _fhir_error(exc: FhirError) -> Response:
    if exc.status in (401, 403):
        return error_page(403, _("Your role does not open this page."))
    if exc.status in (404, 410):
        return error_page(404, _("There is nothing at this address."))
    current_app.logger.info("console request refused: %s", exc.diagnostics)
    return error_page(400, _("That could not be done: %(reason)s", reason=exc.diagnostics))


@bp.errorhandler(CSRFError)
def _csrf(error: CSRFError) -> Response:
    return error_page(400, _("This form has expired or was not sent from this site. Please go back, reload the "
                             "page and try again."))


@bp.app_context_processor
def _shared() -> dict[str, Any]:
    who: Staff | None = g.get("staff")
    return {"staff": who,
            "admin_nav": [(endpoint, label) for _o, area_name, endpoint, label in NAV
                          if who is not None and who.may(area_name)]}


@bp.get("/")
def home() -> Response:
    return page("home.html")
