"""Rate limits, with their counters in one storage every process shares (flask-limiter / limits).

GATEWAY_RATELIMIT_STORAGE names the storage: `memory://` (the default: this process only, right for
one process and for tests) or `redis://host:6379/0` when several gateway processes serve together,
so that an address is limited across all of them. Two kinds of limit use it:
- requests: the sign-in pages' form posts (login, second factor, sign-up, password reset, forgot
  username) per client address, GATEWAY_RATELIMIT_SIGN_IN (default 60 per minute);
- failures: failed sign-in checks per address in a moving window (`FailureLimiter`, 20 in 10
  minutes), which also guards activation codes and the second-factor set-up.
The per-login lockout (five failures) lives with the login in the database.
"""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerSecond
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from gateway.config import Settings

SIGN_IN_ENDPOINTS = ("smart_auth.login", "smart_auth.mfa", "smart_auth.signup", "smart_auth.reset_request",
                     "smart_auth.forgot_username", "smart_auth.reset_password")


def storage(settings: Settings) -> Storage:
    options = {"key_prefix": settings.ratelimit_prefix} if settings.ratelimit_storage.startswith("redis") else {}
    return storage_from_string(settings.ratelimit_storage, **options)


class FailureLimiter:
    """Failed attempts per client address in a moving window. The per-login lockout stops guessing one
    account's password; this stops one address trying many accounts (or many activation codes)."""

    def __init__(self, store: Storage, limit: int = 20, window_seconds: int = 600) -> None:
        self._limiter = MovingWindowRateLimiter(store)
        self._item = RateLimitItemPerSecond(limit, window_seconds)

    def blocked(self, address: str) -> bool:
        return not self._limiter.test(self._item, "sign-in-failures", address)

    def failed(self, address: str) -> None:
        self._limiter.hit(self._item, "sign-in-failures", address)


def install(app: Flask, settings: Settings) -> Limiter:
    """Limit the sign-in form posts of this app (a limiter per app: tests build many apps)."""
    app.config["RATELIMIT_KEY_PREFIX"] = settings.ratelimit_prefix
    limiter = Limiter(get_remote_address, app=app, storage_uri=settings.ratelimit_storage,
                      strategy="moving-window", headers_enabled=True)
    # flask-limiter checks every request of the app before its view (working out the limits costs
    # about as much as a FHIR read itself); only the sign-in pages have limits, so its check runs
    # for their blueprint alone. A test holds the limits working (tests/test_ratelimit.py).
    app.before_request_funcs[None].remove(limiter._check_request_limit)
    app.before_request_funcs.setdefault("smart_auth", []).append(limiter._check_request_limit)
    # Its response hook (the X-RateLimit headers of a limit checked) and its teardown (forgetting the
    # limits checked) have nothing to do elsewhere either; together they cost every other request
    # about 10 us. Blueprint hooks run before the app's, as these ran before the other app hooks.
    inject = next(f for f in app.after_request_funcs[None]
                  if getattr(f, "func", None) is Limiter._Limiter__inject_headers  # type: ignore[attr-defined]
                  and f.args == (limiter,))
    app.after_request_funcs[None].remove(inject)
    app.after_request_funcs.setdefault("smart_auth", []).append(inject)
    release = limiter._Limiter__release_context  # type: ignore[attr-defined]
    app.teardown_request_funcs[None].remove(release)
    app.teardown_request_funcs.setdefault("smart_auth", []).append(release)
    for endpoint in SIGN_IN_ENDPOINTS:
        view = app.view_functions.get(endpoint)
        if view is None:
            raise RuntimeError(f"rate limit for a view that does not exist: {endpoint}")
        app.view_functions[endpoint] = limiter.limit(settings.ratelimit_sign_in, methods=["POST"])(view)
    return limiter
