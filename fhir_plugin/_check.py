"""The documentation check: a pure function from a patient record and a profile to a report.

No I/O and no clock: ``today`` is passed in, so the same input always gives
the same report (SPEC §3 judges ``not-yet-due`` against today).  The record
is read as plain R4 JSON, already validated by ``_record``; resources are read
in the order of their references, so the report does not depend on the order
the record arrived in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from typing import Any

from . import _icd10cm as icd
from ._drafts import drafted_plans
from ._errors import UsageError
from ._profile import Profile, Rule
from ._record import PatientRecord
from ._report import CodeFit, ElementResult, RedFlagResult, Report, Suggestion
from ._text import MAX_FIELD_CHARS, Mention, Terms, TextIndex, analyze, capped, side_mentions
from ._vocab import ICD10CM, LOINC, is_plugin_draft

__all__ = ["check", "conditions_under_review"]

# SPEC §3.1: statuses
_ACTIVE = {"active", "recurrence", "relapse"}
_VISIT = {"finished", "in-progress", "arrived", "triaged", "onleave"}
_PLAN_COUNTS = {"draft", "active", "on-hold"}
_NO = "373067005"  # SNOMED "No": a documented negative answer
_YES = "373066001"  # SNOMED "Yes"
# SPEC §3.2 *Answers as values*
_NEGATIVE_ANSWERS = {"no", "absent", "negative", "none", "denied", "not present"}
_POSITIVE_ANSWERS = {"yes", "present", "positive"}
# SPEC §4: family-history codes document nothing for red flags


def _family_history_code(code: str) -> bool:
    bare = code.strip().upper().replace(".", "")
    return len(bare) >= 3 and bare[0] == "Z" and "80" <= bare[1:3] <= "84"


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


def _instant(value: Any) -> datetime:
    """A FHIR date/dateTime as an aware instant for ordering (a date or a time without zone: UTC)."""
    day = _date(value)
    if day is None:
        return datetime.min.replace(tzinfo=UTC)
    if isinstance(value, str) and len(value) > 10:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource.get('id', '')}"


def _norm_ref(ref: str) -> str:
    """``Type/id`` of a relative or absolute reference (SPEC §3.1); ``_history`` is dropped."""
    if "/_history/" in ref:
        ref = ref.split("/_history/")[0]
    parts = ref.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def _concept_list(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _codings(concept: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def _own_code(resource: Mapping[str, Any]) -> bool:
    """True when this is a Condition whose ``code`` carries an ICD-10-CM coding.

    SPEC §3: the code is never its own evidence — its ICD-10-CM coding, the other codings
    of the same ``code`` (translations) and a ``code.text`` that repeats an official title
    document nothing.
    """
    return resource.get("resourceType") == "Condition" and any(
        c.get("system") == ICD10CM for c in _codings(resource.get("code") or {})
    )


def _official_title_text(concept: Mapping[str, Any]) -> bool:
    text = str(concept.get("text") or "").strip().lower()
    for c in _codings(concept):
        if c.get("system") == ICD10CM and isinstance(c.get("code"), str):
            try:
                if icd.title(c["code"]).strip().lower() == text:
                    return True
            except Exception:  # an unknown code has no title to repeat
                continue
    return False


_CONCEPT_KEYS = frozenset({"code", "valueCodeableConcept", "severity", "bodySite", "reasonCode", "type", "component"})


def _concepts(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The CodeableConcepts whose text and codings document things (SPEC §3's fields)."""
    out: list[Mapping[str, Any]] = []
    for key, value in resource.items():
        if key not in _CONCEPT_KEYS:
            continue
        if key == "component":
            for comp in value if isinstance(value, list) else ():
                if isinstance(comp, dict):
                    for sub in ("code", "valueCodeableConcept"):
                        if isinstance(comp.get(sub), dict):
                            out.append(comp[sub])
        elif key == "code":
            if isinstance(value, dict) and not _own_code(resource):
                out.append(value)
        elif isinstance(value, dict):
            out.append(value)
        elif isinstance(value, list):
            out.extend(v for v in value if isinstance(v, dict))
    return out


def _code_text(resource: Mapping[str, Any]) -> str:
    """``code.text`` unless it is the code's own words (SPEC §3)."""
    code = resource.get("code")
    if not isinstance(code, dict) or not code.get("text"):
        return ""
    if _own_code(resource) and _official_title_text(code):
        return ""
    return str(code["text"])


def _fields(resource: Mapping[str, Any], concepts: list[Mapping[str, Any]] | None = None) -> list[str]:
    """All searchable text of a resource, one entry a field."""
    lines: list[str] = []
    if resource.get("resourceType") == "Condition" and _own_code(resource):
        own_text = _code_text(resource)
        if own_text:
            lines.append(own_text)
    for concept in _concepts(resource) if concepts is None else concepts:
        if concept.get("text"):
            lines.append(str(concept["text"]))
        for coding in _codings(concept):
            if coding.get("display") and coding.get("system") != ICD10CM:
                lines.append(str(coding["display"]))
    if isinstance(resource.get("valueString"), str):
        lines.append(resource["valueString"])
    for comp in resource.get("component") or []:
        if isinstance(comp, dict) and isinstance(comp.get("valueString"), str):
            lines.append(comp["valueString"])
    for note in resource.get("note") or []:
        if isinstance(note, dict) and isinstance(note.get("text"), str):
            lines.append(note["text"])
    return lines


