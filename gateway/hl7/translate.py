"""HL7v2 -> FHIR R4: runs the declarative maps in mappings/ over one parsed message.

What goes where is data (mappings/README.md describes the format):
- mappings/messages/*.yaml   which message types and events are supported, and how their segments
                             become resources, merge into one, attach to one or link to each other;
- mappings/segments/*.yaml   field -> FHIR element rules per segment, and the business keys for ids;
- mappings/datatypes/*.yaml  component -> element rules per v2 data type (CX -> Identifier, ...);
- mappings/vocabulary/       HL7 tables as FHIR ConceptMaps (*.json) and lookup tables (*.yaml).

This module runs them. When the maps are read it compiles them into Python functions (see _Program:
each rule, condition, path and datatype map once, with what it means worked out), so a message only
calls functions. It does only what the data cannot say, and each such piece says so: walking the
parsed fields, unescaping, v2 date/number syntax, choosing Observation.value[x] from OBX-2, date
arithmetic (start + duration), decoding ED payloads and hashing business keys into ids.
translate() is pure: the maps are read and compiled once (cached; read again before a reprocess
when a file changed, see reload_mappings_if_changed) and nothing else is touched.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
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
from typing import Any, cast

import yaml

from gateway.hl7 import parse as er7
from gateway.hl7.plaintext import PlainText

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
    program: _Program


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
    maps = load_mappings(root)
    loaded = _Loaded(root, fingerprint, maps, _Program(maps))
    _loaded = loaded
    return loaded.mappings


_other_program: tuple[Mappings, _Program] | None = None


def _program(maps: Mappings) -> _Program:
    """The compiled form of these maps: made when they are read (other Mappings: on first use)."""
    global _other_program
    loaded = _loaded
    if loaded is not None and loaded.mappings is maps:
        return loaded.program
    other = _other_program
    if other is not None and other[0] is maps:
        return other[1]
    program = _Program(maps)
    _other_program = (maps, program)
    return program


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


def written_types(maps: Mappings) -> set[str]:
    """The resource types these maps can write: every "resource" a map names (a segment's own
    resource, and those it creates for what it references)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "resource" and isinstance(value, str) and value[:1].isupper():
                    found.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk([maps.messages, maps.segments, maps.datatypes])
    return found


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


def _flat(node: Node) -> list[str]:
    if isinstance(node, str):
        return [node]
    return [leaf for child in node for leaf in _flat(child)]


def _split_field(value: str, seps: er7.Separators) -> list[list[list[str]]]:
    """er7.split_field, without a split per component when there are no subcomponents."""
    if seps.subcomponent in value:
        return er7.split_field(value, seps)
    if seps.component not in value and seps.repetition not in value:
        return [[[value]]]
    return [[[component] for component in repetition.split(seps.component)]
            for repetition in value.split(seps.repetition)]


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
        self._valued: int | None = None

    @property
    def valued(self) -> int:
        """Byte n-1 is 1 when field n is not empty text (it may still hold only empty components)."""
        valued = self._valued
        if valued is None:
            valued = self._valued = int.from_bytes(bytes(map(bool, self.raw.fields)), "little")
        return valued

    def reps(self, number: int) -> list[list[list[str]]]:
        found = self._fields.get(number)
        if found is None:
            fields = self.raw.fields
            if number > len(fields):
                found = []
            elif number < 1:
                found = _split_field(self.raw[number], self.separators)  # hl7lw refuses it
            elif self.name == "MSH" and number in (1, 2):
                # MSH-1/MSH-2 are the separators themselves, not values to split.
                found = [[[fields[number - 1]]]]
            else:
                found = _split_field(fields[number - 1], self.separators)
            self._fields[number] = found
        return found

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


def _path_parts(path: str) -> tuple[str | None, int, tuple[str, str] | None, tuple[int, ...], tuple[int, ...] | None]:
    """_field_path's parts, then the path read as one relative to a node ('2.1'), None when it is
    not such a path. ValueError, as _field_path, when it is no field path either."""
    seg, number, selector, rest = _field_path(path)
    try:
        relative: tuple[int, ...] | None = _relative_path(path)
    except ValueError:
        relative = None
    return seg, number, selector, rest, relative


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
            kind = v.__class__
            if kind is str:
                if v:
                    pruned[k] = v
            elif kind is dict or kind is list:
                v = _prune(v)
                if v:
                    pruned[k] = v
            elif v is not None:
                v = _prune(v)
                if not _is_blank(v):
                    pruned[k] = v
        return pruned
    if cls is list or (cls is not str and isinstance(value, list)):
        pruned_list = []
        for v in value:
            kind = v.__class__
            if kind is str:
                if v:
                    pruned_list.append(v)
            elif kind is dict or kind is list:
                v = _prune(v)
                if v:
                    pruned_list.append(v)
            elif v is not None:
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
# The maps compiled. When the maps are read, every rule, condition, path, target and datatype map
# in them becomes a Python function: a closure over what the rule says, with its paths parsed, its
# kind decided, its conversion, datatype and target steps worked out. Translating a message only
# calls these functions; nothing asks a rule dict per message what it means. The YAML stays the
# source of truth: maps read again (reload_mappings_if_changed) are compiled again. What a rule
# names that does not exist, and a path or target that does not parse, fails when the rule is used,
# with the error the interpreter gave, not when the maps are read.

_NOT_PARSED = object()
_NO_JOIN = object()  # a rule without `join`

Reader = Callable[["_Run", "Scope"], Any]
Apply = Callable[["_Run", dict[str, Any], "Scope", "str | None"], bool]
Put = Callable[[Any, Any, bool], None]


def _text(node: Node, separators: er7.Separators) -> str:
    leaf = _leaf(node)
    if separators.escape in leaf:
        leaf = er7.unescape(leaf, separators)
    return leaf.strip()


def _reraise(exc: BaseException) -> None:
    raise exc


def _failing(call: Callable[[], Any]) -> Callable[..., Any]:
    """A compiled piece that fails, when used, the way the interpreter failed (`call` raises)."""
    def fail(*_: Any) -> Any:
        call()
        raise AssertionError("unreachable")  # pragma: no cover
    return fail


def _tree(value: Any) -> Callable[[], Any]:
    """A maker of fresh copies of a constant: copy.deepcopy's result, cheaper for plain YAML data
    (dicts, lists and scalars with no object in two places); anything else is deep-copied."""
    if isinstance(value, _IMMUTABLE):
        return lambda: value
    seen: set[int] = set()

    def plain(item: Any) -> bool:
        cls = item.__class__
        if cls is dict or cls is list:
            if id(item) in seen:
                return False
            seen.add(id(item))
            items = item.values() if cls is dict else item
            return all(plain(i) for i in items) and (cls is list or all(k.__class__ is str for k in item))
        return cls in (str, int, float, bool) or item is None

    if not plain(value):
        return lambda: copy.deepcopy(value)
    return lambda: _copy_tree(value)


def _copy_tree(value: Any) -> Any:
    cls = value.__class__
    if cls is dict:
        return {k: _copy_tree(v) if v.__class__ is dict or v.__class__ is list else v for k, v in value.items()}
    if cls is list:
        return [_copy_tree(v) if v.__class__ is dict or v.__class__ is list else v for v in value]
    return value


def _set(container: dict[str, Any], name: str, value: Any, override: bool, join: Any) -> None:
    if override or name not in container or _is_blank(container[name]):
        container[name] = value
    elif join is not _NO_JOIN and isinstance(container[name], str) and isinstance(value, str):
        joined = container[name] + join + value
        container[name] = PlainText(joined) if isinstance(value, PlainText) else joined
    elif isinstance(container[name], dict) and isinstance(value, dict):
        _merge_missing(container[name], value, override)


