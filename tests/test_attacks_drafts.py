"""Hijacking another patient's drafts (issue 11, item 3).

Draft identifiers are derived from patient, encounter and code, so anyone can
compute them.  An attacker who may write for patient A plants a Condition for
A carrying the identifier of B's draft; B's write must still create B's own
Condition (the conditional create keys on the patient too), B's CarePlan must
address B's Condition, and a server that matches anyway must be caught by the
writer — never reported as "already there".
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import responses
from fresh import fresh_cases
from test_check_cases import CASES, TODAY

from fhir_plugin import FhirClient, TransactionWriter, build_drafts, check, draft_identifiers, load_profile
from fhir_plugin._errors import Forbidden
from fhir_plugin._vocab import URI_IDENTIFIER
from fhir_plugin.synthetic import load_into_server

BASE = "http://fhir.test/fhir"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _case(key):
    return next(c for c in CASES if c.key == key)


def _drafts_for(case):
    from fhir_plugin._record import records_from_bundle

    profile = load_profile("M62.561")
    report = check(records_from_bundle(case.resources)[0], profile, today=TODAY)
    return report, profile, build_drafts(report, profile, now=NOW)


def test_every_conditional_create_names_the_patient():
    report, _, bundle = _drafts_for(_case("missing-onset"))
    careplan_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan")
    for entry in bundle["entry"]:
        search = entry["request"]["ifNoneExist"]
        if entry["resource"]["resourceType"] == "Provenance":
            # keyed on the draft plan (always drafted with a Provenance, SPEC §7.1); the server resolves the
            # placeholder to the patient's CarePlan
            assert f"target={careplan_url}" in search.split("&")
        else:
            assert f"subject={report.patient}" in search.split("&")


def _answer_with(bundle, resource_for):
    """A transaction-response that says every entry already existed, with the resource the server matched."""
    entries = []
    for i, entry in enumerate(bundle["entry"]):
        rtype = entry["resource"]["resourceType"]
        entries.append(
            {
                "response": {"status": "200 OK", "location": f"{rtype}/m{i}/_history/1"},
                "resource": resource_for(entry, f"m{i}"),
            }
        )
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


@pytest.mark.parametrize("who", ["another patient's Condition", "a Provenance about other resources"])
def test_a_match_for_another_patient_is_an_error_not_already_there(who):
    _, _, bundle = _drafts_for(_case("missing-onset"))

    def matched(entry, rid):
        resource = {**entry["resource"], "id": rid}
        if who.startswith("another") and "subject" in resource:
            resource["subject"] = {"reference": "Patient/someone-else"}
        if who.startswith("a Provenance") and resource["resourceType"] == "Provenance":
            resource["target"] = [{"reference": "Condition/not-this-one"}]
        if resource["resourceType"] == "Provenance" and who.startswith("another"):
            resource["target"] = [{"reference": "Condition/m0"}]
        return resource

    with responses.RequestsMock() as mock:
        mock.post(BASE, json=_answer_with(bundle, matched))
        with pytest.raises(Forbidden, match="nothing was taken as already there"):
            TransactionWriter(FhirClient(BASE, retries=0)).write(bundle)
        assert mock.calls[0].request.headers["Prefer"] == "return=representation"


def test_the_patients_own_matches_are_already_there():
    _, _, bundle = _drafts_for(_case("missing-onset"))
    with responses.RequestsMock() as mock:
        mock.post(
            BASE,
            json=_answer_with(
                bundle,
                lambda entry, rid: {
                    **entry["resource"],
                    "id": rid,
                    **(
                        {"target": [{"reference": "Condition/m0"}]}
                        if entry["resource"]["resourceType"] == "Provenance"
                        else {}
                    ),
                },
            ),
        )
        result = TransactionWriter(FhirClient(BASE, retries=0)).write(bundle)
    assert result.created == () and len(result.existing) == len(bundle["entry"])


@pytest.mark.server
def test_a_planted_identifier_does_not_capture_the_patients_drafts(fhir_base_url):
    victim, attacker = fresh_cases([_case("missing-onset"), _case("complete")])
    load_into_server(fhir_base_url, [victim, attacker])
    report, profile, bundle = _drafts_for(victim)
    ids = draft_identifiers(report, profile)
    with FhirClient(fhir_base_url) as client:
        # The attacker, allowed to write for their own patient, plants B's draft identifier there.
        planted = client.request(
            "POST",
            "Condition",
            body={
                "resourceType": "Condition",
                "subject": {"reference": f"Patient/{attacker.patient_id}"},
                "identifier": [{"system": URI_IDENTIFIER, "value": ids["condition"]}],
                "code": {"text": "planted"},
            },
        )
        try:
            _write_and_check(client, bundle, victim.patient_id, ids, planted["id"])
        finally:  # the server is shared: leave no planted duplicate behind for other runs to trip on
            client.request("DELETE", f"Condition/{planted['id']}")


def _write_and_check(client: FhirClient, bundle: dict, victim: str, ids: dict[str, str], planted: str) -> None:
    """B's write creates B's own drafts, never takes the planted one as "already there", and repeats as a no-op."""
    result = TransactionWriter(client).write(bundle)
    assert f"Condition/{planted}" not in result.created + result.existing
    mine = client.search(
        "Condition", {"identifier": f"{URI_IDENTIFIER}|{ids['condition']}", "subject": f"Patient/{victim}"}
    )
    assert len(mine) == 1 and f"Condition/{mine[0]['id']}" in result.created
    [careplan] = client.search(
        "CarePlan", {"identifier": f"{URI_IDENTIFIER}|{ids['careplan']}", "subject": f"Patient/{victim}"}
    )
    assert careplan["addresses"] == [{"reference": f"Condition/{mine[0]['id']}"}]
    again = TransactionWriter(client).write(bundle)
    assert again.created == () and sorted(again.existing) == sorted(result.created)
