"""Structured logs: JSON lines with the request id, the route template and never a patient's data."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from gateway import logs


@pytest.fixture
def captured() -> Any:
    """The gateway's JSON handler on the root logger, writing to a buffer, as `gateway serve` sets it up."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.formatter("json"))
    handler.addFilter(logs.RequestContext())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_each_request_gets_an_id_echoed_and_one_access_line_without_the_path(client: Any, captured: Any) -> None:
    reply = client.get("/fhir/Patient?family=Garcia&birthdate=2011-04-02")
    rid = reply.headers["X-Request-ID"]
    assert len(rid) == 32
    access = [line for line in _lines(captured) if line["logger"] == "gateway.access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == rid and line["route"] == "/fhir/<rtype>" and line["status"] == 200
    assert line["method"] == "GET" and line["ms"] >= 0 and line["level"] == "INFO"
    assert "Garcia" not in captured.getvalue() and "2011-04-02" not in captured.getvalue()


def test_a_callers_request_id_is_kept_when_it_is_a_plain_token(client: Any) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "ehr-7f3a.1"}).headers["X-Request-ID"] == "ehr-7f3a.1"
    for forged in ("<script>alert(1)</script>", "a" * 65, "name=Maria Garcia"):
        given = client.get("/healthz", headers={"X-Request-ID": forged}).headers["X-Request-ID"]
        assert given != forged and len(given) == 32


def test_secrets_are_masked_in_any_message(captured: Any) -> None:
    log = logging.getLogger("gateway.test")
    log.warning("upstream said: Authorization: Bearer eyJhbGciOi.abc.def")
    log.warning("form had password=hunter2&username=maria")
    log.warning("client_secret: s3cr3t-value")
    text = captured.getvalue()
    for secret in ("eyJhbGciOi.abc.def", "hunter2", "s3cr3t-value"):
        assert secret not in text
    assert "maria" in text  # only secrets are masked


def test_the_logging_document_routes_gunicorn_through_the_same_handler() -> None:
    config = logs.logconfig("text", "debug")
    assert config["root"] == {"level": "DEBUG", "handlers": ["gateway"]}
    assert config["loggers"]["gunicorn.error"]["propagate"] is True
    logging.config.dictConfig(dict(config, root={"level": "WARNING", "handlers": []}))  # it is a valid document


def test_database_errors_carry_the_sql_but_not_the_values(database_url: str) -> None:
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from gateway import db

    engine = db.make_engine(database_url)
    row = {"id": "dup-key", "resource_type": "Patient", "version_id": 1, "last_updated": "2026-01-01T00:00:00Z",
           "deleted": False, "content": '{"name":[{"family":"Unmistakable-Surname"}]}'}
    try:
        with engine.begin() as conn:
            conn.execute(insert(db.resource).values(**row))
        with pytest.raises(IntegrityError) as raised, engine.begin() as conn:
            conn.execute(insert(db.resource).values(**row))
        text = str(raised.value)
        assert "INSERT INTO resource" in text
        # The values bound to the statement are hidden. (PostgreSQL's own DETAIL line still names the
        # duplicate key, here the resource id.)
        assert "Unmistakable-Surname" not in text and "[parameters:" not in text
    finally:
        with engine.begin() as conn:
            conn.execute(db.resource.delete().where(db.resource.c.id == "dup-key"))
        engine.dispose()