def _joined(lines: list[str]) -> tuple[str, bool]:
    """The fields as one text, one line each (a line break ends a clause), each capped."""
    if all(len(line) <= MAX_FIELD_CHARS for line in lines):
        return "\n".join(lines), False
    out, cut = [], False
    for line in lines:
        part, was_cut = capped(line)
        out.append(part)
        cut = cut or was_cut
    return "\n".join(out), cut


def _body_site_text(resource: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for concept in _concept_list(resource.get("bodySite")):
        if concept.get("text"):
            lines.append(str(concept["text"]))
        lines.extend(str(c["display"]) for c in _codings(concept) if c.get("display"))
    return "\n".join(capped(x)[0] for x in lines)


def _site_codes(resource: Mapping[str, Any]) -> set[str]:
    return {
        c["code"]
        for concept in _concept_list(resource.get("bodySite"))
        for c in _codings(concept)
        if isinstance(c.get("code"), str)
    }


def _has_value(resource: Mapping[str, Any]) -> bool:
    if any(k.startswith("value") for k in resource):
        return True
    return any(
        any(k.startswith("value") for k in comp) for comp in resource.get("component") or [] if isinstance(comp, dict)
    )


def _status_code(resource: Mapping[str, Any], key: str) -> str | None:
    concept = resource.get(key) or {}
    for coding in _codings(concept) if isinstance(concept, dict) else []:
        if coding.get("code"):
            return str(coding["code"])
    return None


def _counts_at_all(resource: Mapping[str, Any]) -> bool:
    """SPEC §3.1 *What does not count, anywhere*."""
    rtype = resource.get("resourceType")
    status = resource.get("status")
    if status == "entered-in-error":
        return False
    if rtype in ("Observation", "Encounter") and status == "cancelled":
        return False
    if rtype == "Condition" and _status_code(resource, "verificationStatus") in ("entered-in-error", "refuted"):
        return False
    return True


def _active(condition: Mapping[str, Any]) -> bool:
    """SPEC §3.1: active, recurrence, relapse or no clinical status."""
    status = _status_code(condition, "clinicalStatus")
    return status is None or status in _ACTIVE


def _onset_date(condition: Mapping[str, Any]) -> date | None:
    return _date(condition.get("onsetDateTime")) or _date((condition.get("onsetPeriod") or {}).get("start"))


def _text_date(resource: Mapping[str, Any]) -> date | None:
    """SPEC §4: a text's date is its resource's."""
    rtype = resource.get("resourceType")
    if rtype == "Observation":
        return (
            _date(resource.get("effectiveDateTime"))
            or _date(resource.get("effectiveInstant"))
            or _date((resource.get("effectivePeriod") or {}).get("start"))
            or _date(resource.get("issued"))
        )
    if rtype == "Condition":
        return _onset_date(resource) or _date(resource.get("recordedDate"))
    if rtype == "Encounter":
        return _date((resource.get("period") or {}).get("start"))
    return None


def _references(resource: Mapping[str, Any], *keys: str) -> set[str]:
    out: set[str] = set()
    for key in keys:
        value = resource.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                ref = item.get("reference") or (item.get("condition") or {}).get("reference")
                if isinstance(ref, str):
                    out.add(_norm_ref(ref))
    return out


def _answer(obs: Mapping[str, Any]) -> bool | None:
    """SPEC §3.2 *Answers as values*: True for a yes, False for a no, None for anything else."""
    if isinstance(obs.get("valueBoolean"), bool):
        return bool(obs["valueBoolean"])
    concept = obs.get("valueCodeableConcept")
    texts: list[str] = []
    if isinstance(concept, dict):
        codes = {c.get("code") for c in _codings(concept)}
        if _NO in codes:
            return False
        if _YES in codes:
            return True
        texts.append(str(concept.get("text") or ""))
        texts.extend(str(c.get("display") or "") for c in _codings(concept))
    if isinstance(obs.get("valueString"), str):
        texts.append(obs["valueString"])
    for text in texts:
        word = " ".join(text.strip().strip(".!").lower().split())
        if word in _NEGATIVE_ANSWERS:
            return False
        if word in _POSITIVE_ANSWERS:
            return True
    return None


# --- the record, prepared once -------------------------------------------------------------


class _RuleIndex:
    """Which rules a resource could satisfy, from its codes and the first words of its text.

    Built once per profile, so a record of thousands of Observations costs a few set
    look-ups per resource instead of one rule test per resource and element.
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.by_token: dict[str, set[int]] = {}
        self.by_code: dict[str, set[int]] = {}
        self.by_loinc: dict[str, set[int]] = {}
        self.by_category: dict[str, set[int]] = {}
        self.for_conditions: set[int] = set()
        for rule in rules:
            key = id(rule)
            for token in rule.terms.first_tokens:
                self.by_token.setdefault(token, set()).add(key)
            for table, values in (
                (self.by_code, rule.codes),
                (self.by_loinc, rule.loinc),
                (self.by_category, rule.categories),
            ):
                for value in values:
                    table.setdefault(value, set()).add(key)
            if rule.condition_fields or rule.icd10cm is not None:
                self.for_conditions.add(key)

    def candidates(self, doc: _Doc) -> set[int]:
        out: set[int] = set()
        for token in doc.index:
            out |= self.by_token.get(token, set())
        for code in doc.codes:
            out |= self.by_code.get(code, set())
        if doc.type == "Observation":
            for code in doc.loinc:
                out |= self.by_loinc.get(code, set())
            for code in doc.categories:
                out |= self.by_category.get(code, set())
        elif doc.type == "Condition":
            out |= self.for_conditions
        return out


_RULE_INDEXES: dict[int, tuple[Profile, _RuleIndex, dict[str, Rule]]] = {}


def _rule_index(profile: Profile) -> tuple[_RuleIndex, dict[str, Rule]]:
    """The profile's rule index, and its findings as rules (so they are indexed too)."""
    found = _RULE_INDEXES.get(id(profile))
    if found is None or found[0] is not profile:
        findings = {name: Rule(terms=terms, codes=codes) for name, (codes, terms) in profile.finding_terms.items()}
        found = (
            profile,
            _RuleIndex(list(profile.rules.values()) + list(profile.flag_rules.values()) + list(findings.values())),
            findings,
        )
        _RULE_INDEXES[id(profile)] = found
    return found[1], found[2]


class _Doc:
    """One resource as the check reads it; what every rule looks at is worked out once, here."""

    def __init__(self, resource: Mapping[str, Any], vocabulary: Any) -> None:
        self.resource = resource
        self.type: str = resource["resourceType"]
        self.ref = f"{self.type}/{resource.get('id', '')}"
        self.concepts = concepts = _concepts(resource)
        # one pass over the concepts for both the text (as _fields reads it) and the codes
        lines: list[str] = []
        if self.type == "Condition" and _own_code(resource):
            own_text = _code_text(resource)
            if own_text:
                lines.append(own_text)
        codes: set[str] = set()
        loinc: set[str] = set()
        for concept in concepts:
            text = concept.get("text")
            if text:
                lines.append(str(text))
            for c in concept.get("coding") or ():
                if c.__class__ is dict:
                    code, system, display = c.get("code"), c.get("system"), c.get("display")
                    if code.__class__ is str:
                        codes.add(code)
                        if system == LOINC:
                            loinc.add(code)
                    if display and system != ICD10CM:
                        lines.append(str(display))
        value = resource.get("valueString")
        if value.__class__ is str:
            lines.append(value)
        for comp in resource.get("component") or ():
            if isinstance(comp, dict) and isinstance(comp.get("valueString"), str):
                lines.append(comp["valueString"])
        for note in resource.get("note") or ():
            if isinstance(note, dict) and isinstance(note.get("text"), str):
                lines.append(note["text"])
        self.text, self.truncated = _joined(lines)
        self.codes = frozenset(codes)
        self.loinc = frozenset(loinc)
        categories: set[Any] = set()
        if self.type == "Observation":
            for cat in resource.get("category") or ():
                if cat.__class__ is dict:
                    for c in cat.get("coding") or ():
                        if c.__class__ is dict:
                            categories.add(c.get("code"))
        self.categories = frozenset(categories)
        #: the first words of the profile's terms that occur in this resource's text
        self.index: frozenset[str] = vocabulary.scan(self.text)
        #: the rules this resource could satisfy (``_RuleIndex.candidates``), set by the context
        self.rule_keys: set[int] = set()

    @cached_property
    def analysed(self) -> TextIndex:
        return analyze(self.text)

    @cached_property
    def has_value(self) -> bool:
        return _has_value(self.resource)

    @cached_property
    def icd_codes(self) -> frozenset[str]:
        return frozenset(
            c["code"]
            for c in _codings(self.resource.get("code") or {})
            if c.get("system") == ICD10CM and isinstance(c.get("code"), str)
        )

    @cached_property
    def active(self) -> bool:
        return self.type != "Condition" or _active(self.resource)

    @cached_property
    def answer(self) -> bool | None:
        return _answer(self.resource) if self.type == "Observation" else None

    @cached_property
    def code_words(self) -> str:
        """What the Observation's ``code`` says (text and displays): where an answer's question is."""
        code = self.resource.get("code") or {}
        parts = [str(code.get("text") or "")] + [str(c.get("display") or "") for c in _codings(code)]
        return "\n".join(p for p in parts if p)

    @cached_property
    def when(self) -> date | None:
        return _text_date(self.resource)

    def mentions(self, terms: Terms) -> list[Mention]:
        if not terms or not terms.may_occur(self.index):
            return []
        return terms.mentions(self.analysed)

    @cached_property
    def code_codes(self) -> frozenset[str]:
        return frozenset(c["code"] for c in _codings(self.resource.get("code") or {}) if isinstance(c.get("code"), str))

    def answered(self, terms: Terms, codes: frozenset[str] = frozenset()) -> bool | None:
        """The answer this Observation gives when its code names the thing, by a code or a word (SPEC §3.2)."""
        if self.answer is None:
            return None
        if (codes and not self.code_codes.isdisjoint(codes)) or (terms and terms.search(self.code_words)):
            return self.answer
        return None


@dataclass
class _SiteDoc:
    """Where site and side are read (SPEC §3): a Condition under review or an eligible Observation."""

    ref: str
    resource: Mapping[str, Any]
    body_text: str  # bodySite text and displays: a side word there documents the side
    other_text: str  # code.text and notes: a side word needs a site word near it
    is_condition: bool


def _measure_key(resource: Mapping[str, Any]) -> tuple[Any, ...]:
    """The same measure: the same coding, or the same ``code.text`` when uncoded (SPEC §3)."""
    code = resource.get("code") or {}
    codings = tuple(sorted((str(c.get("system", "")), str(c.get("code", ""))) for c in _codings(code) if c.get("code")))
    if codings:
        return codings
    return (" ".join(str(code.get("text") or "").lower().split()),)


class _Context:
    """What every element reads: the documents, the conditions under review, the dates."""

    def __init__(self, record: PatientRecord, profile: Profile, encounter_id: str | None, today: date) -> None:
        self.profile = profile
        self.today = today
        # sorted by reference: the report is the same whatever order the record came in
        usable = sorted((r for r in record.resources if _counts_at_all(r)), key=_ref)
        self.drafts: list[dict[str, Any]] = []
        clinical: list[dict[str, Any]] = []
        for r in usable:
            (self.drafts if "meta" in r and is_plugin_draft(r) else clinical).append(r)
        vocab = profile.vocabulary
        self.docs: list[_Doc] = []
        for r in clinical:
            if r["resourceType"] in ("Condition", "Observation", "Encounter"):
                self.docs.append(_Doc(r, vocab))
        self.truncated = [d.ref for d in self.docs if d.truncated]
        index, self.finding_rules_by_name = _rule_index(profile)
        self.by_rule: dict[int, list[_Doc]] = {}
        for d in self.docs:
            d.rule_keys = index.candidates(d)
            for key in d.rule_keys:
                self.by_rule.setdefault(key, []).append(d)
        self.conditions = [d for d in self.docs if d.type == "Condition"]
        self.observations = [d for d in self.docs if d.type == "Observation"]
        self.care_plans = [r for r in usable if r["resourceType"] == "CarePlan"]
        self.plan_notes = drafted_plans(record)
        _label, site_codes, site_terms = profile.site_terms[profile.region]
        self.under_review = [d for d in self.conditions if self._under_review(d, site_codes, site_terms)]
        self.under_review_refs = {d.ref for d in self.under_review}
        encounters = [d for d in self.docs if d.type == "Encounter"]
        # SPEC §3.1: the latest visit by period start (instants compared across time zones)
        self.visits = sorted(
            (d for d in encounters if d.resource.get("status") in _VISIT),
            key=lambda d: (_instant((d.resource.get("period") or {}).get("start")), d.ref),
        )
        self.encounter = self._pick_encounter(encounters, encounter_id, record.patient_id)
        start = (self.encounter.resource.get("period") or {}).get("start") if self.encounter else None
        self.reference_date = _date(start) or today
        onsets = [o for o in (_onset_date(d.resource) for d in self.under_review) if o]
        self.onset = min(onsets) if onsets else None
        finding_ids = {f"{name}-finding" for name in profile.finding_terms}
        self.finding_rules = {eid for eid in profile.rules if eid in finding_ids}
        self._sites: dict[str, list[str]] | None = None
        self._sides: dict[str, list[str]] | None = None

    def _under_review(self, doc: _Doc, site_codes: frozenset[str], site_terms: Terms) -> bool:
        return _is_under_review(doc, self.profile, site_codes, site_terms)

    def _pick_encounter(self, encounters: list[_Doc], encounter_id: str | None, patient_id: str) -> _Doc | None:
        if encounter_id is None:
            return self.visits[-1] if self.visits else None
        wanted = encounter_id.split("/")[-1]
        for doc in encounters:
            if doc.resource.get("id") == wanted:
                return doc
        raise UsageError(f"Encounter/{wanted} is not in the record of Patient/{patient_id}")

    # -- site and side (SPEC §3, §3.2) -----------------------------------------------------

    @cached_property
    def site_docs(self) -> list[_SiteDoc]:
        out = [
            _SiteDoc(
                d.ref,
                d.resource,
                _body_site_text(d.resource),
                _joined(
                    [_code_text(d.resource)]
                    + [
                        str(n.get("text"))
                        for n in d.resource.get("note") or []
                        if isinstance(n, dict) and n.get("text")
                    ]
                )[0],
                True,
            )
            for d in self.under_review
        ]
        rules = [self.profile.rules[e["id"]] for e in self.profile.elements if e["kind"] == "evidence"]
        for d in self.observations:
            # only an Observation that documents one of the profile's elements (a blood pressure does not)
            # a rule the index does not offer this Observation cannot match it (``_evidence`` relies on the same)
            if d.resource.get("bodySite") and any(id(r) in d.rule_keys and _matches(r, d, self) for r in rules):
                other = [str(d.code_words)] + [
                    str(n.get("text")) for n in d.resource.get("note") or [] if isinstance(n, dict) and n.get("text")
                ]
                out.append(_SiteDoc(d.ref, d.resource, _body_site_text(d.resource), _joined(other)[0], False))
        return out

    def _all_site_spans(self, index: TextIndex) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for _label, _codes, terms in self.profile.site_terms.values():
            spans.extend((m.start, m.end) for m in terms.mentions(index) if m.present)
        return sorted(spans)

    def sites(self) -> dict[str, list[str]]:
        if self._sites is None:
            out: dict[str, list[str]] = {}
            for region, (_label, codes, terms) in self.profile.site_terms.items():
                for sd in self.site_docs:
                    found = bool(_site_codes(sd.resource) & codes)
                    for text in (sd.body_text, sd.other_text):
                        if not found and text and terms.search(text):
                            found = any(m.present for m in terms.mentions(analyze(text)))
                    if found:
                        out.setdefault(region, []).append(sd.ref)
            self._sites = out
        return self._sites

    def _doc_sides(self, sd: _SiteDoc) -> set[str]:
        found: set[str] = set()
        codes = _site_codes(sd.resource)
        for side, (side_codes, terms) in self.profile.side_terms.items():
            if codes & side_codes:
                found.add(side)
                continue
            if sd.body_text and any(m.present for m in terms.mentions(analyze(sd.body_text))):
                found.add(side)
                continue
            if sd.other_text and terms.search(sd.other_text):
                index = analyze(sd.other_text)
                if any(m.present for m in side_mentions(index, terms, self._all_site_spans(index))):
                    found.add(side)
        return found

    def sides(self) -> dict[str, list[str]]:
        """SPEC §3: Conditions under review first; Observations only when they document none, and
        the same measure on both sides in one encounter (a comparison) documents no side."""
        if self._sides is not None:
            return self._sides
        out: dict[str, list[str]] = {}
        for sd in (s for s in self.site_docs if s.is_condition):
            for side in self._doc_sides(sd):
                out.setdefault(side, []).append(sd.ref)
        if not out:
            groups: dict[tuple[Any, ...], list[tuple[_SiteDoc, set[str]]]] = {}
            for sd in (s for s in self.site_docs if not s.is_condition):
                enc = (sd.resource.get("encounter") or {}).get("reference")
                key = (_measure_key(sd.resource), _norm_ref(enc) if isinstance(enc, str) else _text_date(sd.resource))
                groups.setdefault(key, []).append((sd, self._doc_sides(sd)))
            for members in groups.values():
                if len(set().union(*(s for _sd, s in members))) > 1:
                    continue  # a comparison of both sides
                for sd, found in members:
                    for side in found:
                        out.setdefault(side, []).append(sd.ref)
        self._sides = out
        return out

    @cached_property
    def both_sides_coded(self) -> bool:
        """SPEC §3: the other side's code also active (e.g. M62.562 beside M62.561)."""
        others = self.profile.raw["laterality"].get("both_sides_with") or []
        wanted = {icd.normalize(c) for c in others}
        return bool(wanted) and any(
            d.active and {icd.normalize(c) for c in d.icd_codes} & wanted for d in self.conditions
        )


def _is_under_review(doc: _Doc, profile: Profile, site_codes: frozenset[str], site_terms: Terms) -> bool:
    """SPEC §3: active, coded with the profile's code or a listed less specific code, or uncoded
    with the profile's site as bodySite."""
    if not doc.active:
        return False
    if doc.icd_codes:
        for code in doc.icd_codes:
            bare = icd.normalize(code)
            if bare == profile.code or (code in profile.family and not profile.excludes1_match(code)):
                return True
        return False
    if _site_codes(doc.resource) & site_codes:
        return True
    return any(site_terms.search(str(b.get("text") or "")) for b in _concept_list(doc.resource.get("bodySite")))


def conditions_under_review(conditions: Iterable[Mapping[str, Any]], profile: Profile) -> list[str]:
    """The ``Condition/id`` of each Condition under review (SPEC §3), skipping what the check never counts.

    The check's own rule, on Conditions alone: a caller (the CDS service's fast path) can tell
    whether the profile's code is under review before reading the rest of a record.
    """
    _label, site_codes, site_terms = profile.site_terms[profile.region]
    docs = [
        _Doc(c, profile.vocabulary)
        for c in conditions
        if c.get("resourceType") == "Condition" and _counts_at_all(c) and not is_plugin_draft(c)
    ]
    return [d.ref for d in docs if _is_under_review(d, profile, site_codes, site_terms)]


# --- matching a rule -----------------------------------------------------------------------


def _matches(rule: Rule, doc: _Doc, ctx: _Context, *, history: bool = True) -> bool:
    """Does ``doc`` document this element?  ``history`` False leaves out resolved Conditions (SPEC §3.1)."""
    res = doc.resource
    if doc.type == "Condition" and not history and not doc.active:
        return False
    if rule.condition_fields and doc.ref in ctx.under_review_refs:
        for field_name in rule.condition_fields:
            if field_name == "onset" and any(k.startswith("onset") for k in res):
                return True
            if field_name == "onset-date" and _onset_date(res):
                return True
            if field_name == "severity" and res.get("severity"):
                return True
    if rule.icd10cm is not None and doc.type == "Condition" and any(code in rule.icd10cm for code in doc.icd_codes):
        return True
    value_ok = not rule.with_value or doc.has_value
    if doc.type == "Observation" and doc.answer is not None:
        # SPEC §3.2 answers as values: the answer decides, a "no" counting as a negated mention
        answer = doc.answered(rule.terms, rule.codes)
        if answer is not None:
            return answer or rule.negated_counts
    if rule.codes and not doc.codes.isdisjoint(rule.codes):
        return True
    if doc.type == "Observation" and value_ok:
        if rule.loinc and not doc.loinc.isdisjoint(rule.loinc):
            return True
        if rule.categories and not doc.categories.isdisjoint(rule.categories):
            return True
    if rule.terms and doc.type in rule.resource_types and value_ok:
        return any(
            m.present or (m.negated and not m.hypothetical and rule.negated_counts) for m in doc.mentions(rule.terms)
        )
    return False


def _evidence(rule: Rule, ctx: _Context, *, history: bool = True) -> list[str]:
    return [d.ref for d in ctx.by_rule.get(id(rule), ()) if _matches(rule, d, ctx, history=history)]


def _documents_finding(doc: _Doc, codes: frozenset[str], terms: Terms) -> bool:
    """A finding documented as there, by code, a positive answer or an un-negated, non-hypothetical word."""
    if not doc.active:
        return False
    answer = doc.answered(terms, codes)
    if answer is not None:
        return answer
    if doc.codes & codes:
        return True
    if not terms.may_occur(doc.index):
        return False
    return any(m.present for m in doc.mentions(terms))


# --- the elements --------------------------------------------------------------------------


def _lower_title(element: Mapping[str, Any]) -> str:
    return str(element.get("title", element["id"])).lower()


def _evidence_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    # SPEC §3.1: a resolved Condition never documents the finding
    history = element["id"] not in ctx.finding_rules
    found = _evidence(ctx.profile.rules[element["id"]], ctx, history=history)
    if not found:
        return "missing", [], f"no {_lower_title(element)} documented"
    detail = f"documented in {', '.join(found[:3])}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    if "onset-date" in ctx.profile.rules[element["id"]].condition_fields and ctx.onset:
        days = (ctx.reference_date - ctx.onset).days
        detail = f"onset {ctx.onset.isoformat()}, {days} days before the reference date; " + detail
    return "met", found, detail


def _side_of(sides: Mapping[str, list[str]]) -> str:
    if "bilateral" in sides or {"right", "left"} <= set(sides):
        return "bilateral"
    if sides:
        return next(iter(sides))
    return "unspecified"


def _site_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    sites = ctx.sites()
    own = ctx.profile.region
    others = {r: refs for r, refs in sites.items() if r != own}
    if others:
        names = ", ".join(f"{ctx.profile.site_terms[r][0]} ({', '.join(refs)})" for r, refs in others.items())
        return (
            "conflict",
            sorted({x for refs in others.values() for x in refs}),
            f"the record documents a site other than the {ctx.profile.site_terms[own][0]}: {names}",
        )
    if own in sites:
        return "met", sites[own], f"{ctx.profile.site_terms[own][0]} documented"
    return "missing", [], "no body site documented on the condition or a site-bearing observation"


def _laterality_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    sides = ctx.sides()
    side = _side_of(sides)
    refs = sorted({x for v in sides.values() for x in v})
    expected = ctx.profile.expected_side
    if side == "unspecified":
        return "missing", [], "no side documented"
    if expected is None or side == expected:
        return "met", refs, f"{side} side documented"
    if side == "bilateral" and ctx.both_sides_coded:
        return "met", refs, "both sides documented and both sides coded"
    return "conflict", refs, f"the record documents the {side} side; the code is for the {expected} side"


def _excludes1_found(ctx: _Context) -> list[tuple[str, str, str]]:
    """(excluded code, note, Condition ref) for every active Condition the code's Excludes1 forbids."""
    out = []
    for doc in ctx.conditions:
        if not doc.active:
            continue
        for code in sorted(doc.icd_codes):
            hit = ctx.profile.excludes1_match(code)
            if hit:
                out.append((icd.normalize(code), hit[1], doc.ref))
    return out


def _excludes1_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    found = _excludes1_found(ctx)
    if found:
        names = "; ".join(f"{note} on {ref}" for _code, note, ref in found)
        return "conflict", [ref for _c, _n, ref in found], f"Excludes1: {names}"
    return "met", [], "no active condition that the code's Excludes1 note forbids"


def _truncation_note(ctx: _Context) -> str:
    if not ctx.truncated:
        return ""
    return (
        f"text beyond {MAX_FIELD_CHARS:,} characters of a field was not read in "
        + ", ".join(ctx.truncated[:5])
        + (f" and {len(ctx.truncated) - 5} more" if len(ctx.truncated) > 5 else "")
    )


def _flag_screen_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult], flags: list[RedFlagResult]
) -> tuple[str, list[str], str]:
    undocumented = [f.id for f in flags if f.status == "not-documented"]
    refs = sorted({r for f in flags for r in f.evidence})
    cut = _truncation_note(ctx)
    if undocumented:
        return "missing", refs, "red flags not documented: " + ", ".join(undocumented) + (f"; {cut}" if cut else "")
    return "met", refs, "every red flag documented as present or absent" + (f"; {cut}" if cut else "")


