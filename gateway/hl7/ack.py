"""Acknowledgements (ACK) for inbound messages and batches.

hl7apy is the authority on what a valid ACK looks like in each version, but building one with it
takes about 10 ms (about 90 ACKs/s measured here), more than the rest of the pipeline. So for each
(version, separators) an ACK layout is derived from hl7apy's structure definitions, filled once with
sample values and validated by hl7apy (STRICT); every real ACK is then filled into that layout by
string assembly, tens of thousands per second. The tests validate real ACKs with hl7apy as well.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import hl7
from hl7.util import escape, generate_message_control_id
from hl7apy import SUPPORTED_LIBRARIES, load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as ApyMessage
from hl7apy.parser import get_message_info, parse_segments

from gateway.hl7.parse import (
    STANDARD_SEPARATORS,
    TABLE_0357,
    BatchHeader,
    Header,
    Separators,
    codec_for,
    read_batch_header,
    read_header,
    unescape,
)

log = logging.getLogger(__name__)

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
SEVERITIES = ("E", "W", "I", "F")
FALLBACK_VERSION = "2.5"
MSA_TEXT_LIMIT = 80  # MSA-3 is ST(80)


@dataclass(frozen=True)
class _Layout:
    """What differs between versions in an ACK, read from hl7apy's definitions."""

    version: str
    seps: Separators
    message_type_parts: int  # MSH-9 has 2 components before v2.3.1, 3 from then on
    header_fields: int  # MSH-18 (character set) exists from v2.3
    hd_addresses: bool  # MSH-3..6 are HD (with components) from v2.3, ST before
    text_in_msa: bool  # MSA-3 was withdrawn in v2.7: the text moves to ERR-8
    error_style: str  # "ERL": ERR-2/3/4 (v2.5+); "ELD": location and code in ERR-1 (v2.2-2.4); "ID": v2.1


def build_ack(header: Header, code: str, text: str | None = None,
              error: tuple[str, str | None, str] | None = None, control_id: str | None = None) -> str:
    """An ER7 ACK for the message whose header is given (segments separated by CR).

    code: AA/AE/AR, or CA/CE/CR in enhanced mode. error: (table 0357 code, location such as "PID-7"
    or "PID^1^7" or None, severity E/W/I/F). The ACK swaps sender and receiver, keeps the message's
    version and separators when hl7apy accepts them (else v2.5 / standard separators), and MSA-2 is
    the original MSH-10.
    """
    if code not in ACK_CODES:
        raise ValueError(f"{code!r} is not an acknowledgement code ({', '.join(ACK_CODES)})")
    layout = _layout_for(header)
    return _fill(layout, header, code, text, error, control_id or generate_message_control_id(), _now())


def build_batch_ack(batch: str, acks: Sequence[str], control_id: str | None = None) -> str:
    """The response batch for an FHS/BHS batch: its envelope around the ACK of every message.

    One BHS answers however many batches the file held; BHS-12 (and FHS-12) name the control ids
    of the batch (file) being answered. A run of messages without a BHS gets one built from the
    first message's MSH.
    """
    file_header = read_batch_header(batch, "FHS")
    batch_header = read_batch_header(batch, "BHS") or _batch_header_from_msh(batch)
    timestamp = _now()
    lines = []
    if file_header is not None:
        lines.append(_envelope_segment(file_header, timestamp, control_id or generate_message_control_id()))
    lines.append(_envelope_segment(batch_header, timestamp, control_id or generate_message_control_id()))
    for ack in acks:
        lines.extend(segment for segment in ack.split("\r") if segment)
    lines.append(f"BTS{batch_header.field_separator}{len(acks)}")
    if file_header is not None:
        lines.append(f"FTS{file_header.field_separator}1")
    return "\r".join(lines) + "\r"


def encode_ack(ack: str, header: Header | None) -> bytes:
    """The ACK's bytes in the character set of the message it answers (its MSH-18 is copied)."""
    codec = codec_for(header.charset if header else None) or "utf-8"
    return ack.encode(codec, errors="replace")


