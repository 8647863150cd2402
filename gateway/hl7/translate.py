"""HL7v2 -> FHIR R4: runs the declarative maps in mappings/ over one parsed message.

What goes where is data (mappings/README.md describes the format):
- mappings/messages/*.yaml   which message types and events are supported, and how their segments
                             become resources, merge into one, attach to one or link to each other;
- mappings/segments/*.yaml   field -> FHIR element rules per segment, and the business keys for ids;
- mappings/datatypes/*.yaml  component -> element rules per v2 data type (CX -> Identifier, ...);
- mappings/vocabulary/       HL7 tables as FHIR ConceptMaps (*.json) and lookup tables (*.yaml).

This module is the interpreter. It does only what the data cannot say, and each such piece says so:
walking the parsed fields, unescaping, v2 date/number syntax, choosing Observation.value[x] from
OBX-2, date arithmetic (start + duration), decoding ED payloads and hashing business keys into ids.
translate() is pure: the maps are read once (cached; read again before a reprocess when a file
changed, see reload_mappings_if_changed) and nothing else is touched.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from gateway.hl7 import parse as er7

MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"



class UnsupportedMessage(Exception):
    """The message type, event or version is not one we translate: answer AR."""

    def __init__(self, reason: str, code: str = "200", location: str = "MSH-9") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code  # HL7 table 0357: 200 message type, 201 event, 203 version
        self.location = location


class MappingError(Exception):
    """The message is supported but its content cannot be translated: answer AE."""

    def __init__(self, reason: str, code: str = "207", location: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code  # HL7 table 0357: 101 required field missing, 102 data type error, 207 internal
        self.location = location


@dataclass
class Translation:
    resources: list[dict[str, Any]]
    patient_id: str | None = None
    source_time: str | None = None
    merges: list[tuple[str, str]] = field(default_factory=list)
    clears: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The mapping data

class Vocabulary:
    """One FHIR ConceptMap from mappings/vocabulary, indexed for lookups.

    Each group maps the v2 table (group.source) to one FHIR code system; a table that feeds two
    FHIR elements (0202 -> ContactPoint.system and .use) has one group per target."""

    def __init__(self, concept_map: dict[str, Any]) -> None:
        self.id: str = concept_map["id"]
        self.groups: list[dict[str, Any]] = concept_map.get("group", [])
        self.source: str = self.groups[0]["source"] if self.groups else ""
        self._index: list[tuple[str, dict[str, list[dict[str, Any]]], dict[str, Any]]] = []
        for group in self.groups:
            elements: dict[str, list[dict[str, Any]]] = {}
            for element in group.get("element", []):
                targets = [t for t in element.get("target", []) if t.get("equivalence") != "unmatched"]
                elements[element["code"]] = targets
                elements.setdefault(element["code"].upper(), targets)
            self._index.append((group["target"], elements, group.get("unmapped") or {}))

    @property
    def targets(self) -> list[str]:
        return [target for target, _, _ in self._index]

    def _targets(self, code: str, elements: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        return elements.get(code) or elements.get(code.upper()) or []

    def mapped(self, code: str) -> list[dict[str, Any]]:
        """The FHIR codings the v2 code maps to, one per group that maps it."""
        codings = []
        for system, elements, _ in self._index:
            for target in self._targets(code, elements)[:1]:
                coding = {"system": system, "code": target["code"]}
                if target.get("display"):
                    coding["display"] = target["display"]
                codings.append(coding)
        return codings

    def translate(self, code: str, display: str | None = None) -> list[dict[str, Any]]:
        """Mapped codings first, then the v2 code itself in its v2 table system (always kept)."""
        source = {"system": self.source, "code": code}
        if display:
            source["display"] = display
        return [*self.mapped(code), source]

    def code(self, code: str, target: str | None = None) -> str | None:
        """The target code for a FHIR `code` element, or the group's fixed code for unmapped ones."""
        for system, elements, unmapped in self._index:
            if target and system != target:
                continue
            for found in self._targets(code, elements)[:1]:
                return str(found["code"])
            if unmapped.get("mode") == "fixed":
                return str(unmapped["code"])
            return None
        return None


class Table:
    """A YAML lookup table from mappings/vocabulary (names -> URIs): exact entries, then patterns."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.id: str = data["table"]
        self.entries: dict[str, str] = {str(k): str(v) for k, v in (data.get("entries") or {}).items()}
        self._upper = {k.upper(): v for k, v in self.entries.items()}
        self.patterns = [(re.compile(p["match"]), p["value"]) for p in data.get("patterns") or []]

    def get(self, key: str) -> str | None:
        if key in self.entries:
            return self.entries[key]
        if key.upper() in self._upper:
            return self._upper[key.upper()]
        for pattern, value in self.patterns:
            match = pattern.fullmatch(key)
            if match:
                return value.format(*match.groups())
        return None


@dataclass(frozen=True)
class Mappings:
    root: Path
    messages: list[dict[str, Any]]
    segments: dict[str, dict[str, Any]]
    datatypes: dict[str, dict[str, Any]]
    vocabularies: dict[str, Vocabulary]
    tables: dict[str, Table]
    settings: dict[str, Any]


def _yaml_files(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(folder.glob("*.yaml")):
        with path.open(encoding="utf-8") as handle:
            yield path, yaml.safe_load(handle)


def load_mappings(root: Path = MAPPINGS_DIR) -> Mappings:
    vocabularies: dict[str, Vocabulary] = {}
    for path in sorted((root / "vocabulary").glob("*.json")):
        vocabulary = Vocabulary(json.loads(path.read_text(encoding="utf-8")))
        vocabularies[vocabulary.id] = vocabulary
    tables = {data["table"]: Table(data) for _, data in _yaml_files(root / "vocabulary")}
    settings = yaml.safe_load((root / "settings.yaml").read_text(encoding="utf-8"))
    return Mappings(
        root=root,
        messages=[data for _, data in _yaml_files(root / "messages")],
        segments={path.stem: data for path, data in _yaml_files(root / "segments")},
        datatypes={data["datatype"]: data for _, data in _yaml_files(root / "datatypes")},
        vocabularies=vocabularies,
        tables=tables,
        settings=settings or {},
    )


@dataclass(frozen=True)
class _Loaded:
    root: Path
    fingerprint: tuple[tuple[str, int, int], ...]
    mappings: Mappings


_mappings_root: Path = MAPPINGS_DIR
_loaded: _Loaded | None = None


def _fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under the mappings folder with its change time and size: a fix shows up here."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def _load(root: Path) -> Mappings:
    global _loaded
    fingerprint = _fingerprint(root)
    loaded = _Loaded(root, fingerprint, load_mappings(root))
    _loaded = loaded
    return loaded.mappings


def configure_mappings(root: str | Path | None = None) -> Path:
    """Translate with the maps in this folder (GATEWAY_HL7_MAPPINGS; default the mappings/ beside the
    package). A process-wide choice, like the maps' cache."""
    global _mappings_root
    _mappings_root = Path(root).resolve() if root else MAPPINGS_DIR
    return _mappings_root


