"""The ingest pipeline: raw message stored first, translate + upsert in one transaction, ACK after
commit; duplicates, failures, reprocessing, provenance, HTTP and MLLP receivers."""

from __future__ import annotations

import io
from typing import Any

import pytest
from sqlalchemy import select

from gateway import db
from gateway.hl7.mllp import send_messages, start_in_thread

ADT = (
    "MSH|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261101083000-0500||ADT^A01^ADT_A01|{control}|P|2.5.1\r"
    "EVN|A01|20261101083000-0500\r"
    "PID|1||{mrn}^^^RIVERSIDE^MR||{family}^Ana^Maria||19860412|F|||12 Elm St^^Springfield^IL^62701||"
    "555-0100^PRN^PH~^NET^Internet^ana@example.org\r"
    "PV1|1|I|4W^401^A^RIVERSIDE||||1234^Attend^Alice^^^Dr\r"
)


def adt(control: str = "CTRL1", mrn: str = "MRN100", family: str = "Lopez", time: str | None = None) -> str:
    message = ADT.format(control=control, mrn=mrn, family=family)
    if time:
        message = message.replace("20261101083000-0500", time)
    return message


def handle(ingest: Any, raw: bytes, channel: str = "mllp") -> Any:
    """The one acknowledgement an original-mode message gets (None: the connection is closed)."""
    replies = ingest.handle(raw, channel)
    if replies is None:
        return None
    (reply,) = replies
    return reply


def msa(ack: str) -> list[str]:
    segment = next(s for s in ack.replace("\n", "\r").split("\r") if s.startswith("MSA"))
    return segment.split("|")


def rows(app: Any) -> list[Any]:
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(db.hl7_message).order_by(db.hl7_message.c.id)).all()


def patients(client: Any, **params: str) -> list[dict[str, Any]]:
    bundle = client.get("/fhir/Patient", query_string=params).get_json()
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


@pytest.fixture
def ingest(app: Any) -> Any:
    return app.extensions["gateway"].hl7


def test_adt_is_stored_translated_and_acknowledged(app: Any, client: Any, ingest: Any) -> None:
    ack = handle(ingest, adt().encode()).decode()
    assert msa(ack)[1:3] == ["AA", "CTRL1"]
    (row,) = rows(app)
    assert (row.status, row.control_id, row.message_type, row.mrn) == ("processed", "CTRL1", "ADT^A01", "MRN100")
    assert row.ack == ack
    (patient,) = patients(client, identifier="MRN100")
    assert patient["name"][0]["family"] == "Lopez"
    assert patient["meta"]["source"].endswith(f"/hl7/messages/{row.id}")


def test_resend_is_a_duplicate_that_changes_nothing(app: Any, client: Any, ingest: Any) -> None:
    first = handle(ingest, adt().encode()).decode()
    (patient,) = patients(client, identifier="MRN100")
    again = handle(ingest, adt().encode()).decode()
    assert again == first
    statuses = [r.status for r in rows(app)]
    assert statuses == ["processed", "duplicate"]
    assert rows(app)[1].duplicate_of == rows(app)[0].id
    (same,) = patients(client, identifier="MRN100")
    assert same["meta"]["versionId"] == patient["meta"]["versionId"]


def test_same_control_id_other_content_is_processed_and_flagged(app: Any, client: Any, ingest: Any) -> None:
    handle(ingest, adt().encode())
    ack = handle(ingest, adt(family="Lopez-Garcia", time="20261101093000-0500").encode()).decode()
    assert msa(ack)[1] == "AA"
    second = rows(app)[1]
    assert (second.status, second.flagged) == ("processed", True)
    assert patients(client, identifier="MRN100")[0]["name"][0]["family"] == "Lopez-Garcia"


def test_a_resend_is_a_duplicate_even_after_other_content_under_its_control_id(app: Any, client: Any,
                                                                               ingest: Any) -> None:
    """A sender that reuses a control id (its counter started over) and then resends the first
    message: the resend is the first one's duplicate, not new data, however many came between."""
    first = handle(ingest, adt().encode()).decode()
    handle(ingest, adt(family="Lopez-Garcia", time="20261101093000-0500").encode())
    again = handle(ingest, adt().encode()).decode()
    assert again == first
    first_row, other, resend = rows(app)
    assert (other.status, other.flagged) == ("processed", True)
    assert (resend.status, resend.duplicate_of, resend.flagged) == ("duplicate", first_row.id, False)
    assert patients(client, identifier="MRN100")[0]["name"][0]["family"] == "Lopez-Garcia"


