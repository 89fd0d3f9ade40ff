"""The sandbox EHR's Bulk Data rules and its rate limit, as pure functions (no server).

The same rules run against the real HAPI in ``test_population_ehr.py`` (export) and
``test_sync_throttled.py`` (rate limit).
"""

from __future__ import annotations

import pytest

from sandbox.ehr._access import Denied
from sandbox.ehr._bulk import Exports, check_kickoff, export_call, job_id, rewrite_manifest
from sandbox.ehr._scopes import resource_scopes
from sandbox.ehr._throttle import Throttle, parse_rate_limit

UP = "http://127.0.0.1:8080/fhir"
PROXY = "http://127.0.0.1:9090/fhir"
ALL = frozenset({"system", "patient", "group"})


def test_export_calls_are_named_by_their_path():
    assert export_call("$export").level == "system"
    assert export_call("Patient/$export").level == "patient"
    call = export_call("Group/g-1/$export")
    assert (call.kind, call.level, call.group) == ("kickoff", "group", "g-1")
    assert export_call("$export-poll-status").kind == "status"
    assert export_call("Patient/p1/$everything") is None and export_call("Group/g-1") is None


def test_a_kickoff_needs_system_read_scopes_for_every_type_asked():
    group = export_call("Group/g/$export")
    check_kickoff(group, [], resource_scopes("system/*.read"), ALL)
    check_kickoff(group, [("_type", "Condition,Patient")], resource_scopes("system/Condition.rs system/Patient.r"), ALL)
    with pytest.raises(Denied, match="exporting Observation") as refused:
        check_kickoff(group, [("_type", "Condition,Observation")], resource_scopes("system/Condition.rs"), ALL)
    assert refused.value.status == 403
    with pytest.raises(Denied, match="exporting \\*"):  # no _type: every type, which needs system/*
        check_kickoff(group, [], resource_scopes("system/Condition.rs"), ALL)
    with pytest.raises(Denied, match="system/ scopes") as user:
        check_kickoff(group, [], resource_scopes("user/*.read patient/*.read"), ALL)
    assert user.value.status == 403
    with pytest.raises(Denied, match="exporting Condition"):  # create alone reads nothing
        check_kickoff(group, [("_type", "Condition")], resource_scopes("system/Condition.c"), ALL)


def test_a_level_the_vendor_does_not_offer_is_refused_naming_the_one_it_does():
    with pytest.raises(Denied, match=r"exports at Group/\[id\]/\$export only") as refused:
        check_kickoff(export_call("$export"), [], resource_scopes("system/*.read"), frozenset({"group"}))
    assert refused.value.status == 400
    with pytest.raises(Denied, match=r"Group/\[id\]/\$export or Patient/\$export only"):
        check_kickoff(export_call("$export"), [], resource_scopes("system/*.read"), frozenset({"group", "patient"}))


def test_the_manifest_is_moved_to_the_proxy_and_lists_its_files():
    manifest = {
        "transactionTime": "2026-11-29T10:00:00Z",
        "request": f"{UP}/Group/g/$export?_type=Condition",
        "requiresAccessToken": False,
        "output": [
            {"type": "Condition", "url": f"{UP}/Binary/abc"},
            {"type": "Patient", "url": "https://files.example.org/x.ndjson"},
        ],
        "error": [{"type": "OperationOutcome", "url": f"{UP}/Binary/err1"}],
    }
    moved, files = rewrite_manifest(manifest, lambda u: u.replace(UP, PROXY), UP)
    assert [o["url"] for o in moved["output"]] == [f"{PROXY}/Binary/abc", "https://files.example.org/x.ndjson"]
    assert moved["error"][0]["url"] == f"{PROXY}/Binary/err1"
    assert moved["request"].startswith(PROXY) and moved["requiresAccessToken"] is True
    assert files == ["abc", "err1"]
    assert manifest["output"][0]["url"].startswith(UP)  # the upstream's manifest is not changed in place


def test_exports_and_their_files_belong_to_the_app_that_started_them():
    exports = Exports()
    exports.started("job-1", "app-a")
    exports.listed(["abc"], "app-a")
    assert exports.owner("job-1") == "app-a" and exports.owner("job-2") is None
    assert exports.file_owner("abc") == "app-a" and exports.file_owner("other") is None
    assert job_id(f"{UP}/$export-poll-status?_jobId=job-1") == "job-1"
    assert job_id("_jobId=a&_jobId=b") is None and job_id("") is None


def test_the_rate_limit_is_a_sliding_window_per_app():
    now = [1000.0]
    throttle = Throttle(3, 10.0, lambda: now[0])
    for _ in range(3):
        assert throttle.admit("a") == 0
        now[0] += 1
    assert throttle.admit("a") == 7  # at 1003: the first call (at 1000) leaves the window at 1010
    assert throttle.admit("b") == 0  # another app has its own window
    now[0] = 1006.5
    assert throttle.admit("a") == 4  # refused calls are not counted: still the first call's 3.5 s, rounded up
    now[0] = 1010.0
    assert throttle.admit("a") == 0  # the first call left the window; this one takes its place
    assert throttle.admit("a") == 1  # the second (at 1001) leaves at 1011


def test_a_rate_limit_is_written_calls_or_calls_per_seconds():
    assert parse_rate_limit("250") == (250, 60.0)
    assert parse_rate_limit("5/1") == (5, 1.0)
    for bad in ("0", "-3", "five", "5/0", "5/x"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


def test_a_sandbox_left_running_forgets_the_oldest_exports_and_requests_not_the_rules():
    exports = Exports(max_jobs=2, max_files=3)
    for n in range(4):
        exports.started(f"job-{n}", "app-a")
        exports.listed([f"file-{n}a", f"file-{n}b"], "app-a")
    # the two latest jobs and three latest files are remembered; the forgotten ones are no one's (404), not anyone's
    assert [exports.owner(f"job-{n}") for n in range(4)] == [None, None, "app-a", "app-a"]
    assert exports.file_owner("file-3b") == "app-a" and exports.file_owner("file-2b") == "app-a"
    assert exports.file_owner("file-1b") is None and exports.file_owner("file-0a") is None

    from sandbox.ehr import _proxy

    seen: list[int] = []
    for n in range(2 * _proxy.RECORDED + 1):
        _proxy._record(seen, n)
    assert len(seen) == _proxy.RECORDED and seen[-1] == 2 * _proxy.RECORDED  # the latest kept, in order
