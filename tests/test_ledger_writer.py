"""The ledger writer (issue 12, writer c) against a mocked server WITHOUT conditional create.

The mock keeps what is created, answers per-patient searches and reads, and
counts every request, so each test checks what a user would: how many
resources of each kind the patient ends up with, what the result says, and
which requests went out.  The crash between a create and the ledger update is
injected with the writer's ``after_create`` hook.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlparse

import pytest
import responses
from test_check_cases import CASES, TODAY

from fhir_plugin import (
    FhirClient,
    Forbidden,
    Ledger,
    LedgerWriter,
    PerResourceWriter,
    TransactionWriter,
    build_drafts,
    check,
    load_profile,
    records_from_bundle,
    strategies_for,
)
from fhir_plugin._capabilities import ServerCapabilities
from sandbox.testing import needing_drafts

BASE = "http://ehr.test/fhir"
NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
PROFILE = load_profile("M62.561")
TYPES = ("Condition", "Goal", "CarePlan", "Provenance")
ALL_TYPES = ("Patient", "Observation", "Encounter", "DocumentReference", *TYPES)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def _drafts(key: str = "missing-onset") -> dict:
    case = next(c for c in CASES if c.key == key)
    [record] = records_from_bundle(case.resources)
    return build_drafts(check(record, PROFILE, today=TODAY, encounter_id=case.encounter_id), PROFILE, now=NOW)


def _statement(*, identifier_search: bool) -> ServerCapabilities:
    """A server that creates every draft type, plainly: no transaction, no conditional create."""
    params = [{"name": "patient", "type": "reference"}]
    if identifier_search:
        params.append({"name": "identifier", "type": "token"})
    return ServerCapabilities.from_statement(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "rest": [
                {
                    "mode": "server",
                    "resource": [
                        {
                            "type": t,
                            "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
                            "searchParam": params
                            + ([{"name": "target", "type": "reference"}] if t == "Provenance" else []),
                        }
                        for t in TYPES
                    ],
                }
            ],
        }
    )


class FakeServer:
    """A FHIR server of plain creates, reads and searches, in memory; it never de-duplicates anything."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.store: dict[str, dict[str, dict]] = {t: {} for t in ALL_TYPES}
        self.seen: list[tuple[str, str]] = []
        self.mock = mock
        for rtype in ALL_TYPES:
            mock.add_callback(responses.POST, f"{BASE}/{rtype}", callback=self._create)
            mock.add_callback(responses.GET, f"{BASE}/{rtype}", callback=self._search)
            mock.add_callback(responses.GET, re.compile(rf"{BASE}/{rtype}/[^/?]+$"), callback=self._read)

    def _create(self, request):
        self.seen.append(("POST", urlparse(request.url).path))
        if request.headers.get("If-None-Exist"):
            return (
                400,
                {},
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": "error",
                                "code": "not-supported",
                                "diagnostics": "If-None-Exist is not supported",
                            }
                        ],
                    }
                ),
            )
        resource = json.loads(request.body)
        rtype = resource["resourceType"]
        resource["id"] = f"new-{rtype[:3].lower()}{sum(len(v) for v in self.store.values()) + 1}"
        self.store[rtype][resource["id"]] = resource
        return 201, {"Location": f"{BASE}/{rtype}/{resource['id']}/_history/1"}, json.dumps(resource)

    def _read(self, request):
        self.seen.append(("GET", urlparse(request.url).path))
        _, rtype, rid = urlparse(request.url).path.rsplit("/", 2)
        found = self.store[rtype].get(rid)
        if found is None:
            return (
                404,
                {},
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "gone"}],
                    }
                ),
            )
        return 200, {}, json.dumps(found)

    def _search(self, request):
        url = urlparse(request.url)
        self.seen.append(("GET", f"{url.path}?{url.query}"))
        rtype = url.path.rsplit("/", 1)[-1]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        matches = list(self.store[rtype].values())
        if "patient" in query:
            matches = [r for r in matches if r.get("subject", {}).get("reference") == f"Patient/{query['patient']}"]
        if "identifier" in query:
            system, value = query["identifier"].split("|", 1)
            matches = [r for r in matches if {"system": system, "value": value} in r.get("identifier", [])]
        if "target" in query:
            matches = [r for r in matches if {"reference": query["target"]} in r.get("target", [])]
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in matches],
        }
        return 200, {}, json.dumps(bundle)

    def load(self, resources: list[dict]) -> None:
        for resource in resources:
            self.store[resource["resourceType"]][resource["id"]] = json.loads(json.dumps(resource))

    def count(self) -> dict[str, int]:
        return {t: sum(1 for r in self.store[t].values() if r["id"].startswith("new-")) for t in TYPES}

    def creates(self) -> int:
        return sum(1 for method, _ in self.seen if method == "POST")


@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeServer(mock)


@pytest.fixture(autouse=True)
def _forget_capabilities():
    from fhir_plugin import _capabilities

    yield
    _capabilities._cache.clear()


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as opened:
        yield opened


