"""The audit log: search AuditEvents (newest first, a page at a time) and export a search as NDJSON or
CSV. Thin views over gateway.admin.audit; the search runs with the staff member's Principal, and the
searches and exports are themselves audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Response, request
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import RadioField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired

from gateway.admin import audit as service
from gateway.admin.web import area, audit, bp, current_staff, nav_item, page, services

nav_item(60, "audit", "admin.audit_log", _l("Audit log"))

MESSAGES = {
    "too-long": _l("That filter is too long."),
    "bad-patient": _l("Give the patient as its id or as Patient/ID, for example Patient/123."),
    "bad-action": _l("A one-letter action is one of C, R, U, D or E (create, read, update, delete, execute)."),
    "bad-from": _l("Enter the first day as a date (year-month-day)."),
    "bad-to": _l("Enter the last day as a date (year-month-day)."),
    "backwards": _l("The last day comes before the first day."),
    "bad-format": _l("Choose NDJSON or CSV."),
}
ACTIONS = ("read", "search-type", "create", "update", "delete", "history-instance", "operation", "view-client",
           "create-client", "update-client", "execute-disable-client", "execute-enable-client",
           "execute-rotate-secret", "execute-revoke-grant", "search-audit", "export-audit")


class ExportForm(FlaskForm):
    format = RadioField(choices=[SelectChoice("ndjson", "NDJSON"), SelectChoice("csv", "CSV")],
                        validators=[DataRequired()])


def message(error: service.FilterError) -> str:
    text = MESSAGES.get(error.code)
    return str(text) if text is not None else _("That search could not be run.")


@bp.get("/audit")
@area("audit")
def audit_log() -> Response:
    values = {k: request.args.get(k, "") for k in ("patient", "user", "client", "action", "from", "to")}
    if not request.args:
        # The first visit lists the last day's events: newest first over the whole log costs a sort of
        # every event (README, Operator console); clearing the field searches it all.
        values["from"] = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    try:
        filters = service.parse_filters(values)
    except service.FilterError as exc:
        return page("audit.html", 400, values=values, error=message(exc), found=None, actions=ACTIONS,
                    export=ExportForm(formdata=None), args={})
    cursor = request.args.get("cursor") or None
    found = service.find(services(), current_staff().principal(), filters, cursor=cursor)
    audit("search-audit", query=found.query, contents=found.contents)
    return page("audit.html", values=values, found=found, first=cursor is None, args=filters.args(), actions=ACTIONS,
                export=ExportForm(formdata=None))


@bp.post("/audit/export")
@area("audit")
def audit_log_export() -> Response:
    form = ExportForm()
    if not form.validate_on_submit():
        return page("error.html", 400, status=400, message=str(MESSAGES["bad-format"]))
    try:
        filters = service.parse_filters(request.form)
        query, chunks = service.export(services(), current_staff().principal(), filters, form.format.data or "")
    except service.FilterError as exc:
        return page("error.html", 400, status=400, message=message(exc))
    fmt = form.format.data or ""
    audit("export-audit", query=query, description=f"export as {fmt}",
          entities=(f"Patient/{filters.patient}",) if filters.patient else ())
    response = Response(chunks, mimetype=service.FORMATS[fmt])
    response.headers["Content-Disposition"] = f'attachment; filename="{service.filename(fmt, datetime.now(UTC))}"'
    response.headers["Cache-Control"] = "no-store"
    return response