def test_older_message_does_not_overwrite_newer_data(client: Any, ingest: Any) -> None:
    handle(ingest, adt(control="NEW", family="Newer", time="20261102080000-0500").encode())
    ack = handle(ingest, adt(control="OLD", family="Older", time="20261101080000-0500").encode()).decode()
    assert msa(ack)[1] == "AA"
    assert patients(client, identifier="MRN100")[0]["name"][0]["family"] == "Newer"


def test_unsupported_type_is_stored_failed_with_ar(app: Any, ingest: Any) -> None:
    message = adt().replace("ADT^A01^ADT_A01", "ZZZ^Z99").replace("EVN|A01", "EVN|Z99")
    ack = handle(ingest, message.encode()).decode()
    assert msa(ack)[1:3] == ["AR", "CTRL1"]
    err = next(s for s in ack.split("\r") if s.startswith("ERR"))
    assert "200" in err or "201" in err
    (row,) = rows(app)
    assert row.status == "failed" and row.error_code in ("200", "201") and row.raw.startswith("MSH|")


def test_unsupported_processing_id_and_version_get_ar(ingest: Any) -> None:
    assert msa(handle(ingest, adt().replace("|P|2.5.1", "|X|2.5.1").encode()).decode())[1] == "AR"
    assert msa(handle(ingest, adt(control="C2").replace("|P|2.5.1", "|P|3.0").encode()).decode())[1] == "AR"


def test_enhanced_mode_answers_commit_acks(ingest: Any) -> None:
    message = adt().replace("|P|2.5.1", "|P|2.5.1|||AL|NE")
    assert msa(handle(ingest, message.encode()).decode())[1] == "CA"


def enhanced(control: str, accept: str, application: str, version: str = "2.5.1") -> bytes:
    return adt(control).replace("|P|2.5.1", f"|P|{version}|||{accept}|{application}").encode()


@pytest.mark.parametrize("accept, application, success, failure", [
    ("AL", "NE", ["CA"], ["CR"]),
    ("NE", "NE", [], []),
    ("ER", "NE", [], ["CR"]),
    ("SU", "NE", ["CA"], []),
    ("AL", "AL", ["CA", "AA"], ["CR", "AR"]),
    ("NE", "AL", ["AA"], ["AR"]),
    ("", "ER", ["CA"], ["CR", "AR"]),
    ("AL", "SU", ["CA", "AA"], ["CR"]),
])
def test_enhanced_mode_sends_the_acknowledgements_msh15_and_msh16_ask_for(
        app: Any, ingest: Any, accept: str, application: str, success: list[str], failure: list[str]) -> None:
    ok = ingest.handle(enhanced("OK1", accept, application))
    assert [msa(r.decode())[1] for r in ok] == success
    assert all(msa(r.decode())[2] == "OK1" for r in ok)
    refused = ingest.handle(enhanced("BAD1", accept, application, version="3.0"))
    assert [msa(r.decode())[1] for r in refused] == failure
    assert [r.status for r in rows(app)] == ["processed", "failed"]  # stored either way
    # a duplicate gets what the original got, no more and no less
    assert ingest.handle(enhanced("OK1", accept, application)) == ok


