"""Synthetic patients for the M62.561 check, each with its expected outcome (the test oracle).

``generate_cases(as_of)`` builds one small FHIR R4 record per case — a Patient, the
Conditions, Encounters and Observations a clinician would leave behind, and usually a
CarePlan — with every date counted back from ``as_of`` (the "today" of the check), so the
same ``as_of`` always gives byte-identical output.  Every id starts with ``fp-`` so the
patients can be loaded next to other people's data on a shared public server.

Each case's ``expected`` was worked out by hand from SPEC.md (§3 elements, §4 red flags,
§5 code fit, §6 ``complete``), element by element; nothing here calls the check.  The
"complete" case is written out in full; every other case states by hand what differs
from it.  The cases rely only on SPEC's minimum keyword lists: text meant to leave an
element missing avoids those keywords and their obvious synonyms.

Readings of SPEC this oracle relies on (the check must agree):

1. ``treatment-plan``: ``met`` when a CarePlan that is not ``entered-in-error`` (and is not the
   plugin's own draft) ``addresses`` a Condition under review; ``proposed`` when the only such
   CarePlan is the plugin's own draft, recognised by the shape SPEC §7 gives it (status
   ``draft``, intent ``proposal``, ``instantiatesCanonical`` the profile's PlanDefinition, and
   the plugin's ``machine-drafted`` tag from ``fhir_plugin._vocab``); a CarePlan
   ``entered-in-error`` counts for nothing.  ``proposed`` is
   not ``met``, so a record whose only plan is the plugin's draft is not ``complete``.
2. ``follow-up`` looks at every Encounter that references a Condition under review, whatever
   the reference encounter: the record is not cut at the reference date.  Only ``duration``,
   ``persistent-beyond-expected`` (and the 90-day trauma window) are measured from it.
3. Side: only "bilateral" (or right and left together) is bilateral.  Side unspecified with
   site and finding right is code fit ``mismatch`` suggesting M62.569; bilateral is ``mismatch``
   suggesting M62.561 and M62.562.
4. Code fit ``insufficient`` (suggesting nothing) when the site or the finding is undocumented
   and nothing documented contradicts the code; ``mismatch`` when an Excludes1 condition is
   active, suggesting that condition's code.
5. "No numbness" and "Denies weight loss" are documented negatives (``absent``); "Notes numbness"
   is not negated ("no" is a whole word only), nor is a sentence after "Denies fever.";
   "feedback" and "upright" are not "back" and "right" (keywords match whole words, SPEC §3.2).  A red-flag Observation whose
   code names the flag reads as ``absent`` with ``valueBoolean`` false or SNOMED 373067005 "No",
   and ``present`` with ``valueBoolean`` true or SNOMED 373066001 "Yes".
6. Text in a CarePlan counts only for ``treatment-plan`` (the clinical example's "posture
   correction" in its plan does not document a posture inspection).
7. An Observation without ``bodySite`` sets neither site nor side (SPEC §3): the complete case
   carries "Left calf, measured for comparison" and is still right-sided.
9. The variations at the end of the table (SPEC §3.1–§3.2, §4, §5) each differ from a table case by one
   reading rule, written in their own words; each one's outcome differs from what the check gave before
   those rules (return precautions, a negation that does not reach, answers as text, refuted and resolved
   Conditions, a planned visit, a blood pressure's bodySite, a separate diagnosis, both sides coded, a
   relative's cancer, "Rt calf"/"nontender", an old fracture note, two visits on one day).
8. ``large_record`` keeps the complete case's outcome: the extra Observations are heart and
   respiratory rates, which no element or flag reads.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ._vocab import DRAFT_TAG  # the tag the plugin puts on its own drafts (SPEC §7)

__all__ = [
    "SyntheticCase",
    "generate_cases",
    "large_record",
    "many_patients",
    "cases_bundle",
    "case_bundle",
    "save_cases",
    "load_into_server",
    "renamed_case",
]

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
#: the canonical URL of the M62.561 profile's PlanDefinition (profiles/M62.561/plandefinition.json)
PLAN_DEFINITION_URL = "urn:fhir-plugin:PlanDefinition:M62.561"


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic patient: its resources and what the check must say about them."""

    key: str
    title: str
    patient_id: str
    resources: list[dict[str, Any]]
    encounter_id: str | None
    expected: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Hand-derived expectations.  The complete case in full; every other case as differences.
# --------------------------------------------------------------------------------------------

_COMPLETE_ELEMENTS: dict[str, str] = {
    "onset": "met",                     # Condition.onsetDateTime; HPI "Gradual onset"
    "duration": "met",                  # onset dated; HPI "Symptom duration"
    "severity": "met",                  # LOINC 72514-3 with valueQuantity, on both encounters
    "exacerbating-factors": "met",      # "aggravated by stair climbing"
    "prior-treatment-response": "met",  # "Prior treatment with a home stretching program"
    "injury-history": "met",            # "Surgical history: appendectomy."
    "lifestyle-occupation": "met",      # LOINC 11341-5, category social-history, "Sedentary"
    "physical-exam": "met",             # Observations of category exam
    "range-of-motion": "met",           # "Ankle range of motion"
    "palpation": "met",                 # "Palpation of calf muscles", "tenderness"
    "neuro-exam": "met",                # "Neurological exam", "reflexes", "Sensation"
    "posture-inspection": "met",        # "Posture upright"
    "body-site": "met",                 # SNOMED 32696007 on Condition and exam Observations
    "laterality": "met",                # 32696007, "right"; the left comparison has no bodySite
    "atrophy-finding": "met",           # "Disuse atrophy", "Visible atrophy"
    "objective-measure": "met",         # calf circumference (cm), plantarflexion strength 4/5
    "etiology": "met",                  # "Disuse", "bed rest"
    "excludes1": "met",                 # no G54.5 / G12.21 / M62.84
    "functional-limitation": "met",     # "difficulty walking"
    "red-flag-screen": "met",           # all seven flags absent
    "treatment-plan": "met",            # active CarePlan addressing the Condition
    "follow-up": "met",                 # second encounter 14 days after the first
    "treatment-response": "met",        # pain score, temperature, circumference on two dates
    "medical-necessity": "met",         # exam, objective measure, function, severity all met
}

_COMPLETE_FLAGS: dict[str, str] = {
    "progressive-neuro-deficit": "absent",  # "No numbness, foot drop or progressive weakness."
    "bowel-bladder-dysfunction": "absent",  # Observation "Bowel or bladder dysfunction" valueBoolean false
    "cancer-history": "absent",             # Observation "History of cancer" = SNOMED 373067005 No
    "significant-trauma": "absent",         # "Negative for trauma or accident."
    "weight-loss": "absent",                # "Denies weight loss."
    "fever": "absent",                      # body temperature 36.8 / 36.9 Cel
    "persistent-beyond-expected": "absent",  # onset 34 days before the latest encounter
}


def _expect(*, elements: dict[str, str] | None = None, red_flags: dict[str, str] | None = None,
            code_fit: str = "fits", suggested: Sequence[str] = (), complete: bool,
            referral: bool, base: bool = True) -> dict[str, Any]:
    """An expected outcome: the complete case's statuses with these differences (or, with
    ``base=False``, exactly the given ones)."""
    els = dict(_COMPLETE_ELEMENTS) if base else {}
    flags = dict(_COMPLETE_FLAGS) if base else {}
    for k, v in (elements or {}).items():
        if base and k not in els:
            raise KeyError(f"unknown element id {k!r}")
        els[k] = v
    for k, v in (red_flags or {}).items():
        if base and k not in flags:
            raise KeyError(f"unknown red flag id {k!r}")
        flags[k] = v
    return {"elements": els, "red_flags": flags, "code_fit": code_fit,
            "suggested": sorted(suggested), "complete": complete, "referral_recommended": referral}


