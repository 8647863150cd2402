"""Patients and access (front desk): look a patient up, see the logins, sign-up codes and proxy
relationships of their record, issue a sign-up code, reset a login's second factor after an
identity check, set up and end proxy access. The work is in gateway.admin.patients."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from flask import Response, flash, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import DateField, SelectField, SelectMultipleField, StringField
from wtforms.validators import DataRequired, Length, Optional

from gateway.admin import patients as service
from gateway.admin.web import address, area, audit, bp, current_staff, error_page, nav_item, page, services
from gateway.portal.pages.sharing import relationship_label
from gateway.portal.record import NotVisible
from gateway.smart_auth.people import ACTIVATION_DAYS

nav_item(40, "patients", "admin.patients", _l("Patients and access"))

CHECK_LABELS = {
    "photo-id": _l("Photo ID seen"),
    "birth-date": _l("Date of birth confirmed"),
    "address": _l("Address confirmed"),
    "security-question": _l("Answered a security question"),
}
CHANNEL_LABELS = {"email": _l("Email"), "sms": _l("Text message (SMS)")}


class LookupForm(FlaskForm):
    class Meta:
        csrf = False  # a GET search changes nothing

    name = StringField(_l("Name"), validators=[Optional(), Length(max=service.NAME_MAX, message=_l(
        "A name has at most 100 characters."))])
    mrn = StringField(_l("MRN"), validators=[Optional(), Length(max=service.MRN_MAX, message=_l(
        "An MRN has at most 64 characters."))])
    birthdate = DateField(_l("Date of birth"), validators=[Optional()])


class CodeForm(FlaskForm):
    send = SelectField(_l("Also send it"), choices=[("", "")] + [(c, c) for c in service.CHANNELS],
                       validate_choice=False, validators=[Optional()])


class MfaResetForm(FlaskForm):
    username = StringField(validators=[DataRequired(_l("Choose the login."))])
    checks = SelectMultipleField(_l("Identity checks made"), choices=list(CHECK_LABELS.items()),
                                 validate_choice=False)


class GrantForm(FlaskForm):
    username = StringField(_l("Their username in the portal"), validators=[
        DataRequired(_l("Enter the parent's or guardian's username.")),
        Length(max=64, message=_l("A username has at most 64 characters."))])
    relationship = SelectField(_l("They are the patient's"), choices=[(c, c) for c in service.RELATIONSHIPS],
                               validate_choice=False, validators=[DataRequired(_l("Choose the relationship."))])
    until = DateField(_l("Access ends after (optional)"), validators=[Optional()])


class EndForm(FlaskForm):
    username = StringField(validators=[DataRequired()])


def refusal(code: str) -> str:
    return {
        "no-criteria": _("Enter a name, an MRN or a date of birth."),
        "too-long": _("A name has at most 100 characters and an MRN at most 64."),
        "no-address": _("The record has no address for that, or sending that way is not set up here."),
        "not-this-login": _("That login does not belong to this record."),
        "staff-login": _("That is a staff login; ask a security officer to reset it."),
        "no-mfa": _("That login does not use two-step verification."),
        "unknown-check": _("Choose the checks from the list."),
        "too-few-checks": _("Confirm the person's identity with at least two checks before resetting two-step "
                            "verification."),
        "relationship": _("Choose one of the relationships listed."),
        "past": _("The end date cannot be in the past."),
        "unknown-user": _("There is no portal login with that username. Ask the person for the username they "
                          "sign in with, or give them a sign-up code for their own record first."),
        "not-a-patient-login": _("That login has no patient record of its own; a proxy needs a portal login."),
        "self": _("A patient's own login sees their record without proxy access."),
        "duplicate": _("That login already has access to this record."),
        "not-a-proxy": _("That login does not have access to this record."),
    }.get(code, _("That could not be done."))


def relationships() -> list[tuple[str, str]]:
    return [(code, f"{relationship_label(code)} ({code})") for code in service.RELATIONSHIPS]


def _first_error(form: FlaskForm) -> str:
    for name, errors in form.errors.items():
        if errors:
            if name in ("until", "birthdate"):
                return _("Enter the date as year-month-day, for example 2015-03-31.")
            return str(errors[0])
    return _("Please check the form.")


def _ms_date(ms: int | None) -> str:
    """An instant in ms as an ISO UTC time (pages show it in the clinic's zone with portal_datetime)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else ""


@bp.get("/patients")
@area("patients")
def patients() -> Response:
    form = LookupForm(request.args)
    asked = any(request.args.get(k) for k in ("name", "mrn", "birthdate"))
    error, found = None, None
    if asked:
        if not form.validate():
            error = _first_error(form)
        else:
            try:
                found = service.find_patients(services(), current_staff().principal(), name=form.name.data or "",
                                              mrn=form.mrn.data or "", birth_date=form.birthdate.data,
                                              address=address())
            except service.DeskError as exc:
                error = refusal(exc.code)
    return page("patients.html", 400 if error else 200, form=form, found=found, error=error)


def _render(patient_id: str, http_status: int = 200, error: str | None = None, **forms: Any) -> Response:
    try:
        file = service.patient_file(services(), current_staff().principal(), patient_id, address())
    except NotVisible:
        return error_page(404, _("There is no patient with that id."))
    audit("view-patient-access", entities=(f"Patient/{patient_id}",),
          description="logins, sign-up codes and proxy relationships")
    values = {"code_form": CodeForm(formdata=None), "mfa_form": MfaResetForm(formdata=None),
              "grant_form": GrantForm(formdata=None), "end_form": EndForm(formdata=None), **forms}
    return page("patients_record.html", http_status, file=file, error=error,
                channels=service.channels_available(services(), file.addresses), check_labels=CHECK_LABELS,
                channel_labels=CHANNEL_LABELS, relationships=relationships(), label=relationship_label,
                ms_date=_ms_date, now_ms=int(datetime.now(UTC).timestamp() * 1000), days=ACTIVATION_DAYS,
                today=date.today().isoformat(), **values)


@bp.get("/patients/<patient_id>")
@area("patients")
def patients_record(patient_id: str) -> Response:
    return _render(patient_id)


def _refused(patient_id: str, action: str, exc: service.DeskError, **forms: Any) -> Response:
    audit(action, entities=(f"Patient/{patient_id}",), outcome="4", description=f"refused: {exc.code}")
    return _render(patient_id, 400, error=refusal(exc.code), **forms)


@bp.post("/patients/<patient_id>/activation-code")
@area("patients")
def patients_code(patient_id: str) -> Response:
    form = CodeForm()
    if not form.validate_on_submit():
        return _render(patient_id, 400, error=_first_error(form), code_form=form)
    try:
        sent = service.issue_code(services(), current_staff().principal(), patient_id, address(),
                                  send=form.send.data or None)
    except NotVisible:
        return error_page(404, _("There is no patient with that id."))
    except service.DeskError as exc:
        return _refused(patient_id, "create-activation-code", exc, code_form=form)
    how = f"; sent by {sent.channel} to {sent.address}" if sent.channel and not sent.send_error else \
        f"; sending by {sent.channel} failed" if sent.channel else ""
    audit("create-activation-code", entities=(f"Patient/{patient_id}",),
          description=f"sign-up code issued, valid until {_ms_date(sent.expires_ms)}{how}")
    # Shown on this response only: the code is not in the URL, the session or any log.
    return page("patients_code.html", sent=sent, patient_id=patient_id, until=_ms_date(sent.expires_ms),
                channel_labels=CHANNEL_LABELS, signup_url=f"{services().settings.base_url}/auth/signup")


@bp.post("/patients/<patient_id>/mfa-reset")
@area("patients")
def patients_mfa_reset(patient_id: str) -> Response:
    form = MfaResetForm()
    if not form.validate_on_submit():
        return _render(patient_id, 400, error=_first_error(form), mfa_form=form)
    try:
        checks = service.reset_mfa(services(), patient_id, form.username.data or "", list(form.checks.data or []))
    except service.DeskError as exc:
        return _refused(patient_id, "delete-mfa", exc, mfa_form=form)
    username = (form.username.data or "").strip()
    audit("delete-mfa", entities=(f"Patient/{patient_id}",),
          description=f"two-step verification reset for login {username} after identity checks: "
                      f"{', '.join(checks)}; signed out everywhere")
    flash(_("Two-step verification is off for %(username)s and every session of that login has ended. They can "
            "sign in with their password and set it up again under Profile.", username=username), "ok")
    return redirect(url_for("admin.patients_record", patient_id=patient_id))


@bp.post("/patients/<patient_id>/proxies")
@area("patients")
def patients_grant(patient_id: str) -> Response:
    form = GrantForm()
    if not form.validate_on_submit():
        return _render(patient_id, 400, error=_first_error(form), grant_form=form)
    try:
        granted = service.grant_proxy(services(), current_staff().principal(), patient_id, address(),
                                      form.username.data or "", form.relationship.data or "", form.until.data)
    except NotVisible:
        return error_page(404, _("There is no patient with that id."))
    except service.DeskError as exc:
        return _refused(patient_id, "create-proxy", exc, grant_form=form)
    audit("create-proxy", entities=(f"Patient/{patient_id}", granted.consent, granted.related_person),
          description=f"proxy access for login {granted.username} as {granted.relationship}, "
                      f"until {granted.valid_until or 'ended'}")
    if granted.capped:
        message = _("Proxy access set up for %(username)s. It ends on %(until)s, the day before the patient's 18th "
                    "birthday.", username=granted.username, until=granted.valid_until)
    elif granted.valid_until:
        message = _("Proxy access set up for %(username)s until %(until)s.", username=granted.username,
                    until=granted.valid_until)
    else:
        message = _("Proxy access set up for %(username)s, with no end date.", username=granted.username)
    flash(message, "ok")
    return redirect(url_for("admin.patients_record", patient_id=patient_id))


@bp.post("/patients/<patient_id>/proxies/end")
@area("patients")
def patients_end(patient_id: str) -> Response:
    form = EndForm()
    if not form.validate_on_submit():
        return _render(patient_id, 400, error=refusal("not-a-proxy"))
    username = (form.username.data or "").strip()
    try:
        consents = service.end_proxy(services(), patient_id, username)
    except service.DeskError as exc:
        return _refused(patient_id, "delete-proxy", exc)
    audit("delete-proxy", entities=(f"Patient/{patient_id}", *consents),
          description=f"proxy access ended for login {username}")
    flash(_("Proxy access ended for %(username)s, at once.", username=username), "ok")
    return redirect(url_for("admin.patients_record", patient_id=patient_id))
