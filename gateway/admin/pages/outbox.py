"""Outbox monitor (/admin/outbox): destinations with their counts, last error and delivery rate; the
items with filters; retry and cancel, one or many (gateway.admin.outbox)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Response, flash, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel import ngettext
from flask_wtf import FlaskForm
from wtforms import SelectField, StringField
from wtforms.validators import Length, Optional, Regexp, ValidationError

from gateway.admin import outbox as service
from gateway.admin.web import area, audit, bp, current_staff, error_page, nav_item, page, services
from gateway.upstream.outbox import KINDS, MESSAGE_TYPES, Change

nav_item(20, "outbox", "admin.outbox", _l("Outbox"))

KIND_NAMES = {"appointment-request": _l("Appointment requests"), "appointment-cancel": _l("Appointment cancellations"),
              "refill-request": _l("Refill requests"), "message": _l("Messages to the care team")}
CHANNEL_NAMES = {"hl7": _l("HL7v2 over MLLP"), "fhir": _l("the EHR's FHIR API")}
STATUS_NAMES = {"pending": _l("waiting"), "delivered": _l("delivered"), "failed": _l("failed"),
                "cancelled": _l("cancelled")}


def _choice(names: dict[str, Any], message: Any) -> Any:
    def check(_form: Any, field: Any) -> None:
        if field.data and field.data not in names:
            raise ValidationError(str(message))
    return check


class FilterForm(FlaskForm):
    class Meta:
        csrf = False  # a search (GET) changes nothing

    status = SelectField(_l("Status"), validate_choice=False, validators=[
        _choice(STATUS_NAMES, _l("Choose a status from the list."))])
    kind = SelectField(_l("Kind"), validate_choice=False, validators=[
        _choice(KIND_NAMES, _l("Choose a kind from the list."))])
    channel = SelectField(_l("Channel"), validate_choice=False, validators=[
        _choice(CHANNEL_NAMES, _l("Choose a channel from the list."))])
    patient = StringField(_l("Patient id"), validators=[
        Optional(), Regexp(r"^[A-Za-z0-9\-.]{1,64}$", message=_l("A patient id has 1 to 64 letters, digits, "
                                                                 "dashes and dots."))])
    key = StringField(_l("Control id or key"), validators=[
        Optional(), Length(max=64, message=_l("A control id has at most 64 characters."))])
    before = StringField(validators=[Optional(), Regexp(r"^[1-9][0-9]{0,17}$",
                                                        message=_l("That page does not exist."))])

    def filters(self) -> service.Filters:
        return service.Filters(self.status.data or None, self.kind.data or None, self.channel.data or None,
                               (self.patient.data or "").strip() or None, (self.key.data or "").strip() or None,
                               int(self.before.data) if self.before.data else None)


def _first_error(form: FlaskForm) -> str:
    for errors in form.errors.values():
        for error in errors:
            return str(error)
    return _("Please check the form.")


def _selected_ids() -> list[int] | None:
    """The items ticked on the list (or the one of an item's page); None when one is not a number."""
    try:
        return [int(value) for value in request.form.getlist("item")]
    except ValueError:
        return None


def _list_url(args: dict[str, Any]) -> str:
    query = urlencode({k: v for k, v in args.items() if v and k != "before"})
    return url_for("admin.outbox") + (f"?{query}" if query else "")


def _render_list(form: FilterForm, status: int = 200, error: str | None = None,
                 confirm: list[Any] | None = None) -> Response:
    """The monitor; with filters that do not validate, the error and no items (never items that the
    operator did not ask for)."""
    args = {k: request.args.get(k, "") for k in ("status", "kind", "channel", "patient", "key")}
    listing = None
    if not form.errors:
        listing = service.items(services().engine, form.filters())
        audit("search-outbox", query=request.query_string.decode()[:500] or None,
              description=f"{len(listing.items)} outbox items listed")
    return page("outbox.html", status, form=form, error=error, listing=listing, confirm=confirm, args=args,
                destinations=service.destinations(services().engine, services().settings),
                next_url=url_for("admin.outbox", **{k: v for k, v in args.items() if v},
                                 before=listing.next_before) if listing and listing.next_before else None,
                first_page=_list_url(args) if form.before.data else None, **_names())


def _names() -> dict[str, Any]:
    return {"kind_names": KIND_NAMES, "channel_names": CHANNEL_NAMES, "status_names": STATUS_NAMES,
            "message_types": MESSAGE_TYPES, "kinds": KINDS, "max_items": service.MAX_ITEMS_PER_ACTION}


@bp.route("/outbox", methods=["GET", "POST"])
@area("outbox")
def outbox() -> Response:
    form = FilterForm(request.args)
    if not form.validate():
        return _render_list(form, 400, _first_error(form))
    if request.method == "GET":
        return _render_list(form)
    result = _act(url_for("admin.outbox", **request.args))
    if isinstance(result, Response):
        return result
    error, confirm = result
    return _render_list(form, 400 if error else 200, error, confirm)


@bp.route("/outbox/<int:item_id>", methods=["GET", "POST"])
@area("outbox")
def outbox_item(item_id: int) -> Response:
    if request.method == "POST":
        result = _act(url_for("admin.outbox_item", item_id=item_id))
        if isinstance(result, Response):
            return result
        error, confirm = result
    else:
        error, confirm = None, None
    found = service.item(services().engine, item_id)
    if found is None:
        return error_page(404, _("There is no outbox item %(id)s.", id=item_id))
    audit("view-outbox", entities=_entities([found]), description=f"outbox item {item_id}")
    return page("outbox_item.html", 400 if error else 200, item=found, error=error, confirm=confirm,
                payload=found.payload.replace("\r\n", "\n").replace("\r", "\n"),
                response_text=(found.response or "").replace("\r\n", "\n").replace("\r", "\n"), **_names())


def _entities(rows: list[Any]) -> tuple[str, ...]:
    refs: list[str] = []
    for row in rows:
        refs.append(f"{row.resource_type}/{row.resource_id}")
        if row.patient_id:
            refs.append(f"Patient/{row.patient_id}")
    return tuple(dict.fromkeys(refs))


def _act(back: str) -> Response | tuple[str | None, list[Any] | None]:
    """Retry or cancel the chosen items: a redirect back with what happened, or (error, None), or
    (None, the items) for the confirmation a cancel needs (it cannot be undone)."""
    action = request.form.get("action", "")
    ids = _selected_ids()
    if action not in ("retry", "cancel", "cancel-confirmed"):
        return _("Choose retry or cancel."), None
    if ids is None:
        return _("The chosen items could not be read. Reload the page and choose again."), None
    if not ids:
        return _("Tick the items to retry or cancel first."), None
    if len(set(ids)) > service.MAX_ITEMS_PER_ACTION:
        return _("At most %(count)s items at a time.", count=service.MAX_ITEMS_PER_ACTION), None
    rows = service.items_by_id(services().engine, ids)
    if action == "cancel":
        if not rows:
            return _("None of the chosen items exists."), None
        return None, rows
    if action == "retry":
        changes = service.retry(services().store, services().settings, ids)
        audit("execute-retry", entities=_entities(rows), outcome="0" if _applied(changes) else "4",
              description=_summary("retried", changes))
    else:
        changes = service.cancel(services().store, ids)
        audit("update-outbox", entities=_entities(rows), outcome="0" if _applied(changes) else "4",
              description=_summary("cancelled", changes))
    for category, message in _tell(changes):
        flash(message, category)
    return redirect(back, 303)


def _applied(changes: list[Change]) -> bool:
    return any(c.outcome in ("queued", "due", "cancelled") for c in changes)


def _summary(verb: str, changes: list[Change]) -> str:
    """For the audit record: what happened to each item, by whom."""
    return f"outbox items {verb} by {current_staff().name}: " + \
        ", ".join(f"{c.item_id} {c.outcome}" + (f" ({c.detail})" if c.detail else "") for c in changes)


def _tell(changes: list[Change]) -> list[tuple[str, str]]:
    """What the operator reads after a retry or a cancel, one line per outcome."""
    by: dict[str, list[Change]] = {}
    for change in changes:
        by.setdefault(change.outcome, []).append(change)

    def ids(outcome: str) -> str:
        return ", ".join(str(c.item_id) for c in by[outcome])

    said: list[tuple[str, str]] = []
    for outcome, changed in by.items():
        n = len(changed)
        if outcome in ("queued", "due"):
            said.append(("ok", ngettext("Item %(ids)s will be sent again now.", "Items %(ids)s will be sent again now.",
                                        n, ids=ids(outcome))))
        elif outcome == "cancelled":
            said.append(("ok", ngettext("Item %(ids)s is cancelled: it will not be sent.",
                                        "Items %(ids)s are cancelled: they will not be sent.", n, ids=ids(outcome))))
        elif outcome == "delivered":
            said.append(("error", ngettext("Item %(ids)s was delivered already; nothing was changed.",
                                           "Items %(ids)s were delivered already; nothing was changed.", n,
                                           ids=ids(outcome))))
        elif outcome == "was-cancelled":
            said.append(("error", ngettext("Item %(ids)s is cancelled; a cancelled item is not sent again.",
                                           "Items %(ids)s are cancelled; a cancelled item is not sent again.", n,
                                           ids=ids(outcome))))
        elif outcome == "unbuildable":
            for change in changed:
                said.append(("error", _("Item %(id)s still cannot be built: %(reason)s", id=change.item_id,
                                        reason=change.detail)))
        elif outcome == "gone":
            said.append(("error", ngettext("Item %(ids)s cannot be sent: its record no longer exists.",
                                           "Items %(ids)s cannot be sent: their records no longer exist.", n,
                                           ids=ids(outcome))))
        else:
            said.append(("error", ngettext("There is no item %(ids)s.", "There are no items %(ids)s.", n,
                                           ids=ids(outcome))))
    return said
