"""Every corpus message through MLLP end to end: AA for the types the gateway maps, AR with the
reason for the rest; the resources each one wrote are all in the store and validated on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway import db
from gateway.hl7 import parse
from gateway.hl7.ingest import Ingestor
from gateway.hl7.mllp import send_messages, start_in_thread
from gateway.hl7.translate import supported

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
FILES = sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FILES, reason="../shared/corpus is not beside the checkout")]


def _msa(ack: bytes) -> list[str]:
    text = ack.decode("utf-8", "replace")
    segment = next(s for s in text.split("\r") if s.startswith("MSA"))
    return segment.split(segment[3])


def test_whole_corpus_over_one_mllp_connection(app: Any) -> None:
    gateway = app.extensions["gateway"]
    in_scope = set(supported())
    listener = start_in_thread(lambda raw: gateway.hl7.handle(raw, "mllp"))
    try:
        acks = send_messages("127.0.0.1", listener.port, [f.read_bytes() for f in FILES], timeout=60)
    finally:
        listener.stop()
    with gateway.engine.connect() as conn:
        messages = conn.execute(select(db.hl7_message).order_by(db.hl7_message.c.id)).all()
        written = conn.execute(select(db.hl7_written)).all()
    assert len(messages) == len(FILES)
    unexpected = []
    for path, replies, row in zip(FILES, acks, messages, strict=True):
        header = parse.read_header(parse.normalize(parse.decode(path.read_bytes())))
        # every reply names the message; enhanced mode (MSH-15/16) decides how many there are
        assert all(_msa(ack)[2] == header.control_id for ack in replies), path.name
        assert len(replies) == len(Ingestor._acks(header, "A" if row.status == "processed" else "R")), path.name
        codes = {_msa(ack)[1] for ack in replies}
        if row.status == "duplicate":
            continue  # the corpus reuses control ids with identical content in a few files
        if header.message_code_and_trigger in in_scope:
            if not codes <= {"AA", "CA"} or row.status != "processed":
                unexpected.append((path.name, codes, row.status, row.error))
        elif not codes <= {"AR", "CR"} or row.error_code not in ("200", "201"):
            unexpected.append((path.name, codes, row.status, row.error))
    assert unexpected == []
    processed = {m.id for m in messages if m.status == "processed"}
    assert processed, "no corpus message was in scope"
    # Every processed message wrote something, and every resource it says it wrote exists.
    assert processed <= {w.message_id for w in written}
    with gateway.store.reading() as repo:
        for w in written:
            assert repo.find(w.resource_type, w.resource_id) is not None, (w.message_id, w.resource_type)
