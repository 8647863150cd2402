"""Tolerant ER7 parsing: bytes to text, line endings, headers, batches, escapes and accessors."""

from __future__ import annotations

import codecs
import contextlib
import re
from pathlib import Path

import hl7
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.hl7 import parse
from gateway.hl7.parse import NULL, ParseError, Separators, get, is_null, reps, segments

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
CORPUS_FILES = sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not CORPUS_FILES, reason="../shared/corpus is not beside the checkout")

ADT = (
    "MSH|^~\\&|SENDAPP^1.2.3^ISO|SENDFAC|RECVAPP|RECVFAC|20240102030405+0100||ADT^A01^ADT_A01|CTRL-1|P|2.5.1"
    "|||AL|NE||UNICODE UTF-8\r"
    "EVN|A01|20240102030405\r"
    "PID|1||MRN1^^^HOSP^MR~SSN9^^^USSSA^SS||Doe^Jane^Q||19800101|F|||1 Main St^^Town^ST^12345||\"\"\r"
    "ZPD|1|custom^value\r"
)


def message(text: str = ADT) -> parse.Message:
    return parse.parse(text)


# --- the corpus ---


@needs_corpus
@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_every_corpus_message_decodes_normalizes_parses_and_has_a_header(path: Path) -> None:
    text = parse.normalize(parse.decode(path.read_bytes()))
    assert text.startswith("MSH") and "\n" not in text and text.endswith("\r")
    header = parse.read_header(text)
    msg = parse.parse(text)
    assert header.control_id == get(msg, "MSH-10")
    assert header.message_code == get(msg, "MSH-9.1")
    assert header.trigger_event == (get(msg, "MSH-9.2") or "")
    assert header.version == get(msg, "MSH-12")
    assert header.sending_app == (get(msg, "MSH-3") or "")
    assert parse.split_batch(text) == [text]


@needs_corpus
def test_accessors_agree_with_python_hl7_on_every_corpus_value() -> None:
    """python-hl7's extract_field is the reference wherever it unescapes right (\\T\\ etc.)."""
    compared = 0
    for path in CORPUS_FILES:
        text = parse.normalize(parse.decode(path.read_bytes()))
        ours, reference = parse.parse(text), hl7.parse(text)
        for position, segment in enumerate(reference):
            name = segment[0][0]
            for field_no in range(3 if name == "MSH" else 1, len(segment)):
                field = segment[field_no]
                for rep_no, rep in enumerate(field if not isinstance(field[0], str) else [field[0]]):
                    components = [rep] if isinstance(rep, str) else rep
                    for comp_no, component in enumerate(components, start=1):
                        subs = [component] if isinstance(component, str) else component
                        for sub_no in range(1, len(subs) + 1):
                            expected = segment.extract_field(1, field_no, rep_no + 1, comp_no, sub_no)
                            got = get(ours.segments[position], f"{name}-{field_no}.{comp_no}.{sub_no}",
                                      repetition=rep_no)
                            assert (got or "") == ("" if expected == '""' else expected), (path.name, field_no)
                            compared += 1
    assert compared > 20_000


@needs_corpus
def test_corpus_files_with_a_bom_and_with_crlf_are_read() -> None:
    raws = [p.read_bytes() for p in CORPUS_FILES]
    with_bom = [r for r in raws if r.startswith(codecs.BOM_UTF8)]
    assert with_bom, "the corpus is known to hold files with a BOM"
    for raw in with_bom:
        assert parse.decode(raw).startswith("MSH")


# --- bytes to text ---


def test_bom_is_dropped() -> None:
    assert parse.decode(codecs.BOM_UTF8 + ADT.encode()) == ADT
    assert parse.normalize("\ufeff" + ADT) == ADT


def test_msh18_8859_1_decodes_latin1_bytes() -> None:
    raw = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||Ren\u00e9e^Jos\u00e9\r".encode("latin-1")
    text = parse.decode(raw)
    assert get(parse.parse(text), "PID-5.1") == "Ren\u00e9e"
    assert parse.read_header(text).charset == "8859/1"


def test_msh18_unicode_utf8_and_default_utf8() -> None:
    body = "PID|1||1||\u5c71\u7530^\u592a\u90ce\r"
    declared = ("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||UNICODE UTF-8\r" + body).encode()
    undeclared = ("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r" + body).encode()
    for raw in (declared, undeclared):
        assert get(parse.parse(parse.decode(raw)), "PID-5.1") == "\u5c71\u7530"


