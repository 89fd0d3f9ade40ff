"""The sandbox personalities' rules (issue 12), pure: what each refuses, and what its statement declares."""

from fhir_plugin import LedgerWriter, TransactionWriter, strategies_for
from fhir_plugin._capabilities import ServerCapabilities
from fhir_plugin._client import FhirClient
from fhir_plugin._write import FoldingWriter
from sandbox.ehr._personality import personality, refusal, rewrite_capabilities

HAPI_LIKE = {
    "resourceType": "CapabilityStatement",
    "rest": [
        {
            "mode": "server",
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "resource": [
                {
                    "type": t,
                    "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
                    "conditionalCreate": True,
                    "searchParam": [{"name": "patient"}, {"name": "identifier"}],
                }
                for t in ("Condition", "Goal", "CarePlan", "Provenance", "DocumentReference")
            ],
        }
    ],
}
CONDITION = {
    "resourceType": "Condition",
    "subject": {"reference": "Patient/p"},
    "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
    "verificationStatus": {"coding": [{"code": "provisional"}]},
}


def test_epic_like_refuses_bundles_conditional_creates_plans_and_wrong_conditions():
    epic = personality("epic-like")
    assert refusal(epic, "POST", "", "", {}, {"resourceType": "Bundle"})[0] == 400
    assert refusal(epic, "POST", "Condition", "", {"if-none-exist": "identifier=x"}, CONDITION)[0] == 400
    assert refusal(epic, "POST", "CarePlan", "", {}, {"resourceType": "CarePlan"})[0] == 405
    status, outcome = refusal(epic, "POST", "Condition", "", {}, CONDITION)
    assert status == 422 and "problem-list-item" in outcome["issue"][0]["diagnostics"]
    listed = dict(CONDITION, category=[{"coding": [{"code": "problem-list-item"}]}])
    assert refusal(epic, "POST", "Condition", "", {}, listed) is None
    assert refusal(epic, "POST", "DocumentReference", "", {}, {"resourceType": "DocumentReference"})[0] == 422
    assert refusal(epic, "GET", "Condition", "code=x", {}, None)[0] == 400
    assert refusal(epic, "GET", "Observation", "patient=p", {}, None)[0] == 400
    assert refusal(epic, "GET", "Observation", "patient=p&category=vital-signs", {}, None) is None


def test_oracle_like_answers_a_batch_with_422_and_takes_provenance():
    oracle = personality("oracle-like")
    assert refusal(oracle, "POST", "", "", {}, {"resourceType": "Bundle"})[0] == 422
    assert refusal(oracle, "POST", "Provenance", "", {}, {"resourceType": "Provenance"}) is None
    assert refusal(oracle, "POST", "Goal", "", {}, {"resourceType": "Goal"})[0] == 405
    assert refusal(oracle, "GET", "Provenance", "target=Condition/c", {}, None) is None
    assert refusal(personality("hapi"), "POST", "", "", {}, {"resourceType": "Bundle"}) is None


def test_the_rewritten_statements_choose_each_writer(tmp_path):
    client = FhirClient("http://ehr.test/fhir")
    chosen = {
        name: strategies_for(
            client, rewrite_capabilities(personality(name), HAPI_LIKE), ledger=tmp_path / "ledger.sqlite"
        )
        for name in ("hapi", "epic-like", "oracle-like")
    }
    assert type(chosen["hapi"].writer) is TransactionWriter
    for name in ("epic-like", "oracle-like"):
        writer = chosen[name].writer
        assert type(writer) is FoldingWriter and type(writer.inner) is LedgerWriter
    epic = ServerCapabilities.from_statement(rewrite_capabilities(personality("epic-like"), HAPI_LIKE))
    assert not epic.batch and not epic.transaction and not epic.can_create("CarePlan")
    assert epic.can_create("DocumentReference") and not epic.can_create_conditionally("Condition")


def test_each_statement_declares_the_export_levels_its_personality_offers():
    """The $export operations HAPI declares (system, Patient, Group) are kept only where the personality
    offers that level: a client reading the statement learns it before any kick-off is refused."""
    export = {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
    statement = {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "operation": [export, {"name": "export-poll-status"}],
                "resource": [{"type": t, "operation": [dict(export)]} for t in ("Patient", "Group")],
            }
        ],
    }

    def levels(name: str) -> set[str]:
        [rest] = rewrite_capabilities(personality(name), statement)["rest"]
        found = {"system"} if any(o["name"] == "export" for o in rest["operation"]) else set()
        return found | {
            r["type"].lower() for r in rest["resource"] if any(o["name"] == "export" for o in r["operation"])
        }

    assert levels("hapi") == {"system", "patient", "group"}
    assert levels("epic-like") == {"group"}
    assert levels("oracle-like") == {"patient", "group"}
