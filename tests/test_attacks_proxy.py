"""Attacks on the sandbox EHR's FHIR proxy (issue 11, items 1 and 2, ``_has``, unbounded bodies).

A patient-A token carrying the app's own scopes (read, plus create on the
draft types) tries to read patient B's record and to write into it through
the corners the proxy used not to check: conditional creates (``If-None-Exist``
and ``ifNoneExist``, with ``Prefer: return=representation``), conditional
references, ``fullUrl``s, made-up elements and ``_has``.  Every answer must be
a refusal that carries nothing of B's, and B's record must not change.

The pure tests check the access plan; the ``server`` tests go through the
proxy to the real sandbox HAPI; the body tests need no FHIR server at all.
"""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import pytest
import requests
from test_sandbox_ehr import UNREACHABLE, app_client, sign_in

from sandbox.ehr import running_ehr
from sandbox.ehr._access import Access, Denied, plan_request
from sandbox.ehr._scopes import resource_scopes

APP_WRITE_SCOPES = (
    "launch/patient patient/*.rs patient/Condition.c patient/CarePlan.c patient/Goal.c patient/Provenance.c"
)
FHIR_JSON = "application/fhir+json"
A, B = "pat-a", "pat-b"


def _access(scopes: str = APP_WRITE_SCOPES, patient: str | None = A) -> Access:
    return Access(tuple(resource_scopes(scopes)), patient)


def condition(subject: str, **extra) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": subject}, "code": {"text": "attack"}, **extra}


# ------------------------------------------------------------------ the access plan (pure)


@pytest.mark.parametrize(
    "if_none_exist",
    [
        "_id=cond-of-b",
        f"subject=Patient/{B}",
        f"patient={B}",
        f"identifier=x|1&subject=Patient/{B}",
        f"identifier=x|1&subject=Patient/{A}&_has:Condition:subject:_id=c",
        "identifier=x|1",
    ],
)
def test_a_conditional_create_must_name_the_patient_in_its_search(if_none_exist):
    with pytest.raises(Denied, match="If-None-Exist|_has"):
        plan_request(_access(), "POST", "Condition", body=condition(f"Patient/{A}"), if_none_exist=if_none_exist)
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": condition(f"Patient/{A}"),
                "request": {"method": "POST", "url": "Condition", "ifNoneExist": if_none_exist},
            }
        ],
    }
    with pytest.raises(Denied, match="entry 0"):
        plan_request(_access(), "POST", "", body=bundle)


def test_the_plugins_own_conditional_creates_pass():
    plan = plan_request(
        _access(),
        "POST",
        "Condition",
        body=condition(f"Patient/{A}"),
        if_none_exist=f"identifier=urn:x|1&subject=Patient/{A}",
    )
    assert plan.check_written  # and what comes back is checked for other patients


@pytest.mark.parametrize(
    "resource",
    [
        condition(f"Patient?_id={B}", patient={"reference": f"Patient/{A}"}),  # a made-up element vouches
        condition(f"Patient/{A}", asserter={"reference": f"Patient?_id={B}"}),  # conditional anywhere
        condition(f"Patient/{A}", evidence=[{"detail": [{"reference": f"Patient/{B}"}]}]),
        {
            "resourceType": "CarePlan",
            "subject": {"reference": f"Patient/{A}"},
            "addresses": [{"reference": "Condition?subject=Patient/" + B}],
        },
    ],
)
def test_references_to_another_patient_are_refused_wherever_they_are(resource):
    with pytest.raises(Denied):
        plan_request(_access(), "POST", resource["resourceType"], body=resource)


def test_a_fullurl_must_be_a_placeholder_or_the_resources_own_id():
    get_b = {"fullUrl": f"Patient?_id={B}", "request": {"method": "GET", "url": f"Patient/{A}"}}
    write = {"resource": condition(f"Patient?_id={B}"), "request": {"method": "POST", "url": "Condition"}}
    for entries in ([get_b, write], [get_b]):
        with pytest.raises(Denied):
            plan_request(
                _access(), "POST", "", body={"resourceType": "Bundle", "type": "transaction", "entry": entries}
            )
    bare = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "request": {"method": "GET", "url": f"Patient/{A}"}}
    to_bare = {"resource": condition(bare["fullUrl"]), "request": {"method": "POST", "url": "Condition"}}
    with pytest.raises(Denied):
        plan_request(
            _access(), "POST", "", body={"resourceType": "Bundle", "type": "transaction", "entry": [bare, to_bare]}
        )