def mappings() -> Mappings:
    """The maps, read once and kept: every message translates with them (no file access per message)."""
    loaded = _loaded
    if loaded is not None and loaded.root == _mappings_root:
        return loaded.mappings
    return _load(_mappings_root)


def reload_mappings_if_changed() -> bool:
    """Read the maps again when a file under the folder changed since they were read (a mapping fix
    made while the gateway runs), so that reprocessing a message uses the fix without a restart; True
    when they were read again. Costs a walk of the folder, so it runs before a reprocess, not per message."""
    loaded = _loaded
    if loaded is not None and loaded.root == _mappings_root and loaded.fingerprint == _fingerprint(_mappings_root):
        return False
    _load(_mappings_root)
    return True


def _codes(message_map: dict[str, Any]) -> list[str]:
    codes = message_map["message"]
    return [str(c).upper() for c in (codes if isinstance(codes, list) else [codes])]


def _events(message_map: dict[str, Any]) -> list[str]:
    """"ADT^A01" style names; a map serving one message code may list bare events ("A01")."""
    codes = _codes(message_map)
    return [event if "^" in event else f"{codes[0]}^{event}" for event in (message_map.get("events") or {})]


_MESSAGE_CODES: dict[int, tuple[dict[str, Any], list[str], list[str]]] = {}


def _message_codes(message_map: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    found = _MESSAGE_CODES.get(id(message_map))
    if found is None or found[0] is not message_map:
        found = _MESSAGE_CODES[id(message_map)] = (message_map, _codes(message_map), _events(message_map))
    return found


def _codes_cached(message_map: dict[str, Any]) -> list[str]:
    return _message_codes(message_map)[1]


def _events_cached(message_map: dict[str, Any]) -> list[str]:
    return _message_codes(message_map)[2]


def _event_spec(message_map: dict[str, Any], code: str, event: str) -> dict[str, Any]:
    events = message_map.get("events") or {}
    return events.get(f"{code}^{event}") or events.get(event) or {}


def supported() -> list[str]:
    """Message types and events the maps translate, e.g. ["ADT^A01", ...]."""
    return [event for m in mappings().messages for event in _events(m)]


# --------------------------------------------------------------------------------------------
# Reading v2 values. A node is a repetition (list of components, each a list of subcomponents),
# a component (list of subcomponents) or a subcomponent (str); the raw text is still escaped.

Node = list[list[str]] | list[str] | str


def _child(node: Node, index: int) -> Node:
    """Component/subcomponent `index` (1-based); a plain value is its own first part (v2 rule)."""
    if isinstance(node, str):
        return node if index == 1 else ""
    if index <= len(node):
        return node[index - 1]
    return "" if not node or isinstance(node[0], str) else []


def _leaf(node: Node) -> str:
    while node.__class__ is not str:
        if not node:
            return ""
        node = node[0]  # type: ignore[assignment]
    return node  # type: ignore[return-value]


def _is_empty(node: Node) -> bool:
    # Runs for every value a rule looks at: loops rather than generators (a third of the cost).
    if node.__class__ is str:
        return not node
    for child in node:
        if child.__class__ is str:
            if child:
                return False
        elif not _is_empty(child):
            return False
    return True


def _is_null(node: Node) -> bool:
    """The v2 explicit null: the whole value is "" (delete what the receiver has)."""
    if node.__class__ is str:
        return node == '""'
    return _leaf(node) == '""' and all(_is_empty(n) for n in _flat(node)[1:])


def _flat(node: Node) -> list[str]:
    if isinstance(node, str):
        return [node]
    return [leaf for child in node for leaf in _flat(child)]


class Segment:
    def __init__(self, raw: er7.Segment, separators: er7.Separators, position: int, occurrence: int,
                 repeated: bool) -> None:
        self.raw = raw
        self.separators = separators
        self.name = raw.name or ""
        self.position = position
        self.occurrence = occurrence
        self.repeated = repeated
        self._fields: dict[int, list[list[list[str]]]] = {}

    def reps(self, number: int) -> list[list[list[str]]]:
        if number not in self._fields:
            if number > len(self.raw.fields):
                self._fields[number] = []
            elif self.name == "MSH" and number in (1, 2):
                # MSH-1/MSH-2 are the separators themselves, not values to split.
                self._fields[number] = [[[self.raw[number]]]]
            else:
                self._fields[number] = er7.split_field(self.raw[number], self.separators)
        return self._fields[number]

    def where(self, field_number: int | str | None = None) -> str:
        prefix = f"{self.name}[{self.occurrence}]" if self.repeated else self.name
        return f"{prefix}-{field_number}" if field_number is not None else prefix


_PATH = re.compile(r"^(?:(?P<seg>[A-Z][A-Z0-9]{2})-)?(?P<field>\d+)(?:\[(?P<sel>[^\]]+)\])?(?P<rest>(?:\.\d+)*)$")
@functools.lru_cache(maxsize=4096)
def _field_path(path: str) -> tuple[str | None, int, tuple[str, str] | None, tuple[int, ...]]:
    """'OBX-5[1=CE].2' -> ('OBX', 5, ('1', 'CE'), (2,)): parsed once per distinct path."""
    match = _PATH.match(path)
    if not match:
        raise ValueError(f"bad field path {path!r}")
    selector = None
    if match["sel"]:
        key, _, wanted = match["sel"].partition("=")
        selector = (key, wanted.upper())
    rest = tuple(int(index) for index in match["rest"].split(".")[1:])
    return match["seg"], int(match["field"]), selector, rest


@functools.lru_cache(maxsize=4096)
def _relative_path(path: str) -> tuple[int, ...]:
    return tuple(int(index) for index in path.split("."))


@functools.lru_cache(maxsize=4096)
def _alternatives(path: str) -> tuple[str, ...]:
    return tuple(path.split("|"))


_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4}|Z)?$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?(?:[+-]\d{4})?$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_ID_PART = re.compile(r"^[A-Za-z0-9.]+$")
_TARGET_STEP = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<sel>[^\]]*)\])?")
_FHIR_PRIMITIVES = {"string", "markdown", "code", "id", "uri", "url", "date", "dateTime", "instant", "time",
                    "decimal", "integer", "positiveInt", "unsignedInt", "boolean", "base64Binary"}


def make_id(parts: list[str]) -> str:
    """A FHIR id from a business key: readable when every part is plain and short, else a hash.

    "-" joins the parts, so a part holding "-" (or any other character outside [A-Za-z0-9.])
    is hashed to keep two different keys from joining into the same id."""
    parts = [p.strip() for p in parts]
    joined = "-".join(parts)
    if all(_ID_PART.match(p) for p in parts) and len(joined) <= 64:
        return joined
    return hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()


