"""The modules setup.py compiles with mypyc, and a guard for editable installs.

An editable install builds each extension beside its source, and Python prefers the extension. One
older than its source (the source edited or checked out since) would run the old code; the package
that holds such a module calls prefer_fresh_source() first, which loads the source instead, with a
warning saying how to rebuild."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

COMPILED = ("gateway.hl7.translate", "gateway.fhir.indexer")

log = logging.getLogger(__name__)


def is_compiled(module: object) -> bool:
    """Whether an imported module runs from an extension rather than from its source."""
    return not str(getattr(module, "__file__", "")).endswith(".py")


def prefer_fresh_source(name: str) -> None:
    """Before `name` (a dotted module of COMPILED) is first imported: if its extension is older
    than its source, import the source under that name."""
    if name in sys.modules:
        return
    package, _, module = name.rpartition(".")
    folder = Path(__file__).parent.joinpath(*package.split(".")[1:])
    source = folder / f"{module}.py"
    builds = list(folder.glob(f"{module}.cpython-*"))
    if not builds or not source.exists() or min(b.stat().st_mtime for b in builds) >= source.stat().st_mtime:
        return
    log.warning("the compiled %s is older than its source: using the source (slower); rebuild with "
                "`pip install -e .`", name)
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise


def report() -> list[tuple[str, bool]]:
    """Each module of COMPILED, and whether it runs compiled in this installation."""
    return [(name, is_compiled(importlib.import_module(name))) for name in COMPILED]


def main() -> int:
    """`python -m gateway.compiled`: which modules run compiled; exit status 1 when one does not
    (CI runs it after installing, so that a build that fell back to the source does not go unseen)."""
    rows = report()
    for name, compiled in rows:
        print(f"{name}: {'compiled' if compiled else 'source (not compiled)'}")
    return 0 if all(compiled for _, compiled in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
