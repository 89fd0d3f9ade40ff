"""ICD-10-CM facts from the code-set data package (``simple-icd-10-cm``), loaded once, lazily.

Every title the plugin shows or writes comes from here, never from a typed
string (SPEC §1: the source document mistitles M62.561).  The package parses its
tabular list on import, about 1.6 s of CPU, and every process paid it: the CLI,
the app, and in a population job the driver and the Spark workers' daemon.  So
the facts the plugin asks of it (each code's title, whether it is a leaf, its
Excludes1 notes) are written once to an index in the cache folder (``_cache``),
as JSON, under a key of the package's version and data files, and read from there
in 0.1 s; a missing, stale or unreadable index is rebuilt from the package.
Lookups follow the package's own (a code with or without its dot), and a test
holds the index to the package for every code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

from ._cache import cache_dir

__all__ = ["SYSTEM", "title", "is_valid", "is_billable", "excludes1_codes", "release", "normalize"]

#: the FHIR system URI of ICD-10-CM
SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"

_CODE_IN_NOTE = re.compile(r"\(([A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?)(-?)\)")
_PACKAGE = "simple_icd_10_cm"
#: one code's facts: (title, is a leaf, Excludes1 notes)
_Facts = tuple[str, bool, list[str]]


def _data_folder() -> Path:
    """The package's data folder, found without importing the package (the import is the slow part)."""
    spec = util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the ICD-10-CM data package ({_PACKAGE}) is not installed")
    return Path(spec.origin).parent / "data"


def _index_key(folder: Path) -> str:
    digest = hashlib.sha256(metadata.version(_PACKAGE).encode())
    for path in sorted(folder.iterdir()):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _from_package() -> dict[str, _Facts]:
    import simple_icd_10_cm as cm  # the slow import: only when the index is built

    return {c: (cm.get_description(c), cm.is_leaf(c), cm.get_excludes1(c)) for c in cm.get_all_codes(True)}


def _save(path: Path, facts: dict[str, _Facts]) -> None:
    """Write the index beside its final name and rename it there: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(facts, out, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@lru_cache(maxsize=1)
def _index() -> dict[str, _Facts]:
    folder = _data_folder()
    path = cache_dir() / f"icd10cm-{_index_key(folder)}.json"
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return {code: (t, leaf, notes) for code, (t, leaf, notes) in loaded.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # not built yet, or damaged (not JSON, or not the index's shape): build it
    facts = _from_package()
    try:
        _save(path, facts)
    except OSError:
        pass  # no writable cache: this process keeps what it built
    return facts


def _facts(code: str) -> _Facts | None:
    """The package's lookup: the dotted form of an undotted code first, else the code as given."""
    index = _index()
    if len(code) >= 4 and code[3] != ".":
        dotted = index.get(code[:3] + "." + code[3:])
        if dotted is not None:
            return dotted
    return index.get(code)


def normalize(code: str) -> str:
    """Upper-case, trimmed code with its dot (``m62561`` → ``M62.561``)."""
    code = code.strip().upper()
    if "." not in code and len(code) > 3:
        code = code[:3] + "." + code[3:]
    return code


def is_valid(code: str) -> bool:
    return bool(code) and _facts(normalize(code)) is not None


def is_billable(code: str) -> bool:
    """A leaf of the tabular list is the only thing a claim may carry."""
    found = _facts(normalize(code)) if code else None
    return found is not None and found[1]


@lru_cache(maxsize=4096)
def title(code: str) -> str:
    """The official title of a code, as the tabular list spells it."""
    found = _facts(normalize(code))
    if found is None:
        raise ValueError(f"{code} is not an ICD-10-CM code")
    return found[0]


@lru_cache(maxsize=256)
def excludes1_codes(code: str) -> tuple[tuple[str, str, bool], ...]:
    """The codes a code's Excludes1 note names: (code, note text, whole-subtree flag).

    The note reads e.g. "sarcopenia (M62.84)" or "myalgia (M79.1-)"; a trailing
    dash means the code and everything below it.
    """
    out: list[tuple[str, str, bool]] = []
    found = _facts(normalize(code))
    if found is None:
        raise ValueError(f"{code} is not an ICD-10-CM code")
    for note in found[2]:
        for match in _CODE_IN_NOTE.finditer(note):
            out.append((match.group(1), note, match.group(2) == "-"))
    return tuple(out)


@lru_cache(maxsize=1)
def release() -> str:
    """The data release, read from the package's own tabular file name (e.g. "April-1-2026")."""
    folder = _data_folder()
    for path in sorted(folder.glob("icd10c*-tabular-*.xml")):
        found = re.search(r"tabular-(.+)\.xml$", path.name)
        if found:
            return f"ICD-10-CM tabular {found.group(1)}"
    return "ICD-10-CM (simple-icd-10-cm)"
