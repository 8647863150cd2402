"""Tolerant ER7 parsing: bytes to text, headers, batches, and a fast split into segments and fields.

Senders rarely follow the standard to the letter: LF or CRLF instead of CR, a UTF-8 byte order mark,
non-standard encoding characters, a character set named in MSH-18. This module turns raw bytes into
normalised text, reads the MSH header on its own (so a message whose body is broken can still be
stored and answered), splits batches, and gives mappings accessors that return unescaped values and
tell an empty field from an explicit null (`""`).

Messages are split by hl7lw (segments, then fields, escaped text kept) with the separators read from
MSH-1/MSH-2 here, because hl7lw refuses five-character and unusual encoding characters; fields are
split into repetitions, components and subcomponents only when a mapping reads them. python-hl7 is
the reference for what a parse must yield: it parses about 200 corpus messages a second, hl7lw about
24,000, and tests/hl7/test_parse_differential.py checks that the two agree on every field,
component, subcomponent and unescaped value of the corpus and of generated messages.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import hl7lw
from hl7.util import split_file
from hl7lw.exceptions import Hl7Exception

# HL7 table 0357 (message error condition codes) with the texts used in ERR-3.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
VALUE_TOO_LONG = "104"  # also a whole message over the receiver's maximum size
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION = "203"
INTERNAL_ERROR = "207"
TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

DEFAULT_ENCODING_CHARACTERS = "^~\\&"
HEADER_SEGMENTS = ("MSH", "BHS", "FHS")
BATCH_SEGMENTS = ("FHS", "BHS", "FTS", "BTS")

# HL7 table 0211 (MSH-18) -> Python codec. Only these names are honoured: a sender's string never
# reaches codecs.lookup, which also knows codecs that are not text encodings (hex, rot13, ...).
CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR14": "shift_jis",  # JIS X 0201: Python has it only as the single-byte part of Shift JIS
    "ISO IR87": "iso2022_jp",  # JIS X 0208, switched in with ISO 2022 escapes
    "ISO IR159": "iso2022_jp_2",  # JIS X 0212
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf-8",  # v2.5 leaves the form open; every sender seen so far means UTF-8
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    # Spellings senders use instead of the table's.
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO-8859-1": "iso8859-1",
    "ISO8859-1": "iso8859-1",
    "LATIN1": "iso8859-1",
    "LATIN-1": "iso8859-1",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}
# A charset that needs more than one byte per ASCII character cannot have been read from an
# ASCII-readable MSH: such a declaration is wrong, and the bytes are decoded as if it were absent.
_WIDE_CODECS = {"utf-16", "utf-32"}


class ParseError(Exception):
    """A message, or its header, that cannot be read. `code` is from HL7 table 0357."""

    def __init__(self, reason: str, code: str = SEGMENT_SEQUENCE_ERROR, location: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.location = location

    def __str__(self) -> str:
        return f"{self.reason} (at {self.location})" if self.location else self.reason


class _ExplicitNull(str):
    """HL7's explicit null `""`: the sender asks the receiver to clear the element.

    It is an empty, falsy string, so code that does not care treats it like an absent value (and
    keeps what it has); `is_null` tells the two apart where clearing matters.
    """

    def __repr__(self) -> str:
        return "NULL"


NULL = _ExplicitNull("")
_NULL_TEXT = '""'


def is_null(value: object) -> bool:
    return value is NULL


class Separators(NamedTuple):
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @classmethod
    def from_msh(cls, field_separator: str, encoding_characters: str) -> Separators:
        chars = encoding_characters
        return cls(field_separator, chars[0], chars[1], chars[2], chars[3], chars[4] if len(chars) > 4 else None)

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")


STANDARD_SEPARATORS = Separators()


# --- bytes to text ---

_MSH_LINE_BYTES = re.compile(rb"(?:^|[\r\n])[ \t]*MSH([^\r\n])([^\r\n]*)")
_CHARSET_SCAN_BYTES = 64 * 1024  # MSH is at the start (after FHS/BHS at most); never scan a whole 16 MB body


def codec_for(charset: str | None) -> str | None:
    """The Python codec for an MSH-18 value (HL7 table 0211), or None when unknown or absent."""
    if not charset:
        return None
    return CHARSETS.get(" ".join(charset.upper().split()))


def decode(raw: bytes) -> str:
    """Bytes to text: a BOM is dropped, MSH-18 chooses the charset, else UTF-8, else latin-1. Never raises."""
    data = bytes(raw)
    wide = _wide_codec(data)
    if wide:
        return data.decode(wide, errors="replace").removeprefix("\ufeff")
    data = data.removeprefix(codecs.BOM_UTF8)
    declared = codec_for(_declared_charset(data))
    for codec in (declared, "utf-8"):
        if codec and codec not in _WIDE_CODECS:
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                continue
    return data.decode("latin-1")  # every byte is a latin-1 character: this cannot fail


def _wide_codec(data: bytes) -> str | None:
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    head = data[:6]
    if len(head) == 6 and head[1] == head[3] == head[5] == 0 and head[0] != 0:
        return "utf-16-le"
    if len(head) == 6 and head[0] == head[2] == head[4] == 0 and head[1] != 0:
        return "utf-16-be"
    return None


def _declared_charset(data: bytes) -> str | None:
    match = _MSH_LINE_BYTES.search(data, 0, _CHARSET_SCAN_BYTES)
    if match is None:
        return None
    parts = match.group(2).split(match.group(1))  # parts[0] is MSH-2, so MSH-n is parts[n - 2]
    if len(parts) < 17:
        return None
    repetition = parts[0][1:2] or b"~"
    first = parts[16].split(repetition)[0]  # further repetitions name code-switching sets, not the default
    return first.decode("ascii", errors="ignore").strip() or None


# --- text normalisation and batches ---

def normalize(text: str) -> str:
    """CR, LF or CRLF (mixed too) -> CR after every segment; empty and whitespace-only lines dropped."""
    text = text.removeprefix("\ufeff")
    if "\n" in text:  # str methods: a regex split of the three breaks was 4% of a repeated message
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    lines = [line for line in text.split("\r") if line and not line.isspace()]
    return "\r".join(lines) + "\r" if lines else ""


def is_batch(text: str) -> bool:
    """FHS/BHS envelopes, or more than one MSH in one piece of text."""
    # str methods rather than a regex: this runs on every message, and a regex without a literal
    # prefix crawls through a 4 KB message at a fraction of the speed.
    first = text.lstrip()[:3]
    if first in ("FHS", "BHS") or any(sep + tag in text for sep in "\r\n" for tag in ("FHS", "BHS")):
        return True
    return (first == "MSH") + text.count("\rMSH") + text.count("\nMSH") > 1


def split_batch(text: str) -> list[str]:
    """The messages of an FHS/BHS batch (envelope segments dropped); a plain message returns [text]."""
    if not is_batch(text):
        return [text]
    return split_file(normalize(text))


# --- headers ---


@dataclass(frozen=True)
class Header:
    """MSH read on its own, so that a message with a broken body can still be stored and answered.

    Values are the first component, unescaped ("" when absent); `fields[n]` is MSH-n exactly as sent.
    """

    field_separator: str
    encoding_characters: str
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    timestamp: str
    message_code: str
    trigger_event: str
    message_structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    app_ack_type: str
    charset: str
    fields: tuple[str, ...] = field(repr=False, default=())

    @functools.cached_property
    def separators(self) -> Separators:
        # asked for over and over (each ACK field copied from the message asks): built once
        return Separators.from_msh(self.field_separator, self.encoding_characters)

    @property
    def message_code_and_trigger(self) -> str:
        return f"{self.message_code}^{self.trigger_event}" if self.trigger_event else self.message_code

    def raw(self, number: int) -> str:
        """MSH-<number> exactly as sent (still escaped), "" when absent."""
        return self.fields[number] if number < len(self.fields) else ""


@dataclass(frozen=True)
class BatchHeader:
    """An FHS or BHS segment: what a batch acknowledgement needs from the batch it answers."""

    segment: str
    field_separator: str
    encoding_characters: str
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    timestamp: str
    control_id: str
    fields: tuple[str, ...] = field(repr=False, default=())

    @property
    def separators(self) -> Separators:
        return Separators.from_msh(self.field_separator, self.encoding_characters)

    def raw(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""


def read_header(text: str) -> Header:
    """Read the first MSH segment. Raises ParseError when there is none or its separators are unusable."""
    line = _segment_line(text, "MSH")
    if line is None:
        raise ParseError("no MSH segment", SEGMENT_SEQUENCE_ERROR, "MSH")
    # A message's header is asked for at each step (receipt, acknowledgement, parse, the MRN): the
    # last few are kept by their MSH line (a Header is immutable), a hit costing a lookup instead of
    # ~20 µs. The line, not the message, is the key (a message may carry megabytes of PDF), and only
    # an ordinary one: an MSH line of any length cannot pin memory here.
    return _recent_header(line) if len(line) <= MSH_LINE_KEPT else _header(line)


MSH_LINE_KEPT = 1024


def _header(line: str) -> Header:
    fields, seps = _split_header_line(line, "MSH")

    def value(number: int, component: int = 1) -> str:
        return _component(fields[number] if number < len(fields) else "", seps, component)

    return Header(
        field_separator=seps.field,
        encoding_characters=seps.encoding_characters,
        sending_app=value(3),
        sending_facility=value(4),
        receiving_app=value(5),
        receiving_facility=value(6),
        timestamp=value(7),
        message_code=value(9, 1),
        trigger_event=value(9, 2),
        message_structure=value(9, 3),
        control_id=value(10),
        processing_id=value(11),
        version=value(12),
        accept_ack_type=value(15),
        app_ack_type=value(16),
        charset=_component((fields[18] if len(fields) > 18 else "").split(seps.repetition)[0], seps, 1),
        fields=fields,
    )


_recent_header = functools.lru_cache(maxsize=64)(_header)


def read_batch_header(text: str, segment: str = "BHS") -> BatchHeader | None:
    """The batch's BHS (or with segment="FHS" the file's FHS) header, None when there is none."""
    line = _segment_line(text, segment)
    if line is None:
        return None
    fields, seps = _split_header_line(line, segment)

    def value(number: int) -> str:
        return _component(fields[number] if number < len(fields) else "", seps, 1)

    return BatchHeader(
        segment=segment,
        field_separator=seps.field,
        encoding_characters=seps.encoding_characters,
        sending_app=value(3),
        sending_facility=value(4),
        receiving_app=value(5),
        receiving_facility=value(6),
        timestamp=value(7),
        control_id=value(11),
        fields=fields,
    )


def first_mrn(text: str) -> str | None:
    """PID-3's identifier typed MR (else its first), read without a full parse; None when absent."""
    try:
        seps = read_header(text).separators
    except ParseError:
        return None
    line = _segment_line(text, "PID")
    if line is None:
        return None
    pid = line.split(seps.field)
    if len(pid) < 4 or not pid[3]:
        return None
    identifiers = pid[3].split(seps.repetition)
    chosen = next((cx for cx in identifiers if _component(cx, seps, 5) == "MR"), identifiers[0])
    return _component(chosen, seps, 1) or None


