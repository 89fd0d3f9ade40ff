"""Keep attacking in CI: schemathesis over the SMART app's OpenAPI, in process (issue 11).

Every operation the app publishes gets generated requests — valid ones,
and malformed ones (negative mode) — twice: without a session (the surface
anyone on the network reaches) and inside a launched session against a mocked
EHR (``FakeEhr`` behind ``responses``; schemathesis talks to the app through
its ASGI transport, which ``responses`` does not intercept).  The checks: no
answer is a 5xx, and every answer the schema describes matches it.  The run
is bounded by ``max_examples`` (80 per operation and session kind, about 800 requests) to stay
well under a minute.
"""

from __future__ import annotations

import tempfile
from urllib.parse import urlsplit

import pytest
import responses
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import response_schema_conformance
from test_check_cases import CASES

from sandbox.testing import FakeEhr
from smart_launch import MemoryStore, Settings, create_app
from smart_launch._app import COOKIE

# hypothesis keeps caches in ./.hypothesis; a test run must leave the work tree as it found it
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))

ISS = "http://ehr.test/fhir"
CHECKS = [not_a_server_error, response_schema_conformance]
# derandomize: the same requests every run (a failure reproduces); database=None: nothing written to disk
EXAMPLES = settings(
    max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

_mock = responses.RequestsMock(assert_all_requests_are_fired=False)
_case = next(c for c in CASES if c.key == "missing-treatment-plan")
app = create_app(
    Settings(
        allowed_issuers=(ISS,), session_store="memory", client_id="app", redirect_uri="http://127.0.0.1:1/callback"
    ),
    store=MemoryStore(),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def ehr():
    """The mocked EHR, live for the module (the app's own outgoing calls go to it)."""
    _mock.start()
    try:
        yield FakeEhr(_mock, _case.resources)
    finally:
        _mock.stop()
        _mock.reset()


@pytest.fixture(scope="module")
def session_cookie(ehr) -> dict[str, str]:
    """A launched session for the synthetic patient, as the cookie the browser would hold."""
    with get_client(app) as browser:  # schemathesis's own in-process transport, as the cases use
        started = browser.get("/launch", params={"iss": ISS, "launch": "L1"}, allow_redirects=False)
        assert started.status_code == 302, started.text[:300]
        back = ehr.authorize(started.headers["location"], patient=_case.patient_id)
        done = browser.get("/callback?" + urlsplit(back).query, allow_redirects=False)
        assert done.status_code == 303, done.text[:300]
        cookie = {COOKIE: browser.cookies[COOKIE]}
        assert browser.get("/api/report", cookies=cookie).status_code == 200  # the session is live
        return cookie


@schema.parametrize()
@EXAMPLES
def test_no_5xx_and_no_schema_violation_without_a_session(case, ehr):
    case.call_and_validate(checks=CHECKS)


@schema.parametrize()
@EXAMPLES
def test_no_5xx_and_no_schema_violation_in_a_launched_session(case, session_cookie):
    case.call_and_validate(checks=CHECKS, cookies=session_cookie)
