"""JSON in and out of the store.

Decimals are parsed as Decimal and written back with the digits they came with: FHIR gives
trailing zeros meaning (1.50 is not 1.5), and a float round trip would drop them.
"""

from __future__ import annotations

from typing import Any

import simplejson


def loads(data: str | bytes) -> Any:
    return simplejson.loads(data, use_decimal=True)


def dumps(value: Any, pretty: bool = False, sort_keys: bool = False) -> str:
    if pretty:
        return simplejson.dumps(value, use_decimal=True, indent=2, ensure_ascii=False, sort_keys=sort_keys)
    return simplejson.dumps(value, use_decimal=True, separators=(",", ":"), ensure_ascii=False,
                            sort_keys=sort_keys)


def pretty(text: str) -> str:
    return dumps(loads(text), pretty=True)
