"""Messages: the threads with the care team, one thread, a new message, a reply."""

from __future__ import annotations

from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext
from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length

from gateway.portal import context
from gateway.portal import messages as service
from gateway.portal.web import bp, home_section, nav_item, page, services, visit
from gateway.smart_auth import launch

nav_item(40, "portal.messages", lazy_gettext("Messages"))


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _one_line(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value


class ComposeForm(FlaskForm):
    recipient = SelectField(lazy_gettext("To"), validate_choice=False,
                            validators=[DataRequired(lazy_gettext("Choose who the message is for."))])
    subject = StringField(lazy_gettext("Subject"), filters=[_one_line], validators=[
        DataRequired(lazy_gettext("Write a subject.")),
        Length(max=service.SUBJECT_MAX, message=lazy_gettext("The subject can be at most 120 characters."))])
    body = TextAreaField(lazy_gettext("Message"), filters=[_strip], validators=[
        DataRequired(lazy_gettext("Write your message.")),
        Length(max=service.BODY_MAX, message=lazy_gettext("The message can be at most 5,000 characters."))])
    private = BooleanField(lazy_gettext("Keep this conversation private: only you and your care team will see "
                                        "it, not a parent or guardian with access to your record"))


class ReplyForm(FlaskForm):
    body = TextAreaField(lazy_gettext("Your reply"), filters=[_strip], validators=[
        DataRequired(lazy_gettext("Write your reply.")),
        Length(max=service.BODY_MAX, message=lazy_gettext("The reply can be at most 5,000 characters."))])
    in_response_to = HiddenField()


def author_of(current: context.Visit) -> service.Author:
    """The login's fhirUser for this record: its Patient, or the RelatedPerson it acts as."""
    gateway = services()
    reference = launch.acting_as(gateway.smart, gateway.store, current.user, current.record.patient_id)
    name = next((c.name for c in current.choices if c.is_self), "") or current.user.username
    return service.Author(reference, name)


def _own(current: context.Visit, author: service.Author) -> set[str]:
    return {current.record.reference, author.reference, current.user.fhir_user}


def _threads(current: context.Visit, author: service.Author | None = None) -> list[service.Thread]:
    author = author or author_of(current)
    return service.threads(current.record, services().engine, current.user.id, _own(current, author))


@bp.get("/messages")
def messages() -> Response:
    current = visit()
    threads = _threads(current)
    return page("messages.html", threads=threads, unread=service.unread_total(threads))


def _compose_page(form: ComposeForm, team: list[service.Member], can_keep_private: bool,
                  status: int = 200) -> Response:
    return page("messages_new.html", status, form=form, team=team, can_keep_private=can_keep_private)


@bp.route("/messages/new", methods=["GET", "POST"])
def messages_new() -> Response:
    current = visit()
    team = service.care_team(current.record)
    can_keep_private = service.may_keep_private(current.record.read("Patient", current.record.patient_id),
                                                current.current.is_self)
    form = ComposeForm()
    form.recipient.choices = [("", _("Choose a member of the care team"))] + [
        (m.reference, f"{m.name} - {m.role}" if m.role else m.name) for m in team]
    if request.method == "GET":
        wanted = request.args.get("to")
        if wanted and any(m.reference == wanted for m in team):
            form.recipient.data = wanted
        return _compose_page(form, team, can_keep_private)
    valid = form.validate_on_submit()
    if form.private.data and not can_keep_private:
        form.private.errors = [_("Only a patient aged 12 to 17 writing in their own record can keep a "
                                 "conversation private.")]
        valid = False
    if not valid:
        return _compose_page(form, team, can_keep_private, 400)
    try:
        created = service.start_thread(current.record, author_of(current), current.current.name,
                                        form.recipient.data, form.subject.data, form.body.data, team,
                                        private=bool(form.private.data))
    except service.NotACareTeamMember:
        form.recipient.errors = [_("Choose a member of the care team listed.")]
        return _compose_page(form, team, can_keep_private, 400)
    return redirect(url_for("portal.messages_thread", thread_id=created["id"], sent=1))


@bp.route("/messages/<thread_id>", methods=["GET", "POST"])
def messages_thread(thread_id: str) -> Response:
    current = visit()
    author = author_of(current)
    threads = _threads(current, author)
    thread = service.find_thread(threads, thread_id)  # NotVisible: the friendly 404
    if thread.id != thread_id:
        return redirect(url_for("portal.messages_thread", thread_id=thread.id) + f"#m-{thread_id}")
    form = ReplyForm()
    if request.method == "POST":
        if not form.validate_on_submit():
            return page("messages_thread.html", 400, thread=thread, form=form)
        created = service.reply(current.record, author, current.current.name, thread, form.body.data,
                                 form.in_response_to.data or None,
                                 f"Organization/{services().settings.portal_staff_organization}")
        return redirect(url_for("portal.messages_thread", thread_id=thread.id, sent=1) + f"#m-{created['id']}")
    service.mark_read(services().engine, current.user.id, thread)
    form.in_response_to.data = next((m.id for m in reversed(thread.messages) if not m.own), thread.messages[-1].id)
    return page("messages_thread.html", thread=thread, form=form, sent=bool(request.args.get("sent")))


@bp.get("/messages/<thread_id>/documents/<document_id>")
def messages_document(thread_id: str, document_id: str) -> Response:
    current = visit()
    thread = service.find_thread(_threads(current), thread_id)
    data, content_type, name = service.document_of(current.record, thread, document_id)
    # always a download: a document's own HTML or script never runs on the portal's origin
    return Response(data, 200, headers={"Content-Type": content_type, "Cache-Control": "no-store",
                                        "Content-Disposition": f'attachment; filename="{name}"',
                                        "X-Content-Type-Options": "nosniff"})


@home_section(40, "home_messages.html")
def home_messages(current: context.Visit) -> dict[str, Any]:
    threads = _threads(current)
    return {"unread": service.unread_total(threads), "threads": threads[:3]}
