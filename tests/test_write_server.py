"""`propose --write` against a real FHIR server: exactly one set of drafts, never two (SPEC §7)."""

import json

import pytest
from fresh import fresh_cases
from test_check_cases import CASES, TODAY

from fhir_plugin import FhirClient, phases_of
from fhir_plugin._cli import main
from fhir_plugin.synthetic import load_into_server

pytestmark = pytest.mark.server


def _case(key):
    return next(c for c in CASES if c.key == key)


def _counts(client: FhirClient, patient_id: str) -> dict[str, int]:
    counts = {t: len(client.search(t, {"patient": patient_id})) for t in ("Condition", "CarePlan", "Goal")}
    conditions = [c["id"] for c in client.search("Condition", {"patient": patient_id})]
    counts["Provenance"] = sum(len(client.search("Provenance", {"target": f"Condition/{cid}"})) for cid in conditions)
    return counts


def _propose(base, patient_id, capsys, *extra):
    code = main(
        [
            "propose",
            "--server",
            base,
            "--patient",
            patient_id,
            "--write",
            "--format",
            "json",
            "--today",
            TODAY.isoformat(),
            *extra,
        ]
    )
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def gaps_case(fhir_base_url):
    # SPEC §7.1: a plan or the diagnosis already in the chart is not drafted again; this record still
    # needs every draft (no clinician plan, the chart's Condition coded only as M62.56)
    import dataclasses

    from sandbox.testing import needing_drafts

    original = _case("missing-onset")
    [case] = fresh_cases([dataclasses.replace(original, resources=needing_drafts(original.resources))])
    load_into_server(fhir_base_url, [case])
    return case


def test_write_creates_one_set_of_drafts_and_a_second_run_nothing(fhir_base_url, gaps_case, capsys):
    pid = gaps_case.patient_id
    with FhirClient(fhir_base_url) as client:
        before = _counts(client, pid)
        code, first = _propose(fhir_base_url, pid, capsys)
        assert code == 0
        after_first = _counts(client, pid)
        code, second = _propose(fhir_base_url, pid, capsys)
        assert code == 0
        after_second = _counts(client, pid)
    assert after_first["Condition"] == before["Condition"] + 1
    assert after_first["CarePlan"] == before["CarePlan"] + 1
    assert after_first["Goal"] == before["Goal"] + 4  # one per phase goal
    assert after_first["Provenance"] == before["Provenance"] + 1
    assert len(first["written"]["created"]) == 7 and first["written"]["existing"] == []
    assert after_second == after_first  # nothing new the second time
    # SPEC §7.1 after a write: the drafts are in the record, so the second run offers nothing to send
    assert "written" not in second and "already in the record" in second["settled"]


def test_careplan_reads_back_as_four_phases_and_validates(fhir_base_url, gaps_case, capsys):
    pid = gaps_case.patient_id
    _propose(fhir_base_url, pid, capsys)  # idempotent: creates the drafts if the test above did not run
    with FhirClient(fhir_base_url) as client:
        [plan] = [p for p in client.search("CarePlan", {"patient": pid}) if p.get("status") == "draft"]
        phases = phases_of(plan)
        assert [p.number for p in phases] == [1, 2, 3, 4]
        assert [p.title for p in phases] == ["Acute management", "Recovery", "Strengthening", "Functional"]
        goals = {g["id"]: g for g in client.search("Goal", {"patient": pid})}
        for phase in phases:
            assert phase.activities and len(phase.goals) == 1
            goal = goals[phase.goals[0].split("/")[-1]]
            assert goal["lifecycleStatus"] == "proposed"
        assert "Eccentric heel drops" in phases[3].activities
        assert phases[0].start <= phases[1].start <= phases[2].start <= phases[3].start
        [condition] = [
            c
            for c in client.search("Condition", {"patient": pid})
            if c["verificationStatus"]["coding"][0]["code"] == "provisional"
        ]
        assert condition["code"]["coding"][0] == {
            "system": "http://hl7.org/fhir/sid/icd-10-cm",
            "code": "M62.561",
            "display": "Muscle wasting and atrophy, not elsewhere classified, right lower leg",
        }
        assert plan["addresses"] == [{"reference": f"Condition/{condition['id']}"}]
        for resource in (condition, plan):
            outcome = client.validate(resource)
            errors = [i for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]
            assert not errors, json.dumps(errors, indent=1)


