"""The modules setup.py compiles with mypyc give exactly what their source gives.

CI installs the compiled package (and `python -m gateway.compiled` fails it when a module fell back
to its source); every other test then runs the compiled code. These tests load each module's
source beside it, under another name, and compare the two on the whole corpus: the HL7 messages'
translations (resources, ids, clears, merges, errors) and the search-index rows and patient
compartments of every translated resource and of the official R4 examples."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway import compiled
from gateway.fhir import indexer
from gateway.hl7 import parse, translate

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
BASE = "https://gateway.example.org/fhir"


def _source_of(module: ModuleType) -> Iterator[ModuleType]:
    if not compiled.is_compiled(module):
        pytest.skip(f"{module.__name__} runs from its source in this installation: nothing to compare")
    name = f"_source_of_{module.__name__.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, ROOT / (module.__name__.replace(".", "/") + ".py"))
    assert spec is not None and spec.loader is not None
    source = importlib.util.module_from_spec(spec)
    sys.modules[name] = source  # its dataclasses look their module up while being made
    try:
        spec.loader.exec_module(source)
        assert compiled.is_compiled(module) and not compiled.is_compiled(source)
        yield source
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def translate_source() -> Iterator[ModuleType]:
    yield from _source_of(translate)


@pytest.fixture(scope="module")
def indexer_source() -> Iterator[ModuleType]:
    yield from _source_of(indexer)


def _messages() -> list[tuple[str, str]]:
    files = sorted((CORPUS / "hl7" / "fhir-converter").glob("*.hl7"))
    assert len(files) > 100, "the HL7 corpus is missing"
    return [(path.name, parse.normalize(parse.decode(path.read_bytes()))) for path in files]


def _outcome(module: ModuleType, text: str) -> Any:
    """A translation as plain data, or its error as (class name, message, code, location)."""
    try:
        result = module.translate(parse.parse(text))
    except Exception as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "code", None), getattr(exc, "location", None))
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


def test_installed_modules_report_how_they_run() -> None:
    names = [name for name, _ in compiled.report()]
    assert names == list(compiled.COMPILED)
    assert compiled.is_compiled(translate) == translate.__file__.endswith(".so")


def test_compiled_translation_is_the_sources_on_the_whole_corpus(translate_source: ModuleType) -> None:
    translated = 0
    for name, text in _messages():
        expected = _outcome(translate_source, text)
        assert _outcome(translate, text) == expected, name
        translated += isinstance(expected, dict)
    assert translated >= 39  # the in-scope messages; the rest are refused alike


def test_compiled_index_rows_are_the_sources(indexer_source: ModuleType) -> None:
    resources = [r for _, text in _messages()
                 if isinstance(outcome := _outcome(translate, text), dict) for r in outcome["resources"]]
    for path in sorted((CORPUS / "fhir" / "r4-examples").glob("*.json")):
        resource = json.loads(path.read_text())
        if resource.get("resourceType") == "Bundle":
            resources += [e["resource"] for e in resource.get("entry", []) if "resource" in e]
        else:
            resources.append(resource)
    resources = [r for r in resources if r.get("id")]  # as stored: every resource has its id
    assert len(resources) > 500
    for resource in resources:
        where = f"{resource.get('resourceType')}/{resource.get('id')}"
        assert indexer.index_rows(resource, BASE) == indexer_source.index_rows(resource, BASE), where
        patients = indexer_source.compartment_patients(resource, BASE)
        assert indexer.compartment_patients(resource, BASE) == patients, where
