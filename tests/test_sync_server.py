"""The sync job against the real sandbox HAPI: idempotence, SIGKILL and resume, faults, backend auth.

``FaultProxy`` is a small HTTP server of this file that sits between the job
and HAPI.  It forwards every request, and on cue answers 429 with
Retry-After, 503 bursts, holds an answer past the job's timeout, drops the
connection (before or after HAPI carried the request out), or holds a
transaction's answer until the test has killed the job.  It also plays a
SMART Backend Services authorization server (discovery + a token endpoint that
verifies the client assertion like an EHR) and answers 401 to a token it has
expired.

End states are compared by identifier: every draft the check calls for is on
the server exactly once (``_summary=count``), and nothing else was written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, import_key

from fhir_plugin import synthetic
from fhir_plugin._cli import main
from fhir_plugin._profile import load_profile
from fhir_plugin._record import records_from_bundle
from fhir_plugin._sync import parse_instant
from sandbox.testing import forwarding_handler, needing_drafts, put_group

pytestmark = pytest.mark.server

AS_OF = dt.date(2026, 11, 26)
REPO = Path(__file__).resolve().parent.parent
DRAFT_TYPES = ("Condition", "CarePlan", "Goal", "Provenance")


# ---------------------------------------------------------------- data on the server

SESSION = uuid.uuid4().hex[:6]  # a server reused across sessions already holds earlier sessions' patients


def prefixed(prefix: str, keys: list[str] | None = None, *, needing: bool = True) -> list[list[dict[str, Any]]]:
    """The synthetic cases (or those named), with ids moved to ``fp-<prefix><session>-...``: each test its own."""
    cases = synthetic.generate_cases(AS_OF)
    chosen = [c for c in cases if keys is None or c.key in keys]
    # SPEC §7.1: a plan or a diagnosis already in the chart is not drafted again, so the job runs on records
    # that still need all 7 drafts (no clinician plan; the chart's Condition coded less specifically)
    moved = [synthetic.renamed_case(c, f"{prefix}{SESSION}").resources for c in chosen]
    return [needing_drafts(r) for r in moved] if needing else moved


def load(base: str, patients: list[list[dict[str, Any]]], group: str | None = None) -> list[str]:
    """PUT the patients (and a Group of them) on the server; their ids."""
    cases = [synthetic.SyntheticCase(r[0]["id"], "", _pid(r), r, None, {}) for r in patients]
    synthetic.load_into_server(base, cases, timeout=300)
    ids = [_pid(r) for r in patients]
    if group:
        put_group(base, group, ids)
    return ids


def _pid(resources: list[dict[str, Any]]) -> str:
    return next(r["id"] for r in resources if r["resourceType"] == "Patient")


def expected_drafts(patients: list[list[dict[str, Any]]]) -> dict[str, list[tuple[str, str]]]:
    """Per patient, the (type, search) of every draft the review calls for; [] when none (a code that does
    not fit, or SPEC §7.1: a plan, or the plugin's own drafts, already in the record)."""
    import datetime as _dt

    from fhir_plugin import review

    profile = load_profile("M62.561")
    now = _dt.datetime.now(_dt.UTC)
    out: dict[str, list[tuple[str, str]]] = {}
    for resources in patients:
        result = review(records_from_bundle(resources)[0], profile, today=AS_OF, now=now)
        out[_pid(resources)] = [
            (e["request"]["url"], _searchable(e["request"]["ifNoneExist"]))
            for e in (result.drafts or {}).get("entry", [])
        ]
    return out


def _searchable(if_none_exist: str) -> str:
    """The conditional-create key as a search outside the transaction: a ``urn:uuid`` placeholder (the
    Provenance's target) names nothing there, and the rest of the key is unique on its own."""
    return "&".join(part for part in if_none_exist.split("&") if "=urn:uuid:" not in part)


def count(base: str, rtype: str, query: str = "") -> int:
    answer = requests.get(
        f"{base}/{rtype}?{query}{'&' if query else ''}_summary=count", headers={"Cache-Control": "no-cache"}, timeout=60
    )
    answer.raise_for_status()
    return answer.json()["total"]


def drafts_of(base: str, patients: list[list[dict[str, Any]]]) -> dict[str, int]:
    """How many plugin drafts (by tag) the server holds for these patients, per type that has a patient param."""
    tag = "_tag=urn:fhir-plugin:tag|machine-drafted"
    return {
        rtype: sum(count(base, rtype, f"patient={_pid(r)}&{tag}") for r in patients)
        for rtype in ("Condition", "CarePlan", "Goal")
    }


def totals(base: str) -> dict[str, int]:
    return {rtype: count(base, rtype) for rtype in DRAFT_TYPES}


def assert_each_draft_once(base: str, expected: dict[str, list[tuple[str, str]]]) -> None:
    for pid, searches in expected.items():
        for rtype, query in searches:
            assert count(base, rtype, query) == 1, f"{rtype}?{query} of {pid}"


def read_report(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if "patient" in x], [x["summary"] for x in lines if "summary" in x]


# ---------------------------------------------------------------- the fault-injecting proxy


class FaultProxy:
    """Forwards ``/fhir/...`` to HAPI; injects faults; plays a SMART backend-services token endpoint."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}  # kind -> [(at request number, action)]
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.applied: list[tuple[str, int, str]] = []
        # backend services
        self.public_key: Any = None
        self.client_id: str | None = None
        self.token_lifetime = 300
        self.valid_tokens: set[str] = set()
        self.issued: list[str] = []
        self.assertions: list[str] = []
        self.jtis: set[str] = set()
        self.fhir_requests_with_token = 0
        self.expire_token_after: int | None = None
        # a transaction held until the test says so
        self.held = threading.Event()
        self.release = threading.Event()
        self.held_patient: str | None = None
        self.http = threading.local()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), forwarding_handler(self.handle, ("GET", "POST", "PUT")))
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.token_url = f"http://127.0.0.1:{self.server.server_address[1]}/auth/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def inject(self, kind: str, at: int, *action: Any) -> None:
        """On the ``at``-th request of ``kind`` (transaction, batch, search, read), do ``action``."""
        self.faults.setdefault(kind, []).append((at, action))

    def require_backend_auth(self, client_id: str, public_key: Any, lifetime: int = 300) -> None:
        self.client_id, self.public_key, self.token_lifetime = client_id, public_key, lifetime

    # -- the handler

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/fhir+json",
    ) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _kind(self, method: str, path: str, body: bytes) -> str:
        if method == "POST" and path.rstrip("/") == "/fhir":
            try:
                return str(json.loads(body).get("type"))
            except ValueError:
                return "other"
        if method == "GET":
            parts = [p for p in urlsplit(path).path.split("/") if p]
            return "read" if len(parts) == 3 else "search"
        return "other"

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        if path == "/fhir/.well-known/smart-configuration":
            return self._send(
                h,
                200,
                json.dumps(
                    {
                        "token_endpoint": self.token_url,
                        "grant_types_supported": ["client_credentials"],
                        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    }
                ).encode(),
                content_type="application/json",
            )
        if path == "/auth/token":
            return self._token(h, body)
        if urlsplit(path).path == "/fhir/metadata":
            # public, as on every FHIR server, and outside the counted requests the faults are placed by:
            # the job reads it once before choosing its reader and writer (issue 12)
            status, headers, answer = self._forward(method, path, body, h)
            return self._send(
                h, status, answer, headers, content_type=headers.pop("Content-Type", "application/fhir+json")
            )
        if self.public_key is not None and not self._authorized(h):
            return self._send(
                h,
                401,
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {"severity": "error", "code": "login", "diagnostics": "the access token has expired"}
                        ],
                    }
                ).encode(),
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        kind = self._kind(method, path, body)
        with self.lock:
            self.seen[kind] = number = self.seen.get(kind, 0) + 1
            action = next((a for at, a in self.faults.get(kind, []) if at == number), None)
        if action:
            self.applied.append((kind, number, action[0]))
        if action and action[0] == "status":
            status, headers = action[1], action[2] if len(action) > 2 else {}
            return self._send(
                h,
                status,
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected"}],
                    }
                ).encode(),
                headers,
            )
        if action and action[0] == "drop-before":
            h.close_connection = True
            return None
        status, headers, answer = self._forward(method, path, body, h)
        if action and action[0] == "drop-after":
            h.close_connection = True
            return None
        if action and action[0] == "delay":
            time.sleep(action[1])
        if action and action[0] == "hold":
            bundle = json.loads(body)
            self.held_patient = bundle["entry"][0]["resource"]["subject"]["reference"]
            self.held.set()
            self.release.wait(60)
            h.close_connection = True
            return None
        try:
            self._send(h, status, answer, headers, content_type=headers.pop("Content-Type", "application/fhir+json"))
        except OSError:
            pass

    def _forward(self, method: str, path: str, body: bytes, h: BaseHTTPRequestHandler):
        session = getattr(self.http, "session", None)
        if session is None:
            session = self.http.session = requests.Session()
        upstream_root = self.upstream[: -len("/fhir")]
        kept = ("content-type", "accept", "cache-control", "prefer")
        sent = {k: v for k, v in h.headers.items() if k.lower() in kept}
        response = session.request(method, upstream_root + path, data=body or None, headers=sent, timeout=300)
        answer = response.content.replace(self.upstream.encode(), self.base.encode())
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower() in ("content-type", "date", "location", "etag", "last-modified")
        }
        if "Location" in headers:
            headers["Location"] = headers["Location"].replace(self.upstream, self.base)
        return response.status_code, headers, answer

    # -- backend services

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        token = str(h.headers.get("Authorization", "")).removeprefix("Bearer ")
        with self.lock:
            if token not in self.valid_tokens:
                return False
            self.fhir_requests_with_token += 1
            if self.expire_token_after and self.fhir_requests_with_token == self.expire_token_after:
                self.valid_tokens.discard(token)  # this request passes; the next one with it is a 401
        return True

    def _token(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        assertion = form.get("client_assertion", "")
        self.assertions.append(assertion)
        try:
            token = jwt.decode(assertion, self.public_key, algorithms=["RS384", "ES384"])
        except Exception:
            return self._send(h, 401, b'{"error": "invalid_client"}', content_type="application/json")
        claims, header = token.claims, token.header
        problems = [
            form.get("grant_type") != "client_credentials",
            form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            header.get("alg") not in ("RS384", "ES384") or not header.get("kid"),
            claims.get("iss") != self.client_id or claims.get("sub") != self.client_id,
            claims.get("aud") != self.token_url,
            not 0 < claims.get("exp", 0) - claims.get("iat", 0) <= 300,
            claims.get("exp", 0) < time.time(),
            claims.get("jti") in self.jtis or not claims.get("jti"),
        ]
        if any(problems):
            return self._send(
                h,
                401,
                json.dumps(
                    {"error": "invalid_client", "error_description": f"check {problems.index(True)} failed"}
                ).encode(),
                content_type="application/json",
            )
        self.jtis.add(claims["jti"])
        access = f"proxy-access-{len(self.issued) + 1}-{os.urandom(6).hex()}"
        with self.lock:
            self.issued.append(access)
            self.valid_tokens.add(access)
        self._send(
            h,
            200,
            json.dumps(
                {
                    "access_token": access,
                    "token_type": "bearer",
                    "expires_in": self.token_lifetime,
                    "scope": form.get("scope", ""),
                }
            ).encode(),
            content_type="application/json",
        )


@pytest.fixture
def proxy(fhir_base_url):
    p = FaultProxy(fhir_base_url)
    yield p
    p.stop()


def sync(*args: str) -> int:
    return main(["sync", "--today", AS_OF.isoformat(), *args])


# ---------------------------------------------------------------- acceptance: all, twice


def test_all_writes_drafts_where_the_profile_applies_and_a_second_run_writes_nothing(fhir_base_url, tmp_path):
    cases = synthetic.generate_cases(AS_OF)
    synthetic.load_into_server(fhir_base_url, cases, timeout=300)
    patients = [c.resources for c in cases]
    expected = expected_drafts(patients)
    state = tmp_path / "state.sqlite"
    patients_on_server = count(fhir_base_url, "Patient")

    assert (
        sync(
            "--server",
            fhir_base_url,
            "--all",
            "--write",
            "--concurrency",
            "4",
            "--state",
            str(state),
            "--report",
            str(tmp_path / "first.jsonl"),
        )
        == 0
    )
    lines, [summary] = read_report(tmp_path / "first.jsonl")
    # every patient on the server (more if another session adds some meanwhile), none failed
    assert summary["patients"] == len(lines) >= patients_on_server and summary["error"] == 0
    by_patient = {x["patient"]: x for x in lines}
    for pid, searches in expected.items():  # every synthetic patient checked; drafts exactly where they fit
        line = by_patient[f"Patient/{pid}"]
        if searches:
            assert line["status"] in ("complete", "gaps")
            # SPEC §7.1: on a reused server an earlier run's drafts are in the record, so nothing is sent
            # (assert_each_draft_once below still finds each of them exactly once)
            assert line["written"] is None or len(line["written"]["created"] + line["written"]["existing"]) == len(
                searches
            )
        else:  # a mismatch is refused; SPEC §7.1: with a plan already in the record nothing is written
            assert line["written"] is None and (line["status"] == "refused") == (line["code_fit"] == "mismatch")
    assert_each_draft_once(fhir_base_url, expected)

    before = totals(fhir_base_url)
    assert (
        sync(
            "--server",
            fhir_base_url,
            "--all",
            "--write",
            "--concurrency",
            "8",
            "--state",
            str(state),
            "--report",
            str(tmp_path / "second.jsonl"),
        )
        == 0
    )
    lines2, [summary2] = read_report(tmp_path / "second.jsonl")
    assert totals(fhir_base_url) == before
    # nothing new anywhere; and SPEC §7.1 after a write: this test's patients hold their drafts, so nothing
    # is offered for them (other tests' patients on a shared server may be in other states, e.g. folded plans)
    assert summary2["created"] == 0
    second_by_patient = {x["patient"]: x for x in lines2}
    assert all(second_by_patient[f"Patient/{pid}"]["written"] is None for pid in expected)
    assert [x["status"] for x in sorted(lines2, key=lambda x: x["patient"])] == [
        x["status"] for x in sorted(lines, key=lambda x: x["patient"])
    ]
    print(
        f"\nall: {summary['patients']} patients, {summary['created']} drafts created; again: "
        f"{summary2['created']} created, totals {before}"
    )


def test_a_changes_run_picks_the_changed_patient_and_not_its_own_drafts(fhir_base_url, tmp_path):
    patients = prefixed("chg", ["complete", "missing-onset", "missing-severity"])
    ids = load(fhir_base_url, patients, group=f"sync-chg-{SESSION}")
    state = tmp_path / "state.sqlite"
    assert (
        sync(
            "--server",
            fhir_base_url,
            "--group",
            f"sync-chg-{SESSION}",
            "--write",
            "--state",
            str(state),
            "--report",
            str(tmp_path / "r0.jsonl"),
        )
        == 0
    )
    stamp = requests.get(f"{fhir_base_url}/Patient?_count=1", headers={"Cache-Control": "no-cache"}, timeout=60).json()[
        "meta"
    ]["lastUpdated"]  # the server's now; drafts are older
    obs = next(r for r in patients[1] if r["resourceType"] == "Observation")
    # edit until the server stamps the edit after ``stamp`` (same-millisecond writes are possible): the
    # server's own clock decides, so nothing waits on ours
    for attempt in range(1, 50):
        edited = {**obs, "note": [{"text": f"re-measured ({attempt})"}]}
        answer = requests.put(
            f"{fhir_base_url}/Observation/{obs['id']}",
            json=edited,
            timeout=60,
            headers={"Prefer": "return=representation"},
        )
        answer.raise_for_status()
        if parse_instant(answer.json()["meta"]["lastUpdated"]) > parse_instant(stamp):
            break

    assert (
        sync(
            "--server",
            fhir_base_url,
            "--since",
            stamp,
            "--write",
            "--state",
            str(state),
            "--report",
            str(tmp_path / "r1.jsonl"),
        )
        == 0
    )
    lines, [summary] = read_report(tmp_path / "r1.jsonl")
    changed = [x["patient"] for x in lines]
    # the edited patient, and not the two whose only news since the stamp is... nothing (their drafts are older,
    # and drafts never count as a change); other sessions sharing the server may add their own patients
    assert f"Patient/{ids[1]}" in changed
    assert f"Patient/{ids[0]}" not in changed and f"Patient/{ids[2]}" not in changed
    assert summary["mode"] == "changed"
    # SPEC §7.1: its drafts, written by the first run, are in the record: nothing is sent again
    assert next(x for x in lines if x["patient"] == f"Patient/{ids[1]}")["written"] is None


def test_group_members_only(fhir_base_url, tmp_path):
    patients = prefixed("grp", ["complete", "excludes1", "missing-follow-up"], needing=False)  # a dry run
    ids = load(fhir_base_url, patients, group=f"sync-grp-{SESSION}")
    assert (
        sync(
            "--server",
            fhir_base_url,
            "--group",
            f"sync-grp-{SESSION}",
            "--state",
            str(tmp_path / "s.sqlite"),
            "--report",
            str(tmp_path / "r.jsonl"),
        )
        == 0
    )
    lines, [summary] = read_report(tmp_path / "r.jsonl")
    assert sorted(x["patient"] for x in lines) == sorted(f"Patient/{i}" for i in ids)
    assert all(x["written"] is None for x in lines)  # no --write: a dry run
    assert {x["status"] for x in lines} == {"complete", "refused", "gaps"}


# ---------------------------------------------------------------- acceptance: SIGKILL and resume

KILL_KEYS = [
    "complete",
    "missing-onset",
    "missing-severity",
    "missing-palpation",
    "excludes1",
    "missing-follow-up",
    "flag-fever",
    "missing-treatment-plan",
    "left-lower-leg",
    "plan-proposed",
    "missing-red-flag-screen",
    "earlier-encounter",
]


def _job(base: str, group: str, state: Path, report: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_plugin._cli",
            "sync",
            "--server",
            base,
            "--group",
            group,
            "--write",
            "--concurrency",
            "2",
            "--today",
            AS_OF.isoformat(),
            "--state",
            str(state),
            "--report",
            str(report),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_with_sigkill_and_restarted_ends_like_an_uninterrupted_run(fhir_base_url, proxy, tmp_path):
    killed = prefixed("kill", KILL_KEYS)
    twin = prefixed("twin", KILL_KEYS)
    load(fhir_base_url, killed, group=f"sync-kill-{SESSION}")
    load(fhir_base_url, twin, group=f"sync-twin-{SESSION}")
    drafts_before = drafts_of(fhir_base_url, killed)

    # the uninterrupted run, on a twin set of the same patients
    job = _job(fhir_base_url, f"sync-twin-{SESSION}", tmp_path / "twin.sqlite", tmp_path / "twin.jsonl")
    assert job.wait(300) == 0, job.stderr.read()
    twin_lines, _ = read_report(tmp_path / "twin.jsonl")

    # the killed run: the 5th transaction is carried out by HAPI, its answer held; then SIGKILL
    proxy.inject("transaction", 5, "hold")
    state, report = tmp_path / "kill.sqlite", tmp_path / "kill.jsonl"
    job = _job(proxy.base, f"sync-kill-{SESSION}", state, report)
    assert proxy.held.wait(300), "the job never sent a 5th transaction"
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    proxy.release.set()
    assert job.returncode == -signal.SIGKILL
    done_before, _ = read_report(report)
    assert 0 < len(done_before) < len(KILL_KEYS)
    held = proxy.held_patient
    assert f"{held}" not in {x["patient"] for x in done_before}  # committed on the server, not in the state

    # restart: the same command, no faults
    proxy.faults.clear()
    job = _job(proxy.base, f"sync-kill-{SESSION}", state, report)
    assert job.wait(300) == 0, job.stderr.read()
    lines, [summary] = read_report(report)
    assert summary["finished"] and summary["from_earlier_attempt"] >= len(done_before)
    assert sorted(x["patient"] for x in lines) == sorted({x["patient"] for x in lines})  # each patient once
    assert len(lines) == len(KILL_KEYS)
    # the held patient's transaction reached the server: on restart its drafts are in the record, so
    # nothing is sent again (SPEC §7.1)
    held_line = next(x for x in lines if x["patient"] == held)
    assert held_line["written"] is None

    # the end state equals the uninterrupted run's: same outcome per patient, every draft exactly once.
    # A patient in flight at the kill (the held one at least) may have had its drafts committed, so it was
    # checked again with its own draft CarePlan on the server, which makes treatment-plan "proposed" rather
    # than missing: its gaps may lack that one id, and nothing else may differ.
    def outcome(xs, prefix):
        return {x["patient"].replace(prefix, ""): (x["status"], x["code_fit"], set(x["gaps"])) for x in xs}

    prefix = f"fp-kill{SESSION}-"
    mine, theirs = outcome(lines, prefix), outcome(twin_lines, f"fp-twin{SESSION}-")
    recorded_before = {x["patient"].replace(prefix, "") for x in done_before}
    assert mine.keys() == theirs.keys()
    for pid, (status, fit, gaps) in mine.items():
        assert (status, fit) == theirs[pid][:2], pid
        assert gaps == theirs[pid][2] or (
            pid not in recorded_before and theirs[pid][2] - gaps == {"treatment-plan"} and gaps <= theirs[pid][2]
        ), pid
    assert_each_draft_once(fhir_base_url, expected_drafts(killed))
    assert_each_draft_once(fhir_base_url, expected_drafts(twin))
    written = {rtype: n - drafts_before[rtype] for rtype, n in drafts_of(fhir_base_url, killed).items()}
    wanted = [t for searches in expected_drafts(killed).values() for t, _ in searches]
    expected = {rtype: wanted.count(rtype) for rtype in written}
    assert written == expected  # and nothing beyond the expected drafts
    print(
        f"\nkill: {len(done_before)} of {len(KILL_KEYS)} patients recorded before SIGKILL; resumed run replayed "
        f"{summary['from_earlier_attempt']}, created {summary['created']}, found {summary['existing']} existing; "
        f"drafts per type {written}"
    )


# ---------------------------------------------------------------- acceptance: faults, with backend auth

FAULT_KEYS = [
    "complete",
    "missing-onset",
    "missing-severity",
    "excludes1",
    "missing-follow-up",
    "flag-fever",
    "missing-treatment-plan",
    "plan-proposed",
]


@pytest.fixture
def ec_key_file(tmp_path):
    key = ECKey.generate_key("P-384", private=True)
    path = tmp_path / "client.pem"
    path.write_bytes(key.as_pem(private=True))
    return path, import_key(key.as_dict(private=False))


def test_faults_are_survived_and_the_end_state_is_the_same(fhir_base_url, proxy, tmp_path, ec_key_file, caplog):
    patients = prefixed("flt", FAULT_KEYS)
    load(fhir_base_url, patients, group=f"sync-flt-{SESSION}")
    key_path, public = ec_key_file
    proxy.require_backend_auth("sync-test-client", public)
    proxy.expire_token_after = 12  # the server drops the first token mid-run: one 401, one renewal
    proxy.inject("read", 1, "drop-before")  # the Group read: connection dropped, nothing done
    proxy.inject("batch", 1, "status", 429, {"Retry-After": "1"})
    proxy.inject("batch", 3, "status", 503)
    proxy.inject("batch", 4, "status", 503)  # a 503 burst (the retry of the 3rd batch, then the 4th)
    proxy.inject("batch", 5, "status", 503)
    proxy.inject("transaction", 2, "delay", 4)  # done by HAPI, answered after the 2 s timeout
    proxy.inject("transaction", 4, "drop-after")  # done by HAPI, the answer never sent
    proxy.inject("transaction", 5, "status", 429, {"Retry-After": "1"})

    caplog.set_level(logging.DEBUG)
    # one worker, so the n-th request of a kind is always the same patient's and the figures are exact
    code = sync(
        "--server",
        proxy.base,
        "--group",
        f"sync-flt-{SESSION}",
        "--write",
        "--concurrency",
        "1",
        "--timeout",
        "2",
        "--client-id",
        "sync-test-client",
        "--key",
        str(key_path),
        "--state",
        str(tmp_path / "s.sqlite"),
        "--report",
        str(tmp_path / "r.jsonl"),
    )
    lines, [summary] = read_report(tmp_path / "r.jsonl")
    assert code == 0, lines
    assert {kind for kind, _, _ in proxy.applied} == {"read", "batch", "transaction"}
    assert len(proxy.applied) == 8, proxy.applied
    assert summary["error"] == 0 and len(lines) == len(FAULT_KEYS)
    assert len(proxy.issued) == 2  # renewed once, after the 401
    expected = expected_drafts(patients)
    assert_each_draft_once(fhir_base_url, expected)
    assert summary["created"] + summary["existing"] == sum(len(s) for s in expected.values())
    assert summary["existing"] == 14  # the late and the dropped transactions were repeated and found their drafts

    # security: the whole run's DEBUG log holds no token, no assertion, no name or birth date
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "fhir_plugin.client" in text and "renewing" in text  # the log was really captured
    for secret in proxy.issued + proxy.assertions:
        assert secret not in text
    for assertion in proxy.assertions:
        assert assertion.split(".")[1] not in text and assertion.split(".")[2] not in text
    for resources in patients:
        person = next(r for r in resources if r["resourceType"] == "Patient")
        assert person["name"][0]["family"] not in text and person["name"][0]["given"][0] not in text
        assert person["birthDate"] not in text
    print(f"\nfaults: {proxy.applied}; tokens issued {len(proxy.issued)}; summary {summary}")
    report_text = (tmp_path / "r.jsonl").read_text()
    assert not any(s in report_text for s in proxy.issued)


# ---------------------------------------------------------------- the real sandbox EHR


def test_backend_services_against_the_sandbox_ehr(fhir_base_url, tmp_path):
    ehr_module = pytest.importorskip("sandbox.ehr")
    patients = prefixed("ehr", ["complete", "missing-onset", "excludes1"])
    load(fhir_base_url, patients, group=f"sync-ehr-{SESSION}")
    key = ECKey.generate_key("P-384", private=True)
    key_path = tmp_path / "ehr-client.pem"
    key_path.write_bytes(key.as_pem(private=True))
    from fhir_plugin._backend_auth import load_signing_key

    jwk = load_signing_key(key_path).public_jwk()
    scope = (
        "system/Patient.rs system/Condition.crs system/Observation.rs system/Encounter.rs system/CarePlan.crs "
        "system/Group.r system/Goal.cs system/Provenance.cs"
    )
    with ehr_module.running_ehr(fhir_base_url, access_token_lifetime=4) as ehr:
        ehr.clients.register(
            ehr_module.Client(
                "sync-job", scope=scope, token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]}
            )
        )
        code = sync(
            "--server",
            ehr.fhir_base_url,
            "--group",
            f"sync-ehr-{SESSION}",
            "--write",
            "--concurrency",
            "1",
            "--client-id",
            "sync-job",
            "--key",
            str(key_path),
            "--state",
            str(tmp_path / "s.sqlite"),
            "--report",
            str(tmp_path / "r.jsonl"),
        )
        lines, [summary] = read_report(tmp_path / "r.jsonl")
        assert code == 0, lines
        # no token, no entry: the EHR's proxy refuses a request without a bearer
        assert requests.get(f"{ehr.fhir_base_url}/Patient/{_pid(patients[0])}", timeout=30).status_code == 401
    assert summary["error"] == 0 and len(lines) == 3
    assert_each_draft_once(fhir_base_url, expected_drafts(patients))


def test_a_metered_ehr_fails_no_patient_and_paced_under_its_limit_refuses_nothing(fhir_base_url, tmp_path):
    """The sandbox EHR meters the job at 5 calls a second (429 with Retry-After past it), as an EHR with a
    published limit does.  Four threads unpaced: refused calls, held and retried, and every patient checked.
    Paced at 4 a second (``--max-requests-per-minute 240``): not one call refused."""
    ehr_module = pytest.importorskip("sandbox.ehr")
    patients = prefixed("meter", None, needing=False)[:12]  # a dry run: reads only
    load(fhir_base_url, patients, group=f"sync-meter-{SESSION}")
    key_path = tmp_path / "meter.pem"
    key_path.write_bytes(ECKey.generate_key("P-384", private=True).as_pem(private=True))
    from fhir_plugin._backend_auth import load_signing_key

    jwk = load_signing_key(key_path).public_jwk()
    refused, reports = [], []
    with ehr_module.running_ehr(fhir_base_url, rate_limit=(5, 1.0)) as ehr:
        for run in ("unpaced", "paced"):  # an app each: the meter counts per app
            ehr.clients.register(
                ehr_module.Client(
                    run, scope=["system/*.read"], token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]}
                )
            )
        for run, pacing in (("unpaced", []), ("paced", ["--max-requests-per-minute", "240"])):
            ehr.proxy.answered.clear()
            code = sync(
                "--server",
                ehr.fhir_base_url,
                "--group",
                f"sync-meter-{SESSION}",
                "--concurrency",
                "4",
                "--client-id",
                run,
                "--key",
                str(key_path),
                "--state",
                str(tmp_path / f"{run}.sqlite"),
                "--report",
                str(tmp_path / f"{run}.jsonl"),
                *pacing,
            )
            refused.append(sum(1 for _, _, status in ehr.proxy.answered if status == 429))
            reports.append((code, *read_report(tmp_path / f"{run}.jsonl")))
    print(f"\n429s: unpaced {refused[0]}, paced {refused[1]}")
    for code, lines, [summary] in reports:
        assert code in (0, 1) and summary["error"] == 0  # gaps found is 1; no patient failed
        assert sorted(x["patient"] for x in lines) == sorted(f"Patient/{_pid(p)}" for p in patients)
        assert all(x["status"] in ("complete", "gaps", "refused") for x in lines)
    assert refused[0] > 0  # the meter did refuse the unpaced job, and the job rode it out
    assert refused[1] == 0