def warm_up(versions: Iterable[str] = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8")) -> None:
    """Validate the ACK layouts of these versions now (about 50 ms each with hl7apy) rather than on the
    first message of each version."""
    for version in versions:
        _validated_layout(version, STANDARD_SEPARATORS)


# --- layouts ---


def _layout_for(header: Header) -> _Layout:
    version = header.version if header.version in SUPPORTED_LIBRARIES else FALLBACK_VERSION
    sent = header.separators
    candidates = [(version, sent), (version, sent._replace(truncation=None)), (version, STANDARD_SEPARATORS),
                  (FALLBACK_VERSION, sent._replace(truncation=None)), (FALLBACK_VERSION, STANDARD_SEPARATORS)]
    for candidate_version, seps in candidates:
        layout = _validated_layout(candidate_version, seps)
        if layout is not None:
            return layout
    raise RuntimeError("hl7apy rejects a standard v2.5 ACK")  # cannot happen: the fallback is always valid


@functools.lru_cache(maxsize=64)
def _validated_layout(version: str, seps: Separators) -> _Layout | None:
    """The layout for this version and these separators, or None when hl7apy does not accept it."""
    try:
        layout = _derive_layout(version, seps)
        _validate(_sample_ack(layout), seps)
    except Exception as exc:  # hl7apy raises many exception types for what it does not accept
        log.debug("no ACK layout for version %s with separators %r: %s", version, seps, exc)
        return None
    return layout


def _derive_layout(version: str, seps: Separators) -> _Layout:
    msh = _reference_fields("MSH", version)
    msa = _reference_fields("MSA", version)
    err = _reference_fields("ERR", version)
    message_type = load_reference("MSH_9", "Field", version)
    if err.get("ERR_3", "WD") != "WD":
        error_style = "ERL"
    elif err.get("ERR_1") in ("CM_ELD", "ELD"):
        error_style = "ELD"
    else:
        error_style = "ID"
    return _Layout(
        version=version,
        seps=seps,
        message_type_parts=len(message_type[1]),
        header_fields=max(int(name.split("_")[1]) for name in msh),
        hd_addresses=msh["MSH_3"] == "HD",
        text_in_msa=msa.get("MSA_3", "WD") != "WD",
        error_style=error_style,
    )


def _reference_fields(segment: str, version: str) -> dict[str, str]:
    """Field name -> datatype ("WD" for withdrawn fields) in hl7apy's definition of the segment."""
    reference = load_reference(segment, "Segment", version)
    return {child[0]: child[1][2] if child[2][1] != 0 else "WD" for child in reference[1]}


def _sample_ack(layout: _Layout) -> str:
    seps = layout.seps
    comp = seps.component
    sample = Header(
        field_separator=seps.field, encoding_characters=seps.encoding_characters,
        sending_app="SENDER", sending_facility="SENDFAC", receiving_app="GATEWAY", receiving_facility="RECVFAC",
        timestamp="20240101120000", message_code="ADT", trigger_event="A01", message_structure="ADT_A01",
        control_id="MSG00001", processing_id="P", version=layout.version, accept_ack_type="", app_ack_type="",
        charset="UNICODE UTF-8",
        fields=("MSH", seps.field, seps.encoding_characters, f"SENDER{comp}1.2.3{comp}ISO", "SENDFAC",
                "GATEWAY", "RECVFAC", "20240101120000", "", f"ADT{comp}A01{comp}ADT_A01", "MSG00001", "P",
                layout.version, "", "", "", "", "", "UNICODE UTF-8"),
    )
    return _fill(layout, sample, "AE", "sample text", ("207", "PID-7", "E"), "ACK00001", _now())


def validate_ack(er7: str) -> None:
    """hl7apy parses the ACK back as an ACK structure and validates it (STRICT); raises when it is invalid.

    The structure is named explicitly: from MSH-9 alone hl7apy would look for "ACK_A01" before v2.3.1.
    """
    encoding_chars, _, version = get_message_info(er7)
    message = ApyMessage("ACK", version=version, validation_level=VALIDATION_LEVEL.STRICT,
                         encoding_chars=encoding_chars)
    message.children = parse_segments(er7.strip("\r"), message.version, encoding_chars, VALIDATION_LEVEL.STRICT,
                                      message.reference, find_groups=True)
    message.validate()


def _validate(er7: str, seps: Separators) -> None:
    validate_ack(er7)
    # hl7apy must also render these separators itself, or it does not really support them.
    version = get_message_info(er7)[2]
    ApyMessage("ACK", version=version, encoding_chars=_apy_encoding_chars(seps, version))


def _apy_encoding_chars(seps: Separators, version: str) -> dict[str, str]:
    chars = {"FIELD": seps.field, "COMPONENT": seps.component, "REPETITION": seps.repetition,
             "ESCAPE": seps.escape, "SUBCOMPONENT": seps.subcomponent, "SEGMENT": "\r", "GROUP": "\r"}
    if seps.truncation and version >= "2.7":
        chars["TRUNCATION"] = seps.truncation
    return chars


# --- filling ---


def _fill(layout: _Layout, header: Header, code: str, text: str | None,
          error: tuple[str, str | None, str] | None, control_id: str, timestamp: str) -> str:
    seps = layout.seps
    segments = [_msh(layout, header, control_id, timestamp), _msa(layout, header, code, text)]
    if error is not None or (text and not layout.text_in_msa):
        segments.append(_err(layout, error or ("0", None, "I"), text))
    return "\r".join(_trim(segment, seps.field) for segment in segments) + "\r"


def _msh(layout: _Layout, header: Header, control_id: str, timestamp: str) -> str:
    seps = layout.seps
    names = {3: header.sending_app, 4: header.sending_facility, 5: header.receiving_app, 6: header.receiving_facility}
    if layout.hd_addresses:
        addresses = [_copied(header, n, names[n], seps) for n in (5, 6, 3, 4)]
    else:
        addresses = [_escape(names[n], seps) for n in (5, 6, 3, 4)]
    message_type = ["ACK", _escape(header.trigger_event, seps), "ACK"][:layout.message_type_parts]
    fields = [
        "MSH", seps.encoding_characters, *addresses, timestamp, "",
        seps.component.join(message_type).rstrip(seps.component),
        _escape(control_id, seps), _escape(header.processing_id or "P", seps), layout.version,
    ]
    if layout.header_fields >= 18 and header.raw(18):
        fields += ["", "", "", "", "", _recode(header.raw(18), header.separators, seps)]
    # MSH-1 is the separator itself, so MSH-2 directly follows "MSH" plus the separator.
    return fields[0] + seps.field + seps.field.join(fields[1:])


def _msa(layout: _Layout, header: Header, code: str, text: str | None) -> str:
    seps = layout.seps
    fields = ["MSA", code, _copied(header, 10, header.control_id, seps)]
    if text and layout.text_in_msa:
        fields.append(_escape(text[:MSA_TEXT_LIMIT], seps))
    return seps.field.join(fields)


def _err(layout: _Layout, error: tuple[str, str | None, str], text: str | None) -> str:
    seps = layout.seps
    code, location, severity = error
    code_text = TABLE_0357.get(code, "")
    where = _location(location)
    if layout.error_style == "ID":
        return seps.field.join(["ERR", _escape(code, seps)])
    if layout.error_style == "ELD":
        coded = seps.subcomponent.join([_escape(code, seps), _escape(code_text, seps), "HL70357"])
        return seps.field.join(["ERR", seps.component.join([*(where or ("", "", ""))[:3], coded])])
    location_field = seps.component.join(where).rstrip(seps.component) if where else ""
    coded = seps.component.join([_escape(code, seps), _escape(code_text, seps), "HL70357"])
    severity = severity if severity in SEVERITIES else "E"
    user_message = _escape(text, seps) if text else ""
    return seps.field.join(["ERR", "", location_field, coded, severity, "", "", "", user_message])


_SEGMENT_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:[-.](\d+)(?:\.(\d+))?(?:\.(\d+))?)?")
_ERL_LOCATION = re.compile(r"[A-Z][A-Z0-9]{2}(?:\^\d*){0,5}")


