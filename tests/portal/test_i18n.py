"""Spanish is complete: every string the portal and sign-in pages show has a translation, and the
compiled catalog the app loads matches the .po file it was compiled from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "gateway" / "portal" / "translations" / "es" / "LC_MESSAGES"
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "lazy_gettext": None, "_l": None}


def _source_messages() -> set[str]:
    with open(ROOT / "babel.cfg") as cfg:
        method_map, options_map = parse_mapping_cfg(cfg)
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
            str(ROOT), method_map, options_map, keywords=KEYWORDS):
        found.add(message[0] if isinstance(message, tuple) else message)
    return {m for m in found if m}


def test_every_shown_string_has_a_spanish_translation() -> None:
    with open(CATALOG / "messages.po", "rb") as f:
        po = read_po(f)
    translated = {m.id if isinstance(m.id, str) else m.id[0] for m in po if m.id and m.string and not m.fuzzy}
    missing = sorted(_source_messages() - translated)
    assert not missing, f"untranslated (run the README's pybabel commands): {missing[:20]}"


def test_the_compiled_catalog_is_the_po_file() -> None:
    def plain(value: Any) -> Any:  # plural forms come back as lists from one reader, tuples from the other
        return tuple(value) if isinstance(value, list | tuple) else value

    with open(CATALOG / "messages.po", "rb") as f:
        po = {plain(m.id): plain(m.string) for m in read_po(f) if m.id and m.string and not m.fuzzy}
    with open(CATALOG / "messages.mo", "rb") as f:
        mo = {plain(m.id): plain(m.string) for m in read_mo(f) if m.id}
    assert po == mo, "messages.mo is stale: run `pybabel compile -d gateway/portal/translations`"
