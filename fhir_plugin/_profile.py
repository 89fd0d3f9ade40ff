"""Condition profiles: the clinical content of a code, loaded from ``profiles/<code>/``.

A profile is data (SPEC §2): the code, the documentation elements and their
evidence rules, red flags, code-fit rules and the phased protocol as an R4
PlanDefinition.  Adding a condition is adding a folder.  Loading validates
everything once — the shape against ``profiles/profile.schema.json`` (every
key the engine reads; an unknown or misspelt key fails closed), every
ICD-10-CM code against the code-set data, every rule kind against the kinds
the check knows, the PlanDefinition against the R4 model — so a bad profile
fails at start with the file and the field named, never half-way through a
patient.  Clinical defaults are profile data too (follow-up windows, the
referral), and the default profile is ``profiles/profiles.json``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fhir.resources.R4B.plandefinition import PlanDefinition
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.exceptions import best_match
from pydantic import ValidationError

from . import _icd10cm as icd
from ._errors import ProfileError, UsageError
from ._text import Terms, Vocabulary

__all__ = [
    "Profile",
    "Rule",
    "IcdSet",
    "Referral",
    "load_profile",
    "available_profiles",
    "profiles_root",
    "DEFAULT_PROFILE",
    "PROFILES_ENV",
]

#: element kinds the check implements; an unknown kind is refused at load (fail closed)
ELEMENT_KINDS = frozenset(
    {
        "evidence",
        "site",
        "laterality",
        "excludes1",
        "red-flag-screen",
        "care-plan",
        "follow-up",
        "repeated-observation",
        "all-of",
    }
)
SIDES = ("right", "left", "bilateral")
_CONDITION_FIELDS = {"onset", "onset-date", "severity"}
_TYPES = ("Condition", "Observation", "Encounter")


#: names a folder of profile folders to load instead of the shipped ones (a site's own profiles, tests);
#: the schemas and the default profile always come from the shipped folder
PROFILES_ENV = "FHIR_PLUGIN_PROFILES"


def _shipped_root() -> Path:
    """Where the shipped profiles are: inside the installed wheel, or at the top of a checkout."""
    packaged = resources.files("fhir_plugin") / "profiles"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "profiles"


def profiles_root() -> Path:
    """Where the profile folders are: ``$FHIR_PLUGIN_PROFILES`` when set, else the shipped ones."""
    override = os.environ.get(PROFILES_ENV)
    if not override:
        return _shipped_root()
    root = Path(override)
    if not root.is_dir():
        raise UsageError(f"{PROFILES_ENV} is set to {override}, which is not a folder")
    return root


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read the file: {exc.strerror or exc}", path=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path=str(path)
        ) from exc
    if not isinstance(data, dict):
        raise ProfileError("expected a JSON object", path=str(path))
    return data


# --- the JSON Schemas: every key the engine reads, unknown keys fail closed (SPEC §2) -------------

_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@lru_cache(maxsize=4)
def _validator(schema_name: str) -> Draft202012Validator:
    """The validator of one shipped schema (profiles/<schema_name>), built once."""
    return Draft202012Validator(_read_json(_shipped_root() / schema_name))


def _field_path(parts: Iterable[str | int]) -> str:
    """A JSON path as the messages write it: ``code_fit.rules[2].when.sitee``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _json_type(value: Any) -> str:
    for name, kind in (
        ("true or false", bool),
        ("an integer", int),
        ("a number", float),
        ("a string", str),
        ("a list", list),
        ("an object", dict),
    ):
        if isinstance(value, kind):
            return name
    return "null"


def _problem(error: SchemaViolation) -> tuple[str, str]:
    """(what is wrong, the field's path) for one schema violation, in words a profile author reads."""
    path: list[str | int] = list(error.absolute_path)
    instance, expected = error.instance, error.validator_value
    if error.validator == "required" and isinstance(instance, dict):
        missing = [k for k in expected if k not in instance]
        return "a required field is missing", _field_path(path + missing[:1])
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        unknown = sorted(k for k in instance if k not in known)
        return "unknown field (the schema does not define it)", _field_path(path + unknown[:1])
    if error.validator == "type":
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in ([expected] if isinstance(expected, str) else expected))
        return f"expected {wanted}, found {_json_type(instance)}", _field_path(path)
    if error.validator in ("enum", "const"):
        allowed = expected if error.validator == "enum" else [expected]
        found = json.dumps(instance) if isinstance(instance, (str, int, float, type(None))) else _json_type(instance)
        return f"expected one of {', '.join(json.dumps(v) for v in allowed)}, found {found}", _field_path(path)
    if error.validator == "minProperties":
        return "must not be empty", _field_path(path)
    return error.message, _field_path(path)