def _writer(ledger, *, identifier_search=True, after_create=None) -> tuple[FhirClient, LedgerWriter]:
    client = FhirClient(BASE, retries=0)
    return client, LedgerWriter(
        client, ledger, capabilities=_statement(identifier_search=identifier_search), after_create=after_create
    )


@pytest.mark.parametrize("identifier_search", [True, False])
def test_writes_one_set_of_drafts_and_a_second_run_creates_nothing(server, ledger, identifier_search):
    drafts = _drafts()
    _, writer = _writer(ledger, identifier_search=identifier_search)

    first = writer.write(drafts)
    after_first = server.count()
    second = writer.write(drafts)

    assert after_first == {"Condition": 1, "Goal": 4, "CarePlan": 1, "Provenance": 1}
    assert len(first.created) == 7 and first.existing == ()
    assert server.count() == after_first
    assert second.created == () and sorted(second.existing) == sorted(first.created)
    # no conditional create was ever sent: every POST went without If-None-Exist (the mock refuses it)
    assert server.creates() == 7
    # references were filled in from the ids just created
    [plan] = server.store["CarePlan"].values()
    [cond_id] = server.store["Condition"]
    assert plan["addresses"] == [{"reference": f"Condition/{cond_id}"}]
    [prov] = server.store["Provenance"].values()
    assert {"reference": f"Condition/{cond_id}"} in prov["target"]


def test_without_the_ledger_file_a_rerun_still_finds_the_drafts_by_searching(server, tmp_path):
    drafts = _drafts()
    with Ledger(tmp_path / "one.sqlite") as first_ledger:
        first = _writer(first_ledger)[1].write(drafts)
    with Ledger(tmp_path / "another-machine.sqlite") as empty:
        second = _writer(empty, identifier_search=False)[1].write(drafts)

    assert server.count() == {"Condition": 1, "Goal": 4, "CarePlan": 1, "Provenance": 1}
    assert second.created == () and sorted(second.existing) == sorted(first.created)


def test_searches_by_identifier_only_where_the_server_declares_it(server, ledger):
    drafts = _drafts()
    _writer(ledger, identifier_search=False)[1].write(drafts)
    searches = [path for method, path in server.seen if method == "GET" and "?" in path]

    assert searches and all("identifier=" not in s for s in searches)
    assert all("patient=" in s for s in searches if "/Provenance?" not in s)


@pytest.mark.parametrize("crash_after", [1, 3, 7])
def test_a_crash_between_a_create_and_the_ledger_update_neither_loses_nor_doubles(server, ledger, crash_after):
    drafts = _drafts()
    made: list[str] = []

    def crash(ref: str) -> None:
        made.append(ref)
        if len(made) == crash_after:
            raise Crash(ref)

    _, crashing = _writer(ledger, after_create=crash)
    with pytest.raises(Crash):
        crashing.write(drafts)
    assert server.count()[made[-1].split("/")[0]] >= 1  # the create reached the server, the ledger missed it

    rerun = _writer(ledger)[1].write(drafts)

    assert server.count() == {"Condition": 1, "Goal": 4, "CarePlan": 1, "Provenance": 1}
    assert len(rerun.created) == 7 - crash_after
    assert set(made) <= set(rerun.existing)


def test_a_ledger_row_whose_resource_was_deleted_is_created_again(server, ledger):
    drafts = _drafts()
    _, writer = _writer(ledger)
    first = writer.write(drafts)
    goal = next(ref for ref in first.created if ref.startswith("Goal/"))
    del server.store["Goal"][goal.split("/")[1]]

    second = writer.write(drafts)

    assert server.count()["Goal"] == 4
    assert len(second.created) == 1 and second.created[0].startswith("Goal/")


def test_a_ledger_entry_pointing_at_another_patients_resource_is_refused(server, ledger):
    drafts = _drafts()
    _, writer = _writer(ledger)
    first = writer.write(drafts)
    cond = next(ref for ref in first.created if ref.startswith("Condition/"))
    server.store["Condition"][cond.split("/")[1]]["subject"] = {"reference": "Patient/someone-else"}

    with pytest.raises(Forbidden, match="another resource"):
        writer.write(drafts)


def test_auto_picks_the_ledger_writer_when_the_server_declares_no_conditional_create(tmp_path):
    client = FhirClient(BASE)
    plain = _statement(identifier_search=True)
    conditional = ServerCapabilities.from_statement(
        {
            "resourceType": "CapabilityStatement",
            "rest": [
                {
                    "mode": "server",
                    "resource": [
                        {"type": t, "interaction": [{"code": "create"}], "conditionalCreate": True} for t in TYPES
                    ],
                }
            ],
        }
    )

    assert type(strategies_for(client, plain, ledger=tmp_path / "l.sqlite").writer) is LedgerWriter
    assert type(strategies_for(client, conditional).writer) is PerResourceWriter
    # the override wins over what the statement says, both ways
    assert type(strategies_for(client, plain, strategy="transaction").writer) is TransactionWriter
    assert type(strategies_for(client, None, strategy="ledger", ledger=tmp_path / "l.sqlite").writer) is LedgerWriter


