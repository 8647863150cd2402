"""Security headers on every kind of answer (ASVS V14.4), and the cookie flags (V3.4)."""

from __future__ import annotations

from typing import Any

from gateway import create_app
from gateway.security import CSP


def test_pages_get_a_strict_content_security_policy(client: Any) -> None:
    reply = client.get("/auth/login")
    assert reply.status_code == 200 and reply.mimetype == "text/html"
    assert reply.headers["Content-Security-Policy"] == CSP
    assert "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert "Strict-Transport-Security" not in reply.headers  # plain-HTTP base URL in tests


def test_api_answers_and_errors_get_the_common_headers(client: Any) -> None:
    for reply in (client.get("/fhir/metadata"), client.get("/fhir/Patient/nope"), client.get("/no-such-page")):
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["X-Frame-Options"] == "DENY"


def test_https_deployments_send_hsts_and_secure_cookies(settings: Any) -> None:
    settings.base_url = "https://gateway.example.org"
    app = create_app(settings)
    client = app.test_client()
    reply = client.get("/auth/login")
    assert reply.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    cookie = reply.headers.get("Set-Cookie", "")
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    app.extensions["gateway"].close()


def test_the_templates_need_no_inline_script_or_style() -> None:
    """The CSP forbids inline code; a template that used it would silently break in browsers."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "gateway"
    offenders = []
    for template in root.rglob("templates/**/*.html"):
        text = template.read_text()
        if re.search(r"<script(?![^>]*\bsrc=)[^>]*>|\sstyle=|\son[a-z]+=", text):
            offenders.append(str(template.relative_to(root)))
    assert offenders == []