def _location(location: str | None) -> tuple[str, ...] | None:
    """"PID-7", "PID[2]-7.1", "PID.7" or an ERL "PID^1^7" -> (segment, sequence, field, repetition,
    component, subcomponent) as ERR-2 wants them; None when there is no usable location."""
    if not location:
        return None
    if _ERL_LOCATION.fullmatch(location):
        parts = location.split("^")
        return (parts[0], parts[1] if len(parts) > 1 and parts[1] else "1", *parts[2:])
    match = _SEGMENT_LOCATION.fullmatch(location)
    if match is None:
        return None
    segment, sequence, field_no, component, subcomponent = match.groups()
    return (segment, sequence or "1", field_no or "", "", component or "", subcomponent or "")


def _trim(segment: str, field_separator: str) -> str:
    return segment.rstrip(field_separator) if not segment.startswith("MSH") else segment


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S") + "+0000"


@functools.lru_cache(maxsize=64)
def _escaper(seps: Separators) -> tuple[hl7.Message, dict[str, str] | None]:
    """A python-hl7 container with these separators (its escape() reads them from one)."""
    container = hl7.Message(separators="\r" + seps.field + seps.repetition + seps.component + seps.subcomponent,
                            esc=seps.escape)
    return container, ({seps.truncation: "P"} if seps.truncation else None)