def test_enhanced_mode_over_mllp_and_http(app: Any, client: Any, ingest: Any) -> None:
    listener = start_in_thread(lambda raw: ingest.handle(raw, "mllp"))
    try:
        (replies,) = send_messages("127.0.0.1", listener.port, [enhanced("M1", "AL", "AL")])
        assert [msa(r.decode())[1] for r in replies] == ["CA", "AA"]
        # nothing asked for: nothing sent, and the connection stays usable
        none, (reply,) = send_messages("127.0.0.1", listener.port, [enhanced("M2", "NE", "NE"), adt("M3").encode()])
        assert none == [] and msa(reply.decode())[1:3] == ["AA", "M3"]
        # an application ACK on error only: none after a success, one after a rejection (waited for
        # up to 30 s: the client cannot know one will come, and a loaded machine answers late)
        (ok,) = send_messages("127.0.0.1", listener.port, [enhanced("M4", "NE", "ER")])
        (refused,) = send_messages("127.0.0.1", listener.port, [enhanced("M5", "NE", "ER", version="3.0")], grace=30)
        assert ok == [] and [msa(r.decode())[1] for r in refused] == ["AR"]
    finally:
        listener.stop()
    both = client.post("/hl7/v2", data=enhanced("H1", "AL", "AL"), content_type="application/hl7-v2")
    assert msa(both.get_data(as_text=True))[1] == "AA"
    none = client.post("/hl7/v2", data=enhanced("H2", "NE", "NE"), content_type="application/hl7-v2")
    assert none.status_code == 204 and none.data == b""


def test_no_msh_closes_without_storing(app: Any, ingest: Any) -> None:
    assert handle(ingest, b"\x00\x01 not hl7 at all") is None
    assert handle(ingest, b"PID|1||123") is None
    assert rows(app) == []


def _with_document(control: str, size: int) -> bytes:
    """An ADT message followed by an OBX of `size` bytes of base64 (a PDF report, say)."""
    return (adt(control=control) + "OBX|1|ED|PDF^Report||^application^pdf^Base64^" + "A" * size + "\r").encode()


def test_a_message_over_the_maximum_size_is_stored_by_its_start_failed_and_answered_ae_104(
        app: Any, client: Any, ingest: Any) -> None:
    """What a receiver hands over when a message is longer than it takes (MLLP, HTTP): the first
    bytes and the whole length. Stored, but never processed: its data would be incomplete."""
    message = _with_document("BIG1", 300_000)
    head = message[:100_000]
    ack = handle_oversized(ingest, head, len(message))
    assert msa(ack)[1:3] == ["AE", "BIG1"]
    err = next(s for s in ack.split("\r") if s.startswith("ERR"))
    assert "104" in err and f"message of {len(message):,} bytes exceeds the maximum of 100,000 bytes" in ack
    (row,) = rows(app)
    assert (row.status, row.error_code, row.truncated_from_bytes) == ("failed", "104", len(message))
    assert row.raw == adt(control="BIG1")  # its whole segments; the cut OBX is not kept in part
    assert row.ack == ack and row.control_id == "BIG1"
    assert patients(client, identifier="MRN100") == []
    # Reprocessing cannot make it whole: it stays as it is, and says why.
    outcome = ingest.reprocess(row.id)
    assert outcome.status == "failed" and "cannot be reprocessed" in (outcome.error or "")
    assert rows(app) == [row]
    # Sent again (still too long): stored again and answered the same, no duplicate of anything.
    assert msa(handle_oversized(ingest, head, len(message)))[1:3] == ["AE", "BIG1"]
    assert [r.status for r in rows(app)] == ["failed", "failed"]
    # Within the limit (the limit raised), the same message is processed.
    assert msa(handle(ingest, message).decode())[1] == "AA"
    assert len(patients(client, identifier="MRN100")) == 1


def test_an_oversized_message_left_received_is_failed_by_reprocess_not_processed(app: Any, client: Any,
                                                                                ingest: Any) -> None:
    """Its process died between storing its start and failing it: `reprocess --stuck` finishes the job."""
    from gateway.hl7 import parse

    text = adt(control="BIGSTUCK")
    with ingest.store.writing() as repo:
        message_id = ingest._insert(repo, text, parse.read_header(text), "mllp", None, "hash",
                                    truncated_from=40_000_000).fetchone()[0]
    outcome = ingest.reprocess(message_id)
    assert outcome.status == "failed" and outcome.error == "message of 40,000,000 bytes exceeds the maximum size"
    (row,) = rows(app)
    assert (row.status, row.error_code) == ("failed", "104") and msa(row.ack)[1:3] == ["AE", "BIGSTUCK"]
    assert patients(client, identifier="MRN100") == []


