"""FHIR search: query parameters -> SQL over the index tables; paging, _sort, _include.

Every search parameter becomes `resource.pk IN (rows of its index table that match)`; repeated
parameters AND, comma-separated values OR. Pages are keyset pages: the cursor holds the sort key of
the last row served, so rows inserted while a client pages never shift or repeat what it sees.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    not_,
    or_,
    select,
)

from gateway import db
from gateway.fhir.dates import date_range, instant_ms
from gateway.fhir.indexer import MAX_LEN, normalize
from gateway.fhir.outcome import FhirError
from gateway.fhir.searchparams import SearchParam, params_for, patient_compartment
from gateway.fhir.store import Repository, Stored

R = db.resource.c
# A restriction the access policy adds to every query: given resource.pk, a condition.
Restriction = Callable[[Any], ColumnElement[bool]]

RESULT_PARAMS = {
    "_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude", "_cursor",
    "_format", "_pretty", "_contained", "_containedType",
}
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MODIFIERS = {
    "token": {"missing", "not", "text", "exact"},
    "string": {"missing", "exact", "contains"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "reference": {"missing"},
    "uri": {"missing", "below", "above"},
    "composite": {"missing"},
}


@dataclass
class SearchResult:
    matches: list[Stored]
    includes: list[Stored] = field(default_factory=list)
    total: int | None = None
    next_cursor: str | None = None
    warnings: list[str] = field(default_factory=list)


def split_values(raw: str, sep: str = ",") -> list[str]:
    """Split on sep, honouring the \\, \\| \\$ escapes of FHIR search values."""
    if "\\" not in raw:
        return raw.split(sep)  # nothing escaped: the walk below would give the same
    parts, current, i = [], "", 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ",|$\\":
            current += raw[i:i + 2] if sep != raw[i + 1] else raw[i + 1]
            i += 2
            continue
        if ch == sep:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", value)


def _like_prefix(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and not value[2:3].isalpha():
        return value[:2], value[2:]
    return "eq", value


# --- value conditions, in two halves ---
#
# A search's SQL depends on the *kind* of each value (a prefix, whether a token names a system...),
# never on the value itself. So each value is first turned into a `spec`, (shape, values): the shape
# a hashable tuple saying which SQL it makes, the values what goes into that SQL's bind parameters.
# `_value_build` then makes the SQLAlchemy expression from the shape alone and one bind parameter per
# value. A search whose shapes were all seen before reuses the statement built then (see
# `_statement`): the request does no expression building, compilation or cache-key work.

Spec = tuple[tuple[Any, ...], list[Any]]


def _date_spec(raw: str) -> Spec:
    prefix, value = _split_prefix(raw)
    try:
        sl, sh = date_range(value)
    except ValueError:
        raise FhirError(400, f"Invalid date in search: {raw!r}", code="invalid") from None
    if prefix in ("eq", "ne"):
        return ("date", prefix), [sl, sh]
    if prefix in ("gt", "sa"):
        return ("date", prefix), [sh]
    if prefix in ("lt", "eb"):
        return ("date", prefix), [sl]
    if prefix == "ge":
        return ("date", "ge"), [sh, sl, sh]
    if prefix == "le":
        return ("date", "le"), [sl, sl, sh]
    # ap: overlap after widening by a tenth of the distance to now (at least a day).
    import time

    margin = max(86_400_000, abs(int(time.time() * 1000) - sl) // 10)
    return ("date", "ap"), [sh + margin, sl - margin]


def _date_build(low: Any, high: Any, prefix: str, b: _Binds) -> ColumnElement[bool]:
    if prefix == "eq":
        return and_(low >= b[0], high <= b[1])
    if prefix == "ne":
        return not_(and_(low >= b[0], high <= b[1]))
    if prefix == "gt":
        return high > b[0]
    if prefix == "lt":
        return low < b[0]
    if prefix == "ge":
        return or_(high > b[0], and_(low >= b[1], high <= b[2]))
    if prefix == "le":
        return or_(low < b[0], and_(low >= b[1], high <= b[2]))
    if prefix == "sa":
        return low > b[0]
    if prefix == "eb":
        return high < b[0]
    return and_(low <= b[0], high >= b[1])


def _number_bounds(text_value: str) -> tuple[float, float, float]:
    try:
        number = Decimal(text_value)
    except InvalidOperation:
        raise FhirError(400, f"Invalid number in search: {text_value!r}", code="invalid") from None
    exponent = number.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    return float(number), float(number - half), float(number + half)


def _number_spec(raw: str) -> Spec:
    prefix, value = _split_prefix(raw)
    number, low, high = _number_bounds(value)
    if prefix in ("eq", "ne"):
        return ("number", prefix), [low, high]
    if prefix in ("gt", "sa"):
        return ("number", "gt"), [number]
    if prefix in ("lt", "eb"):
        return ("number", "lt"), [number]
    if prefix in ("ge", "le"):
        return ("number", prefix), [number]
    margin = abs(number) * 0.1
    return ("number", "ap"), [number - margin, number + margin]


def _number_build(column: Any, prefix: str, b: _Binds) -> ColumnElement[bool]:
    if prefix == "eq":
        return and_(column >= b[0], column < b[1])
    if prefix == "ne":
        return or_(column < b[0], column >= b[1])
    if prefix == "gt":
        return column > b[0]
    if prefix == "lt":
        return column < b[0]
    if prefix == "ge":
        return column >= b[0]
    if prefix == "le":
        return column <= b[0]
    return and_(column >= b[0], column <= b[1])


def _token_spec(raw: str) -> Spec:
    parts = split_values(raw, "|")
    if len(parts) == 1:
        return ("token", "code"), [_unescape(parts[0])]
    system, code = _unescape(parts[0]), _unescape("|".join(parts[1:]))
    if system == "":
        return ("token", "nosystem"), [code]
    if code == "":
        return ("token", "system"), [system]
    return ("token", "both"), [system, code]


def _token_build(system_col: Any, code_col: Any, kind: str, b: _Binds) -> ColumnElement[bool]:
    if kind == "code":
        return code_col == b[0]
    if kind == "nosystem":
        return and_(system_col.is_(None), code_col == b[0])
    if kind == "system":
        return system_col == b[0]
    return and_(system_col == b[0], code_col == b[1])


def _quantity_spec(raw: str) -> Spec:
    parts = split_values(raw, "|")
    number_shape, values = _number_spec(parts[0])
    system = _unescape(parts[1]) if len(parts) > 1 else ""
    code = _unescape(parts[2]) if len(parts) > 2 else ""
    if system:
        values.append(system)
    if code:
        values.append(code)
    return ("quantity", number_shape, bool(system), bool(code)), values


def _quantity_build(value_col: Any, system_col: Any, code_col: Any, shape: tuple[Any, ...],
                    b: _Binds) -> ColumnElement[bool]:
    _, number_shape, has_system, has_code = shape
    n = 2 if number_shape[1] in ("eq", "ne", "ap") else 1
    cond = _number_build(value_col, number_shape[1], b)
    if has_system:
        cond = and_(cond, system_col == b[n])
        n += 1
    if has_code:
        cond = and_(cond, code_col == b[n])
    return cond


class _Binds:
    """The bind parameters of a run of values, named v<i> by their place in the whole search."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __getitem__(self, i: int) -> Any:
        return bindparam(f"v{self.start + i}")

    def at(self, offset: int) -> _Binds:
        return _Binds(self.start + offset)

    def typed(self, i: int, type_: Any) -> Any:
        """For a value not compared with a column, whose type it would take."""
        return bindparam(f"v{self.start + i}", type_=type_)

    def expanding(self, i: int, type_: Any) -> Any:
        return bindparam(f"v{self.start + i}", type_=type_, expanding=True)


