"""Notification preferences (/profile/notifications): per event, email, text message or nothing."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import SelectField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import AnyOf

from gateway.portal import context, notifications
from gateway.portal.record import NotVisible
from gateway.portal.web import bp, page, services, visit

CHANNEL_LABELS = (("email", _l("Email")), ("sms", _l("Text message (SMS)")), ("none", _l("Do not tell me")))
EVENT_LABELS: dict[str, Any] = {"new-result": _l("A new test result"), "new-message": _l("A new message"),
                                "appointment-reminder": _l("An appointment within the next day"),
                                "appointment-offer": _l("An earlier time for an appointment I am waiting for")}
BAD_CHANNEL = _l("Choose email, text message (SMS) or do not tell me.")


def _select(event: str) -> Any:
    return SelectField(EVENT_LABELS[event], name=event, validate_choice=False,
                       choices=[SelectChoice(value, label) for value, label in CHANNEL_LABELS],
                       validators=[AnyOf(notifications.CHANNELS, message=BAD_CHANNEL)])


class NotificationForm(FlaskForm):
    new_result = _select("new-result")
    new_message = _select("new-message")
    appointment_reminder = _select("appointment-reminder")
    appointment_offer = _select("appointment-offer")

    def fields(self) -> list[Any]:
        return [self.new_result, self.new_message, self.appointment_reminder, self.appointment_offer]

    def chosen(self) -> dict[str, str]:
        return {field.name: str(field.data) for field in self.fields()}


@bp.route("/profile/notifications", methods=["GET", "POST"])
def profile_notifications() -> Response:
    current = visit()
    engine = services().engine
    saved = notifications.preferences(engine, current.user.id)
    form = NotificationForm(data={k.replace("-", "_"): v for k, v in saved.items()})
    status, done, error = 200, False, None
    if request.method == "POST":
        form = NotificationForm()
        if form.validate_on_submit():
            notifications.save_preferences(engine, current.user.id, form.chosen())
            saved, done = form.chosen(), True
        else:
            status = 400
            error = "; ".join(f"{getattr(form, name).label.text}: {message}"
                              for name, messages in form.errors.items() for message in messages)
    own: dict[str, Any] | None = None
    if current.user.patient_id:
        try:
            own = context.record_for(services(), current.user, current.user.patient_id).read(
                "Patient", current.user.patient_id)
        except NotVisible:
            own = None
    known = notifications.addresses(own)
    sms_available = bool(services().settings.sms_url)
    return page("notifications.html", status, form=form, done=done, error=error, known=known,
                sms_available=sms_available, saved=saved)