def _care_plan_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    own_drafts = {
        _ref(r)
        for r in ctx.drafts
        if r["resourceType"] == "Condition"
        and any(c.get("code") == ctx.profile.code for c in (r.get("code") or {}).get("coding") or [])
    }
    clinician, proposed = [], []
    for plan in ctx.care_plans:
        addressed = _references(plan, "addresses")
        if is_plugin_draft(plan):
            if addressed & (ctx.under_review_refs | own_drafts):
                proposed.append(_ref(plan))
        elif plan.get("status") in _PLAN_COUNTS and addressed & ctx.under_review_refs:  # SPEC §3.1, §7.1
            clinician.append(_ref(plan))
    # the plan as a note, on a server without CarePlan create (issue 12, writer d): the plugin's too
    for note in ctx.plan_notes:
        if _references(note.careplan, "addresses") & (ctx.under_review_refs | own_drafts):
            proposed.append(note.ref)
    if clinician:
        return "met", clinician, "a care plan addresses the condition"
    if proposed:
        return "proposed", proposed, "only the plugin's draft care plan exists; it awaits clinician review"
    return "missing", [], "no care plan addresses the condition"


def _visits_for_condition(ctx: _Context, done: dict[str, ElementResult]) -> list[_Doc]:
    """SPEC §3.1 *A visit is for the condition*."""
    linked = {ref for d in ctx.under_review for ref in _references(d.resource, "encounter")}
    documenting = {ref for e in done.values() for ref in e.evidence if ref.startswith("Observation/")}
    for d in ctx.observations:
        if d.ref in documenting:
            linked |= _references(d.resource, "encounter")
    out = []
    for doc in ctx.visits:
        refs = _references(doc.resource, "reasonReference", "diagnosis")
        coded = any(
            c.get("system") == ICD10CM
            and isinstance(c.get("code"), str)
            and icd.normalize(c["code"]) == ctx.profile.code
            for concept in _concept_list(doc.resource.get("reasonCode"))
            for c in _codings(concept)
        )
        if refs & ctx.under_review_refs or doc.ref in linked or coded:
            out.append(doc)
    return out