def test_wrong_or_unknown_charset_falls_back_without_raising() -> None:
    lying_ascii = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||ASCII\rPID|1||1||Ren\u00e9e\r".encode()
    assert "Ren\u00e9e" in parse.decode(lying_ascii)  # declared ASCII, sent UTF-8
    not_utf8 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1||1||Ren\xe9e\r"
    assert "Ren\u00e9e" in parse.decode(not_utf8)  # latin-1 fallback
    unknown = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||HEX\rPID|1||1||x\r"
    assert parse.decode(unknown).endswith("x\r")  # a name that is no table 0211 value never reaches codecs


def test_utf16_with_bom_and_every_table_0211_codec_exists() -> None:
    assert parse.decode(ADT.encode("utf-16")) == ADT
    assert parse.decode(ADT.encode("utf-16-le")) == ADT
    for codec in parse.CHARSETS.values():
        codecs.lookup(codec)
    assert parse.codec_for("unicode  utf-8") == "utf-8"
    assert parse.codec_for(None) is None


def test_iso2022_and_gb18030_declarations_are_honoured() -> None:
    header = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||GB 18030-2000\r"
    raw = header.encode("ascii") + "PID|1||1||\u5f20^\u4e09\r".encode("gb18030")
    assert get(parse.parse(parse.decode(raw)), "PID-5.1") == "\u5f20"


# --- line endings ---


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n", "mixed"])
def test_segment_separators_are_normalized(ending: str) -> None:
    lines = ADT.rstrip("\r").split("\r")
    if ending == "mixed":
        text = lines[0] + "\r\n" + lines[1] + "\n" + lines[2] + "\r" + lines[3] + "\n"
    else:
        text = ending.join(lines) + ending
    assert parse.normalize(text) == ADT
    assert get(parse.parse(text), "PID-5.2") == "Jane"


def test_empty_and_whitespace_lines_are_dropped_and_the_rest_kept_exactly() -> None:
    text = "\n\nMSH|^~\\&|A||||20240101||ADT^A01|1|P|2.5\n   \n\t\nPID|1||x  y ||\n\n"
    assert parse.normalize(text) == "MSH|^~\\&|A||||20240101||ADT^A01|1|P|2.5\rPID|1||x  y ||\r"
    assert parse.normalize("") == "" and parse.normalize("\r\n \n") == ""


# --- headers ---


def test_read_header_fields() -> None:
    header = parse.read_header(ADT)
    assert (header.field_separator, header.encoding_characters) == ("|", "^~\\&")
    assert (header.sending_app, header.sending_facility) == ("SENDAPP", "SENDFAC")
    assert (header.receiving_app, header.receiving_facility) == ("RECVAPP", "RECVFAC")
    assert header.timestamp == "20240102030405+0100"
    assert (header.message_code, header.trigger_event, header.message_structure) == ("ADT", "A01", "ADT_A01")
    assert (header.control_id, header.processing_id, header.version) == ("CTRL-1", "P", "2.5.1")
    assert (header.accept_ack_type, header.app_ack_type, header.charset) == ("AL", "NE", "UNICODE UTF-8")
    assert header.message_code_and_trigger == "ADT^A01"
    assert header.raw(3) == "SENDAPP^1.2.3^ISO" and header.raw(40) == ""


def test_headers_are_kept_by_their_msh_line_and_only_ordinary_ones() -> None:
    """The header is read at every step of a message: recent ones are kept, keyed by the MSH line
    (not the message, which may carry megabytes), and an MSH line of unusual length is not kept."""
    parse._recent_header.cache_clear()
    first = parse.read_header(ADT)
    again = parse.read_header(ADT + "OBX|1|ED|PDF||" + "A" * 100_000 + "\r")
    assert again is first and parse._recent_header.cache_info().hits == 1
    long_line = ADT.replace("SENDAPP^1.2.3^ISO", "X" * (parse.MSH_LINE_KEPT + 1), 1)
    assert parse.read_header(long_line).sending_app == "X" * (parse.MSH_LINE_KEPT + 1)
    assert parse._recent_header.cache_info().currsize == 1


def test_read_header_when_the_body_is_broken() -> None:
    text = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|77|P|2.3\r\x00\x01garbage without structure\r|||\r"
    assert parse.read_header(text).control_id == "77"
    with pytest.raises(ParseError):
        parse.parse("junk line first\r" + text)