# --------------------------------------------------------------------------------------------
# Small FHIR helpers
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _icd_title(code: str) -> str:
    """The official ICD-10-CM title, from the data package (never typed by hand, SPEC §1)."""
    import simple_icd_10_cm as cm  # deferred: the data takes a moment to load

    return cm.get_description(code)


def _cc(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        out["text"] = text
    return out


def _icd(code: str) -> dict[str, Any]:
    return {"coding": [{"system": ICD10CM, "code": code, "display": _icd_title(code)}]}


def _ref(rtype: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rtype}/{rid}"}


def _stamp(day: dt.date, hour: int = 9, minute: int = 0) -> str:
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}:00Z"


def _obs_category(code: str) -> list[dict[str, Any]]:
    names = {"exam": "Exam", "vital-signs": "Vital Signs", "social-history": "Social History",
             "survey": "Survey"}
    return [_cc(_OBS_CATEGORY, code, names[code])]


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _patient(pid: str, given: str, family: str, gender: str, age: int, as_of: dt.date,
             birth_month: int, birth_day: int) -> dict[str, Any]:
    # the birthday falls before as_of in its year or after it; either way the age is `age`
    year = as_of.year - age
    if (birth_month, birth_day) > (as_of.month, as_of.day):
        year -= 1
    return {"resourceType": "Patient", "id": pid, "active": True,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "gender": gender, "birthDate": dt.date(year, birth_month, birth_day).isoformat()}


def _condition(cid: str, pid: str, code: str, *, status: str = "active", category: str = "encounter-diagnosis",
               body_site: dict[str, Any] | None = None, code_text: str | None = None,
               onset: dt.date | None = None, recorded: dt.date, encounter: str | None = None,
               notes: Sequence[str] = ()) -> dict[str, Any]:
    cat_display = {"encounter-diagnosis": "Encounter Diagnosis", "problem-list-item": "Problem List Item"}
    res: dict[str, Any] = {
        "resourceType": "Condition", "id": cid,
        "clinicalStatus": _cc(_COND_CLINICAL, status, status.capitalize()),
        "verificationStatus": _cc(_COND_VERIFICATION, "confirmed", "Confirmed"),
        "category": [_cc(_COND_CATEGORY, category, cat_display[category])],
        "code": _icd(code),
    }
    if code_text:
        res["code"]["text"] = code_text
    if body_site:
        res["bodySite"] = [body_site]
    res["subject"] = _ref("Patient", pid)
    if encounter:
        res["encounter"] = _ref("Encounter", encounter)
    if onset:
        res["onsetDateTime"] = onset.isoformat()
    res["recordedDate"] = recorded.isoformat()
    if notes:
        res["note"] = [{"text": n} for n in notes]
    return res


def _encounter(eid: str, pid: str, start: dt.date, condition_ids: Sequence[str], label: str) -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": _ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "type": [{"text": label}],
            "subject": _ref("Patient", pid),
            "period": {"start": _stamp(start), "end": _stamp(start, 9, 30)},
            "reasonReference": [_ref("Condition", c) for c in condition_ids]}


def _observation(oid: str, pid: str, eid: str | None, when: dt.date, code: dict[str, Any], *,
                 category: str | None, value: dict[str, Any] | None = None,
                 body_site: dict[str, Any] | None = None, note: str | None = None,
                 minute: int = 5) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final"}
    if category:
        res["category"] = _obs_category(category)
    res["code"] = code
    res["subject"] = _ref("Patient", pid)
    if eid:
        res["encounter"] = _ref("Encounter", eid)
    res["effectiveDateTime"] = _stamp(when, 9, minute)
    if value:
        res.update(value)
    if body_site:
        res["bodySite"] = body_site
    if note:
        res["note"] = [{"text": note}]
    return res


# --------------------------------------------------------------------------------------------
# The case builder: the complete record, with knobs that take one piece of evidence away
# --------------------------------------------------------------------------------------------

# body sites, as (SNOMED code, display, text) per (region, side)
_SITES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("lower-leg", "right"): ("32696007", "Structure of right lower leg", "Right calf"),
    ("lower-leg", "left"): ("48979004", "Structure of left lower leg", "Left calf"),
    ("lower-leg", "none"): ("30021000", "Structure of lower leg", "Calf"),
    ("lower-leg", "bilateral"): ("30021000", "Structure of lower leg", "Both calves (bilateral)"),
    ("thigh", "right"): ("11207009", "Structure of right thigh", "Right thigh"),
    ("thigh", "left"): ("61396006", "Structure of left thigh", "Left thigh"),
    ("leg", "right"): ("62175007", "Structure of right lower limb", "Right leg"),
}

# words per region: muscle (singular), its muscles, palpation spot, circumference, ROM, MMT
_REGION_TEXT: dict[str, dict[str, str]] = {
    "lower-leg": {
        "muscle": "calf", "muscles": "gastrocnemius and soleus", "palp_code": "Palpation of calf muscles",
        "palp_spot": "the medial gastrocnemius", "circ": "Calf circumference",
        "circ_note": "Measured 10 cm below the tibial tuberosity.", "circ_values": "34.5,35.0,37.5",
        "rom_code": "Ankle range of motion",
        "rom_value": "Active ankle dorsiflexion 10 degrees and plantarflexion 35 degrees.",
        "mmt": "Ankle plantarflexion strength (manual muscle test)", "plan": "Calf strengthening program",
    },
    "thigh": {
        "muscle": "thigh", "muscles": "quadriceps", "palp_code": "Palpation of thigh muscles",
        "palp_spot": "the vastus medialis", "circ": "Thigh circumference",
        "circ_note": "Measured 15 cm above the patella.", "circ_values": "48.0,48.5,51.0",
        "rom_code": "Knee range of motion", "rom_value": "Active knee flexion 120 degrees with full extension.",
        "mmt": "Knee extension strength (manual muscle test)", "plan": "Thigh strengthening program",
    },
    "leg": {
        "muscle": "leg", "muscles": "leg muscles", "palp_code": "Palpation of leg muscles",
        "palp_spot": "the posterior leg muscles", "circ": "Leg circumference",
        "circ_note": "Measured at the point of greatest girth.", "circ_values": "34.5,35.0,37.5",
        "rom_code": "Ankle range of motion",
        "rom_value": "Active ankle dorsiflexion 10 degrees and plantarflexion 35 degrees.",
        "mmt": "Ankle plantarflexion strength (manual muscle test)", "plan": "Leg strengthening program",
    },
}


@dataclass(frozen=True)
class _Knobs:
    """How a case differs from the complete record.  Day counts are days before ``as_of``."""

    region: str = "lower-leg"            # lower-leg | thigh | leg (level not stated)
    side: str = "right"                  # right | left | bilateral | none
    finding: str = "atrophy"             # atrophy | bulk (no atrophy word) | spasm
    etiology: str = "after three weeks of bed rest"
    onset_date: bool = True
    onset_text: bool = True
    duration_text: bool = True
    onset_day: int = 40
    encounter_days: tuple[int, ...] = (20, 6)
    severity: bool = True
    exacerbating: bool = True
    prior_treatment: bool = True
    functional: bool = True
    exam_category: bool = True
    rom: bool = True
    palpation: bool = True
    neuro: bool = True
    objective: bool = True
    careplan: str = "active"             # active | entered-in-error | plugin-draft | none
    occupation: str = "Accountant"
    flag_neuro: str = "absent"           # absent | present
    flag_bowel_bladder: str = "absent"   # absent | present
    flag_cancer: str = "absent"          # absent | present
    flag_trauma: str = "absent"          # absent | present
    flag_weight_loss: str = "absent"     # absent | present | omitted
    flag_fever: str = "absent"           # absent | present
    sarcopenia: str | None = None        # None | active | inactive