def _validate(data: dict[str, Any], schema_name: str, path: Path) -> None:
    """Raise ProfileError naming the file and the field when ``data`` breaks the shipped schema."""
    error = best_match(_validator(schema_name).iter_errors(data))
    if error is not None:
        message, where = _problem(error)
        raise ProfileError(message, path=str(path), field=where or None)


def _default_profile() -> str:
    """The default code, from profiles/profiles.json (shipped data, checked by its own schema)."""
    path = _shipped_root() / "profiles.json"
    index = _read_json(path)
    _validate(index, "profiles.schema.json", path)
    return str(index["default"])


#: the profile every way in uses when none is named: the plugin's mission code (profiles/profiles.json)
DEFAULT_PROFILE = _default_profile()


def available_profiles() -> list[str]:
    root = profiles_root()
    return sorted(p.name for p in root.iterdir() if (p / "profile.json").is_file()) if root.is_dir() else []


class IcdSet:
    """A set of ICD-10-CM codes written as "R32" (exact), "R15-" (and below) or "S00-T14" (category range)."""

    def __init__(self, entries: list[str], *, where: str, path: str) -> None:
        self.entries = tuple(entries)
        self._exact: set[str] = set()
        self._prefixes: list[str] = []
        self._ranges: list[tuple[str, str]] = []
        for raw in entries:
            entry = str(raw).strip().upper()
            if entry.endswith("-"):
                code = icd.normalize(entry[:-1])
                self._check(code, where, path)
                self._prefixes.append(code.replace(".", ""))
            elif "-" in entry:
                low, high = (icd.normalize(x) for x in entry.split("-", 1))
                self._check(low, where, path)
                self._check(high, where, path)
                self._ranges.append((low.replace(".", "")[:3], high.replace(".", "")[:3]))
            else:
                code = icd.normalize(entry)
                self._check(code, where, path)
                self._exact.add(code.replace(".", ""))

    @staticmethod
    def _check(code: str, where: str, path: str) -> None:
        if not icd.is_valid(code):
            raise ProfileError(f"{code} is not an ICD-10-CM code", path=path, field=where)

    def __contains__(self, code: object) -> bool:
        if not isinstance(code, str) or not code:
            return False
        bare = code.strip().upper().replace(".", "")
        if bare in self._exact or any(bare.startswith(p) for p in self._prefixes):
            return True
        return any(low <= bare[:3] <= high for low, high in self._ranges)

    def __bool__(self) -> bool:
        return bool(self.entries)


@dataclass(frozen=True)
class Rule:
    """What documents an element or a red flag: any one of its matchers."""

    terms: Terms
    codes: frozenset[str] = frozenset()  # SNOMED (or other) codes in code/bodySite/value
    loinc: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()  # Observation.category codes
    icd10cm: IcdSet | None = None  # Condition.code in this set
    condition_fields: tuple[str, ...] = ()  # onset / onset-date / severity on a Condition under review
    resource_types: tuple[str, ...] = _TYPES  # where keywords are searched
    with_value: bool = False  # an Observation must carry a value
    negated_counts: bool = True  # does a negated mention still document it?


@dataclass(frozen=True)
class Referral:
    """The referral the draft CarePlan leads with when red flags hold the protocol (SPEC §4, §7.1)."""

    when: str  # the rule; "any-red-flag-present" is the one the engine implements (SPEC §4)
    activity: str  # the activity's code.text
    description: str  # the activity's description; "{red_flags}" becomes the flags present
    narrative: str  # the CarePlan narrative's line; "{red_flags}" as above
    #: each held phase activity's statusReason (SPEC §7.1: red flags hold the protocol); "{red_flags}" as above
    hold_reason: str = "On hold: red flags present ({red_flags}); the protocol waits for the evaluation."
    #: the CarePlan narrative's line saying the protocol waits
    hold_narrative: str = "The phased protocol is on hold until the referral's evaluation."

    def applies(self, present: Sequence[str]) -> bool:
        """Whether the red flags present (their ids) recommend a referral."""
        if self.when != "any-red-flag-present":  # the schema admits no other rule: fail closed
            raise ProfileError(f"unknown referral rule {self.when!r}", field="referral.when")
        return bool(present)

    def text(self, template: str, present: Sequence[str]) -> str:
        """``template`` with the red flags present written in (plain replace: no format-string surprises)."""
        return template.replace("{red_flags}", ", ".join(present))


