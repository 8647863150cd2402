"""Resource -> search-index rows, driven by the compiled R4 SearchParameter definitions.

Values are converted by parameter type; where the FHIR type of a value is not known from the path
(only choice elements tell it), the shape of the JSON decides: a CodeableConcept has coding or
text, a Coding has code, an Identifier or ContactPoint has value, and so on.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from gateway import db
from gateway.fhir.dates import MAX_MS, MIN_MS, date_range
from gateway.fhir.searchparams import (
    Found,
    SearchParam,
    element_names,
    params_for,
    patient_compartment,
    reference_type,
)

Row = dict[str, Any]
MAX_LEN = 255


def normalize(text: str) -> str:
    """Case- and accent-insensitive form used for string search."""
    if text.isascii():  # most text: NFKD leaves ASCII as it is, and it has no combining marks
        return text.casefold()[:MAX_LEN]
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()[:MAX_LEN]


def _clip(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)[:MAX_LEN]


# --- conversions: one found value -> the column values of its table ---

def token_values(value: Any) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(system, code, text) triples of a code, Coding, CodeableConcept, Identifier, ContactPoint."""
    if isinstance(value, bool):
        yield None, "true" if value else "false", None
    elif isinstance(value, str):
        yield None, value, None
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "value" not in value and "code" not in value):
            cc_text = value.get("text")
            for coding in value.get("coding", []):
                text = coding.get("display") or cc_text
                yield coding.get("system"), coding.get("code"), normalize(text) if text else None
            if cc_text:
                yield None, None, normalize(cc_text)
        elif "code" in value:
            display = value.get("display")
            yield value.get("system"), value.get("code"), normalize(display) if display else None
        elif "value" in value:
            type_text = value.get("type", {}).get("text") if isinstance(value.get("type"), dict) else None
            yield value.get("system"), str(value["value"]), normalize(type_text) if type_text else None


_STRING_PARTS = {
    # HumanName and Address: each part is searchable on its own, as the spec asks.
    "family", "given", "prefix", "suffix", "text", "line", "city", "district", "state",
    "postalCode", "country",
}


