"""The command line on each sandbox EHR personality (issue 12), on the real HAPI behind the proxy.

``fhir-plugin propose --write`` twice, and ``fhir-plugin sync --write``
SIGKILLed mid-run then run again, each as a real subprocess talking to the
sandbox EHR's proxy with a SMART Backend Services token (the proxy refuses a
request without one).  What was written is counted on HAPI directly, by each
draft's identifier.  One sandbox EHR per personality serves every test of this
module.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import RSAKey

from fhir_plugin import FhirClient, check, load_profile
from fhir_plugin._backend_auth import fetch_token, load_signing_key
from fhir_plugin._vocab import DRAFT_TAG
from fhir_plugin._write import draft_key
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import forget_folded_drafts, load_fresh_case, needing_drafts, put_group

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
TAG = f"{DRAFT_TAG['system']}|{DRAFT_TAG['code']}"
PERSONALITIES = ("hapi", "epic-like", "oracle-like")
#: one patient's set of drafts as HAPI holds it after a complete write (README, "On the EHRs clinicians use")
ONE_SET = {
    "hapi": {"Condition": 1, "Goal": 4, "CarePlan": 1, "DocumentReference": 0, "Provenance": 1},
    "epic-like": {"Condition": 1, "Goal": 0, "CarePlan": 0, "DocumentReference": 1, "Provenance": 0},
    "oracle-like": {"Condition": 1, "Goal": 0, "CarePlan": 0, "DocumentReference": 1, "Provenance": 1},
}
#: words of the form each draft type is said to go in (the result's ``forms``); None: as drafted
FORMS = {
    "hapi": {"Condition": None, "CarePlan": None, "Goal": None, "Provenance": None},
    "epic-like": {
        "Condition": "problem-list-item",
        "CarePlan": "DocumentReference (preliminary",
        "Goal": "plan note (DocumentReference)",
    },
    "oracle-like": {
        "Condition": "Condition (encounter-diagnosis",
        "CarePlan": "DocumentReference (preliminary",
        "Goal": "plan note (DocumentReference)",
        "Provenance": "Provenance",
    },
}
#: write requests (POSTs) one patient costs: one transaction, else one create per resource written
WRITES_PER_PATIENT = {"hapi": 1, "epic-like": 2, "oracle-like": 3}
#: what a backend client of these tests may be granted, in both spellings (epic-like grants v1 only)
BACKEND_SCOPES = ["system/*.cruds", "system/*.read", "system/*.write"]


@dataclasses.dataclass
class Ehr:
    """One running sandbox EHR of a personality, with a backend client registered for the command line."""

    personality: str
    running: Any
    client_id: str
    key_path: Path

    @property
    def fhir_base_url(self) -> str:
        return str(self.running.fhir_base_url)

    @property
    def proxy(self) -> Any:
        return self.running.proxy

    def token_file(self, path: Path, scope: str = "system/*.read system/*.write") -> Path:
        """A fresh access token for the backend client, in a 0600 file (never on a command line)."""
        token = fetch_token(
            requests.Session(),
            self.running.config.token_url,
            load_signing_key(self.key_path),
            self.client_id,
            scope,
        )
        path.touch(mode=0o600)
        path.write_text(token.access_token)
        return path


@pytest.fixture(scope="module", params=PERSONALITIES)
def ehr(request, fhir_base_url, tmp_path_factory):
    from sandbox.ehr import Client, running_ehr

    key_path = tmp_path_factory.mktemp("keys") / "backend.pem"
    key_path.write_bytes(RSAKey.generate_key(2048, private=True).as_pem(private=True))
    key_path.chmod(0o600)
    jwk = load_signing_key(key_path).public_jwk()
    with running_ehr(fhir_base_url, personality=request.param) as running:
        running.clients.register(
            Client(
                "cli-tests",
                scope=list(BACKEND_SCOPES),
                token_endpoint_auth_method="private_key_jwt",
                jwks={"keys": [jwk]},
            )
        )
        yield Ehr(request.param, running, "cli-tests", key_path)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fhir-plugin ARGS`` as a user runs it: a new process."""
    return subprocess.run(
        [sys.executable, "-m", "fhir_plugin._cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _chart(key: str, today: dt.date):
    """A synthetic chart as a record that still needs every draft (SPEC §7.1: no plan, coded M62.56)."""
    chart = next(c for c in generate_cases(today) if c.key == key)
    return dataclasses.replace(chart, resources=needing_drafts(chart.resources))


def _drafts_in_hapi(base: str, patient: str) -> list[dict[str, Any]]:
    """Every plugin draft HAPI holds for ``patient``: the tagged resources, and the Provenances about them."""
    found: list[dict[str, Any]] = []
    with FhirClient(base) as hapi:
        for rtype in ("Condition", "Goal", "CarePlan", "DocumentReference"):
            found += hapi.search(rtype, {"patient": patient, "_tag": TAG})
        conditions = [r for r in found if r["resourceType"] == "Condition"]
        provenances = {
            p["id"]: p for c in conditions for p in hapi.search("Provenance", {"target": f"Condition/{c['id']}"})
        }
    return found + list(provenances.values())


def _counts(drafts: list[dict[str, Any]]) -> dict[str, int]:
    counted = collections.Counter(r["resourceType"] for r in drafts)
    return {t: counted[t] for t in ("Condition", "Goal", "CarePlan", "DocumentReference", "Provenance")}


def _keys(drafts: list[dict[str, Any]]) -> collections.Counter:
    """How many resources on HAPI carry each draft identifier (each must be 1)."""
    return collections.Counter(draft_key(r) for r in drafts)


# ---------------------------------------------------------------- propose --write, twice


def test_propose_write_twice_writes_one_set_in_the_personalitys_forms(ehr, fhir_base_url, tmp_path):
    today = dt.date.today()
    case = load_fresh_case(fhir_base_url, _chart("missing-onset", today))
    pid = case.patient_id
    with FhirClient(fhir_base_url) as hapi:
        expected = check(hapi.read_patient_record(pid), load_profile("M62.561"), today=today)
    token = ehr.token_file(tmp_path / "token")
    args = ["--server", ehr.fhir_base_url, "--patient", pid, "--write", "--today", today.isoformat()]
    args += ["--token-file", str(token), "--ledger", str(tmp_path / "ledger.sqlite")]
    seen_from = len(ehr.proxy.seen)

    before = _counts(_drafts_in_hapi(fhir_base_url, pid))
    first = _cli("propose", *args, "--format", "json")
    after_first = _drafts_in_hapi(fhir_base_url, pid)
    second = _cli("propose", *args)  # the text a user reads
    after_second = _drafts_in_hapi(fhir_base_url, pid)
    seen = ehr.proxy.seen[seen_from:]
    review_after = _cli("propose", *[a for a in args if a != "--write"], "--format", "json")  # what a rerun shows
    plan_types = ("CarePlan/", "Goal/") if ehr.personality == "hapi" else ("DocumentReference/",)
    forget_folded_drafts(fhir_base_url, pid)  # the shared HAPI outlives this test (see sandbox.testing)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    out = json.loads(first.stdout)
    written = out["written"]
    print(f"\n{ehr.personality}: {second.stdout or second.stderr}proxy saw {seen}")
    # the same report as straight from HAPI, on every personality
    assert {e["id"]: e["status"] for e in out["report"]["elements"]} == {e.id: e.status for e in expected.elements}
    # the first run creates exactly one set, in this personality's forms; the second creates nothing
    assert sum(before.values()) == 0
    assert _counts(after_first) == ONE_SET[ehr.personality]
    assert len(written["created"]) == sum(ONE_SET[ehr.personality].values()) and written["existing"] == []
    assert sorted(r["id"] for r in after_second) == sorted(r["id"] for r in after_first)
    assert set(_keys(after_second).values()) == {1}
    # the printed result says what was written in which form, and what could not be
    forms = {f["draft"]: f["form"] for f in written["forms"]}
    for draft, form in FORMS[ehr.personality].items():
        if form is None:
            assert forms.get(draft, draft) == draft, forms
        else:
            assert form in forms[draft], forms
    if ehr.personality == "epic-like":
        assert [n["draft"] for n in written["not_written"]] == ["Provenance"]
        assert ("POST", "/") not in seen  # no Bundle request reached the proxy
    else:
        assert written["not_written"] == []
    # the second run: nothing new offered (SPEC §7.1) on every personality, the plan note read as the plan
    # (issue 12 follow-up: "or offered again and every draft found already there" no longer passes)
    text = second.stdout + second.stderr
    assert "nothing new to draft: the drafts are already in the record" in text, text
    again = json.loads(review_after.stdout)
    assert review_after.returncode == 0 and again["drafts"] is None and again["settled"], review_after.stderr
    assert {e["id"]: e["status"] for e in again["report"]["elements"]}["treatment-plan"] == "proposed"
    # the Condition and the plan are named (HAPI's Provenance is not read back, as before)
    assert all(ref in again["settled"] for ref in written["created"] if ref.startswith(("Condition/", *plan_types)))


# ---------------------------------------------------------------- sync --write, SIGKILL, resume


class _Hold:
    """The proxy's ``after_forward`` hook: the k-th write is done upstream, its answer held until released."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.writes = 0
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, method: str, path: str, status: int, body: Any) -> None:
        if method != "POST" or path == "/" and (body or {}).get("type") != "transaction":
            return  # a read (a batch is one too)
        self.writes += 1
        if self.writes == self.k:
            self.held.set()
            self.release.wait(120)


def _sync(ehr: Ehr, group: str, tmp_path: Path, token: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_plugin._cli",
            "sync",
            "--server",
            ehr.fhir_base_url,
            "--group",
            group,
            "--write",
            "--concurrency",
            "1",  # one patient at a time: the k-th write is always the same draft
            "--today",
            dt.date.today().isoformat(),
            "--state",
            str(tmp_path / "state.sqlite"),
            "--report",
            str(tmp_path / "report.jsonl"),
            "--token-file",
            str(token),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sync_write_killed_with_sigkill_and_resumed_leaves_one_set_per_patient(ehr, fhir_base_url, tmp_path):
    today = dt.date.today()
    keys = ["missing-onset", "missing-severity", "missing-follow-up"]
    pids = [load_fresh_case(fhir_base_url, _chart(key, today)).patient_id for key in keys]
    group = f"cli-kill-{uuid.uuid4().hex[:8]}"
    put_group(fhir_base_url, group, pids)
    per_patient = WRITES_PER_PATIENT[ehr.personality]
    # the second patient's second write where it has one (mid-set: its Condition and its note made, the
    # rest not), else its one transaction; HAPI has done it, the job never hears back
    kill_at = per_patient + min(2, per_patient)
    hold = _Hold(kill_at)
    ehr.proxy.after_forward = hold
    try:
        job = _sync(ehr, group, tmp_path, ehr.token_file(tmp_path / "token"))
        try:
            assert hold.held.wait(240), f"the job never sent write {kill_at}: {job.stderr}"
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait(60)
            hold.release.set()
    finally:
        ehr.proxy.after_forward = None
    assert job.returncode == -signal.SIGKILL
    partial = {pid: _drafts_in_hapi(fhir_base_url, pid) for pid in pids}
    one_set = sum(ONE_SET[ehr.personality].values())
    written_before = sum(len(d) for d in partial.values())
    assert written_before == (kill_at * one_set if ehr.personality == "hapi" else kill_at)

    rerun = _sync(ehr, group, tmp_path, ehr.token_file(tmp_path / "token"))
    assert rerun.wait(300) == 0, rerun.stderr.read()
    lines = [json.loads(x) for x in (tmp_path / "report.jsonl").read_text().splitlines() if x.strip()]
    reported = [x["patient"] for x in lines if "patient" in x]
    summary = next(x["summary"] for x in lines if "summary" in x)
    after = {pid: _drafts_in_hapi(fhir_base_url, pid) for pid in pids}
    for pid in pids:
        forget_folded_drafts(fhir_base_url, pid)
    print(
        f"\n{ehr.personality}: killed after write {kill_at} ({written_before} drafts on HAPI); "
        f"resumed: {summary}; per patient {[_counts(d) for d in after.values()]}"
    )

    assert sorted(reported) == sorted(f"Patient/{pid}" for pid in pids)  # each patient reported once
    assert summary["finished"] and summary["error"] == 0
    for pid in pids:
        assert _counts(after[pid]) == ONE_SET[ehr.personality], pid  # nothing missing
        assert set(_keys(after[pid]).values()) == {1}, pid  # each draft identifier exactly once
    # what the killed run made is kept, not made again
    for pid in pids:
        assert {r["id"] for r in partial[pid]} <= {r["id"] for r in after[pid]}, pid


# ---------------------------------------------------------------- sync: the scopes asked and granted

#: (personality, what the job's backend client is registered for, one patient's drafts after --write; None: the
#: run is read-only). Epic-like speaks SMART v1 only; oracle-like grants fewer scopes than asked.
GRANTS = [
    ("epic-like", ["system/*.read", "system/*.write"], ONE_SET["epic-like"]),
    ("epic-like", ["system/*.read"], None),
    ("oracle-like", ["system/*.rs"], None),
    ("oracle-like", ["system/*.rs", "system/Condition.cs", "system/DocumentReference.cs"], ONE_SET["epic-like"]),
]


@pytest.mark.parametrize(("ehr", "registered", "expected"), GRANTS, indirect=["ehr"])
def test_sync_asks_the_scopes_the_server_takes_and_writes_only_what_is_granted(
    ehr, registered, expected, fhir_base_url, tmp_path, capsys
):
    from fhir_plugin._cli import main
    from sandbox.ehr import Client

    client_id = f"sync-{uuid.uuid4().hex[:8]}"
    jwk = load_signing_key(ehr.key_path).public_jwk()
    ehr.running.clients.register(
        Client(client_id, scope=registered, token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]})
    )
    today = dt.date.today()
    pids = [load_fresh_case(fhir_base_url, _chart(k, today)).patient_id for k in ("missing-onset", "missing-severity")]
    group = f"cli-scope-{uuid.uuid4().hex[:8]}"
    put_group(fhir_base_url, group, pids)
    seen_from = len(ehr.proxy.seen)

    code = main(
        [
            "sync",
            "--server",
            ehr.fhir_base_url,
            "--group",
            group,
            "--write",
            "--concurrency",
            "1",
            "--today",
            today.isoformat(),
            "--client-id",
            client_id,
            "--key",
            str(ehr.key_path),  # no --scope: the job spells them as the server's smart-configuration says
            "--state",
            str(tmp_path / "state.sqlite"),
            "--report",
            str(tmp_path / "report.jsonl"),
        ]
    )
    err = capsys.readouterr().err
    seen = ehr.proxy.seen[seen_from:]
    lines = [json.loads(x) for x in (tmp_path / "report.jsonl").read_text().splitlines() if x.strip()]
    reported = [x for x in lines if "patient" in x]
    drafts = {pid: _drafts_in_hapi(fhir_base_url, pid) for pid in pids}
    for pid in pids:
        forget_folded_drafts(fhir_base_url, pid)
    print(f"\n{ehr.personality} registered {registered}: {err}")

    assert code == 0, err
    assert sorted(x["patient"] for x in reported) == sorted(f"Patient/{pid}" for pid in pids)
    assert {x["status"] for x in reported} <= {"gaps", "complete"}  # every patient reviewed
    if expected is None:
        assert "grants no create scope" in err and "writes nothing" in err
        assert all(x["written"] is None for x in reported)
        assert not any(method == "POST" for method, _ in seen)  # nothing sent to write
        assert all(d == [] for d in drafts.values())
    else:
        for pid in pids:
            assert _counts(drafts[pid]) == expected, pid
            assert set(_keys(drafts[pid]).values()) == {1}, pid
    if ehr.personality == "oracle-like" and expected is not None:
        # Provenance create not granted: named in the result, not written, and said once on stderr
        assert "no create scope for" in err and "Provenance" in err
        for line in reported:
            [provenance] = [n for n in line["written"].get("not_written", []) if n["draft"] == "Provenance"]
            assert provenance["reason"].startswith("the granted scopes allow no Provenance create")


# ---------------------------------------------------------------- reading: Observation per category, remembered


@pytest.mark.parametrize("ehr", ["epic-like"], indirect=True)
def test_epic_like_refuses_one_observation_search_for_three_patients(ehr, fhir_base_url, tmp_path):
    """The reader learns once per server that an Observation search needs a category (issue 12, reading)."""
    from fhir_plugin._strategies import detected_strategies

    today = dt.date.today()
    keys = ("missing-onset", "missing-severity", "missing-follow-up")
    pids = [load_fresh_case(fhir_base_url, _chart(k, today)).patient_id for k in keys]
    token = ehr.token_file(tmp_path / "token").read_text()
    answered_from = len(ehr.proxy.answered)
    with FhirClient(ehr.fhir_base_url, token=token) as client:
        records = [detected_strategies(client).reader.read(pid) for pid in pids]
    with FhirClient(fhir_base_url) as hapi:
        direct = [hapi.read_patient_record(pid) for pid in pids]
    answered = ehr.proxy.answered[answered_from:]
    refused = [(m, p, status) for m, p, status in answered if status >= 400]
    print(f"\nrefused {refused}; {len(answered)} requests for {len(pids)} patients")

    assert refused == [("GET", "/Observation", 400)]  # the first patient's plain search, and no other
    for record, same in zip(records, direct, strict=True):
        assert record.counts() == same.counts()  # every Observation read, per category


def test_a_dry_run_after_a_write_reads_the_written_plan_as_drafted(ehr, fhir_base_url, tmp_path):
    """SPEC §7.1 on every personality: after ``sync --write`` (the plan folded into a note where the EHR
    takes no CarePlan), a ``sync`` without ``--write`` reads the written plan as drafted, so it reports
    no treatment-plan gap.  The job asks for what its reader searches, the plan notes and their
    Provenance included, and no read is refused for want of a scope."""
    today = dt.date.today()
    pid = load_fresh_case(fhir_base_url, _chart("missing-onset", today)).patient_id
    lines = {}
    ehr.proxy.answered.clear()
    for run, extra in (("write", ["--write"]), ("dry", [])):
        done = _cli(
            "sync",
            "--server",
            ehr.fhir_base_url,
            "--patient",
            pid,
            "--today",
            today.isoformat(),
            "--client-id",
            ehr.client_id,
            "--key",
            str(ehr.key_path),
            "--state",
            str(tmp_path / f"{run}.sqlite"),
            "--report",
            str(tmp_path / f"{run}.jsonl"),
            *extra,
        )
        assert done.returncode == 0, done.stderr
        lines[run] = next(
            json.loads(x) for x in (tmp_path / f"{run}.jsonl").read_text().splitlines() if '"patient"' in x
        )
    refused = [a for a in ehr.proxy.answered if a[2] in (401, 403)]
    forget_folded_drafts(fhir_base_url, pid)
    print(f"\n{ehr.personality}: {lines}")
    assert lines["write"]["written"]["created"]  # the drafts were written
    assert "treatment-plan" in lines["write"]["gaps"]  # read before the write: no plan yet
    assert "treatment-plan" not in lines["dry"]["gaps"] and "onset" in lines["dry"]["gaps"]
    assert refused == []