def _parse_target(target: str) -> list[tuple[str, str | None]]:
    steps: list[tuple[str, str | None]] = []
    rest = target
    while rest:
        match = _TARGET_STEP.match(rest)
        if not match:
            raise ValueError(f"bad target path {target!r}")
        steps.append((match["name"], match["sel"]))
        rest = rest[match.end():]
        if rest.startswith("."):
            rest = rest[1:]
        elif rest:
            raise ValueError(f"bad target path {target!r}")
    return steps


_parse_target_cached = functools.lru_cache(maxsize=None)(_parse_target)


class PlainText(str):
    """Text destined for a base64Binary element, still readable so OBX lines can be joined;
    encoded when the resource is finished."""


_BLANKABLE = (str, dict, list)
_IMMUTABLE = (str, int, float, bool)


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    # only empty text, objects and lists; a zero or False is a value
    return not value if isinstance(value, _BLANKABLE) else False


def _prune(value: Any) -> Any:
    """Drop empty strings, objects and lists so the output carries no empty FHIR elements."""
    cls = value.__class__
    if cls is dict or (cls is not str and cls is not list and isinstance(value, dict)):
        pruned = {}
        for k, v in value.items():
            if v.__class__ is not str or v.__class__ is PlainText:
                v = _prune(v)
            if not _is_blank(v):
                pruned[k] = v
        return pruned
    if cls is list or (cls is not str and isinstance(value, list)):
        pruned_list = []
        for v in value:
            if v.__class__ is not str:
                v = _prune(v)
            if not _is_blank(v):
                pruned_list.append(v)
        return pruned_list
    if cls is PlainText:
        return base64.b64encode(str(value).encode("utf-8")).decode("ascii")
    return value


def _merge_missing(into: dict[str, Any], value: dict[str, Any], override: bool) -> None:
    for key, item in value.items():
        if key not in into or _is_blank(into[key]):
            into[key] = item
        elif isinstance(into[key], dict) and isinstance(item, dict):
            _merge_missing(into[key], item, override)
        elif override:
            into[key] = item


# --------------------------------------------------------------------------------------------
# Rules as read once: what apply() needs from a rule, worked out the first time the rule runs
# (its paths parsed, its kind decided) instead of on every segment of every message. The rule
# dicts stay the data; this is a cache of the questions asked of them.

_NOT_PARSED = object()


class _Rule:
    __slots__ = (
        "clear",
        "constant",
        "defaults",
        "every",
        "field0",
        "has_source",
        "later",
        "paths",
        "required",
        "rule",
        "target",
        "value",
        "when",
    )

    def __init__(self, rule: dict[str, Any]) -> None:
        self.rule = rule  # held so that the id() it is cached under cannot be reused
        self.when = rule.get("when")
        self.constant = "value" in rule
        self.value = rule.get("value")
        self.target = rule.get("target")
        self.required = bool(rule.get("required"))
        self.defaults = rule.get("defaults")
        self.has_source = "field" in rule or "component" in rule
        self.field0 = str(rule["field"]).split(".")[0] if "field" in rule else None
        # a second and later value of an overriding rule is added, not put in place of the first
        self.later = {**rule, "override": False}
        path = rule.get("field", rule.get("component"))
        self.every = bool(rule.get("repeat", "[]" in rule.get("target", "") or "join" in rule))
        self.paths: list[tuple[Any, ...]] | None = None
        if path is not None:
            self.paths = [_compiled_path(alternative) for alternative in _alternatives(str(path))]
        # the element an explicit null ("") in this rule's field clears
        self.clear: Any = _NOT_PARSED
        try:
            first, selector = _parse_target_cached(self.target)[0] if self.target != "." else ("", "x")
            digit = str(rule.get("field", "")).isdigit()
            self.clear = first if digit and selector in (None, "") and not first.startswith("_") else None
        except (ValueError, TypeError, IndexError):
            pass  # a bad target fails where the interpreter would have failed, when it is used


def _compiled_path(alternative: str) -> tuple[Any, ...]:
    """(alternative, segment, field, selector, rest, relative); a path that does not parse keeps
    segment _NOT_PARSED so that nodes() raises on it as it always did."""
    try:
        seg, field_number, selector, rest = _field_path(alternative)
    except ValueError:
        return (alternative, _NOT_PARSED, 0, None, (), None)
    try:
        relative: tuple[int, ...] | None = _relative_path(alternative)
    except ValueError:
        relative = None
    return (alternative, seg, field_number, selector, rest, relative)


_RULES: dict[int, _Rule] = {}


def _compiled(rule: dict[str, Any]) -> _Rule:
    found = _RULES.get(id(rule))
    if found is None or found.rule is not rule:
        found = _RULES[id(rule)] = _Rule(rule)
    return found


# --------------------------------------------------------------------------------------------
# Scopes: where relative paths in a rule are read from

@dataclass(slots=True)
class Scope:
    segment: Segment
    node: Node | None = None  # None: paths name fields of the segment; else components of node
    field: str | None = None  # the field the node came from, for error locations

    def at(self, node: Node, field: Any = None) -> Scope:
        return Scope(self.segment, node, str(field) if field is not None else self.field)

    def where(self) -> str:
        if self.field and "-" in self.field:
            return self.field  # a rule reading another segment (OBR-7 from an OBX) names it
        return self.segment.where(self.field)