def _segment_line(text: str, name: str) -> str | None:
    """The first line that begins with `name` (after spaces or tabs), to its end."""
    if text.startswith(name):  # MSH, in every message that has one
        return text[:_line_end(text, 0)]
    # str.find jumps from one occurrence of the name to the next (in a field, or where a line
    # begins); a regex for "a line beginning with it" has no literal to search for and would step
    # through a 4 KB message a character at a time.
    start = text.find(name)
    while start != -1:
        before = start
        while before and text[before - 1] in " \t":
            before -= 1
        if before == 0 or text[before - 1] in "\r\n":
            return text[start:_line_end(text, start)]
        start = text.find(name, start + 1)
    return None


def _line_end(text: str, start: int) -> int:
    """Where the line from `start` ends (its CR or LF, else the end of the text). LF is looked for
    only up to the CR: normalized text has none, and a search past the line would read the whole
    message (megabytes, with an embedded PDF) at every header lookup."""
    end = text.find("\r", start)
    if end == -1:
        end = len(text)
    newline = text.find("\n", start, end)
    return end if newline == -1 else newline


def _split_header_line(line: str, name: str) -> tuple[tuple[str, ...], Separators]:
    if len(line) < 4:
        raise ParseError(f"{name} has no field separator", SEGMENT_SEQUENCE_ERROR, f"{name}-1")
    separator = line[3]
    if not _usable_separator(separator):
        raise ParseError(f"{name}-1 {separator!r} cannot be a field separator", SEGMENT_SEQUENCE_ERROR, f"{name}-1")
    rest = line[4:].split(separator)
    encoding = _complete_encoding_characters(rest[0], separator, name)
    return (name, separator, *rest), Separators.from_msh(separator, encoding)