def test_the_check_then_sees_the_draft_plan_as_proposed(fhir_base_url, capsys):
    [case] = fresh_cases([_case("missing-treatment-plan")])
    load_into_server(fhir_base_url, [case])
    with FhirClient(fhir_base_url) as client:
        assert client.read_patient_record(case.patient_id).counts().get("CarePlan") == 1  # entered-in-error
        _propose(fhir_base_url, case.patient_id, capsys)
        # read at once after the write: a cached search would hide the draft
        plans = client.read_patient_record(case.patient_id).of_type("CarePlan")
        assert sorted(p["status"] for p in plans) == ["draft", "entered-in-error"]
    code = main(
        [
            "check",
            "--server",
            fhir_base_url,
            "--patient",
            case.patient_id,
            "--format",
            "json",
            "--today",
            TODAY.isoformat(),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    statuses = {e["id"]: e["status"] for e in report["elements"]}
    # only the plugin's own draft addresses the condition now; its gap note is never evidence
    assert statuses["treatment-plan"] == "proposed"
    assert code == 1


def test_the_draft_gap_note_is_not_evidence(fhir_base_url, gaps_case, capsys):
    _propose(fhir_base_url, gaps_case.patient_id, capsys)
    code = main(
        [
            "check",
            "--server",
            fhir_base_url,
            "--patient",
            gaps_case.patient_id,
            "--format",
            "json",
            "--today",
            TODAY.isoformat(),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    statuses = {e["id"]: e["status"] for e in report["elements"]}
    # the fixture has no clinician plan (SPEC §7.1), so only the draft addresses the condition: proposed;
    # the draft's gap note is never evidence
    assert statuses["treatment-plan"] == "proposed"
    assert statuses["onset"] == "missing"
    assert code == 1


def test_a_mismatched_record_gets_no_drafts(fhir_base_url, capsys):
    [case] = fresh_cases([_case("clinical-example")])
    load_into_server(fhir_base_url, [case])
    with FhirClient(fhir_base_url) as client:
        before = _counts(client, case.patient_id)
        code = main(
            [
                "propose",
                "--server",
                fhir_base_url,
                "--patient",
                case.patient_id,
                "--write",
                "--today",
                TODAY.isoformat(),
            ]
        )
        captured = capsys.readouterr()
        assert code == 2
        assert "M62.830" in captured.err and "no drafts were made" in captured.err
        assert _counts(client, case.patient_id) == before


def test_six_writers_at_once_make_one_set_of_drafts_and_all_succeed(fhir_base_url):
    """Two jobs, or a job beside the app, may write one patient's drafts at the same moment. HAPI refuses
    the second of two identical transactions of conditional creates with 409; the client sends it again
    (it is harmless to repeat) and its conditional creates find the first's drafts (SPEC §7). Six threads,
    each with its own client, send the same drafts on one signal."""
    import dataclasses
    import threading
    from datetime import UTC, datetime

    from fhir_plugin import TransactionWriter, load_profile, review
    from sandbox.testing import needing_drafts

    original = _case("missing-onset")
    [case] = fresh_cases([dataclasses.replace(original, resources=needing_drafts(original.resources))])
    load_into_server(fhir_base_url, [case])
    with FhirClient(fhir_base_url) as client:
        before = _counts(client, case.patient_id)
        record = client.read_patient_record(case.patient_id)
    drafts = review(record, load_profile("M62.561"), today=TODAY, now=datetime.now(UTC)).drafts
    assert drafts is not None
    go = threading.Barrier(6)
    failures: list[BaseException] = []

    def write() -> None:
        with FhirClient(fhir_base_url, sleep=lambda s: None) as client:
            go.wait(timeout=60)
            try:
                TransactionWriter(client).write(drafts)
            except Exception as exc:  # collected and asserted below
                failures.append(exc)

    writers = [threading.Thread(target=write) for _ in range(6)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=180)
    assert failures == []
    with FhirClient(fhir_base_url) as client:
        after = _counts(client, case.patient_id)
    assert {k: after[k] - before[k] for k in after} == {"Condition": 1, "CarePlan": 1, "Goal": 4, "Provenance": 1}
