"""Authorization pages (login, MFA, patient picker, consent) and the OAuth endpoints.

Views are thin: the request in progress lives in the signed session cookie, every decision is a
call into SmartAuth, launch or people. Forms are plain HTML with a CSRF token (flask-wtf).
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2 import OAuth2Error
from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Length, Regexp

from gateway import metrics
from gateway.smart_auth import keys, launch, people, reset, sessions
from gateway.smart_auth.server import SmartAuth

bp = Blueprint("smart_auth", __name__, url_prefix="/auth", template_folder="templates")

PENDING = "smart_authz"
USER = sessions.USER
MFA_USER = "smart_mfa_uid"
PATIENT = "smart_patient"
NEXT = "smart_next"
SINGLE_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "aud", "launch",
                 "code_challenge", "code_challenge_method")


EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


class LoginForm(FlaskForm):
    username = StringField(_l("Username"), validators=[DataRequired(_l("Enter your username."))])
    password = PasswordField(_l("Password"), validators=[DataRequired(_l("Enter your password."))])


class SignUpForm(FlaskForm):
    activation_code = StringField(_l("Activation code"), validators=[
        DataRequired(_l("Enter the activation code from your care team.")),
        Length(max=64, message=_l("An activation code is 16 letters and digits."))])
    username = StringField(_l("Username"), validators=[
        DataRequired(_l("Choose a username.")),
        Length(max=people.USERNAME_MAX, message=_l("A username has at most 64 characters."))])
    password = PasswordField(_l("Password"), validators=[
        DataRequired(_l("Choose a password.")),
        Length(min=8, max=256, message=_l("The password needs 8 to 256 characters."))])


class ResetRequestForm(FlaskForm):
    username = StringField(_l("Username"), validators=[DataRequired(_l("Enter your username."))])


class ForgotUsernameForm(FlaskForm):
    email = EmailField(_l("Email address"), validators=[
        DataRequired(_l("Enter the email address in your record.")),
        Length(max=254, message=_l("An email address has at most 254 characters.")),
        Regexp(EMAIL_PATTERN, message=_l("Enter an email address like name@example.org."))])


class NewPasswordForm(FlaskForm):
    password = PasswordField(_l("New password"), validators=[DataRequired(_l("Choose a password."))])


class OtpForm(FlaskForm):
    otp = StringField(_l("Code from your authenticator app"), validators=[
        DataRequired(_l("Enter the code from your authenticator app."))])


class CsrfOnlyForm(FlaskForm):
    """Patient picker and consent: their fields are read and checked by the services."""


def _smart() -> SmartAuth:
    return current_app.extensions["gateway"].smart


def _page(template: str, status: int = 200, **context: Any) -> Response:
    response = Response(render_template(f"smart_auth/{template}", **context), status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def first_error(form: FlaskForm) -> str | None:
    """The first field message of a submitted form that did not validate (None when not submitted)."""
    for errors in form.errors.values():
        for error in errors:
            return str(error)
    return None


def _error_page(message: str, status: int = 400) -> Response:
    return _page("error.html", status, message=message)


def _oauth_error(error: OAuth2Error) -> Response:
    # Only a redirect_uri validated against the client's registration is ever redirected to.
    if error.redirect_uri:
        _, _, headers = error()
        return redirect(dict(headers)["Location"])
    return _error_page(f"{error.error}: {error.description or ''}")


TOO_MANY = "Too many failed attempts from your address; try again in a few minutes"

# The messages the services raise (in English, as the CLI and the logs show them), as the pages say
# them in the reader's language.
MESSAGES = {
    TOO_MANY: _l("Too many failed attempts from your address; try again in a few minutes"),
    "Unknown username or wrong password": _l("Unknown username or wrong password"),
    "Too many failed attempts; try again later": _l("Too many failed attempts; try again later"),
    "The code is not valid": _l("The code is not valid"),
    "the password needs at least 8 characters": _l("The password needs at least 8 characters."),
    "choose a username": _l("Choose a username."),
    "a username has at most 64 characters, without spaces at either end":
        _l("A username has at most 64 characters, without spaces at either end."),
    "That username is taken": _l("That username is taken; choose another."),
    people.CODE_UNKNOWN: _l("This activation code is not valid: we do not know it. Check it and type it again."),
    people.CODE_USED: _l("This activation code is not valid any more: it has already been used. Sign in with "
                         "the login made with it, or use Forgot your username."),
    people.CODE_EXPIRED: _l("This activation code has expired (codes work for 45 days). Ask your care team "
                            "for a new one."),
    "This reset link is not valid any more; ask for a new one":
        _l("This reset link is not valid any more; ask for a new one."),
    "Two-step verification is already on": _l("Two-step verification is already on."),
    "Start the set-up again": _l("Start the set-up again."),
}


def say(message: str) -> str:
    """A service's message in the reader's language (unknown ones as they are)."""
    known = MESSAGES.get(message)
    return str(known) if known is not None else message


def _attempt(check: Any) -> tuple[Any, str | None]:
    """Run one sign-in style check unless this address failed too often: (result, error)."""
    limiter = _smart().limiter
    address = request.remote_addr or "?"
    if limiter.blocked(address):
        return None, say(TOO_MANY)
    try:
        return check(), None
    except people.AuthError as exc:
        limiter.failed(address)
        return None, say(str(exc))


def _pending() -> dict[str, Any] | None:
    return session.get(PENDING)


def _user() -> people.User | None:
    return sessions.current_user(_smart().engine, _smart().settings.portal_idle_seconds)


# --- the authorization flow ---

@bp.route("/authorize", methods=["GET", "POST"])
def authorize() -> Response:
    values = request.values
    for name in SINGLE_PARAMS:
        if len(values.getlist(name)) > 1:
            return _error_page(f"invalid_request: {name} appears more than once")
    args = {k: values[k] for k in values if k != "csrf_token"}
    uri = request.base_url
    try:
        _, _, scope = _smart().validate_authorization(uri, args)
    except OAuth2Error as error:
        return _oauth_error(error)
    session[PENDING] = {"uri": uri, "args": args, "scope": scope}
    session.pop(PATIENT, None)
    return redirect(url_for(".resume"))


@bp.get("/continue")
def resume() -> Response:
    pending = _pending()
    if pending is None:
        if _user() is not None:  # signed in without an app: the portal (or, for staff, the console)
            return redirect(url_for("portal.home"))
        return _error_page(_("There is no authorization in progress. Start again from the app."))
    user = _user()
    if user is None:
        return redirect(url_for(".login"))
    context = _context(pending, user, session.get(PATIENT))
    if not isinstance(context, launch.PatientContext):
        return context
    if context.choices:
        return redirect(url_for(".patient"))
    return redirect(url_for(".consent"))


def _context(pending: dict[str, Any], user: people.User, chosen: str | None) -> launch.PatientContext | Response:
    """The launch's patient context, or the redirect that refuses the app when there can be none."""
    try:
        return launch.patient_context(_smart(), current_app.extensions["gateway"].store, pending["args"],
                                      pending["scope"], user, chosen)
    except launch.LaunchError as exc:
        return _finish(None, str(exc))


