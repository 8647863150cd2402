"""Profile: contact details and language of the chosen record, linked apps, two-step verification,
sign out everywhere, and the record's access log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Response, redirect, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import HiddenField, SelectField, StringField
from wtforms.validators import DataRequired, Length, Optional, Regexp, ValidationError

from gateway.fhir.outcome import FhirError
from gateway.portal import i18n
from gateway.portal import profile as service
from gateway.portal.web import CsrfForm, bp, nav_item, page, services, visit
from gateway.smart_auth import people
from gateway.smart_auth.views import say

nav_item(80, "portal.profile", _l("Profile"))

PENDING_TOTP = "portal_totp_pending"
# The parts of a record as the access log names them (FHIR resource types, else the type itself).
PARTS = {"Patient": _l("personal details"), "RelatedPerson": _l("caregiver details"),
         "Observation": _l("results"), "DiagnosticReport": _l("reports"),
         "MedicationRequest": _l("medications"), "MedicationStatement": _l("medications"),
         "Appointment": _l("appointments"), "Communication": _l("messages"), "Task": _l("requests"),
         "Condition": _l("health problems"), "AllergyIntolerance": _l("allergies"),
         "Immunization": _l("immunizations"), "Encounter": _l("visits"), "Consent": _l("sharing"),
         "AuditEvent": _l("access log"), "DocumentReference": _l("documents"), "Procedure": _l("procedures")}


def part_label(resource_type: str) -> str:
    label = PARTS.get(resource_type)
    return str(label) if label is not None else resource_type
ISSUER = "Riverside MyChart"


def _phone(_form: Any, field: Any) -> None:
    problem = service.phone_problem(field.data or "") if field.data else None
    if problem == "chars":
        raise ValidationError(_("A phone number has only digits, spaces and ( ) + - ."))
    if problem == "digits":
        raise ValidationError(_("A phone number has 7 to 15 digits."))


class ContactForm(FlaskForm):
    version = HiddenField()
    phone = StringField(_l("Phone"), validators=[
        Optional(), Length(max=30, message=_l("A phone number has at most 30 characters.")), _phone])
    email = StringField(_l("Email"), validators=[
        Optional(), Length(max=254, message=_l("An email address has at most 254 characters.")),
        Regexp(service.EMAIL.pattern, message=_l("Enter an email address like name@example.org."))])
    line = StringField(_l("Street address"), validators=[
        Optional(), Length(max=200, message=_l("The street address has at most 200 characters."))])
    city = StringField(_l("City"), validators=[
        Optional(), Length(max=100, message=_l("The city has at most 100 characters."))])
    state = StringField(_l("State"), validators=[
        Optional(), Length(max=50, message=_l("The state has at most 50 characters."))])
    postal_code = StringField(_l("ZIP code"), validators=[
        Optional(), Length(max=20, message=_l("The ZIP code has at most 20 characters.")),
        Regexp(r"^[0-9A-Za-z \-]*$", message=_l("A ZIP code has only letters, digits, spaces and dashes."))])


class LanguageForm(FlaskForm):
    lang = SelectField(_l("Language"), choices=list(i18n.LANGUAGES.items()), validate_choice=False,
                       validators=[DataRequired(_l("Choose a language."))])

    def validate_lang(self, field: Any) -> None:
        if field.data not in i18n.LANGUAGES:
            raise ValidationError(_("Choose one of the languages listed."))


class OtpForm(FlaskForm):
    otp = StringField(_l("Code from your authenticator app"), validators=[
        DataRequired(_l("Enter the 6-digit code from your authenticator app.")),
        Regexp(r"^\s*\d{6}\s*$", message=_l("The code is 6 digits."))])


def _first_error(form: FlaskForm) -> str:
    for errors in form.errors.values():
        for error in errors:
            return str(error)
    return _("Please check the form.")


def _render(status: int = 200, contact_form: ContactForm | None = None, language_form: LanguageForm | None = None,
            otp_form: OtpForm | None = None, error: str | None = None, error_at: str | None = None,
            done: str | None = None) -> Response:
    current = visit()
    contact = service.contact_of(current)
    if contact_form is None:
        contact_form = ContactForm(formdata=None, obj=contact)
    if language_form is None:
        language_form = LanguageForm(formdata=None, lang=contact.language or i18n.select_locale())
    names = {c.patient_id: c.name for c in current.choices}
    apps = [{**app, "patient_name": names.get(app["patient_id"] or "", app["patient_id"]),
             "created": datetime.fromtimestamp(app["created_ms"] / 1000, UTC).isoformat()}
            for app in services().smart.apps_of(current.user.id)]
    pending = session.get(PENDING_TOTP)
    return page("profile.html", status, contact=contact, contact_form=contact_form, language_form=language_form,
                otp_form=otp_form or OtpForm(formdata=None), apps=apps, error=error, error_at=error_at, done=done,
                mfa_on=people.has_totp(services().engine, current.user.id),
                pending_secret=pending, pending_uri=people.totp_uri(pending, current.user.username, ISSUER)
                if pending else None)


DONE = {"contact": _l("Your contact details are saved."), "language": _l("Your language is saved."),
        "app": _l("The app's access has ended."), "mfa-on": _l("Two-step verification is on."),
        "mfa-off": _l("Two-step verification is off.")}


@bp.get("/profile")
def profile() -> Response:
    done = DONE.get(request.args.get("done", ""))
    return _render(done=str(done) if done else None)


@bp.post("/profile/contact")
def profile_contact() -> Response:
    form = ContactForm()
    if not form.validate_on_submit():
        return _render(400, contact_form=form, error=_first_error(form), error_at="contact")
    try:
        service.update_contact(visit(), form.version.data or "", (form.phone.data or "").strip(),
                               (form.email.data or "").strip(), (form.line.data or "").strip(),
                               (form.city.data or "").strip(), (form.state.data or "").strip(),
                               (form.postal_code.data or "").strip())
    except FhirError as exc:
        if exc.status == 412:
            fresh = ContactForm(formdata=None, obj=service.contact_of(visit()))
            return _render(409, contact_form=fresh, error_at="contact", error=_(
                "Someone else changed these details while you were editing them. The form now shows the "
                "current details; please make your change again."))
        raise
    return redirect(url_for("portal.profile", done="contact"))


@bp.post("/profile/language")
def profile_language() -> Response:
    form = LanguageForm()
    if not form.validate_on_submit():
        return _render(400, language_form=form, error=_first_error(form), error_at="language")
    service.set_language(visit(), form.lang.data)
    session["lang"] = form.lang.data
    return redirect(url_for("portal.profile", done="language"))


@bp.post("/profile/apps/revoke")
def profile_app_revoke() -> Response:
    form = CsrfForm()
    grant_id = request.form.get("grant_id", "")
    if not form.validate_on_submit() or not services().smart.revoke_app(visit().user.id, grant_id):
        return _render(400, error=_("That app is not one of yours."), error_at="apps")
    return redirect(url_for("portal.profile", done="app"))


@bp.post("/profile/mfa/start")
def profile_mfa_start() -> Response:
    if not CsrfForm().validate_on_submit():
        return _render(400, error=_("Please try again."), error_at="mfa")
    if people.has_totp(services().engine, visit().user.id):
        return _render(400, error=say("Two-step verification is already on"), error_at="mfa")
    session[PENDING_TOTP] = people.new_totp_secret()
    return redirect(url_for("portal.profile", _anchor="mfa"))


@bp.post("/profile/mfa/confirm")
def profile_mfa_confirm() -> Response:
    form = OtpForm()
    secret = session.get(PENDING_TOTP)
    if secret is None:
        return _render(400, error=say("Start the set-up again"), error_at="mfa")
    if not form.validate_on_submit():
        return _render(400, otp_form=form, error=_first_error(form), error_at="mfa")
    if services().smart.limiter.blocked(request.remote_addr or "?"):
        return _render(429, error=_("Too many failed attempts; please wait a few minutes."), error_at="mfa")
    try:
        people.enable_totp(services().engine, visit().user.id, secret, form.otp.data or "")
    except people.AuthError as exc:
        services().smart.limiter.failed(request.remote_addr or "?")
        return _render(400, otp_form=form, error=say(str(exc)), error_at="mfa")
    session.pop(PENDING_TOTP, None)
    return redirect(url_for("portal.profile", done="mfa-on"))


@bp.post("/profile/mfa/cancel")
def profile_mfa_cancel() -> Response:
    if CsrfForm().validate_on_submit():
        session.pop(PENDING_TOTP, None)
    return redirect(url_for("portal.profile"))


@bp.post("/profile/mfa/off")
def profile_mfa_off() -> Response:
    form = OtpForm()
    if not form.validate_on_submit():
        return _render(400, otp_form=form, error=_first_error(form), error_at="mfa")
    if services().smart.limiter.blocked(request.remote_addr or "?"):
        return _render(429, error=_("Too many failed attempts; please wait a few minutes."), error_at="mfa")
    try:
        people.disable_totp(services().engine, visit().user, form.otp.data or "")
    except people.AuthError as exc:
        services().smart.limiter.failed(request.remote_addr or "?")
        return _render(400, otp_form=form, error=say(str(exc)), error_at="mfa")
    return redirect(url_for("portal.profile", done="mfa-off"))


@bp.get("/profile/access-log")
def profile_access_log() -> Response:
    cursor = request.args.get("cursor") or None
    if visit().current.limited:
        # Who opened a teen's record, and which parts, is the teen's to know: a parent could read
        # from it which confidential care there is.
        return page("profile_access_log.html", log=None, first=True, part=part_label)
    try:
        log = service.access_log(services(), visit(), cursor)
    except FhirError as exc:
        if exc.status >= 500 or cursor is None:
            raise
        return page("error.html", 400, status=400, message=_("That page of the access log is not available; "
                                                              "start again from its first page."))
    return page("profile_access_log.html", log=log, first=cursor is None, part=part_label)
