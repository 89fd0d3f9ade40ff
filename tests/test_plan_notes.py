"""SPEC §7.1 after a folded write (issue 12 follow-up): the plan note is the drafted plan. Pure, no server.

On a server without CarePlan create the plan goes as a preliminary
DocumentReference with the CarePlan attached (``_fold``).  A record that holds
that note (and the Condition written beside it) must read as after any write:
``treatment-plan`` proposed, nothing new offered — unless the set was cut
short before its Provenance, when the rerun offers the drafts again so the
writer completes it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from test_check_cases import CASES, TODAY

from fhir_plugin import PatientRecord, load_profile, records_from_bundle, review
from fhir_plugin._drafts import drafted_plans, existing_in
from fhir_plugin._fold import fold_drafts
from sandbox.testing import needing_drafts

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
PROFILE = load_profile("M62.561")
EPIC_LIKE = frozenset({"Condition", "DocumentReference"})
ORACLE_LIKE = frozenset({"Condition", "DocumentReference", "Provenance"})


def _case():
    """missing-onset as a record that needs every draft: no plan, the chart's Condition coded M62.56."""
    case = next(c for c in CASES if c.key == "missing-onset")
    [record] = records_from_bundle(needing_drafts(case.resources))
    return case, record


def _on_the_server(record: PatientRecord, folded: dict, *, leave_out: str | None = None) -> PatientRecord:
    """``record`` after the folded drafts were created one by one: ids given, placeholders replaced."""
    entries = [e for e in folded["entry"] if e["resource"]["resourceType"] != leave_out]
    refs = {e["fullUrl"]: f"{e['resource']['resourceType']}/n{i}" for i, e in enumerate(entries)}
    text = json.dumps([dict(e["resource"], id=refs[e["fullUrl"]].split("/")[1]) for e in entries])
    for url, ref in refs.items():
        text = text.replace(url, ref)
    return PatientRecord(record.patient_id, record.resources + tuple(json.loads(text)))


def _folded(creatable: frozenset[str]):
    case, record = _case()
    first = review(record, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)
    assert first.drafts is not None
    return case, record, fold_drafts(first.drafts, creatable.__contains__).drafts


def test_after_a_complete_epic_like_write_the_note_is_the_proposed_plan_and_nothing_is_offered():
    case, record, folded = _folded(EPIC_LIKE)
    assert [e["resource"]["resourceType"] for e in folded["entry"]] == ["Condition", "DocumentReference"]
    after = _on_the_server(record, folded)

    again = review(after, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)

    plan = again.report.element("treatment-plan")
    assert (plan.status, list(plan.evidence)) == ("proposed", ["DocumentReference/n1"])
    assert again.drafts is None and again.refused is None
    assert sorted(again.existing.written) == ["Condition/n0", "DocumentReference/n1"]
    assert "DocumentReference/n1" in again.settled
    # a draft is never evidence: no element is met by the plugin's own Condition or note
    assert not any(
        ref.startswith(("DocumentReference/", "Condition/n"))
        for e in again.report.elements
        for ref in e.evidence
        if e.id != "treatment-plan"
    )


def test_after_a_complete_oracle_like_write_the_provenance_completes_the_set():
    case, record, folded = _folded(ORACLE_LIKE)
    assert [e["resource"]["resourceType"] for e in folded["entry"]] == ["Condition", "DocumentReference", "Provenance"]
    after = _on_the_server(record, folded)

    again = review(after, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)

    assert again.report.element("treatment-plan").status == "proposed"
    assert again.drafts is None
    assert sorted(again.existing.written) == ["Condition/n0", "DocumentReference/n1", "Provenance/n2"]


def test_a_write_cut_short_before_the_provenance_is_offered_again_so_a_rerun_completes_it():
    case, record, folded = _folded(ORACLE_LIKE)
    after = _on_the_server(record, folded, leave_out="Provenance")

    again = review(after, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)

    assert again.report.element("treatment-plan").status == "proposed"  # the note is there
    assert again.existing.written == () and again.drafts is not None  # the set is not: offered again
    [noted] = drafted_plans(after)
    assert not noted.complete and noted.provenances == ()


def test_a_note_that_is_not_the_plugins_own_plan_is_no_plan():
    case, record, folded = _folded(EPIC_LIKE)
    after = _on_the_server(record, folded)
    notes = {r["id"]: r for r in after.of_type("DocumentReference")}
    untagged = dict(notes["n1"], meta={})  # a clinician's note: not the plugin's draft
    other_plan = json.loads(json.dumps(notes["n1"]))
    other_plan["identifier"][0]["value"] = "urn:uuid:00000000-0000-4000-8000-000000000000"  # plan not its own
    voided = dict(notes["n1"], status="entered-in-error")
    for changed in (untagged, other_plan, voided):
        resources = tuple(r for r in after.resources if r.get("id") != "n1") + (changed,)
        changed_record = PatientRecord(after.patient_id, resources)
        assert drafted_plans(changed_record) == []
        assert existing_in(changed_record, PROFILE).written == ()


def test_the_population_row_reads_the_written_note_as_the_plan_and_skips_other_notes():
    """``population --plan-notes``: the export's DocumentReference lines reach the row; only the plugin's own
    plan note is kept (as the reader keeps it), any other note is skipped, not evidence and not a problem."""
    from fhir_plugin._population._rows import key_line, patient_row

    case, record, folded = _folded(EPIC_LIKE)
    after = _on_the_server(record, folded)
    clinician_note = {
        "resourceType": "DocumentReference",
        "id": "clin1",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18776-5"}]},
        "subject": {"reference": f"Patient/{record.patient_id}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "cGxhbg=="}}],
        "description": "Right calf atrophy: onset three weeks ago, painful exam",  # no evidence for anything
    }
    unlinked = {"resourceType": "DocumentReference", "id": "x", "status": "current", "content": []}
    lines = [("f.ndjson", i, json.dumps(r)) for i, r in enumerate((*after.resources, clinician_note), 1)]
    row = patient_row(record.patient_id, lines, PROFILE, today=TODAY, now=NOW)
    before = patient_row(record.patient_id, lines[: len(record.resources)], PROFILE, today=TODAY, now=NOW)

    assert row["problem"] is None
    assert json.loads(row["statuses"])["treatment-plan"] == "proposed" and "treatment-plan" not in row["gaps"]
    assert row["drafts_allowed"] is False
    assert json.loads(before["statuses"])["treatment-plan"] == "missing" and before["drafts_allowed"] is True
    # apart from the plan, the row is the one the record without the notes gives
    same = {k: v for k, v in json.loads(row["statuses"]).items() if k != "treatment-plan"}
    assert same == {k: v for k, v in json.loads(before["statuses"]).items() if k != "treatment-plan"}
    assert key_line(json.dumps(unlinked)) is None  # a note with no patient is skipped, not reported


def test_the_population_row_of_a_note_whose_provenance_is_not_exported_offers_the_set_again():
    """Oracle-like: the Provenance about the note is outside the patient compartment a Group export follows.
    The note still reads as the proposed plan; the set counts as not complete, so its drafts are offered."""
    from fhir_plugin._population._rows import patient_row

    case, record, folded = _folded(ORACLE_LIKE)
    after = _on_the_server(record, folded, leave_out="Provenance")
    lines = [("f.ndjson", i, json.dumps(r)) for i, r in enumerate(after.resources, 1)]
    row = patient_row(record.patient_id, lines, PROFILE, today=TODAY, now=NOW)
    assert json.loads(row["statuses"])["treatment-plan"] == "proposed" and row["drafts_allowed"] is True