def test_five_character_encoding_characters() -> None:
    text = "MSH|^~\\&#|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.7\rPID|1||1||Smith\\P\\1^Al#\r"
    header = parse.read_header(text)
    assert header.encoding_characters == "^~\\&#" and header.separators.truncation == "#"
    msg = parse.parse(text)
    assert get(msg, "PID-5.1") == "Smith#1"
    assert get(msg, "PID-5.2") == "Al#"
    assert get(msg, "MSH-2") == "^~\\&#"


@pytest.mark.parametrize("msh, component, repetition, escape, subcomponent", [
    ("MSH|*~\\&", "*", "~", "\\", "&"),
    ("MSH!@#$%", "@", "#", "$", "%"),
    ("MSH|^~/&", "^", "~", "/", "&"),
])
def test_non_standard_encoding_characters(msh: str, component: str, repetition: str, escape: str,
                                          subcomponent: str) -> None:
    field = msh[3]
    f = field.join
    pid = f(["PID", "1", "", f"MRN1{component}{component}{component}H{subcomponent}X{repetition}MRN2", "",
             f"Do{escape}F{escape}e{component}Ja{escape}S{escape}ne"])
    text = msh + f(["", "APP", "FAC", "", "", "20240101", "", f"ADT{component}A01", "9", "P", "2.5"])
    text += "\r" + pid + "\r"
    header = parse.read_header(text)
    assert header.separators == Separators(field, component, repetition, escape, subcomponent)
    assert (header.sending_app, header.trigger_event) == ("APP", "A01")
    msg = parse.parse(text)
    assert get(msg, "PID-5.1") == f"Do{field}e"
    assert get(msg, "PID-5.2") == f"Ja{component}ne"
    assert get(msg, "PID-3.4.2") == "X"
    assert reps(msg, "PID-3.1") == ["MRN1", "MRN2"]


@pytest.mark.parametrize("text", [
    "",
    "\x00\x01\x02\x03" * 20,
    "PID|1||x\rOBX|1\r",
    "MSH",
    "MSH\r",
    "MSH ^~\\&|A|B\r",  # whitespace where the field separator belongs
    "MSHA^~\\&|A|B\r",  # a letter cannot be a separator
    "MSH^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r",  # field separator misplaced: MSH-2 becomes nonsense
    "MSH|^^\\&|A\r",  # duplicate encoding characters
    "MSH|^~\\&#!?|A\r",  # too many
])
def test_unreadable_headers_raise_parse_error(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse.read_header(text)
    assert info.value.code == "100" and info.value.location and info.value.location.startswith("MSH")
    with pytest.raises(ParseError):
        parse.parse(text)


def test_binary_garbage_bytes_decode_but_have_no_header() -> None:
    garbage = bytes(range(256)) * 10
    with pytest.raises(ParseError):
        parse.read_header(parse.normalize(parse.decode(garbage)))


def test_required_header_fields_give_table_0357_codes() -> None:
    with pytest.raises(ParseError) as info:
        parse.parse("MSH|^~\\&|A|B|C|D|20240101|||1|P|2.5\r")
    assert (info.value.code, info.value.location) == ("101", "MSH-9")
    with pytest.raises(ParseError) as info:
        parse.parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01||P|2.5\r")
    assert (info.value.code, info.value.location) == ("101", "MSH-10")
    assert str(info.value) == "MSH-10 message control id is missing (at MSH-10)"


def test_first_mrn() -> None:
    assert parse.first_mrn(ADT) == "MRN1"
    assert parse.first_mrn(ADT.replace("MRN1^^^HOSP^MR~SSN9^^^USSSA^SS", "SSN9^^^USSSA^SS~MRN7^^^H^MR")) == "MRN7"
    assert parse.first_mrn(ADT.replace("MRN1^^^HOSP^MR~SSN9^^^USSSA^SS", "X1")) == "X1"
    assert parse.first_mrn("MSH|^~\\&|A\rEVN|A01\r") is None
    assert parse.first_mrn("garbage") is None


def _line_by_regex(text: str, name: str) -> str | None:
    """What _segment_line did before it used str.find: the reference it must agree with."""
    match = re.search(rf"(?:^|[\r\n])[ \t]*({re.escape(name)}[^\r\n]*)", text)
    return match.group(1) if match else None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["PID", "MSH", "P", "ID", "|", "^", " ", "\t", "\r", "\n", "x", "PIDX", "1"]),
                max_size=30).map("".join), st.sampled_from(["PID", "MSH", "PV1"]))