def _escape(value: str, seps: Separators) -> str:
    """Text we write into an ACK: ASCII only (the ACK's charset is the sender's, whatever it is) and
    escaped with python-hl7, line breaks as \\.br\\."""
    if not value:
        return ""
    if not _needs_escaping(seps).search(value):
        return value  # the common case (ids, codes, app names) skips python-hl7's per-character loop
    container, app_map = _escaper(seps)
    return escape(container, _ascii(value), app_map)


@functools.lru_cache(maxsize=64)
def _needs_escaping(seps: Separators) -> re.Pattern[str]:
    specials = seps.field + seps.encoding_characters
    return re.compile(f"[^ -~]|[{re.escape(specials)}]")


def _ascii(value: str) -> str:
    folded = unicodedata.normalize("NFKD", value.replace("\r\n", "\n").replace("\n", "\r"))
    out = []
    for char in folded:
        if " " <= char <= "~" or char == "\r":
            out.append(char)
        elif not unicodedata.combining(char):
            out.append("?" if ord(char) > 127 else " ")  # python-hl7 would hex-escape controls as "\X 9\"
    return "".join(out)


def _copied(header: Header, number: int, value: str, seps: Separators) -> str:
    """MSH-<number> of the original as sent (re-encoded if need be); from the parsed value when the
    header was built without its raw fields."""
    raw = header.raw(number)
    return _recode(raw, header.separators, seps) if raw else _escape(value, seps)


def _recode(raw: str, source: Separators, target: Separators) -> str:
    """A field copied from the message into the ACK, re-encoded when the ACK's separators differ."""
    if source == target or not raw:
        return raw
    return target.repetition.join(
        target.component.join(
            target.subcomponent.join(_escape_copied(unescape(sub, source), target) for sub in component.split(
                source.subcomponent))
            for component in repetition.split(source.component))
        for repetition in raw.split(source.repetition))


def _escape_copied(value: str, seps: Separators) -> str:
    if value == '""':
        return value
    container, app_map = _escaper(seps)
    return escape(container, value, app_map)


# --- batch envelopes ---


def _batch_header_from_msh(batch: str) -> BatchHeader:
    header = read_header(batch)
    return BatchHeader(
        segment="BHS", field_separator=header.field_separator, encoding_characters=header.encoding_characters,
        sending_app=header.sending_app, sending_facility=header.sending_facility,
        receiving_app=header.receiving_app, receiving_facility=header.receiving_facility,
        timestamp=header.timestamp, control_id="",
        fields=("BHS", header.field_separator, header.encoding_characters, *(header.raw(n) for n in range(3, 7))),
    )


def _envelope_segment(header: BatchHeader, timestamp: str, control_id: str) -> str:
    """FHS/BHS answering the given one: sender and receiver swapped, FHS-12/BHS-12 its control id."""
    seps = header.separators
    fields = [header.segment, header.encoding_characters, header.raw(5), header.raw(6), header.raw(3),
              header.raw(4), timestamp, "", "", "", _escape(control_id, seps), header.raw(11)]
    return _trim(fields[0] + seps.field + seps.field.join(fields[1:]), seps.field)

