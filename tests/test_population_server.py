"""A real Bulk Data ``$export`` from the sandbox HAPI feeds the population job; kills during download and
write-back resume without a second export and without a duplicate draft (counted on HAPI)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid

import pytest
import requests

from fhir_plugin._bulk import BulkExporter, ExportRequest
from fhir_plugin._cli import main
from fhir_plugin._errors import TransportError
from fhir_plugin._vocab import DRAFT_TAG
from fhir_plugin._write import TransactionWriter
from fhir_plugin.synthetic import generate_cases, load_into_server, renamed_case
from sandbox.testing import needing_drafts

pytestmark = [pytest.mark.server, pytest.mark.spark]

TODAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def group(sandbox_hapi_url):
    """The synthetic cases under fresh ids, loaded into HAPI, as the members of a new Group.

    Each record still needs its drafts (SPEC §7.1: no clinician plan, the chart coded M62.56), so the
    write-back has patients to write.
    """
    tag = "bk" + uuid.uuid4().hex[:6]
    cases = [
        dataclasses.replace(c, resources=needing_drafts(c.resources))
        for c in (renamed_case(c, tag) for c in generate_cases(TODAY) if not c.encounter_id)
    ]
    load_into_server(sandbox_hapi_url, cases)
    group_id = f"fp-{tag}-group"
    body = {
        "resourceType": "Group",
        "id": group_id,
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{c.patient_id}"}} for c in cases],
    }
    r = requests.put(
        f"{sandbox_hapi_url}/Group/{group_id}", json=body, timeout=60, headers={"Content-Type": "application/fhir+json"}
    )
    assert r.status_code in (200, 201), r.text[:500]
    return group_id, cases


def _population(base, group_id, out, *extra):
    return main(
        [
            "population",
            "--server",
            base,
            "--group",
            group_id,
            "--out",
            str(out),
            "--today",
            TODAY.isoformat(),
            "--max-poll-wait",
            "1",
            *extra,
        ]
    )


def test_a_real_export_feeds_the_job_and_every_row_equals_the_cli_report(
    sandbox_hapi_url, group, spark, tmp_path, capsys
):
    group_id, cases = group
    assert _population(sandbox_hapi_url, group_id, tmp_path) == 1  # gaps found: exit 1
    capsys.readouterr()
    rows = {r["patient"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(c.patient_id for c in cases)
    state = json.loads((tmp_path / "export" / "export.json").read_text())
    assert state["deleted"] is True and len(state["done"]) == len(state["manifest"]["output"]) >= 5

    args = ["check", "--server", sandbox_hapi_url, "--format", "json", "--today", TODAY.isoformat()]
    for case in cases:
        args += ["--patient", case.patient_id]
    main(args)
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == len(cases)
    for report in reports:
        row = rows[report["patient"].removeprefix("Patient/")]  # the report names a reference, the row an id
        assert row["encounter"] == report["encounter"]
        assert row["statuses"] == {e["id"]: e["status"] for e in report["elements"]}
        assert row["flag_statuses"] == {f["id"]: f["status"] for f in report["red_flags"]}
        assert row["code_fit"] == report["code_fit"]["status"]
        assert row["suggested"] == sorted(s["code"] for s in report["code_fit"]["suggested"])
        assert row["complete"] is report["complete"]
        assert row["referral"] is report["referral_recommended"]
    page = (tmp_path / "report.html").read_text()
    assert f"{len(cases)} patients from a Bulk Data export" in page


class _CutAfter(requests.adapters.HTTPAdapter):
    """Drops the connection on the second NDJSON download: the job dies mid-download."""

    def __init__(self):
        super().__init__()
        self.downloads = 0

    def send(self, request, **kwargs):
        if "/Binary/" in request.url:
            self.downloads += 1
            if self.downloads == 2:
                raise requests.ConnectionError("connection dropped")
        return super().send(request, **kwargs)


def _drafted_conditions(base, patients):
    found = {}
    url = f"{base}/Condition"
    params = {"_tag": f"{DRAFT_TAG['system']}|{DRAFT_TAG['code']}", "_count": "500", "_elements": "subject"}
    while url:
        bundle = requests.get(url, params=params, timeout=60).json()
        for e in bundle.get("entry", []):
            pid = e["resource"]["subject"]["reference"].split("/")[-1]
            if pid in patients:
                found[pid] = found.get(pid, 0) + 1
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        params = None
    return found


def test_kills_during_download_and_write_back_resume_without_exporting_again_or_duplicating(
    sandbox_hapi_url, group, spark, tmp_path, monkeypatch, capsys
):
    group_id, cases = group
    session = requests.Session()
    cut = _CutAfter()
    session.mount("http://", cut)
    with pytest.raises(TransportError):
        BulkExporter(sandbox_hapi_url, tmp_path / "export", session=session, max_wait=1).run(
            ExportRequest(group=group_id)
        )
    assert cut.downloads == 2

    # the job started again (with --write) must not kick off a second export ...
    def no_second_kickoff(self, request):
        raise AssertionError("a second $export was kicked off")

    monkeypatch.setattr(BulkExporter, "kickoff", no_second_kickoff)
    # ... and is killed after three patients' drafts are written
    real_write = TransactionWriter.write
    written = []

    def write_then_die(self, drafts):
        if len(written) == 3:
            raise KeyboardInterrupt
        result = real_write(self, drafts)
        written.append(result)
        return result

    monkeypatch.setattr(TransactionWriter, "write", write_then_die)
    assert _population(sandbox_hapi_url, group_id, tmp_path, "--write") == 130
    assert len(written) == 3
    monkeypatch.setattr(TransactionWriter, "write", real_write)
    assert _population(sandbox_hapi_url, group_id, tmp_path, "--write", "--max-writes-per-minute", "6000") == 1
    out = capsys.readouterr().out
    assert "3 written by an earlier run" in out

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    allowed = {r["patient"] for r in rows if r["drafts_allowed"]}
    drafted = _drafted_conditions(sandbox_hapi_url, {c.patient_id for c in cases})
    assert drafted == {pid: 1 for pid in allowed}  # one draft Condition each, none for refused patients