@dataclass(frozen=True)
class Profile:
    """One condition profile, validated; ``raw`` keeps the JSON for anything the engine passes through."""

    code: str
    display: str
    folder: Path
    raw: dict[str, Any]
    family: IcdSet
    excludes1: tuple[tuple[str, str, bool], ...]
    elements: tuple[dict[str, Any], ...]
    rules: dict[str, Rule]
    red_flags: tuple[dict[str, Any], ...]
    flag_rules: dict[str, Rule]
    site_terms: dict[str, tuple[str, frozenset[str], Terms]]  # region -> (label, codes, terms)
    side_terms: dict[str, tuple[frozenset[str], Terms]]
    finding_terms: dict[str, tuple[frozenset[str], Terms]]
    plan_definition: dict[str, Any] = field(repr=False)
    vocabulary: Vocabulary = field(repr=False, default=None)  # type: ignore[assignment]
    #: per red flag with a time window, its ICD-10-CM codes (parsed once, here, not per check)
    recent_codes: dict[str, IcdSet] = field(repr=False, default_factory=dict)

    @property
    def region(self) -> str:
        return str(self.raw["site"]["region"])

    @property
    def expected_side(self) -> str | None:
        side = self.raw["laterality"].get("expected")
        return None if side is None else str(side)

    @property
    def expected_finding(self) -> str:
        return str(self.raw["findings"]["expected"])

    @property
    def referral(self) -> Referral:
        return Referral(**self.raw["referral"])

    def excludes1_match(self, code: str) -> tuple[str, str] | None:
        """(excluded code, note) when ``code`` falls under this profile's Excludes1 notes."""
        bare = icd.normalize(code)
        for excluded, note, subtree in self.excludes1:
            if bare == excluded or (subtree and bare.startswith(excluded)):
                return excluded, note
        return None


def _need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise ProfileError("a required field is missing", path=path, field=name)
    value = obj[key]
    if not isinstance(value, kind):
        wanted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProfileError(f"expected {wanted}, found {type(value).__name__}", path=path, field=name)
    return value


def _str_list(obj: dict[str, Any], key: str, path: str, where: str) -> list[str]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError("expected a list of strings", path=path, field=f"{where}.{key}")
    return value


def _rule(spec: dict[str, Any], path: str, where: str) -> Rule:
    # which keys a rule may carry is the schema's to say (profiles/profile.schema.json)
    fields = _str_list(spec, "condition_fields", path, where)
    bad = set(fields) - _CONDITION_FIELDS
    if bad:
        raise ProfileError(
            f"unknown condition field(s) {', '.join(sorted(bad))}", path=path, field=f"{where}.condition_fields"
        )
    types = _str_list(spec, "resource_types", path, where) or list(_TYPES)
    if set(types) - set(_TYPES):
        raise ProfileError(
            "resource_types may name Condition, Observation, Encounter", path=path, field=f"{where}.resource_types"
        )
    negated = spec.get("negated", "counts")
    if negated not in ("counts", "ignored"):
        raise ProfileError("negated is 'counts' or 'ignored'", path=path, field=f"{where}.negated")
    icd_entries = _str_list(spec, "icd10cm", path, where)
    return Rule(
        terms=Terms(_str_list(spec, "keywords", path, where), _str_list(spec, "words", path, where)),
        codes=frozenset(_str_list(spec, "codes", path, where)),
        loinc=frozenset(_str_list(spec, "loinc", path, where)),
        categories=frozenset(_str_list(spec, "categories", path, where)),
        icd10cm=IcdSet(icd_entries, where=f"{where}.icd10cm", path=path) if icd_entries else None,
        condition_fields=tuple(fields),
        resource_types=tuple(types),
        with_value=bool(spec.get("with_value", False)),
        negated_counts=negated == "counts",
    )


