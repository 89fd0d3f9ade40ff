"""Unit tests of the FHIR client with ``responses`` mocks: the faults a real server cannot show on demand.

Each test asserts what a user of the client would check: how many requests
went out, what they carried, what came back, and the one-sentence error.
The integration tests against the sandbox HAPI live elsewhere.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from email.utils import formatdate

import pytest
import requests
import responses
from responses import matchers

from fhir_plugin import BatchReader, PerResourceWriter, PerTypeReader, TransactionWriter, strategies_for
from fhir_plugin._client import (
    FhirClient,
    backoff_delay,
    error_for_status,
    is_safe_to_repeat,
    record_batch,
    resolve_url,
    retry_after_seconds,
)
from fhir_plugin._errors import (
    AuthError,
    InputError,
    MultipleMatches,
    NotFound,
    ServerError,
    TransportError,
    UsageError,
)
from fhir_plugin._pace import RateLimiter

BASE = "http://fhir.test:8080/fhir"
TOKEN = "tok-3f9c-SECRET-a81e"
FHIR_JSON = "application/fhir+json"


# ---------------------------------------------------------------- resources and Bundles


def patient(pid: str = "p1") -> dict:
    return {"resourceType": "Patient", "id": pid}


def condition(cid: str, pid: str = "p1") -> dict:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"}}


def observation(oid: str, pid: str = "p1") -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"text": "pain"},
        "subject": {"reference": f"Patient/{pid}"},
    }


def encounter(eid: str, pid: str = "p1") -> dict:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/{pid}"},
    }


def careplan(cpid: str, pid: str = "p1") -> dict:
    return {
        "resourceType": "CarePlan",
        "id": cpid,
        "status": "active",
        "intent": "plan",
        "subject": {"reference": f"Patient/{pid}"},
    }


def outcome(diagnostics: str, severity: str = "error") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": "processing", "diagnostics": diagnostics}],
    }


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "self", "url": f"{BASE}/x"}, {"relation": "next", "url": next_url}]
    return bundle


def ok(resource: dict) -> dict:
    return {"resource": resource, "response": {"status": "200 OK"}}


def failed(status: str, oo: dict | None = None) -> dict:
    response = {"status": status}
    if oo:
        response["outcome"] = oo
    return {"response": response}


def batch_response(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": list(entries)}


def full_record_answer(conditions=None) -> dict:
    return batch_response(
        ok(patient()),
        ok(searchset(conditions or [condition("c1")])),
        ok(searchset([observation("o1")])),
        ok(searchset([encounter("e1")])),
        ok(searchset([careplan("cp1")])),
    )


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def sleeps() -> list[float]:
    return []


def slept_time(sleeps: list[float], per_minute: float | None = None) -> RateLimiter:
    """A pacer whose clock is the time slept so far: the client's waits and the pacer's on one timeline."""
    return RateLimiter(per_minute, clock=lambda: sum(sleeps), sleep=sleeps.append)


@pytest.fixture
def client(sleeps):
    with FhirClient(BASE, token=TOKEN, sleep=sleeps.append, pacer=slept_time(sleeps)) as c:
        yield c


def transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def conditional_create(resource: dict, identifier: str) -> dict:
    """A transaction entry that creates ``resource`` unless one with ``identifier`` exists (SPEC §7)."""
    return {
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": f"identifier={identifier}"},
        "resource": resource,
    }


def sent_json(call) -> dict:
    return json.loads(call.request.body)


# ---------------------------------------------------------------- reading a record in one round trip


def test_record_is_one_batch_post_with_the_patient_read_and_one_search_per_type(mock, client):
    mock.post(BASE, json=full_record_answer())

    record = client.read_patient_record("p1")

    assert len(mock.calls) == 1 and client.round_trips == 1
    request = mock.calls[0].request
    assert request.method == "POST" and request.url == BASE
    assert request.headers["Accept"] == FHIR_JSON and request.headers["Content-Type"] == FHIR_JSON
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    batch = sent_json(mock.calls[0])
    assert batch["resourceType"] == "Bundle" and batch["type"] == "batch"
    assert [(e["request"]["method"], e["request"]["url"]) for e in batch["entry"]] == [
        ("GET", "Patient/p1"),
        ("GET", "Condition?patient=p1&_count=500"),
        ("GET", "Observation?patient=p1&_count=500"),
        ("GET", "Encounter?patient=p1&_count=500"),
        ("GET", "CarePlan?patient=p1&_count=500"),
    ]
    assert record.patient_id == "p1"
    assert record.patient == patient()
    assert record.counts() == {"Patient": 1, "Condition": 1, "Observation": 1, "Encounter": 1, "CarePlan": 1}


def test_record_types_can_be_narrowed(mock, client):
    mock.post(BASE, json=batch_response(ok(patient()), ok(searchset([condition("c1")]))))

    record = client.read_patient_record("p1", types=("Condition",))

    assert [e["request"]["url"] for e in sent_json(mock.calls[0])["entry"]] == [
        "Patient/p1",
        "Condition?patient=p1&_count=500",
    ]
    assert record.counts() == {"Patient": 1, "Condition": 1}


def test_record_follows_next_links_of_a_searchset_longer_than_a_page(mock, client):
    page2 = f"{BASE}?_getpages=abc123&_getpagesoffset=500&_count=500"
    mock.post(
        BASE,
        json=batch_response(
            ok(patient()),
            ok(searchset([condition("c1")], next_url=page2)),
            ok(searchset([observation("o1")])),
            ok(searchset([])),
            ok(searchset([])),
        ),
    )
    mock.get(
        BASE,
        json=searchset([condition("c2")]),
        match=[matchers.query_param_matcher({"_getpages": "abc123", "_getpagesoffset": "500", "_count": "500"})],
    )

    record = client.read_patient_record("p1")

    assert [c["id"] for c in record.of_type("Condition")] == ["c1", "c2"]
    assert client.round_trips == 2
    assert mock.calls[1].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_search_follows_next_links_over_two_pages(mock, client):
    mock.get(
        f"{BASE}/Condition",
        json=searchset([condition("c1")], next_url=f"{BASE}?_getpages=p&_getpagesoffset=1"),
        match=[matchers.query_param_matcher({"patient": "p1"})],
    )
    mock.get(
        BASE,
        json=searchset([condition("c2")]),
        match=[matchers.query_param_matcher({"_getpages": "p", "_getpagesoffset": "1"})],
    )

    found = client.search("Condition", {"patient": "p1"})

    assert [c["id"] for c in found] == ["c1", "c2"]
    assert client.round_trips == 2


def test_search_skips_included_and_outcome_entries(mock, client):
    page = searchset([condition("c1")])
    page["entry"] += [
        {"resource": patient(), "search": {"mode": "include"}},
        {"resource": outcome("slow query", "warning"), "search": {"mode": "outcome"}},
    ]
    mock.get(f"{BASE}/Condition", json=page)

    assert client.search("Condition", {"patient": "p1", "_include": "Condition:subject"}) == [condition("c1")]


@pytest.mark.parametrize(
    "foreign",
    [
        "http://evil.example/fhir?_getpages=abc",  # another host
        "http://fhir.test:9999/fhir?_getpages=abc",  # another port
        "https://fhir.test:8080/fhir?_getpages=abc",  # another scheme
        "http://fhir.test:8080/fhir-other/Condition?x=1",  # a sibling path that merely starts like the base
        "http://fhir.test:8080/Condition?x=1",  # above the base
        "//evil.example/fhir?_getpages=abc",  # scheme-relative
    ],
)
def test_a_next_link_outside_the_base_is_refused_and_never_requested(mock, client, foreign):
    mock.post(BASE, json=batch_response(ok(patient()), ok(searchset([condition("c1")], next_url=foreign))))

    with pytest.raises(UsageError, match="not under the FHIR base") as caught:
        client.read_patient_record("p1", types=("Condition",))

    assert len(mock.calls) == 1  # the token went nowhere else
    assert "_getpages" not in str(caught.value)


def test_absolute_urls_under_the_base_and_relative_paths_resolve():
    assert resolve_url(BASE, "Patient/1") == f"{BASE}/Patient/1"
    assert resolve_url(BASE + "", "") == BASE
    assert resolve_url(BASE, f"{BASE}?_getpages=x") == f"{BASE}?_getpages=x"
    assert resolve_url(BASE, "HTTP://FHIR.TEST:8080/fhir/Patient/1") == "HTTP://FHIR.TEST:8080/fhir/Patient/1"
    assert resolve_url("http://h/fhir", "http://h:80/fhir/Patient/1") == "http://h:80/fhir/Patient/1"
    with pytest.raises(UsageError, match=r"'\.\.'"):
        resolve_url(BASE, "Patient/../../admin")


def test_a_malformed_patient_id_is_refused_before_any_request(mock, client):
    for bad in ("p1/../Observation", "a b", "", "x" * 65):
        with pytest.raises(UsageError, match="not a valid FHIR Patient id"):
            client.read_patient_record(bad)
    assert client.round_trips == 0


def test_a_repeated_resource_across_pages_is_kept_once(mock, client):
    page2 = f"{BASE}?_getpages=dup"
    mock.post(BASE, json=batch_response(ok(patient()), ok(searchset([condition("c1")], next_url=page2))))
    mock.get(page2, json=searchset([condition("c1"), condition("c2")]))

    record = client.read_patient_record("p1", types=("Condition",))

    assert [c["id"] for c in record.of_type("Condition")] == ["c1", "c2"]


def test_paging_links_that_loop_are_an_error_not_a_hang(mock, client):
    loop = f"{BASE}?_getpages=loop"
    mock.get(f"{BASE}/Condition", json=searchset([condition("c1")], next_url=loop))
    mock.get(loop, json=searchset([condition("c2")], next_url=loop))

    with pytest.raises(InputError, match="loop"):
        client.search("Condition", {"patient": "p1"})
    assert client.round_trips == 2


# ---------------------------------------------------------------- batch entries that fail


def test_a_missing_patient_in_the_batch_is_not_found_naming_the_patient_and_server(mock, client):
    mock.post(
        BASE,
        json=batch_response(
            failed("404 Not Found", outcome("HAPI-2001: Resource Patient/p404 is not known")),
            ok(searchset([])),
            ok(searchset([])),
            ok(searchset([])),
            ok(searchset([])),
        ),
    )

    with pytest.raises(NotFound) as caught:
        client.read_patient_record("p404")

    assert str(caught.value) == f"patient p404 was not found on {BASE}"
    assert caught.value.status == 404
    assert caught.value.outcome["resourceType"] == "OperationOutcome"


def test_another_failing_entry_raises_the_error_its_status_maps_to(mock, client):
    mock.post(
        BASE,
        json=batch_response(
            ok(patient()),
            ok(searchset([])),
            failed("500 Internal Server Error", outcome("HAPI-0389: database is unavailable")),
            ok(searchset([])),
            ok(searchset([])),
        ),
    )

    with pytest.raises(ServerError) as caught:
        client.read_patient_record("p1")

    assert type(caught.value) is ServerError and caught.value.status == 500
    assert "GET http://fhir.test:8080/fhir/Observation" in str(caught.value)
    assert "database is unavailable" in str(caught.value)
    assert "patient=" not in str(caught.value)  # no search values in messages


def test_a_forbidden_entry_is_an_auth_error(mock, client):
    mock.post(BASE, json=batch_response(ok(patient()), failed("403 Forbidden")))

    with pytest.raises(AuthError) as caught:
        client.read_patient_record("p1", types=("Condition",))
    assert caught.value.status == 403 and "lacks the needed scope" in str(caught.value)


def test_an_invalid_resource_in_the_answer_is_an_input_error_naming_it(mock, client):
    bad = {
        "resourceType": "Observation",
        "id": "o-bad",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
    }  # no code: required in R4
    mock.post(BASE, json=batch_response(ok(patient()), ok(searchset([bad]))))

    with pytest.raises(InputError, match=r"Observation/o-bad is not valid FHIR R4 at code"):
        client.read_patient_record("p1", types=("Observation",))


def test_a_batch_answer_with_missing_entries_is_an_input_error(mock, client):
    mock.post(BASE, json=batch_response(ok(patient())))

    with pytest.raises(InputError, match="one entry per request"):
        client.read_patient_record("p1")


def test_a_non_json_success_answer_is_an_input_error(mock, client):
    mock.get(f"{BASE}/Patient/p1", body="<html>login</html>", content_type="text/html")

    with pytest.raises(InputError, match=r"GET http://fhir.test:8080/fhir/Patient/p1 is not JSON \(text/html\)"):
        client.read("Patient", "p1")


# ---------------------------------------------------------------- retries


def test_429_with_retry_after_is_waited_out_then_succeeds(mock, client, sleeps):
    url = f"{BASE}/Patient/p1"
    mock.get(url, status=429, headers={"Retry-After": "2"}, json=outcome("slow down"))
    mock.get(url, json=patient())

    assert client.read("Patient", "p1") == patient()
    assert sleeps == [2.0]
    assert client.round_trips == 2


def test_retry_after_is_capped_by_max_retry_after(mock, sleeps):
    url = f"{BASE}/Patient/p1"
    mock.get(url, status=429, headers={"Retry-After": "3600"})
    mock.get(url, json=patient())

    with FhirClient(BASE, max_retry_after=10, sleep=sleeps.append, pacer=slept_time(sleeps)) as client:
        client.read("Patient", "p1")
    assert sleeps == [10]


def test_429_is_retried_even_for_a_plain_create(mock, client, sleeps):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "POST", "url": "Condition"}, "resource": condition("x")}],
    }
    mock.post(BASE, status=429, headers={"Retry-After": "1"})
    mock.post(BASE, json={"resourceType": "Bundle", "type": "transaction-response", "entry": []})

    client.transaction(bundle)
    assert client.round_trips == 2 and sleeps == [1.0]


def test_max_requests_per_minute_spaces_every_attempt_retries_included(mock, sleeps):
    mock.get(f"{BASE}/Patient/p1", status=503)
    mock.get(f"{BASE}/Patient/p1", json=patient())
    mock.get(f"{BASE}/Patient/p2", json=patient("p2"))

    with FhirClient(BASE, backoff=0, sleep=sleeps.append, pacer=slept_time(sleeps, 30)) as client:
        client.read("Patient", "p1")
        client.read("Patient", "p2")
    # 30 a minute: 2 s between attempts; the 503's own backoff (0 here) does not count as a slot
    assert client.round_trips == 3 and sleeps == [0.0, 2.0, 2.0]


def test_without_a_rate_a_normal_run_never_sleeps(mock, sleeps):
    mock.post(BASE, json=full_record_answer())
    mock.get(f"{BASE}/Patient/p1", json=patient())

    with FhirClient(BASE, sleep=sleeps.append) as client:
        client.read_patient_record("p1")
        for _ in range(20):
            client.read("Patient", "p1")
    assert sleeps == []


@pytest.mark.parametrize("status", [429, 503])
def test_a_429_or_503_one_thread_gets_holds_the_other_threads_next_request(mock, status):
    mock.get(f"{BASE}/Patient/a", status=status, headers={"Retry-After": "3"})
    mock.get(f"{BASE}/Patient/a", json=patient("a"))
    mock.get(f"{BASE}/Patient/b", json=patient("b"))
    held, b_done = threading.Event(), threading.Event()
    paced: list[tuple[str, float]] = []  # (thread, seconds) the pacer made it wait; the clock stays at 0

    def pacer_sleep(seconds: float) -> None:
        paced.append((threading.current_thread().name, seconds))

    def client_sleep(seconds: float) -> None:  # thread a waits out its own 429 here, while b goes on
        held.set()
        b_done.wait(timeout=5)

    client = FhirClient(BASE, sleep=client_sleep, pacer=RateLimiter(None, clock=lambda: 0.0, sleep=pacer_sleep))

    def read_b() -> None:
        held.wait(timeout=5)
        client.read("Patient", "b")
        b_done.set()

    threads = [
        threading.Thread(target=client.read, args=("Patient", "a"), name="a"),
        threading.Thread(target=read_b, name="b"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    assert ("b", 3.0) in paced  # b was held the 3 s the server asked of a
    assert [c.request.url.rsplit("/", 1)[-1] for c in mock.calls] == ["a", "b", "a"]


def test_a_request_rate_must_be_positive_and_given_once():
    for rate in (0, -1):
        with pytest.raises(UsageError, match="max_requests_per_minute must be a positive number"):
            FhirClient(BASE, max_requests_per_minute=rate)
    with pytest.raises(UsageError, match="not both"):
        FhirClient(BASE, max_requests_per_minute=60, pacer=RateLimiter(60))


def test_a_burst_of_503_is_ridden_out_with_growing_bounded_waits(mock, client, sleeps):
    url = f"{BASE}/Patient/p1"
    for _ in range(3):
        mock.get(url, status=503)
    mock.get(url, json=patient())

    assert client.read("Patient", "p1") == patient()
    assert client.round_trips == 4
    assert len(sleeps) == 3
    for n, waited in enumerate(sleeps):
        full = client.backoff * 2**n
        assert full / 2 <= waited <= full


def test_503_forever_gives_up_after_the_retries_with_status_503(mock, sleeps):
    mock.get(f"{BASE}/Patient/p1", status=503, json=outcome("HAPI is starting"))

    with FhirClient(BASE, retries=4, sleep=sleeps.append) as client, pytest.raises(ServerError) as caught:
        client.read("Patient", "p1")

    assert type(caught.value) is ServerError and caught.value.status == 503
    assert client.round_trips == 5 and len(sleeps) == 4  # the first try and 4 retries
    assert str(caught.value) == (
        "GET http://fhir.test:8080/fhir/Patient/p1 failed with 503 Service Unavailable "
        "after 5 attempts: HAPI is starting."
    )


def test_a_503_on_a_plain_create_is_not_repeated_since_it_may_have_been_carried_out(mock, client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "POST", "url": "Condition"}, "resource": condition("x")}],
    }
    mock.post(BASE, status=504)

    with pytest.raises(ServerError) as caught:
        client.transaction(bundle)
    assert caught.value.status == 504 and client.round_trips == 1


def test_a_transaction_of_conditional_creates_is_retried_on_503_and_timeouts(mock, client):
    bundle = transaction(
        conditional_create(condition("x"), "urn:x|1"),
        {"request": {"method": "PUT", "url": "CarePlan?identifier=urn:x|2"}, "resource": careplan("y")},
    )
    answer = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201 Created"}}, {"response": {"status": "200 OK"}}],
    }
    mock.post(BASE, status=503)
    mock.post(BASE, body=requests.exceptions.ReadTimeout("Read timed out."))
    mock.post(BASE, json=answer)

    assert client.transaction(bundle) == answer
    assert client.round_trips == 3
    assert sent_json(mock.calls[0]) == bundle


def test_a_conflict_with_a_concurrent_writer_is_sent_again_only_when_repeating_is_harmless(mock, client):
    """HAPI answers the second of two identical transactions of conditional creates sent at once with 409
    (measured: six ``propose --write`` runs at once, five written, one refused; no duplicate).  Sent again,
    its conditional creates find what the first wrote; a plain create is not sent again."""
    conditional = transaction(conditional_create(condition("x"), "urn:x|1"))
    matched = {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {"status": "200 OK"}}]}
    conflict = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "conflict", "diagnostics": "conditional constraint failure"}],
    }
    mock.post(BASE, status=409, json=conflict)
    mock.post(BASE, json=matched)
    assert client.transaction(conditional) == matched and client.round_trips == 2

    plain = transaction({"request": {"method": "POST", "url": "Condition"}, "resource": condition("x")})
    mock.replace(responses.POST, BASE, status=409, json=conflict)
    with pytest.raises(ServerError) as caught:
        client.transaction(plain)
    assert caught.value.status == 409 and client.round_trips == 3  # one more try: not repeated


def test_the_safe_to_retry_flag_overrides_the_guess(mock, client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "POST", "url": "Condition"}, "resource": condition("x")}],
    }
    mock.post(BASE, status=503)
    mock.post(BASE, json={"resourceType": "Bundle", "type": "transaction-response", "entry": []})

    client.transaction(bundle, safe_to_retry=True)
    assert client.round_trips == 2


def test_a_timeout_is_retried_then_becomes_one_sentence_transport_error(mock, sleeps):
    mock.get(f"{BASE}/Patient/p1", body=requests.exceptions.ReadTimeout("Read timed out. (read timeout=30)"))

    with FhirClient(BASE, retries=2, sleep=sleeps.append) as client, pytest.raises(TransportError) as caught:
        client.read("Patient", "p1")

    assert str(caught.value) == f"could not reach {BASE}: no answer within 30 s (3 attempts)"
    assert isinstance(caught.value.__cause__, requests.exceptions.ReadTimeout)
    assert client.round_trips == 3 and len(sleeps) == 2


def test_a_timeout_then_an_answer_succeeds(mock, client):
    url = f"{BASE}/Patient/p1"
    mock.get(url, body=requests.exceptions.ConnectTimeout("connect timed out"))
    mock.get(url, json=patient())

    assert client.read("Patient", "p1") == patient()
    assert client.round_trips == 2


def test_connection_refused_is_a_one_sentence_transport_error(sleeps):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/fhir"

    with FhirClient(base, retries=1, timeout=2, sleep=sleeps.append) as client:
        with pytest.raises(TransportError) as caught:
            client.capabilities()

    assert str(caught.value) == f"could not reach {base}: connection refused (2 attempts)"
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert client.round_trips == 2


@pytest.mark.parametrize(
    "header, expected", [("2", 2.0), ("0", 0.0), (" 17 ", 17.0), ("soon", None), ("", None), (None, None), ("-3", None)]
)
def test_retry_after_seconds_form(header, expected):
    assert retry_after_seconds(header) == expected


def test_retry_after_http_date_form():
    now = 1_800_000_000.0
    assert retry_after_seconds(formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_backoff_grows_is_capped_and_jittered():
    assert backoff_delay(1, 0.5, 30, rand=lambda: 0.0) == 0.25
    assert backoff_delay(1, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff_delay(4, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff_delay(20, 0.5, 30, rand=lambda: 1.0) == 30


def test_which_bundles_are_safe_to_repeat():
    def bundle(*requests_):
        return {"entry": [{"request": r} for r in requests_]}

    assert is_safe_to_repeat(record_batch("p1"))
    assert is_safe_to_repeat(
        bundle(
            {"method": "PUT", "url": "Condition/1"},
            {"method": "DELETE", "url": "X/1"},
            {"method": "POST", "url": "Condition", "ifNoneExist": "identifier=a|b"},
        )
    )
    assert not is_safe_to_repeat(bundle({"method": "POST", "url": "Condition"}))
    assert not is_safe_to_repeat(bundle({"method": "PATCH", "url": "Condition/1"}))


# ---------------------------------------------------------------- error answers


def test_401_is_an_auth_error(mock, client):
    mock.get(f"{BASE}/Patient/p1", status=401)

    with pytest.raises(AuthError) as caught:
        client.read("Patient", "p1")
    assert caught.value.status == 401
    assert str(caught.value) == (
        "GET http://fhir.test:8080/fhir/Patient/p1 failed with 401 Unauthorized: "
        "the access token is missing, expired, or lacks the needed scope."
    )


def test_operation_outcome_diagnostics_make_the_message_and_are_kept(mock, client):
    oo = outcome("HAPI-0450: Failed to parse request body as JSON resource. Error was: Unexpected character")
    mock.get(f"{BASE}/Condition/c1", status=400, json=oo)

    with pytest.raises(ServerError) as caught:
        client.read("Condition", "c1")

    assert str(caught.value) == (
        "GET http://fhir.test:8080/fhir/Condition/c1 failed with 400 Bad Request: HAPI-0450: "
        "Failed to parse request body as JSON resource. Error was: Unexpected character."
    )
    assert caught.value.status == 400 and caught.value.outcome == oo


def test_details_text_is_used_when_there_are_no_diagnostics():
    oo = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "information", "code": "informational", "diagnostics": "noise"},
            {"severity": "error", "code": "invalid", "details": {"text": "Condition.subject is required"}},
            {"severity": "error", "code": "invalid", "details": {"coding": [{"display": "Unknown code"}]}},
        ],
    }

    error = error_for_status(422, oo, action="POST http://h/fhir")

    assert str(error) == (
        "POST http://h/fhir failed with 422 Unprocessable Entity: Condition.subject is required; Unknown code."
    )


def test_410_is_not_found_and_a_plain_error_body_stays_out_of_the_message(mock, client):
    mock.get(f"{BASE}/Patient/gone", status=410, json=patient("gone"))
    mock.get(f"{BASE}/Patient/p2", status=500, json={"name": [{"family": "Doe"}]})

    with pytest.raises(NotFound) as gone:
        client.read("Patient", "gone")
    with pytest.raises(ServerError) as broken:
        client.read("Patient", "p2")

    assert gone.value.status == 410 and gone.value.outcome is None
    assert str(broken.value) == "GET http://fhir.test:8080/fhir/Patient/p2 failed with 500 Internal Server Error."
    assert "Doe" not in str(broken.value)


def test_412_is_multiple_matches(mock, client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Condition", "ifNoneExist": "code=M62.561&subject=Patient/p1"},
                "resource": condition("x"),
            }
        ],
    }
    mock.post(
        BASE,
        status=412,
        json=outcome("HAPI-0958: Failed to CREATE resource with match URL because this search matched 2 resources"),
    )

    with pytest.raises(MultipleMatches, match="this search matched 2 resources") as caught:
        client.transaction(bundle)
    assert caught.value.status == 412


def test_a_redirect_is_not_followed(mock, client):
    mock.get(f"{BASE}/metadata", status=301, headers={"Location": "https://elsewhere.example/fhir/metadata"})

    with pytest.raises(ServerError) as caught:
        client.capabilities()
    assert caught.value.status == 301 and len(mock.calls) == 1
    assert "redirected to https://elsewhere.example/fhir/metadata" in str(caught.value)


# ---------------------------------------------------------------- secrets and patient data stay out


def test_the_token_never_appears_in_messages_or_logs(mock, client, caplog):
    caplog.set_level(logging.DEBUG)
    mock.get(f"{BASE}/Patient/p1", status=401, json=outcome(f"Invalid token: Bearer {TOKEN}"))
    mock.get(f"{BASE}/Patient/p2", status=429, headers={"Retry-After": "1"})
    mock.get(f"{BASE}/Patient/p2", status=503)
    mock.get(f"{BASE}/Patient/p3", body=requests.exceptions.ReadTimeout(f"timed out, auth {TOKEN}"))
    mock.get(
        f"{BASE}/Patient",
        json=searchset([patient("p9")]),
        match=[matchers.query_param_matcher({"family": "Doe", "birthdate": "1960-02-01"})],
    )

    messages = []
    for pid in ("p1", "p2", "p3"):
        with pytest.raises(Exception) as caught:
            client.read("Patient", pid)
        messages.append(str(caught.value))
    client.search("Patient", {"family": "Doe", "birthdate": "1960-02-01"})

    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "[redacted]" in messages[0]
    logged = [r.getMessage() for r in caplog.records]
    assert any("Patient?family&birthdate -> 200" in line for line in logged)  # query names, not values
    for text in messages + logged + [repr(client)]:
        assert TOKEN not in text
        assert "Doe" not in text and "1960" not in text


def test_logs_name_method_path_status_and_time(mock, client, caplog):
    caplog.set_level(logging.DEBUG, logger="fhir_plugin.client")
    mock.get(f"{BASE}/Patient/p1", json=patient())

    client.read("Patient", "p1")

    (record,) = [r for r in caplog.records if r.name == "fhir_plugin.client"]
    assert record.getMessage().startswith("GET /Patient/p1 -> 200 in ")


# ---------------------------------------------------------------- the rest of the surface


def test_validate_returns_the_operation_outcome_whether_it_passed_or_not(mock, client):
    passed = outcome("All OK", severity="information")
    failed_oo = outcome("Condition.subject: minimum required = 1, but only found 0")
    mock.post(f"{BASE}/Condition/$validate", json=passed)
    mock.post(f"{BASE}/Condition/$validate", status=412, json=failed_oo)

    assert client.validate(condition("c1")) == passed
    assert client.validate({"resourceType": "Condition"}) == failed_oo
    assert sent_json(mock.calls[0]) == condition("c1")
    assert mock.calls[0].request.headers["Content-Type"] == FHIR_JSON


def test_validate_still_raises_on_auth_failure(mock, client):
    mock.post(f"{BASE}/Condition/$validate", status=403, json=outcome("scope user/Condition.rs missing"))

    with pytest.raises(AuthError, match="scope user/Condition.rs missing"):
        client.validate(condition("c1"))


def test_capabilities_is_get_metadata_with_fhir_json_accept(mock, client):
    mock.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})

    assert client.capabilities()["fhirVersion"] == "4.0.1"
    assert mock.calls[0].request.headers["Accept"] == FHIR_JSON
    assert "Content-Type" not in mock.calls[0].request.headers


def test_transaction_refuses_what_is_not_a_transaction(client):
    with pytest.raises(UsageError):
        client.transaction({"resourceType": "Bundle", "type": "searchset"})
    assert client.round_trips == 0


def test_a_bad_base_url_is_a_usage_error():
    for bad in ("fhir.test/fhir", "ftp://fhir.test/fhir", "http:///fhir", "http://h/fhir?x=1"):
        with pytest.raises(UsageError):
            FhirClient(bad)


def test_a_session_passed_in_is_used_and_left_open():
    class Recording(requests.Session):
        closed = False

        def close(self):
            self.closed = True
            super().close()

    session = Recording()
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
        with FhirClient(BASE + "/", session=session) as client:
            client.capabilities()
        assert mock.calls[0].request.url == f"{BASE}/metadata"
        assert "Authorization" not in mock.calls[0].request.headers
    assert not session.closed


def test_an_oauth2_session_without_a_usable_token_is_an_auth_error(mock):
    from authlib.integrations.requests_client import OAuth2Session

    with FhirClient(BASE, session=OAuth2Session(client_id="plugin")) as client:
        with pytest.raises(AuthError, match="access token is missing or could not be renewed"):
            client.capabilities()
    assert len(mock.calls) == 0


def test_an_oauth2_session_sends_its_own_bearer_token(mock):
    from authlib.integrations.requests_client import OAuth2Session

    session = OAuth2Session(client_id="plugin", token={"access_token": TOKEN, "token_type": "Bearer"})
    mock.get(f"{BASE}/Patient/p1", status=403, json=outcome(f"token {TOKEN} lacks patient/Patient.r"))

    with FhirClient(BASE, session=session) as client, pytest.raises(AuthError) as caught:
        client.read("Patient", "p1")
    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(caught.value)


# ---------------------------------------------------------------- the per-type reader and per-resource writer


def test_per_type_reader_reads_with_one_request_per_type(mock, client):
    mock.get(f"{BASE}/Patient/p1", json=patient())
    for rtype, resource in (
        ("Condition", condition("c1")),
        ("Observation", observation("o1")),
        ("Encounter", encounter("e1")),
        ("CarePlan", careplan("cp1")),
    ):
        mock.get(
            f"{BASE}/{rtype}",
            json=searchset([resource]),
            match=[matchers.query_param_matcher({"patient": "p1", "_count": "500"})],
        )
    mock.get(
        f"{BASE}/DocumentReference",
        json=searchset([]),
        match=[matchers.query_param_matcher({"patient": "p1", "_count": "500", "type": "http://loinc.org|18776-5"})],
    )

    record = PerTypeReader(client).read("p1")

    # the Patient, one search per type, and the plugin's plan notes (SPEC §7.1, issue 12 follow-up)
    assert client.round_trips == 6
    assert record.counts() == {"Patient": 1, "Condition": 1, "Observation": 1, "Encounter": 1, "CarePlan": 1}


def test_per_resource_writer_writes_one_request_per_resource_and_resolves_urn_references(mock, client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c7e1f2a-0000-4000-8000-000000000001",
                "request": {"method": "POST", "url": "Condition", "ifNoneExist": "identifier=urn:x|c"},
                "resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}},
            },
            {
                "fullUrl": "urn:uuid:0c7e1f2a-0000-4000-8000-000000000002",
                "request": {"method": "POST", "url": "CarePlan"},
                "resource": {
                    "resourceType": "CarePlan",
                    "status": "draft",
                    "intent": "proposal",
                    "subject": {"reference": "Patient/p1"},
                    "addresses": [{"reference": "urn:uuid:0c7e1f2a-0000-4000-8000-000000000001"}],
                },
            },
        ],
    }
    mock.post(
        f"{BASE}/Condition",
        status=201,
        json=condition("c9"),
        match=[matchers.header_matcher({"If-None-Exist": "identifier=urn:x|c", "Prefer": "return=representation"})],
    )
    mock.post(f"{BASE}/CarePlan", status=201, json=careplan("cp9"))

    result = PerResourceWriter(client).write(bundle)

    assert result.created == ("Condition/c9", "CarePlan/cp9")
    assert client.round_trips == 2
    assert sent_json(mock.calls[1])["addresses"] == [{"reference": "Condition/c9"}]


def test_per_resource_writer_refuses_a_forward_reference(client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "CarePlan"},
                "resource": {"resourceType": "CarePlan", "addresses": [{"reference": "urn:uuid:later"}]},
            }
        ],
    }

    with pytest.raises(UsageError, match="urn:uuid:later"):
        PerResourceWriter(client).write(bundle)
    assert client.round_trips == 0


def test_per_resource_writer_reports_a_matched_conditional_create_as_existing(mock, client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c7e1f2a-0000-4000-8000-000000000001",
                "request": {"method": "POST", "url": "Condition", "ifNoneExist": "identifier=urn:x|c"},
                "resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}},
            }
        ],
    }
    mock.post(f"{BASE}/Condition", status=200, json=condition("c9"))

    result = PerResourceWriter(client).write(bundle)

    assert result.created == () and result.existing == ("Condition/c9",)
    assert not result.wrote_anything


@pytest.mark.parametrize(
    "interactions, reader, writer",
    [
        (None, BatchReader, TransactionWriter),
        (["batch", "transaction"], BatchReader, TransactionWriter),
        (["transaction"], BatchReader, TransactionWriter),  # HAPI declares only transaction, and takes batches
        (["batch"], BatchReader, PerResourceWriter),
        ([], PerTypeReader, PerResourceWriter),
    ],
)
def test_strategies_follow_what_the_server_declares(client, interactions, reader, writer):
    capabilities = (
        None
        if interactions is None
        else {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "rest": [{"mode": "server", "interaction": [{"code": code} for code in interactions]}],
        }
    )

    chosen = strategies_for(client, capabilities)

    assert type(chosen.reader) is reader and type(chosen.writer) is writer


def test_per_type_reader_asks_per_category_when_an_observation_search_needs_one(mock, client):
    mock.get(f"{BASE}/Patient/p1", json=patient())
    for rtype, resource in (
        ("Condition", condition("c1")),
        ("Encounter", encounter("e1")),
        ("CarePlan", careplan("cp1")),
    ):
        mock.get(f"{BASE}/{rtype}", json=searchset([resource]))
    mock.get(
        f"{BASE}/Observation",
        status=400,
        json=outcome("category is required"),
        match=[matchers.query_param_matcher({"patient": "p1", "_count": "500"})],
    )
    vital = {**observation("o1"), "id": "o-vital"}
    exam = {**observation("o1"), "id": "o-exam"}
    for category, found in (("vital-signs", [vital]), ("exam", [exam, vital])):
        mock.get(
            f"{BASE}/Observation",
            json=searchset(found),
            match=[
                matchers.query_param_matcher(
                    {
                        "patient": "p1",
                        "_count": "500",
                        "category": f"http://terminology.hl7.org/CodeSystem/observation-category|{category}",
                    }
                )
            ],
        )
    mock.get(f"{BASE}/Observation", json=searchset([]))
    mock.get(f"{BASE}/DocumentReference", json=searchset([]))

    record = PerTypeReader(client).read("p1")

    assert sorted(r["id"] for r in record.of_type("Observation")) == ["o-exam", "o-vital"]  # each once


def test_capabilities_read_from_a_statement_and_malformed_ones_read_as_undeclared():
    from fhir_plugin._capabilities import ServerCapabilities

    statement = {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}],
                "resource": [
                    {
                        "type": "Condition",
                        "interaction": [{"code": "create"}, {"code": "search-type"}],
                        "conditionalCreate": True,
                        "searchParam": [{"name": "patient"}, {"name": "identifier"}],
                    },
                    {"type": "CarePlan", "interaction": [{"code": "read"}]},
                ],
            }
        ],
    }
    caps = ServerCapabilities.from_statement(statement)
    assert caps.transaction and not caps.batch
    assert caps.can_create_conditionally("Condition") and not caps.can_create("CarePlan")
    assert caps.searches_by("Condition", "identifier") and not caps.searches_by("Goal", "identifier")
    assert not ServerCapabilities.from_statement({"resourceType": "Bundle"}).declared
    assert not ServerCapabilities.from_statement(None).transaction


def test_a_server_that_wants_a_category_is_remembered_and_asked_per_category_from_then_on(mock, client):
    """Epic refuses an Observation search without a category: the first patient costs one refused request,
    the next ones none (issue 12, reading)."""
    from fhir_plugin._vocab import OBSERVATION_CATEGORIES

    refused = mock.get(  # only the search without a category (the matcher is strict)
        f"{BASE}/Observation",
        status=400,
        json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "required"}]},
        match=[matchers.query_param_matcher({"patient": "p1", "_count": "500"})],
    )
    per_category = mock.get(f"{BASE}/Observation", json=searchset([]))
    mock.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    for rtype in ("Condition", "Encounter", "CarePlan", "DocumentReference"):
        mock.get(f"{BASE}/{rtype}", json=searchset([]))

    reader = PerTypeReader(client)
    for _ in range(3):
        reader.read("p1")

    assert refused.call_count == 1
    assert per_category.call_count == 3 * len(OBSERVATION_CATEGORIES)


# ---------------------------------------------------------------- the plugin's plan notes (SPEC §7.1, issue 12)


def _note(nid: str, *, plugin: bool = True) -> dict:
    note = {
        "resourceType": "DocumentReference",
        "id": nid,
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18776-5"}]},
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/html", "data": "PHA+PC9wPg=="}}],
    }
    if plugin:
        note["meta"] = {"tag": [{"system": "urn:fhir-plugin:tag", "code": "machine-drafted"}]}
    return note


def test_the_batch_reader_asks_for_plan_notes_in_the_same_batch_and_keeps_only_the_plugins(mock, client):
    answer = full_record_answer()
    answer["entry"].append(ok(searchset([_note("mine"), _note("clinicians", plugin=False)])))
    mock.post(BASE, json=answer)

    record = BatchReader(client).read("p1")

    assert client.round_trips == 1  # still one batch
    [sent] = [sent_json(c) for c in mock.calls]
    assert sent["entry"][-1]["request"]["url"] == (
        "DocumentReference?patient=p1&type=http%3A%2F%2Floinc.org%7C18776-5&_count=500"
    )
    assert [r["id"] for r in record.of_type("DocumentReference")] == ["mine"]  # a clinician's note is not read


@pytest.mark.parametrize("status", ["403 Forbidden", "400 Bad Request"])
def test_a_refused_note_search_does_not_break_the_read(mock, client, status):
    answer = full_record_answer()
    answer["entry"].append(failed(status, outcome("DocumentReference search is not allowed")))
    mock.post(BASE, json=answer)
    mock.get(f"{BASE}/Patient/p1", json=patient())
    for rtype, resource in (
        ("Condition", condition("c1")),
        ("Observation", observation("o1")),
        ("Encounter", encounter("e1")),
        ("CarePlan", careplan("cp1")),
    ):
        mock.get(f"{BASE}/{rtype}", json=searchset([resource]))
    mock.get(f"{BASE}/DocumentReference", status=int(status[:3]), json=outcome("not allowed"))

    by_batch = BatchReader(client).read("p1")
    per_type = PerTypeReader(client).read("p1")

    expected = {"Patient": 1, "Condition": 1, "Observation": 1, "Encounter": 1, "CarePlan": 1}
    assert by_batch.counts() == expected and per_type.counts() == expected


def _asks_for_notes(request) -> tuple[bool, str]:
    body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
    return "DocumentReference" in body, "the batch asks for the plan notes"


def test_a_batch_refused_for_its_note_search_is_read_again_without_it_and_the_server_remembered(mock, client):
    """A gateway that checks every entry against the token's scopes refuses the whole batch (403) when the
    token may not read DocumentReference: the record is still read, and later batches go without notes."""
    with_notes = mock.post(
        BASE,
        status=403,
        json=outcome("entry 5 (GET DocumentReference): the token's scopes do not allow search on DocumentReference"),
        match=[_asks_for_notes],
    )
    without_notes = mock.post(BASE, json=full_record_answer())
    reader = BatchReader(client)

    first, second = reader.read("p1"), reader.read("p1")

    expected = {"Patient": 1, "Condition": 1, "Observation": 1, "Encounter": 1, "CarePlan": 1}
    assert first.counts() == expected and second.counts() == expected
    assert with_notes.call_count == 1 and without_notes.call_count == 2  # one refused batch for this server
