"""SMART apps: the registered clients, their active grants, and the security officer's actions on them.
Thin views over gateway.admin.apps; every action is audited."""

from __future__ import annotations

from typing import Any

from flask import Response, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import HiddenField, RadioField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length

from gateway.admin import apps as service
from gateway.admin.web import area, audit, bp, nav_item, page, services

nav_item(40, "apps", "admin.apps", _l("SMART apps"))

KIND_LABELS = {
    "public": _l("Public (runs in a browser or on a phone; no secret, PKCE only)"),
    "confidential-symmetric": _l("Confidential with a client secret (runs on a server)"),
    "confidential-asymmetric": _l("Confidential with a key set (private_key_jwt; also backend services)"),
}
KIND_SHORT = {"public": _l("Public"), "confidential-symmetric": _l("Confidential, secret"),
              "confidential-asymmetric": _l("Confidential, key set")}
GRANTS_SHOWN = 200

MESSAGES = {
    "bad-kind": _l("Choose what kind of app this is."),
    "bad-client-id": _l("A client id has 1 to 128 letters, digits and . _ ~ : - and starts with a letter or digit."),
    "duplicate": _l("There is an app with the client id %(detail)s already. Choose another client id."),
    "no-name": _l("Give the app a name that people will recognise."),
    "long-name": _l("A name has at most 255 characters."),
    "no-redirect-uri": _l("Enter at least one redirect URI, one a line."),
    "too-many-redirect-uris": _l("An app has at most %(detail)s redirect URIs."),
    "bad-redirect-uri": _l("This is not a redirect URI an app can use: %(detail)s. Give an absolute http or "
                           "https address without a #fragment (or an app scheme like com.example.app:/callback)."),
    "bad-launch-url": _l("The launch URL must be an absolute http or https address: %(detail)s"),
    "bad-jwks-url": _l("The JWKS URL must be an absolute http or https address: %(detail)s"),
    "bad-scope": _l("These scopes are not SMART scopes this server knows: %(detail)s"),
    "system-scope": _l("system/ scopes are only for apps that sign in with a key set (backend services)."),
    "no-jwks": _l("An app with a key set needs a JWKS URL or a JWKS file."),
    "jwks-both": _l("Give either a JWKS URL or a JWKS file, not both."),
    "jwks-not-for-kind": _l("Only apps that sign in with a key set take a JWKS URL or file."),
    "jwks-too-large": _l("The JWKS file is larger than %(detail)s KB."),
    "bad-jwks": _l("The JWKS file cannot be used: %(detail)s."),
    "unknown-client": _l("There is no app with that client id."),
    "unknown-grant": _l("That authorization is not active any more (it was revoked or has expired)."),
    "no-secret": _l("Only confidential apps with a client secret have a secret to rotate."),
    "refused": _l("The app could not be registered: %(detail)s"),
}
DONE = {
    "updated": _l("The registration was saved."),
    "unchanged": _l("Nothing was changed."),
    "disabled": _l("The app is disabled. It gets no new tokens, and its tokens stopped working."),
    "enabled": _l("The app is enabled again."),
    "revoked": _l("The authorization was revoked. The app's tokens from it stopped working."),
}


def message(error: service.AppError) -> str:
    text = MESSAGES.get(error.code)
    return str(text) % {"detail": error.detail} if text is not None else _("That could not be done.")


class RegisterForm(FlaskForm):
    kind = RadioField(_l("Kind of app"), choices=[SelectChoice(value, label) for value, label in KIND_LABELS.items()],
                      validate_choice=False,  # the service says which kinds there are
                      validators=[DataRequired(_l("Choose what kind of app this is."))])
    client_id = StringField(_l("Client id"), validators=[DataRequired(_l("Enter a client id.")),
                                                         Length(max=128, message=_l("A client id has at most 128 "
                                                                                    "characters."))])
    name = StringField(_l("Name"), validators=[DataRequired(_l("Give the app a name that people will recognise."))])
    redirect_uris = TextAreaField(_l("Redirect URIs (one a line)"))
    scope = StringField(_l("Scopes the app may be granted (leave empty for the usual set)"))
    launch_url = StringField(_l("Launch URL (optional)"))
    jwks_url = StringField(_l("JWKS URL"))
    jwks_file = FileField(_l("or a JWKS file"))


class EditForm(FlaskForm):
    client_id = HiddenField(validators=[DataRequired()])
    name = StringField(_l("Name"), validators=[DataRequired(_l("Give the app a name that people will recognise."))])
    redirect_uris = TextAreaField(_l("Redirect URIs (one a line)"))
    scope = StringField(_l("Scopes the app may be granted"))
    launch_url = StringField(_l("Launch URL (optional)"))
    jwks_url = StringField(_l("JWKS URL"))
    jwks_file = FileField(_l("New JWKS file"))


class ClientForm(FlaskForm):
    client_id = HiddenField(validators=[DataRequired()])


class RevokeForm(FlaskForm):
    client_id = HiddenField(validators=[DataRequired()])
    grant_id = HiddenField(validators=[DataRequired()])


def _first_error(form: FlaskForm) -> str:
    for errors in form.errors.values():
        for error in errors:
            return str(error)
    return _("Please check the form.")


def _upload(field: Any) -> bytes | None:
    data = field.data
    if data is None or not getattr(data, "filename", ""):
        return None
    return bytes(data.read(service.MAX_JWKS_BYTES + 1))


def _client_id() -> str:
    return (request.form.get("client_id") or "").strip()


