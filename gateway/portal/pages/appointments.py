"""Appointments: list and detail, find a time and hold it, book, cancel, reschedule, the waitlist
and its offers. Thin views over gateway.portal.appointments."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext
from flask_wtf import FlaskForm
from wtforms import HiddenField, SelectField, StringField
from wtforms.validators import DataRequired, Length, Optional

from gateway.portal import appointments as service
from gateway.portal.context import Visit
from gateway.portal.web import CsrfForm, bp, home_section, nav_item, page, services, visit

nav_item(30, "portal.appointments", lazy_gettext("Appointments"))

DONE = {
    "held": lazy_gettext("We are holding this time for you. Review it and press Book to confirm."),
    "booked": lazy_gettext("Your appointment is booked."),
    "rescheduled": lazy_gettext("Your appointment is moved to the new time; the old one is cancelled."),
    "released": lazy_gettext("The time you held is released."),
    "cancelled": lazy_gettext("The appointment is cancelled."),
    "waitlisted": lazy_gettext("You are on the waitlist. We will offer you an earlier time if one opens."),
    "left": lazy_gettext("You have left the waitlist."),
    "accepted": lazy_gettext("The earlier time is booked and your old appointment is cancelled."),
    "declined": lazy_gettext("You declined the offered time. You stay on the waitlist."),
}

PROBLEMS = {
    "no-slot": lazy_gettext("Choose a time first."),
    "slot-gone": lazy_gettext("That time is not offered any more. Please pick another."),
    "slot-past": lazy_gettext("That time has already passed. Please pick another."),
    "slot-taken": lazy_gettext("That time was just taken. Please pick another."),
    "not-active": lazy_gettext("This appointment cannot be changed any more."),
    "hold-expired": lazy_gettext("Your hold on that time ran out. Please pick a time again."),
    "already-waitlisted": lazy_gettext("You are already on the waitlist for an earlier time for this appointment."),
    "offer-gone": lazy_gettext("That offer is no longer available."),
    "bad-range": lazy_gettext("Enter a valid date range: dates as YYYY-MM-DD, the last day on or after the first, "
                              "not in the past, at most 3 months."),
    "bad-schedule": lazy_gettext("Choose a kind of visit from the list."),
}
CONFLICTS = {"slot-taken", "offer-gone"}


def _cancel_choices() -> list[tuple[str, Any]]:
    return [("pat", lazy_gettext("Schedule conflict or other personal reason")),
            ("pat-fb", lazy_gettext("Feeling better")),
            ("pat-lt", lazy_gettext("No transportation")),
            ("other", lazy_gettext("Other"))]


class FindForm(FlaskForm):
    class Meta:
        csrf = False  # a search (GET): it changes nothing

    schedule = SelectField(lazy_gettext("Kind of visit"), validators=[DataRequired()], validate_choice=False)
    start = StringField(lazy_gettext("From"), validators=[Optional(), Length(max=10)])
    end = StringField(lazy_gettext("To"), validators=[Optional(), Length(max=10)])
    replaces = HiddenField(validators=[Optional(), Length(max=64)])


class HoldForm(FlaskForm):
    slot = StringField(lazy_gettext("Time"), validators=[DataRequired(message=PROBLEMS["no-slot"]), Length(max=64)])
    reason = StringField(lazy_gettext("Reason for the visit (optional)"), validators=[Optional(), Length(max=200)])
    replaces = HiddenField(validators=[Optional(), Length(max=64)])


class CancelForm(FlaskForm):
    reason = SelectField(lazy_gettext("Why are you cancelling?"), choices=_cancel_choices,
                         validators=[DataRequired()])


def _timing() -> service.Timing:
    return service.Timing.of(services().settings)


def _zone() -> str:
    return str(services().settings.timezone)


@bp.get("/appointments")
def appointments() -> Response:
    current = visit()
    upcoming, past, waitlist = service.record_appointments(current.record, _timing())
    offers = service.open_offers(current.record)
    return page("appointments.html", upcoming=upcoming, past=past, waitlist=waitlist, offers=offers,
                done=DONE.get(request.args.get("done", "")), by_id={a.id: a for a in upcoming})


def _detail(appointment_id: str, status: int = 200, problem: str | None = None,
            cancel_form: CancelForm | None = None) -> Response:
    record = visit().record
    view = service.appointment(record, appointment_id, _timing())
    phone = service.office_phone(record, view) if view.upcoming else ""
    held = service.held_until(record, view) if view.status == "pending" else None
    replaces = None
    for ref in view.resource.get("supportingInformation") or []:
        if str(ref.get("reference", "")).startswith("Appointment/"):
            replaces = record.read_reference(ref["reference"])
    schedule = _schedule_of(view)
    return page("appointments_detail.html", status, appt=view, phone=phone, held_until=held,
                replaces=service.to_view(replaces, _timing()) if replaces else None, problem=problem,
                cancel_form=cancel_form or CancelForm(), form=CsrfForm(), schedule=schedule,
                done=DONE.get(request.args.get("done", "")), cutoff_hours=int(_timing().cutoff.total_seconds() // 3600))


def _schedule_of(view: service.Appointment) -> service.ScheduleChoice | None:
    return next((s for s in service.schedules(services()) if view.practitioner_ref
                 and s.practitioner_ref == view.practitioner_ref), None)


def _problem_text(code: str, phone: str = "") -> str:
    if code == "too-late":
        hours = int(_timing().cutoff.total_seconds() // 3600)
        return _("This appointment starts in less than %(hours)s hours and can no longer be changed online. "
                 "Please call the office at %(phone)s.", hours=hours, phone=phone or _("the number on your "
                                                                                       "appointment letter"))
    return str(PROBLEMS.get(code, PROBLEMS["not-active"]))


def _refused(appointment_id: str, error: service.AppointmentError,
             cancel_form: CancelForm | None = None) -> Response:
    record = visit().record
    view = service.appointment(record, appointment_id, _timing())
    status = 409 if error.code in CONFLICTS else 400
    return _detail(appointment_id, status, _problem_text(error.code, service.office_phone(record, view)),
                   cancel_form)


@bp.get("/appointments/<appointment_id>")
def appointments_detail(appointment_id: str) -> Response:
    return _detail(appointment_id)


@bp.get("/appointments/find")
def appointments_find() -> Response:
    return _find(FindForm(request.args), HoldForm(), search="schedule" in request.args)


def _find(form: FindForm, hold_form: HoldForm, search: bool, status: int = 200,
          problem: str | None = None) -> Response:
    current = visit()
    choices = service.schedules(services())
    form.schedule.choices = [("", _("Choose..."))] + [(s.id, s.label) for s in choices]
    zone = _zone()
    today = service.utcnow().astimezone(ZoneInfo(zone)).date()
    if not form.start.data:
        form.start.data = today.isoformat()
    if not form.end.data:
        form.end.data = (date.fromisoformat(form.start.data) + timedelta(days=13)).isoformat() \
            if _is_date(form.start.data) else ""
    replaces = None
    if form.replaces.data:
        replaces = service.appointment(current.record, form.replaces.data, _timing())
        if not form.schedule.data:
            chosen = _schedule_of(replaces)
            form.schedule.data = chosen.id if chosen else ""
    slots: list[service.Slot] = []
    next_cursor = None
    chosen_schedule = None
    if search:
        chosen_schedule = next((s for s in choices if s.id == form.schedule.data), None)
        if not form.validate() or chosen_schedule is None:
            status, problem = 400, problem or str(PROBLEMS["bad-schedule"])
        else:
            try:
                first, last = service.parse_range(form.start.data, form.end.data, zone, today)
            except service.AppointmentError:
                status, problem = 400, problem or str(PROBLEMS["bad-range"])
            else:
                slots, next_cursor = service.find_slots(current.record, chosen_schedule.id, first, last, zone,
                                                        request.args.get("cursor") or None)
    args = {k: v for k, v in request.args.items() if k != "cursor"}
    if request.method == "POST":
        args = {"schedule": form.schedule.data or "", "start": form.start.data or "", "end": form.end.data or "",
                "replaces": form.replaces.data or ""}
    more = url_for("portal.appointments_find", **args, cursor=next_cursor) if next_cursor else None
    hold_form.replaces.data = form.replaces.data
    return page("appointments_find.html", status, form=form, hold_form=hold_form, slots=slots, problem=problem,
                searched=search, schedule=chosen_schedule, more=more, replaces=replaces)


def _is_date(value: str | None) -> bool:
    try:
        date.fromisoformat(value or "")
    except ValueError:
        return False
    return True


@bp.post("/appointments/hold")
def appointments_hold() -> Response:
    current = visit()
    hold_form = HoldForm()
    find_form = FindForm(request.form)
    if not hold_form.validate_on_submit():
        code = "no-slot" if not hold_form.slot.data else "bad-reason"
        message = str(PROBLEMS["no-slot"]) if code == "no-slot" else _(
            "The reason can be at most 200 characters.")
        return _find(find_form, hold_form, search=bool(find_form.schedule.data), status=400, problem=message)
    try:
        created = service.hold(current.record, services(), hold_form.slot.data.strip(),
                               (hold_form.reason.data or "").strip(), hold_form.replaces.data or None)
    except service.AppointmentError as error:
        status = 409 if error.code in CONFLICTS else 400
        message = _problem_text(error.code)
        return _find(find_form, hold_form, search=bool(find_form.schedule.data), status=status, problem=message)
    return redirect(url_for("portal.appointments_detail", appointment_id=created["id"], done="held"))


@bp.post("/appointments/<appointment_id>/book")
def appointments_book(appointment_id: str) -> Response:
    current = visit()
    if not CsrfForm().validate_on_submit():
        return _detail(appointment_id, 400, _("This form has expired. Please try again."))
    view = service.appointment(current.record, appointment_id, _timing())
    rescheduling = any(str(r.get("reference", "")).startswith("Appointment/")
                       for r in view.resource.get("supportingInformation") or [])
    try:
        service.book(current.record, services(), appointment_id)
    except service.AppointmentError as error:
        return _refused(appointment_id, error)
    return redirect(url_for("portal.appointments_detail", appointment_id=appointment_id,
                            done="rescheduled" if rescheduling else "booked"))


@bp.post("/appointments/<appointment_id>/release")
def appointments_release(appointment_id: str) -> Response:
    current = visit()
    if not CsrfForm().validate_on_submit():
        return _detail(appointment_id, 400, _("This form has expired. Please try again."))
    service.appointment(current.record, appointment_id, _timing())  # this record's, or 404
    try:
        service.release(current.record, services(), appointment_id)
    except service.AppointmentError as error:
        return _refused(appointment_id, error)
    return redirect(url_for("portal.appointments", done="released"))


@bp.post("/appointments/<appointment_id>/cancel")
def appointments_cancel(appointment_id: str) -> Response:
    current = visit()
    form = CancelForm()
    if not form.validate_on_submit():
        return _detail(appointment_id, 400, _("Choose a reason for cancelling."), form)
    label = dict(_cancel_choices())[form.reason.data]
    try:
        service.cancel(current.record, services(), appointment_id, form.reason.data, str(label))
    except service.AppointmentError as error:
        return _refused(appointment_id, error, form)
    return redirect(url_for("portal.appointments_detail", appointment_id=appointment_id, done="cancelled"))


@bp.post("/appointments/<appointment_id>/waitlist")
def appointments_waitlist(appointment_id: str) -> Response:
    current = visit()
    if not CsrfForm().validate_on_submit():
        return _detail(appointment_id, 400, _("This form has expired. Please try again."))
    try:
        service.join_waitlist(current.record, services(), appointment_id)
    except service.AppointmentError as error:
        return _refused(appointment_id, error)
    return redirect(url_for("portal.appointments_detail", appointment_id=appointment_id, done="waitlisted"))


@bp.post("/appointments/waitlist/<waitlist_id>/leave")
def appointments_leave(waitlist_id: str) -> Response:
    current = visit()
    entry = service.waitlist_entry(_own_waitlist(current, waitlist_id))
    if not CsrfForm().validate_on_submit():
        return page("error.html", 400, status=400, message=_("This form has expired. Please try again."))
    try:
        service.leave_waitlist(current.record, services(), waitlist_id)
    except service.AppointmentError as error:
        return page("error.html", 400, status=400, message=_problem_text(error.code))
    if entry.replaces:
        return redirect(url_for("portal.appointments_detail", appointment_id=entry.replaces, done="left"))
    return redirect(url_for("portal.appointments", done="left"))


def _own_waitlist(current: Visit, waitlist_id: str) -> dict[str, Any]:
    resource = current.record.read("Appointment", waitlist_id)
    if resource.get("status") not in ("waitlist", "cancelled") or current.record.reference not in {
            (p.get("actor") or {}).get("reference") for p in resource.get("participant") or []}:
        from gateway.portal.record import NotVisible

        raise NotVisible(f"Appointment/{waitlist_id}")
    return resource


@bp.post("/appointments/offers/<waitlist_id>/<answer>")
def appointments_offer(waitlist_id: str, answer: str) -> Response:
    current = visit()
    _own_waitlist(current, waitlist_id)
    if answer not in ("accept", "decline"):
        return page("error.html", 404, status=404, message=_("There is no page at this address."))
    if not CsrfForm().validate_on_submit():
        return page("error.html", 400, status=400, message=_("This form has expired. Please try again."))
    try:
        if answer == "accept":
            booked = service.accept_offer(current.record, services(), waitlist_id)
            return redirect(url_for("portal.appointments_detail", appointment_id=booked["id"], done="accepted"))
        service.decline_offer(current.record, services(), waitlist_id)
    except service.AppointmentError as error:
        status = 409 if error.code in CONFLICTS else 400
        return page("error.html", status, status=status, message=_problem_text(error.code))
    return redirect(url_for("portal.appointments", done="declined"))


@home_section(30, "home_appointments.html")
def home_appointments(current: Visit) -> dict[str, Any] | None:
    upcoming, _past, _waitlist = service.record_appointments(current.record, _timing())
    return {"upcoming": upcoming[:3], "more": max(0, len(upcoming) - 3),
            "offers": service.open_offers(current.record), "form": CsrfForm()}
