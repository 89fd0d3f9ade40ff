"""The documentation check: a pure function from a patient record and a profile to a report.

No I/O and no clock: ``today`` is passed in, so the same input always gives
the same report (SPEC §3 judges ``not-yet-due`` against today).  The record
is read as plain R4 JSON, already validated by ``_record``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping

from . import _icd10cm as icd
from ._errors import UsageError
from ._profile import Profile, Rule
from ._record import PatientRecord
from ._report import CodeFit, ElementResult, RedFlagResult, Report, Suggestion
from ._text import Terms, Vocabulary
from ._vocab import ICD10CM, LOINC, is_plugin_draft

__all__ = ["check", "conditions_under_review"]

_ACTIVE = {"active", "recurrence", "relapse"}
_NO = "373067005"      # SNOMED "No": a documented negative answer
_YES = "373066001"     # SNOMED "Yes"


# --- reading FHIR values -------------------------------------------------------------------

def _date(value: Any) -> date | None:
    """A FHIR date/dateTime (possibly partial) as a date; partial dates take their first day."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) >= 10:
            return date.fromisoformat(value[:10])
        if len(value) >= 7:
            return date(int(value[:4]), int(value[5:7]), 1)
        return date(int(value[:4]), 1, 1)
    except ValueError:
        return None


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource.get('id', '')}"


