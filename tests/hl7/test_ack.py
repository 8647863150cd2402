"""ACKs: codes, MSA-2, ERR, swapped addresses, versions and separators, validated with hl7apy."""

from __future__ import annotations

import time
from pathlib import Path

import hl7
import pytest
from hl7apy import SUPPORTED_LIBRARIES

from gateway.hl7 import ack, parse
from gateway.hl7.parse import get, segments

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
CORPUS_FILES = sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


def original(version: str = "2.5", msh2: str = "^~\\&", control_id: str = "CTRL-42", extra: str = "") -> str:
    c = msh2[0]
    return (f"MSH|{msh2}|SENDAPP{c}1.2.3{c}ISO|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT{c}A08{c}ADT_A01"
            f"|{control_id}|P|{version}{extra}\rPID|1||MRN1\r")


def header(**kwargs: str) -> parse.Header:
    return parse.read_header(original(**kwargs))


def fields(er7: str, name: str) -> list[str]:
    """The raw fields of the first segment `name`, indexed like the standard (fields[1] is <name>-1)."""
    line = next(s for s in er7.split("\r") if s.startswith(name))
    separator = line[3]
    parts = line.split(separator)
    return [name, separator, *parts[1:]] if name == "MSH" else parts


@pytest.mark.parametrize("code", ack.ACK_CODES)
def test_every_acknowledgement_code_validates(code: str) -> None:
    er7 = ack.build_ack(header(), code)
    ack.validate_ack(er7)
    assert fields(er7, "MSA")[1:3] == [code, "CTRL-42"]
    assert er7.endswith("\r") and "\n" not in er7


def test_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError):
        ack.build_ack(header(), "OK")


def test_msh_answers_the_original() -> None:
    er7 = ack.build_ack(header(), "AA")
    msh = fields(er7, "MSH")
    assert msh[3:7] == ["RECVAPP", "RECVFAC", "SENDAPP^1.2.3^ISO", "SENDFAC"]  # sender and receiver swapped
    assert msh[9] == "ACK^A08^ACK"
    assert msh[10] and msh[10] != "CTRL-42"
    assert msh[10] != fields(ack.build_ack(header(), "AA"), "MSH")[10]  # a fresh control id every time
    assert (msh[11], msh[12]) == ("P", "2.5")
    assert len(msh[7]) >= 14 and msh[7][:8].isdigit()
    assert fields(ack.build_ack(header(), "AA", control_id="MINE"), "MSH")[10] == "MINE"


@pytest.mark.parametrize("version", sorted(SUPPORTED_LIBRARIES))
def test_every_hl7apy_version_validates(version: str) -> None:
    for code, text, error in [("AA", None, None), ("AE", "bad date", ("102", "PID-7", "E")),
                              ("CR", "no such event", ("201", "MSH-9", "E")), ("AA", "note", None)]:
        er7 = ack.build_ack(header(version=version), code, text, error)
        ack.validate_ack(er7)
        # 2.1 has a TS definition hl7apy cannot satisfy, so those ACKs are v2.5
        assert fields(er7, "MSH")[12] == (version if version != "2.1" else "2.5")
        assert fields(er7, "MSA")[2] == "CTRL-42"


def test_unsupported_version_falls_back_to_2_5() -> None:
    for version in ("2.7.1", "3.0", ""):
        er7 = ack.build_ack(header(version=version), "AA")
        ack.validate_ack(er7)
        assert fields(er7, "MSH")[12] == "2.5"


def test_err_segment_in_v2_5() -> None:
    er7 = ack.build_ack(header(), "AE", "Application internal error", ("207", "PID^1^7", "E"))
    ack.validate_ack(er7)
    err = fields(er7, "ERR")
    assert err[2] == "PID^1^7"
    assert err[3] == "207^Application internal error^HL70357"
    assert err[4] == "E"
    assert fields(er7, "MSA")[3] == "Application internal error"


@pytest.mark.parametrize("location, expected", [
    ("PID-7", "PID^1^7"),
    ("PID^1^7", "PID^1^7"),
    ("MSH-9", "MSH^1^9"),
    ("OBX[2]-5.1", "OBX^2^5^^1"),
    ("PID-5.1.2", "PID^1^5^^1^2"),
    ("ZPD", "ZPD^1"),
    (None, ""),
    ("somewhere in the message", ""),
])
def test_error_locations(location: str | None, expected: str) -> None:
    er7 = ack.build_ack(header(), "AE", None, ("102", location, "W"))
    ack.validate_ack(er7)
    err = fields(er7, "ERR")
    assert (err[2] if len(err) > 2 else "") == expected
    assert err[4] == "W"


