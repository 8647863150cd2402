"""SMART scope grammar, v1 and v2, parsed once into values the access policy and consent page use.

    patient/Observation.read                       v1: read = r s, write = c u d, * = c r u d s
    user/*.cruds                                   v2: letters c r u d s, in that order, no repeats
    patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory

A granular scope (`?param=value`) narrows a resource scope to resources matching a token search
parameter; several parameters AND. Anything this module cannot read is kept aside as unknown and
grants nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

LETTERS = "cruds"
V1_ACTIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(LETTERS)}
CONTEXTS = ("patient", "user", "system")
LAUNCH_SCOPES = frozenset({"launch", "launch/patient", "launch/encounter"})
IDENTITY_SCOPES = frozenset({"openid", "fhirUser", "profile"})
REFRESH_SCOPES = frozenset({"offline_access", "online_access"})
OTHER_SCOPES = LAUNCH_SCOPES | IDENTITY_SCOPES | REFRESH_SCOPES

# The interactions of gateway.access mapped onto SMART v2 letters.
INTERACTION_LETTER = {
    "read": "r", "vread": "r", "history": "r", "everything": "r", "search": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
}

_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(\?.+)?$")
_V2_LETTERS = re.compile(r"^c?r?u?d?s?$")

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient, user or system
    resource_type: str  # a type or "*"
    letters: frozenset[str]
    # Granular restriction: (search parameter, system or None, code) triples that must all match.
    query: tuple[tuple[str, str | None, str], ...] = ()
    text: str = ""

    def covers_type(self, resource_type: str | None) -> bool:
        return self.resource_type == "*" or self.resource_type == resource_type

    def within(self, other: ResourceScope) -> bool:
        """True when everything this scope grants is also granted by `other`."""
        return (self.context == other.context
                and other.covers_type(self.resource_type)
                and self.letters <= other.letters
                and set(other.query) <= set(self.query))


@dataclass(frozen=True)
class ScopeSet:
    resources: tuple[ResourceScope, ...]
    other: frozenset[str]
    unknown: frozenset[str]

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.resources] + sorted(self.other)

    def __str__(self) -> str:
        return " ".join(self.texts)

    def has(self, name: str) -> bool:
        return name in self.other


def parse_scope(text: str) -> ResourceScope | str | None:
    """A ResourceScope, the name of a non-resource scope, or None when it cannot be read."""
    if text in OTHER_SCOPES:
        return text
    m = _RESOURCE_SCOPE.match(text)
    if not m:
        return None
    context, resource_type, action, query_text = m.groups()
    if action in V1_ACTIONS:
        letters = V1_ACTIONS[action]
    elif _V2_LETTERS.match(action):
        letters = frozenset(action)
    else:
        return None
    query: list[tuple[str, str | None, str]] = []
    if query_text:
        if resource_type == "*":
            return None  # a search parameter only means something for one resource type
        pairs = parse_qsl(query_text[1:], keep_blank_values=True)
        if not pairs:
            return None
        for name, value in pairs:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or not value or "," in value:
                return None
            system, _, code = value.rpartition("|")
            query.append((name, system or None, code))
    return ResourceScope(context, resource_type, letters, tuple(sorted(query)), text)


def parse_scopes(scope: str | None) -> ScopeSet:
    resources: list[ResourceScope] = []
    other: set[str] = set()
    unknown: set[str] = set()
    for text in dict.fromkeys((scope or "").split()):
        parsed = parse_scope(text)
        if parsed is None:
            unknown.add(text)
        elif isinstance(parsed, str):
            other.add(parsed)
        else:
            resources.append(parsed)
    return ScopeSet(tuple(resources), frozenset(other), frozenset(unknown))


def allowed_subset(requested: str | None, registered: str | None) -> list[str]:
    """The requested scopes that fall within what a client is registered for, in request order."""
    allowed = parse_scopes(registered)
    out: list[str] = []
    for text in dict.fromkeys((requested or "").split()):
        parsed = parse_scope(text)
        if parsed is None:
            continue
        if isinstance(parsed, str):
            if parsed in allowed.other:
                out.append(text)
        elif any(parsed.within(r) for r in allowed.resources):
            out.append(text)
    return out


def narrowing_options(scope: ResourceScope) -> list[str]:
    """Narrower scopes a consent page offers in place of a broad one (laboratory results only...)."""
    if scope.query or not scope.covers_type("Observation") or not scope.letters & {"r", "s"}:
        return []
    letters = "".join(c for c in LETTERS if c in scope.letters and c in "rs")
    return [f"{scope.context}/Observation.{letters}?category={OBSERVATION_CATEGORY}|{category}"
            for category in ("laboratory", "vital-signs")]


def is_within(granted: str, requested: list[str]) -> bool:
    """A scope a user ticked on the consent page must be one asked for, or narrower than one."""
    parsed = parse_scope(granted)
    if parsed is None:
        return False
    if isinstance(parsed, str):
        return parsed in requested
    return any(isinstance(r, ResourceScope) and parsed.within(r) for r in map(parse_scope, requested))