def _sync_after_sign_in(user: Any) -> None:
    """Pull what the EHR has for the user and everyone they act for, in the background and bounded
    in time (GATEWAY_UPSTREAM_LOGIN_SYNC_SECONDS): the page never waits, and a failure only logs."""
    services = current_app.extensions["gateway"]
    settings = services.settings
    if not settings.upstream_fhir_url:
        return
    try:
        from gateway.upstream.client import UpstreamClient
        from gateway.upstream.sync import sync_patient_async

        with services.engine.connect() as conn:
            patients = [user.fhir_user.partition("/")[2], *people.acting_for(conn, user.id)]
        client = UpstreamClient.from_settings(settings)
        for patient_id in dict.fromkeys(p for p in patients if p):
            sync_patient_async(services.store, client, patient_id, settings.upstream_login_sync_seconds,
                               services.audit)
    except Exception:  # a sign-in must not fail because the EHR or its settings do
        current_app.logger.exception("the sign-in sync could not start")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    form = LoginForm()
    error = None
    if form.validate_on_submit():
        user, error = _attempt(lambda: people.check_password(_smart().engine, form.username.data or "",
                                                                   form.password.data or ""))
        if error is None:
            pending, after = session.get(PENDING), session.get(NEXT)
            sessions.end()  # a fresh session at login: nothing chosen before it carries over
            if pending is not None:
                session[PENDING] = pending
            if after is not None:
                session[NEXT] = after
            if user.totp_secret:
                session[MFA_USER] = user.id
                return redirect(url_for(".mfa"))
            sessions.start(user)
            _sync_after_sign_in(user)
            return redirect(session.pop(NEXT, None) or url_for(".resume"))
    notice = {"idle": _("You were signed out after a period of inactivity."),
              "elsewhere": _("You were signed out because your account signed out everywhere.")}.get(
        session.pop(sessions.ENDED, None) or "")
    if error is None and form.is_submitted():
        error = first_error(form)
        return _page("login.html", 200 if error is None else 400, form=form, error=error, notice=notice)
    return _page("login.html", 200 if error is None else 401, form=form, error=error, notice=notice)


