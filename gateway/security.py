"""Response headers every answer carries (OWASP ASVS level 2, V14.4), set in one place.

Pages (HTML) get a Content-Security-Policy that allows only the gateway's own scripts, styles and
images: the templates have no inline script, style attribute or event handler, so nothing is
loosened for them. `form-action` is left out on purpose: Chromium applies it to the redirect after
a form is posted, and the consent form's answer is a redirect to the app's registered redirect_uri
on another origin. Framing is refused everywhere (clickjacking). HSTS only when the public base
URL is https (a browser would otherwise refuse the plain-HTTP development server afterwards).
The signed session cookie's interface is set here too (SessionCookies).
"""

from __future__ import annotations

from flask import Flask, Request, Response
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
ALWAYS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGES = {
    "Content-Security-Policy": CSP,
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed session cookie, with the signer made only when a request has a cookie to read.

    Flask makes it (key derivation, hashing set-up: about 15 us) for every request; API calls and
    health checks never carry a session cookie, and for them the answer is the empty session anyway.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def install(app: Flask, https: bool) -> None:
    app.session_interface = SessionCookies()
    always = dict(ALWAYS)
    if https:
        always["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in always.items():
            response.headers.setdefault(name, value)
        if response.mimetype == "text/html":
            for name, value in PAGES.items():
                response.headers.setdefault(name, value)
        return response