def _concepts(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The CodeableConcepts whose text and codings document things (SPEC §3's fields)."""
    out: list[Mapping[str, Any]] = []
    for key in ("code", "valueCodeableConcept", "severity"):
        if isinstance(resource.get(key), dict):
            out.append(resource[key])
    body = resource.get("bodySite")
    if isinstance(body, dict):
        out.append(body)
    elif isinstance(body, list):
        out.extend(b for b in body if isinstance(b, dict))
    for key in ("reasonCode", "type"):
        out.extend(c for c in resource.get(key) or [] if isinstance(c, dict))
    for comp in resource.get("component") or []:
        for key in ("code", "valueCodeableConcept"):
            if isinstance(comp.get(key), dict):
                out.append(comp[key])
    return out


def _texts(resource: Mapping[str, Any]) -> str:
    """All searchable text of a resource, one line a field.

    ICD-10-CM coding displays are left out: a code's title is never its own
    evidence (SPEC §3), and codes are matched as codes.
    """
    lines: list[str] = []
    for concept in _concepts(resource):
        if concept.get("text"):
            lines.append(str(concept["text"]))
        for coding in concept.get("coding") or []:
            if coding.get("display") and coding.get("system") != ICD10CM:
                lines.append(str(coding["display"]))
    if isinstance(resource.get("valueString"), str):
        lines.append(resource["valueString"])
    for comp in resource.get("component") or []:
        if isinstance(comp.get("valueString"), str):
            lines.append(comp["valueString"])
    for note in resource.get("note") or []:
        if isinstance(note.get("text"), str):
            lines.append(note["text"])
    return "\n".join(lines)


def _site_texts(resource: Mapping[str, Any]) -> str:
    """Where site and side are read: bodySite, code.text and notes (SPEC §3)."""
    lines: list[str] = []
    body = resource.get("bodySite")
    for concept in ([body] if isinstance(body, dict) else body or []):
        if concept.get("text"):
            lines.append(concept["text"])
        lines.extend(c["display"] for c in concept.get("coding") or [] if c.get("display"))
    code = resource.get("code") or {}
    if code.get("text"):
        lines.append(code["text"])
    lines.extend(n["text"] for n in resource.get("note") or [] if isinstance(n.get("text"), str))
    return "\n".join(lines)


def _codes(resource: Mapping[str, Any], *, system: str | None = None) -> set[str]:
    return {c["code"] for concept in _concepts(resource) for c in concept.get("coding") or []
            if c.get("code") and (system is None or c.get("system") == system)}


def _site_codes(resource: Mapping[str, Any]) -> set[str]:
    body = resource.get("bodySite")
    concepts = [body] if isinstance(body, dict) else body or []
    return {c["code"] for concept in concepts for c in concept.get("coding") or [] if c.get("code")}


def _has_value(resource: Mapping[str, Any]) -> bool:
    if any(k.startswith("value") for k in resource):
        return True
    return any(any(k.startswith("value") for k in comp) for comp in resource.get("component") or [])


def _status_code(resource: Mapping[str, Any], key: str) -> str | None:
    concept = resource.get(key) or {}
    for coding in concept.get("coding") or []:
        if coding.get("code"):
            return coding["code"]
    return None


def _entered_in_error(resource: Mapping[str, Any]) -> bool:
    return (resource.get("status") == "entered-in-error"
            or _status_code(resource, "verificationStatus") == "entered-in-error")


def _onset_date(condition: Mapping[str, Any]) -> date | None:
    return _date(condition.get("onsetDateTime")) or _date((condition.get("onsetPeriod") or {}).get("start"))


def _references(resource: Mapping[str, Any], *keys: str) -> set[str]:
    out: set[str] = set()
    for key in keys:
        value = resource.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                ref = item.get("reference") or (item.get("condition") or {}).get("reference")
                if isinstance(ref, str):
                    out.add(ref)
    return out


# --- the record, prepared once -------------------------------------------------------------

@dataclass(frozen=True)
class _Doc:
    ref: str
    resource: Mapping[str, Any]
    text: str
    vocabulary: Vocabulary

    @cached_property
    def type(self) -> str:
        return self.resource["resourceType"]

    @cached_property
    def index(self) -> frozenset[str]:
        """The first words of the profile's terms that occur in this resource's text."""
        return self.vocabulary.scan(self.text)

    @cached_property
    def codes(self) -> frozenset[str]:
        return frozenset(_codes(self.resource))

    @cached_property
    def loinc(self) -> frozenset[str]:
        return frozenset(_codes(self.resource, system=LOINC))

    @cached_property
    def categories(self) -> frozenset[str]:
        return frozenset(c.get("code") for cat in self.resource.get("category") or [] for c in cat.get("coding") or [])

    @cached_property
    def has_value(self) -> bool:
        return _has_value(self.resource)


class _Context:
    """What every element reads: the documents, the conditions under review, the dates."""

    def __init__(self, record: PatientRecord, profile: Profile, encounter_id: str | None, today: date) -> None:
        self.profile = profile
        self.today = today
        usable = [r for r in record.resources if not _entered_in_error(r)]
        self.drafts = [r for r in usable if is_plugin_draft(r)]
        clinical = [r for r in usable if not is_plugin_draft(r)]
        vocab = profile.vocabulary
        self.docs = [_Doc(_ref(r), r, _texts(r), vocab) for r in clinical
                     if r["resourceType"] in ("Condition", "Observation", "Encounter")]
        self.conditions = [d for d in self.docs if d.type == "Condition"]
        self.observations = [d for d in self.docs if d.type == "Observation"]
        self.care_plans = [r for r in usable if r["resourceType"] == "CarePlan"]
        site_label, site_codes, site_terms = profile.site_terms[profile.region]
        self.under_review = [d for d in self.conditions if self._under_review(d.resource, site_codes, site_terms)]
        self.under_review_refs = {d.ref for d in self.under_review}
        self.encounters = sorted((d for d in self.docs if d.type == "Encounter"),
                                 key=lambda d: (_date((d.resource.get("period") or {}).get("start")) or date.min, d.ref))
        self.encounter = self._pick_encounter(encounter_id, record.patient_id)
        start = (self.encounter.resource.get("period") or {}).get("start") if self.encounter else None
        self.reference_date = _date(start) or today
        onsets = [o for o in (_onset_date(d.resource) for d in self.under_review) if o]
        self.onset = min(onsets) if onsets else None
        # site and side are read from the conditions under review and observations with a bodySite
        self.site_docs = [_Doc(d.ref, d.resource, _site_texts(d.resource), vocab) for d in self.under_review]
        self.site_docs += [_Doc(d.ref, d.resource, _site_texts(d.resource), vocab) for d in self.observations
                           if d.resource.get("bodySite")]
        self.sites: dict[str, list[str]] | None = None   # filled once by _sites / _sides
        self.sides: dict[str, list[str]] | None = None

    def _under_review(self, condition: Mapping[str, Any], site_codes: frozenset[str], site_terms: Terms) -> bool:
        return _is_under_review(condition, self.profile, site_codes, site_terms)

    def _pick_encounter(self, encounter_id: str | None, patient_id: str) -> _Doc | None:
        if encounter_id is None:
            return self.encounters[-1] if self.encounters else None
        wanted = encounter_id.split("/")[-1]
        for doc in self.encounters:
            if doc.resource.get("id") == wanted:
                return doc
        raise UsageError(f"Encounter/{wanted} is not in the record of Patient/{patient_id}")


def _is_under_review(condition: Mapping[str, Any], profile: Profile, site_codes: frozenset[str],
                     site_terms: Terms) -> bool:
    """SPEC §3 "Conditions under review": the profile's code or a less specific family code, or its site uncoded."""
    for code in _codes(condition, system=ICD10CM):
        if code in profile.family and not profile.excludes1_match(code):
            return True
    if _site_codes(condition) & site_codes:
        return True
    body = condition.get("bodySite") or []
    return any(site_terms.search(b.get("text") or "") for b in body if isinstance(b, dict))


def conditions_under_review(conditions: Iterable[Mapping[str, Any]], profile: Profile) -> list[str]:
    """The ``Condition/id`` of each Condition under review (SPEC §3), skipping what the check never counts.

    The same rule as the check's, on Conditions alone: a caller (the CDS service's fast path)
    can tell whether the profile's code is under review before reading the rest of a record.
    """
    _label, site_codes, site_terms = profile.site_terms[profile.region]
    return [_ref(c) for c in conditions
            if c.get("resourceType") == "Condition" and not _entered_in_error(c) and not is_plugin_draft(c)
            and _is_under_review(c, profile, site_codes, site_terms)]


# --- matching a rule -----------------------------------------------------------------------

def _icd_codes(doc: _Doc) -> set[str]:
    return {c["code"] for c in (doc.resource.get("code") or {}).get("coding") or []
            if c.get("system") == ICD10CM and c.get("code")}


def _condition_counts(doc: _Doc) -> bool:
    """A Condition documents something unless refuted (entered-in-error is dropped earlier)."""
    return _status_code(doc.resource, "verificationStatus") != "refuted"


def _matches(rule: Rule, doc: _Doc, ctx: _Context) -> bool:
    res = doc.resource
    if rule.condition_fields and doc.ref in ctx.under_review_refs:
        for field_name in rule.condition_fields:
            if field_name == "onset" and any(k.startswith("onset") for k in res):
                return True
            if field_name == "onset-date" and _onset_date(res):
                return True
            if field_name == "severity" and res.get("severity"):
                return True
    if rule.icd10cm is not None and doc.type == "Condition" and _condition_counts(doc):
        if any(code in rule.icd10cm for code in _icd_codes(doc)):
            return True
    value_ok = not rule.with_value or doc.has_value
    if rule.codes and not doc.codes.isdisjoint(rule.codes):
        return True
    if doc.type == "Observation" and value_ok:
        if rule.loinc and not doc.loinc.isdisjoint(rule.loinc):
            return True
        if rule.categories and not doc.categories.isdisjoint(rule.categories):
            return True
    if rule.terms and doc.type in rule.resource_types and value_ok and rule.terms.may_occur(doc.index):
        mentions = rule.terms.mentions(doc.text)
        return any(rule.negated_counts or not m.negated for m in mentions)
    return False


def _evidence(rule: Rule, docs: Iterable[_Doc], ctx: _Context) -> list[str]:
    return [d.ref for d in docs if _matches(rule, d, ctx)]


def _found(docs: Iterable[_Doc], codes: frozenset[str], terms: Terms, *, site_codes_only: bool) -> list[str]:
    """Refs of documents that document a site/side/finding by code or by an un-negated keyword."""
    out = []
    for doc in docs:
        have = _site_codes(doc.resource) if site_codes_only else doc.codes
        if have & codes or (terms.may_occur(doc.index) and any(not m.negated for m in terms.mentions(doc.text))):
            out.append(doc.ref)
    return out


# --- the elements --------------------------------------------------------------------------

def _lower_title(element: Mapping[str, Any]) -> str:
    return str(element.get("title", element["id"])).lower()


def _evidence_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    found = _evidence(ctx.profile.rules[element["id"]], ctx.docs, ctx)
    if not found:
        return "missing", [], f"no {_lower_title(element)} documented"
    detail = f"documented in {', '.join(found[:3])}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    if "onset-date" in ctx.profile.rules[element["id"]].condition_fields and ctx.onset:
        days = (ctx.reference_date - ctx.onset).days
        detail = f"onset {ctx.onset.isoformat()}, {days} days before the reference date; " + detail
    return "met", found, detail


def _sites(ctx: _Context) -> dict[str, list[str]]:
    if ctx.sites is not None:
        return ctx.sites
    out: dict[str, list[str]] = {}
    for region, (_label, codes, terms) in ctx.profile.site_terms.items():
        refs = _found(ctx.site_docs, codes, terms, site_codes_only=True)
        if refs:
            out[region] = refs
    ctx.sites = out
    return out


def _sides(ctx: _Context) -> dict[str, list[str]]:
    if ctx.sides is not None:
        return ctx.sides
    out: dict[str, list[str]] = {}
    for side, (codes, terms) in ctx.profile.side_terms.items():
        refs = _found(ctx.site_docs, codes, terms, site_codes_only=False)
        if refs:
            out[side] = refs
    ctx.sides = out
    return out


def _side_of(sides: Mapping[str, list[str]]) -> str:
    if "bilateral" in sides or {"right", "left"} <= set(sides):
        return "bilateral"
    if sides:
        return next(iter(sides))
    return "unspecified"


def _site_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    sites = _sites(ctx)
    own = ctx.profile.region
    others = {r: refs for r, refs in sites.items() if r != own}
    if others:
        names = ", ".join(f"{ctx.profile.site_terms[r][0]} ({', '.join(refs)})" for r, refs in others.items())
        return "conflict", sorted({x for refs in others.values() for x in refs}), \
            f"the record documents a site other than the {ctx.profile.site_terms[own][0]}: {names}"
    if own in sites:
        return "met", sites[own], f"{ctx.profile.site_terms[own][0]} documented"
    return "missing", [], "no body site documented on the condition or a site-bearing observation"


def _laterality_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    sides = _sides(ctx)
    side = _side_of(sides)
    refs = sorted({x for v in sides.values() for x in v})
    expected = ctx.profile.expected_side
    if side == "unspecified":
        return "missing", [], "no side documented"
    if expected is None or side == expected:
        return "met", refs, f"{side} side documented"
    return "conflict", refs, f"the record documents the {side} side; the code is for the {expected} side"


def _excludes1_found(ctx: _Context) -> list[tuple[str, str, str]]:
    """(excluded code, note, Condition ref) for every active Condition the code's Excludes1 forbids."""
    out = []
    for doc in ctx.conditions:
        clinical = _status_code(doc.resource, "clinicalStatus")
        if (clinical is not None and clinical not in _ACTIVE) or not _condition_counts(doc):
            continue
        for code in _icd_codes(doc):
            hit = ctx.profile.excludes1_match(code)
            if hit:
                out.append((icd.normalize(code), hit[1], doc.ref))
    return out


def _excludes1_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    found = _excludes1_found(ctx)
    if found:
        names = "; ".join(f"{note} on {ref}" for _code, note, ref in found)
        return "conflict", [ref for _c, _n, ref in found], f"Excludes1: {names}"
    return "met", [], "no active condition that the code's Excludes1 note forbids"


def _flag_screen_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult],
                         flags: list[RedFlagResult]) -> tuple[str, list[str], str]:
    undocumented = [f.id for f in flags if f.status == "not-documented"]
    refs = sorted({r for f in flags for r in f.evidence})
    if undocumented:
        return "missing", refs, "red flags not documented: " + ", ".join(undocumented)
    return "met", refs, "every red flag documented as present or absent"


