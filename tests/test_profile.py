"""Profiles are data: validated at load, with the file and the field named when they are wrong."""

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import simple_icd_10_cm as cm
from jsonschema import Draft202012Validator
from test_check_cases import CASES, TODAY

from fhir_plugin import (
    DEFAULT_PROFILE,
    ProfileError,
    UsageError,
    available_profiles,
    build_drafts,
    check,
    load_profile,
    records_from_bundle,
)
from fhir_plugin import _profile as profile_module
from fhir_plugin._check import _KINDS
from fhir_plugin._profile import ELEMENT_KINDS, PROFILES_ENV, profiles_root

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


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


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.update(code="M62.5"), "code"),  # a category, not billable
        (lambda d: d.update(code="Q99.999"), "code"),  # not a code at all
        (lambda d: d["elements"][0].update(kind="guess"), "elements[0].kind"),  # unknown rule kind: fail closed
        (lambda d: d["elements"][0].pop("required"), "elements[0].required"),
        (lambda d: d["red_flags"][1].update(icd10cm=["R99.999"]), "red_flags[1].icd10cm"),
        (lambda d: d["code_fit"]["rules"][0].update(suggest=["M54.5"]), "code_fit.rules[0].suggest[0]"),
        (lambda d: d["elements"][0].update(keywords="onset"), "elements[0].keywords"),
        (lambda d: d["laterality"].update(both_sides_with=["M62.5"]), "laterality.both_sides_with[0]"),  # not billable
        (lambda d: d["code_fit"]["rules"][0]["when"].update(near="back"), "code_fit.rules[0].when"),  # unknown test
    ],
)
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


# --- the JSON Schema (profiles/profile.schema.json): every key the engine reads, unknown keys fail closed ----


def _element_index(data: dict, kind: str) -> int:
    return next(i for i, e in enumerate(data["elements"]) if e["kind"] == kind)


def _pop_follow_up_window(data: dict) -> None:
    data["elements"][_element_index(data, "follow-up")].pop("due_after_days")


@pytest.mark.parametrize(
    "change, field, message",
    [
        (lambda d: d.pop("snomed"), "snomed", "a required field is missing"),
        (lambda d: d["site"].pop("draft_body_site"), "site.draft_body_site", "a required field is missing"),
        (
            lambda d: d["code_fit"]["rules"][2]["when"].update(sitee="thigh"),
            "code_fit.rules[2].when.sitee",
            "unknown field",
        ),
        (lambda d: d.update(red_flag=[]), "red_flag", "unknown field"),
        (
            lambda d: d["red_flags"][5]["threshold"].update(unit="[degF]"),
            "red_flags[5].threshold.unit",
            'expected one of "Cel"',
        ),
        (lambda d: d["red_flags"][0].update(loinc=["8310-5"]), "red_flags[0].loinc", "unknown field"),
        (lambda d: d.update(snomed="88092000"), "snomed", "expected an object, found a string"),
        (lambda d: d["laterality"].update(expected="up"), "laterality.expected", "expected one of"),
        (lambda d: d["code_fit"]["rules"][0].update(when={}), "code_fit.rules[0].when", "must not be empty"),
        (lambda d: d["referral"].update(when="some-red-flag-present"), "referral.when", "expected one of"),
        (lambda d: d.pop("referral"), "referral", "a required field is missing"),
        (_pop_follow_up_window, "due_after_days", "a required field is missing"),
        # what a schema cannot say: a when value must name something the profile defines
        (
            lambda d: d["code_fit"]["rules"][0]["when"].update(finding="spasmm"),
            "code_fit.rules[0].when.finding",
            "not one of the profile's findings",
        ),
        (
            lambda d: d["code_fit"]["rules"][2]["when"].update(region="knee"),
            "code_fit.rules[2].when.region",
            "not the profile's site",
        ),
    ],
)
def test_a_profile_that_breaks_the_schema_names_file_and_field_in_one_sentence(tmp_path, change, field, message):
    folder = _copy(tmp_path)
    _edit(folder, change)
    with pytest.raises(ProfileError) as err:
        load_profile("M62.561", root=tmp_path)
    text = str(err.value)
    assert err.value.exit_code == 3
    assert str(folder / "profile.json") in text and field in text and message in text
    assert "\n" not in text


def test_a_misspelt_when_key_no_longer_matches_every_record(tmp_path):
    # before the schema, {"sitee": ...} was ignored and {"finding": "spasm", "sitee": ...} matched any spasm
    folder = _copy(tmp_path)
    _edit(folder, lambda d: d["code_fit"]["rules"][0]["when"].update(sitee="back"))
    with pytest.raises(ProfileError, match=r"code_fit\.rules\[0\]\.when\.sitee"):
        load_profile("M62.561", root=tmp_path)


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FHIR_PLUGIN_PROFILES=str(tmp_path))
    script = Path(sys.executable).parent / "fhir-plugin"  # the installed console script
    return subprocess.run(
        [str(script), *argv], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.pop("snomed"), "'snomed'"),  # was exit 70 at drafting
        (lambda d: d["code_fit"]["rules"][2]["when"].update(sitee="thigh"), "'code_fit.rules[2].when.sitee'"),
    ],
)
def test_the_command_line_refuses_a_malformed_profile_with_exit_3(tmp_path, change, field):
    folder = _copy(tmp_path)
    _edit(folder, change)
    done = _cli(tmp_path, "check", "--profile", "M62.561", "--patient", "fp-complete")
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("fhir-plugin: ") and str(folder / "profile.json") in line and field in line
    assert "Traceback" not in done.stderr


