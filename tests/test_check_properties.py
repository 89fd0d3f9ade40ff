"""Property tests (hypothesis): any R4-valid Condition/Observation/Encounter mix and any text up to 100 KB.

SPEC §3.1 *Any valid R4 input*: the check never crashes, and its report is the same whatever the
order of the resources and whether references are written ``Type/id``, absolute or ``urn:uuid:``.
SPEC §3.2 *Cost*: texts up to 100 KB, with and without sentence breaks.
"""

from __future__ import annotations

import json
import random
import uuid

from _records import TODAY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_plugin import check, load_profile, records_from_bundle

PID = "p1"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
LNC = "http://loinc.org"
_ICD_CODES = [
    "M62.561",
    "M62.562",
    "M62.569",
    "M62.5",
    "M62.830",
    "M62.838",
    "M62.84",
    "G72.0",
    "C50.911",
    "Z85.3",
    "Z80.0",
    "S82.201D",
    "R50.9",
    "R63.4",
    "R32",
    "M79.1",
    "E11.9",
]
_SCT_CODES = [
    "32696007",
    "48979004",
    "30021000",
    "77568009",
    "88092000",
    "45352006",
    "24028007",
    "7771000",
    "51440002",
    "373067005",
    "373066001",
]
_LOINC_CODES = ["8310-5", "72514-3", "11341-5", "8867-4"]
_WORDS = [
    "right",
    "left",
    "rt",
    "l",
    "b/l",
    "bilateral",
    "calf",
    "calves",
    "lower leg",
    "back",
    "lumbar",
    "trapezius",
    "thigh",
    "atrophy",
    "wasting",
    "spasm",
    "fever",
    "numbness",
    "weight loss",
    "cancer",
    "metastatic",
    "fracture",
    "incontinence",
    "denies",
    "no",
    "not",
    "without",
    "absent",
    "negative",
    "ruled out",
    "none",
    "if",
    "return for",
    "should",
    "watch for",
    "but",
    "reports",
    "c/o",
    "mother",
    "family history",
    "FHx",
    "tender",
    "nontender",
    "non-tender",
    "ROM",
    "range of motion",
    "exam",
    "strength",
    "MMT",
    "circumference",
    "onset",
    "duration",
    "aggravated",
    "limited",
    "disuse",
    ",",
    ".",
    ";",
    "\n",
    "?",
    "all right",
    "right now",
    "background",
    "-",
    "/",
]

# FHIR strings: no control characters other than tab, CR, LF; no lone surrogates
_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
_phrase = st.lists(
    st.one_of(st.sampled_from(_WORDS), st.text(_CHARS, min_size=1, max_size=12)), min_size=1, max_size=30
).map(" ".join)
# up to 100 KB: a drawn passage repeated, with or without its sentence breaks
_text = st.one_of(
    _phrase,
    st.builds(
        lambda p, n, breaks: ((p + ". ") if breaks else (p + ", ")) * n, _phrase, st.integers(1, 400), st.booleans()
    ).map(lambda t: t[:100_000]),
).filter(lambda t: t.strip() != "")
_dates = st.dates(min_value=TODAY.replace(year=2024), max_value=TODAY.replace(year=2027)).map(lambda d: d.isoformat())
_datetimes = st.one_of(_dates, _dates.map(lambda d: d + "T09:30:00Z"), _dates.map(lambda d: d + "T23:10:00-05:00"))


def _concept(draw, systems) -> dict:
    system, codes = draw(st.sampled_from(systems))
    out: dict = {}
    if draw(st.booleans()):
        out["coding"] = [{"system": system, "code": draw(st.sampled_from(codes))}]
    if draw(st.booleans()) or not out:
        out["text"] = draw(_text)
    return out


@st.composite
def _condition(draw, rid: str, encounters: list[str]) -> dict:
    res: dict = {
        "resourceType": "Condition",
        "id": rid,
        "subject": {"reference": f"Patient/{PID}"},
        "code": _concept(draw, [(ICD, _ICD_CODES), (SCT, _SCT_CODES)]),
    }
    clinical = draw(st.sampled_from([None, "active", "recurrence", "relapse", "inactive", "remission", "resolved"]))
    if clinical:
        res["clinicalStatus"] = {"coding": [{"code": clinical}]}
    verification = draw(st.sampled_from([None, "confirmed", "provisional", "refuted", "entered-in-error"]))
    if verification:
        res["verificationStatus"] = {"coding": [{"code": verification}]}
    if draw(st.booleans()):
        res["bodySite"] = [_concept(draw, [(SCT, _SCT_CODES)])]
    if draw(st.booleans()):
        res["onsetDateTime"] = draw(_datetimes)
    if draw(st.booleans()):
        res["recordedDate"] = draw(_dates)
    if encounters and draw(st.booleans()):
        res["encounter"] = {"reference": f"Encounter/{draw(st.sampled_from(encounters))}"}
    if draw(st.booleans()):
        res["note"] = [{"text": draw(_text)}]
    return res