def test_v2_7_moves_the_text_from_msa_3_to_err_8() -> None:
    er7 = ack.build_ack(header(version="2.8"), "AR", "unsupported event", ("201", "MSH-9", "E"))
    ack.validate_ack(er7)
    assert len(fields(er7, "MSA")) == 3
    err = fields(er7, "ERR")
    assert err[3] == "201^Unsupported event code^HL70357" and err[8] == "unsupported event"
    note = ack.build_ack(header(version="2.8"), "AA", "accepted with a note")
    assert fields(note, "ERR")[3:5] == ["0^Message accepted^HL70357", "I"]


def test_v2_4_puts_location_and_code_in_err_1() -> None:
    er7 = ack.build_ack(header(version="2.4"), "AE", "bad", ("102", "PID-7", "E"))
    ack.validate_ack(er7)
    assert fields(er7, "ERR")[1] == "PID^1^7^102&Data type error&HL70357"
    assert fields(ack.build_ack(header(version="2.3"), "AA"), "MSH")[9] == "ACK^A08"  # MSG had 2 parts then


def test_text_is_escaped_and_ascii() -> None:
    text = "bad value |x^y&z~w\\ in Ren\u00e9e's record\nsecond line"
    er7 = ack.build_ack(header(), "AE", text, ("102", "PID-5", "E"))
    ack.validate_ack(er7)
    er7.encode("ascii")
    msg = parse.parse(er7)
    assert get(msg, "MSA-3") == "bad value |x^y&z~w\\ in Renee's record\nsecond line"[:80]
    assert get(msg, "ERR-8") == "bad value |x^y&z~w\\ in Renee's record\nsecond line"


@pytest.mark.parametrize("msh2", ["*~\\&", "^~/&", "^#\\$"])
def test_non_standard_encoding_characters_are_kept(msh2: str) -> None:
    original_header = header(msh2=msh2, control_id="C-1")
    er7 = ack.build_ack(original_header, "AE", "bad^value", ("102", "PID-7", "E"))
    ack.validate_ack(er7)
    assert er7.startswith("MSH|" + msh2 + "|")
    msg = parse.parse(er7)
    assert get(msg, "MSA-2") == "C-1"
    assert get(msg, "MSH-5.2") == "1.2.3" and get(msg, "MSH-9.2") == "A08"
    assert get(msg, "ERR-2.1") == "PID" and get(msg, "ERR-2.3") == "7" and get(msg, "ERR-3.1") == "102"
    assert get(msg, "ERR-8") == "bad^value"


def test_field_separator_other_than_bar() -> None:
    text = "MSH#^~\\&#APP#FAC#GW#GWF#20240101##ORU^R01#77#P#2.5\rOBX#1\r"
    er7 = ack.build_ack(parse.read_header(text), "AA")
    ack.validate_ack(er7)
    assert er7.startswith("MSH#^~\\&#GW#GWF#APP#FAC#")
    assert fields(er7, "MSA")[1:3] == ["AA", "77"]


def test_five_character_encoding_characters() -> None:
    er7 = ack.build_ack(header(version="2.8", msh2="^~\\&#", control_id="C#1"), "AE", "a#b", ("207", None, "E"))
    ack.validate_ack(er7)
    assert er7.startswith("MSH|^~\\&#|")
    assert fields(er7, "MSA")[2] == "C#1"  # MSA-2 is MSH-10 exactly as sent
    assert fields(er7, "ERR")[8] == "a\\P\\b"
    older = ack.build_ack(header(version="2.5", msh2="^~\\&#"), "AA")  # before v2.7 hl7apy allows 4 only
    ack.validate_ack(older)
    assert older.startswith("MSH|^~\\&|")


def test_separators_hl7apy_refuses_fall_back_to_standard_ones_and_copied_fields_are_recoded() -> None:
    # "." as component separator would split the ACK's own version "2.5": hl7apy refuses the sample
    text = "MSH|.~\\&|A\\S\\B.X|FAC|||20240101||ADT.A01|ID\\F\\1^2|P|2.5\r"
    original_header = parse.read_header(text)
    assert original_header.separators.component == "."
    er7 = ack.build_ack(original_header, "AA")
    ack.validate_ack(er7)
    assert er7.startswith("MSH|^~\\&|")
    msh = fields(er7, "MSH")
    assert msh[5] == "A.B^X" and msh[9] == "ACK^A01^ACK"
    assert fields(er7, "MSA")[2] == "ID\\F\\1\\S\\2"  # the same control id, escaped for the ACK's separators
    assert get(parse.parse(er7), "MSA-2") == "ID|1^2"


