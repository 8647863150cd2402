"""store.same_content decides whether an update writes a new version; its orjson canonical form must
decide exactly as the reference (jsonio's simplejson text, sorted) on real resources."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir import jsonio
from gateway.fhir.store import same_content

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "r4-examples"
IGNORED = ("versionId", "lastUpdated")


def reference(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def canonical(body: dict[str, Any]) -> str:
        meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in IGNORED}
        rest = {k: v for k, v in body.items() if k != "meta"}
        return jsonio.dumps({**rest, "meta": meta} if meta else rest, sort_keys=True)

    return canonical(a) == canonical(b)


def _examples() -> list[dict[str, Any]]:
    if not EXAMPLES.is_dir():
        pytest.skip("the R4 examples are not here")
    found = []
    for path in sorted(EXAMPLES.glob("*.json")):
        body = jsonio.loads(path.read_text(encoding="utf-8"))
        if isinstance(body, dict) and "resourceType" in body:
            found.append(body)
    return found


def _retype_numbers(value: Any, how: str) -> Any:
    """Every number changed in one way: 'precision' appends a zero to decimals (another value for
    FHIR), 'decimal' turns integers into integral Decimals (the same JSON text)."""
    if isinstance(value, dict):
        return {k: _retype_numbers(v, how) for k, v in value.items()}
    if isinstance(value, list):
        return [_retype_numbers(v, how) for v in value]
    if how == "precision" and isinstance(value, Decimal) and value.is_finite() and "E" not in str(value):
        return Decimal(str(value) + ("0" if "." in str(value) else ".0"))
    if how == "decimal" and isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return value


def test_same_content_decides_as_the_reference_on_every_r4_example() -> None:
    examples = _examples()
    assert len(examples) > 100
    checked = 0
    for index, body in enumerate(examples):
        other = examples[(index + 1) % len(examples)]
        variants = [
            jsonio.loads(jsonio.dumps(body)),
            {**jsonio.loads(jsonio.dumps(body)), "meta": {"versionId": "99", "lastUpdated": "2020-01-01T00:00:00Z"}},
            _retype_numbers(body, "precision"),
            _retype_numbers(body, "decimal"),
            other,
            {**body, "text": {"status": "generated", "div": "<div>\u0000</div>"}},
        ]
        for variant in variants:
            assert same_content(body, variant) == reference(body, variant), (body.get("id"), variant.get("id"))
            checked += 1
    assert checked == 6 * len(examples)


def test_decimals_keep_their_digits_and_a_nul_in_a_string_is_not_a_decimal() -> None:
    assert same_content({"resourceType": "X", "v": 1}, {"resourceType": "X", "v": Decimal("1")})
    assert not same_content({"resourceType": "X", "v": Decimal("1.5")}, {"resourceType": "X", "v": Decimal("1.50")})
    assert not same_content({"resourceType": "X", "v": Decimal("1.5")}, {"resourceType": "X", "v": "\u00001.5"})
    assert same_content({"resourceType": "X", "v": 2**70}, {"resourceType": "X", "v": 2**70})