def _follow_up_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    days: dict[str, str] = {}
    for doc in _visits_for_condition(ctx, done):
        start = (doc.resource.get("period") or {}).get("start")
        # the calendar day as written, in its own time zone (SPEC §3 follow-up)
        if isinstance(start, str) and _date(start):
            days.setdefault(start[:10], doc.ref)
    ordered = sorted(days.items())
    # the windows are profile data (SPEC §3.1: two calendar days; not-yet-due under 42 days), required by the schema
    min_days = int(element["min_days_after"])
    due_days = int(element["due_after_days"])
    if ordered:
        first = date.fromisoformat(ordered[0][0])
        later = [(day, ref) for day, ref in ordered[1:] if (date.fromisoformat(day) - first).days >= min_days]
        if later:
            return "met", [ordered[0][1], later[0][1]], f"follow-up on {later[0][0]}"
        first_day, first_ref = ordered[0]
        age = (ctx.today - date.fromisoformat(first_day)).days
        if age < due_days:
            return "not-yet-due", [first_ref], f"one visit day, {age} days ago; follow-up due by day {due_days}"
        return "missing", [first_ref], f"one visit day, {age} days ago, and no follow-up"
    return "missing", [], "no visit for the condition"


def _repeated_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    by_code: dict[tuple[str, str], dict[date, str]] = {}
    for doc in ctx.observations:
        when = _date(doc.resource.get("effectiveDateTime")) or _date(
            (doc.resource.get("effectivePeriod") or {}).get("start")
        )
        codings = _codings(doc.resource.get("code") or {})
        if when and codings and codings[0].get("code"):
            key = (str(codings[0].get("system", "")), str(codings[0]["code"]))
            by_code.setdefault(key, {}).setdefault(when, doc.ref)
    for (_system, code), dates in sorted(by_code.items()):
        if len(dates) >= 2:
            return "met", [dates[d] for d in sorted(dates)], f"{code} recorded on {len(dates)} dates"
    return "missing", [], "no observation repeated on two dates"