def test_segment_lines_are_found_as_the_regex_found_them(text: str, name: str) -> None:
    assert parse._segment_line(text, name) == _line_by_regex(text, name)


@needs_corpus
@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_segment_lines_of_corpus_messages_are_found_as_the_regex_found_them(path: Path) -> None:
    text = parse.decode(path.read_bytes())
    for name in ("MSH", "PID", "OBX", "ZZZ", "NTE"):
        assert parse._segment_line(text, name) == _line_by_regex(text, name)


# --- escapes ---


@pytest.mark.parametrize("escaped, plain", [
    ("a\\F\\b", "a|b"),
    ("a\\S\\b", "a^b"),
    ("a\\T\\b", "a&b"),
    ("a\\R\\b", "a~b"),
    ("a\\E\\b", "a\\b"),
    ("\\X41\\", "A"),
    ("caf\\XC3A9\\", "caf\u00e9"),  # UTF-8 bytes in one sequence
    ("caf\\XC3\\\\XA9\\", "caf\u00e9"),  # ... or split over adjacent sequences
    ("caf\\XE9\\", "caf\u00e9"),  # not UTF-8: latin-1
    ("line1\\.br\\line2", "line1\nline2"),
    ("a\\.sp2\\b", "a\n\nb"),
    ("a\\.sk3\\b", "a   b"),
    ("\\.ce\\title", "\ntitle"),
    ("\\.in+4\\\\.ti-2\\\\.fi\\\\.nf\\x", "x"),
    ("\\H\\bold\\N\\", "bold"),
    ("\\Zlocal\\x", "x"),
    ("\\C2842\\x", "x"),
    ("C:\\temp\\file", "C:\\temp\\file"),  # an unescaped Windows path is kept, not eaten
    ("\\X4\\", "\\X4\\"),  # malformed hex is kept as sent
    ("\\.sp99999999\\", "\n" * 100),  # bounded
    ("no escapes", "no escapes"),
    ("trailing \\", "trailing \\"),
])
def test_escape_sequences(escaped: str, plain: str) -> None:
    assert parse.unescape(escaped) == plain
    text = f"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rOBX|1|TX|||{escaped}\r"
    assert get(parse.parse(text), "OBX-5") == (plain or None)


def test_escapes_follow_the_message_escape_character() -> None:
    text = "MSH|^~/&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rOBX|1|TX|||a/F/b/.br/c/E/d\\e\r"
    assert get(parse.parse(text), "OBX-5") == "a|b\nc/d\\e"


# --- repetitions, nulls, Z-segments ---


def test_repetitions() -> None:
    msg = message()
    assert reps(msg, "PID-3.1") == ["MRN1", "SSN9"]
    assert reps(msg, "PID-3.5") == ["MR", "SS"]
    assert reps(msg, "PID-3.2") == [None, None]
    assert get(msg, "PID-3.4", repetition=1) == "USSSA"
    assert get(msg, "PID-3.1", repetition=2) is None
    assert reps(msg, "PID-4") == [] and reps(msg, "PID-99") == [] and reps(msg, "OBX-3") == []


def test_explicit_null_differs_from_empty() -> None:
    msg = message()
    assert get(msg, "PID-13") is NULL and is_null(get(msg, "PID-13"))
    assert get(msg, "PID-13.2") is NULL  # a null field clears every component
    assert get(msg, "PID-12") is None and not is_null(get(msg, "PID-12"))
    assert get(msg, "PID-40") is None
    assert not NULL and NULL == "" and repr(NULL) == "NULL"
    text = "MSH|^~\\&|A|B|C|D|20240101||ADT^A08|1|P|2.5\rPID|1||1||Doe^\"\"^^\"\"~\"\"\r"
    msg = parse.parse(text)
    assert get(msg, "PID-5.1") == "Doe"
    assert is_null(get(msg, "PID-5.2")) and get(msg, "PID-5.3") is None and is_null(get(msg, "PID-5.4"))
    assert is_null(get(msg, "PID-5.1", repetition=1))
    assert reps(msg, "PID-5.1") == ["Doe", NULL]