class _Run:
    """One translation: the message, what has been built so far, and the context segments see."""

    def __init__(self, message: er7.Message, maps: Mappings, message_map: dict[str, Any], code: str,
                 event: str) -> None:
        self.message = message
        self.maps = maps
        self.message_map = message_map
        self.code = code
        self.event = event
        self.segments: list[Segment] = []
        counts: dict[str, int] = {}
        names = [s.name or "" for s in message]
        for position, raw in enumerate(message):
            name = names[position]
            counts[name] = counts.get(name, 0) + 1
            self.segments.append(Segment(raw, message.separators, position, counts[name], names.count(name) > 1))
        self.resources: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}  # resource key -> segment map that created it
        self.current: dict[str, dict[str, Any]] = {}  # resource type -> resource in context
        self.seen: dict[str, Segment] = {}  # segment name -> latest such segment
        self.owner: dict[str, Any] | None = None  # resource the latest creating segment made
        self.since_owner: dict[str, int] = {}  # segment name -> count since the owner changed (@index)
        self.clears: dict[str, set[str]] = {}
        self.deferred: list[tuple[dict[str, Any], str, str, Any]] = []
        self.merges: list[tuple[str, str]] = []
        self.timezone = str(maps.settings.get("default_timezone", "+00:00"))
        self.separators = message.separators

    # --- values -------------------------------------------------------------------------

    def unescape(self, raw: str) -> str:
        return er7.unescape(raw, self.separators)

    def text(self, node: Node) -> str:
        leaf = _leaf(node)
        if self.separators.escape in leaf:
            leaf = er7.unescape(leaf, self.separators)
        return leaf.strip()

    def nodes(self, path: str, scope: Scope, every: bool = False) -> list[Node]:
        """The node(s) a path names. `every`: one per repetition of the field."""
        seg, field, selector, rest = _field_path(str(path))
        if scope.node is not None and not seg:
            node: Node = scope.node
            for index in _relative_path(str(path)):
                node = _child(node, index)
            return [node]
        segment = self.seen.get(seg) if seg else scope.segment
        if segment is None:
            return []
        reps = segment.reps(field)
        if selector:
            key, wanted = selector
            reps = [r for r in reps if self.text(_descend(r, key)).upper() == wanted]
        if not every:
            reps = reps[:1]
        found: list[Node] = []
        for rep in reps:
            node = rep
            for index in rest:
                node = _child(node, index)
            found.append(node)
        return found

    def value(self, path: str, scope: Scope) -> str:
        """Text of a path; "a|b" takes the first that is valued; @names read the translation context."""
        for alternative in _alternatives(str(path)):
            if alternative.startswith("@"):
                text = self.token(alternative, scope)
            else:
                found = self.nodes(alternative, scope)
                text = self.text(found[0]) if found else ""
            if text and text != '""':
                return text
        return ""

    def token(self, token: str, scope: Scope) -> str:
        if token == "@event":
            return self.event
        if token == "@patient":
            return str(self.current.get("Patient", {}).get("id", ""))
        if token.startswith("@id:"):
            return str(self.current.get(token[4:], {}).get("id", ""))
        if token == "@owner":
            return str(self.owner.get("id", "")) if self.owner else ""
        if token == "@index":
            return str(self.since_owner.get(scope.segment.name, 0))
        if token == "@seq":
            return str(scope.segment.occurrence)
        raise MappingError(f"unknown token {token} in mappings", "207")

    # --- conditions ---------------------------------------------------------------------

    def test(self, condition: dict[str, Any], scope: Scope) -> bool:
        if "all" in condition:
            return all(self.test(c, scope) for c in condition["all"])
        if "any" in condition:
            return any(self.test(c, scope) for c in condition["any"])
        if "not" in condition:
            return not self.test(condition["not"], scope)
        if "event_in" in condition:
            return self.event in condition["event_in"]
        text = self.value(condition["path"], scope)
        if "valued" in condition:
            return bool(text) == bool(condition["valued"])
        if "equals" in condition:
            return text.upper() == str(condition["equals"]).upper()
        if "in" in condition:
            return text.upper() in {str(v).upper() for v in condition["in"]}
        if "not_in" in condition:
            return text.upper() not in {str(v).upper() for v in condition["not_in"]}
        if "longer_than" in condition:
            return len(text) > int(condition["longer_than"])
        raise MappingError(f"unknown condition {condition} in mappings", "207")

    # --- rules --------------------------------------------------------------------------

    def apply(self, rules: list[dict[str, Any]], into: dict[str, Any], scope: Scope,
              clears_key: str | None = None) -> bool:
        """Run rules into `into`; True when any value came from the message (constants do not count,
        so a datatype with only fixed parts is dropped)."""
        has_data = False
        for rule in rules:
            compiled = _compiled(rule)
            if compiled.when is not None and not self.test(compiled.when, scope):
                continue
            if compiled.constant:
                value = compiled.value
                if not isinstance(value, _IMMUTABLE):
                    value = copy.deepcopy(value)
                self.assign(into, compiled.target, value, rule)  # type: ignore[arg-type]
                continue
            produced = False
            for count, node in enumerate(self._rule_sources(compiled, scope)):
                if _is_null(node):
                    if compiled.clear is _NOT_PARSED:
                        _parse_target_cached(compiled.target)  # raises: the target is malformed
                    if clears_key and scope.node is None and compiled.clear is not None:
                        self.clears.setdefault(clears_key, set()).add(compiled.clear)
                    continue
                value = self.convert(node, rule, scope, compiled)
                if _is_blank(value):
                    continue
                if compiled.defaults is not None and isinstance(value, dict):
                    value = {**copy.deepcopy(compiled.defaults), **value}
                # an overriding rule replaces what is there with its first value and adds the rest
                self.assign(into, compiled.target, value, rule if count == 0 else compiled.later)  # type: ignore[arg-type]
                produced = has_data = True
            if not produced and compiled.required:
                where = scope.at(scope.node, rule.get("field", rule.get("component"))).where()
                raise MappingError(f"{where} is required", "101", where)
        return has_data

    def sources(self, rule: dict[str, Any], scope: Scope) -> list[Node]:
        return self._rule_sources(_compiled(rule), scope)

    def _rule_sources(self, compiled: _Rule, scope: Scope) -> list[Node]:
        """The valued nodes a rule reads: those of its first alternative path that has any."""
        if compiled.paths is None:
            return [scope.node if scope.node is not None else []]
        base = scope.node
        for alternative, seg, field_number, selector, rest, relative in compiled.paths:
            if seg is _NOT_PARSED or (base is not None and not seg and relative is None):
                found = [n for n in self.nodes(alternative, scope, every=compiled.every) if not _is_empty(n)]
                if found:
                    return found
                continue
            if base is not None and not seg:
                node: Node = base
                for index in relative:  # type: ignore[union-attr]
                    node = _child(node, index)
                if not _is_empty(node):
                    return [node]
                continue
            segment = self.seen.get(seg) if seg else scope.segment
            if segment is None:
                continue
            reps = segment.reps(field_number)
            if selector:
                key, wanted = selector
                reps = [r for r in reps if self.text(_descend(r, key)).upper() == wanted]
            elif not compiled.every:
                reps = reps[:1]
            if selector and not compiled.every:
                reps = reps[:1]
            found = []
            for rep in reps:
                node = rep
                for index in rest:
                    node = _child(node, index)
                if not _is_empty(node):
                    found.append(node)
            if found:
                return found
        return []

    def convert(self, node: Node, rule: dict[str, Any], scope: Scope, compiled: _Rule | None = None) -> Any:
        compiled = compiled or _compiled(rule)
        if compiled.field0 is not None and scope.node is None:
            here = Scope(scope.segment, node, compiled.field0)
        elif compiled.has_source:
            here = Scope(scope.segment, node, scope.field)
        else:
            here = scope
        if "format" in rule:
            return self.format(rule["format"], here)
        if "compute" in rule:
            return COMPUTE[rule["compute"]](self, rule, here)
        if "rules" in rule:
            built: dict[str, Any] = {}
            if not self.apply(rule["rules"], built, here):
                return None
            if "requires_any" in rule and not any(not _is_blank(built.get(k)) for k in rule["requires_any"]):
                return None
            return built
        kind = rule.get("type", "ST")
        fhir = rule.get("fhir")
        if kind in self.maps.datatypes and (fhir is None or fhir not in _FHIR_PRIMITIVES):
            value, _ = self.datatype(kind, node, here)
            return self.vocabulary(value, rule, node) if "vocabulary" in rule or "code_system" in rule else value
        return self.primitive(node, rule, here)

    def primitive(self, node: Node, rule: dict[str, Any], scope: Scope) -> Any:
        text = self.text(node)
        if not text or text == '""':
            return None
        if "lookup" in rule:
            found = rule["lookup"].get(text, rule["lookup"].get(text.upper()))
            if found is None:
                return None
            text = str(found)
        if "table" in rule:
            found = self.maps.tables[rule["table"]].get(text)
            if found is None:
                return None
            text = found
        fhir = rule.get("fhir", "string")
        if "vocabulary" in rule:
            vocabulary = self.maps.vocabularies[rule["vocabulary"]]
            if fhir == "code":
                return vocabulary.code(text, rule.get("vocabulary_target"))
            codings = vocabulary.translate(text)
            return codings[0] if fhir == "Coding" else {"coding": codings}
        if fhir in ("Coding", "CodeableConcept"):
            coding = {"system": rule["code_system"], "code": text} if "code_system" in rule else {"code": text}
            return coding if fhir == "Coding" else {"coding": [coding]}
        try:
            return self.cast(text, fhir)
        except ValueError as exc:
            if rule.get("lenient"):
                return None
            where = scope.where()
            raise MappingError(f"{where}: {exc}", "102", where) from None

    def cast(self, text: str, fhir: str) -> Any:
        """v2 primitive syntax -> FHIR primitive (the part of data types that is not a mapping)."""
        if fhir == "time":
            match = _TM.match(text)
            if not match:
                raise ValueError(f"{text!r} is not a v2 time")
            hour, minute, second, fraction = match.groups()
            if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 59:
                raise ValueError(f"{text!r} is not a v2 time")
            return f"{hour}:{minute or '00'}:{second or '00'}{fraction or ''}"
        if fhir in ("date", "dateTime", "instant"):
            return self.datetime(text, fhir)
        if fhir == "decimal":
            if not _NUMBER.match(text):
                raise ValueError(f"{text!r} is not a number")
            return Decimal(text.lstrip("+"))
        if fhir in ("integer", "positiveInt", "unsignedInt"):
            try:
                number = Decimal(text.lstrip("+"))
            except InvalidOperation:
                raise ValueError(f"{text!r} is not a number") from None
            if number != number.to_integral_value():
                raise ValueError(f"{text!r} is not a whole number")
            result = int(number)
            if (fhir == "positiveInt" and result < 1) or (fhir == "unsignedInt" and result < 0):
                raise ValueError(f"{text!r} is out of range for {fhir}")
            return result
        if fhir == "boolean":
            # HL7 table 0136 (Y/N); anything else carries no truth value
            return {"Y": True, "N": False}.get(text.upper())
        if fhir == "base64Binary":
            return PlainText(text)
        return text

    def datetime(self, text: str, fhir: str) -> str | None:
        """v2 DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]) at the precision sent.

        FHIR wants a time zone whenever there is a time: an offset-less v2 time is read in the
        zone settings.yaml names. An instant needs a time; a date keeps only the date part."""
        match = _DTM.match(text.replace(" ", ""))
        if not match:
            raise ValueError(f"{text!r} is not a v2 date/time")
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                 int(second or 0))  # rejects 20210231 and 2561
        if zone is not None and zone != "Z" and (int(zone[1:3]) > 14 or int(zone[3:]) > 59):
            raise ValueError(f"{text!r} has no valid time zone")
        date = "-".join(p for p in (year, month, day) if p)
        if fhir == "date":
            return date
        if hour is None or day is None:
            return None if fhir == "instant" else date
        offset = "Z" if zone == "Z" else (f"{zone[:3]}:{zone[3:]}" if zone else self.timezone)
        return f"{date}T{hour}:{minute or '00'}:{second or '00'}{fraction or ''}{offset}"

    def format(self, template: str, scope: Scope) -> str | None:
        """"{6} {3} {2.1}": the named parts, empty ones left out, whitespace tidied."""
        text = re.sub(r"\{([^}]+)\}", lambda m: self.value(m.group(1), scope), template)
        text = re.sub(r"\s+", " ", text).strip(" ,")
        return text or None

    def datatype(self, name: str, node: Node, scope: Scope) -> tuple[Any, str | None]:
        """Run a datatype map over a node; returns the value and the FHIR type it produced."""
        spec = self.maps.datatypes[name]
        if "same_as" in spec:
            return self.datatype(spec["same_as"], node, scope)
        here = scope.at(node)
        variant = spec
        for candidate in spec.get("variants", []):
            if "when" not in candidate or self.test(candidate["when"], here):
                variant = candidate
                break
        built: dict[str, Any] = {}
        if not self.apply(variant.get("rules", []), built, here):
            return None, None
        for key, items in (spec.get("item_requires_any") or {}).items():
            built[key] = [i for i in built.get(key, []) if any(not _is_blank(i.get(k)) for k in items)]
        for key, needed in (spec.get("drop_unless") or {}).items():
            if key in built and needed not in built:
                del built[key]
        if "requires_any" in spec and not any(not _is_blank(built.get(k)) for k in spec["requires_any"]):
            return None, None
        if "." in built:
            return built["."], variant.get("fhir")
        if "creates" in spec:
            self.create_referenced(spec["creates"], built, here)
        return built, variant.get("fhir", spec.get("fhir"))

    def create_referenced(self, spec: dict[str, Any], reference: dict[str, Any], scope: Scope) -> None:
        """XCN and the like name a resource of their own (a Practitioner): build it once per id."""
        rid = self.key(spec["id"], scope)
        if not rid:
            return
        resource: dict[str, Any] = {"resourceType": spec["resource"], "id": rid}
        self.apply(spec["rules"], resource, scope)
        key = f"{spec['resource']}/{rid}"
        if key in self.resources:
            _merge_missing(self.resources[key], resource, override=False)
        else:
            self.resources[key] = resource
        reference["reference"] = key

    def vocabulary(self, value: Any, rule: dict[str, Any], node: Node) -> Any:
        """A coded datatype through an HL7 table: the FHIR coding the table maps to goes first and
        the v2 code stays, in the table's v2 system when the message named no system."""
        if not isinstance(value, dict) or not value.get("coding"):
            return value
        original = value["coding"][0]
        source = rule.get("code_system")
        vocabulary = self.maps.vocabularies.get(rule["vocabulary"]) if "vocabulary" in rule else None
        if vocabulary is not None:
            source = vocabulary.source
        named = self.text(_child(node, 3))
        if source and "system" not in original and "code" in original and not named:
            # no coding system named: the code is from the HL7 table this element uses
            original["system"] = source
        if vocabulary is None or original.get("system") != vocabulary.source or "code" not in original:
            return value["coding"][0] if rule.get("fhir") == "Coding" else value
        if rule.get("fhir") == "code":
            return vocabulary.code(original["code"], rule.get("vocabulary_target"))
        mapped = [c for c in vocabulary.mapped(original["code"]) if c not in value["coding"]]
        value["coding"] = [*mapped, *value["coding"]]
        return value["coding"][0] if rule.get("fhir") == "Coding" else value

    # --- writing into resources -----------------------------------------------------------

    def assign(self, into: dict[str, Any], target: str, value: Any, rule: dict[str, Any]) -> None:
        """Put a value at a target path: `a.b`, `a[]` (append), `a[2]` (1-based), `a[url=X]`
        (the element with url X, made if missing) and `a[+url=X]` (always a new one). A value
        already present is kept (first rule wins) unless the rule or the entry overrides."""
        override = bool(rule.get("override"))
        if target == ".":
            if isinstance(value, dict):
                _merge_missing(into, value, override)
            else:
                into["."] = value
            return
        steps = _parse_target_cached(target)
        container: Any = into
        for position, (name, selector) in enumerate(steps):
            last = position == len(steps) - 1
            if selector is None:
                if last:
                    self._set(container, name, value, rule, override)
                    return
                if not isinstance(container.get(name), dict):
                    container[name] = {}
                container = container[name]
                continue
            items = container.setdefault(name, [])
            if selector == "":
                if last:
                    items.append(value)
                    return
                items.append({})
                container = items[-1]
            elif selector.isdigit():
                index = int(selector) - 1
                while len(items) <= index:
                    items.append({})
                if last:
                    if isinstance(value, dict) and isinstance(items[index], dict):
                        _merge_missing(items[index], value, override)
                    elif override or _is_blank(items[index]):
                        items[index] = value
                    return
                container = items[index]
            else:
                fresh = selector.startswith("+")
                key, _, wanted = selector.lstrip("+").partition("=")
                found = None if fresh else next((i for i in items if _get(i, key) == wanted), None)
                if found is None:
                    found = _make(key, wanted)
                    items.append(found)
                if last:
                    if isinstance(value, dict):
                        _merge_missing(found, value, override)
                    return
                container = found

    def _set(self, container: dict[str, Any], name: str, value: Any, rule: dict[str, Any], override: bool) -> None:
        if override or name not in container or _is_blank(container[name]):
            container[name] = value
        elif "join" in rule and isinstance(container[name], str) and isinstance(value, str):
            joined = container[name] + rule["join"] + value
            container[name] = PlainText(joined) if isinstance(value, PlainText) else joined
        elif isinstance(container[name], dict) and isinstance(value, dict):
            _merge_missing(container[name], value, override)

    def key(self, alternatives: list[Any], scope: Scope) -> str | None:
        """Business key -> id: the first alternative whose required parts are all valued.
        "=text" is a literal part (keeps a placer key apart from a filler key); "path?" may be
        empty and is then left out."""
        for alternative in alternatives:
            if isinstance(alternative, dict):
                if "when" in alternative and not self.test(alternative["when"], scope):
                    continue
                alternative = alternative["parts"]
            parts: list[str] = alternative
            values: list[str] = []
            complete = True
            for part in parts:
                if part.startswith("="):
                    values.append(part[1:])
                    continue
                optional = part.endswith("?")
                text = self.value(part.rstrip("?"), scope)
                if text:
                    values.append(text)
                elif not optional:
                    complete = False
                    break
            if complete and values:
                return make_id(values)
        return None

    # --- message structure ----------------------------------------------------------------

    def run(self) -> Translation:
        entries: dict[str, Any] = self.message_map.get("segments", {})
        required = list(self.message_map.get("requires", []))
        for segment in self.segments:
            self.seen[segment.name] = segment
            if segment.name in required:
                required.remove(segment.name)
            spec = entries.get(segment.name)
            if spec is None:
                continue
            alternatives = spec if isinstance(spec, list) else [spec]
            scope = Scope(segment)
            chosen = next((a for a in alternatives if "when" not in a or self.test(a["when"], scope)), None)
            if chosen is not None:
                self.entry(chosen, segment)
        if required:
            raise MappingError(f"{required[0]} segment is required", "101", required[0])
        return self.finish()

    def entry(self, entry: dict[str, Any], segment: Segment) -> None:
        for forget in entry.get("clears_context", []):
            self.current.pop(forget, None)
            self.seen.pop(forget, None)
        if "map" not in entry:
            return
        self.since_owner[segment.name] = self.since_owner.get(segment.name, 0) + 1
        spec = self.maps.segments[entry["map"]]
        scope = Scope(segment)
        if "merge" in entry:
            self.merge_entry(entry, spec, scope)
        elif "into" in entry:
            target = self.current.get(entry["into"])
            if target is not None:
                self.apply(spec.get("rules", []), target, scope, f"{target['resourceType']}/{target['id']}")
                self.link(target, entry, scope)
        elif "attach" in entry:
            self.attach(entry, spec, scope)
        else:
            self.create(entry, spec, scope)
        for also in entry.get("also", []):
            if "when" not in also or self.test(also["when"], scope):
                # resources made alongside (a DocumentReference for an ED result, a Communication
                # for a patient note) leave the owner as it was
                self.create({**also, "keep_owner": True}, self.maps.segments[also["map"]], scope)

    def create(self, entry: dict[str, Any], spec: dict[str, Any], scope: Scope) -> None:
        rtype = spec["resource"]
        rid = self.key(spec.get("id", []), scope)
        if rid is None:
            if spec.get("id_required"):
                where = spec.get("id_location") or scope.segment.where()
                raise MappingError(f"{where}: no identifier to key the {rtype} on", "101", where)
            if spec.get("unkeyed") == "skip":
                return  # nothing stable to name it by: a new resource per message would only pile up
            rid = make_id([self.value("MSH-10", scope) or "message", scope.segment.name,
                           str(scope.segment.occurrence), rtype])
        key = f"{rtype}/{rid}"
        if key in self.resources and spec.get("on_duplicate_id", "merge") == "suffix" and \
                self.origin.get(key) == entry["map"]:
            # the same key twice in one message (the same test twice in a report): the second is
            # another resource, numbered in message order so a re-send numbers it alike
            base, number = rid, 2
            while key in self.resources:
                rid = make_id([base, str(number)])
                key = f"{rtype}/{rid}"
                number += 1
        resource = self.resources.get(key) or {"resourceType": rtype, "id": rid}
        self.apply(spec.get("rules", []), resource, scope, key)
        if key not in self.resources:
            self.resources[key] = resource
            self.origin[key] = entry["map"]
        self.current[rtype] = resource
        self.link(resource, entry, scope)
        if not entry.get("keep_owner"):
            self.owner = resource
            self.since_owner = {}

    def attach(self, entry: dict[str, Any], spec: dict[str, Any], scope: Scope) -> None:
        owner = self.owner
        if owner is None:
            return
        how = entry["attach"].get(owner["resourceType"])
        if how is None:
            return
        fragment: dict[str, Any] = {}
        if not self.apply(spec.get("rules", []), fragment, scope):
            return
        if "requires_any" in spec and not any(not _is_blank(fragment.get(k)) for k in spec["requires_any"]):
            return
        if isinstance(how, str):
            how = {"path": how}
        value: Any = fragment.get(how["take"]) if "take" in how else fragment
        if not _is_blank(value):
            self.assign(owner, how["path"], value, how)

    def merge_entry(self, entry: dict[str, Any], spec: dict[str, Any], scope: Scope) -> None:
        """A40: the record MRG names is merged into the patient of the PID before it."""
        old = self.key(spec["id"], scope)
        survivor = self.current.get(entry["merge"])
        if old is None:
            where = spec.get("id_location") or scope.segment.where()
            raise MappingError(f"{where}: no identifier for the record being merged", "101", where)
        if survivor is None:
            raise MappingError("merge without a surviving patient", "101", "PID")
        if old != survivor["id"]:
            self.merges.append((old, survivor["id"]))

    def link(self, resource: dict[str, Any], entry: dict[str, Any], scope: Scope) -> None:
        """References between resources of the message (relative, "Patient/<id>")."""
        for link in entry.get("links", []):
            if "of" in link:
                # other -> this: only the one in context now (an OBX before any OBR has no report)
                other = self.current.get(link["of"])
                if other is not None and other is not resource:
                    self.assign(other, link["path"], _reference(resource), link)
                continue
            target = link["to"]
            if target == "@owner":
                if self.owner is not None and self.owner is not resource:
                    self.assign(resource, link["path"], self.shape(link, _reference(self.owner)), link)
                continue
            other = self.current.get(target)
            if other is None:
                # later in the message (SIU sends SCH before PID): resolve when all is read
                if link.get("defer", True):
                    self.deferred.append((resource, target, link["path"], link))
            elif other is not resource:
                self.assign(resource, link["path"], self.shape(link, _reference(other)), link)

    @staticmethod
    def shape(link: dict[str, Any], reference: dict[str, str]) -> Any:
        if "as" not in link:
            return reference
        return json.loads(json.dumps(link["as"]).replace('"@ref"', json.dumps(reference)))

    def finish(self) -> Translation:
        for resource, target, path, link in self.deferred:
            other = self.current.get(target)
            if other is not None and other is not resource:
                self.assign(resource, path, self.shape(link, _reference(other)), link)
        event_spec = _event_spec(self.message_map, self.code, self.event)
        for rtype, values in (event_spec.get("set") or {}).items():
            for resource in self.resources.values():
                if resource["resourceType"] == rtype:
                    for target, value in values.items():
                        self.assign(resource, target, copy.deepcopy(value), {"override": True})
        resources = []
        for key, resource in self.resources.items():
            spec = self.maps.segments.get(self.origin.get(key, ""), {})
            for requirement in spec.get("requires", []):
                if _is_blank(_prune(resource.get(requirement["element"]))):
                    raise MappingError(f"{requirement['location']} is required for {key}", "101",
                                       requirement["location"])
            resources.append(_prune(resource))
        clears = {}
        for key, elements in self.clears.items():
            resource = self.resources.get(key)
            # an element another field filled in this message is replaced, not cleared
            kept = sorted(e for e in elements if resource is None or _is_blank(_prune(resource.get(e))))
            if kept:
                clears[key] = kept
        patient = next((r["id"] for r in resources if r["resourceType"] == "Patient"), None)
        return Translation(resources=resources, patient_id=patient, source_time=self.source_time(),
                           merges=self.merges, clears=clears)

    def source_time(self) -> str | None:
        scope = Scope(self.segments[0])
        for path in self.message_map.get("source_time", ["MSH-7"]):
            text = self.value(path, scope)
            if text:
                try:
                    return self.datetime(text, "dateTime")
                except ValueError:
                    raise MappingError(f"{path}: {text!r} is not a v2 date/time", "102", path) from None
        return None