def _billable(code: str, path: str, where: str) -> str:
    code = icd.normalize(code)
    if not icd.is_valid(code):
        raise ProfileError(f"{code} is not an ICD-10-CM code", path=path, field=where)
    if not icd.is_billable(code):
        raise ProfileError(f"{code} is a category header, not a billable (leaf) code", path=path, field=where)
    return code


def _plan_definition(folder: Path, name: str, path: str) -> dict[str, Any]:
    pd_path = folder / name
    plan = _read_json(pd_path)
    try:
        PlanDefinition.model_validate(plan)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "root")
        raise ProfileError(
            f"not a valid R4 PlanDefinition: {first.get('msg')}", path=str(pd_path), field=where or None
        ) from exc
    goal_ids = {g.get("id") for g in plan.get("goal", [])}
    phases = plan.get("action") or []
    if not phases:
        raise ProfileError("the protocol needs at least one phase", path=str(pd_path), field="action")
    for i, phase in enumerate(phases):
        for gid in phase.get("goalId", []):
            if gid not in goal_ids:
                raise ProfileError(f"goalId {gid!r} names no goal", path=str(pd_path), field=f"action[{i}].goalId")
        if not phase.get("action"):
            raise ProfileError("a phase needs its activities", path=str(pd_path), field=f"action[{i}].action")
    return plan