def _where(k: _Knobs) -> str:
    """Where the problem is, as a clinician would write it ("the right calf")."""
    muscle = _REGION_TEXT[k.region]["muscle"]
    if k.side == "bilateral":
        return f"the {muscle}s bilaterally".replace("calfs", "calves")
    if k.side == "none":
        return f"the {muscle}"
    return f"the {k.side} {muscle}"


def _muscles_where(k: _Knobs) -> str:
    muscles = _REGION_TEXT[k.region]["muscles"]
    if k.side == "bilateral":
        return f"the {muscles} bilaterally"
    if k.side == "none":
        return f"the {muscles}"
    return f"the {k.side} {muscles}"


def _site_cc(region: str, side: str) -> dict[str, Any]:
    code, display, text = _SITES[(region, side)]
    return _cc(SNOMED, code, display, text)


def _build(key: str, as_of: dt.date, k: _Knobs, person: tuple[str, str, str, int, int, int]) -> list[dict[str, Any]]:
    """The resources of one case built from the complete record and its knobs."""
    pid = f"fp-{key}"
    given, family, gender, age, bmonth, bday = person
    rt = _REGION_TEXT[k.region]
    day = lambda n: as_of - dt.timedelta(days=n)  # noqa: E731 - a date n days before as_of
    enc_days = list(k.encounter_days)
    enc_ids = [f"{pid}-enc{i + 1}" for i in range(len(enc_days))]
    cond_id = f"{pid}-cond"
    site = _site_cc(k.region, k.side)
    where = _where(k)
    out: list[dict[str, Any]] = [_patient(pid, given, family, gender, age, as_of, bmonth, bday)]

    # --- the Condition under review -------------------------------------------------------
    if k.finding == "atrophy":
        finding_note = f"Disuse atrophy of {where} {k.etiology}."
    elif k.finding == "bulk":
        finding_note = f"Disuse-related loss of muscle bulk in {where} {k.etiology}."
    else:  # spasm
        finding_note = f"Recurrent muscle spasm of {where} after long periods of standing at work."
    if finding_note[0].islower():
        finding_note = finding_note[0].upper() + finding_note[1:]
    out.append(_condition(cond_id, pid, "M62.561", body_site=site,
                          onset=day(k.onset_day) if k.onset_date else None,
                          recorded=day(enc_days[0]), encounter=enc_ids[0],
                          notes=[finding_note, "Patient feedback: the home program is manageable."]))
    other_conditions: list[str] = []
    if k.flag_trauma == "present":
        # S82 injury 40 days before the latest encounter: within 90 days (SPEC §4), not under review (no bodySite)
        out.append(_condition(f"{pid}-fracture", pid, "S82.201D", category="problem-list-item",
                              onset=day(enc_days[-1] + 40), recorded=day(enc_days[-1] + 40)))
        other_conditions.append(f"{pid}-fracture")
    if k.flag_cancer == "present":
        out.append(_condition(f"{pid}-cancer-history", pid, "Z85.3", category="problem-list-item",
                              recorded=day(enc_days[0] + 400)))
    if k.sarcopenia:
        out.append(_condition(f"{pid}-sarcopenia", pid, "M62.84", status=k.sarcopenia,
                              category="problem-list-item", recorded=day(enc_days[0] + 200)))

    # --- Encounters -------------------------------------------------------------------------
    for i, (eid, n) in enumerate(zip(enc_ids, enc_days)):
        out.append(_encounter(eid, pid, day(n), [cond_id], "Office visit" if i == 0 else "Follow-up visit"))

    # --- Observations at the first encounter ----------------------------------------------------
    e1, d1 = enc_ids[0], day(enc_days[0])
    weeks = round((k.onset_day - enc_days[0]) / 7)
    if k.finding == "spasm":
        story = f"cramping of {where} after a change to longer standing shifts"
        aggravation = "Spasm is aggravated by prolonged standing."
    else:
        story = f"weakness and thinning of {where} {k.etiology}"
        aggravation = "Weakness is aggravated by stair climbing and prolonged walking."
    hpi: list[str] = [f"Gradual onset of {story}." if k.onset_text else f"{story[0].upper()}{story[1:]}."]
    if k.duration_text:
        hpi.append(f"Symptom duration about {weeks} weeks.")
    if k.exacerbating:
        hpi.append(aggravation)
    if k.prior_treatment:
        hpi.append("Prior treatment with a home stretching program gave partial relief.")
    if k.functional:
        hpi.append("Reports difficulty walking more than two blocks.")
    hpi.append("Surgical history: appendectomy.")
    if k.flag_cancer == "present":
        hpi.append("History of breast cancer treated eight years ago.")
    if k.flag_neuro == "present":
        # "Notes" is not the negation "no"; "Denies fever." ends before the numbness sentence
        hpi.append("Denies fever. Notes numbness over the dorsum of the foot at night.")
    else:
        hpi.append("No numbness, foot drop or progressive weakness.")
    if k.flag_weight_loss == "present":
        hpi.append("Reports unintentional weight loss of 5 kg over two months.")
    elif k.flag_weight_loss == "absent":
        hpi.append("Denies weight loss.")
    if k.flag_trauma == "present":
        hpi.append("Closed fracture of the right tibial shaft after a fall from a ladder, treated in a cast.")
    else:
        hpi.append("Negative for trauma or accident.")
    out.append(_observation(f"{pid}-hpi1", pid, e1, d1,
                            _cc(LOINC, "10164-2", "History of Present illness Narrative"),
                            category="survey", value={"valueString": " ".join(hpi)}, minute=1))
    out.append(_observation(f"{pid}-occ1", pid, e1, d1, _cc(LOINC, "11341-5", "History of Occupation"),
                            category="social-history", value={"valueCodeableConcept": {"text": k.occupation}},
                            note="Sedentary desk work." if k.occupation == "Accountant" else None, minute=2))
    out.append(_observation(f"{pid}-bb1", pid, e1, d1, {"text": "Bowel or bladder dysfunction"},
                            category="survey", value={"valueBoolean": k.flag_bowel_bladder == "present"},
                            note="New urinary retention since last week." if k.flag_bowel_bladder == "present" else None,
                            minute=3))
    cancer_answer = (_cc(SNOMED, "373066001", "Yes", "Yes") if k.flag_cancer == "present"
                     else _cc(SNOMED, "373067005", "No", "No"))
    out.append(_observation(f"{pid}-ca1", pid, e1, d1, {"text": "History of cancer"}, category="survey",
                            value={"valueCodeableConcept": cancer_answer}, minute=4))

    pain_values = (5, 3)
    temp_values = (36.8, 38.4 if k.flag_fever == "present" else 36.9)
    exam = "exam" if k.exam_category else None
    circ_values = [float(v) for v in rt["circ_values"].split(",")]

    def per_encounter(i: int, eid: str, when: dt.date) -> None:
        n = i + 1
        if k.severity:
            out.append(_observation(f"{pid}-pain{n}", pid, eid, when,
                                    _cc(LOINC, "72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported"),
                                    category="survey",
                                    value={"valueQuantity": {"value": pain_values[min(i, 1)], "unit": "{score}",
                                                             "system": UCUM, "code": "{score}"}}, minute=6))
        fever_note = "Reports fever and chills since yesterday." if (k.flag_fever == "present" and i > 0) else None
        out.append(_observation(f"{pid}-temp{n}", pid, eid, when, _cc(LOINC, "8310-5", "Body temperature"),
                                category="vital-signs",
                                value={"valueQuantity": _quantity(temp_values[min(i, 1)], "Cel")},
                                note=fever_note, minute=7))
        if k.objective:
            if k.side == "bilateral":
                for side in ("right", "left"):
                    out.append(_observation(f"{pid}-circ{side[0]}{n}", pid, eid, when, {"text": rt["circ"]},
                                            category=exam,
                                            value={"valueQuantity": _quantity(circ_values[min(i, 1)], "cm")},
                                            body_site=_site_cc(k.region, side), note=rt["circ_note"], minute=8))
            else:
                out.append(_observation(f"{pid}-circ{n}", pid, eid, when, {"text": rt["circ"]}, category=exam,
                                        value={"valueQuantity": _quantity(circ_values[min(i, 1)], "cm")},
                                        body_site=site, note=rt["circ_note"], minute=8))

    per_encounter(0, e1, d1)
    if k.finding == "atrophy":
        inspection = f"Visible atrophy of {_muscles_where(k)}."
    elif k.finding == "bulk":
        inspection = f"Visible loss of bulk of {_muscles_where(k)}."
    else:
        inspection = f"Palpable spasm of {_muscles_where(k)}."
    inspection += " Posture upright with even weight bearing."  # "upright" is not "right"
    muscle_title = rt["muscle"].capitalize()
    out.append(_observation(f"{pid}-insp1", pid, e1, d1, {"text": f"{muscle_title} inspection"}, category=exam,
                            value={"valueString": inspection}, body_site=site, minute=10))
    if k.rom:
        out.append(_observation(f"{pid}-rom1", pid, e1, d1, {"text": rt["rom_code"]}, category=exam,
                                value={"valueString": rt["rom_value"]}, body_site=site, minute=11))
    if k.palpation:
        out.append(_observation(f"{pid}-palp1", pid, e1, d1, {"text": rt["palp_code"]}, category=exam,
                                value={"valueString": f"Mild tenderness over {rt['palp_spot']}; no palpable mass."},
                                body_site=site, minute=12))
    if k.neuro:
        neuro_code = ("Neurological exam of the lower extremity" if k.exam_category
                      else "Neurological assessment of the lower extremity")
        out.append(_observation(f"{pid}-neuro1", pid, e1, d1, {"text": neuro_code}, category=exam,
                                value={"valueString": "Ankle reflexes 2+ and symmetric. Sensation intact to light "
                                                      "touch. Straight leg raise negative."}, minute=13))
    if k.objective:
        out.append(_observation(f"{pid}-mmt1", pid, e1, d1, {"text": rt["mmt"]}, category=exam,
                                value={"valueString": "4/5"}, body_site=site, minute=14))
        if k.side in ("right", "left"):
            # the other side, for comparison, without bodySite: it sets neither site nor side (SPEC §3)
            other = "left" if k.side == "right" else "right"
            out.append(_observation(f"{pid}-circcmp1", pid, e1, d1, {"text": rt["circ"]}, category=exam,
                                    value={"valueQuantity": _quantity(circ_values[2], "cm")},
                                    note=f"{other.capitalize()} {rt['muscle']}, measured for comparison.", minute=15))
    for i in range(1, len(enc_ids)):
        per_encounter(i, enc_ids[i], day(enc_days[i]))

    # --- CarePlan ---------------------------------------------------------------------------
    if k.careplan in ("active", "entered-in-error"):
        out.append({"resourceType": "CarePlan", "id": f"{pid}-careplan", "status": k.careplan, "intent": "plan",
                    "category": [{"text": "Physical therapy plan"}],
                    "title": rt["plan"],
                    "description": "Heel raises, ankle pumps and resistance-band plantarflexion; reassess in two weeks.",
                    "subject": _ref("Patient", pid), "encounter": _ref("Encounter", enc_ids[0]),
                    "period": {"start": day(enc_days[0]).isoformat()},
                    "addresses": [_ref("Condition", cond_id)],
                    "activity": [{"detail": {"code": {"text": "Home exercise program"}, "status": "in-progress",
                                             "description": "Daily heel raises and ankle pumps."}}]})
    elif k.careplan == "plugin-draft":
        out.append(_plugin_draft_careplan(pid, cond_id, enc_ids[-1], day(enc_days[-1])))
    return out