def _care_plan_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    own_drafts = {_ref(r) for r in ctx.drafts if r["resourceType"] == "Condition"
                  and any(c.get("code") == ctx.profile.code for c in (r.get("code") or {}).get("coding") or [])}
    clinician, proposed = [], []
    for plan in ctx.care_plans:
        addressed = _references(plan, "addresses")
        if is_plugin_draft(plan):
            if addressed & (ctx.under_review_refs | own_drafts):
                proposed.append(_ref(plan))
        elif addressed & ctx.under_review_refs:
            clinician.append(_ref(plan))
    if clinician:
        return "met", clinician, "a care plan addresses the condition"
    if proposed:
        return "proposed", proposed, "only the plugin's draft care plan exists; it awaits clinician review"
    return "missing", [], "no care plan addresses the condition"


def _follow_up_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    linked = {ref for d in ctx.under_review for ref in _references(d.resource, "encounter")}
    for_condition = []
    for doc in ctx.encounters:
        refs = _references(doc.resource, "reasonReference", "diagnosis")
        coded = any(c in ctx.profile.family for c in _codes(doc.resource, system=ICD10CM))
        if refs & ctx.under_review_refs or doc.ref in linked or coded:
            start = _date((doc.resource.get("period") or {}).get("start"))
            if start:
                for_condition.append((start, doc.ref))
    for_condition.sort()
    # the windows are profile data (SPEC §3.1: two calendar days; not-yet-due under 42 days), required by the schema
    min_days = int(element["min_days_after"])
    due_days = int(element["due_after_days"])
    if for_condition:
        first_date, first_ref = for_condition[0]
        later = [(d, r) for d, r in for_condition[1:] if (d - first_date).days >= min_days]
        if later:
            return "met", [first_ref, later[0][1]], f"follow-up on {later[0][0].isoformat()}"
        age = (ctx.today - first_date).days
        if len(for_condition) == 1 and age < due_days:
            return "not-yet-due", [first_ref], f"one encounter, {age} days ago; follow-up due by day {due_days}"
        return "missing", [first_ref], f"one encounter, {age} days ago, and no follow-up"
    return "missing", [], "no encounter for the condition"