@dataclass(frozen=True)
class IndexFilter:
    """One search parameter as rows of its index table that must (or, negated, must not) exist.

    The planners cannot tell which parameter is selective, so the query says it: the filter with
    the lowest rank drives (`pk IN (matching rows)`, e.g. patient=123 finds a few dozen rows by
    index) and every other filter is probed per candidate (`EXISTS (... WHERE resource_pk = pk)`).
    """

    table: Any
    where: tuple[ColumnElement[bool], ...]
    negate: bool = False
    rank: int = 5

    def driving(self) -> ColumnElement[bool]:
        return R.pk.in_(select(self.table.c.resource_pk).where(*self.where))

    def probe(self) -> ColumnElement[bool]:
        found = exists().where(self.table.c.resource_pk == R.pk, *self.where)
        return not_(found) if self.negate else found


# Which filter drives a query: lower is more selective.
RANKS = {"reference": 0, "token": 2, "uri": 2, "composite": 3, "quantity": 5, "number": 5, "string": 5, "date": 6}


@dataclass
class Query:
    """A parsed search: one spec per search parameter (see _build) plus the result parameters."""

    resource_type: str
    clauses: list[Spec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    count: int = 20
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    total: str = "none"
    summary: str | None = None
    elements: list[str] | None = None
    include: list[tuple[str, bool]] = field(default_factory=list)  # (value, iterate)
    revinclude: list[tuple[str, bool]] = field(default_factory=list)
    cursor: list[Any] | None = None

    def values(self) -> dict[str, Any]:
        """The bind values of every clause: v0, v1... in clause order."""
        out: dict[str, Any] = {}
        for _, values in self.clauses:
            for value in values:
                out[f"v{len(out)}"] = value
        return out


class SearchBuilder:
    def __init__(self, repo: Repository, resource_type: str, strict: bool = False) -> None:
        self.repo = repo
        self.resource_type = resource_type
        self.params = params_for(resource_type)
        self.strict = strict

    def _unknown(self, query: Query, message: str) -> None:
        if self.strict:
            raise FhirError(400, message, code="not-supported")
        query.warnings.append(message + " (ignored)")

    # --- specs: the Python half, run for every search ---

    def _value_spec(self, param: SearchParam, modifier: str | None, value: str) -> Spec:
        if param.type == "token":
            if modifier == "text":
                words = _like_prefix(normalize(value))
                return ("text",), [words + "%", "% " + words + "%"]
            return _token_spec(value)
        if param.type == "string":
            if modifier == "exact":
                if len(value) < MAX_LEN:
                    # A value shorter than the stored maximum was stored whole, so its normalized
                    # form is equal too; that equality is what the (type, param, value) index serves
                    # (value_exact has no index of its own).
                    return ("exact_short",), [normalize(value), value]
                return ("exact",), [value]
            pattern = _like_prefix(normalize(value)) + "%"
            if modifier == "contains":
                pattern = "%" + pattern
            return ("like",), [pattern]
        if param.type == "date":
            return _date_spec(value)
        if param.type == "number":
            return _number_spec(value)
        if param.type == "quantity":
            return _quantity_spec(value)
        if param.type == "uri":
            if modifier == "below":
                # An exact, case-sensitive prefix test (SQLite's LIKE ignores case).
                return ("below",), [len(value), value]
            if modifier == "above":
                # Stored URIs that the search value starts with: its prefixes, compared exactly
                # (a LIKE built from stored values would read their _ and % as wildcards).
                return ("above",), [list({value[:i] for i in range(1, len(value) + 1)})]
            return ("uri",), [value]
        if param.type == "reference":
            return self._reference_spec(modifier, value)
        if param.type == "composite":
            return self._composite_spec(param, value)
        raise FhirError(400, f"Search on parameters of type {param.type} is not supported", code="not-supported")

    def _reference_spec(self, type_modifier: str | None, value: str) -> Spec:
        base = self.repo.base_url
        if base and value.startswith(base + "/"):
            value = value[len(base) + 1:]
        value = value.split("/_history/")[0]
        parts = value.split("/")
        if "://" not in value and len(parts) == 2:
            target_type, target_id = parts
            if type_modifier and type_modifier != target_type:
                return ("nothing",), []
            return ("typed",), [target_type, target_id]
        if type_modifier:
            return ("typed",), [type_modifier, value]
        return ("target",), [value]

    def _composite_spec(self, param: SearchParam, value: str) -> Spec:
        parts = split_values(value, "$")
        if len(parts) != 2:
            raise FhirError(400, f"A composite value needs two parts joined by $: {value!r}", code="invalid")
        first_type, second_type = (comp.param_type for comp in param.components)
        if first_type == "reference":
            first: Spec = ("code1",), [_unescape(parts[0])]
        else:
            first = _token_spec(parts[0])
        raw = parts[1]
        if second_type == "token":
            second = _token_spec(raw)
        elif second_type == "quantity":
            second = _quantity_spec(raw)
        elif second_type == "date":
            second = _date_spec(raw)
        else:
            second = ("like",), [_like_prefix(normalize(raw)) + "%"]
        return ("composite", first[0], len(first[1]), second[0]), first[1] + second[1]

    def _param_spec(self, name: str, raw_value: str, query: Query) -> Spec | None:
        code, _, modifier = name.partition(":")
        if "." in code:
            self._unknown(query, f"Chained parameter {name!r} is not supported")
            return None
        if code == "_id":
            if modifier not in ("", "not"):
                raise FhirError(400, f"Modifier :{modifier} is not supported on _id", code="not-supported")
            return ("_id", modifier == "not"), [[_unescape(v) for v in split_values(raw_value)]]
        param = self.params.get(code)
        if param is None:
            self._unknown(query, f"Unknown search parameter {code!r} for {self.resource_type}")
            return None
        modifier = modifier or None
        if param.type == "reference" and modifier and modifier not in ("missing",):
            if modifier not in (param.targets or (modifier,)) or not modifier[:1].isupper():
                raise FhirError(400, f"Modifier :{modifier} is not supported on {code}", code="not-supported")
        elif modifier and modifier not in MODIFIERS.get(param.type, set()):
            raise FhirError(400, f"Modifier :{modifier} is not supported on {code} ({param.type})",
                            code="not-supported")
        if modifier == "missing":
            if raw_value not in ("true", "false"):
                raise FhirError(400, f"{name} takes true or false", code="invalid")
            return ("filter", param.type, code, raw_value == "true", 8, None), []
        values = split_values(raw_value)
        if any(v == "" for v in values):
            raise FhirError(400, f"Empty value in {name}", code="invalid")
        value_mod = None if modifier == "not" else modifier
        shapes, bound = [], []
        for v in values:
            shape, vals = self._value_spec(param, value_mod, v)
            shapes.append((shape, len(vals)))
            bound += vals
        rank = 6 if modifier in ("text", "contains") else (3 if modifier == "exact" else RANKS.get(param.type, 5))
        return ("filter", param.type, code, modifier == "not", rank, tuple(shapes)), bound

    def parse(self, params: list[tuple[str, str]], settings_count: int = 20, max_count: int = 1000) -> Query:
        query = Query(self.resource_type, count=settings_count)
        for name, value in params:
            base_name = name.split(":")[0]
            if base_name in RESULT_PARAMS:
                self._result_param(query, name, value, max_count)
                continue
            spec = self._param_spec(name, value, query)
            if spec is not None:
                query.clauses.append(spec)
        return query

    def _result_param(self, query: Query, name: str, value: str, max_count: int) -> None:
        if name == "_count":
            if not value.isdigit():
                raise FhirError(400, f"_count must be a non-negative integer, not {value!r}", code="invalid")
            query.count = min(int(value), max_count)
        elif name == "_sort":
            for item in value.split(","):
                desc = item.startswith("-")
                key = item.lstrip("-")
                if key not in ("_id", "_lastUpdated") and key not in self.params:
                    raise FhirError(400, f"Cannot sort by unknown parameter {key!r}", code="invalid")
                query.sort.append((key, desc))
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise FhirError(400, "_total takes none, estimate or accurate", code="invalid")
            query.total = value
        elif name == "_summary":
            if value not in ("true", "false", "text", "data", "count"):
                raise FhirError(400, "_summary takes true, false, text, data or count", code="invalid")
            query.summary = value
        elif name == "_elements":
            query.elements = [e.strip() for e in value.split(",") if e.strip()]
        elif name.startswith("_include"):
            query.include.append((value, name.endswith(":iterate") or name.endswith(":recurse")))
        elif name.startswith("_revinclude"):
            query.revinclude.append((value, name.endswith(":iterate") or name.endswith(":recurse")))
        elif name == "_cursor":
            try:
                query.cursor = json.loads(base64.urlsafe_b64decode(value.encode() + b"=" * (-len(value) % 4)))
            except (ValueError, TypeError):
                raise FhirError(400, "Invalid paging cursor", code="invalid") from None


# --- building: the SQLAlchemy half, run once per shape of search ---

def _value_build(table: Any, shape: tuple[Any, ...], b: _Binds) -> ColumnElement[bool]:
    c = table.c
    kind = shape[0]
    if kind == "text":
        return or_(c.text.like(b[0], escape="\\"), c.text.like(b[1], escape="\\"))
    if kind == "token":
        return _token_build(c.system, c.code, shape[1], b)
    if kind == "exact_short":
        return and_(c.value == b[0], c.value_exact == b[1])
    if kind == "exact":
        return c.value_exact == b[0]
    if kind == "like":
        return c.value.like(b[0], escape="\\")
    if kind == "date":
        return _date_build(c.low, c.high, shape[1], b)
    if kind == "number":
        return _number_build(c.value, shape[1], b)
    if kind == "quantity":
        return _quantity_build(c.value, c.system, c.code, shape, b)
    if kind == "below":
        return func.substr(c.value, 1, b.typed(0, Integer())) == b.typed(1, String())
    if kind == "above":
        return c.value.in_(b.expanding(0, c.value.type))
    if kind == "uri":
        return c.value == b[0]
    if kind == "nothing":
        return false()
    if kind == "typed":
        return and_(c.target_type == b[0], c.target_id == b[1])
    if kind == "target":
        return c.target_id == b[0]
    if kind == "composite":
        _, first_shape, first_count, second_shape = shape
        first = c.code1 == b[0] if first_shape[0] == "code1" else _token_build(c.system1, c.code1, first_shape[1], b)
        rest = b.at(first_count)
        if second_shape[0] == "token":
            second = _token_build(c.system2, c.code2, second_shape[1], rest)
        elif second_shape[0] == "quantity":
            second = _quantity_build(c.number2, c.system2, c.code2, second_shape, rest)
        elif second_shape[0] == "date":
            second = _date_build(c.low2, c.high2, second_shape[1], rest)
        else:
            second = c.code2.like(rest[0], escape="\\")
        return and_(first, second)
    raise AssertionError(f"unknown search shape {shape!r}")


def _clause_build(resource_type: str, shape: tuple[Any, ...], b: _Binds) -> ColumnElement[bool] | IndexFilter:
    if shape[0] == "_id":
        cond = R.id.in_(b.expanding(0, R.id.type))
        return not_(cond) if shape[1] else cond
    _, param_type, code, negate, rank, value_shapes = shape
    table = db.INDEX_TABLES[param_type]
    where = [table.c.resource_type == resource_type, table.c.param == code]
    if value_shapes is None:  # :missing
        return IndexFilter(table, tuple(where), negate, rank)
    conditions, n = [], 0
    for value_shape, count in value_shapes:
        conditions.append(_value_build(table, value_shape, b.at(n)))
        n += count
    where.append(or_(*conditions))
    return IndexFilter(table, tuple(where), negate, rank)


def _sort_keys(resource_type: str, sort: list[tuple[str, bool]]) -> list[tuple[Any, bool]]:
    """(SQL expression, descending) pairs, ending with the unique tie-break on pk."""
    params = params_for(resource_type)
    keys: list[tuple[Any, bool]] = []
    for code, desc in sort:
        if code == "_id":
            keys.append((R.id, desc))
            continue
        if code == "_lastUpdated":
            keys.append((R.last_updated, desc))
            continue
        param = params[code]
        table = db.INDEX_TABLES[param.type]
        if param.type == "date":
            column = table.c.high if desc else table.c.low
        else:
            column = table.c.get({"token": "code", "reference": "target_id"}.get(param.type, "value"))
        if column is None:
            raise FhirError(400, f"Cannot sort by {code} ({param.type})", code="invalid")
        agg = func.max(column) if desc else func.min(column)
        sub = (select(agg).where(table.c.resource_pk == R.pk, table.c.resource_type == resource_type,
                                 table.c.param == code).scalar_subquery())
        zero: Any = 0 if param.type in ("date", "quantity", "number") else ""
        # Rows without a value sort last either way: first a 0/1 "missing" flag, then the value.
        keys.append((case((sub.is_(None), 1), else_=0).cast(Integer), False))
        keys.append((func.coalesce(sub, zero), desc))
    keys.append((R.pk, False))
    return keys


def _after(keys: list[tuple[Any, bool]], cursor_length: int) -> ColumnElement[bool]:
    """Rows after the cursor (bound as c0, c1...) in the order of keys."""
    if cursor_length != len(keys):
        raise FhirError(400, "The paging cursor does not fit this search", code="invalid")
    cursor = [bindparam(f"c{i}") for i in range(cursor_length)]
    clauses = []
    for i, (expr, desc) in enumerate(keys):
        equal_before = [keys[j][0] == cursor[j] for j in range(i)]
        step = expr < cursor[i] if desc else expr > cursor[i]
        clauses.append(and_(*equal_before, step))
    return or_(*clauses)


def _base_conditions(resource_type: str, shape: tuple[Any, ...], restrict: Restriction | None,
                     compartment: bool) -> list[ColumnElement[bool]]:
    """The WHERE of a search of this shape; its values are bound as v0, v1... (Query.values) and,
    with a compartment, the patient id as `compartment`."""
    conditions = [R.deleted == false()]
    filters = []
    n = 0
    for clause_shape, count in shape:
        built = _clause_build(resource_type, clause_shape, _Binds(n))
        n += count
        if isinstance(built, IndexFilter):
            filters.append(built)
        else:
            conditions.append(built)
    if compartment:
        if resource_type == "Patient":
            conditions.append(R.id == bindparam("compartment"))
        else:
            c = db.compartment.c
            filters.append(IndexFilter(db.compartment, (c.patient_id == bindparam("compartment"),
                                                        c.resource_type == resource_type), rank=1))
    candidates = [f for f in filters if not f.negate]
    driver = min(candidates, key=lambda f: f.rank) if candidates else None
    conditions += [f.driving() if f is driver else f.probe() for f in filters]
    if driver is None:
        # With a driver the index rows already name the type; saying it again here would lead
        # SQLite to walk every resource of the type instead of fetching the driver's rows.
        conditions.append(R.resource_type == resource_type)
    if restrict is not None:
        conditions.append(restrict(R.pk))
    return conditions


def _build_count(resource_type: str, shape: tuple[Any, ...], restrict: Restriction | None,
                 compartment: bool) -> Any:
    conditions = _base_conditions(resource_type, shape, restrict, compartment)
    return select(func.count()).select_from(db.resource).where(*conditions)


def _build_page(resource_type: str, shape: tuple[Any, ...], restrict: Restriction | None, compartment: bool,
                sort: tuple[tuple[str, bool], ...], cursor_length: int | None) -> Any:
    """The page query: matches in sort order, their sort keys as k0, k1..., at most `limit` rows."""
    conditions = _base_conditions(resource_type, shape, restrict, compartment)
    keys = _sort_keys(resource_type, list(sort))
    if cursor_length is not None:
        conditions.append(_after(keys, cursor_length))
    order = [expr.desc() if desc else expr.asc() for expr, desc in keys]
    return (select(db.resource, *[expr.label(f"k{i}") for i, (expr, _) in enumerate(keys)])
            .where(*conditions).order_by(*order).limit(bindparam("limit", type_=Integer)))


# Built statements by everything that shapes their SQL: the dialect, the resource type, each
# parameter's shape (name, modifier, type and prefix of each value, how many values), the sort, the
# compartment, the cursor's length. Executing the same statement object again costs SQLAlchemy
# neither building nor a cache key (memoized on the statement) nor compilation (its compiled cache).
# Searches restricted by an access policy are built each time: the restriction names the caller's
# patients. Bounded: least recently used shapes go first.
STATEMENT_CACHE_SIZE = 512
_statements: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_statements_lock = threading.Lock()


def _statement(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    with _statements_lock:
        stmt = _statements.get(key)
        if stmt is not None:
            _statements.move_to_end(key)
            return stmt
    stmt = build()
    with _statements_lock:
        _statements[key] = stmt
        while len(_statements) > STATEMENT_CACHE_SIZE:
            _statements.popitem(last=False)
    return stmt


def _shape_of(query: Query) -> tuple[Any, ...]:
    return tuple((shape, len(values)) for shape, values in query.clauses)


def search(repo: Repository, resource_type: str, params: list[tuple[str, str]], *,
           restrict: Restriction | None = None, compartment: str | None = None, strict: bool = False,
           default_count: int = 20, max_count: int = 1000) -> tuple[Query, SearchResult]:
    if _finds_audit_events(resource_type, params) and not repo.conn.info.get("write"):
        # AuditEvents captured before this search but still in the spool are stored first. Before
        # this transaction's first read: its snapshot (SQLite) then includes them.
        repo.store.settle_audit()
    repo.flush()
    builder = SearchBuilder(repo, resource_type, strict)
    query = builder.parse(params, default_count, max_count)
    if compartment is not None and resource_type != "Patient" and \
            resource_type not in patient_compartment():
        raise FhirError(400, f"{resource_type} is not in the Patient compartment", code="invalid")
    shape = _shape_of(query)
    in_compartment = compartment is not None
    values = query.values()
    if in_compartment:
        values["compartment"] = compartment
    cacheable = restrict is None
    dialect = repo.conn.dialect.name
    result = SearchResult(matches=[], warnings=query.warnings)
    if query.total in ("accurate", "estimate") or query.summary == "count":
        def build_count() -> Any:
            return _build_count(resource_type, shape, restrict, in_compartment)

        stmt = _statement(("count", dialect, resource_type, shape, in_compartment), build_count) \
            if cacheable else build_count()
        result.total = repo.conn.execute(stmt, values).scalar_one()
    if query.summary == "count" or query.count == 0:
        return query, result
    sort = tuple(query.sort)
    cursor_length = None if query.cursor is None else len(query.cursor)

    def build_page() -> Any:
        return _build_page(resource_type, shape, restrict, in_compartment, sort, cursor_length)

    stmt = _statement(("page", dialect, resource_type, shape, in_compartment, sort, cursor_length),
                      build_page) if cacheable else build_page()
    values["limit"] = query.count + 1
    if query.cursor is not None:
        values.update((f"c{i}", query.cursor[i]) for i in range(cursor_length or 0))
    rows = repo.conn.execute(stmt, values).all()
    page = rows[:query.count]
    result.matches = [Repository._stored(r) for r in page]
    if len(rows) > query.count:
        # the sort keys k0, k1... follow the resource's columns
        result.next_cursor = encode_cursor(list(page[-1][len(db.resource.c):]))
    if result.matches and (query.include or query.revinclude):
        result.includes = includes(repo, resource_type, result.matches, query, restrict)
    return query, result


def encode_cursor(values: list[Any]) -> str:
    plain = [float(v) if isinstance(v, Decimal) else v for v in values]
    return base64.urlsafe_b64encode(json.dumps(plain, separators=(",", ":")).encode()).decode().rstrip("=")


def _include_targets(value: str, reverse: bool) -> tuple[str, str, str | None]:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise FhirError(400, f"Invalid {'_revinclude' if reverse else '_include'} value {value!r}",
                        code="invalid")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def includes(repo: Repository, resource_type: str, matches: list[Stored], query: Query,
             restrict: Restriction | None, max_rounds: int = 4) -> list[Stored]:
    """_include and _revinclude: one query per parameter and round, never truncated."""
    seen = {s.pk for s in matches}
    out: list[Stored] = []
    frontier = list(matches)
    for round_no in range(max_rounds):
        found: list[Stored] = []
        for value, iterate in query.include:
            if round_no > 0 and not iterate:
                continue
            found += _forward(repo, value, frontier, restrict)
        for value, iterate in query.revinclude:
            if round_no > 0 and not iterate:
                continue
            found += _reverse(repo, value, frontier, restrict)
        fresh = []
        for stored in found:
            if stored.pk not in seen:
                seen.add(stored.pk)
                fresh.append(stored)
        out += fresh
        frontier = fresh
        if not fresh:
            break
    return out


def _forward(repo: Repository, value: str, sources: list[Stored], restrict: Restriction | None) -> list[Stored]:
    source_type, code, target_type = _include_targets(value, reverse=False)
    x = db.sp_reference.c
    pks = [s.pk for s in sources if s.resource_type == source_type]
    if not pks:
        return []
    if code != "*" and code not in params_for(source_type):
        raise FhirError(400, f"Unknown parameter in _include={value}", code="invalid")
    conditions = [x.resource_pk.in_(pks), x.resource_type == source_type]
    if code != "*":
        conditions.append(x.param == code)
    if target_type:
        conditions.append(x.target_type == target_type)
    targets = select(x.target_type, x.target_id).where(*conditions).distinct().subquery()
    where = [R.deleted == false()]
    if restrict is not None:
        where.append(restrict(R.pk))
    rows = repo.conn.execute(
        select(db.resource).join(targets, and_(targets.c.target_type == R.resource_type,
                                               targets.c.target_id == R.id)).where(*where)
    ).all()
    return [Repository._stored(r) for r in rows]


def _reverse(repo: Repository, value: str, targets: list[Stored], restrict: Restriction | None) -> list[Stored]:
    source_type, code, target_type = _include_targets(value, reverse=True)
    if code not in params_for(source_type):
        raise FhirError(400, f"Unknown parameter in _revinclude={value}", code="invalid")
    x = db.sp_reference.c
    found: list[Stored] = []
    by_type: dict[str, list[str]] = {}
    for t in targets:
        if target_type is None or t.resource_type == target_type:
            by_type.setdefault(t.resource_type, []).append(t.id)
    for ttype, ids in by_type.items():
        sources = select(x.resource_pk).where(
            x.resource_type == source_type, x.param == code, x.target_type == ttype, x.target_id.in_(ids))
        where = [R.pk.in_(sources), R.deleted == false()]
        if restrict is not None:
            where.append(restrict(R.pk))
        found += [Repository._stored(r) for r in repo.conn.execute(select(db.resource).where(*where)).all()]
    return found


def conditional_matches(repo: Repository, resource_type: str, criteria: str) -> list[Stored]:
    """Resources matching a conditional create/update/delete's criteria (at most 2 are needed)."""
    params = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
    if not params:
        raise FhirError(400, "Conditional criteria are empty", code="invalid")
    _, result = search(repo, resource_type, [*params, ("_count", "2")], strict=True)
    return result.matches


def _finds_audit_events(resource_type: str, params: list[tuple[str, str]]) -> bool:
    return resource_type == "AuditEvent" or any(
        name.split(":")[0] == "_revinclude" and value.startswith("AuditEvent:") for name, value in params)


def everything(repo: Repository, patient_id: str, *, since: str | None = None, types: list[str] | None = None,
               count: int = 50, cursor: str | None = None, restrict: Restriction | None = None
               ) -> tuple[list[Stored], list[Stored], str | None]:
    """Patient/$everything: the patient, its compartment, and the non-patient resources they cite."""
    repo.flush()
    repo.read("Patient", patient_id)
    c = db.compartment.c
    members = select(c.resource_pk).where(c.patient_id == patient_id)
    conditions = [R.deleted == false(), or_(R.pk.in_(members),
                                            and_(R.resource_type == "Patient", R.id == patient_id))]
    if types:
        conditions.append(R.resource_type.in_(types))
    else:
        # The access log is about the record, not part of it; each $everything would add to it.
        conditions.append(R.resource_type != "AuditEvent")
    if since:
        try:
            since_value = instant_ms(since)
        except ValueError:
            raise FhirError(400, f"Invalid _since {since!r}", code="invalid") from None
        v = db.resource_version.c
        conditions.append(R.pk.in_(select(v.resource_pk).where(v.last_updated_ms >= since_value)))
    if cursor:
        try:
            after = int(cursor)
        except ValueError:
            raise FhirError(400, "Invalid paging cursor", code="invalid") from None
        conditions.append(R.pk > after)
    if restrict is not None:
        conditions.append(restrict(R.pk))
    rows = repo.conn.execute(select(db.resource).where(*conditions).order_by(R.pk).limit(count + 1)).all()
    page = [Repository._stored(r) for r in rows[:count]]
    next_cursor = str(page[-1].pk) if len(rows) > count else None
    # Resources outside every patient's compartment (Practitioner, Organization, Medication...)
    # that the page cites; other patients' data is never pulled in this way.
    compartment_types = set(patient_compartment()) | {"Patient"}
    x = db.sp_reference.c
    cited = select(x.target_type, x.target_id).where(
        x.resource_pk.in_([s.pk for s in page]), x.target_type.not_in(compartment_types)).distinct().subquery()
    where = [R.deleted == false()]
    if restrict is not None:
        where.append(restrict(R.pk))
    extra = repo.conn.execute(select(db.resource).join(
        cited, and_(cited.c.target_type == R.resource_type, cited.c.target_id == R.id)).where(*where)).all()
    seen = {s.pk for s in page}
    included = [Repository._stored(r) for r in extra if r.pk not in seen]
    if types:
        included = [s for s in included if s.resource_type in types]
    return page, included, next_cursor

