"""jsonio writes with orjson: the same text simplejson wrote, for the whole corpus and the edge cases."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import simplejson

from gateway.fhir import jsonio

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir"


def _simplejson(value: Any, pretty: bool, sort_keys: bool) -> str:
    if pretty:
        return simplejson.dumps(value, use_decimal=True, indent=2, ensure_ascii=False, sort_keys=sort_keys)
    return simplejson.dumps(value, use_decimal=True, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)


def test_every_corpus_file_is_written_as_simplejson_wrote_it() -> None:
    files = sorted(CORPUS.rglob("*.json"))
    assert len(files) > 100
    decimals = 0
    for path in files:
        value = jsonio.loads(path.read_bytes())
        decimals += path.read_text(encoding="utf-8").count(".0,")
        for pretty in (False, True):
            for sort_keys in (False, True):
                assert jsonio.dumps(value, pretty, sort_keys) == _simplejson(value, pretty, sort_keys), path
    assert decimals > 0  # the corpus has decimals with trailing zeros, which must survive


class _Text(str):
    pass


@pytest.mark.parametrize("value", [
    Decimal("1.50"), Decimal("-0.000"), Decimal("1E+2"), Decimal("123456789012345678901234567890.1"),
    {"valueQuantity": {"value": Decimal("5.0"), "unit": "mg"}},
    2**63, 2**64, -(2**70),  # beyond orjson's 64 bits: written by simplejson
    {1: "a"},  # a key that is not a string
    _Text("an HL7 explicit null is a str subclass"),
    "é \u2028 \x00 \U0001f600", [1, (2, 3)], True, None, 0.1, -0.0,
])
def test_edge_cases_match(value: Any) -> None:
    for pretty in (False, True):
        assert jsonio.dumps(value, pretty) == _simplejson(value, pretty, False)


def test_decimals_keep_their_digits_through_a_round_trip() -> None:
    text = '{"value":1.50,"low":0.000,"big":1E+2}'
    assert jsonio.dumps(jsonio.loads(text)) == text


def test_what_neither_can_write_is_refused() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"when": object()})