def _repeated_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    by_code: dict[tuple[str, str], dict[date, str]] = {}
    for doc in ctx.observations:
        when = _date(doc.resource.get("effectiveDateTime")) or \
            _date((doc.resource.get("effectivePeriod") or {}).get("start"))
        codings = (doc.resource.get("code") or {}).get("coding") or []
        if when and codings and codings[0].get("code"):
            key = (codings[0].get("system", ""), codings[0]["code"])
            by_code.setdefault(key, {}).setdefault(when, doc.ref)
    for (_system, code), dates in by_code.items():
        if len(dates) >= 2:
            return "met", list(dates.values()), f"{code} recorded on {len(dates)} dates"
    return "missing", [], "no observation repeated on two dates"


def _all_of_element(element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]) -> tuple[str, list[str], str]:
    missing = [ref for ref in element["of"] if done[ref].status != "met"]
    if missing:
        return "missing", [], "not supported yet: " + ", ".join(missing) + " must be met"
    return "met", sorted({r for ref in element["of"] for r in done[ref].evidence}), "supported by " + \
        ", ".join(element["of"])


_KINDS: dict[str, Callable[..., tuple[str, list[str], str]]] = {
    "evidence": _evidence_element,
    "site": _site_element,
    "laterality": _laterality_element,
    "excludes1": _excludes1_element,
    "care-plan": _care_plan_element,
    "follow-up": _follow_up_element,
    "repeated-observation": _repeated_element,
    "all-of": _all_of_element,
}


