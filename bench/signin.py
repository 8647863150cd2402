"""Signing in through the real login form (CSRF token, password, TOTP second factor, record picker),
shared by the benchmarks that act as signed-in people over HTTP."""

from __future__ import annotations

import re
from html import unescape

import pyotp
import requests


def csrf(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    if not match:
        raise RuntimeError("no CSRF token on the page")
    return unescape(match.group(1))


def sign_in(base: str, username: str, password: str, *, totp_secret: str | None = None, start: str = "/",
            expect: str = 'id="whose-record"', timeout: float = 30) -> requests.Session:
    """A requests session signed in as `username`: the page at `start` leads to the login form; the
    second-factor form is answered with the current code of `totp_secret` when it appears; a login
    that may act for several people picks the first record offered (its own). The page reached must
    contain `expect` (by default the portal's whose-record banner)."""
    session = requests.Session()
    page = session.get(base + start, timeout=timeout)
    reply = session.post(f"{base}/auth/login", data={"csrf_token": csrf(page.text), "username": username,
                                                      "password": password}, timeout=timeout)
    if 'id="mfa-form"' in reply.text:
        if totp_secret is None:
            raise RuntimeError(f"{username}: the second factor was asked for and no TOTP secret was given")
        reply = session.post(f"{base}/auth/mfa", data={"csrf_token": csrf(reply.text),
                                                       "otp": pyotp.TOTP(totp_secret).now()}, timeout=timeout)
    if "/choose" in reply.url:
        choice = re.search(r'name="patient"[^>]*value="([^"]+)"', reply.text)
        if choice is None:
            raise RuntimeError(f"{username}: the record picker offered nothing")
        reply = session.post(f"{base}/choose", data={"csrf_token": csrf(reply.text), "next": "/",
                                                     "patient": choice.group(1)}, timeout=timeout)
    if reply.status_code != 200 or expect not in reply.text:
        raise RuntimeError(f"{username} could not sign in: {reply.status_code} {reply.url}")
    return session