@bp.route("/signup", methods=["GET", "POST"])
def signup() -> Response:
    """First sign-in with the activation code the practice handed out; then on as after a login."""
    form = SignUpForm()
    error = None
    if form.validate_on_submit():
        user, error = _attempt(lambda: people.sign_up(_smart().engine, form.activation_code.data or "",
                                                            form.username.data or "", form.password.data or ""))
        if error is None:
            pending, after = session.get(PENDING), session.get(NEXT)
            sessions.end()
            if pending is not None:
                session[PENDING] = pending
            sessions.start(user)
            _sync_after_sign_in(user)
            return redirect(after or (url_for(".resume") if pending else url_for("portal.home")))
    error = error or first_error(form)
    return _page("signup.html", 200 if error is None else 400, form=form, error=error)


@bp.route("/reset", methods=["GET", "POST"])
def reset_request() -> Response:
    smart = _smart()
    if smart.mailer is None:
        return _page("error.html", message=_("Password reset by email is not set up here; please ask your care "
                                             "team."))
    form = ResetRequestForm()
    if form.validate_on_submit():
        reset.request_reset(smart.engine, current_app.extensions["gateway"].store, smart.mailer,
                            smart.settings.base_url, form.username.data or "")
        # The same answer whether or not the login exists.
        return _page("error.html", message=_("If that login exists and has an email address, a link is on its "
                                             "way. It works once, within an hour."))
    error = first_error(form)
    return _page("reset.html", 200 if error is None else 400, form=form, error=error)


@bp.route("/forgot-username", methods=["GET", "POST"])
def forgot_username() -> Response:
    """The usernames of the records with this email address, mailed to it; the same answer always."""
    smart = _smart()
    if smart.mailer is None:
        return _page("error.html", message=_("Reminders by email are not set up here; please ask your care team."))
    form = ForgotUsernameForm()
    if form.validate_on_submit():
        reset.request_usernames(smart.engine, current_app.extensions["gateway"].store, smart.mailer,
                                smart.settings.base_url, form.email.data or "")
        return _page("error.html", message=_("If a record here has that email address, its usernames are on "
                                             "their way to it."))
    error = first_error(form)
    return _page("forgot_username.html", 200 if error is None else 400, form=form, error=error)


@bp.route("/reset/<token>", methods=["GET", "POST"])
def reset_password(token: str) -> Response:
    smart = _smart()
    if not reset.reset_is_valid(smart.engine, token):
        return _error_page(_("This reset link is not valid any more; ask for a new one."))
    form = NewPasswordForm()
    error = None
    if form.validate_on_submit():
        try:
            reset.complete_reset(smart.engine, token, form.password.data or "")
        except people.AuthError as exc:
            error = say(str(exc))
        else:
            return _page("error.html", message=_("Your password is changed. You can sign in with it now."))
    error = error or first_error(form)
    return _page("new_password.html", 200 if error is None else 400, form=form, error=error, token=token)


@bp.route("/mfa", methods=["GET", "POST"])
def mfa() -> Response:
    user_id = session.get(MFA_USER)
    if user_id is None:
        return redirect(url_for(".login"))
    form = OtpForm()
    error = None
    if form.validate_on_submit():
        with _smart().engine.connect() as conn:
            user = people.get_user(conn, user_id)
        if user is None:
            session.clear()
            return redirect(url_for(".login"))
        _, error = _attempt(lambda: people.check_otp(_smart().engine, user, form.otp.data or ""))
        if error is None:
            session.pop(MFA_USER, None)
            sessions.start(user, mfa=True)
            _sync_after_sign_in(user)
            return redirect(session.pop(NEXT, None) or url_for(".resume"))
    if error is None and form.is_submitted():
        error = first_error(form)
        return _page("mfa.html", 200 if error is None else 400, form=form, error=error)
    return _page("mfa.html", 200 if error is None else 401, form=form, error=error)