def _plugin_draft_careplan(pid: str, cond_id: str, eid: str, when: dt.date) -> dict[str, Any]:
    """A CarePlan shaped like the plugin's own draft (SPEC §7): status draft, intent proposal."""
    return {"resourceType": "CarePlan", "id": f"{pid}-careplan-draft",
            "meta": {"tag": [dict(DRAFT_TAG)]},
            "instantiatesCanonical": [PLAN_DEFINITION_URL],
            "status": "draft", "intent": "proposal",
            "category": [_cc(_CAREPLAN_CATEGORY, "assess-plan", "Assessment and Plan of Treatment")],
            "title": "Phased rehabilitation for muscle atrophy of the right lower leg (draft for clinician review)",
            "subject": _ref("Patient", pid), "encounter": _ref("Encounter", eid),
            "created": when.isoformat(),
            "addresses": [_ref("Condition", cond_id)],
            "activity": [{"detail": {"code": {"text": "Phase 1: Acute management"}, "status": "not-started",
                                     "description": "Relative rest and ice 15-20 min as needed; ankle pumps."}}]}


# --------------------------------------------------------------------------------------------
# Cases built by hand: the source document's clinical example, and the bare record
# --------------------------------------------------------------------------------------------

def _clinical_example(as_of: dt.date) -> SyntheticCase:
    """SOURCE clinical example: right trapezius spasm coded M62.561 (SPEC §1 erratum 3)."""
    key = "clinical-example"
    pid = f"fp-{key}"
    enc_day = as_of - dt.timedelta(days=3)
    onset = enc_day - dt.timedelta(days=14)
    cond, enc = f"{pid}-cond", f"{pid}-enc1"
    trapezius = _cc(SNOMED, "77568009", "Back structure", "Right trapezius muscle")
    res: list[dict[str, Any]] = [
        _patient(pid, "Maren", "Okafor", "female", 45, as_of, 6, 2),
        _condition(cond, pid, "M62.561", code_text="Muscle spasm in the right trapezius muscle",
                   body_site=trapezius, onset=onset, recorded=enc_day, encounter=enc,
                   notes=["Likely secondary to poor ergonomics and prolonged sitting."]),
        _encounter(enc, pid, enc_day, [cond], "Office visit"),
        _observation(f"{pid}-hpi1", pid, enc, enc_day, _cc(LOINC, "10164-2", "History of Present illness Narrative"),
                     category="survey", minute=1,
                     value={"valueString": "Chief complaint of right shoulder muscle spasms that began two weeks "
                                           "ago. She reports that the pain worsens throughout the day, particularly "
                                           "after long hours of sitting at her desk without breaks."}),
        _observation(f"{pid}-occ1", pid, enc, enc_day, _cc(LOINC, "11341-5", "History of Occupation"),
                     category="social-history", value={"valueCodeableConcept": {"text": "Office worker"}}, minute=2),
        _observation(f"{pid}-palp1", pid, enc, enc_day, {"text": "Palpation of right trapezius"}, category="exam",
                     value={"valueString": "Tenderness upon palpation of the right trapezius muscle."},
                     body_site=trapezius, minute=3),
        _observation(f"{pid}-rom1", pid, enc, enc_day, {"text": "Cervical and shoulder range of motion"},
                     category="exam", value={"valueString": "Range of motion is slightly limited due to discomfort."},
                     minute=4),
        _observation(f"{pid}-neuro1", pid, enc, enc_day, {"text": "Neurological exam"}, category="exam",
                     value={"valueString": "No signs of neurological deficits."}, minute=5),
        {"resourceType": "CarePlan", "id": f"{pid}-careplan", "status": "active", "intent": "plan",
         "title": "Ergonomics and physical therapy",
         "description": "Ergonomic adjustments at her workstation, including an adjustable chair and desk. "
                        "Physical therapy focusing on stretching and posture correction. Regular breaks "
                        "during work hours.",
         "subject": _ref("Patient", pid), "encounter": _ref("Encounter", enc),
         "period": {"start": enc_day.isoformat()}, "addresses": [_ref("Condition", cond)]},
    ]
    expected = _expect(base=False, elements={
        "onset": "met", "duration": "met", "severity": "missing", "exacerbating-factors": "met",
        "prior-treatment-response": "missing", "injury-history": "missing", "lifestyle-occupation": "met",
        "physical-exam": "met", "range-of-motion": "met", "palpation": "met", "neuro-exam": "met",
        "posture-inspection": "missing", "body-site": "conflict", "laterality": "met",
        "atrophy-finding": "missing", "objective-measure": "missing", "etiology": "missing",
        # "Range of motion is slightly limited": SPEC §3 lists the stem "limit*" for functional-limitation
        "excludes1": "met", "functional-limitation": "met", "red-flag-screen": "missing",
        "treatment-plan": "met", "follow-up": "not-yet-due", "treatment-response": "missing",
        "medical-necessity": "missing",
    }, red_flags={
        "progressive-neuro-deficit": "not-documented", "bowel-bladder-dysfunction": "not-documented",
        "cancer-history": "not-documented", "significant-trauma": "not-documented",
        "weight-loss": "not-documented", "fever": "not-documented", "persistent-beyond-expected": "absent",
    }, code_fit="mismatch", suggested=["M62.830"], complete=False, referral=False)
    return SyntheticCase(key, "Source clinical example: right trapezius spasm of an office worker coded M62.561",
                         pid, res, None, expected)


