"""The fast parse (hl7lw) against python-hl7, the reference for what a parse must yield.

For every message of the corpus and for generated messages: the same segments in the same order,
the same number of fields, and in every field the same repetitions, components and subcomponents
(escaped text, as both keep it) and the same unescaped values through the accessors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hl7
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.hl7 import parse

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hl7" / "fhir-converter"
CORPUS_FILES = sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


def expand(field: Any) -> list[list[list[str]]]:
    """python-hl7's field with every level made explicit (it collapses a level without separators
    into a plain string)."""
    repetitions = []
    for repetition in field:
        if isinstance(repetition, str):
            repetitions.append([[repetition]])
            continue
        repetitions.append([[c] if isinstance(c, str) else [str(s) for s in c] for c in repetition])
    return repetitions


def assert_same_parse(text: str) -> int:
    """Compare both parses of one message; returns the number of fields compared."""
    ours, reference = parse.parse(text), hl7.parse(text)
    assert [s.name for s in ours] == [str(s[0][0]) for s in reference]
    compared = 0
    for mine, theirs in zip(ours, reference, strict=True):
        assert len(mine.fields) == len(theirs) - 1, mine.name
        for number in range(1, len(theirs)):
            if mine.name == "MSH" and number <= 2:
                assert mine[number] == str(theirs[number])
                continue
            assert parse.split_field(mine[number], ours.separators) == expand(theirs[number]), \
                f"{mine.name}-{number}"
            compared += 1
    return compared


@pytest.mark.skipif(not CORPUS_FILES, reason="../shared/corpus is not beside the checkout")
def test_the_whole_corpus_parses_the_same() -> None:
    compared = 0
    for path in CORPUS_FILES:
        for text in parse.split_batch(parse.normalize(parse.decode(path.read_bytes()))):
            compared += assert_same_parse(text)
    assert compared > 5_000


ENCODINGS = [("|", "^~\\&"), ("|", "^~\\&#"), ("|", "*~\\&"), ("!", "@#$%"), ("|", "^~/&")]
ESCAPES = ["F", "S", "T", "R", "E", "X41", "H", "N", ".br"]


@st.composite
def messages(draw: st.DrawFn) -> str:
    field_sep, encoding = draw(st.sampled_from(ENCODINGS))
    component, repetition, escape, subcomponent = encoding[:4]  # a fifth is the truncation character
    text_char = st.sampled_from("abcXYZ019 .,-:/'")
    piece = st.one_of(
        st.text(text_char, min_size=0, max_size=6),
        st.sampled_from(ESCAPES).map(lambda e: f"{escape}{e}{escape}"),
        st.just('""'),
    )
    subcomponents = st.lists(piece, min_size=1, max_size=3).map(subcomponent.join)
    components = st.lists(subcomponents, min_size=1, max_size=4).map(component.join)
    repetitions = st.lists(components, min_size=1, max_size=3).map(repetition.join)
    fields = st.lists(repetitions, min_size=1, max_size=12).map(field_sep.join)
    names = st.sampled_from(["PID", "PV1", "OBX", "NTE", "ZPD", "ZX1", "AL1"])
    body = draw(st.lists(st.tuples(names, fields), min_size=1, max_size=8))
    msh = field_sep.join(["MSH" + field_sep + encoding, "APP", "FAC", "", "", "20240101",
                          "", f"ADT{component}A01", "CTRL", "P", "2.5"])
    return "\r".join([msh] + [name + field_sep + content for name, content in body]) + "\r"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_messages_parse_the_same(text: str) -> None:
    assert_same_parse(text)
    ours, reference = parse.parse(text), hl7.parse(text)
    # unescaped values through the accessors: the first component of every field
    for mine, theirs in zip(ours.segments[1:], reference[1:], strict=True):
        for number in range(1, len(theirs)):
            value = parse.get(mine, f"{mine.name}-{number}.1.1")
            raw = expand(theirs[number])[0][0][0]
            expected = None if raw == "" else (parse.NULL if raw == '""' else parse.unescape(raw, ours.separators))
            assert value == expected
