"""The R4 SearchParameter definitions, compiled once into plain path extractors.

fhirpathpy is too slow to run on every write (and has no resolve()), but the R4 expressions for
search parameters use a small part of FHIRPath. This module compiles that part:

    Observation.code                          a path; lists are flattened at every step
    Observation.effective                     a choice element: effectiveDateTime, effectivePeriod...
    (Observation.value as Quantity)           a choice element narrowed to one type
    value.as(Quantity)                        the same, function form (composite components)
    X.where(resolve() is Patient)             references whose target type is Patient
    X.where(system='email')                   elements whose field equals a literal
    X.exists() and X != false                 true when present and not false (Patient.deceased)
    A | B                                     union

An expression outside this subset raises at start-up rather than indexing silently wrong;
tests/fhir/test_searchparams.py checks the extractors against fhirpathpy on the official examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

DEFINITIONS = Path(__file__).parent / "definitions"

# A value found by an extractor, with the FHIR type name when the path told us (choice elements).
Found = tuple[Any, str | None]
Extractor = Callable[[dict[str, Any]], list[Found]]


@dataclass(frozen=True)
class Component:
    param_type: str
    extract: Extractor


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    expression: str
    extract: Extractor
    targets: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    components: tuple[Component, ...] = field(default=())
    # Top-level elements of which a resource must have one for `extract` to find anything (None: it
    # cannot be told from the expression; see element_names). Indexing skips the parameter when the
    # resource has none of them.
    needs: tuple[str, ...] | None = None


class UnsupportedExpression(ValueError):
    pass


def _split_top(expr: str, sep: str) -> list[str]:
    """Split on sep where it is not inside parentheses or quotes."""
    parts, depth, quote, start = [], 0, False, 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        elif not quote and depth == 0 and expr.startswith(sep, i):
            parts.append(expr[start:i])
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def _strip_parens(expr: str) -> str:
    while expr.startswith("(") and expr.endswith(")") and len(_split_top(expr[1:-1], ")")) == 1:
        expr = expr[1:-1].strip()
    return expr


# --- steps: each takes the list of (value, type) found so far and returns the next list ---

Step = Callable[[list[Found]], list[Found]]


def choice_elements() -> frozenset[str]:
    """Names of FHIR R4 choice elements (value[x], effective[x], ...), as fhir.resources' R4B models
    declare them; kept in definitions/ because importing every model costs seconds at start-up
    (tests/fhir/test_searchparams.py checks the file against the models)."""
    return _CHOICE_ELEMENTS


_CHOICE_ELEMENTS = frozenset(json.loads((DEFINITIONS / "choice-elements.json").read_text()))


def _children_as(name: str, only_type: str) -> Step:
    """The step `name.as(Type)`: the children named so that are of that type."""
    def step(items: list[Found]) -> list[Found]:
        return _children(items, name, only_type)
    return step


def _children(items: list[Found], name: str, only_type: str | None = None) -> list[Found]:
    out: list[Found] = []
    for value, _ in items:
        if not isinstance(value, dict):
            continue
        found: list[tuple[Any, str | None]]
        if only_type is None and name in value:
            found = [(value[name], None)]
        elif only_type is None and name not in _CHOICE_ELEMENTS:
            continue  # not a choice element, so no valueX-style keys to look for
        else:
            found = []
            suffix = only_type[0].upper() + only_type[1:] if only_type else None
            for key, child in value.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    type_name = key[len(name):]
                    if suffix is None or type_name == suffix:
                        found.append((child, type_name[0].lower() + type_name[1:]
                                      if type_name[0].isupper() and type_name in _PRIMITIVE_CHOICES
                                      else type_name))
        for child, type_name in found:
            if isinstance(child, list):
                out.extend((c, type_name) for c in child if c is not None)
            elif child is not None:
                out.append((child, type_name))
    return out


def _plain_children(items: list[Found], name: str) -> list[Found]:
    """_children for an element that is not a choice element: one key to look up."""
    out: list[Found] = []
    for value, _ in items:
        child = value.get(name) if isinstance(value, dict) else None
        if child is None:
            continue
        if isinstance(child, list):
            out.extend((c, None) for c in child if c is not None)
        else:
            out.append((child, None))
    return out


_PRIMITIVE_CHOICES = {
    "String", "Boolean", "Integer", "Decimal", "DateTime", "Date", "Time", "Instant", "Uri", "Url",
    "Canonical", "Code", "Id", "Markdown", "Oid", "PositiveInt", "UnsignedInt", "Uuid", "Base64Binary",
}


def reference_type(reference: Any) -> str | None:
    """The target resource type a Reference (or canonical/URL string) names, if it names one."""
    if isinstance(reference, dict):
        if isinstance(reference.get("type"), str):
            return reference["type"]
        reference = reference.get("reference")
    if not isinstance(reference, str) or reference.startswith("#"):
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2]
    return None


def _compile_step(token: str) -> Step:
    m = re.fullmatch(r"where\(resolve\(\) is (\w+)\)", token)
    if m:
        wanted = m.group(1)
        return lambda items: [(v, t) for v, t in items if reference_type(v) == wanted]
    m = re.fullmatch(r"where\((\w+)\s*=\s*'([^']*)'\)", token)
    if m:
        fld, literal = m.groups()
        return lambda items: [(v, t) for v, t in items if isinstance(v, dict) and v.get(fld) == literal]
    m = re.fullmatch(r"as\((\w+)\)", token)
    if m:
        raise UnsupportedExpression("as() must follow an element")  # handled in _compile_path
    if re.fullmatch(r"\w+", token):
        if token in _CHOICE_ELEMENTS:
            return lambda items: _children(items, token)
        return lambda items: _plain_children(items, token)
    m = re.fullmatch(r"(\w+)\[(\d+)\]", token)
    if m:
        name, index = m.group(1), int(m.group(2))
        return lambda items: [
            found[index] for v in items if len(found := _children([v], name)) > index
        ]
    raise UnsupportedExpression(token)


def _path_tokens(path: str) -> list[str]:
    tokens, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0:
            tokens.append(path[start:i])
            start = i + 1
    tokens.append(path[start:])
    return [t.strip() for t in tokens]


def _compile_path(expr: str, relative: bool) -> tuple[str | None, list[Step]]:
    """Compile one union member; returns (base type or None when relative, steps)."""
    expr = _strip_parens(expr)
    as_match = re.fullmatch(r"\((.+) as (\w+)\)(\..+)?", expr) or re.fullmatch(r"(.+) as (\w+)", expr)
    tail = ""
    if as_match:
        inner, as_type = as_match.group(1), as_match.group(2)
        tail = (as_match.group(3) or "") if as_match.lastindex and as_match.lastindex >= 3 else ""
        tokens = _path_tokens(_strip_parens(inner))
        tokens[-1] = f"{tokens[-1]}.as({as_type})"
        tokens = _path_tokens(".".join(tokens))
        if tail:
            tokens += _path_tokens(tail[1:])
    else:
        tokens = _path_tokens(expr)
    base = None if relative else tokens.pop(0)
    steps: list[Step] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        m = re.fullmatch(r"as\((\w+)\)", nxt)
        if m and re.fullmatch(r"\w+", token):
            as_type = m.group(1)
            steps.append(_children_as(token, as_type))
            i += 2
            continue
        steps.append(_compile_step(token))
        i += 1
    return base, steps


def _first_key(member: str, relative: bool) -> str | None:
    """The key a resource must have for this path to find anything, when one key says it."""
    tokens = _path_tokens(_strip_parens(member))
    first = tokens[0 if relative else 1] if len(tokens) > (0 if relative else 1) else ""
    if not re.fullmatch(r"\w+", first) or first in _CHOICE_ELEMENTS or " as " in member:
        return None
    return first


def _element_name(member: str, relative: bool) -> str | None:
    """The top-level element a path starts from (for a choice element its name without the type,
    as in value for valueQuantity), or None when the path does not start from one."""
    tokens = _path_tokens(_strip_parens(member))
    if len(tokens) <= (0 if relative else 1):
        return None
    first = tokens[0 if relative else 1].split(" as ")[0].strip().rstrip(")")
    return first if re.fullmatch(r"\w+", first) else None


def element_names(resource: dict[str, Any]) -> set[str]:
    """The names of a resource's top-level elements: its keys, and for keys like valueQuantity
    also the part before the first capital (a choice element's name; for other camelCase keys it
    is a name nothing needs)."""
    names = set(resource)
    for key in resource:
        if not key.islower():
            for i, ch in enumerate(key):
                if ch.isupper():
                    names.add(key[:i])
                    break
    return names


def _run(steps: list[Step], resource: dict[str, Any]) -> list[Found]:
    items: list[Found] = [(resource, None)]
    for step in steps:
        items = step(items)
        if not items:
            break
    return items


def compile_expression(expression: str, resource_type: str | None) -> Extractor:
    """Compile an R4 search expression into an extractor for one resource type.

    With resource_type None the expression is relative (a composite component).
    """
    return _compile(expression, resource_type)[0]


def _compile(expression: str, resource_type: str | None) -> tuple[Extractor, tuple[str, ...] | None]:
    """The extractor, and the top-level elements of which a resource needs one for it to find
    anything (None when the expression does not tell)."""
    truthy = re.fullmatch(r"([\w.]+)\.exists\(\) and \1 != false", expression.strip())
    if truthy:
        _, steps = _compile_path(truthy.group(1), relative=False)

        def extract_truthy(resource: dict[str, Any]) -> list[Found]:
            found = _run(steps, resource)
            return [(any(v is not False for v, _ in found), "boolean")]

        return extract_truthy, None  # finds False when the element is absent
    members: list[tuple[str | None, list[Step]]] = []
    for member in _split_top(expression, "|"):
        base, steps = _compile_path(member, relative=resource_type is None)
        if resource_type is None or base in (resource_type, "Resource", "DomainResource"):
            members.append((_first_key(member, relative=resource_type is None), steps))
    keys = [_element_name(member, relative=resource_type is None) for member in _split_top(expression, "|")]
    needs = None if None in keys else tuple(dict.fromkeys(k for k in keys if k is not None))

    def extract(resource: dict[str, Any]) -> list[Found]:
        out: list[Found] = []
        for first_key, steps in members:
            # Most parameters find nothing in a given resource: one lookup says so.
            if first_key is None or first_key in resource:
                out.extend(_run(steps, resource))
        return out

    return extract, needs


def _load_bundle(name: str) -> dict[str, Any]:
    with open(DEFINITIONS / name, encoding="utf-8") as fh:
        return json.load(fh)


UNSUPPORTED: list[str] = []


def _compile_param(sp: dict[str, Any], base: str, by_url: dict[str, dict[str, Any]]) -> SearchParam:
    components: tuple[Component, ...] = ()
    if sp["type"] == "composite":
        components = tuple(
            Component(by_url[c["definition"]]["type"], compile_expression(c["expression"], None))
            for c in sp["component"]
        )
    extract, needs = _compile(sp["expression"], base)
    return SearchParam(
        code=sp["code"],
        type=sp["type"],
        expression=sp["expression"],
        extract=extract,
        needs=needs,
        targets=tuple(sp.get("target", ())),
        modifiers=tuple(sp.get("modifier", ())),
        components=components,
    )


@cache
def registry() -> dict[str, dict[str, SearchParam]]:
    """{resource type: {code: SearchParam}} for every type the definitions name.

    A parameter whose expression is outside the compiled subset is left out (and listed in
    UNSUPPORTED), so that search and the CapabilityStatement never claim it.
    """
    bundle = _load_bundle("search-parameters.json")
    by_url = {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}
    common: dict[str, SearchParam] = {}
    per_type: dict[str, dict[str, SearchParam]] = {}
    for entry in bundle["entry"]:
        sp = entry["resource"]
        expression = sp.get("expression")
        if not expression or sp["type"] == "special":
            continue
        for base in sp["base"]:
            try:
                param = _compile_param(sp, base, by_url)
            except UnsupportedExpression:
                UNSUPPORTED.append(f"{base}.{sp['code']}")
                continue
            if base in ("Resource", "DomainResource"):
                common[sp["code"]] = param
            else:
                per_type.setdefault(base, {})[sp["code"]] = param
    for params in per_type.values():
        for code, param in common.items():
            params.setdefault(code, param)
    per_type["*"] = dict(common)
    return per_type


def params_for(resource_type: str) -> dict[str, SearchParam]:
    reg = registry()
    return reg.get(resource_type, reg["*"])


# R4 names Task among the resources "never in" the patient compartment, so the access policy would
# take a Task as nobody's record and let every patient-scoped caller read and write any patient's
# Tasks. A Task for a patient (a refill request, a request to staff) is that patient's data: it is
# in the compartment by `patient` (Task.for), as R5 puts it there by Task.for too.
COMPARTMENT_ADDITIONS: dict[str, tuple[str, ...]] = {"Task": ("patient",)}


@cache
def patient_compartment() -> dict[str, tuple[str, ...]]:
    """{resource type: params whose Patient references put a resource in that compartment}."""
    definition = _load_bundle("compartmentdefinition-patient.json")
    compartment = {r["code"]: tuple(r.get("param", ())) for r in definition["resource"] if r.get("param")}
    return {**compartment, **COMPARTMENT_ADDITIONS}


def iter_types() -> Iterable[str]:
    return (t for t in registry() if t != "*")
