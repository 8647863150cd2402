"""Test results: the record's laboratory and vital-sign Observations, newest first, grouped by the
DiagnosticReport that lists them; one result with its range, flag, notes and a trend of the same test.

Everything is read through the visit's Record (the access policy, the audit trail). A result is
"new" for a login until that login opens it, and only while it is recent (NEW_RESULT_DAYS): a
record imported with years of history does not greet anyone with hundreds of new results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.portal.record import Found, NotVisible, Record

# Results are laboratory and vital-sign Observations. The HL7 ORU feed sends no category, so the
# filter leaves out the other categories instead of asking for these two: an uncategorised
# Observation from the lab feed is a result.
CATEGORIES = ("laboratory", "vital-signs")
OTHER_CATEGORIES = ("social-history", "survey", "exam", "imaging", "procedure", "therapy", "activity")
PAGE_SIZE = 25
NEW_RESULT_DAYS = 90
TREND_LIMIT = 200
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
REPORT_NOTE = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
NOT_SHOWN = ("entered-in-error", "cancelled")

# v3 ObservationInterpretation (and v2 0078) codes that mean "nothing unusual"; the words for every
# code are the page's (pages/results.py FLAG_WORDS), so that this module stays free of Flask.
NORMAL_CODES = frozenset({"N", "NEG", "ND", "S", "B"})
KNOWN_CODES = frozenset({"H", "L", "HH", "LL", "HU", "LU", "A", "AA", ">", "<", "POS", "DET", "R", "I", "IND",
                         "E", "W", "U", "D"}) | NORMAL_CODES


@dataclass(frozen=True)
class Flag:
    code: str  # a known interpretation code, or "" when only text was given
    text: str  # the record's own words (concept text or display)
    abnormal: bool


@dataclass
class Measure:
    """One value of a result: its own value[x], or one component's (a blood pressure has two)."""

    key: str  # the LOINC (or other) code of the value: a trend follows it
    label: str
    text: str  # the value as shown, with its unit
    number: float | None
    unit: str
    low: float | None = None
    high: float | None = None
    range_text: str = ""
    flag: Flag | None = None


@dataclass
class Result:
    id: str
    name: str
    code: str  # system|code of the test, for the trend
    when: str
    status: str
    measures: list[Measure]
    new: bool = False
    report: str = ""  # the DiagnosticReport that lists it

    @property
    def reference(self) -> str:
        return f"Observation/{self.id}"

    @property
    def flag(self) -> Flag | None:
        flags = [m.flag for m in self.measures if m.flag is not None]
        return next((f for f in flags if f.abnormal), flags[0] if flags else None)

    @property
    def value_text(self) -> str:
        return " / ".join(m.text for m in self.measures)


@dataclass
class Group:
    title: str
    when: str
    results: list[Result] = field(default_factory=list)


@dataclass
class ResultPage:
    groups: list[Group]
    next_cursor: str | None
    total: int | None


@dataclass
class Note:
    text: str
    author: str = ""
    when: str = ""
    source: str = ""  # "result", "report", "message"


# --- reading values ---

def concept_text(concept: dict[str, Any] | None) -> str:
    concept = concept or {}
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display"):
            return str(coding["display"])
    return str(((concept.get("coding") or [{}])[0]).get("code") or "")


def code_key(concept: dict[str, Any] | None) -> str:
    codings = (concept or {}).get("coding") or []
    loinc = next((c for c in codings if c.get("system") == "http://loinc.org" and c.get("code")), None)
    first = loinc or next((c for c in codings if c.get("code")), None)
    if first is None:
        return ""
    return f"{first.get('system') or ''}|{first['code']}"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _format_number(value: Any) -> str:
    number = _number(value)
    if number is None:
        return str(value or "")
    text = str(value)
    return text if text.replace(".", "", 1).replace("-", "", 1).isdigit() else f"{number:g}"


def _quantity_text(quantity: dict[str, Any]) -> str:
    value = f"{quantity.get('comparator', '')}{_format_number(quantity.get('value'))}"
    unit = quantity.get("unit") or quantity.get("code") or ""
    return f"{value} {unit}".strip() if unit not in ("{score}", "1") else value