def test_z_segments_are_kept_and_reachable() -> None:
    msg = message()
    assert [s.name for s in segments(msg, "ZPD")] == ["ZPD"]
    assert get(msg, "ZPD-2.2") == "value"
    assert get(segments(msg, "ZPD")[0], "ZPD-1") == "1"
    assert segments(msg, "OBX") == []


def test_accessor_paths() -> None:
    msg = message()
    assert get(msg, "PID-5") == "Doe"  # a short path follows the first child, as python-hl7 does
    assert get(msg, "MSH-1") == "|" and get(msg, "MSH-2") == "^~\\&"
    assert get(msg, "MSH-9.3") == "ADT_A01"
    assert get(msg, "OBX-5") is None
    pid = segments(msg, "PID")[0]
    assert get(pid, "PID-5.2") == "Jane"
    with pytest.raises(ValueError):
        get(pid, "OBX-5")
    for bad in ("PID", "PID-0", "PID.5", "PID-5.x", "PI-5"):
        with pytest.raises(ValueError):
            get(msg, bad)


# --- batches ---

BATCH = (
    "FHS|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||||FILE-1\r"
    "BHS|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||||BATCH-1\r"
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||ADT^A01|M1|P|2.5\rPID|1||1\r"
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||ADT^A08|M2|P|2.5\rPID|1||2\rZPD|x\r"
    "BTS|2\r"
    "FTS|1\r"
)


def test_fhs_bhs_batch_is_split_into_its_messages() -> None:
    messages = parse.split_batch(BATCH.replace("\r", "\n"))
    assert [parse.read_header(m).control_id for m in messages] == ["M1", "M2"]
    assert messages[1] == "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101||ADT^A08|M2|P|2.5\rPID|1||2\rZPD|x\r"
    assert parse.is_batch(BATCH) and not parse.is_batch(ADT)
    bhs = parse.read_batch_header(BATCH)
    fhs = parse.read_batch_header(BATCH, "FHS")
    assert bhs is not None and fhs is not None
    assert (bhs.segment, bhs.control_id, bhs.sending_app) == ("BHS", "BATCH-1", "SENDAPP")
    assert (fhs.segment, fhs.control_id, fhs.receiving_facility) == ("FHS", "FILE-1", "RECVFAC")
    assert parse.read_batch_header(ADT) is None


def test_plain_message_is_its_own_batch_and_headerless_runs_are_split() -> None:
    assert parse.split_batch(ADT) == [ADT]
    run = ADT + ADT.replace("CTRL-1", "CTRL-2")
    assert [parse.read_header(m).control_id for m in parse.split_batch(run)] == ["CTRL-1", "CTRL-2"]
    assert parse.split_batch("BHS|^~\\&\rBTS|0\r") == []


def test_batch_is_not_parsed_as_one_message() -> None:
    with pytest.raises(ParseError) as info:
        parse.parse(BATCH)
    assert info.value.location == "FHS"


# --- properties ---

_FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
_HL7ISH = st.text(alphabet=st.sampled_from(list("MSHPIDOBX|^~\\&#*!\r\n \"'0123456789.EFSTRX\x00\x0b\x1c\u00e9")),
                  max_size=300)


@_FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_parse_error(raw: bytes) -> None:
    text = parse.decode(raw)
    assert isinstance(text, str)
    _read_everything(parse.normalize(text))


@_FUZZ
@given(st.sampled_from(sorted(parse.CHARSETS)), st.binary(max_size=300))
def test_every_declared_charset_decodes_any_bytes(charset: str, body: bytes) -> None:
    header = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||{charset}\r".encode()
    text = parse.decode(header + body)
    assert text.startswith("MSH|") or parse.codec_for(charset) in ("utf-16", "utf-32")


@_FUZZ
@given(st.text(max_size=500))
def test_arbitrary_text_never_raises_anything_but_parse_error(text: str) -> None:
    _read_everything(text)


@_FUZZ
@given(_HL7ISH)
def test_hl7_like_text_never_raises_anything_but_parse_error(tail: str) -> None:
    _read_everything("MSH|^~\\&|" + tail)
    _read_everything(tail)


