"""Medications: active and past prescriptions, refill requests and their status, and the home
page's "Refills due"."""

from __future__ import annotations

from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import TextAreaField
from wtforms.validators import Length, Optional

from gateway.portal import context
from gateway.portal import medications as service
from gateway.portal.pages.messages import author_of
from gateway.portal.web import bp, home_section, nav_item, page, visit

nav_item(30, "portal.medications", _l("Medications"))

TASK_STATUS: dict[str, Any] = {
    "draft": _l("Not sent yet"), "requested": _l("Requested"), "received": _l("Received by the care team"),
    "accepted": _l("Accepted"), "ready": _l("Ready"), "in-progress": _l("In progress"), "on-hold": _l("On hold"),
    "completed": _l("Done"), "rejected": _l("Declined"), "cancelled": _l("Cancelled"),
    "failed": _l("Could not be done"),
    "entered-in-error": _l("Withdrawn"),
}
RX_STATUS: dict[str, Any] = {
    "active": _l("Active"), "on-hold": _l("On hold"), "completed": _l("Completed"), "stopped": _l("Stopped"),
    "cancelled": _l("Cancelled"), "ended": _l("Ended"), "unknown": _l("Unknown"),
}


class RefillForm(FlaskForm):
    note = TextAreaField(_l("Note for your care team (optional)"),
                         validators=[Optional(), Length(max=service.NOTE_MAX, message=_l(
                             "The note can be at most %(max)d characters long."))])


def _refusals() -> dict[str, str]:
    return {"inactive": _("This prescription is no longer active, so it cannot be refilled. Please send a "
                          "message to your care team if you still need this medicine."),
            "expired": _("This prescription has expired. Please ask your care team for a new prescription."),
            "no-refills": _("There are no refills left on this prescription. Please ask your care team for a new "
                            "prescription."),
            "already-requested": _("A refill of this prescription has already been requested and is still open.")}


@bp.get("/medications")
def medications() -> Response:
    active, past = service.prescriptions(visit().record)
    return page("medications.html", active=active, past=past, task_status=TASK_STATUS, rx_status=RX_STATUS,
                requested=request.args.get("requested"), switch_next="/medications")


@bp.route("/medications/<request_id>/refill", methods=["GET", "POST"])
def medications_refill(request_id: str) -> Response:
    current = visit()
    prescription = service.one(current.record, request_id)  # NotVisible -> the friendly 404
    form = RefillForm()
    error = None
    if request.method == "POST":
        if form.validate_on_submit():
            try:
                service.request_refill(current.record, author_of(current).reference, request_id, form.note.data or "",
                                       _refusals())
                return redirect(url_for("portal.medications", requested=request_id))
            except service.RefillRefused as refused:
                error = str(refused.message)
        else:
            error = "; ".join(str(m) for messages in form.errors.values() for m in messages)
    elif not prescription.can_request:
        reason = ("inactive" if not prescription.active else "expired" if prescription.expired
                  else "no-refills" if prescription.refills_left == 0 else "already-requested")
        error = _refusals()[reason]
    return page("medications_refill.html", 200 if error is None or request.method == "GET" else 400,
                prescription=prescription, form=form, error=error, switch_next="/medications")


@home_section(40, "home_medications.html")
def refills_due(current: context.Visit) -> dict[str, Any] | None:
    return {"due": service.refills_due(current.record)}