@pytest.mark.parametrize(
    "rtype, query",
    [
        ("Organization", f"_has:Patient:organization:_id={B}"),
        ("Practitioner", f"_has:Condition:asserter:subject=Patient/{B}"),
        ("Condition", f"patient={A}&_has:Observation:focus:subject=Patient/{B}"),
    ],
)
def test_has_is_refused_under_patient_scopes(rtype, query):
    with pytest.raises(Denied, match="_has"):
        plan_request(_access(), "GET", rtype, query)
    plan_request(_access("user/*.rs", None), "GET", rtype, query)  # a user-level token may


# ------------------------------------------------------------------ through the proxy, to HAPI


def _put(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


@pytest.fixture(scope="module")
def two(fhir_base_url):
    """Patients A and B on HAPI (ids unique to this run); B has two Conditions, a CarePlan and an Organization."""
    tag = uuid.uuid4().hex[:8]
    a, b, org = f"atk-{tag}-a", f"atk-{tag}-b", f"atk-{tag}-org"
    entries = [
        _put({"resourceType": "Organization", "id": org, "name": "B's clinic"}),
        _put({"resourceType": "Patient", "id": a, "name": [{"family": "Alpha"}]}),
        _put(
            {
                "resourceType": "Patient",
                "id": b,
                "name": [{"family": "Beta"}],
                "managingOrganization": {"reference": f"Organization/{org}"},
            }
        ),
        _put({**condition(f"Patient/{a}"), "id": f"atk-{tag}-ca"}),
        _put({**condition(f"Patient/{b}"), "id": f"atk-{tag}-cb0"}),
        _put({**condition(f"Patient/{b}"), "id": f"atk-{tag}-cb1"}),
        _put(
            {
                "resourceType": "CarePlan",
                "id": f"atk-{tag}-pb",
                "status": "active",
                "intent": "plan",
                "subject": {"reference": f"Patient/{b}"},
            }
        ),
    ]
    answer = requests.post(
        fhir_base_url,
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={"Content-Type": FHIR_JSON},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:300]
    with running_ehr(fhir_base_url, auto_approve=True) as ehr:
        ehr.clients.register(app_client())
        token = sign_in(ehr, patient=a, scope=APP_WRITE_SCOPES)["access_token"]
        yield {
            "ehr": ehr,
            "hapi": fhir_base_url,
            "a": a,
            "b": b,
            "org": org,
            "tag": tag,
            "token": token,
            "b_ids": [b, f"atk-{tag}-cb0", f"atk-{tag}-cb1", f"atk-{tag}-pb", org],
        }


def _count(two, rtype: str, patient: str) -> int:
    answer = requests.get(
        f"{two['hapi']}/{rtype}",
        params={"patient": patient, "_summary": "count"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    )
    return answer.json()["total"]


def _send(two, method: str, path: str, *, json_body=None, headers=None, params=None) -> requests.Response:
    sent = {"Authorization": f"Bearer {two['token']}", "Content-Type": FHIR_JSON, **(headers or {})}
    return requests.request(
        method,
        f"{two['ehr'].fhir_base_url}/{path}".rstrip("/"),
        json=json_body,
        headers=sent,
        params=params,
        timeout=60,
    )


def _assert_nothing_of_b(two, answer: requests.Response) -> None:
    text = answer.text + " ".join(f"{k}: {v}" for k, v in answer.headers.items())
    leaked = [i for i in two["b_ids"][1:] if i in text]  # B's own id may be echoed from the request
    assert not leaked, (answer.status_code, leaked, answer.text[:300])


@pytest.mark.server
@pytest.mark.parametrize(
    "rtype, search",
    [
        ("Condition", "_id={tag}-cb0"),
        ("CarePlan", "subject=Patient/{b}"),
        ("Condition", "subject=Patient/{b}"),
    ],
)
def test_a_conditional_create_does_not_return_or_count_another_patients_resources(two, rtype, search):
    search = search.format(tag="atk-" + two["tag"], b=two["b"])
    careplan = {
        "resourceType": "CarePlan",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{two['a']}"},
    }
    body = condition(f"Patient/{two['a']}") if rtype == "Condition" else careplan
    answer = _send(
        two, "POST", rtype, json_body=body, headers={"If-None-Exist": search, "Prefer": "return=representation"}
    )
    assert answer.status_code == 403, (answer.status_code, answer.text[:300])  # never 200 with B's, never 412
    _assert_nothing_of_b(two, answer)
    for kind in ("batch", "transaction"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"resource": body, "request": {"method": "POST", "url": rtype, "ifNoneExist": search}}],
        }
        answer = _send(two, "POST", "", json_body=bundle, headers={"Prefer": "return=representation"})
        assert answer.status_code == 403, (kind, answer.status_code, answer.text[:300])
        _assert_nothing_of_b(two, answer)