def _usable_separator(char: str) -> bool:
    return char.isprintable() and not char.isalnum() and not char.isspace()


def _complete_encoding_characters(sent: str, field_separator: str, name: str) -> str:
    """MSH-2 as sent (4 characters, or 5 with the v2.7 truncation character), missing ones defaulted."""
    chars = list(sent)
    if len(chars) > 5 or not all(_usable_separator(c) for c in chars) or len(set(chars)) != len(chars) \
            or field_separator in chars:
        raise ParseError(f"{name}-2 {sent[:12]!r} are not encoding characters", SEGMENT_SEQUENCE_ERROR, f"{name}-2")
    for default in DEFAULT_ENCODING_CHARACTERS[len(chars):]:
        if default in chars or default == field_separator:
            raise ParseError(f"{name}-2 {sent!r} is incomplete", SEGMENT_SEQUENCE_ERROR, f"{name}-2")
        chars.append(default)
    return "".join(chars)


def _component(raw: str, seps: Separators, number: int) -> str:
    """Component <number> (1-based) of the first repetition, first subcomponent, unescaped."""
    first = raw.split(seps.repetition, 1)[0]
    parts = first.split(seps.component)
    if number > len(parts):
        return ""
    value = parts[number - 1].split(seps.subcomponent, 1)[0]
    return "" if value == _NULL_TEXT else unescape(value, seps)


