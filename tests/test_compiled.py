"""The modules setup.py compiles with mypyc give exactly what their source gives.

CI installs the compiled package (and `python -m gateway.compiled` fails it when a module fell back
to its source); every other test then runs the compiled code. This one runs the same work in a
second process with GATEWAY_COMPILE=0 (every compiled module imported from its source) and compares
the two on the whole corpus: every HL7 message's translation (resources, ids, clears, merges,
errors) and the search-index rows and patient compartments of every translated resource and of
every official R4 example."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import compiled

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
BASE = "https://gateway.example.org/fhir"


def corpus_outputs() -> dict[str, Any]:
    """What the compiled modules (or their source) make of the whole corpus, and how they ran."""
    from gateway.fhir import indexer
    from gateway.hl7 import parse, translate

    files = sorted((CORPUS / "hl7" / "fhir-converter").glob("*.hl7"))
    assert len(files) > 100, "the HL7 corpus is missing"
    translations: dict[str, Any] = {}
    resources: list[dict[str, Any]] = []
    for path in files:
        try:
            result = translate.translate(parse.parse(parse.normalize(parse.decode(path.read_bytes()))))
        except Exception as exc:
            translations[path.name] = (type(exc).__name__, str(exc), getattr(exc, "code", None),
                                       getattr(exc, "location", None))
            continue
        translations[path.name] = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        resources += result.resources
    for path in sorted((CORPUS / "fhir" / "r4-examples").glob("*.json")):
        resource = json.loads(path.read_text())
        if resource.get("resourceType") == "Bundle":
            resources += [e["resource"] for e in resource.get("entry", []) if "resource" in e]
        else:
            resources.append(resource)
    # as stored: every resource has its id; rows in a stable order (some come from sets, whose order
    # follows the process's string hashing, so differs between two processes; the store ignores it)
    index = {f"{i} {r['resourceType']}/{r['id']}": ({kind: sorted(rows, key=repr) for kind, rows in
                                                     indexer.index_rows(r, BASE).items()},
                                                    indexer.compartment_patients(r, BASE))
             for i, r in enumerate(resources) if r.get("id")}
    return {"modules": compiled.report(), "translations": translations, "index": index}


def test_compiled_modules_give_what_their_source_gives() -> None:
    here = corpus_outputs()
    if not all(done for _, done in here["modules"]):
        pytest.skip("the modules run from their source in this installation: nothing to compare")
    env = {**os.environ, "GATEWAY_COMPILE": "0"}
    run = subprocess.run([sys.executable, "-m", "tests.test_compiled"], env=env, capture_output=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    source = pickle.loads(run.stdout)
    assert source["modules"] == [(name, False) for name in compiled.COMPILED]
    assert sum(isinstance(t, dict) for t in here["translations"].values()) >= 39  # the in-scope messages
    assert len(here["index"]) > 500
    assert here["translations"].keys() == source["translations"].keys()
    for name, translation in here["translations"].items():
        assert translation == source["translations"][name], name
    assert here["index"].keys() == source["index"].keys()
    for where, rows in here["index"].items():
        assert rows == source["index"][where], where


def test_gateway_compile_0_runs_the_source_and_says_so_nowhere_else() -> None:
    code = "from gateway import compiled; print(all(not done for _, done in compiled.report()))"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GATEWAY_COMPILE": "0"},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert "built before" not in run.stderr  # asked for, not stale: no warning


def test_setup_compiles_exactly_the_modules_the_gateway_checks() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets))
    assert listed == [name.replace(".", "/") + ".py" for name in compiled.COMPILED]


def test_a_build_older_than_its_source_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_HERE", tmp_path)
    (tmp_path / "hl7").mkdir()
    source, build = tmp_path / "hl7" / "translate.py", tmp_path / "hl7" / "translate.cpython-311-x86_64-linux-gnu.so"
    source.write_text("")
    build.write_bytes(b"")
    os.utime(source, (1000, 1000))
    os.utime(build, (2000, 2000))
    assert not compiled._stale("gateway.hl7.translate")
    os.utime(source, (3000, 3000))  # edited after the build
    assert compiled._stale("gateway.hl7.translate")
    build.unlink()
    assert not compiled._stale("gateway.hl7.translate")  # nothing built: the source is what runs anyway
    spec = compiled._Sources().find_spec("gateway.hl7.translate")
    assert spec is not None and spec.origin == str(source)
    assert compiled._Sources().find_spec("gateway.hl7.parse") is None  # not compiled: left to the usual finders


if __name__ == "__main__":  # the second process of the comparison: its outputs, pickled, on stdout
    sys.stdout.buffer.write(pickle.dumps(corpus_outputs()))
