"""HL7 message browser: the list with its filters, one message, reprocess and set aside."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from flask import Response, flash, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel import ngettext
from flask_wtf import FlaskForm
from wtforms import DateField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, ValidationError

from gateway.admin import messages as service
from gateway.admin.web import area, audit, bp, current_staff, error_page, nav_item, page, services
from gateway.portal.web import safe_next
from gateway.smart_auth.views import first_error

nav_item(10, "messages", "admin.messages", _l("HL7 messages"))

LIST_PATH_PREFIX = "/admin/messages"


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _status_labels() -> dict[str, str]:
    """Each status in the page's language (looked up once a page: a list shows fifty rows)."""
    return {"received": _("received"), "processed": _("processed"), "failed": _("failed"),
            "duplicate": _("duplicate"), "ignored": _("ignored")}


def _status_label(status: str) -> str:
    return _status_labels().get(status, status)


class FilterForm(FlaskForm):
    """The list's filters (a GET form: searching changes nothing, so no CSRF token)."""

    class Meta:
        csrf = False

    control_id = StringField(_l("Control id (MSH-10)"), filters=[_strip], validators=[
        Length(max=service.FILTER_MAX, message=_l("The control id can be at most 255 characters."))])
    sender = StringField(_l("Sending application (MSH-3)"), filters=[_strip], validators=[
        Length(max=service.FILTER_MAX, message=_l("The sending application can be at most 255 characters."))])
    message_type = StringField(_l("Message type (MSH-9)"), filters=[_strip], validators=[
        Length(max=service.FILTER_MAX, message=_l("The message type can be at most 255 characters."))])
    mrn = StringField(_l("Patient MRN"), filters=[_strip], validators=[
        Length(max=service.FILTER_MAX, message=_l("The MRN can be at most 255 characters."))])
    status = SelectField(_l("Status"), validate_choice=False)  # choices: in __init__, in the page's language
    received_from = DateField(_l("Received from"), validators=[Optional()])
    received_to = DateField(_l("Received to"), validators=[Optional()])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        labels = _status_labels()
        self.status.choices = [("", _("Any"))] + [(s, labels[s]) for s in service.STATUSES]

    def validate_status(self, field: SelectField) -> None:
        if field.data and field.data not in service.STATUSES:
            raise ValidationError(_("Choose a status from the list."))

    def filters(self) -> service.Filters:
        return service.Filters(control_id=self.control_id.data or "", sender=self.sender.data or "",
                               message_type=self.message_type.data or "", mrn=self.mrn.data or "",
                               status=self.status.data or "", received_from=self.received_from.data,
                               received_to=self.received_to.data)


class IgnoreForm(FlaskForm):
    reason = TextAreaField(_l("Reason"), filters=[_strip], validators=[
        DataRequired(_l("Write why this message is set aside.")),
        Length(max=service.REASON_MAX, message=_l("The reason can be at most 500 characters."))])


class ActionForm(FlaskForm):
    """A button whose form carries only the CSRF token."""


def _date_error(form: FilterForm) -> None:
    for name in ("received_from", "received_to"):
        field = getattr(form, name)
        if field.errors:
            field.errors = [_("Enter the date as year-month-day, for example 2026-03-01.")]


def _list_url(filters: service.Filters, cursor: str | None = None) -> str:
    query = filters.query() + ([("after", cursor)] if cursor else [])
    return url_for("admin.messages") + (f"?{urlencode(query)}" if query else "")


@bp.app_template_filter("message_time")
def message_time(value: datetime) -> str:
    """A receipt time (already in the clinic's zone) to the second, the same in every language:
    operators match it against the senders' logs."""
    return value.strftime("%Y-%m-%d %H:%M:%S")


@bp.get("/messages")
@area("messages")
def messages() -> Response:
    form = FilterForm(request.args)
    filters = service.Filters()
    found: service.Page | None = None
    error: str | None = None
    status = 200
    if request.args and not form.validate():
        _date_error(form)
        error, status = first_error(form), 400
    else:
        try:
            filters = form.filters()
            found = service.find(services().engine, filters, request.args.get("after") or None,
                                 services().settings.timezone)
        except service.BadFilter as exc:
            form.received_from.errors = [_("The first day is after the last day.")] \
                if exc.what == "received_from" else [str(exc)]
            error, status = first_error(form), 400
        except service.BadCursor:
            error, status = _("This page link is not valid any more. Start again from the first page."), 400
    audit("search-messages", query=request.full_path.rstrip("?"), outcome="0" if status == 200 else "4")
    back = request.full_path.rstrip("?")
    return page("messages.html", status, form=form, found=found, error=error, filters=filters,
                next_url=_list_url(filters, found.next_cursor) if found and found.next_cursor else None,
                first_url=_list_url(filters) if request.args.get("after") else None,
                reprocessable=service.reprocessable_ids(found) if found else [], back=back,
                action_form=ActionForm(), status_labels=_status_labels(), back_query=urlencode({"back": back}),
                limit=service.REPROCESS_LIMIT, page_size=service.PAGE_SIZE)


def _back(default: str | None = None) -> str:
    """The list page the operator came from (only a console list URL, never elsewhere)."""
    target = safe_next(request.values.get("back"), default or url_for("admin.messages"))
    return target if target.startswith(LIST_PATH_PREFIX) else url_for("admin.messages")


