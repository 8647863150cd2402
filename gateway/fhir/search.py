"""FHIR search: query parameters -> SQL over the index tables; paging, _sort, _include.

Every search parameter becomes `resource.pk IN (rows of its index table that match)`; repeated
parameters AND, comma-separated values OR. Pages are keyset pages: the cursor holds the sort key of
the last row served, so rows inserted while a client pages never shift or repeat what it sees.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
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


def _date_condition(low: Any, high: Any, raw: str) -> ColumnElement[bool]:
    prefix, value = _split_prefix(raw)
    try:
        sl, sh = date_range(value)
    except ValueError:
        raise FhirError(400, f"Invalid date in search: {raw!r}", code="invalid") from None
    contained = and_(low >= sl, high <= sh)
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return not_(contained)
    if prefix == "gt":
        return high > sh
    if prefix == "lt":
        return low < sl
    if prefix == "ge":
        return or_(high > sh, contained)
    if prefix == "le":
        return or_(low < sl, contained)
    if prefix == "sa":
        return low > sh
    if prefix == "eb":
        return high < sl
    # ap: overlap after widening by a tenth of the distance to now (at least a day).
    import time

    margin = max(86_400_000, abs(int(time.time() * 1000) - sl) // 10)
    return and_(low <= sh + margin, high >= sl - margin)


def _number_bounds(text_value: str) -> tuple[float, float, float]:
    try:
        number = Decimal(text_value)
    except InvalidOperation:
        raise FhirError(400, f"Invalid number in search: {text_value!r}", code="invalid") from None
    exponent = number.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    return float(number), float(number - half), float(number + half)


def _number_condition(column: Any, raw: str) -> ColumnElement[bool]:
    prefix, value = _split_prefix(raw)
    number, low, high = _number_bounds(value)
    if prefix == "eq":
        return and_(column >= low, column < high)
    if prefix == "ne":
        return or_(column < low, column >= high)
    if prefix in ("gt", "sa"):
        return column > number
    if prefix in ("lt", "eb"):
        return column < number
    if prefix == "ge":
        return column >= number
    if prefix == "le":
        return column <= number
    margin = abs(number) * 0.1
    return and_(column >= number - margin, column <= number + margin)


def _token_condition(system_col: Any, code_col: Any, raw: str) -> ColumnElement[bool]:
    parts = split_values(raw, "|")
    if len(parts) == 1:
        return code_col == _unescape(parts[0])
    system, code = _unescape(parts[0]), _unescape("|".join(parts[1:]))
    if system == "":
        return and_(system_col.is_(None), code_col == code)
    if code == "":
        return system_col == system
    return and_(system_col == system, code_col == code)


def _quantity_condition(value_col: Any, system_col: Any, code_col: Any, raw: str) -> ColumnElement[bool]:
    parts = split_values(raw, "|")
    cond = _number_condition(value_col, parts[0])
    system = _unescape(parts[1]) if len(parts) > 1 else ""
    code = _unescape(parts[2]) if len(parts) > 2 else ""
    if system:
        cond = and_(cond, system_col == system)
    if code:
        cond = and_(cond, code_col == code)
    return cond


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
    """A parsed search: where-conditions plus the result parameters."""

    resource_type: str
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    filters: list[IndexFilter] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    count: int = 20
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    total: str = "none"
    summary: str | None = None
    elements: list[str] | None = None
    include: list[tuple[str, bool]] = field(default_factory=list)  # (value, iterate)
    revinclude: list[tuple[str, bool]] = field(default_factory=list)
    cursor: list[Any] | None = None


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

    def _filter(self, param: SearchParam, code: str, condition: ColumnElement[bool] | None,
                negate: bool = False, rank: int | None = None) -> IndexFilter:
        table = db.INDEX_TABLES[param.type]
        where = [table.c.resource_type == self.resource_type, table.c.param == code]
        if condition is not None:
            where.append(condition)
        return IndexFilter(table, tuple(where), negate, RANKS.get(param.type, 5) if rank is None else rank)

    def _value_condition(self, param: SearchParam, modifier: str | None, value: str) -> ColumnElement[bool]:
        table = db.INDEX_TABLES[param.type]
        c = table.c
        if param.type == "token":
            if modifier == "text":
                words = normalize(value)
                return or_(c.text.like(_like_prefix(words) + "%", escape="\\"),
                           c.text.like("% " + _like_prefix(words) + "%", escape="\\"))
            return _token_condition(c.system, c.code, value)
        if param.type == "string":
            if modifier == "exact":
                if len(value) < MAX_LEN:
                    # A value shorter than the stored maximum was stored whole, so its normalized
                    # form is equal too; that equality is what the (type, param, value) index serves
                    # (value_exact has no index of its own).
                    return and_(c.value == normalize(value), c.value_exact == value)
                return c.value_exact == value
            pattern = _like_prefix(normalize(value)) + "%"
            if modifier == "contains":
                pattern = "%" + pattern
            return c.value.like(pattern, escape="\\")
        if param.type == "date":
            return _date_condition(c.low, c.high, value)
        if param.type == "number":
            return _number_condition(c.value, value)
        if param.type == "quantity":
            return _quantity_condition(c.value, c.system, c.code, value)
        if param.type == "uri":
            if modifier == "below":
                # An exact, case-sensitive prefix test (SQLite's LIKE ignores case).
                return func.substr(c.value, 1, len(value)) == value
            if modifier == "above":
                # Stored URIs that the search value starts with: its prefixes, compared exactly
                # (a LIKE built from stored values would read their _ and % as wildcards).
                return c.value.in_({value[:i] for i in range(1, len(value) + 1)})
            return c.value == value
        if param.type == "reference":
            return self._reference_condition(param, modifier, value)
        if param.type == "composite":
            return self._composite_condition(param, value)
        raise FhirError(400, f"Search on parameters of type {param.type} is not supported", code="not-supported")

    def _reference_condition(self, param: SearchParam, type_modifier: str | None,
                             value: str) -> ColumnElement[bool]:
        c = db.sp_reference.c
        base = self.repo.base_url
        if base and value.startswith(base + "/"):
            value = value[len(base) + 1:]
        value = value.split("/_history/")[0]
        parts = value.split("/")
        if "://" not in value and len(parts) == 2:
            target_type, target_id = parts
            if type_modifier and type_modifier != target_type:
                return false()
            return and_(c.target_type == target_type, c.target_id == target_id)
        if type_modifier:
            return and_(c.target_type == type_modifier, c.target_id == value)
        return c.target_id == value

    def _composite_condition(self, param: SearchParam, value: str) -> ColumnElement[bool]:
        parts = split_values(value, "$")
        if len(parts) != 2:
            raise FhirError(400, f"A composite value needs two parts joined by $: {value!r}", code="invalid")
        c = db.sp_composite.c
        first_type, second_type = (comp.param_type for comp in param.components)
        if first_type == "reference":
            first = c.code1 == _unescape(parts[0])
        else:
            first = _token_condition(c.system1, c.code1, parts[0])
        raw = parts[1]
        if second_type == "token":
            second = _token_condition(c.system2, c.code2, raw)
        elif second_type == "quantity":
            second = _quantity_condition(c.number2, c.system2, c.code2, raw)
        elif second_type == "date":
            second = _date_condition(c.low2, c.high2, raw)
        else:
            second = c.code2.like(_like_prefix(normalize(raw)) + "%", escape="\\")
        return and_(first, second)

    def _param_condition(self, name: str, raw_value: str, query: Query) -> ColumnElement[bool] | IndexFilter | None:
        code, _, modifier = name.partition(":")
        if "." in code:
            self._unknown(query, f"Chained parameter {name!r} is not supported")
            return None
        if code == "_id":
            if modifier not in ("", "not"):
                raise FhirError(400, f"Modifier :{modifier} is not supported on _id", code="not-supported")
            ids = [_unescape(v) for v in split_values(raw_value)]
            cond = R.id.in_(ids)
            return not_(cond) if modifier == "not" else cond
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
            return self._filter(param, code, None, negate=raw_value == "true", rank=8)
        values = split_values(raw_value)
        if any(v == "" for v in values):
            raise FhirError(400, f"Empty value in {name}", code="invalid")
        value_mod = None if modifier == "not" else modifier
        matching = or_(*(self._value_condition(param, value_mod, v) for v in values))
        rank = 6 if modifier in ("text", "contains") else (3 if modifier == "exact" else None)
        return self._filter(param, code, matching, negate=modifier == "not", rank=rank)

    def parse(self, params: list[tuple[str, str]], settings_count: int = 20, max_count: int = 1000) -> Query:
        query = Query(self.resource_type, count=settings_count)
        for name, value in params:
            base_name = name.split(":")[0]
            if base_name in RESULT_PARAMS:
                self._result_param(query, name, value, max_count)
                continue
            cond = self._param_condition(name, value, query)
            if isinstance(cond, IndexFilter):
                query.filters.append(cond)
            elif cond is not None:
                query.conditions.append(cond)
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

    # --- sorting and keyset paging ---

    def _sort_keys(self, query: Query) -> list[tuple[Any, bool]]:
        """(SQL expression, descending) pairs, ending with the unique tie-break on pk."""
        keys: list[tuple[Any, bool]] = []
        for code, desc in query.sort:
            if code == "_id":
                keys.append((R.id, desc))
                continue
            if code == "_lastUpdated":
                keys.append((R.last_updated, desc))
                continue
            param = self.params[code]
            table = db.INDEX_TABLES[param.type]
            if param.type == "date":
                column = table.c.high if desc else table.c.low
            else:
                column = table.c.get({"token": "code", "reference": "target_id"}.get(param.type, "value"))
            if column is None:
                raise FhirError(400, f"Cannot sort by {code} ({param.type})", code="invalid")
            agg = func.max(column) if desc else func.min(column)
            sub = (select(agg).where(table.c.resource_pk == R.pk, table.c.resource_type == self.resource_type,
                                     table.c.param == code).scalar_subquery())
            zero: Any = 0 if param.type in ("date", "quantity", "number") else ""
            # Rows without a value sort last either way: first a 0/1 "missing" flag, then the value.
            keys.append((case((sub.is_(None), 1), else_=0).cast(Integer), False))
            keys.append((func.coalesce(sub, zero), desc))
        keys.append((R.pk, False))
        return keys

    @staticmethod
    def _after(keys: list[tuple[Any, bool]], cursor: list[Any]) -> ColumnElement[bool]:
        if len(cursor) != len(keys):
            raise FhirError(400, "The paging cursor does not fit this search", code="invalid")
        clauses = []
        for i, (expr, desc) in enumerate(keys):
            equal_before = [keys[j][0] == cursor[j] for j in range(i)]
            step = expr < cursor[i] if desc else expr > cursor[i]
            clauses.append(and_(*equal_before, step))
        return or_(*clauses)


def _base_conditions(resource_type: str, query: Query, restrict: Restriction | None,
                     compartment: str | None) -> list[ColumnElement[bool]]:
    conditions = [R.deleted == false(), *query.conditions]
    filters = list(query.filters)
    if compartment is not None:
        if resource_type == "Patient":
            conditions.append(R.id == compartment)
        else:
            c = db.compartment.c
            filters.append(IndexFilter(db.compartment, (c.patient_id == compartment, c.resource_type == resource_type),
                                       rank=1))
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


def search(repo: Repository, resource_type: str, params: list[tuple[str, str]], *,
           restrict: Restriction | None = None, compartment: str | None = None, strict: bool = False,
           default_count: int = 20, max_count: int = 1000) -> tuple[Query, SearchResult]:
    repo.flush()
    builder = SearchBuilder(repo, resource_type, strict)
    query = builder.parse(params, default_count, max_count)
    if compartment is not None and resource_type != "Patient" and \
            resource_type not in patient_compartment():
        raise FhirError(400, f"{resource_type} is not in the Patient compartment", code="invalid")
    conditions = _base_conditions(resource_type, query, restrict, compartment)
    result = SearchResult(matches=[], warnings=query.warnings)
    if query.total in ("accurate", "estimate") or query.summary == "count":
        result.total = repo.conn.execute(select(func.count()).select_from(db.resource).where(*conditions)
                                         ).scalar_one()
    if query.summary == "count" or query.count == 0:
        return query, result
    keys = builder._sort_keys(query)
    page_conditions = list(conditions)
    if query.cursor is not None:
        page_conditions.append(builder._after(keys, query.cursor))
    order = [expr.desc() if desc else expr.asc() for expr, desc in keys]
    stmt = (select(db.resource, *[expr.label(f"k{i}") for i, (expr, _) in enumerate(keys)])
            .where(*page_conditions).order_by(*order).limit(query.count + 1))
    rows = repo.conn.execute(stmt).all()
    page = rows[:query.count]
    result.matches = [Repository._stored(r) for r in page]
    if len(rows) > query.count:
        last = page[-1]
        values = [getattr(last, f"k{i}") for i in range(len(keys))]
        result.next_cursor = encode_cursor(values)
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

