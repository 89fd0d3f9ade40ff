"""The ICD-10-CM index in the cache folder answers as the data package does, for every code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import simple_icd_10_cm as cm

from fhir_plugin import _icd10cm as icd


@pytest.fixture
def fresh_index(tmp_path, monkeypatch):
    """A cache folder of this test's own: the first lookup builds the index there."""
    monkeypatch.setenv("FHIR_PLUGIN_CACHE", str(tmp_path))
    for cached in (icd._index, icd.title, icd.excludes1_codes):
        cached.cache_clear()
    yield tmp_path
    for cached in (icd._index, icd.title, icd.excludes1_codes):
        cached.cache_clear()


def test_every_code_has_the_packages_title_leafness_and_excludes1(fresh_index):
    codes = cm.get_all_codes(True)
    assert len(codes) > 90_000
    valid = 0
    for code in codes:
        asked = icd.normalize(code)  # what the plugin asks the package (a block's "A00-A09" is not a code)
        assert icd.is_valid(code) is cm.is_valid_item(asked), code
        if not cm.is_valid_item(asked):
            continue
        valid += 1
        assert icd.title(code) == cm.get_description(asked), code
        assert icd.is_billable(code) is cm.is_leaf(asked), code
        assert [note for _, note, _ in icd.excludes1_codes(code)] == [
            note for note in cm.get_excludes1(asked) for _ in icd._CODE_IN_NOTE.finditer(note)
        ], code
    assert valid > 90_000
    # written once, as JSON, beside nothing half-written
    [index] = list(fresh_index.iterdir())
    assert index.name.startswith("icd10cm-") and index.suffix == ".json"


@pytest.mark.parametrize("code", ["M62561", "m62.561", " M62.561 ", "M6256", "A00", "M62", "Z99.89"])
def test_codes_with_or_without_their_dot_are_found_as_the_package_finds_them(fresh_index, code):
    bare = code.strip().upper()
    assert icd.is_valid(code) is cm.is_valid_item(bare)
    assert icd.title(code) == cm.get_description(bare)
    assert icd.is_billable(code) is cm.is_leaf(bare)


@pytest.mark.parametrize("code", ["", "M62.5619", "XYZ", "M62..561", "12345"])
def test_what_is_not_a_code_is_not_valid(fresh_index, code):
    assert icd.is_valid(code) is False
    assert icd.is_billable(code) is False
    if code:
        with pytest.raises(ValueError, match="not an ICD-10-CM code"):
            icd.title(code)


@pytest.mark.parametrize(
    "damage",
    ['{"M62.561": ["typed by hand"', '{"M62.561": ["typed by hand"]}', '["M62.561"]', '{"M62.561": 5}'],
    ids=["cut short", "short entry", "a list", "not an entry"],
)
def test_a_damaged_index_is_rebuilt_from_the_package(fresh_index, damage):
    assert icd.title("M62.561") == cm.get_description("M62.561")
    [index] = list(fresh_index.iterdir())
    index.write_text(damage, encoding="utf-8")
    icd._index.cache_clear()
    icd.title.cache_clear()
    assert icd.title("M62.561") == cm.get_description("M62.561")
    assert json.loads(index.read_text(encoding="utf-8"))["M62.561"][0] == cm.get_description("M62.561")


def test_a_process_with_the_index_built_does_not_import_the_package(fresh_index):
    icd.title("M62.561")  # builds the index in this test's cache folder
    probe = (
        "import sys; from fhir_plugin import _icd10cm as icd; "
        "print(icd.title('M62.561'), icd.is_billable('M62.561'), 'simple_icd_10_cm' in sys.modules)"
    )
    env = {"FHIR_PLUGIN_CACHE": str(fresh_index), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"{cm.get_description('M62.561')} True False"
