"""Sharing: who has access to this record, whose records I act for; an adult grants and revokes
caregivers on their own record."""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import DateField, SelectField, StringField
from wtforms.validators import DataRequired, Length, Optional

from gateway.portal import sharing as service
from gateway.portal.web import bp, nav_item, page, services, visit

nav_item(70, "portal.sharing", _l("Sharing"))

RELATIONSHIPS = {
    "SPS": _l("Spouse"), "DOMPART": _l("Domestic partner"), "CHILD": _l("Son or daughter"),
    "SIB": _l("Brother or sister"), "PRN": _l("Parent"), "GRNDCHILD": _l("Grandchild"),
    "FAMMEMB": _l("Other family member"), "FRND": _l("Friend"), "NBOR": _l("Neighbour"),
    "MTH": _l("Mother"), "FTH": _l("Father"), "GUARD": _l("Guardian"), "CAREGIVER": _l("Caregiver"),
    "DAU": _l("Daughter"), "SON": _l("Son"),
}


def relationship_label(code: str | None) -> str:
    if not code:
        return ""
    label = RELATIONSHIPS.get(code)
    return str(label) if label is not None else code


class GrantForm(FlaskForm):
    username = StringField(_l("Their username in this portal"), validators=[
        DataRequired(_l("Enter the caregiver's username.")),
        Length(max=64, message=_l("A username has at most 64 characters."))])
    relationship = SelectField(_l("They are your"), choices=[(c, RELATIONSHIPS[c]) for c in service.GRANTABLE],
                               validate_choice=False,
                               validators=[DataRequired(_l("Choose how this person is related to you."))])
    until = DateField(_l("Access ends after (optional)"), validators=[Optional()],
                      render_kw={"aria-describedby": "until-hint"})


class RevokeForm(FlaskForm):
    username = StringField(validators=[DataRequired()])


def refusal_message(code: str) -> str:
    return {
        "proxy": _("You are acting for someone else. Only a person can share their own record; for changes to "
                   "who may see this record, please contact the practice."),
        "minor": _("Access to a child's record is set up by the practice; please contact the office to add or "
                   "remove a caregiver."),
        "unknown-age": _("We cannot tell from the record whether this person is an adult; please contact the "
                         "practice."),
        "relationship": _("Choose one of the relationships listed."),
        "past": _("The end date cannot be in the past."),
        "unknown-user": _("There is no login with that username. Ask the person for the username they sign in "
                          "with."),
        "self": _("You cannot give access to yourself."),
        "duplicate": _("That person already has access to your record."),
        "not-a-proxy": _("That person does not have access to your record."),
    }.get(code, _("We could not do that."))


def _render(grant_form: GrantForm, error: str | None = None, done: str | None = None) -> Response:
    current = visit()
    refusal = service.may_grant(current)
    return page("sharing.html", 200 if error is None else 400, grant_form=grant_form, revoke_form=RevokeForm(),
                proxies=service.proxies_of(services(), current), acting=service.acting_for(current),
                may_grant=refusal is None, refusal=refusal_message(refusal) if refusal else None,
                error=error, done=done, label=relationship_label, today=date.today().isoformat())


@bp.get("/sharing")
def sharing() -> Response:
    done = {"granted": _("Access granted. They can see your record from their next page."),
            "revoked": _("Access ended. They can no longer see your record.")}.get(request.args.get("done", ""))
    return _render(GrantForm(), done=done)


@bp.post("/sharing/grant")
def sharing_grant() -> Response:
    form = GrantForm()
    if not form.validate_on_submit():
        return _render(form, error=_first_error(form))
    try:
        service.grant(services(), visit(), form.username.data or "", form.relationship.data or "", form.until.data)
    except service.SharingError as exc:
        return _render(form, error=refusal_message(exc.code))
    return redirect(url_for("portal.sharing", done="granted"))


@bp.post("/sharing/revoke")
def sharing_revoke() -> Response:
    form = RevokeForm()
    if not form.validate_on_submit():
        return _render(GrantForm(formdata=None), error=refusal_message("not-a-proxy"))
    try:
        service.revoke(services(), visit(), form.username.data or "")
    except service.SharingError as exc:
        return _render(GrantForm(formdata=None), error=refusal_message(exc.code))
    return redirect(url_for("portal.sharing", done="revoked"))


def _first_error(form: Any) -> str:
    for name, errors in form.errors.items():
        if errors:
            if name == "until":
                return _("Enter the end date as a date (year-month-day).")
            return str(errors[0])
    return _("Please check the form.")