def test_the_profiles_folder_comes_from_the_environment(tmp_path, monkeypatch):
    _copy(tmp_path, as_code="M62.561")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert available_profiles() == ["M62.561"]
    assert load_profile("M62.561").folder == tmp_path / "M62.561"
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=PROFILES_ENV):
        load_profile("M62.561")


def test_the_shipped_schemas_are_draft_2020_12_and_name_the_kinds_the_check_implements():
    for name in ("profile.schema.json", "profiles.schema.json"):
        schema = json.loads((profiles_root() / name).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
    schema = json.loads((profiles_root() / "profile.schema.json").read_text())
    kinds = set(schema["$defs"]["element"]["properties"]["kind"]["enum"])
    assert kinds == ELEMENT_KINDS == set(_KINDS) | {"red-flag-screen"}


# --- clinical defaults are profile data --------------------------------------------------------------


def _case_report(key: str, profile):
    case = next(c for c in CASES if c.key == key)
    [record] = records_from_bundle(case.resources)
    return check(record, profile, today=TODAY, encounter_id=case.encounter_id)


def test_the_follow_up_window_is_read_from_the_profile(tmp_path):
    # one visit 10 days before today: not yet due under the shipped 42-day window (SPEC §3)
    shipped = _case_report("follow-up-not-yet-due", load_profile("M62.561")).element("follow-up")
    assert shipped.status == "not-yet-due" and "due by day 42" in shipped.detail
    folder = _copy(tmp_path)
    _edit(folder, lambda d: d["elements"][_element_index(d, "follow-up")].update(due_after_days=7))
    shortened = _case_report("follow-up-not-yet-due", load_profile("M62.561", root=tmp_path)).element("follow-up")
    assert shortened.status == "missing"


def test_the_referral_wording_is_read_from_the_profile(tmp_path):
    folder = _copy(tmp_path)
    _edit(
        folder,
        lambda d: d["referral"].update(activity="Urgent specialist referral", narrative="Referral first: {red_flags}."),
    )
    profile = load_profile("M62.561", root=tmp_path)
    bundle = build_drafts(_case_report("flag-fever", profile), profile, now=NOW)
    [plan] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan"]
    first = plan["activity"][0]["detail"]
    assert first["code"]["text"] == "Urgent specialist referral"
    assert first["description"].startswith("Red flags present (fever)")
    assert "Referral first: fever." in plan["text"]["div"]


def test_no_red_flag_present_means_no_referral_activity():
    profile = load_profile("M62.561")
    bundle = build_drafts(_case_report("complete", profile), profile, now=NOW)
    [plan] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan"]
    assert all(a["detail"].get("kind") != "ServiceRequest" for a in plan["activity"])


def test_the_default_profile_is_read_from_profiles_json():
    index = json.loads((profiles_root() / "profiles.json").read_text())
    assert DEFAULT_PROFILE == index["default"] == "M62.561"
    assert load_profile().code == DEFAULT_PROFILE


def test_a_malformed_profiles_json_names_its_file_and_field(tmp_path, monkeypatch):
    for name in ("profiles.schema.json", "profile.schema.json"):
        shutil.copy(profiles_root() / name, tmp_path / name)
    (tmp_path / "profiles.json").write_text(json.dumps({"defualt": "M62.561"}))  # misspelt: fails closed
    monkeypatch.setattr(profile_module, "_shipped_root", lambda: tmp_path)
    with pytest.raises(ProfileError) as err:
        profile_module._default_profile()
    assert str(tmp_path / "profiles.json") in str(err.value) and "'defualt'" in str(err.value)


@pytest.mark.parametrize("code", ["M62.561", "M62.830"])
def test_spec_3_2_stems_are_written_with_a_star_in_both_profiles(code):
    raw = load_profile(code).raw
    keywords = {k for item in raw["elements"] + raw["red_flags"] for k in item.get("keywords", [])}
    # SPEC §3 and §4 write these as stems; every other keyword is a whole word
    assert {
        "aggravat*",
        "exacerbat*",
        "function*",
        "limit*",
        "malignan*",
        "metasta*",
        "trauma*",
        "fractur*",
        "previous injur*",
        "prior injur*",
    } <= keywords
    assert code != "M62.561" or "immobiliz*" in keywords  # M62.561's etiology (M62.830 has its own)
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
    assert {
        "back",
        "lumbar",
        "thoracic",
        "paraspinal",
        "trapezius",
        "erector spinae",
        "multifidus",
        "latissimus",
    } <= set(back)
    assert {r["region"] for r in profile.raw["other_sites"]} == {"lower-leg", "thigh"}
    assert [f["id"] for f in profile.red_flags] == [f["id"] for f in load_profile("M62.561").red_flags]
