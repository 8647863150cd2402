"""FHIR date, dateTime and instant values as millisecond ranges.

A FHIR date stands for the whole interval its precision implies: "2013" is all of 2013,
"2013-01-14T10:00" the whole minute. Index rows and search values are both turned into an
inclusive [low, high] range of epoch milliseconds, which makes every search prefix a comparison of
two ranges. A value without a time zone is taken as UTC (the server's zone).
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, datetime, timedelta

MIN_MS = -(2**62)
MAX_MS = 2**62

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2})(?::(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def _epoch_ms(dt: datetime) -> int:
    return calendar.timegm(dt.utctimetuple()) * 1000 + dt.microsecond // 1000


@functools.lru_cache(maxsize=4096)
def date_range(value: str) -> tuple[int, int]:
    """The inclusive millisecond range a FHIR date/dateTime/instant string covers.

    Cached: the same values come back again and again (a message's source time is compared for
    each of its resources, index rows repeat their resource's dates)."""
    match = _DATE_RE.match(value.strip())
    if not match:
        raise ValueError(f"not a valid FHIR date: {value!r}")
    g = match.groupdict()
    year = int(g["y"])
    month = int(g["m"] or 1)
    day = int(g["d"] or 1)
    hour = int(g["H"] or 0)
    minute = int(g["M"] or 0)
    second = int(g["S"] or 0)
    fraction = g["f"] or ""
    micro = int((fraction + "000000")[:6]) if fraction else 0
    try:
        start = datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"not a valid FHIR date: {value!r}") from exc
    tz = g["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        start = start - sign * offset
    if g["m"] is None:
        end = start.replace(year=start.year + 1)
    elif g["d"] is None:
        end = start.replace(year=start.year + (month // 12), month=month % 12 + 1)
    elif g["H"] is None:
        end = start + timedelta(days=1)
    elif g["M"] is None:
        end = start + timedelta(hours=1)
    elif g["S"] is None:
        end = start + timedelta(minutes=1)
    elif not fraction:
        end = start + timedelta(seconds=1)
    else:
        end = start + timedelta(milliseconds=max(1, 10 ** (3 - min(len(fraction), 3))))
    low = _epoch_ms(start)
    return low, max(low, _epoch_ms(end) - 1)


def now_instant() -> str:
    """The current time as a FHIR instant with millisecond precision."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def instant_ms(value: str) -> int:
    return date_range(value)[0]