# --- escape sequences ---

_FORMATTING_REPEAT_LIMIT = 100  # \.sp99999999\ must not become a gigabyte of newlines


def unescape(value: str, seps: Separators = STANDARD_SEPARATORS) -> str:
    """Decode escape sequences (HL7 v2 section 2.7) into plain text.

    python-hl7's unescape is not used: it decodes \\Xhh\\ bytes as latin-1 code points (wrong for
    UTF-8), turns \\.br\\ into CR, repeats \\.spN\\ without a bound, drops unknown sequences (a Windows
    path with unescaped backslashes loses its text) and logs tracebacks for them. Here hex runs are
    decoded together as UTF-8 (latin-1 when not valid UTF-8), \\.br\\ is a newline, highlighting and
    charset switches are dropped, and anything unrecognised is kept as sent.
    """
    if seps.escape not in value:
        return value
    return _escape_pattern(seps.escape).sub(lambda match: _replace_escape(match, seps), value)


@functools.lru_cache(maxsize=16)
def _escape_pattern(esc: str) -> re.Pattern[str]:
    e = re.escape(esc)
    # A run of adjacent hex sequences is one byte string (a UTF-8 character may be split across them).
    return re.compile(rf"((?:{e}X[0-9A-Fa-f]*{e})+)|{e}([^{e}\r\n]*){e}")


