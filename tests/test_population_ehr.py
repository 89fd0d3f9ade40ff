"""``fhir-plugin population`` through a vendor-shaped EHR: Bulk Data export with SMART Backend Services.

The real HAPI exports; the sandbox EHR in front of it is epic-like (Group export only, v1 scopes) and
serves the status and the files only to the app that started the export, with its token.  The command
authenticates as the sync job does (a signed client assertion) and its rows equal the command line's
reports read from HAPI directly.  Another app cannot follow the export, and a level the EHR does not
offer is refused with the EHR's words.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from pathlib import Path

import pytest
import requests
from joserfc.jwk import RSAKey

from fhir_plugin._backend_auth import fetch_token, load_signing_key
from fhir_plugin._cli import main
from fhir_plugin.synthetic import generate_cases, load_into_server, renamed_case
from sandbox.testing import forget_folded_drafts, needing_drafts, put_group

pytestmark = [pytest.mark.server, pytest.mark.spark]

TODAY = dt.date(2026, 11, 1)
KEYS = ("complete", "missing-onset", "missing-severity", "excludes1", "flag-fever", "insufficient")


def _key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(RSAKey.generate_key(2048, private=True).as_pem(private=True))
    path.chmod(0o600)
    return path


def _register(ehr, client_id: str, key: Path, scope: list[str]) -> None:
    from sandbox.ehr import Client

    jwk = load_signing_key(key).public_jwk()
    ehr.clients.register(
        Client(client_id, scope=scope, token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]})
    )


def _token(ehr, client_id: str, key: Path) -> str:
    """An access token for a backend client, as the plugin gets one (``_backend_auth``)."""
    with requests.Session() as session:
        return fetch_token(
            session, ehr.config.token_url, load_signing_key(key), client_id, "system/*.read"
        ).access_token


def _population(ehr, key: Path, out: Path, *args: str) -> int:
    """``fhir-plugin population`` from the EHR as the backend client ``population-app``."""
    common = ["--client-id", "population-app", "--key", str(key), "--today", TODAY.isoformat(), "--max-poll-wait", "1"]
    return main(["population", "--server", ehr.fhir_base_url, "--out", str(out), *common, *args])


@pytest.fixture(scope="module")
def group(sandbox_hapi_url):
    tag = "ehrbk" + uuid.uuid4().hex[:6]
    cases = [renamed_case(c, tag) for c in generate_cases(TODAY) if c.key in KEYS and not c.encounter_id]
    load_into_server(sandbox_hapi_url, cases)
    group_id = f"fp-{tag}-group"
    put_group(sandbox_hapi_url, group_id, [c.patient_id for c in cases])
    return group_id, cases


def test_an_export_through_an_epic_like_ehr_gives_the_cli_reports_and_only_its_app_may_follow_it(
    sandbox_hapi_url, group, spark, tmp_path, capsys
):
    from sandbox.ehr import running_ehr

    group_id, cases = group
    key, other_key = _key(tmp_path, "app"), _key(tmp_path, "other")
    out = tmp_path / "out"
    with running_ehr(sandbox_hapi_url, personality="epic-like") as ehr:
        _register(ehr, "population-app", key, ["system/*.read"])
        _register(ehr, "other-app", other_key, ["system/*.read"])
        code = _population(ehr, key, out, "--group", group_id)
        printed = capsys.readouterr()
        answered = list(ehr.proxy.answered)
        state = json.loads((out / "export" / "export.json").read_text())
        # another app, with its own valid token, can neither poll the export nor fetch its files
        other = {"Authorization": f"Bearer {_token(ehr, 'other-app', other_key)}", "Accept": "application/json"}
        status = requests.get(state["status_url"], headers=other, timeout=30)
        files = [requests.get(f["url"], headers=other, timeout=30) for f in state["manifest"]["output"]]
        # and the EHR offers no system-level export: the command says so in the EHR's words
        refused = _population(ehr, key, tmp_path / "system", "--level", "system")
        refusal = capsys.readouterr()

    assert code == 1  # gaps found
    assert printed.err.count("downloaded") == len(state["manifest"]["output"]) >= 5
    # the export went through the EHR: the kick-off, the polls and every file, each answered with the token
    kickoffs = [a for a in answered if a[1] == f"/Group/{group_id}/$export"]
    assert kickoffs == [("GET", f"/Group/{group_id}/$export", 202)]
    assert [s for m, p, s in answered if p.startswith("/Binary/")] == [200] * len(state["manifest"]["output"])
    assert state["status_url"].startswith(ehr.fhir_base_url + "/$export-poll-status")
    assert all(f["url"].startswith(ehr.fhir_base_url + "/Binary/") for f in state["manifest"]["output"])
    assert state["manifest"]["requires_token"] is True and state["deleted"] is True
    assert status.status_code == 404 and [f.status_code for f in files] == [404] * len(files)
    assert refused == 6 and "this EHR exports at Group/[id]/$export only" in refusal.err

    rows = {r["patient"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(c.patient_id for c in cases)
    args = ["check", "--server", sandbox_hapi_url, "--format", "json", "--today", TODAY.isoformat()]
    for case in cases:
        args += ["--patient", case.patient_id]
    main(args)
    reports = json.loads(capsys.readouterr().out)
    print(printed.out, printed.err, refusal.err)
    assert len(reports) == len(cases)
    for report in reports:
        row = rows[report["patient"].removeprefix("Patient/")]
        assert row["statuses"] == {e["id"]: e["status"] for e in report["elements"]}
        assert row["code_fit"] == report["code_fit"]["status"]
        assert row["complete"] is report["complete"]
        assert row["referral"] is report["referral_recommended"]


def test_after_a_write_back_into_notes_plan_notes_reads_the_written_plans(sandbox_hapi_url, spark, tmp_path, capsys):
    """On epic-like the plan is written as a note (no CarePlan create).  The next run reads it as the drafted
    plan with ``--plan-notes`` (the export then holds the plugin's plan notes): no treatment-plan gap, no
    drafts offered again; without it the plan reads as missing, and the write-back said to add it."""
    from sandbox.ehr import running_ehr

    tag = "ehrpn" + uuid.uuid4().hex[:6]
    cases = [
        dataclasses.replace(c, resources=needing_drafts(c.resources))
        for c in (renamed_case(c, tag) for c in generate_cases(TODAY) if c.key in ("missing-onset", "missing-severity"))
    ]
    load_into_server(sandbox_hapi_url, cases)
    group_id = f"fp-{tag}-group"
    put_group(sandbox_hapi_url, group_id, [c.patient_id for c in cases])
    key = _key(tmp_path, "app")
    runs = {}
    with running_ehr(sandbox_hapi_url, personality="epic-like") as ehr:
        _register(ehr, "population-app", key, ["system/*.read", "system/*.write"])
        for run, extra in (("write", ["--write"]), ("plain", []), ("notes", ["--plan-notes"])):
            code = _population(ehr, key, tmp_path / run, "--group", group_id, *extra)
            rows = [json.loads(x) for x in (tmp_path / run / "results.jsonl").read_text().splitlines()]
            runs[run] = (code, capsys.readouterr().out, {r["patient"]: r for r in rows})
    for pid in (c.patient_id for c in cases):
        forget_folded_drafts(sandbox_hapi_url, pid)
    print({k: (v[0], v[1][-600:]) for k, v in runs.items()})

    _, said, before = runs["write"]
    assert "Write-back: 2 patients written (4 resources created, 0 already there)" in said
    assert "give the next run --plan-notes" in said
    for pid in (c.patient_id for c in cases):
        assert "treatment-plan" in before[pid]["gaps"] and before[pid]["drafts_allowed"] is True
        assert "treatment-plan" in runs["plain"][2][pid]["gaps"]  # the notes were not exported
        after = runs["notes"][2][pid]
        assert after["statuses"]["treatment-plan"] == "proposed" and "treatment-plan" not in after["gaps"]
        assert after["drafts_allowed"] is False
        # the rest of the row is the one before the write
        assert {k: v for k, v in after["statuses"].items() if k != "treatment-plan"} == {
            k: v for k, v in before[pid]["statuses"].items() if k != "treatment-plan"
        }