def _read_everything(text: str) -> None:
    assert parse.normalize(parse.normalize(text)) == parse.normalize(text)
    parse.split_batch(text)
    parse.first_mrn(text)
    for segment in ("BHS", "FHS"):
        with contextlib.suppress(ParseError):
            parse.read_batch_header(text, segment)
    with contextlib.suppress(ParseError):
        parse.read_header(text)
    try:
        msg = parse.parse(text)
    except ParseError:
        return
    for segment in msg:
        name = segment[0][0]
        if isinstance(name, str) and len(name) == 3 and name.isascii() and name.isalnum():
            for path in (f"{name}-1", f"{name}-2.2", f"{name}-3.1.2", f"{name}-9.3"):
                get(msg, path)
                get(segment, path, repetition=1)
                reps(msg, path)


_PUNCTUATION = "|^~\\&!@#$%*+=:;?/,'`[]{}<>_"
# Escaped with python-hl7 (the reference), which writes non-ASCII below U+0100 as \Xhh\; characters
# above that are written as they are, as a Unicode message would carry them.
_VALUE_CHARS = st.sampled_from(list(_PUNCTUATION + "abcXYZ019 .-\"\u00e9\u00fc\u00ff\u00a0\u5c71\U0001f600"))
_VALUES = st.text(alphabet=_VALUE_CHARS, max_size=8).filter(lambda v: v != '""')


@st.composite
def _separators(draw: st.DrawFn) -> Separators:
    chars = draw(st.permutations(list(_PUNCTUATION)))
    return Separators(chars[0], chars[1], chars[2], chars[3], chars[4])


@st.composite
def _messages(draw: st.DrawFn) -> tuple[Separators, str, list[list[list[list[list[str]]]]]]:
    seps = draw(_separators())
    structure = st.lists(st.lists(st.lists(st.lists(_VALUES, min_size=1, max_size=3), min_size=1, max_size=3),
                                  min_size=1, max_size=3), min_size=1, max_size=5)
    body = draw(st.lists(structure, min_size=1, max_size=3))
    control_id = draw(_VALUES.filter(lambda v: v.strip() != ""))
    return seps, control_id, body


def _escape(value: str, seps: Separators) -> str:
    container = hl7.Message(separators="\r" + seps.field + seps.repetition + seps.component + seps.subcomponent,
                            esc=seps.escape)
    # python-hl7 writes a Latin-1 character as \Xhh\, which is not how a UTF-8 message carries it (and
    # runs of such escapes can spell another, valid UTF-8 character): only ASCII goes through it.
    return "".join(hl7.util.escape(container, c) if ord(c) < 0x80 else c for c in value)


def _render(seps: Separators, control_id: str, body: list[list[list[list[list[str]]]]]) -> str:
    def field(reps_: list[list[list[str]]]) -> str:
        return seps.repetition.join(
            seps.component.join(seps.subcomponent.join(_escape(v, seps) for v in comp) for comp in rep)
            for rep in reps_)

    msh = "MSH" + seps.field + seps.encoding_characters + seps.field + seps.field.join(
        ["APP", "FAC", "", "", "20240101", "", f"ADT{seps.component}A01", _escape(control_id, seps), "P", "2.5"])
    lines = [msh] + [seps.field.join([f"Z{n:02d}", *(field(f) for f in segment)]) for n, segment in enumerate(body)]
    return "\r".join([*lines, "ZZZ" + seps.field + "end"]) + "\r"


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_generated_messages_round_trip_through_escaping_and_accessors(generated: tuple) -> None:
    seps, control_id, body = generated
    text = _render(seps, control_id, body)
    header = parse.read_header(text)
    assert header.separators == seps and header.control_id == control_id
    msg = parse.parse(text)
    assert get(msg, "MSH-10") == (control_id or None)
    for n, segment_fields in enumerate(body):
        name = f"Z{n:02d}"
        (segment,) = segments(msg, name)
        for field_no, field_reps in enumerate(segment_fields, start=1):
            for rep_no, rep in enumerate(field_reps):
                for comp_no, comp in enumerate(rep, start=1):
                    for sub_no, value in enumerate(comp, start=1):
                        got = get(segment, f"{name}-{field_no}.{comp_no}.{sub_no}", repetition=rep_no)
                        assert got == (value or None), (text, field_no, rep_no, comp_no, sub_no)
                        assert not is_null(got)
            if _escape_field_nonempty(field_reps):
                assert len(reps(segment, f"{name}-{field_no}.1.1")) == len(field_reps)


def _escape_field_nonempty(field_reps: list[list[list[str]]]) -> bool:
    return len(field_reps) > 1 or len(field_reps[0]) > 1 or len(field_reps[0][0]) > 1 or field_reps[0][0][0] != ""
