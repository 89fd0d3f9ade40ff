"""The example patients are data beside the profile, dated back from any day the check runs on."""

import datetime as dt
import json

import pytest

from fhir_plugin import ProfileError
from fhir_plugin._examples import _read_examples, example_cases, shift_dates


def test_every_date_moves_by_the_same_days_and_a_birth_date_keeps_the_age():
    record = {
        "birthDate": "1974-03-14",
        "onsetDateTime": "2025-11-28T09:05:00Z",
        "period": {"start": "2025-12-15T09:00:00+01:00", "end": "2025-12-15"},
        "note": [{"text": "seen 2025-12-15"}],
        "valueString": "2025-12",
    }

    moved = shift_dates(record, dt.date(2026, 1, 1), dt.date(2026, 4, 1))  # 90 days later

    assert moved["onsetDateTime"] == "2026-02-26T09:05:00Z"
    assert moved["period"] == {"start": "2026-03-15T09:00:00+01:00", "end": "2026-03-15"}
    assert moved["birthDate"] == "1975-03-14"  # 51 on both days: the birthday has come round again
    assert moved["note"] == record["note"] and moved["valueString"] == "2025-12"  # only whole dates move


def test_the_cases_keep_their_shape_whatever_today_is():
    first, later = example_cases(dt.date(2026, 11, 29)), example_cases(dt.date(2031, 2, 28))
    assert [c.key for c in first] == [c.key for c in later] and len(first) >= 37
    for a, b in zip(first, later, strict=True):
        assert a.expected == b.expected
        onset_a = [r.get("onsetDateTime") for r in a.resources if r["resourceType"] == "Condition"]
        onset_b = [r.get("onsetDateTime") for r in b.resources if r["resourceType"] == "Condition"]
        days = [
            (dt.date.fromisoformat(y[:10]) - dt.date.fromisoformat(x[:10])).days
            for x, y in zip(onset_a, onset_b, strict=True)
            if x and y
        ]
        assert set(days) <= {(dt.date(2031, 2, 28) - dt.date(2026, 11, 29)).days}


def test_a_malformed_example_file_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"key": "x"}))
    _read_examples.cache_clear()
    with pytest.raises(ProfileError, match="broken.json"):
        _read_examples(str(tmp_path))
