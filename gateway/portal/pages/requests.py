"""Requests to staff: a copy of the medical record, a correction to the chart, and their status."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import lazy_gettext
from flask_wtf import FlaskForm
from wtforms import Field, RadioField, SelectField, SelectMultipleField, StringField, TextAreaField, widgets
from wtforms.validators import DataRequired, Length, Optional, ValidationError

from gateway.portal import context
from gateway.portal import staff_requests as service
from gateway.portal.pages.messages import author_of
from gateway.portal.web import bp, nav_item, page, services, visit

nav_item(70, "portal.requests", lazy_gettext("Requests"))

PARTS = {"whole-record": lazy_gettext("My whole record"), "visit-notes": lazy_gettext("Visit notes"),
         "test-results": lazy_gettext("Test results"), "medications": lazy_gettext("Medications"),
         "immunizations": lazy_gettext("Immunizations"), "imaging": lazy_gettext("Imaging reports"),
         "billing": lazy_gettext("Billing records")}
DELIVERIES = {"portal": lazy_gettext("In the portal (a download)"), "mail": lazy_gettext("By mail"),
              "email": lazy_gettext("By email")}
SECTIONS = {"demographics": lazy_gettext("Personal details (name, address, birth date)"),
            "allergies": lazy_gettext("Allergies"), "medications": lazy_gettext("Medications"),
            "problems": lazy_gettext("Health problems"), "test-results": lazy_gettext("Test results"),
            "visit-notes": lazy_gettext("Visit notes"), "immunizations": lazy_gettext("Immunizations"),
            "other": lazy_gettext("Something else")}
KINDS = {service.RECORDS_COPY: lazy_gettext("Copy of medical records"),
         service.CHART_CORRECTION: lazy_gettext("Correction to the chart")}
STATUSES = {"draft": lazy_gettext("Draft"), "requested": lazy_gettext("Received"),
            "received": lazy_gettext("Received"), "accepted": lazy_gettext("Accepted"),
            "in-progress": lazy_gettext("In progress"), "on-hold": lazy_gettext("On hold"),
            "ready": lazy_gettext("Ready"), "completed": lazy_gettext("Completed"),
            "rejected": lazy_gettext("Declined"), "cancelled": lazy_gettext("Cancelled"),
            "failed": lazy_gettext("Could not be completed"), "entered-in-error": lazy_gettext("Withdrawn")}
DETAILS = {"part": lazy_gettext("Part of the record"), "period-start": lazy_gettext("From"),
           "period-end": lazy_gettext("To"), "delivery": lazy_gettext("Delivery"),
           "mail-address": lazy_gettext("Mailing address"), "email-address": lazy_gettext("Email address"),
           "note": lazy_gettext("Note"), "chart-section": lazy_gettext("Part of the chart"),
           "what-is-wrong": lazy_gettext("What is wrong"), "should-say": lazy_gettext("What it should say")}
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
EARLIEST = date(1900, 1, 1)


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _date(field: Field) -> date | None:
    if not field.data:
        return None
    try:
        return date.fromisoformat(field.data)
    except ValueError:
        raise ValidationError(lazy_gettext("Enter the date as YYYY-MM-DD.")) from None


class RecordsForm(FlaskForm):
    parts = SelectMultipleField(lazy_gettext("Which parts of the record"), choices=list(PARTS.items()),
                                validate_choice=False, option_widget=widgets.CheckboxInput(),
                                widget=widgets.ListWidget(prefix_label=False))
    date_from = StringField(lazy_gettext("From (optional)"), filters=[_strip])
    date_to = StringField(lazy_gettext("To (optional)"), filters=[_strip])
    delivery = RadioField(lazy_gettext("How would you like to receive it"), choices=list(DELIVERIES.items()),
                          validate_choice=False)
    mail_address = TextAreaField(lazy_gettext("Mailing address"), filters=[_strip], validators=[
        Length(max=500, message=lazy_gettext("The address can be at most 500 characters."))])
    email = StringField(lazy_gettext("Email address"), filters=[_strip], validators=[
        Length(max=254, message=lazy_gettext("The email address can be at most 254 characters."))])
    note = TextAreaField(lazy_gettext("Anything else staff should know (optional)"), filters=[_strip], validators=[
        Optional(), Length(max=service.TEXT_MAX, message=lazy_gettext("The note can be at most 2,000 characters."))])

    def validate_parts(self, field: Field) -> None:
        if not field.data:
            raise ValidationError(lazy_gettext("Choose at least one part of the record."))
        if any(p not in PARTS for p in field.data):
            raise ValidationError(lazy_gettext("Choose parts of the record from the list."))

    def validate_date_from(self, field: Field) -> None:
        start = _date(field)
        if start is not None and start < EARLIEST:
            raise ValidationError(lazy_gettext("The start date is too far in the past."))
        if start is not None and start > date.today():
            raise ValidationError(lazy_gettext("The start date cannot be in the future."))

    def validate_date_to(self, field: Field) -> None:
        end = _date(field)
        if end is None:
            return
        if end > date.today():
            raise ValidationError(lazy_gettext("The end date cannot be in the future."))
        try:
            start = _date(self.date_from)
        except ValidationError:
            return
        if start is not None and end < start:
            raise ValidationError(lazy_gettext("The end date must be on or after the start date."))

    def validate_delivery(self, field: Field) -> None:
        if field.data not in DELIVERIES:
            raise ValidationError(lazy_gettext("Choose how you would like to receive the copy."))

    def validate_mail_address(self, field: Field) -> None:
        if self.delivery.data == "mail" and not field.data:
            raise ValidationError(lazy_gettext("Enter the mailing address for the copy."))

    def validate_email(self, field: Field) -> None:
        if self.delivery.data == "email":
            if not field.data:
                raise ValidationError(lazy_gettext("Enter the email address for the copy."))
            if not EMAIL.match(field.data):
                raise ValidationError(lazy_gettext("Enter a valid email address, like name@example.com."))


class CorrectionForm(FlaskForm):
    section = SelectField(lazy_gettext("Which part of the chart"),
                          choices=[("", lazy_gettext("Choose a part of the chart")), *SECTIONS.items()],
                          validate_choice=False)
    wrong = TextAreaField(lazy_gettext("What is wrong"), filters=[_strip], validators=[
        DataRequired(lazy_gettext("Say what is wrong in the chart.")),
        Length(max=service.TEXT_MAX, message=lazy_gettext("This can be at most 2,000 characters."))])
    should_say = TextAreaField(lazy_gettext("What it should say"), filters=[_strip], validators=[
        DataRequired(lazy_gettext("Say what the chart should say instead.")),
        Length(max=service.TEXT_MAX, message=lazy_gettext("This can be at most 2,000 characters."))])

    def validate_section(self, field: Field) -> None:
        if field.data not in SECTIONS:
            raise ValidationError(lazy_gettext("Choose a part of the chart from the list."))


def _requester(current: context.Visit) -> service.Requester:
    author = author_of(current)
    return service.Requester(author.reference, author.name)


@bp.get("/requests")
def requests() -> Response:
    current = visit()
    return page("requests.html", items=service.requests_of(current.record), kinds=KINDS, statuses=STATUSES,
                details=DETAILS, labels={**PARTS, **DELIVERIES, **SECTIONS}, made=request.args.get("made"))


@bp.route("/requests/records", methods=["GET", "POST"])
def requests_records() -> Response:
    current = visit()
    form = RecordsForm()
    if request.method == "GET":
        form.delivery.data = "portal"
        return page("requests_records.html", form=form)
    if not form.validate_on_submit():
        return page("requests_records.html", 400, form=form)
    created = service.request_records_copy(
        current.record, _requester(current), services().settings.portal_staff_organization, form.parts.data,
        _date(form.date_from), _date(form.date_to), form.delivery.data, form.mail_address.data or None,
        form.email.data or None, form.note.data or None)
    return redirect(url_for("portal.requests", made=created["id"]))


@bp.route("/requests/correction", methods=["GET", "POST"])
def requests_correction() -> Response:
    current = visit()
    form = CorrectionForm()
    if request.method == "GET":
        return page("requests_correction.html", form=form)
    if not form.validate_on_submit():
        return page("requests_correction.html", 400, form=form)
    created = service.request_correction(current.record, _requester(current),
                                         services().settings.portal_staff_organization, form.section.data,
                                         form.wrong.data, form.should_say.data)
    return redirect(url_for("portal.requests", made=created["id"]))
