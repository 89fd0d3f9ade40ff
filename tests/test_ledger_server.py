"""The ledger writer on the real HAPI (issue 12, writer c): twice is once, and a SIGKILL mid-write is no double.

HAPI would de-duplicate conditional creates itself; the ledger writer never
sends one (plain creates after a search), so these tests show the ledger and
the search alone keep each patient at exactly one set of drafts.  The crash is
a real SIGKILL of a writer process right after a create reached HAPI and
before the ledger recorded it.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
from fresh import fresh_cases
from test_check_cases import CASES, TODAY
from test_write_server import _counts

from fhir_plugin import FhirClient
from fhir_plugin._cli import main
from fhir_plugin.synthetic import load_into_server
from sandbox.testing import needing_drafts

pytestmark = pytest.mark.server

ONE_SET = {"Condition": 1, "CarePlan": 1, "Goal": 4, "Provenance": 1}

_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from datetime import date, datetime, timezone
    from fhir_plugin import BatchReader, FhirClient, Ledger, LedgerWriter, load_profile, review

    base, patient, ledger, kill_at, today = sys.argv[1:]
    client = FhirClient(base)
    result = review(BatchReader(client).read(patient), load_profile("M62.561"), today=date.fromisoformat(today),
                    now=datetime.now(timezone.utc))
    made = []

    def crash(ref):
        made.append(ref)
        if len(made) == int(kill_at):
            print(ref, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # after the create reached HAPI, before the ledger update

    LedgerWriter(client, Ledger(ledger), after_create=crash).write(result.drafts)
""")


@pytest.fixture
def fresh_patient(fhir_base_url):
    chart = next(c for c in CASES if c.key == "missing-onset")
    # a record that still needs every draft (SPEC §7.1: no clinician plan, the chart coded M62.56)
    [case] = fresh_cases([dataclasses.replace(chart, resources=needing_drafts(chart.resources))])
    load_into_server(fhir_base_url, [case])
    return case.patient_id


def _propose(base, patient, ledger, capsys):
    code = main(
        [
            "propose",
            "--server",
            base,
            "--patient",
            patient,
            "--write",
            "--format",
            "json",
            "--today",
            TODAY.isoformat(),
            "--strategy",
            "ledger",
            "--ledger",
            str(ledger),
        ]
    )
    return code, json.loads(capsys.readouterr().out).get("written")


def _added(client, patient, before):
    return {t: n - before[t] for t, n in _counts(client, patient).items()}


def test_propose_write_with_the_ledger_twice_writes_one_set(fhir_base_url, fresh_patient, tmp_path, capsys):
    with FhirClient(fhir_base_url) as client:
        before = _counts(client, fresh_patient)
        code, first = _propose(fhir_base_url, fresh_patient, tmp_path / "ledger.sqlite", capsys)
        assert code == 0
        code, second = _propose(fhir_base_url, fresh_patient, tmp_path / "ledger.sqlite", capsys)
        assert code == 0
        assert _added(client, fresh_patient, before) == ONE_SET
    assert len(first["created"]) == 7 and first["existing"] == []
    # SPEC §7.1: once written, the drafts are in the record and nothing is offered, so nothing is sent
    assert second is None or (second["created"] == [] and sorted(second["existing"]) == sorted(first["created"]))


@pytest.mark.parametrize("kill_at", [2, 7])
def test_a_sigkill_between_a_create_and_the_ledger_update_then_a_rerun_leaves_one_set(
    fhir_base_url, fresh_patient, tmp_path, capsys, kill_at
):
    ledger = tmp_path / "ledger.sqlite"
    with FhirClient(fhir_base_url) as client:
        before = _counts(client, fresh_patient)
        killed = subprocess.run(
            [
                sys.executable,
                "-c",
                _KILLED_WRITER,
                fhir_base_url,
                fresh_patient,
                str(ledger),
                str(kill_at),
                TODAY.isoformat(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert killed.returncode == -9, killed.stderr  # really killed, mid-write
        last_created = killed.stdout.strip()
        partial = _added(client, fresh_patient, before)
        assert sum(partial.values()) == kill_at  # what reached HAPI before the kill

        code, rerun = _propose(fhir_base_url, fresh_patient, ledger, capsys)

        assert code == 0
        assert _added(client, fresh_patient, before) == ONE_SET  # nothing doubled, nothing missing
    if rerun is None:
        # SPEC §7.1: every draft reached the server before the kill, so the record holds the whole set and
        # the rerun offers nothing to write
        assert kill_at == 7
    else:
        assert len(rerun["created"]) == 7 - kill_at
        assert last_created in rerun["existing"]  # found by its search, not made again