def _all_of_element(
    element: Mapping[str, Any], ctx: _Context, done: dict[str, ElementResult]
) -> tuple[str, list[str], str]:
    missing = [ref for ref in element["of"] if done[ref].status != "met"]
    if missing:
        return "missing", [], "not supported yet: " + ", ".join(missing) + " must be met"
    return (
        "met",
        sorted({r for ref in element["of"] for r in done[ref].evidence}),
        "supported by " + ", ".join(element["of"]),
    )


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
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    unit = q.get("code") or q.get("unit") or "Cel"
    if unit in ("[degF]", "degF", "°F", "F"):
        return (float(value) - 32.0) * 5.0 / 9.0
    return float(value)


def _in_window(when: date | None, ctx: _Context, days: int | None) -> bool:
    """SPEC §4: a date window applies to present and absent alike; undated text counts."""
    if days is None or when is None:
        return True
    return 0 <= (ctx.reference_date - when).days <= days


def _red_flag(flag: Mapping[str, Any], ctx: _Context) -> RedFlagResult:
    rule = ctx.profile.flag_rules[flag["id"]]
    recent = flag.get("recent_icd10cm")
    window = int(recent["days"]) if recent else None
    present: list[str] = []
    absent: list[str] = []
    details: list[str] = []
    for doc in ctx.by_rule.get(id(rule), ()):
        if doc.type == "Condition" and any(_family_history_code(c) for c in doc.icd_codes):
            continue  # SPEC §4: Z80–Z84 (family history) document nothing
        if not _in_window(doc.when, ctx, window):
            continue
        if doc.type == "Condition" and rule.icd10cm is not None and any(c in rule.icd10cm for c in doc.icd_codes):
            present.append(doc.ref)
            continue
        if not rule.terms:
            continue
        answer = doc.answered(rule.terms)
        if answer is not None:
            (present if answer else absent).append(doc.ref)
            continue
        said = [m for m in doc.mentions(rule.terms) if not m.hypothetical and not m.family]
        if any(not m.negated for m in said):
            present.append(doc.ref)
        elif said:
            absent.append(doc.ref)
    if recent:
        codes = ctx.profile.recent_codes[flag["id"]]
        for doc in ctx.conditions:
            if any(c in codes for c in doc.icd_codes):
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
    cut = _truncation_note(ctx) if rule.terms else ""
    if cut:
        details.append(cut)
    if absent:
        return RedFlagResult(flag["id"], title, "absent", tuple(dict.fromkeys(absent)), "; ".join(details))
    return RedFlagResult(flag["id"], title, "not-documented", (), "; ".join(details) or "not documented")