def value_of(element: dict[str, Any]) -> tuple[str, float | None, str] | None:
    """(text, number, unit) of an element's value[x]; None when it has none."""
    if "valueQuantity" in element:
        quantity = element["valueQuantity"]
        unit = str(quantity.get("unit") or quantity.get("code") or "")
        return _quantity_text(quantity), _number(quantity.get("value")), unit
    if "valueCodeableConcept" in element:
        return concept_text(element["valueCodeableConcept"]), None, ""
    if "valueString" in element:
        return str(element["valueString"]), None, ""
    if "valueBoolean" in element:
        return ("Yes" if element["valueBoolean"] else "No"), None, ""
    if "valueInteger" in element:
        return str(element["valueInteger"]), _number(element["valueInteger"]), ""
    if "valueRange" in element:
        low, high = element["valueRange"].get("low") or {}, element["valueRange"].get("high") or {}
        return f"{_quantity_text(low)} - {_quantity_text(high)}", None, ""
    if "valueRatio" in element:
        num, den = element["valueRatio"].get("numerator") or {}, element["valueRatio"].get("denominator") or {}
        return f"{_quantity_text(num)} / {_quantity_text(den)}", None, ""
    for key in ("valueDateTime", "valueTime", "valuePeriod"):
        if key in element:
            return str(element[key]), None, ""
    return None


def flag_of(element: dict[str, Any]) -> Flag | None:
    for concept in element.get("interpretation") or []:
        for coding in concept.get("coding") or []:
            code = str(coding.get("code") or "")
            if code in KNOWN_CODES:
                return Flag(code, str(concept.get("text") or coding.get("display") or code), code not in NORMAL_CODES)
        if concept.get("text"):
            return Flag("", str(concept["text"]), False)
    return None


def _range_of(element: dict[str, Any]) -> tuple[float | None, float | None, str]:
    for entry in element.get("referenceRange") or []:
        low, high = entry.get("low") or {}, entry.get("high") or {}
        if not (low or high or entry.get("text")):
            continue
        low_n, high_n = _number(low.get("value")), _number(high.get("value"))
        unit = str(low.get("unit") or high.get("unit") or "")
        if entry.get("text"):
            text = str(entry["text"])
        elif low and high:
            text = f"{_format_number(low.get('value'))} - {_format_number(high.get('value'))} {unit}".strip()
        elif low:
            text = f"≥ {_format_number(low.get('value'))} {unit}".strip()
        else:
            text = f"≤ {_format_number(high.get('value'))} {unit}".strip()
        return low_n, high_n, text
    return None, None, ""


def _measure(element: dict[str, Any], label: str, key: str) -> Measure | None:
    value = value_of(element)
    if value is None:
        return None
    low, high, range_text = _range_of(element)
    return Measure(key, label, value[0], value[1], value[2], low, high, range_text, flag_of(element))


def when_of(resource: dict[str, Any]) -> str:
    period = resource.get("effectivePeriod") or {}
    return str(resource.get("effectiveDateTime") or resource.get("effectiveInstant") or period.get("start")
               or resource.get("issued") or "")


def result_of(observation: dict[str, Any]) -> Result | None:
    """The result as the pages show it; None for an Observation without any value."""
    name = concept_text(observation.get("code"))
    key = code_key(observation.get("code"))
    measures = []
    own = _measure(observation, name, key)
    if own is not None:
        measures.append(own)
    for component in observation.get("component") or []:
        measure = _measure(component, concept_text(component.get("code")), code_key(component.get("code")))
        if measure is not None:
            measures.append(measure)
    if not measures:
        return None
    if own is None and len(measures) > 1 and all(m.flag is None for m in measures) and flag_of(observation):
        measures[0].flag = flag_of(observation)
    return Result(observation["id"], name, key, when_of(observation), str(observation.get("status") or ""),
                  measures)


# --- the list ---

def _base_params(record: Record) -> list[tuple[str, str]]:
    return [("patient", record.reference), *[("category:not", c) for c in OTHER_CATEGORIES],
            *[("status:not", status) for status in NOT_SHOWN]]


def is_result(observation: dict[str, Any]) -> bool:
    """The same choice as the searches make, for one Observation in hand."""
    categories = {c.get("code") for cat in observation.get("category") or [] for c in cat.get("coding") or []}
    return (not categories or bool(categories & set(CATEGORIES))) and observation.get("status") not in NOT_SHOWN