@pytest.mark.server
def test_a_patient_token_cannot_write_into_another_patients_record(two):
    a, b = two["a"], two["b"]
    before = _count(two, "Condition", b)
    sneaky = condition(f"Patient?_id={b}", patient={"reference": f"Patient/{a}"})
    answer = _send(two, "POST", "Condition", json_body=sneaky)
    assert answer.status_code == 403, answer.text[:300]
    get_b = f"urn:uuid:{uuid.uuid4()}"
    for entries in (
        [
            {"fullUrl": f"Patient?_id={b}", "request": {"method": "GET", "url": f"Patient/{a}"}},
            {
                "resource": {**condition(f"Patient?_id={b}"), "patient": {"reference": f"Patient/{a}"}},
                "request": {"method": "POST", "url": "Condition"},
            },
        ],
        [
            {"fullUrl": get_b, "request": {"method": "GET", "url": f"Patient?_id={b}"}},
            {
                "resource": {**condition(get_b), "patient": {"reference": f"Patient/{a}"}},
                "request": {"method": "POST", "url": "Condition"},
            },
        ],
    ):
        answer = _send(two, "POST", "", json_body={"resourceType": "Bundle", "type": "transaction", "entry": entries})
        assert answer.status_code in (400, 403), answer.text[:300]
    assert _count(two, "Condition", b) == before


@pytest.mark.server
def test_has_through_a_non_patient_type_is_no_oracle(two):
    answer = _send(two, "GET", "Organization", params={"_has:Patient:organization:_id": two["b"]})
    assert answer.status_code == 403 and answer.json()["resourceType"] == "OperationOutcome"
    _assert_nothing_of_b(two, answer)


@pytest.mark.server
def test_the_plugins_own_conditional_create_still_works_and_is_idempotent(two):
    a = two["a"]
    key = f"identifier=urn:atk|{uuid.uuid4().hex}&subject=Patient/{a}"
    body = condition(f"Patient/{a}", identifier=[{"system": "urn:atk", "value": key.split("|")[1].split("&")[0]}])
    first = _send(
        two, "POST", "Condition", json_body=body, headers={"If-None-Exist": key, "Prefer": "return=representation"}
    )
    again = _send(
        two, "POST", "Condition", json_body=body, headers={"If-None-Exist": key, "Prefer": "return=representation"}
    )
    assert (first.status_code, again.status_code) == (201, 200), again.text[:300]
    assert again.json()["id"] == first.json()["id"]


# ------------------------------------------------------------------ bodies: token and size before reading


@pytest.fixture(scope="module")
def small():
    """An EHR with a 64 kB body cap and no FHIR server behind it: nothing here may reach one."""
    with running_ehr(UNREACHABLE, auto_approve=True, max_request_body=64 * 1024) as ehr:
        ehr.clients.register(app_client())
        yield ehr


def _raw_post(base: str, headers: dict[str, str], body: bytes = b"", timeout: float = 5.0) -> int:
    """POST with a hand-written request; the status line, or 0 when the server said nothing in time."""
    parts = urlsplit(base)
    lines = [
        f"POST {parts.path}/Condition HTTP/1.1",
        f"Host: {parts.netloc}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
        "",
        "",
    ]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        try:
            status = sock.recv(64).split(b" ")[1]
        except (TimeoutError, IndexError):
            return 0
    return int(status)


def test_an_unauthenticated_huge_body_is_refused_before_it_is_read(small):
    # 300 MB announced, not one byte sent: the answer must come from the headers alone.
    assert _raw_post(small.fhir_base_url, {"Content-Length": str(300 * 1024 * 1024), "Content-Type": FHIR_JSON}) == 401


def test_an_authenticated_body_past_the_cap_is_refused(small):
    token = sign_in(small, patient="p-1", scope=APP_WRITE_SCOPES)["access_token"]
    auth = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    assert _raw_post(small.fhir_base_url, {**auth, "Content-Length": str(300 * 1024 * 1024)}) == 413

    def chunks():
        for _ in range(64):
            yield b" " * 16384  # 1 MB, no Content-Length: read in chunks and cut at the cap

    answer = requests.post(small.fhir_base_url + "/Condition", data=chunks(), headers=auth, timeout=30)
    assert answer.status_code == 413 and answer.json()["resourceType"] == "OperationOutcome"