def _insufficient(as_of: dt.date) -> SyntheticCase:
    """M62.561 on the problem list and one old visit, nothing else documented."""
    key = "insufficient"
    pid = f"fp-{key}"
    enc_day = as_of - dt.timedelta(days=60)
    cond, enc = f"{pid}-cond", f"{pid}-enc1"
    res = [
        _patient(pid, "Tobias", "Lindqvist", "male", 67, as_of, 11, 23),
        _condition(cond, pid, "M62.561", recorded=enc_day, encounter=enc),
        _encounter(enc, pid, enc_day, [cond], "Office visit"),
    ]
    elements = {e: "missing" for e in _COMPLETE_ELEMENTS}
    elements["excludes1"] = "met"
    expected = _expect(base=False, elements=elements,
                       red_flags={f: "not-documented" for f in _COMPLETE_FLAGS},
                       code_fit="insufficient", complete=False, referral=False)
    return SyntheticCase(key, "Code only: no site, side, finding, onset or exam documented", pid, res, None, expected)


# --------------------------------------------------------------------------------------------
# The table of cases
# --------------------------------------------------------------------------------------------

# (key, title, knobs, person, expected, reference encounter index or None)
_M = "missing"


def _table() -> list[tuple[str, str, _Knobs, tuple[str, str, str, int, int, int], dict[str, Any], int | None]]:
    K = _Knobs
    mn = "medical-necessity"
    no_onset_date = {"persistent-beyond-expected": "not-documented"}
    return [
        ("complete", "Right calf disuse atrophy, fully documented", K(),
         ("Dana", "Whitfield", "female", 52, 3, 14), _expect(complete=True, referral=False), None),
        # one required element taken away at a time ------------------------------------------------
        ("missing-onset", "Complete minus onset (no onset date, no 'onset'); 'duration' still written", 
         K(onset_date=False, onset_text=False), ("Ruben", "Castellano", "male", 48, 7, 9),
         _expect(elements={"onset": _M, "red-flag-screen": _M}, red_flags=no_onset_date,
                 complete=False, referral=False), None),
        ("missing-duration", "Complete minus duration (no onset date, no 'duration'); 'onset' still written",
         K(onset_date=False, duration_text=False), ("Ilse", "Marchetti", "female", 61, 1, 30),
         _expect(elements={"duration": _M, "red-flag-screen": _M}, red_flags=no_onset_date,
                 complete=False, referral=False), None),
        ("missing-severity", "Complete minus the pain scores", K(severity=False),
         ("Kwame", "Asante", "male", 39, 5, 21),
         _expect(elements={"severity": _M, mn: _M}, complete=False, referral=False), None),
        ("missing-exacerbating-factors", "Complete minus what aggravates it", K(exacerbating=False),
         ("Priya", "Raman", "female", 44, 9, 3),
         _expect(elements={"exacerbating-factors": _M}, complete=False, referral=False), None),
        ("missing-prior-treatment-response", "Complete minus prior treatment and its response",
         K(prior_treatment=False), ("Henrik", "Dahl", "male", 57, 12, 12),
         _expect(elements={"prior-treatment-response": _M}, complete=False, referral=False), None),
        ("missing-physical-exam", "Complete minus any exam category or the word 'exam'", K(exam_category=False),
         ("Lucia", "Ferreira", "female", 35, 4, 8),
         _expect(elements={"physical-exam": _M, mn: _M}, complete=False, referral=False), None),
        ("missing-range-of-motion", "Complete minus range of motion", K(rom=False),
         ("Omar", "Haddad", "male", 42, 8, 17),
         _expect(elements={"range-of-motion": _M}, complete=False, referral=False), None),
        ("missing-palpation", "Complete minus palpation", K(palpation=False),
         ("Greta", "Halvorsen", "female", 66, 2, 25),
         _expect(elements={"palpation": _M}, complete=False, referral=False), None),
        ("missing-neuro-exam", "Complete minus the neurological exam", K(neuro=False),
         ("Samuel", "Adeyemi", "male", 50, 10, 4),
         _expect(elements={"neuro-exam": _M}, complete=False, referral=False), None),
        ("missing-body-site", "Right 'leg' (lower limb) without the level: site not documented",
         K(region="leg"), ("Noor", "Siddiqui", "female", 47, 6, 19),
         _expect(elements={"body-site": _M}, code_fit="insufficient", complete=False, referral=False), None),
        ("missing-laterality", "Calf atrophy with no side documented (suggest M62.569)", K(side="none"),
         ("Elliot", "Brandt", "male", 58, 3, 1),
         _expect(elements={"laterality": _M}, code_fit="mismatch", suggested=["M62.569"],
                 complete=False, referral=False), None),
        ("missing-atrophy-finding", "Loss of bulk described, atrophy never named", K(finding="bulk"),
         ("Yara", "Nasser", "female", 55, 7, 27),
         _expect(elements={"atrophy-finding": _M}, code_fit="insufficient", complete=False, referral=False), None),
        ("missing-objective-measure", "Complete minus circumference and strength grade", K(objective=False),
         ("Felix", "Moreau", "male", 63, 11, 6),
         _expect(elements={"objective-measure": _M, mn: _M}, complete=False, referral=False), None),
        ("missing-functional-limitation", "Complete minus the functional limitation",
         K(functional=False), ("Ingrid", "Solberg", "female", 49, 5, 11),
         _expect(elements={"functional-limitation": _M, mn: _M}, complete=False, referral=False), None),
        ("missing-red-flag-screen", "Complete but weight loss never asked about",
         K(flag_weight_loss="omitted"), ("Mateo", "Quiroga", "male", 41, 9, 29),
         _expect(elements={"red-flag-screen": _M}, red_flags={"weight-loss": "not-documented"},
                 complete=False, referral=False), None),
        ("missing-treatment-plan", "Complete but its CarePlan was entered in error",
         K(careplan="entered-in-error"), ("Hana", "Kobayashi", "female", 38, 12, 2),
         _expect(elements={"treatment-plan": _M}, complete=False, referral=False), None),
        ("missing-follow-up", "One visit 60 days ago and no follow-up",
         K(onset_day=80, encounter_days=(60,)), ("Victor", "Lindgren", "male", 70, 4, 15),
         _expect(elements={"follow-up": _M, "treatment-response": _M}, complete=False, referral=False), None),
        # other element statuses -------------------------------------------------------------------
        ("follow-up-not-yet-due", "One visit 10 days ago: follow-up not yet due",
         K(onset_day=30, encounter_days=(10,)), ("Amara", "Okonkwo", "female", 33, 8, 8),
         _expect(elements={"follow-up": "not-yet-due", "treatment-response": _M}, complete=True, referral=False),
         None),
        ("plan-proposed", "Only the plugin's own draft CarePlan: treatment plan proposed",
         K(careplan="plugin-draft"), ("Jonas", "Weber", "male", 46, 1, 19),
         _expect(elements={"treatment-plan": "proposed"}, complete=False, referral=False), None),
        ("excludes1", "Active sarcopenia (M62.84, an Excludes1 of M62.5) beside M62.561",
         K(sarcopenia="active"), ("Beatrix", "Novak", "female", 78, 10, 30),
         _expect(elements={"excludes1": "conflict"}, code_fit="mismatch", suggested=["M62.84"],
                 complete=False, referral=False), None),
        ("excludes1-resolved", "Inactive sarcopenia: no Excludes1 conflict",
         K(sarcopenia="inactive"), ("Walter", "Pruitt", "male", 81, 2, 9),
         _expect(complete=True, referral=False), None),
        # code fit ---------------------------------------------------------------------------------
        ("left-lower-leg", "Left calf atrophy coded M62.561 (suggest M62.562)", K(side="left"),
         ("Sofia", "Esposito", "female", 59, 6, 6),
         _expect(elements={"laterality": "conflict"}, code_fit="mismatch", suggested=["M62.562"],
                 complete=False, referral=False), None),
        ("bilateral", "Atrophy of both calves coded M62.561 (suggest M62.561 + M62.562)", K(side="bilateral"),
         ("Arjun", "Mehta", "male", 62, 3, 23),
         _expect(elements={"laterality": "conflict"}, code_fit="mismatch", suggested=["M62.561", "M62.562"],
                 complete=False, referral=False), None),
        ("thigh-right", "Right quadriceps atrophy coded M62.561 (suggest M62.551)", K(region="thigh"),
         ("Clara", "Jansen", "female", 54, 11, 14),
         _expect(elements={"body-site": "conflict"}, code_fit="mismatch", suggested=["M62.551"],
                 complete=False, referral=False), None),
        ("thigh-left", "Left quadriceps atrophy coded M62.561 (suggest M62.552)", K(region="thigh", side="left"),
         ("Dmitri", "Volkov", "male", 60, 7, 3),
         _expect(elements={"body-site": "conflict", "laterality": "conflict"}, code_fit="mismatch",
                 suggested=["M62.552"], complete=False, referral=False), None),
        ("spasm-calf", "Right calf spasm after long standing coded M62.561 (suggest M62.838)",
         K(finding="spasm", occupation="Retail cashier"), ("Lena", "Fischer", "female", 36, 4, 27),
         _expect(elements={"atrophy-finding": _M, "etiology": _M}, code_fit="mismatch", suggested=["M62.838"],
                 complete=False, referral=False), None),
        # red flags present -----------------------------------------------------------------------
        ("flag-neuro", "Complete, with numbness (progressive neurological deficit)", K(flag_neuro="present"),
         ("Paul", "Gagnon", "male", 53, 5, 5),
         _expect(red_flags={"progressive-neuro-deficit": "present"}, complete=True, referral=True), None),
        ("flag-bowel-bladder", "Complete, with new urinary retention", K(flag_bowel_bladder="present"),
         ("Marta", "Kowalczyk", "female", 64, 9, 18),
         _expect(red_flags={"bowel-bladder-dysfunction": "present"}, complete=True, referral=True), None),
        ("flag-cancer", "Complete, with a history of breast cancer (Z85.3)", K(flag_cancer="present"),
         ("Ruth", "Abernathy", "female", 68, 12, 20),
         _expect(red_flags={"cancer-history": "present"}, complete=True, referral=True), None),
        ("flag-trauma", "Complete, after a recent tibial fracture (S82.201D) and cast",
         K(flag_trauma="present", etiology="after cast immobilization"), ("Diego", "Salazar", "male", 29, 2, 14),
         _expect(red_flags={"significant-trauma": "present"}, complete=True, referral=True), None),
        ("flag-weight-loss", "Complete, with unintentional weight loss", K(flag_weight_loss="present"),
         ("Agnes", "Whitcombe", "female", 72, 8, 31),
         _expect(red_flags={"weight-loss": "present"}, complete=True, referral=True), None),
        ("flag-fever", "Complete, with 38.4 Cel at the follow-up and reported fever", K(flag_fever="present"),
         ("Tomasz", "Zielinski", "male", 45, 10, 10),
         _expect(red_flags={"fever": "present"}, complete=True, referral=True), None),
        ("flag-persistent", "Complete, with onset 70 days before the latest visit", K(onset_day=76),
         ("Helena", "Sousa", "female", 57, 1, 7),
         _expect(red_flags={"persistent-beyond-expected": "present"}, complete=True, referral=True), None),
        # the reference encounter -----------------------------------------------------------------
        ("earlier-encounter", "Checked at the first of two visits: onset 30 days before it, 54 before the second",
         K(onset_day=60, encounter_days=(30, 6)), ("Nils", "Eriksen", "male", 51, 6, 28),
         _expect(complete=True, referral=False), 0),
    ]