def string_values(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in _STRING_PARTS:
            part = value.get(key)
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (p for p in part if isinstance(p, str))


def date_values(value: Any, type_name: str | None) -> Iterator[tuple[int, int]]:
    if isinstance(value, str):
        yield date_range(value)
    elif isinstance(value, dict):
        if "start" in value or "end" in value:
            low = date_range(value["start"])[0] if "start" in value else MIN_MS
            high = date_range(value["end"])[1] if "end" in value else MAX_MS
            yield low, high
        elif "event" in value or "repeat" in value:
            for event in value.get("event", []):
                yield date_range(event)
            bounds = value.get("repeat", {}).get("boundsPeriod")
            if bounds:
                yield from date_values(bounds, "Period")


def reference_values(value: Any, base_url: str) -> Iterator[tuple[str | None, str]]:
    """(target type, target id) of a Reference; absolute URLs on our own base become local."""
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return
    local = ref
    if base_url and ref.startswith(base_url + "/"):
        local = ref[len(base_url) + 1:]
    local = local.split("/_history/")[0]
    parts = local.split("/")
    if len(parts) == 2 and parts[0][:1].isupper() and "://" not in local:
        yield parts[0], parts[1]
    else:
        yield reference_type(value), ref[:MAX_LEN]


def quantity_values(value: Any) -> Iterator[tuple[float, str | None, str | None]]:
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        yield float(value), None, None
    elif isinstance(value, dict) and "value" in value:
        code = value.get("code") or value.get("unit")
        yield float(value["value"]), value.get("system"), code
        if value.get("unit") and value.get("code") and value["unit"] != value["code"]:
            yield float(value["value"]), None, value["unit"]


def _part_values(param_type: str, found: list[Found], base_url: str) -> list[dict[str, Any]]:
    """Composite component values as partial rows of sp_composite."""
    parts: list[dict[str, Any]] = []
    for value, type_name in found:
        if param_type == "token":
            parts += [{"system": s, "code": c} for s, c, _ in token_values(value) if c is not None]
        elif param_type == "reference":
            parts += [{"system": t, "code": i} for t, i in reference_values(value, base_url)]
        elif param_type == "string":
            parts += [{"system": None, "code": normalize(s)} for s in string_values(value)]
        elif param_type == "quantity":
            parts += [{"number": v, "system": s, "code": c} for v, s, c in quantity_values(value)]
        elif param_type == "date":
            parts += [{"low": lo, "high": hi} for lo, hi in date_values(value, type_name)]
    return parts


def _composite_rows(param: SearchParam, found: list[Found], base_url: str) -> Iterator[Row]:
    first, second = param.components[0], param.components[1]
    for root, _ in found:
        if not isinstance(root, dict):
            continue
        for p1 in _part_values(first.param_type, first.extract(root), base_url):
            for p2 in _part_values(second.param_type, second.extract(root), base_url):
                yield {
                    "system1": p1.get("system"), "code1": _clip(p1.get("code")),
                    "system2": p2.get("system"), "code2": _clip(p2.get("code")),
                    "number2": p2.get("number"), "low2": p2.get("low"), "high2": p2.get("high"),
                }


def param_rows(param: SearchParam, resource: dict[str, Any], base_url: str) -> Iterator[Row]:
    found = param.extract(resource)
    if param.type == "composite":
        yield from _composite_rows(param, found, base_url)
        return
    for value, type_name in found:
        if param.type == "token":
            for system, code, text in token_values(value):
                yield {"system": _clip(system), "code": _clip(code), "text": text}
        elif param.type == "string":
            for s in string_values(value):
                yield {"value": normalize(s), "value_exact": s[:MAX_LEN]}
        elif param.type == "date":
            for low, high in date_values(value, type_name):
                yield {"low": low, "high": high}
        elif param.type == "reference":
            for target_type, target_id in reference_values(value, base_url):
                yield {"target_type": target_type, "target_id": target_id}
        elif param.type in ("quantity", "number"):
            for number, system, code in quantity_values(value):
                yield {"value": number, "system": _clip(system), "code": _clip(code)}
        elif param.type == "uri" and isinstance(value, str):
            yield {"value": value[:1024]}


# Parameters searched on the resource table's own columns (search.py: `_id` is resource.id), never
# through index rows: a row for them would be written with every resource and never read.
FROM_RESOURCE_TABLE = frozenset({"_id"})


@functools.cache
def _indexed(resource_type: str) -> tuple[tuple[str, SearchParam], ...]:
    return tuple((code, param) for code, param in params_for(resource_type).items()
                 if code not in FROM_RESOURCE_TABLE)


def index_rows(resource: dict[str, Any], base_url: str = "") -> dict[str, list[Row]]:
    """{param type: rows} for one resource; rows lack resource_pk, which the store adds."""
    resource_type = resource["resourceType"]
    out: dict[str, list[Row]] = {}
    present = element_names(resource)
    for code, param in _indexed(resource_type):
        if param.needs is not None and present.isdisjoint(param.needs):
            continue  # most parameters find nothing in a given resource: a lookup or two says so
        seen: set[tuple[Any, ...]] = set()
        for row in param_rows(param, resource, base_url):
            key = tuple(row.values())
            if key in seen:
                continue
            seen.add(key)
            row["resource_type"] = resource_type
            row["param"] = code
            out.setdefault(param.type, []).append(row)
    return out


def compartment_patients(resource: dict[str, Any], base_url: str = "") -> set[str]:
    """Ids of the patients in whose compartment this resource lies.

    A Patient is in its own compartment only: the definition also lists Patient.link, but a linked
    (merged or duplicate) record must not widen what a patient-scoped caller reaches.
    """
    resource_type = resource["resourceType"]
    if resource_type == "Patient":
        return {resource["id"]}
    params = params_for(resource_type)
    patients: set[str] = set()
    for code in patient_compartment().get(resource_type, ()):
        param = params.get(code)
        if param is None or param.type != "reference":
            continue
        for value, _ in param.extract(resource):
            for target_type, target_id in reference_values(value, base_url):
                if target_type == "Patient" and "/" not in target_id:
                    patients.add(target_id)
    return patients


@functools.cache
def index_tables_for(resource_type: str) -> tuple[str, ...]:
    """Names of the index tables a resource of this type can have rows in."""
    tables = {db.INDEX_TABLES[param.type].name for param in params_for(resource_type).values()
              if param.type in db.INDEX_TABLES}
    if resource_type == "Patient" or resource_type in patient_compartment():
        tables.add(db.compartment.name)
    return tuple(sorted(tables))
