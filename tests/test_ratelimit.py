"""Rate limits on the sign-in pages, with counters shared by every process through Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from gateway import create_app, ratelimit
from tests.portal.conftest import csrf_of, text_of

REDIS = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping())
    except Exception:
        return False


def _login_posts(client: Any, times: int) -> list[int]:
    html = client.get("/auth/login").get_data(as_text=True)
    return [client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "nobody",
                                             "password": "wrong password"}).status_code for _ in range(times)]


@pytest.fixture
def shared(settings: Any) -> Iterator[Any]:
    """Settings of a deployment whose processes share Redis (a prefix of its own, removed after)."""
    if not _redis_up():
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    shared_settings = replace(settings, ratelimit_storage=REDIS, ratelimit_prefix=f"gw-test-{uuid.uuid4().hex}")
    yield shared_settings
    ratelimit.storage(shared_settings).reset()


def test_sign_in_posts_over_the_limit_get_a_friendly_429(settings: Any) -> None:
    app = create_app(replace(settings, ratelimit_sign_in="3 per minute"))
    app.config["WTF_CSRF_ENABLED"] = True
    client = app.test_client()
    assert _login_posts(client, 3) == [401, 401, 401]
    html = client.get("/auth/login").get_data(as_text=True)
    reply = client.post("/auth/login", data={"csrf_token": csrf_of(html), "username": "x", "password": "y"},
                        headers={"Accept": "text/html"})
    assert reply.status_code == 429
    assert "Too many attempts" in text_of(reply.get_data(as_text=True))
    assert client.get("/auth/login").status_code == 200  # reading the page is not limited
    app.extensions["gateway"].close()


def test_two_processes_share_the_sign_in_limit_through_redis(shared: Any) -> None:
    first, second = (create_app(replace(shared, ratelimit_sign_in="4 per minute")) for _ in range(2))
    for app in (first, second):
        app.config["WTF_CSRF_ENABLED"] = True
    assert _login_posts(first.test_client(), 3) == [401, 401, 401]
    assert _login_posts(second.test_client(), 2) == [401, 429]
    for app in (first, second):
        app.extensions["gateway"].close()


def test_failed_checks_counted_in_one_process_block_the_address_in_another(shared: Any) -> None:
    one = ratelimit.FailureLimiter(ratelimit.storage(shared), limit=3)
    other = ratelimit.FailureLimiter(ratelimit.storage(shared), limit=3)
    for _ in range(3):
        assert not other.blocked("10.0.0.7")
        one.failed("10.0.0.7")
    assert other.blocked("10.0.0.7") and one.blocked("10.0.0.7")
    assert not other.blocked("10.0.0.8")  # per address
