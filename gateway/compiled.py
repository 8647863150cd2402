"""The modules setup.py compiles with mypyc, and a guard for editable installs.

An editable install builds each extension beside its source, and Python prefers the extension. One
older than its source (the source edited or checked out since) would run the old code; so the
packages that hold compiled modules call prefer_fresh_sources() first: when any build is stale,
every module of COMPILED is imported from its source (compiled modules call each other directly,
so a mix would still run old code), with a warning saying how to rebuild."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

COMPILED = ("gateway.hl7.translate", "gateway.fhir.indexer", "gateway.fhir.searchparams", "gateway.fhir.dates")

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent


def is_compiled(module: object) -> bool:
    """Whether an imported module runs from an extension rather than from its source."""
    return not str(getattr(module, "__file__", "")).endswith(".py")


def _source(name: str) -> Path:
    return _HERE.joinpath(*name.split(".")[1:]).with_suffix(".py")


def _stale(name: str) -> bool:
    source = _source(name)
    builds = list(source.parent.glob(f"{source.stem}.cpython-*"))
    return bool(builds) and source.exists() and min(b.stat().st_mtime for b in builds) < source.stat().st_mtime


class _Sources(importlib.abc.MetaPathFinder):
    """Finds each module of COMPILED at its source, ahead of the extension beside it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_file_location(fullname, _source(fullname)) if fullname in COMPILED else None


def prefer_fresh_sources() -> None:
    """Before the compiled modules are imported: if any extension is older than its source, or
    GATEWAY_COMPILE=0 is set, have every module of COMPILED imported from its source."""
    if any(isinstance(finder, _Sources) for finder in sys.meta_path):
        return
    if os.environ.get("GATEWAY_COMPILE") != "0":  # else asked for: the plain Python package, at run time too
        stale = [name for name in COMPILED if _stale(name)]
        if not stale:
            return
        log.warning("built before their source changed: %s; running every compiled module from its source "
                    "(slower) until `pip install -e .` builds them again", ", ".join(stale))
    sys.meta_path.insert(0, _Sources())


def report() -> list[tuple[str, bool]]:
    """Each module of COMPILED, and whether it runs compiled in this installation."""
    return [(name, is_compiled(importlib.import_module(name))) for name in COMPILED]


def summary() -> str:
    """report() on one line, for the benchmarks' output."""
    return ", ".join(f"{name} {'compiled' if done else 'from source'}" for name, done in report())


def main() -> int:
    """`python -m gateway.compiled`: which modules run compiled; exit status 1 when one does not
    (CI runs it after installing, so that a build that fell back to the source does not go unseen)."""
    rows = report()
    for name, compiled in rows:
        print(f"{name}: {'compiled' if compiled else 'source (not compiled)'}")
    return 0 if all(compiled for _, compiled in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
