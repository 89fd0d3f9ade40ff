"""The written page and the review's written list speak a clinician's words, not FHIR's ids and codes."""

from __future__ import annotations

from smart_launch.views import plain_form, plain_reason, plain_refs


def test_written_records_are_named_by_what_they_are_and_numbered_when_several():
    refs = ["Condition/3458", "Goal/1", "Goal/2", "CarePlan/9", "DocumentReference/3459", "Provenance/7"]
    assert plain_refs(refs) == [
        ("Condition/3458", "Diagnosis"),
        ("Goal/1", "Goal 1"),
        ("Goal/2", "Goal 2"),
        ("CarePlan/9", "Treatment plan"),
        ("DocumentReference/3459", "Plan of care note"),
        ("Provenance/7", "Authorship record"),
    ]


def test_each_folded_form_reads_as_a_sentence():
    # the forms _fold reports on epic-like and oracle-like servers
    assert (
        plain_form("Condition", "Condition (problem-list-item, provisional)") == "as a provisional problem-list entry"
    )
    assert plain_form("Condition", "Condition (encounter-diagnosis, provisional)") == (
        "as a provisional encounter diagnosis"
    )
    assert plain_form("CarePlan", "DocumentReference (preliminary plan note, CarePlan JSON attached)") == (
        "as a preliminary plan of care note, with the structured plan attached"
    )
    assert plain_form("Goal", "in the plan note (DocumentReference)") == "inside the plan of care note"
    assert plain_form("Provenance", "Provenance") == "as drafted"


def test_each_reason_for_not_writing_reads_as_a_sentence():
    assert plain_reason(
        "the server creates no Provenance; the note and the Condition carry the machine-drafted tag"
    ) == ("this EHR accepts no authorship record; the note and the diagnosis are marked as drafted by software")
    assert plain_reason("the server creates no Goal and no DocumentReference") == "this EHR accepts no goal and no note"
    assert plain_reason("the granted scopes allow no Condition create") == (
        "the access this app was granted does not allow writing a diagnosis"
    )
    assert plain_reason("something new") == "something new"  # an unknown reason is shown as it is
