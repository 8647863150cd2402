"""FHIR resources in the console: open one by type and id, see a version as stored and its history.

Where the console names a resource (what an HL7 message wrote, a patient), it links here."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from markupsafe import Markup, escape
from wtforms import StringField
from wtforms.validators import DataRequired, Regexp, ValidationError

from gateway.admin import messages as message_service
from gateway.admin import resources as service
from gateway.admin.web import area, audit, bp, current_staff, nav_item, page, services
from gateway.fhir.outcome import FhirError
from gateway.fhir.validate import ID_RE, is_resource_type
from gateway.smart_auth.views import first_error

nav_item(70, "resources", "admin.resources", _l("FHIR resources"))

# "reference": "Type/id" in the escaped, pretty-printed JSON (markupsafe writes " as &#34;)
_REFERENCE = re.compile(r"(&#34;reference&#34;: &#34;)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(&#34;)")


def linked_json(pretty: str) -> Markup:
    """The JSON, escaped, with each local reference a link to that resource's page."""
    def link(match: re.Match[str]) -> str:
        rtype, rid = match[2], match[3]
        if not is_resource_type(rtype):
            return match[0]
        href = escape(url_for("admin.resources_view", rtype=rtype, rid=rid))
        return f'{match[1]}<a href="{href}">{rtype}/{rid}</a>{match[4]}'
    return Markup(_REFERENCE.sub(link, str(escape(pretty))))


class OpenForm(FlaskForm):
    class Meta:
        csrf = False  # a GET form that only finds a page

    resource_type = StringField(_l("Resource type"), filters=[lambda v: v.strip() if isinstance(v, str) else v],
                                validators=[DataRequired(_l("Enter a resource type, for example Patient."))])
    resource_id = StringField(_l("Id"), filters=[lambda v: v.strip() if isinstance(v, str) else v], validators=[
        DataRequired(_l("Enter the resource's id.")),
        Regexp(ID_RE.pattern, message=_l("An id has 1 to 64 letters, digits, dashes and dots."))])

    def validate_resource_type(self, field: StringField) -> None:
        if field.data and not is_resource_type(field.data):
            raise ValidationError(_("%(type)s is not a FHIR resource type.", type=field.data))


@bp.get("/resources")
@area("resources")
def resources() -> Response:
    form = OpenForm(request.args)
    if request.args:
        if form.validate():
            return redirect(url_for("admin.resources_view", rtype=form.resource_type.data,
                                    rid=form.resource_id.data))
        return page("resources.html", 400, form=form, error=first_error(form))
    return page("resources.html", form=form, error=None)


def _show(rtype: str, rid: str, version: int | None) -> Response:
    staff = current_staff()
    try:
        view = service.read(services(), staff.principal(), rtype, rid, version)
    except FhirError as exc:
        if exc.status == 403:  # a refused look is recorded as well
            audit("view-resource", entities=(f"{rtype}/{rid}",), outcome="4", description=exc.diagnostics)
        raise
    audit("view-resource", entities=(view.reference,), contents=(view.content,),
          description=f"{view.reference} version {view.version_id}")
    writers: list[Any] = []
    if staff.may("messages"):
        writers = message_service.written_by(services().engine, rtype, rid)
    return page("resources_view.html", view=view, body=linked_json(view.pretty), writers=writers)


@bp.get("/resources/<rtype>/<rid>")
@area("resources")
def resources_view(rtype: str, rid: str) -> Response:
    return _show(rtype, rid, None)


@bp.get("/resources/<rtype>/<rid>/_history/<int:version>")
@area("resources")
def resources_version(rtype: str, rid: str, version: int) -> Response:
    return _show(rtype, rid, version)
