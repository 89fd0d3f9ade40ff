"""ICD-10-CM facts from the code-set data package (``simple-icd-10-cm``), loaded once, lazily.

Every title the plugin shows or writes comes from here, never from a typed
string (SPEC §1: the source document mistitles M62.561).  The package takes
about two seconds to import, so nothing imports it until a title is needed.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from types import ModuleType

__all__ = ["SYSTEM", "title", "is_valid", "is_billable", "excludes1_codes", "release", "normalize"]

#: the FHIR system URI of ICD-10-CM
SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"

_CODE_IN_NOTE = re.compile(r"\(([A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?)(-?)\)")


@lru_cache(maxsize=1)
def _data() -> ModuleType:
    import simple_icd_10_cm as cm  # deferred: the data load is slow

    return cm  # type: ignore[no-any-return]  # the package ships no type hints


def normalize(code: str) -> str:
    """Upper-case, trimmed code with its dot (``m62561`` → ``M62.561``)."""
    code = code.strip().upper()
    if "." not in code and len(code) > 3:
        code = code[:3] + "." + code[3:]
    return code


def is_valid(code: str) -> bool:
    return bool(code) and _data().is_valid_item(normalize(code))


def is_billable(code: str) -> bool:
    """A leaf of the tabular list is the only thing a claim may carry."""
    return is_valid(code) and _data().is_leaf(normalize(code))


@lru_cache(maxsize=4096)
def title(code: str) -> str:
    """The official title of a code, as the tabular list spells it."""
    return str(_data().get_description(normalize(code)))


@lru_cache(maxsize=256)
def excludes1_codes(code: str) -> tuple[tuple[str, str, bool], ...]:
    """The codes a code's Excludes1 note names: (code, note text, whole-subtree flag).

    The note reads e.g. "sarcopenia (M62.84)" or "myalgia (M79.1-)"; a trailing
    dash means the code and everything below it.
    """
    out: list[tuple[str, str, bool]] = []
    for note in _data().get_excludes1(normalize(code)):
        for match in _CODE_IN_NOTE.finditer(note):
            out.append((match.group(1), note, match.group(2) == "-"))
    return tuple(out)


@lru_cache(maxsize=1)
def release() -> str:
    """The data release, read from the package's own tabular file name (e.g. "April-1-2026")."""
    folder = Path(str(_data().__file__)).parent / "data"
    for path in sorted(folder.glob("icd10c*-tabular-*.xml")):
        found = re.search(r"tabular-(.+)\.xml$", path.name)
        if found:
            return f"ICD-10-CM tabular {found.group(1)}"
    return "ICD-10-CM (simple-icd-10-cm)"