def _replace_escape(match: re.Match[str], seps: Separators) -> str:
    if match.group(1) is not None:
        return _decode_hex(match.group(1).replace(seps.escape, "").replace("X", ""), match.group(0))
    body = match.group(2)
    simple = {
        "F": seps.field, "S": seps.component, "T": seps.subcomponent, "R": seps.repetition, "E": seps.escape,
        "P": seps.truncation or "#", "H": "", "N": "",
    }
    if body in simple:
        return simple[body]
    if body.startswith("."):
        return _formatting(body, match.group(0))
    if body[:1] in ("C", "M") and _is_hex(body[1:]):
        return ""  # ISO 2022 charset switch: the text around it is already decoded
    if body[:1] == "Z":
        return ""  # locally defined escape: no meaning outside the sender
    return match.group(0)


def _is_hex(digits: str) -> bool:
    return bool(digits) and len(digits) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in digits)


def _decode_hex(digits: str, original: str) -> str:
    if not _is_hex(digits):
        return original
    data = bytes.fromhex(digits)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _formatting(body: str, original: str) -> str:
    command, argument = body[:3], body[3:]
    if argument and not re.fullmatch(r"[+-]?\d{1,9}", argument):
        return original
    count = min(max(int(argument), 0), _FORMATTING_REPEAT_LIMIT) if argument else 1
    if command == ".br":
        return "\n"
    if command == ".sp":
        return "\n" * max(count, 1)
    if command == ".sk":
        return " " * count
    if command == ".ce":
        return "\n"
    if command in (".fi", ".nf", ".in", ".ti"):
        return ""  # fill mode and indentation have no plain-text equivalent
    return original


# --- parsing and access ---


Segment = hl7lw.Hl7Segment  # .name, and field n (1-based, still escaped) as segment[n]; MSH-1 is "|"


class Message:
    """One parsed message: its segments in order and the separators MSH-1/MSH-2 declared."""

    __slots__ = ("segments", "separators")

    def __init__(self, segments: list[Segment], separators: Separators) -> None:
        self.segments = segments
        self.separators = separators

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def segment(self, name: str) -> Segment:
        """The first segment with this id; KeyError when there is none."""
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(name)


def split_field(value: str, seps: Separators) -> list[list[list[str]]]:
    """A field's repetitions, each a list of components, each a list of subcomponents (escaped)."""
    if seps.component not in value and seps.repetition not in value and seps.subcomponent not in value:
        return [[[value]]]  # most fields hold one plain value
    return [[component.split(seps.subcomponent) for component in repetition.split(seps.component)]
            for repetition in value.split(seps.repetition)]


def parse(text: str) -> Message:
    """One message (not a batch), after normalize. Raises ParseError."""
    text = normalize(text)
    header = read_header(text)
    if not text.lstrip().startswith("MSH"):
        first = text.lstrip()[:3]
        if first in ("FHS", "BHS"):
            raise ParseError("a batch must be split with split_batch before parsing", SEGMENT_SEQUENCE_ERROR, first)
        raise ParseError(f"the first segment is {first!r}, not MSH", SEGMENT_SEQUENCE_ERROR, "MSH")
    if not header.message_code:
        raise ParseError("MSH-9 message type is missing", REQUIRED_FIELD_MISSING, "MSH-9")
    if not header.control_id:
        raise ParseError("MSH-10 message control id is missing", REQUIRED_FIELD_MISSING, "MSH-10")
    seps = header.separators
    parser = hl7lw.Hl7Parser(ignore_msh_values_for_parsing=True, allow_multiple_msh=True)
    parser.field_separator = seps.field
    parser.component_separator = seps.component
    parser.repetition_separator = seps.repetition
    parser.escape_character = seps.escape
    parser.subcomponent_separator = seps.subcomponent
    try:
        # Whitespace around the whole message is not data (python-hl7 strips it too).
        message = parser.parse_message(text.strip() + "\r", encoding=None)
    except Hl7Exception as exc:
        raise ParseError(f"unreadable message: {exc}", SEGMENT_SEQUENCE_ERROR) from exc
    return Message(message.segments, seps)


