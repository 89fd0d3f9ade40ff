"""``fhir-plugin population --write`` on a partial grant (issue 12 follow-up, item 2), on the real HAPI
behind the oracle-like sandbox EHR.

The backend client is granted create on Condition and DocumentReference only
(not CarePlan, Goal, Provenance).  The write-back must still write, through the
writer the sync job gets for that grant: the Condition, and the plan as the
note; the Provenance named as not written, for the grant's sake.  A second
write-back (a fresh write log, so nothing is skipped on the log's word) creates
nothing.  The Spark step is not run here: the rows are what it gives for these
records (``review``), and the command's own write step sends them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import uuid

import pytest
from joserfc.jwk import RSAKey

from fhir_plugin import FhirClient, load_profile, review
from fhir_plugin._backend_auth import load_signing_key
from fhir_plugin._cli import population
from fhir_plugin._vocab import DRAFT_TAG
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import forget_folded_drafts, load_fresh_case, needing_drafts

pytestmark = pytest.mark.server

TAG = f"{DRAFT_TAG['system']}|{DRAFT_TAG['code']}"
GRANT = ["system/*.rs", "system/Condition.cs", "system/DocumentReference.cs"]


def _on_hapi(base: str, patient: str) -> dict[str, int]:
    """The plugin's drafts HAPI holds for ``patient``, by type (Provenances found by what they are about)."""
    found: list[dict] = []
    with FhirClient(base) as hapi:
        for rtype in ("Condition", "Goal", "CarePlan", "DocumentReference"):
            found += hapi.search(rtype, {"patient": patient, "_tag": TAG})
        found += [
            p
            for r in list(found)
            for p in hapi.search("Provenance", {"target": f"{r['resourceType']}/{r['id']}"})
            if r["resourceType"] in ("Condition", "DocumentReference")
        ]
    counted = collections.Counter(r["resourceType"] for r in {(r["resourceType"], r["id"]): r for r in found}.values())
    return {t: counted[t] for t in ("Condition", "Goal", "CarePlan", "DocumentReference", "Provenance")}


def test_population_write_on_a_partial_grant_writes_the_granted_forms_and_a_rerun_writes_nothing(
    fhir_base_url, tmp_path, capsys
):
    from sandbox.ehr import Client, running_ehr

    today = dt.date.today()
    charts = [
        dataclasses.replace(c, resources=needing_drafts(c.resources))
        for c in generate_cases(today)
        if c.key in ("missing-onset", "missing-severity")
    ]
    pids = [load_fresh_case(fhir_base_url, chart).patient_id for chart in charts]
    profile = load_profile("M62.561")
    now = dt.datetime.now(dt.UTC)
    with FhirClient(fhir_base_url) as hapi:
        reviews = [review(hapi.read_patient_record(pid), profile, today=today, now=now) for pid in pids]
    # the rows the Spark job writes for these patients (``_population._rows``: patient, allowed, drafts)
    rows = [
        {"patient": f"Patient/{pid}", "drafts_allowed": r.drafts is not None, "drafts": json.dumps(r.drafts)}
        for pid, r in zip(pids, reviews, strict=True)
    ]
    assert all(row["drafts_allowed"] for row in rows)

    key_path = tmp_path / "backend.pem"
    key_path.write_bytes(RSAKey.generate_key(2048, private=True).as_pem(private=True))
    key_path.chmod(0o600)
    client_id = f"population-{uuid.uuid4().hex[:8]}"
    with running_ehr(fhir_base_url, personality="oracle-like") as ehr:
        jwk = load_signing_key(key_path).public_jwk()
        ehr.clients.register(
            Client(client_id, scope=GRANT, token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]})
        )
        args = argparse.Namespace(
            server=str(ehr.fhir_base_url),
            group="g",
            write=True,
            client_id=client_id,
            key=str(key_path),
            kid=None,
            scope=None,
            token_url=None,
            token=None,
            token_file=None,
            timeout=30.0,
            max_writes_per_minute=None,
        )
        results = []
        for run in ("first", "again"):
            session, token, creatable = population._session(args)
            out = tmp_path / run  # a fresh write log each time: the rerun is judged by the server alone
            out.mkdir()
            population._write(
                args, out / "unused.parquet", session, token, out, lambda _p, _c: rows, creatable=creatable
            )
            results.append(capsys.readouterr())
        seen = list(ehr.proxy.seen)
    written = {pid: _on_hapi(fhir_base_url, pid) for pid in pids}
    for pid in pids:
        forget_folded_drafts(fhir_base_url, pid)
    first, again = results
    print(f"\nfirst: {first.out}{first.err}\nagain: {again.out}{again.err}\nproxy saw {seen}")

    assert args.write and creatable == frozenset({"Condition", "DocumentReference"})
    assert "no create scope for" in first.err and "Provenance" in first.err
    # drafts written in the granted forms: the Condition, and the plan as the note; nothing else
    for pid in pids:
        assert written[pid] == {"Condition": 1, "Goal": 0, "CarePlan": 0, "DocumentReference": 1, "Provenance": 0}
    assert "Write-back: 2 patients written (4 resources created, 0 already there)" in first.out
    assert "Written as: CarePlan as DocumentReference (preliminary plan note" in first.out
    # the result names what could not be written, and why: the grant, not the server
    assert "Not written: Provenance (the granted scopes allow no Provenance create" in first.out
    assert "Not written: Goal" not in first.out and "Not written: CarePlan" not in first.out
    # no Bundle reached the proxy (oracle-like refuses them), and the rerun created nothing
    assert ("POST", "/") not in seen
    assert "Write-back: 2 patients written (0 resources created, 4 already there)" in again.out