def _detail_page(message_id: int, ignore_form: IgnoreForm | None = None, status: int = 200,
                 error: str | None = None) -> Response:
    detail = service.detail(services().engine, message_id, services().settings.timezone)
    audit("view-message", entities=(f"Patient/{detail.patient_id}",) if detail.patient_id else (),
          description=f"HL7 message {detail.id} {detail.message_type or ''} {detail.control_id or ''}".strip())
    return page("messages_detail.html", status, message=detail, ignore_form=ignore_form or IgnoreForm(),
                action_form=ActionForm(), error=error, back=_back(), status_label=_status_label,
                may_resources=current_staff().may("resources"))


@bp.get("/messages/<int:message_id>")
@area("messages")
def messages_detail(message_id: int) -> Response:
    try:
        return _detail_page(message_id)
    except service.NotFound:
        return error_page(404, _("There is no message %(id)s.", id=message_id))


def _reprocess_notice(results: list[service.Reprocessed]) -> None:
    for result in results:
        reference = (f"Patient/{result.patient_id}",) if result.patient_id else ()
        if result.status == "skipped":
            continue
        audit("execute-reprocess", entities=reference, outcome="4" if result.status == "failed" else "0",
              description=f"HL7 message {result.message_id}: {result.status}"
                          + (f" ({result.error})" if result.error else ""))
    done = [r for r in results if r.status != "skipped"]
    processed = sum(1 for r in done if r.status == "processed")
    failed = [r for r in done if r.status == "failed"]
    copies = [r for r in done if r.status == "duplicate"]
    skipped = len(results) - len(done)
    for copy in copies:
        # a message left received whose sender's copy was processed meanwhile
        flash(_("Message %(id)s is a copy of message %(of)s, which was processed: marked as its duplicate.",
                id=copy.message_id, of=copy.duplicate_of), "ok")
    if len(results) == 1 and done and not copies:
        if processed:
            flash(_("Message %(id)s was reprocessed: processed.", id=done[0].message_id), "ok")
        else:
            flash(_("Message %(id)s was reprocessed and failed again: %(error)s", id=done[0].message_id,
                    error=done[0].error or ""), "error")
        return
    applied = len(done) - len(copies)  # the duplicates have their own lines above
    if applied:
        flash(ngettext("Reprocessed %(num)d message: %(processed)s processed, %(failed)s failed.",
                       "Reprocessed %(num)d messages: %(processed)s processed, %(failed)s failed.", applied,
                       processed=processed, failed=len(failed)), "ok" if not failed else "error")
    if skipped:
        flash(ngettext("%(num)d message was left alone: only failed, ignored or stuck messages are reprocessed.",
                       "%(num)d messages were left alone: only failed, ignored or stuck messages are reprocessed.",
                       skipped), "error")


@bp.post("/messages/<int:message_id>/reprocess")
@area("messages")
def messages_reprocess(message_id: int) -> Response:
    try:
        results = service.reprocess(services().hl7, services().engine, [message_id])
    except service.NotFound:
        return error_page(404, _("There is no message %(id)s.", id=message_id))
    if results[0].status == "skipped" and results[0].error == service.TRUNCATED:
        flash(_("Only the start of this message was kept (it was over the maximum size), so it cannot be "
                "reprocessed; the sender must send it again."), "error")
    elif results[0].status == "skipped":
        flash(_("Only a failed, ignored or stuck message can be reprocessed."), "error")
    else:
        _reprocess_notice(results)
    back = request.form.get("back")
    return redirect(url_for("admin.messages_detail", message_id=message_id,
                            **({"back": back} if back else {})))


@bp.post("/messages/reprocess")
@area("messages")
def messages_reprocess_many() -> Response:
    back = _back()
    which = request.form.get("which", "selected")
    chosen = request.form.getlist("shown" if which == "shown" else "id")
    try:
        ids = service.parse_ids(chosen)
    except ValueError:
        flash(_("Choose messages from the list."), "error")
        return redirect(back)
    if not ids:
        flash(_("Choose at least one message to reprocess."), "error")
        return redirect(back)
    if len(set(ids)) > service.REPROCESS_LIMIT:
        flash(_("At most %(limit)s messages can be reprocessed at once.", limit=service.REPROCESS_LIMIT), "error")
        return redirect(back)
    try:
        results = service.reprocess(services().hl7, services().engine, ids)
    except service.NotFound as exc:
        flash(_("There is no message %(id)s.", id=exc.args[0]), "error")
        return redirect(back)
    _reprocess_notice(results)
    return redirect(back)


@bp.post("/messages/<int:message_id>/ignore")
@area("messages")
def messages_ignore(message_id: int) -> Response:
    form = IgnoreForm()
    try:
        if not form.validate_on_submit():
            return _detail_page(message_id, form, 400, first_error(form))
        try:
            patient_id = service.ignore(services().engine, message_id, form.reason.data)
        except service.NotAllowed as exc:
            return _detail_page(message_id, form, 409, _("Only a failed message can be set aside; this one is "
                                                         "%(status)s.", status=_status_label(exc.status)))
    except service.NotFound:
        return error_page(404, _("There is no message %(id)s.", id=message_id))
    audit("update-message", entities=(f"Patient/{patient_id}",) if patient_id else (),
          description=f"HL7 message {message_id} ignored: {form.reason.data}")
    flash(_("Message %(id)s is set aside as ignored.", id=message_id), "ok")
    back = request.form.get("back")
    return redirect(url_for("admin.messages_detail", message_id=message_id, **({"back": back} if back else {})))