_PATH = re.compile(r"([A-Za-z0-9]{3})-(\d{1,3})(?:\.(\d{1,3}))?(?:\.(\d{1,3}))?")


@functools.lru_cache(maxsize=1024)
def _parse_path(path: str) -> tuple[str, int, int, int]:
    match = _PATH.fullmatch(path)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"{path!r} is not a path like 'PID-5', 'PID-5.1' or 'PID-5.1.2'")
    name, field_no, component, subcomponent = match.groups()
    return name, int(field_no), int(component or 1), int(subcomponent or 1)


def segments(message: Message, name: str) -> list[Segment]:
    """Every segment with this id, in order (Z-segments included); [] when there is none."""
    return [segment for segment in message if segment.name == name]


def get(node: Message | Segment, path: str, repetition: int = 0) -> str | None:
    """The unescaped value at path ('PID-5.1.1'), in the given field repetition (0-based).

    None when absent or empty; NULL (see is_null) when the sender sent `""`. On a message the first
    segment with that id is used; on a segment the path's segment id must be the segment's.
    """
    name, field_no, component, subcomponent = _parse_path(path)
    segment, seps = _find_segment(node, name)
    if segment is None:
        return None
    return _value(segment, seps, field_no, repetition, component, subcomponent)


def reps(node: Message | Segment, path: str) -> list[str | None]:
    """The value at path in every repetition of its field, in order: reps(msg, "PID-3.1") are the
    identifiers and reps(msg, "PID-3.4") their assigning authorities, index for index. An empty field
    gives []."""
    name, field_no, component, subcomponent = _parse_path(path)
    segment, seps = _find_segment(node, name)
    if segment is None or field_no > len(segment.fields) or segment[field_no] == "":
        return []
    count = segment[field_no].count(seps.repetition) + 1
    return [_value(segment, seps, field_no, index, component, subcomponent) for index in range(count)]


def _find_segment(node: Message | Segment, name: str) -> tuple[Segment | None, Separators]:
    if isinstance(node, Message):
        return next((segment for segment in node if segment.name == name), None), node.separators
    if node.name != name:
        raise ValueError(f"path names segment {name} but was given a {node.name} segment")
    parser = node.parser
    return node, Separators(parser.field_separator, parser.component_separator, parser.repetition_separator,
                            parser.escape_character, parser.subcomponent_separator)


def _value(segment: Segment, seps: Separators, field_no: int, repetition: int, component: int,
           subcomponent: int) -> str | None:
    if field_no > len(segment.fields):
        return None
    raw = segment[field_no]
    if field_no <= 2 and segment.name in HEADER_SEGMENTS:
        # MSH-1 and MSH-2 are the separators themselves: never split, never unescaped.
        return raw if repetition == 0 and component == 1 and subcomponent == 1 and raw else None
    repetitions = split_field(raw, seps)
    if repetition >= len(repetitions):
        return None
    components = repetitions[repetition]
    if components == [[_NULL_TEXT]]:
        return NULL  # an explicit null covers every component below it
    if component > len(components):
        return None
    if components[component - 1] == [_NULL_TEXT]:
        return NULL
    if subcomponent > len(components[component - 1]):
        return None
    value = components[component - 1][subcomponent - 1]
    if not value:
        return None
    if value == _NULL_TEXT:
        return NULL
    return unescape(value, seps)