def test_charset_is_copied_and_encode_ack_uses_it() -> None:
    latin = header(extra="||||||8859/1")
    er7 = ack.build_ack(latin, "AA")
    ack.validate_ack(er7)
    assert fields(er7, "MSH")[18] == "8859/1"
    assert ack.encode_ack("MSH|\u00e9\r", latin) == b"MSH|\xe9\r"
    assert ack.encode_ack("MSH|\u00e9\r", header()) == "MSH|\u00e9\r".encode()
    assert ack.encode_ack("MSH|x\r", None) == b"MSH|x\r"


def test_a_header_built_without_its_raw_fields_still_gets_a_full_ack() -> None:
    full = header()
    bare = parse.Header(**{name: getattr(full, name) for name in full.__dataclass_fields__ if name != "fields"})
    er7 = ack.build_ack(bare, "AA")
    ack.validate_ack(er7)
    assert fields(er7, "MSH")[3:7] == ["RECVAPP", "RECVFAC", "SENDAPP", "SENDFAC"]
    assert fields(er7, "MSA")[2] == "CTRL-42"


def test_warm_up_prepares_layouts() -> None:
    ack.warm_up(["2.4", "2.6"])
    assert ack._validated_layout("2.6", parse.STANDARD_SEPARATORS) is not None


@pytest.mark.skipif(not CORPUS_FILES, reason="../shared/corpus is not beside the checkout")
def test_an_ack_for_every_corpus_message_validates() -> None:
    for path in CORPUS_FILES:
        text = parse.normalize(parse.decode(path.read_bytes()))
        original_header = parse.read_header(text)
        er7 = ack.build_ack(original_header, "AA")
        ack.validate_ack(er7)
        assert fields(er7, "MSA")[2] == original_header.raw(10)


def test_build_ack_rate() -> None:
    """Every message gets an ACK: building one must cost far less than handling the message."""
    original_header = header()
    ack.build_ack(original_header, "AA")
    count = 2000
    started = time.perf_counter()
    for _ in range(count):
        ack.build_ack(original_header, "AE", "internal error", ("207", "PID-3", "E"))
    rate = count / (time.perf_counter() - started)
    assert rate > 2000, f"{rate:.0f} ACKs/s"


# --- batches ---

BATCH = (
    "FHS|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||||FILE-1\r"
    "BHS|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||||BATCH-1\r"
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||ADT^A01|M1|P|2.5\rPID|1||1\r"
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||ADT^A08|M2|P|2.5\rPID|1||2\r"
    "BTS|2\r"
    "FTS|1\r"
)


def test_batch_ack_wraps_every_ack_in_the_answering_envelope() -> None:
    acks = [ack.build_ack(parse.read_header(m), code) for m, code in zip(parse.split_batch(BATCH), ("AA", "AE"),
                                                                           strict=True)]
    er7 = ack.build_batch_ack(BATCH, acks)
    lines = er7.rstrip("\r").split("\r")
    assert [line[:3] for line in lines] == ["FHS", "BHS", "MSH", "MSA", "MSH", "MSA", "BTS", "FTS"]
    bhs = fields(er7, "BHS")
    assert bhs[2:6] == ["RECVAPP", "RECVFAC", "SENDAPP", "SENDFAC"]
    assert bhs[10] and bhs[11] == "BATCH-1"
    assert fields(er7, "FHS")[11] == "FILE-1"
    assert fields(er7, "BTS")[1] == "2" and fields(er7, "FTS")[1] == "1"
    batch = hl7.parse_file(er7)
    assert [str(m.segment("MSA")(2)) for b in batch for m in b] == ["M1", "M2"]
    for inner in parse.split_batch(er7):
        ack.validate_ack(inner)
    assert [get(parse.parse(m), "MSA-1") for m in parse.split_batch(er7)] == ["AA", "AE"]


def test_batch_ack_without_envelope() -> None:
    run = parse.split_batch(BATCH)
    text = "".join(run)
    er7 = ack.build_batch_ack(text, [ack.build_ack(parse.read_header(m), "AA") for m in run])
    assert er7.startswith("BHS|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|")
    assert segments(parse.parse(parse.split_batch(er7)[0]), "MSA")
    assert er7.rstrip("\r").endswith("BTS|2")
