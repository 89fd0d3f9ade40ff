"""Profiles are data: validated at load, with the file and the field named when they are wrong."""

import json
import shutil
from pathlib import Path

import pytest
import simple_icd_10_cm as cm

from fhir_plugin import ProfileError, UsageError, available_profiles, load_profile
from fhir_plugin._profile import profiles_root


def _copy(tmp_path: Path, code: str = "M62.561", as_code: str | None = None) -> Path:
    target = tmp_path / (as_code or code)
    shutil.copytree(profiles_root() / code, target)
    return target


def _edit(folder: Path, change) -> None:
    path = folder / "profile.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_shipped_profiles_load_with_titles_from_the_code_set():
    assert {"M62.561", "M62.830"} <= set(available_profiles())
    for code in ("M62.561", "M62.830"):
        profile = load_profile(code)
        assert profile.display == cm.get_description(code)
    assert load_profile("M62.561").display.endswith("right lower leg")


def test_excludes1_codes_come_from_the_icd10cm_data():
    # SPEC §3 excludes1: the notes of M62.561 and every ancestor (M62.56, M62.5 and M62)
    codes = {code for code, _note, _sub in load_profile("M62.561").excludes1}
    assert {"G54.5", "G12.21", "M62.84"} <= codes
    assert {"G72.0", "G72.1", "R25.2", "M79.1", "G25.82"} <= codes


def test_a_third_condition_needs_only_a_new_folder(tmp_path):
    folder = _copy(tmp_path, as_code="M62.562")
    _edit(folder, lambda d: (d.update(code="M62.562"), d["laterality"].update(expected="left")))
    profile = load_profile("M62.562", root=tmp_path)
    assert profile.display == cm.get_description("M62.562")
    assert profile.expected_side == "left"


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(code="M62.5"), "code"),                                  # a category, not billable
    (lambda d: d.update(code="Q99.999"), "code"),                                # not a code at all
    (lambda d: d["elements"][0].update(kind="guess"), "elements[0].kind"),       # unknown rule kind: fail closed
    (lambda d: d["elements"][0].pop("required"), "elements[0].required"),
    (lambda d: d["red_flags"][1].update(icd10cm=["R99.999"]), "red_flags[1].icd10cm"),
    (lambda d: d["code_fit"]["rules"][0].update(suggest=["M54.5"]), "code_fit.rules[0].suggest[0]"),
    (lambda d: d["elements"][0].update(keywords="onset"), "elements[0].keywords"),
    (lambda d: d["laterality"].update(both_sides_with=["M62.5"]), "laterality.both_sides_with[0]"),  # not billable
    (lambda d: d["code_fit"]["rules"][0]["when"].update(near="back"), "code_fit.rules[0].when"),      # unknown test
])
def test_malformed_profile_names_file_and_field(tmp_path, change, field):
    folder = _copy(tmp_path)
    _edit(folder, change)
    with pytest.raises(ProfileError) as err:
        load_profile("M62.561", root=tmp_path)
    assert str(folder / "profile.json") in str(err.value)
    assert field in str(err.value)


def test_non_billable_differential_from_the_source_is_refused(tmp_path):
    # M54.5 and M51.36 are category headers (SPEC §1, erratum 2)
    folder = _copy(tmp_path)
    _edit(folder, lambda d: d["code_fit"]["rules"][0].update(suggest=["M51.36"]))
    with pytest.raises(ProfileError, match="not a billable"):
        load_profile("M62.561", root=tmp_path)


def test_broken_json_and_bad_plan_definition(tmp_path):
    folder = _copy(tmp_path)
    (folder / "profile.json").write_text("{ not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile("M62.561", root=tmp_path)
    folder2 = _copy(tmp_path / "b")
    (folder2 / "plandefinition.json").write_text(json.dumps({"resourceType": "PlanDefinition", "status": "nope"}))
    with pytest.raises(ProfileError, match="plandefinition.json"):
        load_profile("M62.561", root=tmp_path / "b")


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UsageError, match="M62.561"):
        load_profile("Z99.89")


@pytest.mark.parametrize("code", ["M62.561", "M62.830"])
def test_spec_3_2_stems_are_written_with_a_star_in_both_profiles(code):
    raw = load_profile(code).raw
    keywords = {k for item in raw["elements"] + raw["red_flags"] for k in item.get("keywords", [])}
    # SPEC §3 and §4 write these as stems; every other keyword is a whole word
    assert {"aggravat*", "exacerbat*", "function*", "limit*", "malignan*", "metasta*", "trauma*",
            "fractur*", "previous injur*", "prior injur*"} <= keywords
    assert code != "M62.561" or "immobiliz*" in keywords        # M62.561's etiology (M62.830 has its own)
    assert "aggravat" not in keywords and "metasta" not in keywords
    assert "nontender" in next(e for e in raw["elements"] if e["id"] == "palpation")["keywords"]


def test_spec_2_m62830_profile():
    profile = load_profile("M62.830")
    ids = [e["id"] for e in profile.elements]
    assert "spasm-finding" in ids and "atrophy-finding" not in ids
    assert next(e for e in profile.elements if e["id"] == "laterality")["required"] is False
    assert profile.expected_side is None and profile.expected_finding == "spasm"
    assert set(profile.family.entries) == {"M62.8", "M62.83"}
    back = profile.raw["site"]["keywords"]
    assert {"back", "lumbar", "thoracic", "paraspinal", "trapezius", "erector spinae", "multifidus",
            "latissimus"} <= set(back)
    assert {r["region"] for r in profile.raw["other_sites"]} == {"lower-leg", "thigh"}
    assert [f["id"] for f in profile.red_flags] == [f["id"] for f in load_profile("M62.561").red_flags]