# --- red flags -----------------------------------------------------------------------------

def _quantity_celsius(obs: Mapping[str, Any]) -> float | None:
    q = obs.get("valueQuantity") or {}
    value = q.get("value")
    if not isinstance(value, (int, float)):
        return None
    unit = q.get("code") or q.get("unit") or "Cel"
    if unit in ("[degF]", "degF", "°F", "F"):
        return (float(value) - 32.0) * 5.0 / 9.0
    return float(value)


def _observation_answer(obs: Mapping[str, Any]) -> bool | None:
    """A yes/no answer carried by the value: valueBoolean, or SNOMED Yes/No."""
    if isinstance(obs.get("valueBoolean"), bool):
        return obs["valueBoolean"]
    codes = {c.get("code") for c in (obs.get("valueCodeableConcept") or {}).get("coding") or []}
    if _NO in codes:
        return False
    if _YES in codes:
        return True
    return None


def _red_flag(flag: Mapping[str, Any], ctx: _Context) -> RedFlagResult:
    rule = ctx.profile.flag_rules[flag["id"]]
    present: list[str] = []
    absent: list[str] = []
    details: list[str] = []
    for doc in ctx.docs:
        if doc.type == "Condition" and rule.icd10cm is not None and any(c in rule.icd10cm for c in _icd_codes(doc)):
            (present if _condition_counts(doc) else absent).append(doc.ref)
            continue
        if rule.terms and rule.terms.may_occur(doc.index):
            mentions = rule.terms.mentions(doc.text, trailing_negative=True)
            answer = _observation_answer(doc.resource) if doc.type == "Observation" else None
            if answer is not None:
                (present if answer else absent).append(doc.ref)
            elif any(not m.negated for m in mentions):
                present.append(doc.ref)
            elif mentions:
                absent.append(doc.ref)
    recent = flag.get("recent_icd10cm")
    if recent:
        codes = ctx.profile.recent_codes[flag["id"]]
        for doc in ctx.conditions:
            if _condition_counts(doc) and any(c in codes for c in _icd_codes(doc)):
                when = _onset_date(doc.resource) or _date(doc.resource.get("recordedDate"))
                if when and 0 <= (ctx.reference_date - when).days <= int(recent["days"]):
                    present.append(doc.ref)
    threshold = flag.get("threshold")
    if threshold:
        for doc in ctx.observations:
            if threshold["loinc"] in doc.loinc:
                value = _quantity_celsius(doc.resource)
                if value is not None:
                    (present if value >= float(threshold["at_least"]) else absent).append(doc.ref)
    days = flag.get("onset_older_than_days")
    if days is not None:
        if ctx.onset is None:
            details.append("onset has no date")
        else:
            age = (ctx.reference_date - ctx.onset).days
            refs = [d.ref for d in ctx.under_review if _onset_date(d.resource) == ctx.onset][:1]
            (present if age > int(days) else absent).extend(refs)
            details.append(f"onset {age} days before the reference date (limit {days})")
    title = str(flag.get("title", flag["id"]))
    if present:
        return RedFlagResult(flag["id"], title, "present", tuple(dict.fromkeys(present)), "; ".join(details))
    if absent:
        return RedFlagResult(flag["id"], title, "absent", tuple(dict.fromkeys(absent)), "; ".join(details))
    return RedFlagResult(flag["id"], title, "not-documented", (), "; ".join(details) or "not documented")


