"""SMART scope grammar, v1 and v2, and the subset rules registration and consent rely on."""

from __future__ import annotations

from gateway.smart_auth.scopes import (
    ResourceScope,
    allowed_subset,
    is_within,
    narrowing_options,
    parse_scope,
    parse_scopes,
)

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


def test_v1_actions_map_to_v2_letters() -> None:
    assert parse_scope("patient/Observation.read") == ResourceScope("patient", "Observation", frozenset("rs"),
                                                                    text="patient/Observation.read")
    assert parse_scope("user/*.write").letters == frozenset("cud")  # type: ignore[union-attr]
    assert parse_scope("system/*.*").letters == frozenset("cruds")  # type: ignore[union-attr]


def test_v2_letters_in_order_only() -> None:
    assert parse_scope("patient/*.rs").letters == frozenset("rs")  # type: ignore[union-attr]
    assert parse_scope("user/Patient.cruds").letters == frozenset("cruds")  # type: ignore[union-attr]
    for bad in ("patient/*.sr", "patient/*.rr", "patient/*.x", "patient/*.", "patient/observation.rs",
                "clinician/*.rs", "patient/*.rs?", "patient/*.rs?category=x"):
        assert parse_scope(bad) is None, bad


def test_granular_scopes() -> None:
    scope = parse_scope(f"patient/Observation.rs?category={LAB}")
    assert isinstance(scope, ResourceScope)
    assert scope.query == (("category", "http://terminology.hl7.org/CodeSystem/observation-category",
                            "laboratory"),)
    plain = parse_scope("patient/Observation.rs?code=1234-5")
    assert plain.query == (("code", None, "1234-5"),)  # type: ignore[union-attr]
    assert parse_scope("patient/Observation.rs?category=a,b") is None  # OR lists are not a scope


def test_parse_scopes_sorts_kinds() -> None:
    parsed = parse_scopes("launch launch/patient openid fhirUser offline_access patient/*.rs bogus user/Foo.zz")
    assert parsed.other == {"launch", "launch/patient", "openid", "fhirUser", "offline_access"}
    assert [s.text for s in parsed.resources] == ["patient/*.rs"]
    assert parsed.unknown == {"bogus", "user/Foo.zz"}


def test_within() -> None:
    lab = parse_scope(f"patient/Observation.rs?category={LAB}")
    assert isinstance(lab, ResourceScope)
    assert lab.within(parse_scope("patient/*.rs"))  # type: ignore[arg-type]
    assert lab.within(parse_scope("patient/Observation.read"))  # type: ignore[arg-type]
    assert not lab.within(parse_scope("user/*.rs"))  # type: ignore[arg-type]
    assert not parse_scope("patient/*.rs").within(parse_scope("patient/Observation.rs"))  # type: ignore
    assert not parse_scope("patient/Observation.rs").within(lab)  # type: ignore[union-attr]
    assert not parse_scope("patient/Observation.cruds").within(parse_scope("patient/*.rs"))  # type: ignore


def test_allowed_subset_keeps_request_order() -> None:
    registered = "launch/patient openid patient/*.rs"
    assert allowed_subset("openid patient/Observation.read system/*.rs launch patient/*.cruds", registered) == \
        ["openid", "patient/Observation.read"]


def test_consent_narrowing() -> None:
    broad = parse_scope("patient/*.rs")
    assert isinstance(broad, ResourceScope)
    options = narrowing_options(broad)
    assert f"patient/Observation.rs?category={LAB}" in options
    assert all(is_within(o, ["patient/*.rs"]) for o in options)
    assert not is_within("patient/*.cruds", ["patient/*.rs"])
    assert not is_within("openid", ["patient/*.rs"])