@bp.get("/apps")
@area("apps")
def apps() -> Response:
    return page("apps.html", apps=service.list_apps(services().engine), kinds=KIND_SHORT)


@bp.route("/apps/new", methods=["GET", "POST"])
@area("apps")
def apps_new() -> Response:
    form = RegisterForm()
    if request.method == "GET":
        return page("apps_new.html", form=form)
    if not form.validate_on_submit():
        return page("apps_new.html", 400, form=form, error=_first_error(form))
    try:
        done = service.register(services().engine, kind=form.kind.data or "", client_id=form.client_id.data or "",
                                name=form.name.data or "", redirect_uris=form.redirect_uris.data or "",
                                scope=form.scope.data or "", launch_url=form.launch_url.data or "",
                                jwks_url=form.jwks_url.data or "", jwks_file=_upload(form.jwks_file))
    except service.AppError as exc:
        return page("apps_new.html", 400, form=form, error=message(exc))
    audit("create-client", description=f"client {done.app.client_id} ({done.app.client_type})")
    # Rendered, not redirected: the secret exists only in this response.
    return page("apps_secret.html", app=done.app, secret=done.secret, created=True, kinds=KIND_SHORT)


def _client_page(client_id: str, http_status: int = 200, edit: EditForm | None = None, error: str | None = None,
                 done: str | None = None) -> Response:
    engine = services().engine
    try:
        app = service.get_app(engine, client_id)
    except service.AppError as exc:
        return page("error.html", 404, status=404, message=message(exc))
    grants = service.active_grants(engine, client_id, limit=GRANTS_SHOWN)
    if edit is None:
        edit = EditForm(formdata=None, data={"client_id": app.client_id, "name": app.name or "",
                                             "redirect_uris": "\n".join(app.redirect_uris), "scope": app.scope,
                                             "launch_url": app.launch_url or "", "jwks_url": app.jwks_url or ""})
    audit("view-client", description=f"client {client_id}: {app.active_grants} active grants")
    return page("apps_client.html", http_status, app=app, grants=grants, grant_count=app.active_grants,
                edit=edit, action=ClientForm(formdata=None, data={"client_id": app.client_id}),
                revoke=RevokeForm(formdata=None), kinds=KIND_SHORT, error=error, done=done)


@bp.get("/apps/client/<path:client_id>")
@area("apps")
def apps_client(client_id: str) -> Response:
    done = DONE.get(request.args.get("done", ""))
    return _client_page(client_id, done=str(done) if done else None)


def _back(client_id: str, done: str) -> Response:
    return redirect(url_for("admin.apps_client", client_id=client_id, done=done))


@bp.post("/apps/update")
@area("apps")
def apps_update() -> Response:
    form = EditForm()
    client_id = _client_id()
    if not form.validate_on_submit():
        return _client_page(client_id, 400, edit=form, error=_first_error(form))
    try:
        _app, changed = service.update_app(
            services().engine, client_id, name=form.name.data or "", redirect_uris=form.redirect_uris.data or "",
            scope=form.scope.data or "", launch_url=form.launch_url.data or "", jwks_url=form.jwks_url.data or "",
            jwks_file=_upload(form.jwks_file))
    except service.AppError as exc:
        return _client_page(client_id, 404 if exc.code == "unknown-client" else 400, edit=form, error=message(exc))
    if not changed:
        return _back(client_id, "unchanged")
    audit("update-client", description=f"client {client_id}: {', '.join(changed)} changed")
    return _back(client_id, "updated")


def _switch(disabled: bool) -> Response:
    form = ClientForm()
    client_id = _client_id()
    if not form.validate_on_submit():
        return _client_page(client_id, 400, error=_first_error(form))
    try:
        changed = service.set_disabled(services().engine, client_id, disabled)
    except service.AppError as exc:
        return _client_page(client_id, 404, error=message(exc))
    if changed:
        audit("execute-disable-client" if disabled else "execute-enable-client", description=f"client {client_id}")
    return _back(client_id, "disabled" if disabled else "enabled")


@bp.post("/apps/disable")
@area("apps")
def apps_disable() -> Response:
    return _switch(True)


@bp.post("/apps/enable")
@area("apps")
def apps_enable() -> Response:
    return _switch(False)


@bp.post("/apps/rotate")
@area("apps")
def apps_rotate() -> Response:
    form = ClientForm()
    client_id = _client_id()
    if not form.validate_on_submit():
        return _client_page(client_id, 400, error=_first_error(form))
    try:
        secret = service.rotate_secret(services().engine, client_id)
    except service.AppError as exc:
        return _client_page(client_id, 400, error=message(exc))
    audit("execute-rotate-secret", description=f"client {client_id}")
    return page("apps_secret.html", app=service.get_app(services().engine, client_id), secret=secret, created=False,
                kinds=KIND_SHORT)


@bp.post("/apps/revoke")
@area("apps")
def apps_revoke() -> Response:
    form = RevokeForm()
    client_id = _client_id()
    if not form.validate_on_submit():
        return _client_page(client_id, 400, error=_first_error(form))
    try:
        grant = service.revoke_grant(services().smart, client_id, form.grant_id.data or "")
    except service.AppError as exc:
        return _client_page(client_id, 400, error=message(exc))
    who = grant.username or "a backend service"  # the audit trail is in English
    audit("execute-revoke-grant", entities=(f"Patient/{grant.patient_id}",) if grant.patient_id else (),
          description=f"client {client_id}: authorization by {who}")
    return _back(client_id, "revoked")