def test_an_oversized_start_without_a_readable_msh_closes_the_connection(app: Any, ingest: Any) -> None:
    assert ingest.handle(b"\x00\x01" * 50_000, "mllp", size=10_000_000) is None
    assert rows(app) == []


def handle_oversized(ingest: Any, head: bytes, size: int) -> str:
    (reply,) = ingest.handle(head, "mllp", size=size)
    return reply.decode()


def test_failed_message_is_kept_and_reprocessed_after_a_fix(app: Any, client: Any, ingest: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.hl7 import ingest as ingest_module
    from gateway.hl7.translate import MappingError

    real = ingest_module.translate

    def broken(message: Any) -> Any:
        raise MappingError("mapping under repair", "207", "PID-5")

    monkeypatch.setattr(ingest_module, "translate", broken)
    ack = handle(ingest, adt().encode()).decode()
    assert msa(ack)[1] == "AE"
    assert "207" in next(s for s in ack.split("\r") if s.startswith("ERR"))
    (row,) = rows(app)
    assert (row.status, row.error_location) == ("failed", "PID-5")
    assert patients(client, identifier="MRN100") == []
    monkeypatch.setattr(ingest_module, "translate", real)
    outcome = ingest.reprocess(row.id)
    assert outcome.status == "processed"
    assert rows(app)[0].status == "processed"
    assert len(patients(client, identifier="MRN100")) == 1


def test_a_resource_that_fails_validation_rolls_back_the_whole_message(app: Any, client: Any,
                                                                      ingest: Any) -> None:
    bad_date = adt().replace("|19860412|", "|19861340|")
    ack = handle(ingest, bad_date.encode()).decode()
    assert msa(ack)[1] == "AE"
    assert rows(app)[0].status == "failed"
    assert patients(client, identifier="MRN100") == []


def test_trace_lists_what_the_message_wrote(app: Any, client: Any, ingest: Any) -> None:
    handle(ingest, adt().encode())
    (row,) = rows(app)
    trace = client.get(f"/hl7/messages/{row.id}").get_json()
    assert trace["raw"].startswith("MSH|") and trace["status"] == "processed"
    written = {(w["resource_type"], w["action"]) for w in trace["written"]}
    assert ("Patient", "created") in written


def test_http_receiver_runs_the_same_pipeline(app: Any, client: Any) -> None:
    response = client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2")
    assert response.status_code == 200
    assert msa(response.get_data(as_text=True))[1] == "AA"
    assert response.mimetype == "application/hl7-v2"
    assert client.post("/hl7/v2", data=b"{}", content_type="application/json").status_code == 415
    assert client.post("/hl7/v2", data=b"garbage", content_type="text/plain").status_code == 400


def test_http_receiver_answers_a_body_over_the_limit_413_with_its_nak_and_stores_its_start(
        app: Any, client: Any, settings: Any) -> None:
    message = _with_document("BIGHTTP", 3 * 1024 * 1024)
    assert len(message) > settings.max_body_bytes
    response = client.post("/hl7/v2", data=message, content_type="application/hl7-v2")
    assert response.status_code == 413
    assert msa(response.get_data(as_text=True))[1:3] == ["AE", "BIGHTTP"]
    (row,) = rows(app)
    assert (row.status, row.channel, row.truncated_from_bytes) == ("failed", "http", len(message))
    # sent chunked, without a length (gunicorn ends such a body for the app: wsgi.input_terminated):
    # read to its end to learn its length, never held whole
    chunked = {"headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True},
               "content_type": "application/hl7-v2"}
    response = client.post("/hl7/v2", input_stream=io.BytesIO(message), **chunked)
    assert response.status_code == 413
    assert rows(app)[-1].truncated_from_bytes == len(message)
    # a small body sent chunked is an ordinary message
    response = client.post("/hl7/v2", input_stream=io.BytesIO(adt(control="SMALL").encode()), **chunked)
    assert response.status_code == 200 and msa(response.get_data(as_text=True))[1] == "AA"


def test_http_receiver_requires_the_shared_secret(settings: Any) -> None:
    from gateway import create_app

    settings.open_access = False
    settings.hl7_http_secret = "s3cret-for-senders"
    app = create_app(settings)
    client = app.test_client()
    try:
        assert client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2",
                           headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-for-senders"}
        response = client.post("/hl7/v2", data=adt().encode(), content_type="application/hl7-v2", headers=right)
        assert response.status_code == 200 and msa(response.get_data(as_text=True))[1] == "AA"
    finally:
        # its audit writer would otherwise try to store its spool at exit, into a database the
        # session has dropped by then (a logged error at the end of the run)
        app.extensions["gateway"].close()


def test_mllp_end_to_end_over_a_real_socket(app: Any, client: Any, ingest: Any) -> None:
    listener = start_in_thread(lambda raw: ingest.handle(raw, "mllp"))
    try:
        acks = send_messages("127.0.0.1", listener.port,
                             [adt(control=f"M{i}", mrn=f"MRN{i}").encode() for i in range(5)])
    finally:
        listener.stop()
    assert [msa(a.decode())[1:3] for (a,) in acks] == [["AA", f"M{i}"] for i in range(5)]
    assert len(patients(client, identifier="MRN3")) == 1


def test_batch_gets_a_batch_ack_and_every_message_is_processed(app: Any, ingest: Any) -> None:
    envelope = "|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261101\r"
    batch = ("FHS" + envelope + "BHS" + envelope
             + adt(control="B1", mrn="MRN-B1") + adt(control="B2", mrn="MRN-B2") + "BTS|2\rFTS|1\r")
    ack = handle(ingest, batch.encode()).decode()
    assert ack.startswith(("FHS", "BHS"))
    assert [r.status for r in rows(app)] == ["processed", "processed"]


def test_a_batch_over_the_maximum_size_is_refused_whole_with_a_batch_nak(app: Any, client: Any, ingest: Any) -> None:
    """None of its messages is processed (the last ones are not all here): one row keeps its start,
    and the sender reads back a batch, as for any batch, holding the AE 104."""
    envelope = "|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261101||||FILE7\r"
    head = ("FHS" + envelope + "BHS" + envelope + adt(control="B1", mrn="MRN-B1") + adt(control="B2", mrn="MRN-B2")
            + "OBX|1|ED|PDF^Report||" + "A" * 5_000).encode()
    (reply,) = ingest.handle(head, "mllp", size=30_000_000)
    segments = reply.decode().split("\r")
    assert segments[0].startswith("FHS|") and segments[1].startswith("BHS|") and "FILE7" in segments[0]
    assert msa(reply.decode())[1:3] == ["AE", "B1"] and "BTS|1" in segments and "FTS|1" in segments
    assert "message of 30,000,000 bytes exceeds the maximum of" in next(s for s in segments if s.startswith("ERR"))
    (row,) = rows(app)
    assert (row.status, row.error_code, row.truncated_from_bytes) == ("failed", "104", 30_000_000)
    assert row.raw.startswith("FHS|") and "OBX" not in row.raw
    assert patients(client, identifier="MRN-B1") == []
    # Its first message asks for no acknowledgement (MSH-15/16 NE): a batch ACK holding none would
    # tell the sender that every message was accepted, so the NAK is in it all the same.
    quiet = head.replace(b"|P|2.5.1\r", b"|P|2.5.1|||NE|NE\r", 1)
    assert quiet != head
    (reply,) = ingest.handle(quiet, "mllp", size=30_000_000)
    assert msa(reply.decode())[1:3] == ["AE", "B1"] and "BTS|1" in reply.decode().split("\r")


def test_same_data_under_a_new_control_id_makes_no_new_version(app: Any, client: Any, ingest: Any) -> None:
    handle(ingest, adt("CTRL1").encode())
    (patient,) = patients(client, identifier="MRN100")
    assert msa(handle(ingest, adt("CTRL2").encode()).decode())[1] == "AA"
    (again,) = patients(client, identifier="MRN100")
    assert again["meta"]["versionId"] == patient["meta"]["versionId"]
    trace = client.get(f"/hl7/messages/{rows(app)[-1].id}").get_json()
    assert ("Patient", "unchanged") in {(w["resource_type"], w["action"]) for w in trace["written"]}
    # The same data in a newer message is written: its time now guards against older messages.
    handle(ingest, adt("CTRL3", time="20261102083000-0500").encode())
    (latest,) = patients(client, identifier="MRN100")
    assert int(latest["meta"]["versionId"]) == int(patient["meta"]["versionId"]) + 1
    assert latest["meta"]["source"].endswith(f"/hl7/messages/{rows(app)[-1].id}")


A40 = (
    "MSH|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261103083000-0500||ADT^A40^ADT_A39|{control}|P|2.5.1\r"
    "EVN|A40|20261103083000-0500\r"
    "PID|1||MRN200^^^RIVERSIDE^MR||Lopez^Ana^Maria||19860412|F\r"
    "MRG|MRN100^^^RIVERSIDE^MR\r"
)


def resource(client: Any, reference: str) -> dict[str, Any]:
    return client.get(f"/fhir/{reference}").get_json()


def test_a40_repoints_the_old_records_resources_and_links_the_two_once(app: Any, client: Any,
                                                                          ingest: Any) -> None:
    handle(ingest, adt("OLD1", mrn="MRN100").encode())  # the old record, with a visit (Encounter)
    handle(ingest, adt("NEW1", mrn="MRN200", time="20261102083000-0500").encode())
    (old,) = patients(client, identifier="MRN100")
    (survivor,) = patients(client, identifier="MRN200")
    old_ref, new_ref = f"Patient/{old['id']}", f"Patient/{survivor['id']}"
    (visit,) = [e["resource"] for e in client.get("/fhir/Encounter", query_string={"subject": old_ref})
                .get_json().get("entry", [])]

    assert msa(handle(ingest, A40.format(control="MERGE1").encode()).decode())[1] == "AA"
    merged_visit = resource(client, f"Encounter/{visit['id']}")
    assert merged_visit["subject"]["reference"] == new_ref
    old_now, survivor_now = resource(client, old_ref), resource(client, new_ref)
    assert old_now["active"] is False
    assert {"other": {"reference": new_ref}, "type": "replaced-by"} in old_now["link"]
    assert {"other": {"reference": old_ref}, "type": "replaces"} in survivor_now["link"]
    merge_row = rows(app)[-1]
    merged = {(w["resource_type"], w["action"]) for w in client.get(f"/hl7/messages/{merge_row.id}")
              .get_json()["written"]}
    assert {("Encounter", "merged"), ("Patient", "merged")} <= merged

    # The same merge again under a new control id (a sender's re-send): nothing new is written.
    assert msa(handle(ingest, A40.format(control="MERGE2").encode()).decode())[1] == "AA"
    again = {r: resource(client, r) for r in (old_ref, new_ref, f"Encounter/{visit['id']}")}
    assert [again[r]["meta"]["versionId"] for r in again] == [
        old_now["meta"]["versionId"], survivor_now["meta"]["versionId"], merged_visit["meta"]["versionId"]]
    assert len(old_now["link"]) == len(again[old_ref]["link"]) == 1
    actions = {w["action"] for w in client.get(f"/hl7/messages/{rows(app)[-1].id}").get_json()["written"]}
    assert "merged" not in actions and "unchanged" in actions


GLUCOSE = (
    "MSH|^~\\&|LAB|RIVERSIDE|GATEWAY|RIVERSIDE|{sent}||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
    "PID|1||MRN100^^^RIVERSIDE^MR||Lopez^Ana^Maria||19860412|F\r"
    "OBR|1|PLC1^EHR|FIL1^LAB|2345-7^Glucose^LN|||20261101070000-0500|||||||||||||||20261101080000-0500|||{status}\r"
    "OBX|1|NM|2345-7^Glucose^LN||{value}|mg/dL^mg/dL^UCUM|70-99|{flag}|||{status}\r"
)


def test_a_corrected_result_updates_the_same_observation_and_a_late_original_does_not_undo_it(
        client: Any, ingest: Any) -> None:
    def observations() -> list[dict[str, Any]]:
        bundle = client.get("/fhir/Observation", query_string={"code": "2345-7"}).get_json()
        return [e["resource"] for e in bundle.get("entry", [])]

    original = GLUCOSE.format(sent="20261101083000-0500", control="R1", status="F", value="182", flag="H")
    assert msa(handle(ingest, original.encode()).decode())[1] == "AA"
    (first,) = observations()
    assert (first["status"], first["valueQuantity"]["value"]) == ("final", 182)
    correction = GLUCOSE.format(sent="20261101093000-0500", control="R2", status="C", value="88", flag="N")
    assert msa(handle(ingest, correction.encode()).decode())[1] == "AA"
    (corrected,) = observations()  # the same Observation, a new version: no second result
    assert corrected["id"] == first["id"]
    assert int(corrected["meta"]["versionId"]) == int(first["meta"]["versionId"]) + 1
    assert (corrected["status"], corrected["valueQuantity"]["value"]) == ("corrected", 88)
    # the original again, late (a sender's retry under a new control id): older, so it changes nothing
    late = original.replace("|R1|", "|R3|")
    assert msa(handle(ingest, late.encode()).decode())[1] == "AA"
    (still,) = observations()
    assert (still["meta"]["versionId"], still["status"]) == (corrected["meta"]["versionId"], "corrected")


def test_an_updated_resource_is_read_once(app: Any, client: Any, ingest: Any) -> None:
    """The feed reads every resource of a message in one statement, and the update of one that
    changed goes from what was read: its row is not asked for again."""
    from tests.conftest import sql_run

    handle(ingest, adt("READ1").encode())
    newer = adt("READ2", family="Moreno", time="20261102083000-0500").encode()
    with sql_run(app.extensions["gateway"].engine) as statements:
        assert msa(handle(ingest, newer).decode())[1] == "AA"
    reads = [s for s in (" ".join(s.split()) for s in statements) if s.startswith("SELECT") and "FROM resource " in s]
    assert len(reads) == 1, reads  # the Patient updated, the Encounter (keyed on the control id) created
    (patient,) = patients(client, identifier="MRN100")
    assert (patient["name"][0]["family"], patient["meta"]["versionId"]) == ("Moreno", "2")
    # a deleted record that a message names again is written as its next version
    with app.extensions["gateway"].store.writing() as repo:
        repo.delete("Patient", patient["id"])
    assert msa(handle(ingest, adt("READ3", family="Moreno", time="20261103083000-0500").encode()).decode())[1] == "AA"
    (patient,) = patients(client, identifier="MRN100")
    assert (patient["name"][0]["family"], patient["meta"]["versionId"]) == ("Moreno", "4")


ORU = (
    "MSH|^~\\&|LAB|RIVERSIDE|GATEWAY|RIVERSIDE|20261101090000-0500||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
    "PID|1||MRN100^^^RIVERSIDE^MR||Lopez^Ana^Maria||19860412|F\r"
    "OBR|1|{control}P|{control}F|24331-1^Lipid panel^LN|||20261101080000-0500||||||||||||||||||F\r"
    "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL|<200||||F\r"
    "OBX|2|NM|2571-8^Triglyceride^LN||140|mg/dL|<150||||F\r"
    "OBX|3|NM|2085-9^HDL^LN||52|mg/dL|>40||||F\r"
    "OBX|4|NM|13457-7^LDL^LN||102|mg/dL|<130||||F\r"
)


def _round_trips(app: Any, ingest: Any, message: str, trace_path: Any) -> list[list[str]]:
    """Handle a message; what went to PostgreSQL before each wait for its answers."""
    from tests.conftest import pg_round_trips

    with pg_round_trips(app.extensions["gateway"].engine, trace_path) as trips:
        assert msa(handle(ingest, message.encode()).decode())[1] == "AA"
    return trips


def test_a_message_waits_on_five_or_six_round_trips_to_postgresql_however_many_resources_it_writes(
        app: Any, ingest: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Each round trip to the server is time a sender waits for its ACK (0.1-0.4 ms on this machine,
    a millisecond or more to a database on another host). Storing the message: the BEGIN, the earlier
    copy asked for and the insert together; then the COMMIT (with the setting that makes it
    asynchronous). Applying it: the BEGIN, the lock, the earlier copy asked again and the resources
    read, together; the new and changed resources' rows, together however many there are; their index
    rows, their history rows, what was written, the AuditEvent, the status and the COMMIT together;
    and for new results, once, who is to hear of them (the portal's notifications). (A changed
    Patient took 26 when SET LOCAL, the lock, each index table's deletes and inserts, the rows
    written, the AuditEvent and the status went one by one; then 8, and one more for each new or
    changed resource, until the resources' rows went together and each BEGIN with the first
    statements of its transaction.)"""
    if not db.is_postgres(app.extensions["gateway"].engine):
        pytest.skip("round trips are PostgreSQL's")
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)  # no ping of a pooled connection before use
    handle(ingest, adt("TRIPS1").encode())
    changed_patient = _round_trips(app, ingest, adt("TRIPS2", family="Nuñez"), tmp_path / "adt.trace")
    assert len(changed_patient) == 5, "\n".join(" | ".join(trip) for trip in changed_patient)
    assert [trip[0] for trip in changed_patient].count("BEGIN") == 2
    assert changed_patient[3] == ["UPDATE resource SET version_id=$1::INTEG"]
    # a report and four results, all new, and the Patient: still one round trip for their rows, and
    # one to ask who is to hear of the new results (once for the patient, not once a result)
    results = _round_trips(app, ingest, ORU.format(control="TRIPS3"), tmp_path / "oru.trace")
    assert len(results) == 6, "\n".join(" | ".join(trip) for trip in results)
    assert sum(statement.startswith("INSERT INTO resource ") for statement in results[3]) == 5, results[3]
    assert [trip for trip in results if any("auth_user" in statement for statement in trip)] == [results[4]]


def test_an_update_given_another_resources_current_version_is_refused(app: Any) -> None:
    store = app.extensions["gateway"].store
    with store.writing() as repo:
        first = repo.update("Patient", "p-one", {"resourceType": "Patient", "id": "p-one"}).stored
    with pytest.raises(ValueError, match="Patient/p-one, not Patient/p-two"), store.writing() as repo:
        repo.update("Patient", "p-two", {"resourceType": "Patient", "id": "p-two", "active": True}, current=first)


def test_a_database_that_cannot_be_reached_gets_a_nak_ae_207_not_a_closed_connection() -> None:
    from gateway.fhir.store import FhirStore
    from gateway.hl7.ingest import Ingestor
    from tests.conftest import free_port

    engine = db.make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/gone")  # nothing listens there
    try:
        ack = handle(Ingestor(FhirStore(engine, "http://testserver/fhir"), "http://testserver"),
                     adt("DOWN1").encode()).decode()
    finally:
        engine.dispose()
    assert msa(ack)[1:3] == ["AE", "DOWN1"]
    err = next(s for s in ack.split("\r") if s.startswith("ERR|")).split("|")
    assert err[3].startswith("207^") and "send it again" in ack


WARM_UP_CHECK = """
import gc, sys, tempfile
from pathlib import Path
from gateway import build_services, db
from gateway.config import Settings
from gateway.hl7 import parse
from gateway.hl7.ingest import warm_up

url = f"sqlite:///{tempfile.mkdtemp()}/warm.sqlite"
db.upgrade(db.make_engine(url))
services = build_services(Settings.from_env(environ={}, database_url=url))
warm_up()
assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()
loaded = set(sys.modules)
for path in sys.argv[1:]:  # what each answer says: test_corpus_mllp
    services.hl7.handle(Path(path).read_bytes())
print("new modules:", sorted(m for m in set(sys.modules) - loaded if m.startswith("fhir")))
services.close()
"""


def test_a_warmed_up_listener_loads_nothing_more_for_its_first_messages(tmp_path: Any) -> None:
    """warm_up() loads the maps, ACK templates and, for every resource type the maps write, the FHIR
    model and search parameters, then freezes them out of the garbage collector's full collections;
    the first message of each kind in the corpus then imports no FHIR model (each import would be
    time its sender waits)."""
    import subprocess
    import sys
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
    files = sorted(str(p) for p in corpus.glob("*.hl7"))
    if not files:
        pytest.skip("../shared/corpus is not beside the checkout")
    done = subprocess.run([sys.executable, "-c", WARM_UP_CHECK, *files], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new modules: []" in done.stdout, done.stdout
