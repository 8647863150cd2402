"""Response headers every answer carries (OWASP ASVS level 2, V14.4), set in one place.

Pages (HTML) get a Content-Security-Policy that allows only the gateway's own scripts, styles and
images: the templates have no inline script, style attribute or event handler, so nothing is
loosened for them. `form-action` is left out on purpose: Chromium applies it to the redirect after
a form is posted, and the consent form's answer is a redirect to the app's registered redirect_uri
on another origin. Framing is refused everywhere (clickjacking). HSTS only when the public base
URL is https (a browser would otherwise refuse the plain-HTTP development server afterwards).
"""

from __future__ import annotations

from flask import Flask, Response

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


def install(app: Flask, https: bool) -> None:
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