# --- code fit ------------------------------------------------------------------------------


def _suggest(codes: Iterable[str], reason: str) -> tuple[Suggestion, ...]:
    return tuple(Suggestion(c, icd.title(c), reason) for c in codes)


def _code_fit(ctx: _Context) -> CodeFit:
    profile = ctx.profile
    sites = ctx.sites()
    sides = ctx.sides()
    side = _side_of(sides)
    findings = [
        name
        for name, (codes, terms) in profile.finding_terms.items()
        if any(_documents_finding(d, codes, terms) for d in ctx.by_rule.get(id(ctx.finding_rules_by_name[name]), ()))
    ]
    documented: dict[str, Any] = {
        "site": tuple(sites),
        "side": None if side == "unspecified" else side,
        "finding": tuple(findings),
    }
    excluded = _excludes1_found(ctx)
    if excluded:
        codes = list(dict.fromkeys(code for code, _note, _ref in excluded))
        notes = "; ".join(dict.fromkeys(note for _c, note, _r in excluded))
        return CodeFit(
            "mismatch",
            _suggest(codes, f"an active condition is excluded by the Excludes1 note: {notes}"),
            f"{profile.code} may not be coded with {', '.join(codes)}",
            **documented,
        )
    if not sites or not findings:
        # SPEC §5: site and side without a finding, or no site: the record documents too little to tell
        lacking = [name for name, have in (("site", sites), ("finding", findings)) if not have]
        return CodeFit("insufficient", (), "the record does not document the " + " or ".join(lacking), **documented)
    # SPEC §5 / §2: the profile's own finding is the finding whenever it is documented
    effective = [profile.expected_finding] if profile.expected_finding in findings else findings
    fit_side = side
    if side == "bilateral" and ctx.both_sides_coded and profile.expected_side is not None:
        fit_side = profile.expected_side  # both sides documented and both coded (SPEC §5)
    for rule in profile.raw["code_fit"]["rules"]:
        when = rule["when"]
        if "finding" in when and when["finding"] not in effective:
            continue
        if "region" in when and when["region"] not in sites:
            continue
        if "without_region" in when and when["without_region"] in sites:
            continue
        if "side" in when and when["side"] != fit_side:
            continue
        return CodeFit(
            "mismatch",
            _suggest(rule["suggest"], rule.get("reason", "")),
            f"the documentation does not support {profile.code}",
            **documented,
        )
    expected_side = profile.expected_side
    if (
        profile.expected_finding in findings
        and profile.region in sites
        and (expected_side is None or fit_side == expected_side)
    ):
        return CodeFit("fits", (), f"site, side and finding support {profile.code}", **documented)
    if expected_side is not None and side == "unspecified":
        return CodeFit("insufficient", (), "the record does not document the side", **documented)
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
        done[element["id"]] = ElementResult(
            element["id"],
            str(element.get("title", element["id"])),
            bool(element["required"]),
            status,  # type: ignore[arg-type]
            tuple(dict.fromkeys(evidence)),
            detail,
        )
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