# --------------------------------------------------------------------------------------------
# Variations for the reading rules of SPEC §3.1–§3.2, §4 and §5: a table case, edited by hand
# --------------------------------------------------------------------------------------------

def _edit_hpi(resources: list[dict[str, Any]], pid: str, old: str, new: str) -> None:
    """Replace a sentence of the first visit's history narrative."""
    for res in resources:
        if res["id"] == f"{pid}-hpi1":
            assert old in res["valueString"], old
            res["valueString"] = res["valueString"].replace(old, new)


def _first_visit(resources: list[dict[str, Any]], pid: str) -> tuple[str, dt.date]:
    enc = next(r for r in resources if r["id"] == f"{pid}-enc1")
    return enc["id"], dt.date.fromisoformat(enc["period"]["start"][:10])


def _v_return_precautions(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.2 hypothetical: the plan's precautions name three red flags and document none of them
    eid, when = _first_visit(res, pid)
    res.append(_observation(f"{pid}-plan1", pid, eid, when, {"text": "Plan"}, category=None, minute=20,
                            value={"valueString": "Home program reviewed. Come back sooner should a fever, "
                                                  "incontinence or numbness in the foot appear; warning signs "
                                                  "explained to the patient."}))


def _v_negation_reach(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.2 negation holds inside one clause: "endorses" starts a new one
    _edit_hpi(res, pid, "Denies weight loss.", "Denies night sweats, endorses a 4 kg weight loss since the spring.")


def _v_answer_text(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.2 answers as values: the answer written as text, not as a SNOMED code
    for r in res:
        if r["id"] == f"{pid}-ca1":
            r["valueCodeableConcept"] = {"text": "Negative"}
        if r["id"] == f"{pid}-bb1":
            del r["valueBoolean"]
            r["valueString"] = "absent"


def _v_refuted_other_leg(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.1: a refuted Condition documents nothing, not even the side it names
    eid, when = _first_visit(res, pid)
    cond = _condition(f"{pid}-cond-left", pid, "M62.562", body_site=_site_cc("lower-leg", "left"),
                      recorded=when, encounter=eid, notes=["Left calf wasting suspected at triage."])
    cond["verificationStatus"] = _cc(_COND_VERIFICATION, "refuted", "Refuted")
    res.append(cond)


def _v_resolved_cancer(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.1 / §4: a resolved cancer is a history of cancer
    res.append(_condition(f"{pid}-melanoma", pid, "C43.71", status="resolved", category="problem-list-item",
                          recorded=as_of - dt.timedelta(days=3000)))
    # ... but never for site or side: last year's left-calf episode, resolved
    res.append(_condition(f"{pid}-cond-old", pid, "M62.569", status="resolved", body_site=_site_cc("lower-leg", "left"),
                          recorded=as_of - dt.timedelta(days=400), notes=["Left calf wasting after a sprain."]))


def _v_planned_visit(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.1 visits: a planned encounter is not a visit, nor the reference encounter
    enc = _encounter(f"{pid}-enc-planned", pid, as_of - dt.timedelta(days=1), [f"{pid}-cond"], "Follow-up visit")
    enc["status"] = "planned"
    res.append(enc)


def _v_blood_pressure_arm(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3: an Observation's bodySite counts only when the Observation documents an element
    eid, when = _first_visit(res, pid)
    res.append(_observation(f"{pid}-bp1", pid, eid, when, _cc(LOINC, "85354-9", "Blood pressure panel"),
                            category="vital-signs", body_site=_cc(SNOMED, "368208006", "Left upper arm structure",
                                                                  "Left upper arm"),
                            value={"component": [
                                {"code": _cc(LOINC, "8480-6", "Systolic blood pressure"),
                                 "valueQuantity": _quantity(126, "mm[Hg]")},
                                {"code": _cc(LOINC, "8462-4", "Diastolic blood pressure"),
                                 "valueQuantity": _quantity(78, "mm[Hg]")}]}, minute=16))


def _v_separate_back_spasm(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3: another specific code beside M62.561 is a separate diagnosis, not under review
    eid, when = _first_visit(res, pid)
    res.append(_condition(f"{pid}-backspasm", pid, "M62.830", body_site=_cc(SNOMED, "37822005", "Lumbar region",
                                                                            "Lumbar paraspinals"),
                          recorded=when, encounter=eid, notes=["Lumbar paraspinal spasm after gardening."]))


def _v_both_sides_coded(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3 / §5: both calves documented, and M62.562 active beside M62.561
    eid, when = _first_visit(res, pid)
    res.append(_condition(f"{pid}-cond-left", pid, "M62.562", body_site=_site_cc("lower-leg", "left"),
                          recorded=when, encounter=eid))


def _v_family_history(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §4: text about relatives documents nothing for red flags
    _edit_hpi(res, pid, "Surgical history: appendectomy.",
              "Surgical history: appendectomy. FH: sister treated for metastatic ovarian cancer.")
    res[:] = [r for r in res if r["id"] != f"{pid}-ca1"]      # no answer asked: only the family text is left


def _v_abbreviated_side(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.2: "Rt calf" documents the right lower leg; "nontender" documents palpation
    eid, when = _first_visit(res, pid)
    for r in res:
        if r["resourceType"] == "Condition" and r["id"] == f"{pid}-cond":
            r["bodySite"] = [_cc(SNOMED, "30021000", "Structure of lower leg", "Lower leg")]
            r["note"][0]["text"] = "Disuse atrophy, Rt calf, after three weeks of bed rest."
    res.append(_observation(f"{pid}-palp1", pid, eid, when, {"text": "Calf examination"}, category="exam",
                            value={"valueString": "Rt calf nontender, no palpable cord."}, minute=12))


def _v_old_injury_text(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §4: the 90-day window applies to text too; an old fracture note documents nothing now
    res.append(_observation(f"{pid}-pmh1", pid, None, as_of - dt.timedelta(days=900),
                            {"text": "Past history note"}, category=None,
                            value={"valueString": "Fractured left wrist in a cycling accident."}, minute=30))


def _v_same_day_visits(res: list[dict[str, Any]], pid: str, as_of: dt.date) -> None:
    # SPEC §3.1: two visits on one calendar day count once for follow-up
    eid, when = _first_visit(res, pid)
    enc = _encounter(f"{pid}-enc1b", pid, when, [f"{pid}-cond"], "Same-day recheck")
    enc["period"] = {"start": _stamp(when, 16), "end": _stamp(when, 16, 20)}
    res.append(enc)


def _variations() -> list[tuple[str, str, _Knobs, tuple[str, str, str, int, int, int], Any, dict[str, Any]]]:
    K = _Knobs
    ok = _expect(complete=True, referral=False)
    return [
        ("hypothetical-precautions", "Complete, with return precautions naming fever, incontinence, numbness",
         K(), ("Ottilie", "Brenner", "female", 47, 5, 16), _v_return_precautions, ok),
        ("negation-reach", "A negation that does not reach the weight loss reported after it", K(),
         ("Kasimir", "Nowak", "male", 58, 10, 2), _v_negation_reach,
         _expect(red_flags={"weight-loss": "present"}, complete=True, referral=True)),
        ("answer-as-text", "Red-flag answers written as text: 'Negative', 'absent'", K(),
         ("Fenna", "de Vries", "female", 41, 7, 22), _v_answer_text, ok),
        ("refuted-other-leg", "A refuted left-leg M62.562 beside the right-calf record", K(),
         ("Leopold", "Haas", "male", 63, 1, 11), _v_refuted_other_leg, ok),
        ("resolved-history", "A resolved melanoma (C43.71) and a resolved left-calf episode: history only", K(),
         ("Rosalind", "Achebe", "female", 69, 4, 4), _v_resolved_cancer,
         _expect(red_flags={"cancer-history": "present"}, complete=True, referral=True)),
        ("planned-visit", "One visit 12 days ago and a planned one yesterday: not a visit, not the reference",
         K(onset_day=30, encounter_days=(12,)), ("Bartholomew", "Igwe", "male", 55, 9, 9), _v_planned_visit,
         _expect(elements={"follow-up": "not-yet-due", "treatment-response": _M}, complete=True, referral=False)),
        ("blood-pressure-arm", "A blood pressure on the left arm beside the right-calf record", K(side="none"),
         ("Theodora", "Lindqvist", "female", 50, 3, 30), _v_blood_pressure_arm,
         _expect(elements={"laterality": _M}, code_fit="mismatch", suggested=["M62.569"], complete=False,
                 referral=False)),
        ("separate-back-spasm", "An active M62.830 back spasm beside M62.561: a separate diagnosis", K(),
         ("Casimir", "Oyelaran", "male", 44, 12, 8), _v_separate_back_spasm, ok),
        ("both-sides-coded", "Atrophy of both calves with M62.561 and M62.562 both active", K(side="bilateral"),
         ("Philippa", "Mwangi", "female", 66, 6, 13), _v_both_sides_coded, ok),
        ("family-history-cancer", "Cancer only in a relative's history: not documented for the patient", K(),
         ("Ignatius", "Ferreira", "male", 39, 2, 20), _v_family_history,
         _expect(elements={"red-flag-screen": _M}, red_flags={"cancer-history": "not-documented"},
                 complete=False, referral=False)),
        ("abbreviated-side", "Side written 'Rt calf', palpation written 'nontender'", K(palpation=False),
         ("Marisol", "Quintero", "female", 53, 8, 26), _v_abbreviated_side, ok),
        ("old-injury-text", "An old wrist fracture note outside the 90-day window", K(),
         ("Anselm", "Berg", "male", 60, 11, 1), _v_old_injury_text, ok),
        ("same-day-visits", "One visit day with two visits 10 days ago: follow-up not yet due",
         K(onset_day=30, encounter_days=(10,)), ("Cordelia", "Nakamura", "female", 36, 5, 3), _v_same_day_visits,
         _expect(elements={"follow-up": "not-yet-due", "treatment-response": _M}, complete=True, referral=False)),
    ]


def generate_cases(as_of: dt.date) -> list[SyntheticCase]:
    """Every synthetic case, dated back from ``as_of``; the same ``as_of`` gives the same output."""
    if isinstance(as_of, dt.datetime):
        as_of = as_of.date()
    cases: list[SyntheticCase] = []
    for key, title, knobs, person, expected, ref_index in _table():
        resources = _build(key, as_of, knobs, person)
        encounter_id = f"fp-{key}-enc{ref_index + 1}" if ref_index is not None else None
        cases.append(SyntheticCase(key, title, f"fp-{key}", resources, encounter_id, expected))
    cases.append(_clinical_example(as_of))
    cases.append(_insufficient(as_of))
    for key, title, knobs, person, edit, expected in _variations():
        resources = _build(key, as_of, knobs, person)
        edit(resources, f"fp-{key}", as_of)
        cases.append(SyntheticCase(key, title, f"fp-{key}", resources, None, expected))
    return cases


def large_record(as_of: dt.date, n_observations: int = 2000) -> SyntheticCase:
    """The complete case padded with vital signs to ``n_observations`` Observations in all.

    The padding (heart and respiratory rates over the past two years) is read by no element
    or red flag, so the expected outcome is the complete case's.
    """
    if isinstance(as_of, dt.datetime):
        as_of = as_of.date()
    key = "large"
    pid = f"fp-{key}"
    resources = _build(key, as_of, _Knobs(), ("Roberta", "Lindholm", "female", 52, 3, 14))
    base = sum(1 for r in resources if r["resourceType"] == "Observation")
    if n_observations < base:
        raise ValueError(f"a large record needs at least {base} Observations, got {n_observations}")
    for i in range(n_observations - base):
        when = as_of - dt.timedelta(days=1 + (i // 3) % 730)
        if i % 2 == 0:
            code, value = _cc(LOINC, "8867-4", "Heart rate"), _quantity(float(58 + (i * 7) % 40), "/min")
        else:
            code, value = _cc(LOINC, "9279-1", "Respiratory rate"), _quantity(float(12 + (i * 5) % 8), "/min")
        obs = _observation(f"{pid}-vs{i + 1:05d}", pid, None, when, code, category="vital-signs",
                           value={"valueQuantity": value}, minute=(i % 3) * 10 + 20)
        resources.append(obs)
    return SyntheticCase(key, f"Complete case with {n_observations} Observations", pid, resources, None,
                         _expect(complete=True, referral=False))


# --------------------------------------------------------------------------------------------
# Many patients, Bundles, files, a server
# --------------------------------------------------------------------------------------------

def _renamed(resources: Iterable[dict[str, Any]], old: str, new: str) -> list[dict[str, Any]]:
    """Copies of ``resources`` with every id and reference starting ``old`` moved to ``new``."""
    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "reference" and isinstance(v, str):
                    rtype, _, rid = v.partition("/")
                    out[k] = f"{rtype}/{new}{rid[len(old):]}" if rid.startswith(old) else v
                else:
                    out[k] = fix(v)
            return out
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    renamed = []
    for res in resources:
        copy_ = fix(res)
        if copy_["id"].startswith(old):
            copy_["id"] = new + copy_["id"][len(old):]
        renamed.append(copy_)
    return renamed


def renamed_case(case: SyntheticCase, tag: str) -> SyntheticCase:
    """The case under new ids (``fp-x`` -> ``fp-<tag>-x``), for a writer that must not touch the original."""
    def move(value: str | None) -> str | None:
        return value.replace("fp-", f"fp-{tag}-", 1) if value else value

    return dataclasses.replace(case, patient_id=move(case.patient_id), encounter_id=move(case.encounter_id),
                               resources=_renamed(case.resources, "fp-", f"fp-{tag}-"))


def many_patients(as_of: dt.date, n: int) -> Iterator[list[dict[str, Any]]]:
    """``n`` distinct patients' resources, cycling through the cases (ids like ``fp-0001-complete``)."""
    cases = generate_cases(as_of)
    width = max(4, len(str(n)))
    for i in range(n):
        case = cases[i % len(cases)]
        yield _renamed(case.resources, "fp-", f"fp-{i + 1:0{width}d}-")


def _entries_in_order(resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"Patient": 0, "Condition": 1, "Encounter": 2, "Observation": 3, "CarePlan": 4}
    return sorted(resources, key=lambda r: order.get(r["resourceType"], 9))  # stable within a type


def cases_bundle(cases: Iterable[SyntheticCase]) -> dict[str, Any]:
    """One R4 transaction Bundle that PUTs every resource at ``Type/id`` (idempotent on any server)."""
    entries = []
    for case in cases:
        for res in _entries_in_order(case.resources):
            entries.append({"resource": copy.deepcopy(res),
                            "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def case_bundle(case: SyntheticCase) -> dict[str, Any]:
    """One case as an R4 collection Bundle (what ``save_cases`` writes)."""
    return {"resourceType": "Bundle", "id": f"{case.patient_id}-bundle", "type": "collection",
            "entry": [{"resource": copy.deepcopy(r)} for r in _entries_in_order(case.resources)]}


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def save_cases(cases: Iterable[SyntheticCase], directory: str | Path) -> list[Path]:
    """Write ``<key>.json`` (a collection Bundle) per case and ``expected.json``; return the paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    expected: dict[str, Any] = {}
    for case in cases:
        path = folder / f"{case.key}.json"
        path.write_text(_dump(case_bundle(case)), encoding="utf-8")
        written.append(path)
        expected[case.key] = {"title": case.title, "patient_id": case.patient_id,
                              "encounter_id": case.encounter_id, "expected": case.expected}
    path = folder / "expected.json"
    path.write_text(_dump(expected), encoding="utf-8")
    written.append(path)
    return written


def load_into_server(base_url: str, cases: Iterable[SyntheticCase], session: Any = None,
                     timeout: float = 120.0) -> dict[str, Any]:
    """POST the cases as one transaction to ``base_url``; return the server's transaction-response."""
    import requests

    from ._errors import ServerError, TransportError

    http = session or requests.Session()
    try:
        response = http.post(base_url.rstrip("/"), data=json.dumps(cases_bundle(cases)),
                             headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                             timeout=timeout)
    except requests.RequestException as exc:
        raise TransportError(f"could not send the synthetic patients to {base_url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            outcome = response.json()
        except ValueError:
            outcome = None
        raise ServerError(f"the server refused the synthetic patients (HTTP {response.status_code})",
                          status=response.status_code, outcome=outcome)
    return response.json()