# --- code fit ------------------------------------------------------------------------------

def _suggest(codes: Iterable[str], reason: str) -> tuple[Suggestion, ...]:
    return tuple(Suggestion(c, icd.title(c), reason) for c in codes)


def _code_fit(ctx: _Context) -> CodeFit:
    profile = ctx.profile
    sites = _sites(ctx)
    sides = _sides(ctx)
    side = _side_of(sides)
    findings = [name for name, (codes, terms) in profile.finding_terms.items()
                if _found(ctx.docs, codes, terms, site_codes_only=False)]
    documented = {"site": tuple(sites), "side": None if side == "unspecified" else side, "finding": tuple(findings)}
    excluded = _excludes1_found(ctx)
    if excluded:
        codes = list(dict.fromkeys(code for code, _note, _ref in excluded))
        notes = "; ".join(dict.fromkeys(note for _c, note, _r in excluded))
        return CodeFit("mismatch", _suggest(codes, f"an active condition is excluded by the Excludes1 note: {notes}"),
                       f"{profile.code} may not be coded with {', '.join(codes)}", **documented)
    for rule in profile.raw["code_fit"]["rules"]:
        when = rule["when"]
        if "finding" in when and when["finding"] not in findings:
            continue
        if "region" in when and when["region"] not in sites:
            continue
        if "side" in when and when["side"] != side:
            continue
        return CodeFit("mismatch", _suggest(rule["suggest"], rule.get("reason", "")),
                       f"the documentation does not support {profile.code}", **documented)
    expected_side = profile.expected_side
    if profile.expected_finding in findings and profile.region in sites and \
            (expected_side is None or side == expected_side):
        return CodeFit("fits", (), f"site, side and finding support {profile.code}", **documented)
    if not sites or not findings or (expected_side is not None and side == "unspecified"):
        lacking = [name for name, have in (("site", sites), ("finding", findings),
                                           ("side", expected_side is None or side != "unspecified")) if not have]
        return CodeFit("insufficient", (), "the record does not document the " + " or ".join(lacking), **documented)
    return CodeFit("mismatch", (), f"the documented site, side and finding do not match {profile.code}", **documented)


# --- the check -----------------------------------------------------------------------------

def check(record: PatientRecord, profile: Profile, *, today: date, encounter_id: str | None = None) -> Report:
    """Check one patient's record against a profile (SPEC §3–§6). Pure: no I/O, no clock."""
    ctx = _Context(record, profile, encounter_id, today)
    flags = [_red_flag(flag, ctx) for flag in profile.red_flags]
    done: dict[str, ElementResult] = {}
    for element in profile.elements:
        kind = element["kind"]
        if kind == "red-flag-screen":
            status, evidence, detail = _flag_screen_element(element, ctx, done, flags)
        else:
            status, evidence, detail = _KINDS[kind](element, ctx, done)
        done[element["id"]] = ElementResult(element["id"], str(element.get("title", element["id"])),
                                            bool(element["required"]), status,  # type: ignore[arg-type]
                                            tuple(dict.fromkeys(evidence)), detail)
    return Report(
        patient=f"Patient/{record.patient_id}",
        encounter=ctx.encounter.ref if ctx.encounter else None,
        profile_code=profile.code,
        profile_display=profile.display,
        icd10cm_release=icd.release(),
        reference_date=ctx.reference_date.isoformat(),
        elements=tuple(done.values()),
        red_flags=tuple(flags),
        code_fit=_code_fit(ctx),
        onset_date=ctx.onset.isoformat() if ctx.onset else None,
    )