@pytest.mark.detects_capabilities
def test_propose_write_detects_the_server_and_writes_through_the_ledger_twice_without_doubling(
    server, tmp_path, capsys
):
    from fhir_plugin._cli import main

    cases = [c for c in CASES if c.key in ("missing-onset", "complete")]
    for case in cases:
        server.load(needing_drafts(case.resources))  # SPEC §7.1: records that still need every draft
    statement = _statement(identifier_search=True)
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": t,
                        "interaction": [{"code": c} for c in sorted(statement.of(t).interactions)],
                        "searchParam": [{"name": n} for n in sorted(statement.of(t).search_params)],
                    }
                    for t in TYPES
                ]
                + [
                    {
                        "type": t,
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [{"name": "patient"}],
                    }
                    for t in ("Patient", "Observation", "Encounter")
                ],
            }
        ],
    }
    metadata = server.mock.get(f"{BASE}/metadata", json=body)
    args = [
        "propose",
        "--server",
        BASE,
        "--write",
        "--format",
        "json",
        "--today",
        TODAY.isoformat(),
        "--ledger",
        str(tmp_path / "ledger.sqlite"),
    ]
    for case in cases:
        args += ["--patient", case.patient_id]

    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)

    assert server.count() == {"Condition": 2, "Goal": 8, "CarePlan": 2, "Provenance": 2}
    assert [len(o["written"]["created"]) for o in first] == [7, 7]
    # SPEC §7.1: after a write the drafts are in the record, so the second run offers nothing to write
    assert [(o.get("written") or {}).get("created", []) for o in second] == [[], []]
    assert metadata.call_count == 1  # once per server and process: not per patient, not per run
    assert not any(path.endswith("/fhir") for method, path in server.seen if method == "POST")  # no Bundle


def _epic_like_statement() -> ServerCapabilities:
    """Epic's facts (issue 12): no conditional create; Condition only as a problem-list item; a note, no plan."""
    read_only = [{"code": "read"}, {"code": "search-type"}]
    return ServerCapabilities.from_statement(
        {
            "resourceType": "CapabilityStatement",
            "rest": [
                {
                    "mode": "server",
                    "resource": [
                        {
                            "type": "Condition",
                            "interaction": [{"code": "create"}, *read_only],
                            "supportedProfile": [
                                "http://hl7.org/fhir/us/core/StructureDefinition/"
                                "us-core-condition-problems-health-concerns"
                            ],
                            "searchParam": [{"name": "patient"}],
                        },
                        {
                            "type": "DocumentReference",
                            "interaction": [{"code": "create"}, *read_only],
                            "searchParam": [{"name": "patient"}],
                        },
                        *(
                            {"type": t, "interaction": read_only, "searchParam": [{"name": "patient"}]}
                            for t in ("CarePlan", "Goal", "Provenance")
                        ),
                    ],
                }
            ],
        }
    )


def test_a_server_without_plan_creates_gets_the_plan_as_a_preliminary_note_and_the_result_says_so(server, tmp_path):
    import base64

    from fhir_plugin import FoldingWriter

    drafts = _drafts()
    chosen = strategies_for(FhirClient(BASE, retries=0), _epic_like_statement(), ledger=tmp_path / "l.sqlite")
    assert type(chosen.writer) is FoldingWriter and type(chosen.writer.inner) is LedgerWriter

    first = chosen.writer.write(drafts)
    second = chosen.writer.write(drafts)

    assert server.count() == {"Condition": 1, "Goal": 0, "CarePlan": 0, "Provenance": 0}
    [condition] = server.store["Condition"].values()
    assert condition["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    [note] = server.store["DocumentReference"].values()
    assert note["docStatus"] == "preliminary" and note["context"]["encounter"] == [
        {"reference": drafts["entry"][0]["resource"]["encounter"]["reference"]}
    ]
    html, attached = (base64.b64decode(c["attachment"]["data"]).decode() for c in note["content"])
    assert "Phase 1: Acute management" in html and "Eccentric heel drops" in html
    plan = json.loads(attached)["entry"][0]["resource"]
    assert plan["resourceType"] == "CarePlan" and len(json.loads(attached)["entry"]) == 5  # plan + 4 goals
    # the result names every draft's form and what could not be written
    forms = {d["draft"]: d["form"] for d in first.to_json()["forms"]}
    assert forms["CarePlan"].startswith("DocumentReference (preliminary") and "problem-list-item" in forms["Condition"]
    assert [d["draft"] for d in first.to_json()["not_written"]] == ["Provenance"]
    assert "not written: Provenance" in first.summary()
    assert len(first.created) == 2 and second.created == () and len(second.existing) == 2