def _parse(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")) if len(value) > 10 else \
            datetime.combine(date.fromisoformat(value[:10]), datetime.min.time())
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def is_recent(when: str, now: datetime | None = None) -> bool:
    moment = _parse(when) if when else None
    now = now or datetime.now(UTC)
    return moment is not None and moment >= now - timedelta(days=NEW_RESULT_DAYS)


def list_results(record: Record, cursor: str | None = None, count: int = PAGE_SIZE) -> ResultPage:
    """One page of results, newest first, grouped by their report (or by day when they have none)."""
    found = record.search("Observation", [*_base_params(record), ("_sort", "-date"),
                                          ("_revinclude", "DiagnosticReport:result")],
                          count=count, cursor=cursor, total=cursor is None)
    reports = _reports_by_result(found)
    groups: list[Group] = []
    for observation in found.matches:
        result = result_of(observation)
        if result is None:
            continue
        report = reports.get(result.reference)
        result.report = concept_text(report.get("code")) if report else ""
        title = result.report or ""
        day = result.when[:10]
        if groups and groups[-1].title == title and groups[-1].when[:10] == day:
            groups[-1].results.append(result)
        else:
            groups.append(Group(title, result.when, [result]))
    return ResultPage(groups, found.next_cursor, found.total)


def references_of(page: ResultPage) -> list[str]:
    return [r.reference for g in page.groups for r in g.results]


def _reports_by_result(found: Found) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for reference, resource in found.included.items():
        if not reference.startswith("DiagnosticReport/"):
            continue
        for item in resource.get("result") or []:
            out.setdefault(str(item.get("reference") or ""), resource)
    return out


def recent_results(record: Record, limit: int = 200) -> list[Result]:
    """Results from the last NEW_RESULT_DAYS, newest first (what can still be "new")."""
    since = (datetime.now(UTC) - timedelta(days=NEW_RESULT_DAYS)).strftime("%Y-%m-%dT%H:%M:%SZ")
    found = record.search_all("Observation", [*_base_params(record), ("date", f"ge{since}"), ("_sort", "-date")],
                              limit=limit)
    return [r for r in (result_of(o) for o in found.matches) if r is not None]


# --- one result ---

@dataclass
class Detail:
    result: Result
    observation: dict[str, Any]
    reports: list[dict[str, Any]]
    notes: list[Note]
    performer: str
    trend: list[Result]


def _author(annotation: dict[str, Any]) -> str:
    return str((annotation.get("authorReference") or {}).get("display") or annotation.get("authorString") or "")


def detail(record: Record, observation_id: str) -> Detail:
    """Raises NotVisible for a result this login may not see (or one that is not a result)."""
    observation = record.read("Observation", observation_id)
    result = result_of(observation)
    if result is None or observation.get("status") in NOT_SHOWN:
        raise NotVisible(f"Observation/{observation_id}")
    reports = record.search_all("DiagnosticReport", [("patient", record.reference),
                                                     ("result", result.reference)], limit=20).matches
    notes = [Note(str(n.get("text") or ""), _author(n), str(n.get("time") or ""), "result")
             for n in observation.get("note") or [] if n.get("text")]
    for report in reports:
        result.report = result.report or concept_text(report.get("code"))
        interpreter = ", ".join(str(i.get("display") or "") for i in report.get("resultsInterpreter") or [])
        if report.get("conclusion"):
            notes.append(Note(str(report["conclusion"]), interpreter, str(report.get("issued") or ""), "report"))
        for extension in report.get("extension") or []:
            annotation = extension.get("valueAnnotation") or {}
            if extension.get("url") == REPORT_NOTE and annotation.get("text"):
                notes.append(Note(str(annotation["text"]), _author(annotation), str(annotation.get("time") or ""),
                                  "report"))
    about = {result.reference, *(f"DiagnosticReport/{r['id']}" for r in reports)}
    for message in messages_about(record, about):
        text = "\n".join(str(p.get("contentString")) for p in message.get("payload") or [] if p.get("contentString"))
        if text:
            notes.append(Note(text, str((message.get("sender") or {}).get("display") or ""),
                              str(message.get("sent") or ""), "message"))
    performer = ", ".join(str(p.get("display") or "") for p in observation.get("performer") or [] if p.get("display"))
    return Detail(result, observation, reports, notes, performer, trend(record, result))


def messages_about(record: Record, about: set[str]) -> list[dict[str, Any]]:
    """Communications the patient (or their representative) received about these resources (R4
    Communication has no `about` search parameter: the record's messages are filtered here)."""
    found = record.search_all("Communication", [("subject", record.reference), ("_sort", "sent")], limit=1000)
    out = []
    for message in found.matches:
        if message.get("status") in ("entered-in-error", "not-done", "preparation"):
            continue
        if not {str(a.get("reference") or "") for a in message.get("about") or []} & about:
            continue
        recipients = [str(r.get("reference") or "") for r in message.get("recipient") or []]
        if any(r == record.reference or r.startswith("RelatedPerson/") for r in recipients):
            out.append(message)
    return out


def trend(record: Record, result: Result) -> list[Result]:
    """Every result of the same test for this patient, oldest first."""
    if not result.code:
        return [result]
    found = record.search_all("Observation", [*_base_params(record), ("code", result.code), ("_sort", "date")],
                              limit=TREND_LIMIT)
    return [r for r in (result_of(o) for o in found.matches) if r is not None]


# --- the trend chart (server-rendered SVG) ---

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48


@dataclass
class Point:
    x: float
    y: float
    when: str
    text: str
    abnormal: bool
    flag: Flag | None


@dataclass
class Series:
    label: str
    unit: str
    points: list[Point]
    dash: str  # a second series is dashed: told apart without colour
    band: tuple[float, float] | None = None  # the reference range, as y coordinates (top, bottom)


@dataclass
class Chart:
    series: list[Series]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def _nice_step(span: float) -> float:
    raw = span / 5 if span > 0 else 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def chart(points_of: list[Result], format_day: Any) -> Chart | None:
    """Coordinates for the trend of each numeric value of the test; None when fewer than two
    results have a number (a single point is no trend). `format_day` formats a datetime's date."""
    keys: list[str] = []
    for result in points_of:
        for measure in result.measures:
            if measure.number is not None and measure.key not in keys:
                keys.append(measure.key)
    values = [(r, m) for r in points_of for m in r.measures if m.number is not None and _parse(r.when)]
    if len({r.id for r, _ in values}) < 2:
        return None
    times = [_parse(r.when).timestamp() for r, _ in values]  # type: ignore[union-attr]
    numbers = [m.number for _, m in values if m.number is not None]
    for _, m in values:
        numbers += [v for v in (m.low, m.high) if v is not None]
    y_min, y_max = min(numbers), max(numbers)
    step = _nice_step(y_max - y_min)
    y_min, y_max = math.floor(y_min / step) * step, math.ceil(y_max / step) * step
    if y_max == y_min:
        y_max = y_min + step
    t_min, t_max = min(times), max(times)
    if t_max == t_min:
        t_max = t_min + 86400
    c = Chart([], [], [])

    def x_of(t: float) -> float:
        return round(c.left + (t - t_min) / (t_max - t_min) * (c.right - c.left), 1)

    def y_of(v: float) -> float:
        return round(c.bottom - (v - y_min) / (y_max - y_min) * (c.bottom - c.top), 1)

    for n, key in enumerate(keys):
        points, band, label, unit = [], None, "", ""
        for result in points_of:
            for measure in result.measures:
                if measure.key != key or measure.number is None or _parse(result.when) is None:
                    continue
                label, unit = measure.label, measure.unit
                if measure.low is not None and measure.high is not None:
                    band = (y_of(measure.high), y_of(measure.low))
                points.append(Point(x_of(_parse(result.when).timestamp()), y_of(measure.number),  # type: ignore[union-attr]
                                    result.when, measure.text, bool(measure.flag and measure.flag.abnormal),
                                    measure.flag))
        c.series.append(Series(label, unit, points, "" if n == 0 else "6 4", band))
    value = y_min
    while value <= y_max + step / 2:
        c.y_ticks.append((y_of(value), f"{value:g}"))
        value += step
    span_days = (t_max - t_min) / 86400
    ticks = 4 if span_days > 1 else 1
    for i in range(ticks + 1):
        t = t_min + (t_max - t_min) * i / ticks
        c.x_ticks.append((x_of(t), format_day(datetime.fromtimestamp(t, UTC))))
    return c