def _assign(into: dict[str, Any], target: str, value: Any, override: bool, join: Any = _NO_JOIN) -> None:
    """Put a value at a target path: `a.b`, `a[]` (append), `a[2]` (1-based), `a[url=X]`
    (the element with url X, made if missing) and `a[+url=X]` (always a new one). A value
    already present is kept (first rule wins) unless the rule or the entry overrides."""
    _put(target, join)(into, value, override)


@functools.lru_cache(maxsize=1024)
def _put_cached(target: str, join: Any) -> Put:
    return _compile_put(target, join)


def _put(target: Any, join: Any) -> Put:
    try:
        return _put_cached(target, join)
    except TypeError:  # an unhashable target or join: not cached
        return _compile_put(target, join)


def _compile_put(target: Any, join: Any) -> Put:
    """The writer of one target path: put(into, value, override)."""
    if target == ".":
        def merge(into: dict[str, Any], value: Any, override: bool) -> None:
            if isinstance(value, dict):
                _merge_missing(into, value, override)
            else:
                into["."] = value
        return merge
    try:
        steps = _parse_target_cached(target)
    except Exception:  # a bad target fails when a value is written to it
        return _failing(lambda: _parse_target_cached(target))
    if not steps:
        return lambda into, value, override: None
    plan: list[tuple[int, str, bool, Any]] = []
    for position, (name, selector) in enumerate(steps):
        last = position == len(steps) - 1
        if selector is None:
            plan.append((0, name, last, None))
        elif selector == "":
            plan.append((1, name, last, None))
        elif selector.isdigit():
            try:
                plan.append((2, name, last, int(selector) - 1))
            except ValueError:
                return _failing(functools.partial(int, selector))  # digits int() refuses (superscripts)
        else:
            fresh = selector.startswith("+")
            key, _, wanted = selector.lstrip("+").partition("=")
            plan.append((3, name, last, (fresh, key, tuple(key.split(".")), wanted)))
    if len(plan) == 1 and plan[0][0] == 0:
        name = plan[0][1]

        def set_one(into: dict[str, Any], value: Any, override: bool) -> None:
            if override or name not in into:
                into[name] = value
                return
            there = into[name]
            if there is None or (not there and isinstance(there, _BLANKABLE)):
                into[name] = value
            elif join is not _NO_JOIN and isinstance(there, str) and isinstance(value, str):
                joined = there + join + value
                into[name] = PlainText(joined) if isinstance(value, PlainText) else joined
            elif isinstance(there, dict) and isinstance(value, dict):
                _merge_missing(there, value, override)
        return set_one
    if len(plan) == 2 and plan[0][0] == 2 and plan[1][0] == 0:
        outer, index, name = plan[0][1], plan[0][3], plan[1][1]

        def set_in_item(into: dict[str, Any], value: Any, override: bool) -> None:
            items = into.setdefault(outer, [])
            while len(items) <= index:
                items.append({})
            _set(items[index], name, value, override, join)
        return set_in_item
    if len(plan) == 1 and plan[0][0] == 1:
        name = plan[0][1]

        def append(into: dict[str, Any], value: Any, override: bool) -> None:
            into.setdefault(name, []).append(value)
        return append

    def put(into: dict[str, Any], value: Any, override: bool) -> None:
        container: Any = into
        for kind, name, last, extra in plan:
            if kind == 0:
                if last:
                    _set(container, name, value, override, join)
                    return
                if not isinstance(container.get(name), dict):
                    container[name] = {}
                container = container[name]
                continue
            items = container.setdefault(name, [])
            if kind == 1:
                if last:
                    items.append(value)
                    return
                items.append({})
                container = items[-1]
            elif kind == 2:
                while len(items) <= extra:
                    items.append({})
                if last:
                    if isinstance(value, dict) and isinstance(items[extra], dict):
                        _merge_missing(items[extra], value, override)
                    elif override or _is_blank(items[extra]):
                        items[extra] = value
                    return
                container = items[extra]
            else:
                fresh, key, keys, wanted = extra
                found = None if fresh else next((i for i in items if _get_steps(i, keys) == wanted), None)
                if found is None:
                    found = _make(key, wanted)
                    items.append(found)
                if last:
                    if isinstance(value, dict):
                        _merge_missing(found, value, override)
                    return
                container = found
    return put