def _load(folder: Path) -> Profile:
    path = str(folder / "profile.json")
    raw = _read_json(folder / "profile.json")
    # shape first (every key known, every type right), then what a schema cannot say: codes, references
    _validate(raw, "profile.schema.json", folder / "profile.json")
    code = _billable(_need(raw, "code", str, path), path, "code")
    if folder.name != code:
        raise ProfileError(
            f"the folder is named {folder.name} but the profile's code is {code}", path=path, field="code"
        )
    family = IcdSet(_str_list(raw, "family", path, ""), where="family", path=path)
    excludes: list[tuple[str, str, bool]] = []
    for source in _str_list(raw, "excludes1_from", path, ""):
        if not icd.is_valid(source):
            raise ProfileError(f"{source} is not an ICD-10-CM code", path=path, field="excludes1_from")
        excludes.extend(icd.excludes1_codes(source))

    site = _need(raw, "site", dict, path)
    _need(site, "region", str, path, "site")
    site_terms = {
        site["region"]: (
            site.get("label", site["region"]),
            frozenset(_str_list(site, "codes", path, "site")),
            Terms(_str_list(site, "keywords", path, "site")),
        )
    }
    for i, other in enumerate(raw.get("other_sites", [])):
        where = f"other_sites[{i}]"
        region = _need(other, "region", str, path, where)
        site_terms[region] = (
            other.get("label", region),
            frozenset(_str_list(other, "codes", path, where)),
            Terms(_str_list(other, "keywords", path, where)),
        )
    laterality = _need(raw, "laterality", dict, path)
    side_terms = {
        side: (
            frozenset(_str_list(laterality.get(side, {}), "codes", path, f"laterality.{side}")),
            Terms(_str_list(laterality.get(side, {}), "keywords", path, f"laterality.{side}")),
        )
        for side in SIDES
    }
    if laterality.get("expected") not in (None, *SIDES):
        raise ProfileError("expected is right, left, bilateral or null", path=path, field="laterality.expected")
    # SPEC §3: the other side's code, active beside this one, means both sides are coded
    for j, other in enumerate(_str_list(laterality, "both_sides_with", path, "laterality")):
        _billable(other, path, f"laterality.both_sides_with[{j}]")
    findings = _need(raw, "findings", dict, path)
    _need(findings, "expected", str, path, "findings")
    finding_terms = {
        name: (
            frozenset(_str_list(spec, "codes", path, f"findings.{name}")),
            Terms(_str_list(spec, "keywords", path, f"findings.{name}")),
        )
        for name, spec in findings.items()
        if isinstance(spec, dict)
    }
    if findings["expected"] not in finding_terms:
        raise ProfileError(
            f"{findings['expected']!r} is not one of the profile's findings", path=path, field="findings.expected"
        )

    elements = _need(raw, "elements", list, path)
    rules: dict[str, Rule] = {}
    seen: set[str] = set()
    for i, element in enumerate(elements):
        where = f"elements[{i}]"
        if not isinstance(element, dict):
            raise ProfileError("an element must be an object", path=path, field=where)
        eid = _need(element, "id", str, path, where)
        kind = _need(element, "kind", str, path, where)
        _need(element, "required", bool, path, where)
        if eid in seen:
            raise ProfileError(f"element id {eid!r} appears twice", path=path, field=f"{where}.id")
        seen.add(eid)
        if kind not in ELEMENT_KINDS:
            raise ProfileError(f"unknown element kind {kind!r}", path=path, field=f"{where}.kind")
        if kind == "all-of":
            for ref in _need(element, "of", list, path, where):
                if ref not in seen:
                    raise ProfileError(
                        f"{ref!r} is not an element listed before this one", path=path, field=f"{where}.of"
                    )
        rules[eid] = _rule(element, path, where)

    flags = _need(raw, "red_flags", list, path)
    flag_rules: dict[str, Rule] = {}
    recent_codes: dict[str, IcdSet] = {}
    for i, flag in enumerate(flags):
        where = f"red_flags[{i}]"
        fid = _need(flag, "id", str, path, where)
        flag_rules[fid] = _rule(flag, path, where)
        recent = flag.get("recent_icd10cm")
        if recent is not None:
            _need(recent, "days", int, path, f"{where}.recent_icd10cm")
            recent_codes[fid] = IcdSet(
                _str_list(recent, "codes", path, f"{where}.recent_icd10cm"),
                where=f"{where}.recent_icd10cm.codes",
                path=path,
            )

    fit = _need(raw, "code_fit", dict, path)
    for i, rule in enumerate(_need(fit, "rules", list, path, "code_fit")):
        where = f"code_fit.rules[{i}]"
        for j, suggested in enumerate(_need(rule, "suggest", list, path, where)):
            _billable(suggested, path, f"{where}.suggest[{j}]")
        when = _need(rule, "when", dict, path, where)
        # a value that names nothing would make the rule never match (SPEC §5): refuse it
        if "finding" in when and when["finding"] not in finding_terms:
            raise ProfileError(
                f"finding {when['finding']!r} is not one of the profile's findings",
                path=path,
                field=f"{where}.when.finding",
            )
        if "region" in when and when["region"] not in site_terms:
            raise ProfileError(
                f"region {when['region']!r} is not the profile's site or one of its other_sites",
                path=path,
                field=f"{where}.when.region",
            )
        if "without_region" in when and when["without_region"] not in site_terms:
            raise ProfileError(
                f"region {when['without_region']!r} is not the profile's site or one of its other_sites",
                path=path,
                field=f"{where}.when.without_region",
            )

    plan = _plan_definition(folder, _need(raw, "plan_definition", str, path), path)
    vocabulary = Vocabulary(
        [r.terms for r in rules.values()]
        + [r.terms for r in flag_rules.values()]
        + [t for _l, _c, t in site_terms.values()]
        + [t for _c, t in side_terms.values()]
        + [t for _c, t in finding_terms.values()]
    )
    return Profile(
        vocabulary=vocabulary,
        recent_codes=recent_codes,
        code=code,
        display=icd.title(code),
        folder=folder,
        raw=raw,
        family=family,
        excludes1=tuple(excludes),
        elements=tuple(elements),
        rules=rules,
        red_flags=tuple(flags),
        flag_rules=flag_rules,
        site_terms=site_terms,
        side_terms=side_terms,
        finding_terms=finding_terms,
        plan_definition=plan,
    )


@lru_cache(maxsize=16)
def _load_cached(folder: str) -> Profile:
    return _load(Path(folder))


def load_profile(code: str = DEFAULT_PROFILE, *, root: Path | None = None) -> Profile:
    """Load (once) and validate the profile of ``code``; an unknown code is a UsageError listing those there are."""
    base = root or profiles_root()
    folder = base / icd.normalize(code)
    if not (folder / "profile.json").is_file():
        known = ", ".join(available_profiles()) or "none"
        raise UsageError(f"there is no profile for {code} (profiles available: {known})")
    return _load_cached(str(folder))
