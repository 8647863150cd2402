"""Metadata is in setup.cfg. This file only adds the compiled modules.

Pure-Python modules on every inbound message's path are compiled to C extensions by mypyc (same
source, same results, checked by tests/test_compiled.py): gateway/hl7/translate.py, which runs the
maps, and gateway/fhir/indexer.py with the search-parameter extractors and date ranges it uses,
which make the search-index rows. GATEWAY_COMPILE=0 builds the plain Python package instead (no C
compiler needed). An editable install puts each extension beside its source; gateway/compiled.py
runs them all from source while any is older than its source."""

import os
import sys

from setuptools import setup

COMPILED = ["gateway/hl7/translate.py", "gateway/fhir/indexer.py", "gateway/fhir/searchparams.py",
            "gateway/fhir/dates.py"]

# Only commands that build need the extensions: pip also runs this file for the requirements and the
# metadata, and mypycify type-checks the modules (about a minute) each time it is called.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}

ext_modules = []
if os.environ.get("GATEWAY_COMPILE", "1") != "0" and BUILDING.intersection(sys.argv[1:]):
    from mypyc.build import mypycify

    ext_modules = mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED], opt_level="3",
                             separate=True)  # one library per module, beside it (no top-level module)

setup(ext_modules=ext_modules)