def _get_steps(item: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(item, dict):
            return None
        item = item.get(key)
    return item


def _is_null(node: Node) -> bool:
    """The v2 explicit null: the whole value is "" (delete what the receiver has). Cheap for the
    usual answer (the first leaf is not "")."""
    if node.__class__ is str:
        return node == '""'
    leaf = node
    while leaf.__class__ is not str:
        if not leaf:
            return False
        leaf = leaf[0]  # type: ignore[assignment]
    if leaf != '""':
        return False
    return all(not n for n in _flat(node)[1:])


def _no_rules(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None = None) -> bool:
    return False


def _no_key(run: _Run, scope: Scope) -> str | None:
    return None


def _put_shape(target: Any) -> tuple[str, str] | None:
    """("name", n) for a target "n", ("append", n) for "n[]": the writes a rule does itself."""
    try:
        steps = _parse_target_cached(target) if target != "." else None
    except Exception:  # a bad target: its writer fails, as it should
        return None
    if not steps or len(steps) != 1:
        return None
    name, selector = steps[0]
    if selector is None:
        return ("name", name)
    if selector == "":
        return ("append", name)
    return None


class _Program:
    """The maps compiled: functions for their rule lists, datatypes, conditions and paths, made the
    first time each is asked for (all of the maps' own when the maps are read)."""

    def __init__(self, maps: Mappings) -> None:
        self.maps = maps
        self.timezone = str(maps.settings.get("default_timezone", "+00:00"))
        self._rules: dict[int, tuple[Any, Apply]] = {}
        self._conditions: dict[int, tuple[Any, Reader]] = {}
        self._primitives: dict[int, tuple[Any, Callable[..., Any]]] = {}
        self._keys: dict[int, tuple[Any, Reader]] = {}
        self._values: dict[Any, Reader] = {}
        self._nodes: dict[tuple[Any, bool], Reader] = {}
        self._formats: dict[str, Reader] = {}
        self.datatypes: dict[str, Callable[..., tuple[Any, str | None]]] = {}
        for name in maps.datatypes:
            try:
                self.datatypes[name] = self._compile_datatype(name)
            except Exception as exc:  # a malformed datatype map fails when it is used
                self.datatypes[name] = _failing(functools.partial(_reraise, exc))
        try:
            # the maps' own rules and paths now, so that no message pays for compiling them
            for spec in maps.segments.values():
                if isinstance(spec, dict):
                    self.rules(spec.get("rules", []))
                    if "id" in spec:
                        self.key(spec["id"])
            for message_map in maps.messages:
                for path in message_map.get("source_time", ["MSH-7"]):
                    self._value_or_none(path)
        except Exception:  # what does not compile now is compiled (and fails) when used
            pass

    def _value_or_none(self, path: Any) -> None:
        with contextlib.suppress(TypeError):
            self.value(path)

    # --- lookups of compiled pieces (the data objects are kept, so the ids stay theirs) -----

    def rules(self, rules: Any) -> Apply:
        if rules == [] and isinstance(rules, list):  # a default made per call: nothing to run, nothing to keep
            return _no_rules
        found = self._rules.get(id(rules))
        if found is None or found[0] is not rules:
            found = self._rules[id(rules)] = (rules, self._compile_rules(rules))
        return found[1]

    def condition(self, condition: Any) -> Reader:
        found = self._conditions.get(id(condition))
        if found is None or found[0] is not condition:
            found = self._conditions[id(condition)] = (condition, self._compile_condition(condition))
        return found[1]

    def key(self, alternatives: Any) -> Reader:
        if alternatives == [] and isinstance(alternatives, list):  # a default made per call: no key
            return _no_key
        found = self._keys.get(id(alternatives))
        if found is None or found[0] is not alternatives:
            found = self._keys[id(alternatives)] = (alternatives, self._compile_key(alternatives))
        return found[1]

    def primitive(self, rule: Any) -> Callable[..., Any]:
        """A primitive rule's conversion, for computations (their scope is the node's)."""
        found = self._primitives.get(id(rule))
        if found is None or found[0] is not rule:
            found = self._primitives[id(rule)] = (rule, self._compile_primitive(rule))
        return found[1]

    def value(self, path: Any) -> Reader:
        """text of a path ("a|b": the first valued; @names read the translation context)."""
        found = self._values.get(path)
        if found is None:
            found = self._values[path] = self._compile_value(str(path))
        return found

    def nodes(self, path: Any, every: bool) -> Reader:
        found = self._nodes.get((path, every))
        if found is None:
            found = self._nodes[(path, every)] = self._compile_nodes(str(path), every)
        return found

    def datatype(self, name: Any) -> Callable[..., tuple[Any, str | None]]:
        found = self.datatypes.get(name)
        if found is None:
            return _failing(lambda: self.maps.datatypes[name])
        return found

    def _compile_key(self, alternatives: Any) -> Reader:
        """Business key -> id (see _Run.key)."""
        try:
            plans = []
            for alternative in alternatives:
                test: Reader | None = None
                if isinstance(alternative, dict):
                    if "when" in alternative:
                        test = self.condition(alternative["when"])
                    alternative = alternative["parts"]
                plan: list[tuple[str | None, Reader | None, bool]] = []
                for part in alternative:
                    if part.startswith("="):
                        plan.append((part[1:], None, False))
                    else:
                        plan.append((None, self.value(part.rstrip("?")), part.endswith("?")))
                plans.append((test, plan))
        except Exception:  # not a list of alternatives of parts: as the data says, failing when used
            return lambda run, scope: run.key_generic(alternatives, scope)

        def key(run: _Run, scope: Scope) -> str | None:
            for test, plan in plans:
                if test is not None and not test(run, scope):
                    continue
                values: list[str] = []
                for literal, read, optional in plan:
                    if read is None:
                        values.append(literal)  # type: ignore[arg-type]
                        continue
                    text = read(run, scope)
                    if text:
                        values.append(text)
                    elif not optional:
                        break
                else:
                    if values:
                        return make_id(values)
            return None
        return key

    # --- paths ------------------------------------------------------------------------------

    def _compile_nodes(self, path: str, every: bool) -> Reader:
        """The node(s) a path names. `every`: one per repetition of the field."""
        try:
            seg, number, selector, rest, relative = _path_parts(path)
        except ValueError:
            return _failing(lambda: _field_path(path))
        pick = _picker(seg, number, selector, every)

        def nodes(run: _Run, scope: Scope) -> list[Node]:
            node = scope.node
            if node is not None and not seg:
                if relative is None:
                    _relative_path(path)  # raises
                for index in relative:  # type: ignore[union-attr]
                    node = _child(node, index)
                return [node]
            found = []
            for rep in pick(run, scope):
                node = rep
                for index in rest:
                    node = _child(node, index)
                found.append(node)
            return found
        return nodes

    def _compile_value(self, path: str) -> Reader:
        alternatives = _alternatives(path)
        if len(alternatives) == 1 and not path.startswith("@"):
            return self._compile_one_value(path)
        readers: list[Reader] = []
        for alternative in alternatives:
            if alternative.startswith("@"):
                readers.append(_token(alternative))
            else:
                readers.append(self._compile_one_value(alternative))

        def value_of_any(run: _Run, scope: Scope) -> str:
            for reader in readers:
                text = reader(run, scope)
                if text and text != '""':
                    return text
            return ""
        return value_of_any

    def _compile_one_value(self, path: str) -> Reader:
        """The text of the first node a (one-alternative) path names; "" for none and for ""."""
        try:
            seg, number, selector, rest, relative = _path_parts(path)
        except ValueError:
            return _failing(lambda: _field_path(path))
        pick = _picker(seg, number, selector, False) if selector else None
        if not seg and selector is None and relative is not None and len(relative) <= 2:
            return _component_value(number, relative)

        def value(run: _Run, scope: Scope) -> str:
            node = scope.node
            if node is not None and not seg:
                if relative is None:
                    _relative_path(path)  # raises
                for index in relative:  # type: ignore[union-attr]
                    node = _child(node, index)
            else:
                if pick is not None:
                    reps = pick(run, scope)
                else:
                    segment = run.seen.get(seg) if seg else scope.segment
                    if segment is None:
                        return ""
                    reps = segment.reps(number)
                if not reps:
                    return ""
                node = reps[0]
                for index in rest:
                    node = _child(node, index)
            while node.__class__ is not str:
                if not node:
                    return ""
                node = node[0]  # type: ignore[index]
            separators = run.separators
            if separators.escape in node:
                node = er7.unescape(node, separators)  # type: ignore[arg-type]
            text = node.strip()  # type: ignore[union-attr]
            return text if text and text != '""' else ""
        return value

    def _compile_sources(self, path: Any, every: bool) -> Reader:
        """The valued nodes a rule reads: those of its first alternative path that has any."""
        if path is None:
            return lambda run, scope: [scope.node if scope.node is not None else []]
        steps = [self._compile_source(alternative, every) for alternative in _alternatives(str(path))]
        if len(steps) == 1:
            return steps[0]

        def sources(run: _Run, scope: Scope) -> list[Node]:
            for step in steps:
                found = step(run, scope)
                if found:
                    return found
            return []
        return sources

    def _compile_source(self, alternative: str, every: bool) -> Reader:
        try:
            seg, number, selector, rest, relative = _path_parts(alternative)
        except ValueError:
            return _failing(lambda: _field_path(alternative))
        if not seg and selector is None and not every and relative is not None:
            if len(relative) == 1:
                index = relative[0]

                def field_or_component(run: _Run, scope: Scope) -> list[Node]:
                    node = scope.node
                    if node is not None:
                        node = _child(node, index)
                        return [] if _is_empty(node) else [node]
                    reps = scope.segment.reps(number)
                    if reps and any(map(any, reps[0])):  # a repetition: lists of text
                        return [reps[0]]
                    return []
                return field_or_component

            def part(run: _Run, scope: Scope) -> list[Node]:
                node = scope.node
                if node is not None:
                    for index in relative:  # type: ignore[union-attr]
                        node = _child(node, index)
                else:
                    reps = scope.segment.reps(number)
                    if not reps:
                        return []
                    node = reps[0]
                    for index in rest:
                        node = _child(node, index)
                return [] if _is_empty(node) else [node]
            return part

        pick = _picker(seg, number, selector, every)

        def source(run: _Run, scope: Scope) -> list[Node]:
            node = scope.node
            if node is not None and not seg:
                if relative is None:
                    _relative_path(alternative)  # raises
                for index in relative:  # type: ignore[union-attr]
                    node = _child(node, index)
                return [] if _is_empty(node) else [node]
            found = []
            for rep in pick(run, scope):
                node = rep
                for index in rest:
                    node = _child(node, index)
                if not _is_empty(node):
                    found.append(node)
            return found
        return source

    def _compile_format(self, template: Any) -> Reader:
        """"{6} {3} {2.1}": the named parts, empty ones left out, whitespace tidied."""
        if not isinstance(template, str):
            return lambda run, scope: run.format_generic(template, scope)
        pieces = _FORMAT_PART.split(template)
        parts: list[Any] = [piece if i % 2 == 0 else self.value(piece) for i, piece in enumerate(pieces)]
        places = _node_places(pieces[1::2])
        if places is not None:
            literals = pieces[::2]

            def format_node(run: _Run, scope: Scope) -> str | None:
                node = scope.node
                if node is None or node.__class__ is str:
                    texts = [part(run, scope) for part in parts[1::2]]
                else:
                    texts = _read_places(cast("list[Any]", node), places, run.separators)
                text = literals[0]
                for literal, found in zip(literals[1:], texts, strict=True):
                    text += found + literal
                text = _WHITESPACE.sub(" ", text).strip(" ,")
                return text or None
            return format_node

        def format(run: _Run, scope: Scope) -> str | None:
            text = "".join(part if part.__class__ is str else part(run, scope) for part in parts)
            text = _WHITESPACE.sub(" ", text).strip(" ,")
            return text or None
        return format

    def format(self, template: Any) -> Reader:
        try:
            found = self._formats.get(template)
        except TypeError:
            return self._compile_format(template)
        if found is None:
            found = self._formats[template] = self._compile_format(template)
        return found

    # --- conditions ---------------------------------------------------------------------------

    def _compile_condition(self, condition: Any) -> Reader:
        if not isinstance(condition, dict):
            return lambda run, scope: run.test_generic(condition, scope)
        try:
            return self._compile_condition_dict(condition)
        except Exception:  # a malformed condition fails as it did, when tested
            return lambda run, scope: run.test_generic(condition, scope)

    def _compile_condition_dict(self, condition: dict[str, Any]) -> Reader:
        if "all" in condition:
            parts = [self.condition(c) for c in condition["all"]]

            return lambda run, scope: all(part(run, scope) for part in parts)
        if "any" in condition:
            parts = [self.condition(c) for c in condition["any"]]

            return lambda run, scope: any(part(run, scope) for part in parts)
        if "not" in condition:
            inner = self.condition(condition["not"])
            return lambda run, scope: not inner(run, scope)
        if "event_in" in condition:
            events = condition["event_in"]
            return lambda run, scope: run.event in events
        value = self.value(condition["path"])
        if "valued" in condition:
            valued = bool(condition["valued"])
            return lambda run, scope: bool(value(run, scope)) == valued
        if "equals" in condition:
            wanted = str(condition["equals"]).upper()
            return lambda run, scope: value(run, scope).upper() == wanted
        if "in" in condition:
            among = {str(v).upper() for v in condition["in"]}
            return lambda run, scope: value(run, scope).upper() in among
        if "not_in" in condition:
            outside = {str(v).upper() for v in condition["not_in"]}
            return lambda run, scope: value(run, scope).upper() not in outside
        if "longer_than" in condition:
            length = int(condition["longer_than"])
            return lambda run, scope: len(value(run, scope)) > length
        return lambda run, scope: run.test_generic(condition, scope)

    # --- rules --------------------------------------------------------------------------------

    def _compile_rules(self, rules: Any) -> Apply:
        """Run rules into `into`; True when any value came from the message (constants do not count,
        so a datatype with only fixed parts is dropped).

        Most rules read a field or component the message left empty. A rule that can only read
        such places (its paths are of the segment or node in scope) and has nothing else to do (no
        constant, not required, a condition that cannot fail) is passed over on a look at the raw
        field or the component, without running it: what it would have done is nothing. A rule
        reading one whole field or component is handed the node it reads."""
        try:
            compiled = [(self._gate(rule), *self._compile_rule(rule)) for rule in rules]
        except Exception as exc:  # not a list of rules: fails where it is used
            error = exc

            def fail(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None = None) -> bool:
                raise error
            return fail
        if not compiled:
            def nothing(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None = None) -> bool:
                return False
            return nothing
        indexes = {index for gate, _, _, _ in compiled if gate is not None
                   for index in ((gate,) if isinstance(gate, int) else gate)}
        top = max(indexes, default=0)
        relevant = sum(1 << 8 * (index - 1) for index in indexes)
        in_segment: dict[int, list[tuple[Callable[..., bool], int]]] = {}
        in_node: dict[bytes, list[tuple[Callable[..., bool], int]]] = {}

        def plan(valued: int, node_scope: bool) -> list[tuple[Callable[..., bool], int]]:
            """The rules to run when the fields (components) valued are those whose byte is 1 in
            `valued`, in order: (function, 0) for a rule to run, (function, index) for one to hand
            that node."""
            steps = []
            for gate, rule, on_node, on_field in compiled:
                if isinstance(gate, int):
                    if not valued >> 8 * (gate - 1) & 1:
                        continue
                    special = on_node if node_scope else on_field
                    if special is not None:
                        steps.append((special, gate))
                        continue
                elif gate is not None and not any(valued >> 8 * (index - 1) & 1 for index in gate):
                    continue
                steps.append((rule, 0))
            return steps

        def apply(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None = None) -> bool:
            has_data = False
            node = scope.node
            if node is None:
                segment = scope.segment
                valued = segment.valued & relevant
                steps = in_segment.get(valued)
                if steps is None:
                    steps = plan(valued, False)
                    if len(in_segment) < 512:  # a bound, whatever the messages bring
                        in_segment[valued] = steps
                for rule, index in steps:
                    if index:
                        child = segment.reps(index)[0]
                        # a repetition: components that are lists of text
                        if any(map(any, child)) and rule(run, into, scope, clears_key, child):
                            has_data = True
                    elif rule(run, into, scope, clears_key):
                        has_data = True
                return has_data
            if node.__class__ is not str:
                # a node's parts are text or lists of text (nodes go no deeper than a repetition)
                parts = bytes(map(any, node)) if len(node) <= top else bytes(map(any, node[:top]))
                steps = in_node.get(parts)
                if steps is None:
                    steps = plan(int.from_bytes(parts, "little"), True)
                    if len(in_node) < 512:  # a bound, whatever the messages bring
                        in_node[parts] = steps
                for rule, index in steps:
                    if index:
                        if rule(run, into, scope, clears_key, node[index - 1]):
                            has_data = True
                    elif rule(run, into, scope, clears_key):
                        has_data = True
                return has_data
            for gate, rule, _, _ in compiled:  # a plain value as the node: it is its own first part
                if isinstance(gate, int):
                    if gate > 1 or not node:
                        continue
                elif gate is not None and all(index > 1 or not node for index in gate):
                    continue
                if rule(run, into, scope, clears_key):
                    has_data = True
            return has_data
        return apply

    def _gate(self, rule: Any) -> int | tuple[int, ...] | None:
        """The fields (components, in a node) whose emptiness makes the rule do nothing: the first
        index of each of its paths; None when the rule must run regardless."""
        if not isinstance(rule, dict) or "value" in rule or rule.get("required"):
            return None
        if "when" in rule and not _pure_condition(rule["when"]):
            return None
        path = rule.get("field", rule.get("component"))
        if path is None:
            return None
        gate = []
        for alternative in _alternatives(str(path)):
            try:
                seg, _, _, _ = _field_path(alternative)
                relative = _relative_path(alternative)
            except ValueError:
                return None
            if seg or relative[0] < 1:
                return None
            gate.append(relative[0])
        return gate[0] if len(gate) == 1 else tuple(gate)

    def _compile_rule(self, rule: dict[str, Any]) -> tuple[Apply, Callable[..., bool] | None,
                                                          Callable[..., bool] | None]:
        """The rule as a function of (run, into, scope, clears_key); and, for a rule reading one
        whole field or component (see _compile_rules), the same given the node it reads (in a node,
        and in a segment: None when it reads every repetition)."""
        when = rule.get("when")
        test = self.condition(when) if when is not None else None
        target = rule.get("target")
        override = bool(rule.get("override"))
        put = _put(target, rule.get("join", _NO_JOIN))
        if "value" in rule:
            make = _tree(rule.get("value"))

            def constant(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None) -> bool:
                if test is not None and not test(run, scope):
                    return False
                put(into, make(), override)
                return False
            return constant, None, None
        required = bool(rule.get("required"))
        defaults = rule.get("defaults")
        make_defaults = _tree(defaults) if defaults is not None else None
        has_source = "field" in rule or "component" in rule
        field0 = str(rule["field"]).split(".")[0] if "field" in rule else None
        every = bool(rule.get("repeat", "[]" in rule.get("target", "") or "join" in rule))
        path = rule.get("field", rule.get("component"))
        sources = self._compile_sources(path, every)
        # the element an explicit null ("") in this rule's field clears
        clear: Any = _NOT_PARSED
        try:
            first, selector = _parse_target_cached(target)[0] if target != "." else ("", "x")
            digit = str(rule.get("field", "")).isdigit()
            clear = first if digit and selector in (None, "") and not first.startswith("_") else None
        except (ValueError, TypeError, IndexError):
            pass  # a bad target fails where the interpreter would have failed, when it is used
        convert = self._compile_convert(rule, field0, has_source)

        def apply_rule(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None) -> bool:
            if test is not None and not test(run, scope):
                return False
            produced = False
            count = -1
            for node in sources(run, scope):
                count += 1
                leaf = node
                while leaf.__class__ is not str:
                    if not leaf:
                        break
                    leaf = leaf[0]  # type: ignore[index]
                if leaf == '""' and _is_null(node):
                    if clear is _NOT_PARSED:
                        _parse_target_cached(target)  # raises: the target is malformed
                    if clears_key and scope.node is None and clear is not None:
                        run.clears.setdefault(clears_key, set()).add(clear)
                    continue
                value = convert(run, node, scope)
                if value is None or (not value and isinstance(value, _BLANKABLE)):
                    continue
                if make_defaults is not None and isinstance(value, dict):
                    value = {**make_defaults(), **value}
                # an overriding rule replaces what is there with its first value and adds the rest
                put(into, value, override if count == 0 else False)
                produced = True
            if not produced and required:
                where = scope.at(scope.node, rule.get("field", rule.get("component"))).where()
                raise MappingError(f"{where} is required", "101", where)
            return produced

        if path is None:
            def apply_here(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None) -> bool:
                """apply_rule for a rule reading no path: its source is the node in scope."""
                if test is not None and not test(run, scope):
                    return False
                node = scope.node
                if node is None:
                    node = []
                leaf = node
                while leaf.__class__ is not str:
                    if not leaf:
                        break
                    leaf = leaf[0]  # type: ignore[index]
                if leaf == '""' and _is_null(node):
                    if clear is _NOT_PARSED:
                        _parse_target_cached(target)  # raises: the target is malformed
                    if clears_key and scope.node is None and clear is not None:
                        run.clears.setdefault(clears_key, set()).add(clear)
                    value = None
                else:
                    value = convert(run, node, scope)
                if value is None or (not value and isinstance(value, _BLANKABLE)):
                    if required:
                        where = scope.at(scope.node, rule.get("field", rule.get("component"))).where()
                        raise MappingError(f"{where} is required", "101", where)
                    return False
                if make_defaults is not None and isinstance(value, dict):
                    value = {**make_defaults(), **value}
                put(into, value, override)
                return True
            return apply_here, None, None
        if not _is_whole(path):
            return apply_rule, None, None
        # a plain "name" or "name[]" target is written here, without a call to its writer
        shape = _put_shape(target)
        shape_kind, shape_name = (1 if shape[0] == "name" else 2, shape[1]) if shape else (0, "")
        if self._compile_value_kind(rule, field0, has_source) is None and _plain_text(rule):
            def text_on_node(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None,
                             node: Node) -> bool:
                """on_node for a rule writing the text it reads."""
                if test is not None and not test(run, scope):
                    return False
                leaf = node
                while leaf.__class__ is not str:
                    if not leaf:
                        return False
                    leaf = leaf[0]  # type: ignore[index]
                if leaf == '""' and _is_null(node):
                    if clear is _NOT_PARSED:
                        _parse_target_cached(target)  # raises: the target is malformed
                    if clears_key and scope.node is None and clear is not None:
                        run.clears.setdefault(clears_key, set()).add(clear)
                    return False
                separators = run.separators
                if separators.escape in leaf:
                    leaf = er7.unescape(leaf, separators)  # type: ignore[arg-type]
                text = leaf.strip()  # type: ignore[union-attr]
                if not text or text == '""':
                    return False
                if shape_kind == 1 and (override or shape_name not in into):
                    into[shape_name] = text
                elif shape_kind == 2:
                    into.setdefault(shape_name, []).append(text)
                else:
                    put(into, text, override)
                return True
            return apply_rule, text_on_node, None if every else text_on_node

        def on_node(run: _Run, into: dict[str, Any], scope: Scope, clears_key: str | None, node: Node) -> bool:
            """apply_rule for a rule whose only source is `node` (valued), not required."""
            if test is not None and not test(run, scope):
                return False
            leaf = node
            while leaf.__class__ is not str:
                if not leaf:
                    break
                leaf = leaf[0]  # type: ignore[index]
            if leaf == '""' and _is_null(node):
                if clear is _NOT_PARSED:
                    _parse_target_cached(target)  # raises: the target is malformed
                if clears_key and scope.node is None and clear is not None:
                    run.clears.setdefault(clears_key, set()).add(clear)
                return False
            value = convert(run, node, scope)
            if value is None or (not value and isinstance(value, _BLANKABLE)):
                return False
            if make_defaults is not None and isinstance(value, dict):
                value = {**make_defaults(), **value}
            if shape_kind == 1 and (override or shape_name not in into):
                into[shape_name] = value
            elif shape_kind == 2:
                into.setdefault(shape_name, []).append(value)
            else:
                put(into, value, override)
            return True
        return apply_rule, on_node, None if every else on_node

    def _compile_convert(self, rule: dict[str, Any], field0: str | None, has_source: bool) -> Callable[..., Any]:
        inner = self._compile_value_kind(rule, field0, has_source)
        if inner is None:  # a primitive: it works out its scope itself, when it has an error to place
            return self._compile_primitive(rule, field0, has_source)
        if isinstance(inner, _DatatypeValue):  # the datatype called from here: one call less per value
            datatypes = self.datatypes
            kind = rule.get("type", "ST")

            def convert_datatype(run: _Run, node: Node, scope: Scope) -> Any:
                if field0 is not None and scope.node is None:
                    here = Scope(scope.segment, node, field0)
                elif has_source:
                    here = Scope(scope.segment, node, scope.field)
                else:
                    here = scope
                return datatypes[kind](run, node, here)[0]
            return convert_datatype

        def convert(run: _Run, node: Node, scope: Scope) -> Any:
            if field0 is not None and scope.node is None:
                here = Scope(scope.segment, node, field0)
            elif has_source:
                here = Scope(scope.segment, node, scope.field)
            else:
                here = scope
            return inner(run, node, here)
        return convert

    def _compile_value_kind(self, rule: dict[str, Any], field0: str | None,
                            has_source: bool) -> Callable[..., Any] | None:
        """What a rule makes of the node it read: text from a format, a computation, an object from
        its own rules, a datatype map's result; None for a primitive."""
        if "format" in rule:
            format = self.format(rule["format"])
            return lambda run, node, here: format(run, here)
        if "compute" in rule:
            name = rule["compute"]
            compute = COMPUTE.get(name) if isinstance(name, str) else None
            compiler = _COMPUTE_COMPILERS.get(compute) if compute is not None else None  # type: ignore[arg-type]
            compiled = compiler(self, rule) if compiler is not None else None
            if compiled is not None:
                return compiled
            return lambda run, node, here: COMPUTE[name](run, rule, here)
        if "rules" in rule:
            apply = self.rules(rule["rules"])
            if "requires_any" in rule:
                needed = rule["requires_any"]

                def group_requiring(run: _Run, node: Node, here: Scope) -> Any:
                    built: dict[str, Any] = {}
                    if not apply(run, built, here, None):
                        return None
                    if not any(not _is_blank(built.get(k)) for k in needed):
                        return None
                    return built
                return group_requiring

            def group(run: _Run, node: Node, here: Scope) -> Any:
                built: dict[str, Any] = {}
                if not apply(run, built, here, None):
                    return None
                return built
            return group
        kind = rule.get("type", "ST")
        fhir = rule.get("fhir")
        try:
            is_datatype = kind in self.maps.datatypes and (fhir is None or fhir not in _FHIR_PRIMITIVES)
        except TypeError as exc:
            error = exc

            def fail(run: _Run, node: Node, here: Scope) -> Any:
                raise error
            return fail
        if is_datatype:
            datatypes = self.datatypes
            if "vocabulary" in rule or "code_system" in rule:
                vocabulary = self._compile_vocabulary(rule)

                def coded(run: _Run, node: Node, here: Scope) -> Any:
                    value, _ = datatypes[kind](run, node, here)
                    return vocabulary(run, value, node)
                return coded
            return _DatatypeValue(datatypes, kind)
        return None

    def _compile_primitive(self, rule: dict[str, Any], field0: str | None = None,
                           has_source: bool = False) -> Callable[..., Any]:
        """A v2 primitive read from the node: looked up, translated, cast. `field0`/`has_source`
        say how the rule's scope for the node is made from the one given (see convert); it is made
        only to place an error."""
        tables = self.maps.tables
        vocabularies = self.maps.vocabularies
        lookup = rule.get("lookup")
        has_lookup = "lookup" in rule
        table = rule.get("table")
        has_table = "table" in rule
        fhir = rule.get("fhir", "string")
        vocabulary_name = rule.get("vocabulary")
        has_vocabulary = "vocabulary" in rule
        cast = _CASTS.get(fhir, _cast_string) if isinstance(fhir, str) else _cast_string
        coded = fhir in ("Coding", "CodeableConcept")
        has_code_system = "code_system" in rule
        lenient = rule.get("lenient")

        if _plain_text(rule):
            def text_only(run: _Run, node: Node, scope: Scope) -> Any:
                while node.__class__ is not str:
                    if not node:
                        return None
                    node = node[0]  # type: ignore[index]
                separators = run.separators
                if separators.escape in node:
                    node = er7.unescape(node, separators)  # type: ignore[arg-type]
                text = node.strip()  # type: ignore[union-attr]
                if not text or text == '""':
                    return None
                return text
            return text_only

        def primitive(run: _Run, node: Node, scope: Scope) -> Any:
            text: Any = node
            while text.__class__ is not str:
                if not text:
                    return None
                text = text[0]
            if not text:
                return None
            separators = run.separators
            if separators.escape in text:
                text = er7.unescape(text, separators)
            text = text.strip()
            if not text or text == '""':
                return None
            if has_lookup:
                found = lookup.get(text, lookup.get(text.upper()))  # type: ignore[union-attr]
                if found is None:
                    return None
                text = str(found)
            if has_table:
                found = tables[table].get(text)  # type: ignore[index]
                if found is None:
                    return None
                text = found
            if has_vocabulary:
                vocabulary = vocabularies[vocabulary_name]  # type: ignore[index]
                if fhir == "code":
                    return vocabulary.code(text, rule.get("vocabulary_target"))
                codings = vocabulary.translate(text)
                return codings[0] if fhir == "Coding" else {"coding": codings}
            if coded:
                coding = {"system": rule["code_system"], "code": text} if has_code_system else {"code": text}
                return coding if fhir == "Coding" else {"coding": [coding]}
            try:
                return cast(run, text, fhir)
            except ValueError as exc:
                if lenient:
                    return None
                if field0 is not None and scope.node is None:
                    scope = Scope(scope.segment, node, field0)
                elif has_source:
                    scope = Scope(scope.segment, node, scope.field)
                where = scope.where()
                raise MappingError(f"{where}: {exc}", "102", where) from None
        return primitive

    def _compile_vocabulary(self, rule: dict[str, Any]) -> Callable[..., Any]:
        """A coded datatype through an HL7 table: the FHIR coding the table maps to goes first and
        the v2 code stays, in the table's v2 system when the message named no system."""
        vocabularies = self.maps.vocabularies
        fhir = rule.get("fhir")

        def vocabulary_of(run: _Run, value: Any, node: Node) -> Any:
            if not isinstance(value, dict) or not value.get("coding"):
                return value
            original = value["coding"][0]
            source = rule.get("code_system")
            vocabulary = vocabularies.get(rule["vocabulary"]) if "vocabulary" in rule else None
            if vocabulary is not None:
                source = vocabulary.source
            if source and "system" not in original and "code" in original \
                    and not _text(_child(node, 3), run.separators):
                # no coding system named: the code is from the HL7 table this element uses
                original["system"] = source
            if vocabulary is None or original.get("system") != vocabulary.source or "code" not in original:
                return value["coding"][0] if fhir == "Coding" else value
            if fhir == "code":
                return vocabulary.code(original["code"], rule.get("vocabulary_target"))
            mapped = [c for c in vocabulary.mapped(original["code"]) if c not in value["coding"]]
            value["coding"] = [*mapped, *value["coding"]]
            return value["coding"][0] if fhir == "Coding" else value
        return vocabulary_of

    # --- datatypes ----------------------------------------------------------------------------

    def _compile_datatype(self, name: str) -> Callable[..., tuple[Any, str | None]]:
        """Run a datatype map over a node; returns the value and the FHIR type it produced."""
        spec = self.maps.datatypes[name]
        datatypes = self.datatypes
        if "same_as" in spec:
            other = spec["same_as"]

            def same_as(run: _Run, node: Node, scope: Scope) -> tuple[Any, str | None]:
                found = datatypes.get(other)
                if found is None:
                    self.maps.datatypes[other]  # raises KeyError, as the interpreter did
                return found(run, node, scope)  # type: ignore[misc]
            return same_as
        try:
            variants = [(self.condition(v["when"]) if "when" in v else None, v, self.rules(v.get("rules", [])),
                         v.get("fhir"), v.get("fhir", spec.get("fhir"))) for v in spec.get("variants", [])]
            plain: tuple[Any, ...] = (None, spec, self.rules(spec.get("rules", [])), spec.get("fhir"), spec.get("fhir"))
            item_requires_any = list((spec.get("item_requires_any") or {}).items())
            drop_unless = list((spec.get("drop_unless") or {}).items())
            requires_any = spec.get("requires_any")
            has_requires_any = "requires_any" in spec
            creates = spec.get("creates")
            if isinstance(creates, dict):  # compiled now rather than by the first message that needs it
                if isinstance(creates.get("rules"), list):
                    self.rules(creates["rules"])
                if "id" in creates:
                    self.key(creates["id"])
        except Exception as exc:  # a malformed datatype map fails when it is used
            error = exc

            def fail(run: _Run, node: Node, scope: Scope) -> tuple[Any, str | None]:
                raise error
            return fail

        def datatype(run: _Run, node: Node, scope: Scope) -> tuple[Any, str | None]:
            here = scope if scope.node is node else Scope(scope.segment, node, scope.field)
            chosen = plain
            for variant in variants:
                if variant[0] is None or variant[0](run, here):
                    chosen = variant
                    break
            built: dict[str, Any] = {}
            if not chosen[2](run, built, here, None):
                return None, None
            for key, items in item_requires_any:
                kept = []
                for item in built.get(key, []):
                    for k in items:
                        found = item.get(k)
                        if found is not None and (not isinstance(found, _BLANKABLE) or found):
                            kept.append(item)
                            break
                built[key] = kept
            for key, needed in drop_unless:
                if key in built and needed not in built:
                    del built[key]
            if has_requires_any:
                for k in requires_any:  # type: ignore[union-attr]
                    found = built.get(k)
                    if found is not None and (not isinstance(found, _BLANKABLE) or found):
                        break
                else:
                    return None, None
            if "." in built:
                return built["."], chosen[3]
            if creates is not None:
                run.create_referenced(creates, built, here)
            return built, chosen[4]
        return datatype


_FORMAT_PART = re.compile(r"\{([^}]+)\}")
_WHITESPACE = re.compile(r"\s+")


def _picker(seg: str | None, number: int, selector: tuple[str, str] | None,
            every: bool) -> Callable[[_Run, Scope], list[Any]]:
    """The repetitions of a field a path reads (of the segment in scope, or the latest `seg`)."""
    if selector:
        key, wanted = selector
        try:
            indexes: tuple[int, ...] | None = tuple(int(index) for index in key.split("."))
        except ValueError:
            indexes = None

        def chosen(run: _Run, scope: Scope) -> list[Any]:
            segment = run.seen.get(seg) if seg else scope.segment
            if segment is None:
                return []
            reps = []
            for rep in segment.reps(number):
                if indexes is None:
                    node = _descend(rep, key)
                else:
                    node = rep
                    for index in indexes:
                        node = _child(node, index)
                if _text(node, run.separators).upper() == wanted:
                    reps.append(rep)
            return reps if every else reps[:1]
        return chosen

    def reps(run: _Run, scope: Scope) -> list[Any]:
        segment = run.seen.get(seg) if seg else scope.segment
        if segment is None:
            return []
        found = segment.reps(number)
        return found if every else found[:1]
    return reps


def _component_value(number: int, relative: tuple[int, ...]) -> Reader:
    """_compile_one_value for "n" and "n.m" (a field or component of the scope, or a part of it)."""
    index = relative[0]
    inner = relative[1] if len(relative) == 2 else 0

    def value(run: _Run, scope: Scope) -> str:
        node: Any = scope.node
        if node is None:
            reps = scope.segment.reps(number)
            if not reps:
                return ""
            node = reps[0]
        elif node.__class__ is str:
            if index != 1:
                return ""
        elif index <= len(node):
            node = node[index - 1]
        else:
            return ""
        if inner:
            if node.__class__ is str:
                if inner != 1:
                    return ""
            elif inner <= len(node):
                node = node[inner - 1]
            else:
                return ""
        while node.__class__ is not str:
            if not node:
                return ""
            node = node[0]
        if not node:
            return ""
        separators = run.separators
        if separators.escape in node:
            node = er7.unescape(node, separators)
        text = node.strip()
        return text if text and text != '""' else ""
    return value


def _node_places(paths: list[str]) -> list[tuple[int, int]] | None:
    """(component, subcomponent or 0) for each path when every one is "n" or "n.m" (a place in the
    node in scope), else None."""
    places = []
    for path in paths:
        if "|" in path or path.startswith("@"):
            return None
        try:
            seg, _, selector, _ = _field_path(path)
            relative = _relative_path(path)
        except ValueError:
            return None
        if seg or selector is not None or len(relative) > 2:
            return None
        places.append((relative[0], relative[1] if len(relative) == 2 else 0))
    return places


def _read_places(node: list[Any], places: list[tuple[int, int]], separators: er7.Separators) -> list[str]:
    """What _component_value reads at each place of a (list) node, in one call."""
    texts = []
    count = len(node)
    for index, inner in places:
        if index > count:
            texts.append("")
            continue
        part: Any = node[index - 1]
        if inner:
            if part.__class__ is str:
                if inner != 1:
                    part = ""
            elif inner <= len(part):
                part = part[inner - 1]
            else:
                part = ""
        while part.__class__ is not str:
            if not part:
                part = ""
                break
            part = part[0]
        if part:
            if separators.escape in part:
                part = er7.unescape(part, separators)
            part = part.strip()
            if part == '""':
                part = ""
        texts.append(part)
    return texts


def _token(token: str) -> Reader:
    if token == "@event":
        return lambda run, scope: run.event
    if token == "@patient":
        return lambda run, scope: str(run.current.get("Patient", {}).get("id", ""))
    if token.startswith("@id:"):
        kind = token[4:]
        return lambda run, scope: str(run.current.get(kind, {}).get("id", ""))
    if token == "@owner":
        return lambda run, scope: str(run.owner.get("id", "")) if run.owner else ""
    if token == "@index":
        return lambda run, scope: str(run.since_owner.get(scope.segment.name, 0))
    if token == "@seq":
        return lambda run, scope: str(scope.segment.occurrence)

    def unknown(run: _Run, scope: Scope) -> str:
        raise MappingError(f"unknown token {token} in mappings", "207")
    return unknown


def _plain_text(rule: dict[str, Any]) -> bool:
    """A primitive rule whose value is the text it reads, as it is (no lookup, table, code or cast)."""
    fhir = rule.get("fhir", "string")
    cast = _CASTS.get(fhir, _cast_string) if isinstance(fhir, str) else _cast_string
    return not ("lookup" in rule or "table" in rule or "vocabulary" in rule or fhir in ("Coding", "CodeableConcept")) \
        and cast is _cast_string


def _is_whole(path: Any) -> bool:
    """The path reads one whole field (component, in a node) of the scope: "5", not "5.1", "a|b" or
    "OBR-5" (see _Program._compile_rules)."""
    if path is None:
        return False
    alternatives = _alternatives(str(path))
    if len(alternatives) != 1:
        return False
    try:
        seg, _, selector, rest = _field_path(alternatives[0])
    except ValueError:
        return False
    return not seg and selector is None and not rest


_TOKENS = ("@event", "@patient", "@owner", "@index", "@seq")


def _pure_path(path: Any) -> bool:
    """Reading this path cannot fail, whatever the scope (every part parses, tokens are known)."""
    for alternative in _alternatives(str(path)):
        if alternative.startswith("@"):
            if alternative not in _TOKENS and not alternative.startswith("@id:"):
                return False
            continue
        try:
            seg, _, _, _ = _field_path(alternative)
            if not seg:
                _relative_path(alternative)
        except ValueError:
            return False
    return True


def _pure_condition(condition: Any) -> bool:
    """Testing this condition cannot fail (nor do anything but answer): a rule guarded by it may
    be passed over without testing it when it would read nothing anyway."""
    if not isinstance(condition, dict):
        return False
    if "all" in condition or "any" in condition:
        parts = condition.get("all", condition.get("any")) if "all" in condition else condition["any"]
        return isinstance(parts, list) and all(_pure_condition(c) for c in parts)
    if "not" in condition:
        return _pure_condition(condition["not"])
    if "event_in" in condition:
        return isinstance(condition["event_in"], list | tuple | set | frozenset)
    if "path" not in condition or not _pure_path(condition["path"]):
        return False
    if "valued" in condition or "equals" in condition:
        return True
    for key in ("in", "not_in"):
        if key in condition:
            return isinstance(condition[key], list | tuple | set | frozenset)
    if "longer_than" in condition:
        try:
            int(condition["longer_than"])
        except (TypeError, ValueError):
            return False
        return True
    return False


# v2 primitive syntax -> FHIR primitive (the part of data types that is not a mapping)

def _cast_time(run: _Run, text: str, fhir: str) -> str:
    match = _TM.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a v2 time")
    hour, minute, second, fraction = match.groups()
    if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 59:
        raise ValueError(f"{text!r} is not a v2 time")
    return f"{hour}:{minute or '00'}:{second or '00'}{fraction or ''}"


def _cast_datetime(run: _Run, text: str, fhir: str) -> str | None:
    return _datetime(text, fhir, run.timezone)


def _cast_decimal(run: _Run, text: str, fhir: str) -> Decimal:
    if not _NUMBER.match(text):
        raise ValueError(f"{text!r} is not a number")
    return Decimal(text.lstrip("+"))


def _cast_integer(run: _Run, text: str, fhir: str) -> int:
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


def _cast_boolean(run: _Run, text: str, fhir: str) -> bool | None:
    # HL7 table 0136 (Y/N); anything else carries no truth value
    return {"Y": True, "N": False}.get(text.upper())


def _cast_base64(run: _Run, text: str, fhir: str) -> PlainText:
    return PlainText(text)


def _cast_string(run: _Run, text: str, fhir: str) -> str:
    return text


_CASTS: dict[str, Callable[[_Run, str, str], Any]] = {
    "time": _cast_time,
    "date": _cast_datetime,
    "dateTime": _cast_datetime,
    "instant": _cast_datetime,
    "decimal": _cast_decimal,
    "integer": _cast_integer,
    "positiveInt": _cast_integer,
    "unsignedInt": _cast_integer,
    "boolean": _cast_boolean,
    "base64Binary": _cast_base64,
}


def _datetime(text: str, fhir: str, timezone: str) -> str | None:
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
    date = year if not month else (f"{year}-{month}" if not day else f"{year}-{month}-{day}")
    if fhir == "date":
        return date
    if hour is None or day is None:
        return None if fhir == "instant" else date
    offset = "Z" if zone == "Z" else (f"{zone[:3]}:{zone[3:]}" if zone else timezone)
    return f"{date}T{hour}:{minute or '00'}:{second or '00'}{fraction or ''}{offset}"


class _DatatypeValue:
    """A rule's value that is what a datatype map makes of the node (its first result); a class,
    not a closure, so that _compile_convert can tell it apart and call the map itself."""

    def __init__(self, datatypes: dict[str, Any], kind: str) -> None:
        self.datatypes = datatypes
        self.kind = kind

    def __call__(self, run: _Run, node: Node, here: Scope) -> Any:
        return self.datatypes[self.kind](run, node, here)[0]


# --------------------------------------------------------------------------------------------
# Scopes: where relative paths in a rule are read from

@dataclass(slots=True)
class Scope:
    segment: Segment
    node: Node | None = None  # None: paths name fields of the segment; else components of node
    field: str | None = None  # the field the node came from, for error locations

    def at(self, node: Node | None, field: Any = None) -> Scope:
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
        names = [cast(Any, s).name or "" for s in message]
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
        self.program = _program(maps)
        self.values = self.program._values
        self.timezone = self.program.timezone
        self.separators = message.separators

    # --- values (the compiled maps do the work; these serve the computations) ----------------

    def unescape(self, raw: str) -> str:
        return er7.unescape(raw, self.separators)

    def text(self, node: Node) -> str:
        return _text(node, self.separators)

    def nodes(self, path: str, scope: Scope, every: bool = False) -> list[Node]:
        """The node(s) a path names. `every`: one per repetition of the field."""
        try:
            reader = self.program.nodes(path, every)
        except TypeError:  # an unhashable path
            reader = self.program._compile_nodes(str(path), every)
        return reader(self, scope)  # type: ignore[no-any-return]

    def value(self, path: Any, scope: Scope) -> str:
        """Text of a path; "a|b" takes the first that is valued; @names read the translation context."""
        try:
            reader = self.values.get(path) or self.program.value(path)
        except TypeError:  # an unhashable path
            reader = self.program._compile_value(str(path))
        return reader(self, scope)  # type: ignore[no-any-return]

    def token(self, token: str, scope: Scope) -> str:
        return _token(token)(self, scope)  # type: ignore[no-any-return]

    def test(self, condition: dict[str, Any], scope: Scope) -> bool:
        return self.program.condition(condition)(self, scope)  # type: ignore[no-any-return]

    def test_generic(self, condition: dict[str, Any], scope: Scope) -> bool:
        """A condition as the data says it, for those the compiler leaves alone (malformed ones)."""
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

    def apply(self, rules: list[dict[str, Any]], into: dict[str, Any], scope: Scope,
              clears_key: str | None = None) -> bool:
        """Run rules into `into`; True when any value came from the message (constants do not count,
        so a datatype with only fixed parts is dropped)."""
        return self.program.rules(rules)(self, into, scope, clears_key)

    def primitive(self, node: Node, rule: dict[str, Any], scope: Scope) -> Any:
        return self.program.primitive(rule)(self, node, scope)

    def cast(self, text: str, fhir: str) -> Any:
        """v2 primitive syntax -> FHIR primitive (the part of data types that is not a mapping)."""
        return (_CASTS.get(fhir, _cast_string) if isinstance(fhir, str) else _cast_string)(self, text, fhir)

    def datetime(self, text: str, fhir: str) -> str | None:
        return _datetime(text, fhir, self.timezone)

    def format(self, template: str, scope: Scope) -> str | None:
        """"{6} {3} {2.1}": the named parts, empty ones left out, whitespace tidied."""
        return self.program.format(template)(self, scope)  # type: ignore[no-any-return]

    def format_generic(self, template: str, scope: Scope) -> str | None:
        text = re.sub(r"\{([^}]+)\}", lambda m: self.value(m.group(1), scope), template)
        text = re.sub(r"\s+", " ", text).strip(" ,")
        return text or None

    def datatype(self, name: str, node: Node, scope: Scope) -> tuple[Any, str | None]:
        """Run a datatype map over a node; returns the value and the FHIR type it produced."""
        return self.program.datatype(name)(self, node, scope)

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

    # --- writing into resources -----------------------------------------------------------

    def assign(self, into: dict[str, Any], target: str, value: Any, rule: dict[str, Any]) -> None:
        """Put a value at a target path (see _assign); `rule` says whether it overrides and joins."""
        _assign(into, target, value, bool(rule.get("override")), rule.get("join", _NO_JOIN))

    def key(self, alternatives: list[Any], scope: Scope) -> str | None:
        """Business key -> id: the first alternative whose required parts are all valued.
        "=text" is a literal part (keeps a placer key apart from a filler key); "path?" may be
        empty and is then left out."""
        return self.program.key(alternatives)(self, scope)  # type: ignore[no-any-return]

    def key_generic(self, alternatives: list[Any], scope: Scope) -> str | None:
        """key() as the data says it, for id lists the compiler leaves alone (malformed ones)."""
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
            filled = self.resources.get(key)
            # an element another field filled in this message is replaced, not cleared
            kept = sorted(e for e in elements if filled is None or _is_blank(_prune(filled.get(e))))
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
        if not fhir:
            raise MappingError(f"the map for OBX-2 {kind!r} names no FHIR type for the value", "207",
                               scope.where())
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


def _compile_hd_system(program: _Program, rule: dict[str, Any]) -> Callable[..., Any] | None:
    """_hd_system with its paths and table looked up once (None: the rule is not the usual shape,
    it runs as written)."""
    args = rule.get("args")
    if not isinstance(args, list) or len(args) != 3 or "table" not in rule:
        return None
    readers = [program.value(p) for p in args]
    places = _node_places([str(p) for p in args])
    tables = program.maps.tables
    table = rule["table"]

    def hd_system(run: _Run, node: Node, scope: Scope) -> str | None:
        inside = scope.node
        if places is not None and inside is not None and inside.__class__ is not str:
            namespace, universal, kind = _read_places(cast("list[Any]", inside), places, run.separators)
        else:
            namespace, universal, kind = (read(run, scope) for read in readers)
        configured = tables[table].get(namespace) if namespace else None
        if configured:
            return configured
        if not universal:
            return None
        kind = kind.upper()
        if kind == "ISO" and _OID.fullmatch(universal):
            return f"urn:oid:{universal}"
        if kind == "UUID":
            return f"urn:uuid:{universal.lower()}"
        if kind in ("URI", "URL") and _URI_SCHEME.match(universal):
            return universal
        return None
    return hd_system


_OID = re.compile(r"[0-2](\.(0|[1-9]\d*))+")
_URI_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:")
_COMPUTE_COMPILERS: dict[Callable[..., Any], Callable[[_Program, dict[str, Any]], Callable[..., Any] | None]] = {}


COMPUTE: dict[str, Callable[[_Run, dict[str, Any], Scope], Any]] = {
    "observation_value": _observation_value,
    "reference_range": _reference_range,
    "mime_type": _mime_type,
    "encoded_data": _encoded_data,
    "minutes": _minutes,
    "end_after": _end_after,
    "hd_system": _hd_system,
}
_COMPUTE_COMPILERS[_hd_system] = _compile_hd_system


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
