"""JSON in and out of the store.

Decimals are parsed as Decimal and written back with the digits they came with: FHIR gives
trailing zeros meaning (1.50 is not 1.5), and a float round trip would drop them.

Parsing uses simplejson, the one parser here that yields Decimal. Writing uses orjson, which writes
each Decimal as the text it holds (an orjson Fragment) and is ten to twenty times as fast as
simplejson (25 µs an AuditEvent before, about 1 after): every write, import, HL7 message and
AuditEvent serialises its resources. What orjson refuses (integers beyond 64 bits, keys that are
not strings) falls back to simplejson. The text is simplejson's for the whole FHIR corpus
(tests/fhir/test_jsonio.py); only a float, which stored resources never hold (their decimals are
Decimal), may spell its exponent differently (1e-7 for 1e-07), the same number.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import simplejson

# simplejson.loads(..., use_decimal=True) builds a decoder (and its scanner) on every call, a fifth
# of the time of a small resource; one made once is safe to share between threads (it holds no
# state between calls), as the standard library shares its own default decoder.
_DECODER = simplejson.JSONDecoder(parse_float=Decimal)


def loads(data: str | bytes) -> Any:
    return _DECODER.decode(data)


def _decimal(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any, pretty: bool = False, sort_keys: bool = False) -> str:
    option = (orjson.OPT_INDENT_2 if pretty else 0) | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(value, default=_decimal, option=option).decode()
    except orjson.JSONEncodeError:
        layout: dict[str, Any] = {"indent": 2} if pretty else {"separators": (",", ":")}
        return simplejson.dumps(value, use_decimal=True, ensure_ascii=False, sort_keys=sort_keys, **layout)


def pretty(text: str) -> str:
    return dumps(loads(text), pretty=True)