def _get(item: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(item, dict):
            return None
        item = item.get(key)
    return item


def _make(dotted: str, value: str) -> dict[str, Any]:
    made: dict[str, Any] = {}
    inner = made
    keys = dotted.split(".")
    for key in keys[:-1]:
        inner = inner.setdefault(key, {})
    inner[keys[-1]] = value
    return made


def _descend(node: Node, path: str) -> Node:
    for index in path.split("."):
        node = _child(node, int(index))
    return node


def _reference(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


# --------------------------------------------------------------------------------------------
# Computations the data names but cannot express

def _observation_value(run: _Run, rule: dict[str, Any], scope: Scope) -> dict[str, Any] | None:
    """OBX-5 read as the type OBX-2 names; value[x] follows the FHIR type that yields (this choice
    is the one thing the IG leaves to code). Units (OBX-6) go into every Quantity produced; a
    repeating non-text OBX-5 becomes components, repeating text becomes lines."""
    types: dict[str, Any] = rule["types"]
    kind = run.value(rule["type_field"], scope).upper()
    how = types.get(kind, types["default"])
    if how.get("none"):
        return None
    reps = [n for n in run.nodes(str(rule["value_field"]), scope, every=True) if not _is_empty(n)]
    if not reps:
        return None
    units = None
    if "units_field" in rule:
        found = run.nodes(str(rule["units_field"]), scope)
        if found and not _is_empty(found[0]):
            units, _ = run.datatype(rule["units_type"], found[0], scope)

    def one(node: Node) -> tuple[str, Any] | None:
        if "type" in how:
            value, fhir = run.datatype(how["type"], node, scope.at(node, rule["value_field"]))
        else:
            value, fhir = run.primitive(node, how, scope.at(node, rule["value_field"])), how.get("fhir", "string")
            if how.get("quantity") and value is not None:
                value, fhir = {"value": value}, "Quantity"
        if _is_blank(value):
            return None
        if units and fhir == "Quantity":
            _merge_missing(value, units, override=False)
        elif units and fhir == "Range":
            for end in ("low", "high"):
                if end in value:
                    _merge_missing(value[end], units, override=False)
        elif units and fhir == "Ratio":
            for part in ("numerator", "denominator"):
                if part in value:
                    _merge_missing(value[part], units, override=False)
        return "value" + fhir[0].upper() + fhir[1:], value

    if how.get("lines"):
        lines = [run.unescape(_leaf(n)) for n in reps]
        return {"valueString": "\n".join(line.rstrip() for line in lines).strip("\n")} if any(lines) else None
    values = [v for v in (one(n) for n in reps) if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return {values[0][0]: values[0][1]}
    code = run.datatype("CWE", run.nodes(str(rule["code_field"]), scope)[0], scope)[0] if "code_field" in rule \
        else None
    return {"component": [{"code": code or {"text": "component"}, name: value} for name, value in values]}


_RANGE = re.compile(r"^\s*(?P<low>[+-]?\d*\.?\d+)\s*(?:-|\u2013|to|\.\.)\s*(?P<high>[+-]?\d*\.?\d+)\s*$", re.I)
_BOUND = re.compile(r"^\s*(?P<op><=|>=|<|>)\s*(?P<value>[+-]?\d*\.?\d+)\s*$")


def _reference_range(run: _Run, rule: dict[str, Any], scope: Scope) -> dict[str, Any] | None:
    """OBX-7 as text, plus low/high when it reads as "a-b", "a to b", "<b" or ">a" (the IG leaves
    parsing to the implementer); the bounds carry OBX-6's units."""
    text = run.value(rule["range_field"], scope)
    if not text:
        return None
    result: dict[str, Any] = {"text": text}
    units = None
    found = run.nodes(str(rule["units_field"]), scope)
    if found and not _is_empty(found[0]):
        units, _ = run.datatype(rule["units_type"], found[0], scope)
    bounds: dict[str, str] = {}
    if match := _RANGE.match(text):
        bounds = {"low": match["low"], "high": match["high"]}
    elif match := _BOUND.match(text):
        bounds = {"high" if match["op"].startswith("<") else "low": match["value"]}
    for end, number in bounds.items():
        quantity: dict[str, Any] = {"value": Decimal(number)}
        if units:
            _merge_missing(quantity, {k: v for k, v in units.items() if k != "comparator"}, override=False)
        result[end] = quantity
    return result


def _mime_type(run: _Run, rule: dict[str, Any], scope: Scope) -> str | None:
    """ED-2/ED-3 (type of data / subtype, tables 0191/0291) as a MIME type."""
    top = run.value(rule["args"][0], scope)
    sub = run.value(rule["args"][1], scope).lower()
    spec = run.maps.datatypes[rule["spec"]]
    top_level = spec.get("mime_top_level", {}).get(top.upper()) or (top.lower() if top else "")
    subtypes = spec.get("mime_subtypes", {})
    if sub.upper() in subtypes:
        return str(subtypes[sub.upper()])
    if top_level and sub:
        return f"{top_level}/{sub}"
    return spec.get("mime_default") if top or sub else None


def _encoded_data(run: _Run, rule: dict[str, Any], scope: Scope) -> dict[str, Any] | None:
    """ED-4/ED-5: decode Base64, Hex or plain (A) data to the bytes FHIR carries as base64, with
    their size and SHA-1 hash."""
    encoding = run.value(rule["args"][0], scope).upper()
    found = run.nodes(rule["args"][1], scope)
    raw = "".join(_flat(found[0])) if found else ""
    if not raw:
        return None
    try:
        if encoding == "BASE64":
            data = base64.b64decode(re.sub(r"\s+", "", raw), validate=True)
        elif encoding == "HEX":
            data = binascii.unhexlify(re.sub(r"\s+", "", raw))
        else:
            data = run.unescape(raw).encode("utf-8")
    except (binascii.Error, ValueError):
        where = scope.where()
        raise MappingError(f"{where}: {encoding.lower()} data does not decode", "102", where) from None
    return {"data": base64.b64encode(data).decode("ascii"), "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")}


def _duration(run: _Run, amount_path: str, unit_path: str, scope: Scope, units: dict[str, Any]) -> timedelta | None:
    amount = run.value(amount_path, scope)
    unit = run.value(unit_path, scope) or units.get("default", "min")
    minutes = units.get("minutes", {}).get(unit.lower())
    if not amount or minutes is None or not _NUMBER.match(amount):
        return None
    return timedelta(minutes=float(Decimal(amount) * Decimal(str(minutes))))


def _minutes(run: _Run, rule: dict[str, Any], scope: Scope) -> int | None:
    """A v2 duration (amount + unit, e.g. SCH-9/SCH-10) in whole minutes (Appointment.minutesDuration)."""
    units = run.maps.tables[rule["units"]]
    delta = _duration(run, rule["args"][0], rule["args"][1], scope, {"minutes": units.entries})
    if delta is None:
        return None
    minutes = round(delta.total_seconds() / 60)
    return minutes if minutes >= 1 else None


def _end_after(run: _Run, rule: dict[str, Any], scope: Scope) -> str | None:
    """start + duration (AIx start plus AIx duration/units): date arithmetic, kept at the start's
    precision and offset."""
    start_text = run.value(rule["args"][0], scope)
    units = run.maps.tables[rule["units"]]
    delta = _duration(run, rule["args"][1], rule["args"][2], scope, {"minutes": units.entries})
    if not start_text or delta is None:
        return None
    try:
        start = run.datetime(start_text, "dateTime")
    except ValueError:
        return None
    if not start or "T" not in start:
        return None
    moment = datetime.fromisoformat(start.replace("Z", "+00:00")) + delta
    text = moment.isoformat()
    return text.replace("+00:00", "Z") if start.endswith("Z") else text


def _hd_system(run: _Run, rule: dict[str, Any], scope: Scope) -> str | None:
    """An assigning authority (HD: namespace, universal id, its type) as an Identifier.system:
    a configured namespace first, then the universal id as an OID, UUID or URI."""
    namespace, universal, kind = (run.value(p, scope) for p in rule["args"])
    configured = run.maps.tables[rule["table"]].get(namespace) if namespace else None
    if configured:
        return configured
    if universal and kind.upper() == "ISO" and re.fullmatch(r"[0-2](\.(0|[1-9]\d*))+", universal):
        return f"urn:oid:{universal}"
    if universal and kind.upper() == "UUID":
        return f"urn:uuid:{universal.lower()}"
    if universal and kind.upper() in ("URI", "URL") and re.match(r"^[a-z][a-z0-9+.-]*:", universal):
        return universal
    return None


COMPUTE: dict[str, Callable[[_Run, dict[str, Any], Scope], Any]] = {
    "observation_value": _observation_value,
    "reference_range": _reference_range,
    "mime_type": _mime_type,
    "encoded_data": _encoded_data,
    "minutes": _minutes,
    "end_after": _end_after,
    "hd_system": _hd_system,
}


# --------------------------------------------------------------------------------------------

def _message_type(message: er7.Message) -> tuple[str, str]:
    try:
        msh = message.segment("MSH")
    except KeyError:
        raise UnsupportedMessage("no MSH segment", "200", "MSH") from None
    segment = Segment(msh, message.separators, 0, 1, False)
    reps = segment.reps(9)
    code = _leaf(_child(reps[0], 1)).strip().upper() if reps else ""
    event = _leaf(_child(reps[0], 2)).strip().upper() if reps else ""
    if not event:
        # v2.1/2.2 senders put the event only in EVN-1
        try:
            evn = message.segment("EVN")
            reps = Segment(evn, message.separators, 0, 1, False).reps(1)
            event = _leaf(reps[0]).strip().upper() if reps else ""
        except KeyError:
            pass
    return code, event


def translate(message: er7.Message) -> Translation:
    """Translate one parsed v2 message into FHIR R4 resources with deterministic ids."""
    maps = mappings()
    code, event = _message_type(message)
    candidates = [m for m in maps.messages if code in _codes_cached(m)]
    if not candidates:
        raise UnsupportedMessage(f"message type {code or '(none)'} is not translated", "200", "MSH-9.1")
    chosen = next((m for m in candidates if f"{code}^{event}" in _events_cached(m)), None)
    if chosen is None:
        raise UnsupportedMessage(f"event {code}^{event or '(none)'} is not translated", "201", "MSH-9.2")
    try:
        return _Run(message, maps, chosen, code, event).run()
    except (MappingError, UnsupportedMessage):
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        # a mapping file naming something that does not exist, or a shape the maps did not expect
        raise MappingError(f"translation failed: {type(exc).__name__}: {exc}", "207") from exc
