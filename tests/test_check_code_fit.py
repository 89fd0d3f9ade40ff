"""SPEC §5 (code fit) sentence by sentence, and the M62.830 profile of SPEC §2."""

from __future__ import annotations

import pytest
from _records import LEFT_LOWER_LEG, RIGHT_LOWER_LEG, SCT, condition, element, encounter, patient, report

BACK = {"coding": [{"system": SCT, "code": "77568009", "display": "Back structure"}], "text": "Lower back"}


def _fit(rep: dict) -> tuple[str, list[str]]:
    return rep["code_fit"]["status"], sorted(s["code"] for s in rep["code_fit"]["suggested"])


def _one(code: str, *, body=None, notes=(), text=None, profile="M62.561", extra=()) -> tuple[str, list[str]]:
    return _fit(
        report(
            [
                patient(),
                condition("c1", code, body=body, notes=notes, text=text),
                encounter("e1", "2026-11-20"),
                *extra,
            ],
            profile,
        )
    )


# --- §5: the finding spasm, and the back winning over other sites ----------------------------------


@pytest.mark.parametrize(
    "body, notes, want",
    [
        (None, ("Spasm of the right erector spinae",), ("mismatch", ["M62.830"])),
        (None, ("Left multifidus spasm",), ("mismatch", ["M62.830"])),
        (None, ("Thoracic paraspinal spasm",), ("mismatch", ["M62.830"])),
        (None, ("Spasm of the latissimus dorsi",), ("mismatch", ["M62.830"])),
        (RIGHT_LOWER_LEG, ("Calf spasm; lumbar spasm as well",), ("mismatch", ["M62.830"])),  # any back site
        (RIGHT_LOWER_LEG, ("Calf spasm at night",), ("mismatch", ["M62.838"])),  # no back site
        (
            {"text": "right lower leg", "coding": [{"system": SCT, "code": "45352006"}]},
            (),  # spasm as a code
            ("mismatch", ["M62.838"]),
        ),
    ],
    ids=["erector-spinae", "multifidus", "thoracic-paraspinal", "latissimus", "leg-and-back", "calf", "code"],
)
def test_spec_5_spasm_suggests_m62830_when_any_site_is_in_the_back(body, notes, want):
    assert _one("M62.561", body=body, notes=notes) == want


@pytest.mark.parametrize(
    "notes, want",
    [
        (("Right calf atrophy with intermittent spasm",), ("fits", [])),  # atrophy is the finding
        (("Right calf spasm",), ("mismatch", ["M62.838"])),
    ],
)
def test_spec_5_when_both_atrophy_and_spasm_are_documented_atrophy_is_the_finding(notes, want):
    assert _one("M62.561", body=RIGHT_LOWER_LEG, notes=notes) == want


@pytest.mark.parametrize(
    "body, notes, want",
    [
        (RIGHT_LOWER_LEG, (), ("insufficient", [])),  # site and side, no finding
        (None, ("Atrophy noted",), ("insufficient", [])),  # no site
        (None, ("Right calf atrophy",), ("fits", [])),
        (None, ("Spasm at night",), ("insufficient", [])),  # a finding without a site
        (None, ("Weakness of the calf",), ("insufficient", [])),  # a site without side or finding
        (LEFT_LOWER_LEG, (), ("insufficient", [])),  # the other side, still no finding
    ],
)
def test_spec_5_insufficient(body, notes, want):
    assert _one("M62.561", body=body, notes=notes) == want


@pytest.mark.parametrize(
    "extra, status",
    [
        ((condition("x1", "G72.0"),), "mismatch"),  # drug-induced myopathy (M62 Excludes1)
        ((condition("x1", "M62.84", clinical="resolved"),), "insufficient"),  # resolved: not active
        ((), "insufficient"),
    ],
)
def test_spec_5_an_active_excludes1_condition_is_a_mismatch_whatever_else(extra, status):
    # the record documents too little to tell, but an active Excludes1 condition still decides
    assert _one("M62.561", extra=extra)[0] == status


@pytest.mark.parametrize(
    "text, want",
    [
        ("Muscle wasting and atrophy, not elsewhere classified, right lower leg", ("insufficient", [])),
        ("Wasting of the right calf", ("fits", [])),
    ],
)
def test_spec_5_the_icd10cm_coding_documents_no_site_side_or_finding(text, want):
    assert _one("M62.561", text=text) == want


@pytest.mark.parametrize(
    "notes, want",
    [
        (("Calf atrophy",), ("mismatch", ["M62.569"])),  # site and finding, no side
        (("Atrophy of the R calf",), ("fits", [])),  # documenting the side keeps M62.561
    ],
)
def test_spec_5_no_side_suggests_m62569(notes, want):
    assert _one("M62.561", notes=notes) == want


@pytest.mark.parametrize("with_m62562, want", [(True, ("fits", [])), (False, ("mismatch", ["M62.561", "M62.562"]))])
def test_spec_5_both_sides_documented_with_both_codes_active_fits(with_m62562, want):
    extra = (condition("c2", "M62.562", body=LEFT_LOWER_LEG),) if with_m62562 else ()
    assert _one("M62.561", notes=("Bilateral calf atrophy",), extra=extra) == want


# --- §2: the M62.830 profile ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, body, notes, want",
    [
        ("M62.830", BACK, ("Lumbar paraspinal spasm",), ("fits", [])),
        ("M62.830", None, ("Spasm of the left trapezius",), ("fits", [])),
        ("M62.830", None, ("Right calf spasm",), ("mismatch", ["M62.838"])),  # spasm elsewhere
        ("M62.830", None, ("Thigh spasm after running",), ("mismatch", ["M62.838"])),
        ("M62.830", None, ("Right calf atrophy",), ("mismatch", ["M62.561"])),  # atrophy without spasm
        ("M62.830", None, ("Left calf atrophy",), ("mismatch", ["M62.562"])),
        ("M62.830", None, ("Atrophy of the right thigh",), ("mismatch", ["M62.551"])),
        ("M62.830", BACK, ("Back spasm; calf atrophy noted",), ("fits", [])),  # spasm whenever documented
        ("M62.83", BACK, ("Paraspinal spasm",), ("fits", [])),  # a listed family code
        ("M62.838", BACK, ("Paraspinal spasm",), ("insufficient", [])),  # separate: not under review
    ],
    ids=[
        "back",
        "trapezius",
        "calf-spasm",
        "thigh-spasm",
        "right-calf-atrophy",
        "left-calf-atrophy",
        "thigh-atrophy",
        "spasm-beside-atrophy",
        "family-code",
        "separate-code",
    ],
)
def test_spec_2_m62830_code_fit(code, body, notes, want):
    assert _one(code, body=body, notes=notes, profile="M62.830") == want


@pytest.mark.parametrize(
    "notes, body_site, laterality",
    [
        (("Lumbar spasm",), "met", "missing"),
        (("Spasm of the right lumbar paraspinals",), "met", "met"),
        (("Calf spasm",), "conflict", "missing"),  # a lower-leg site conflicts
    ],
)
def test_spec_2_m62830_elements(notes, body_site, laterality):
    rep = report([patient(), condition("c1", "M62.830", notes=notes), encounter("e1", "2026-11-20")], "M62.830")
    assert element(rep, "body-site") == body_site and element(rep, "laterality") == laterality
    assert next(e for e in rep["elements"] if e["id"] == "laterality")["required"] is False
    assert element(rep, "spasm-finding") == "met"
    assert "atrophy-finding" not in {e["id"] for e in rep["elements"]}