@bp.route("/patient", methods=["GET", "POST"])
def patient() -> Response:
    pending, user = _pending(), _user()
    if pending is None or user is None:
        return redirect(url_for(".resume"))
    form = CsrfOnlyForm()
    error = None
    if form.validate_on_submit():
        chosen = (request.form.get("patient") or "").removeprefix("Patient/")
        try:
            launch.patient_context(_smart(), current_app.extensions["gateway"].store, pending["args"],
                                   pending["scope"], user, chosen)
        except launch.LaunchError as exc:
            error = say(str(exc))
        else:
            session[PATIENT] = chosen
            return redirect(url_for(".consent"))
    context = launch.patient_context(_smart(), current_app.extensions["gateway"].store, pending["args"],
                                     pending["scope"], user, None)
    return _page("patient.html", 200 if error is None else 400, form=form, choices=context.choices, error=error)


@bp.route("/consent", methods=["GET", "POST"])
def consent() -> Response:
    pending, user = _pending(), _user()
    if pending is None or user is None:
        return redirect(url_for(".resume"))
    context = _context(pending, user, session.get(PATIENT))
    if not isinstance(context, launch.PatientContext):
        return context
    if context.choices:
        return redirect(url_for(".patient"))
    form = CsrfOnlyForm()
    if form.validate_on_submit():
        if request.form.get("decision") != "approve":
            return _finish(None, "denied")
        granted = launch.granted_scopes(request.form.getlist("scope"), pending["scope"])
        if not granted:
            return _finish(None, "nothing granted")
        fhir_user = launch.fhir_user_for(_smart(), current_app.extensions["gateway"].store, user, context.patient_id)
        owner = _smart().start_grant(pending["args"]["client_id"], user, context.patient_id, context.encounter_id,
                                     granted, fhir_user)
        return _finish(owner, granted)
    client = _smart().query_client(pending["args"].get("client_id", ""))
    # The name staff gave the app in the console, else its client id.
    return _page("consent.html", form=form, client_id=(client.name or client.client_id) if client else "?",
                 options=launch.consent_options(pending["scope"]), requested=set(pending["scope"].split()),
                 patient=context.patient_id)


def _finish(owner: Any, granted: str) -> Response:
    pending = session.pop(PENDING, None)
    session.pop(PATIENT, None)
    if pending is None:
        return _error_page(_("There is no authorization in progress."))
    try:
        location = _smart().authorization_redirect(pending["uri"], pending["args"], owner, granted)
    except OAuth2Error as error:
        return _oauth_error(error)
    return redirect(location)


@bp.route("/apps", methods=["GET", "POST"])
def apps() -> Response:
    """The apps holding access to what the user may see, each revocable with one click."""
    user = _user()
    if user is None:
        session[NEXT] = url_for(".apps")
        return redirect(url_for(".login"))
    form = CsrfOnlyForm()
    if form.validate_on_submit():
        _smart().revoke_app(user.id, request.form.get("grant_id", ""))
        return redirect(url_for(".apps"))
    return _page("apps.html", form=form, apps=_smart().apps_of(user.id))


@bp.post("/logout")
def logout() -> Response:
    form = CsrfOnlyForm()
    if form.validate_on_submit():
        sessions.end()
    return _page("error.html", message=_("You are signed out."))


# --- endpoints for apps ---

def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.post("/token")
def token() -> Response:
    response = _smart().server.create_token_response()
    if response.status_code == 200:
        metrics.token_issued(request.form.get("grant_type"))
    return _no_store(response)


@bp.post("/introspect")
def introspect() -> Response:
    return _no_store(_smart().server.create_endpoint_response("introspection"))


@bp.post("/revoke")
def revoke() -> Response:
    return _no_store(_smart().server.create_endpoint_response("revocation"))


@bp.get("/jwks")
def jwks() -> Response:
    return jsonify(keys.jwks(_smart().engine))


@bp.get("/smart-style.json")
def smart_style() -> Response:
    return jsonify({"color_background": "#f6f7f9", "color_error": "#9e2a2b", "color_highlight": "#1f5fa8",
                    "color_modal_backdrop": "", "color_success": "#2e7d32", "color_text": "#1b1b1b",
                    "dim_border_radius": "6px", "dim_font_size": "16px", "dim_spacing_size": "16px",
                    "font_family_body": "system-ui, sans-serif", "font_family_heading": "system-ui, sans-serif"})