@st.composite
def _observation(draw, rid: str, encounters: list[str]) -> dict:
    res: dict = {
        "resourceType": "Observation",
        "id": rid,
        "status": draw(st.sampled_from(["final", "amended", "preliminary", "cancelled", "entered-in-error"])),
        "subject": {"reference": f"Patient/{PID}"},
        "code": _concept(draw, [(LNC, _LOINC_CODES), (SCT, _SCT_CODES)]),
    }
    if draw(st.booleans()):
        res["category"] = [{"coding": [{"code": draw(st.sampled_from(["exam", "vital-signs", "social-history"]))}]}]
    kind = draw(st.sampled_from(["none", "string", "quantity", "boolean", "concept"]))
    if kind == "string":
        res["valueString"] = draw(st.one_of(_text, st.sampled_from(["absent", "Negative", "yes", "no", "none"])))
    elif kind == "quantity":
        res["valueQuantity"] = {
            "value": draw(st.floats(30, 45, allow_nan=False)),
            "code": draw(st.sampled_from(["Cel", "[degF]", "cm"])),
        }
    elif kind == "boolean":
        res["valueBoolean"] = draw(st.booleans())
    elif kind == "concept":
        res["valueCodeableConcept"] = _concept(draw, [(SCT, _SCT_CODES)])
    if draw(st.booleans()):
        res["bodySite"] = _concept(draw, [(SCT, _SCT_CODES)])
    if draw(st.booleans()):
        res["effectiveDateTime"] = draw(_datetimes)
    if encounters and draw(st.booleans()):
        res["encounter"] = {"reference": f"Encounter/{draw(st.sampled_from(encounters))}"}
    if draw(st.booleans()):
        res["note"] = [{"text": draw(_text)}]
    return res


@st.composite
def _encounter(draw, rid: str, conditions: list[str]) -> dict:
    res: dict = {
        "resourceType": "Encounter",
        "id": rid,
        "status": draw(
            st.sampled_from(
                ["finished", "in-progress", "arrived", "triaged", "onleave", "planned", "cancelled", "entered-in-error"]
            )
        ),
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/{PID}"},
    }
    if draw(st.booleans()):
        res["period"] = {"start": draw(_datetimes)}
    if conditions and draw(st.booleans()):
        res["reasonReference"] = [{"reference": f"Condition/{draw(st.sampled_from(conditions))}"}]
    if draw(st.booleans()):
        res["reasonCode"] = [_concept(draw, [(ICD, _ICD_CODES)])]
    return res


@st.composite
def records(draw) -> list[dict]:
    n_cond, n_obs, n_enc = draw(st.integers(0, 4)), draw(st.integers(0, 6)), draw(st.integers(0, 3))
    conditions = [f"c{i}" for i in range(n_cond)]
    encounters = [f"e{i}" for i in range(n_enc)]
    out: list[dict] = [{"resourceType": "Patient", "id": PID}]
    out += [draw(_condition(c, encounters)) for c in conditions]
    out += [draw(_observation(f"o{i}", encounters)) for i in range(n_obs)]
    out += [draw(_encounter(e, conditions)) for e in encounters]
    return out


def _bundle(resources: list[dict], form: str, order_seed: int) -> dict:
    """The resources in a shuffled order, references as ``Type/id``, absolute URLs or ``urn:uuid:``."""
    shuffled = list(resources)
    random.Random(order_seed).shuffle(shuffled)
    names = {f"{r['resourceType']}/{r['id']}": str(uuid.uuid5(uuid.NAMESPACE_URL, r["id"])) for r in resources}

    def rewrite(value):
        if isinstance(value, dict):
            return {k: (_ref(v) if k == "reference" else rewrite(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    def _ref(ref: str) -> str:
        if form == "urn":
            return f"urn:uuid:{names[ref]}"
        if form == "absolute":
            return f"https://ehr.example.org/fhir/R4/{ref}"
        return ref

    entries = []
    for r in shuffled:
        key = f"{r['resourceType']}/{r['id']}"
        full = f"urn:uuid:{names[key]}" if form == "urn" else f"https://ehr.example.org/fhir/R4/{key}"
        entries.append({"fullUrl": full, "resource": rewrite(r)})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _report(bundle: dict, code: str) -> dict:
    [record] = records_from_bundle(json.loads(json.dumps(bundle)))
    return check(record, load_profile(code), today=TODAY).to_json()


_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_SETTINGS
@given(records(), st.sampled_from(["M62.561", "M62.830"]))
def test_spec_3_1_any_r4_mix_never_crashes_the_check(resources, code):
    rep = _report(_bundle(resources, "relative", 0), code)
    assert rep["patient"] == f"Patient/{PID}"
    assert rep["code_fit"]["status"] in ("fits", "mismatch", "insufficient")


@_SETTINGS
@given(records(), st.integers(1, 1_000), st.sampled_from(["absolute", "urn"]))
def test_spec_3_1_report_independent_of_order_and_reference_form(resources, seed, form):
    base = _report(_bundle(resources, "relative", 0), "M62.561")
    assert _report(_bundle(resources, "relative", seed), "M62.561") == base
    assert _report(_bundle(resources, form, seed), "M62.561") == base
