"""Security properties of the SMART app, each asserting the refusal.

Against a mocked EHR (``responses``) so every branch shows on demand; the same
properties against the real sandbox EHR + HAPI are in test_smart_e2e.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from fhir_plugin.synthetic import generate_cases
from sandbox.testing import FakeEhr, ManualClock, live_server
from smart_launch import COOKIE, MemoryStore, Settings, create_app

ISS = "http://ehr.test/fhir"
TODAY = dt.date.today()


def _case(key: str):
    return next(c for c in generate_cases(TODAY) if c.key == key)


class Recorder(requests.Session):
    """A browser that keeps every response it saw (bodies and headers are scanned for secrets)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[requests.Response] = []

    def request(self, *args, **kwargs):  # type: ignore[override]
        response = super().request(*args, **kwargs)
        self.seen.extend(response.history + [response])
        return response


@contextlib.contextmanager
def _environment(**extra):
    settings = Settings(
        **{
            "allowed_issuers": (ISS,),
            "session_store": "memory",
            "client_id": "app",
            "redirect_uri": "http://127.0.0.1:1/callback",
            **extra,
        }
    )
    store = MemoryStore()
    clock = ManualClock()  # the app's and the fake EHR's time: a test moves it forward to expire tokens
    with (
        live_server(create_app(settings, store=store, clock=clock)) as server,
        responses.RequestsMock(assert_all_requests_are_fired=False) as rsps,
    ):
        rsps.add_passthru(server.url)
        yield {"base": server.url, "rsps": rsps, "store": store, "settings": settings, "clock": clock}


@pytest.fixture
def env():
    """The app on a free port, with a mocked EHR behind ``responses`` (the app's own URL passes through)."""
    with _environment() as environment:
        yield environment


def _outbound(rsps, base: str) -> list[str]:
    return [c.request.url for c in rsps.calls if not c.request.url.startswith(base)]


def _start(env, browser, patient_case, launch="L1"):
    started = browser.get(f"{env['base']}/launch", params={"iss": ISS, "launch": launch}, allow_redirects=False)
    assert started.status_code == 302, started.text
    return started.headers["Location"]


def _callback(env, ehr_redirect: str) -> str:
    return env["base"] + "/callback?" + urlsplit(ehr_redirect).query


def _sign_in(env, ehr, browser, case) -> requests.Response:
    back = ehr.authorize(_start(env, browser, case), patient=case.patient_id)
    return browser.get(_callback(env, back))


# ---------------------------------------------------------------- issuer allow-list


@pytest.mark.parametrize(
    "iss",
    [
        "http://evil.test/fhir",
        "http://ehr.test/fhir/../evil",
        "http://ehr.test/fhirX",
        "http://ehr.test.evil.test/fhir",
        "",
        "javascript:alert(1)",
    ],
)
def test_an_unknown_iss_is_refused_before_any_outbound_request_or_redirect(env, iss):
    browser = requests.Session()
    page = browser.get(f"{env['base']}/launch", params={"iss": iss, "launch": "x"}, allow_redirects=False)
    assert page.status_code == 400
    assert "Location" not in page.headers and "set-cookie" not in {k.lower() for k in page.headers}
    assert "not configured to trust" in page.text
    assert _outbound(env["rsps"], env["base"]) == []  # not even discovery was attempted


# ---------------------------------------------------------------- state


def test_missing_or_wrong_state_is_refused(env):
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser = requests.Session()
    back = ehr.authorize(_start(env, browser, case), patient=case.patient_id)
    code = parse_qs(urlsplit(back).query)["code"][0]
    no_state = browser.get(f"{env['base']}/callback", params={"code": code})
    wrong = browser.get(f"{env['base']}/callback", params={"code": code, "state": "x" * 43})
    assert no_state.status_code == 400 and "no state" in no_state.text
    assert wrong.status_code == 400 and "does not belong to a launch" in wrong.text
    assert ehr.token_requests == []  # refused before the code was spent
    assert browser.get(_callback(env, back)).status_code == 200  # the real answer still works


def test_a_callback_in_another_browser_is_refused(env):
    """The state is bound to the session that started the launch (login CSRF)."""
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    victim, attacker = requests.Session(), requests.Session()
    _start(env, victim, case)
    back = ehr.authorize(_start(env, attacker, case), patient=case.patient_id)
    page = victim.get(_callback(env, back))
    assert page.status_code == 400 and ehr.token_requests == []


def test_a_callback_without_any_cookie_says_the_browser_dropped_it(env, caplog):
    """Issue 13: a cross-site frame whose browser blocks the cookie gets a sentence, the integrator the log."""
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    back = ehr.authorize(_start(env, requests.Session(), case), patient=case.patient_id)
    with caplog.at_level("WARNING", logger="smart_launch.app"):
        page = requests.get(_callback(env, back))  # a browser that kept no cookie
    assert page.status_code == 400 and "did not keep this app" in page.text
    assert "SameSite" not in page.text and "SMART_" not in page.text  # integrator details stay in the log
    assert "SameSite=None; Secure; Partitioned" in caplog.text
    assert ehr.token_requests == []


def test_a_new_launch_keeps_the_first_launchs_own_session(env):
    """Issue 13 (one session per launch): a second launch in the browser no longer cancels the first."""
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser = requests.Session()
    first = ehr.authorize(_start(env, browser, case), patient=case.patient_id)
    old_sid = browser.cookies[COOKIE]
    second = ehr.authorize(_start(env, browser, case, launch="L2"), patient=case.patient_id)
    assert browser.cookies[COOKIE] != old_sid and env["store"].get(f"sid:{old_sid}") is not None
    assert browser.get(_callback(env, first)).status_code == 200
    assert browser.get(_callback(env, second)).status_code == 200
    assert browser.get(_callback(env, first)).status_code == 400  # each answer still spends once


def test_a_browser_keeps_at_most_twelve_launches_open(env):
    """One cookie per launch, but not without end: the oldest launches are signed out (issue 13)."""
    case = _case("complete")
    FakeEhr(env["rsps"], case.resources)
    browser = requests.Session()
    for i in range(15):
        _start(env, browser, case, launch=f"L{i}")
    launch_cookies = [c for c in browser.cookies if c.name.startswith(COOKIE + "_")]
    assert len(launch_cookies) == 12
    assert len([k for k in env["store"].keys() if k.startswith("sid:")]) == 12


def test_a_replayed_callback_is_refused_and_the_ehr_refuses_the_code_again(env):
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser = requests.Session()
    back = ehr.authorize(_start(env, browser, case), patient=case.patient_id)
    pending = next(v for k in env["store"].keys() if k.startswith("state:") for v in [env["store"].get(k)])
    assert browser.get(_callback(env, back)).status_code == 200
    again = browser.get(_callback(env, back))
    assert again.status_code == 400 and ("already used" in again.text or "does not belong" in again.text)
    assert len(ehr.token_requests) == 1  # the app did not even try the code twice
    code = parse_qs(urlsplit(back).query)["code"][0]
    reuse = requests.post(
        "http://ehr.test/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": pending["code_verifier"],
            "redirect_uri": env["settings"].redirect_uri,
            "client_id": "app",
        },
    )
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"


# ---------------------------------------------------------------- session bound to its launch


def test_a_session_from_launch_a_cannot_see_patient_b(env):
    a, b = _case("complete"), _case("missing-severity")
    ehr = FakeEhr(env["rsps"], a.resources + b.resources)
    browser_a, browser_b = requests.Session(), requests.Session()
    _sign_in(env, ehr, browser_a, a)
    _sign_in(env, ehr, browser_b, b)
    assert browser_a.get(env["base"] + "/api/report").json()["patient"] == f"Patient/{a.patient_id}"
    assert browser_b.get(env["base"] + "/api/report").json()["patient"] == f"Patient/{b.patient_id}"
    # no route takes a patient from the browser; the viewer refuses another patient's resource
    assert browser_a.get(f"{env['base']}/resource/Patient/{b.patient_id}").status_code == 403
    other_obs = next(r for r in b.resources if r["resourceType"] == "Observation")
    assert browser_a.get(f"{env['base']}/resource/Observation/{other_obs['id']}").status_code == 403
    own_obs = next(r for r in a.resources if r["resourceType"] == "Observation")
    assert browser_a.get(f"{env['base']}/resource/Observation/{own_obs['id']}").status_code == 200
    # query parameters naming another patient change nothing
    assert (
        browser_a.get(env["base"] + "/api/report", params={"patient": b.patient_id}).json()["patient"]
        == f"Patient/{a.patient_id}"
    )
    # B's callback delivered to A's browser is refused (the state belongs to B's session)
    back = ehr.authorize(_start(env, browser_b, b), patient=b.patient_id)
    assert browser_a.get(_callback(env, back)).status_code == 400
    assert browser_a.get(env["base"] + "/api/report").json()["patient"] == f"Patient/{a.patient_id}"


def test_no_cookie_or_a_forged_cookie_sees_nothing(env):
    for cookies in ({}, {COOKIE: "forged-session-id"}):
        for path in ("/review", "/api/report", "/api/drafts", "/resource/Patient/fp-complete"):
            assert requests.get(env["base"] + path, cookies=cookies).status_code == 401
        assert (
            requests.post(env["base"] + "/api/write", cookies=cookies, headers={"X-CSRF-Token": "x"}).status_code == 401
        )


# ---------------------------------------------------------------- writing


def test_write_without_write_scopes_is_403_and_nothing_is_written(env):
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources, read_only=True)
    browser = requests.Session()
    _sign_in(env, ehr, browser, case)
    page = browser.get(env["base"] + "/review")
    assert 'id="read-only"' in page.text and 'id="write-button"' not in page.text
    csrf = browser.get(env["base"] + "/api/session").json()["csrf"]
    form = browser.post(env["base"] + "/write", data={"csrf": csrf, "confirmed": "yes"})
    api = browser.post(env["base"] + "/api/write", headers={"X-CSRF-Token": csrf})
    assert form.status_code == 403 and "did not grant" in form.text
    assert api.status_code == 403 and "Condition" in api.json()["error"]
    assert ehr.transactions == [] and ehr.created == {}


def test_write_needs_the_csrf_token_of_this_session(env):
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser, other = requests.Session(), requests.Session()
    _sign_in(env, ehr, browser, case)
    _sign_in(env, ehr, other, case)
    other_csrf = other.get(env["base"] + "/api/session").json()["csrf"]
    assert browser.post(env["base"] + "/write", data={"confirmed": "yes"}).status_code == 403
    assert browser.post(env["base"] + "/write", data={"csrf": other_csrf, "confirmed": "yes"}).status_code == 403
    assert browser.post(env["base"] + "/api/write").status_code == 403
    assert browser.post(env["base"] + "/api/write", headers={"X-CSRF-Token": other_csrf}).status_code == 403
    assert ehr.transactions == []


def test_write_asks_for_confirmation_then_writes_once(env):
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser = requests.Session()
    _sign_in(env, ehr, browser, case)
    csrf = browser.get(env["base"] + "/api/session").json()["csrf"]
    confirm = browser.post(env["base"] + "/write", data={"csrf": csrf})
    assert confirm.status_code == 200 and 'id="confirm-write"' in confirm.text and ehr.transactions == []
    written = browser.post(env["base"] + "/write", data={"csrf": csrf, "confirmed": "yes"})
    assert written.status_code == 200 and "Drafts written" in written.text and len(ehr.transactions) == 1
    again = browser.post(env["base"] + "/api/write", headers={"X-CSRF-Token": csrf}).json()
    assert again["created"] == [] and len(again["existing"]) == len(ehr.transactions[0]["entry"])


# ---------------------------------------------------------------- secrets never leave the server


def test_no_response_header_body_or_log_line_carries_a_token(env, caplog):
    caplog.set_level(logging.DEBUG)
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources, expires_in=2, clock=env["clock"])
    browser = Recorder()
    back = ehr.authorize(_start(env, browser, case), patient=case.patient_id)
    pending = [env["store"].get(k) for k in env["store"].keys() if k.startswith("state:")][0]
    browser.get(_callback(env, back))
    csrf = browser.get(env["base"] + "/api/session").json()["csrf"]
    for path in ("/review", "/api/report", "/api/drafts", "/openapi.json", "/"):
        assert browser.get(env["base"] + path).status_code == 200
    obs = next(r for r in case.resources if r["resourceType"] == "Observation")
    browser.get(f"{env['base']}/resource/Observation/{obs['id']}")
    browser.post(env["base"] + "/write", data={"csrf": csrf})
    browser.post(env["base"] + "/write", data={"csrf": csrf, "confirmed": "yes"})
    env["clock"].advance(2.2)  # past expiry: the next call refreshes, and the new tokens must not leak either
    browser.post(env["base"] + "/api/write", headers={"X-CSRF-Token": csrf})
    browser.get(env["base"] + "/callback", params={"code": "c", "state": "s"})
    assert any(r["grant_type"] == "refresh_token" for r in ehr.token_requests)
    code = parse_qs(urlsplit(back).query)["code"][0]
    secrets = ehr.issued + [code, pending["code_verifier"]]
    assert len(ehr.issued) >= 4 and len(browser.seen) >= 10
    for response in browser.seen:
        blob = response.text + "\n".join(f"{k}: {v}" for k, v in response.headers.items()) + response.url
        for secret in secrets:
            if secret == code and "/callback?" in response.url:
                continue  # the EHR put the code in the redirect URL itself (single-use, already spent)
            assert secret not in blob, f"a secret leaked into {response.url}"
    # the server side's loggers (the test browser's own urllib3 debug lines show URLs it was sent to)
    logged = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.split(".")[0] in ("smart_launch", "fhir_plugin", "uvicorn", "authlib", "fastapi", "starlette")
    )
    assert "callback: signed in" in logged
    for secret in secrets + [browser.cookies[COOKIE]]:
        assert secret not in logged


def test_an_expired_access_token_is_refreshed_transparently_and_stored(env):
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources, expires_in=2, clock=env["clock"])
    browser = requests.Session()
    _sign_in(env, ehr, browser, case)
    sid = browser.cookies[COOKIE]
    before = env["store"].get(f"sid:{sid}")["token"]["access_token"]
    env["clock"].advance(2.2)
    assert browser.get(env["base"] + "/api/report").status_code == 200
    after = env["store"].get(f"sid:{sid}")["token"]["access_token"]
    assert after != before and after in ehr.access_tokens
    assert [r["grant_type"] for r in ehr.token_requests].count("refresh_token") >= 1


def test_an_expired_token_that_cannot_be_refreshed_asks_for_a_new_launch(env):
    case = _case("missing-treatment-plan")
    ehr = FakeEhr(env["rsps"], case.resources, expires_in=2, clock=env["clock"])
    browser = requests.Session()
    _sign_in(env, ehr, browser, case)
    ehr.refresh_tokens.clear()  # the EHR revoked it
    env["clock"].advance(2.2)
    page = browser.get(env["base"] + "/review")
    assert page.status_code == 401 and "launch the app again" in page.text and "Traceback" not in page.text


# ---------------------------------------------------------------- headers and cookies


def test_security_headers_on_every_page_and_the_cookie_flags(env):
    case = _case("complete")
    ehr = FakeEhr(env["rsps"], case.resources)
    browser = Recorder()
    started = browser.get(f"{env['base']}/launch", params={"iss": ISS, "launch": "L"}, allow_redirects=False)
    cookie = started.headers["set-cookie"]
    # issue 13: on loopback (a secure context, as over https) the cookie is the one a cross-site EHR frame keeps
    assert "HttpOnly" in cookie and "SameSite=None" in cookie and "Secure" in cookie and "Partitioned" in cookie
    browser.get(_callback(env, ehr.authorize(started.headers["Location"], patient=case.patient_id)))
    for path in ("/review", "/api/report", "/", "/static/app.css", "/launch?iss=http://evil/fhir", "/nowhere"):
        browser.get(env["base"] + path)
    for response in browser.seen:
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors http://ehr.test" in csp
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        if "/static/" not in response.url:
            assert response.headers["Cache-Control"] == "no-store"
        if response.headers.get("content-type", "").startswith("text/html"):
            assert "<script>" not in response.text and " onclick=" not in response.text  # no inline script


def test_the_cookie_is_secure_when_the_app_is_served_over_https():
    with _environment(
        redirect_uri="https://app.example.org/callback", allowed_frame_ancestors=("https://ehr.example.org",)
    ) as env:
        FakeEhr(env["rsps"], _case("complete").resources)
        started = requests.get(f"{env['base']}/launch", params={"iss": ISS, "launch": "L"}, allow_redirects=False)
        assert "Secure" in started.headers["set-cookie"]
        assert "frame-ancestors https://ehr.example.org" in started.headers["Content-Security-Policy"]


# ---------------------------------------------------------------- the same against the real sandbox EHR + HAPI


@pytest.fixture(scope="module")
def sandbox_patients(fhir_base_url):
    """Two synthetic patients under fresh ids, loaded into HAPI: (patient id, resources)."""
    from sandbox.testing import load_fresh_case

    out = []
    for key in ("missing-treatment-plan", "missing-severity"):
        case = load_fresh_case(fhir_base_url, _case(key))
        out.append((case.patient_id, case.resources))
    return out


def _hapi_drafts(base: str, patient: str) -> int:
    total = 0
    for rtype in ("Condition", "CarePlan", "Goal"):
        total += (
            requests.get(
                f"{base}/{rtype}",
                params={"patient": patient, "_summary": "count", "_tag": "urn:fhir-plugin:tag|machine-drafted"},
                headers={"Cache-Control": "no-cache"},
                timeout=30,
            )
            .json()
            .get("total", 0)
        )
    return total


def _walk_to_callback(stack, browser, patient):
    """EHR launch -> app /launch -> EHR /authorize (auto-approve): stop at the redirect back to the app."""
    url = stack.launch_url(patient)
    for _ in range(4):
        response = browser.get(url, allow_redirects=False)
        assert response.status_code in (302, 303), response.text[:300]
        url = response.headers["Location"]
        if url.startswith(stack.app_url + "/callback"):
            return url
    raise AssertionError("the launch never came back to the app")


@pytest.mark.server
def test_sandbox_replayed_code_is_refused_by_the_app_and_by_the_ehr(fhir_base_url, sandbox_patients):
    from sandbox.testing import sandbox_stack

    pid, _ = sandbox_patients[0]
    store = MemoryStore()
    with sandbox_stack(fhir_base_url, store=store) as stack:
        browser = Recorder()
        callback = _walk_to_callback(stack, browser, pid)
        pending = [store.get(k) for k in store.keys() if k.startswith("state:")][0]
        assert browser.get(callback).url.startswith(stack.app_url + "/review?launch=")
        again = browser.get(callback, allow_redirects=False)
        assert again.status_code == 400 and ("already used" in again.text or "does not belong" in again.text)
        code = parse_qs(urlsplit(callback).query)["code"][0]
        reuse = requests.post(
            stack.ehr.base_url + "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": pending["code_verifier"],
                "redirect_uri": f"{stack.app_url}/callback",
                "client_id": stack.client_id,
            },
        )
        assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"


@pytest.mark.server
def test_sandbox_a_launch_for_a_cannot_reach_patient_b(fhir_base_url, sandbox_patients):
    from sandbox.testing import sandbox_stack

    (a, _), (b, b_resources) = sandbox_patients
    store = MemoryStore()
    with sandbox_stack(fhir_base_url, store=store) as stack:
        browser = requests.Session()
        browser.get(stack.launch_url(a))
        assert browser.get(stack.app_url + "/api/report").json()["patient"] == f"Patient/{a}"
        # the app refuses, whatever the EHR would say
        assert browser.get(f"{stack.app_url}/resource/Patient/{b}").status_code == 403
        obs = next(r for r in b_resources if r["resourceType"] == "Observation")
        assert browser.get(f"{stack.app_url}/resource/Observation/{obs['id']}").status_code == 403
        # and the token of launch A, used directly on patient B, is refused by the EHR's proxy
        token = store.get(f"sid:{browser.cookies[COOKIE]}")["token"]["access_token"]
        for path in (f"Patient/{b}", f"Observation/{obs['id']}", f"Condition?patient={b}"):
            answer = requests.get(f"{stack.iss}/{path}", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 403, path


@pytest.mark.server
def test_sandbox_write_without_write_scopes_is_403_and_hapi_holds_nothing(fhir_base_url, sandbox_patients):
    from sandbox.testing import sandbox_stack

    pid, _ = sandbox_patients[1]
    with sandbox_stack(fhir_base_url, read_only=True) as stack:
        browser = requests.Session()
        page = browser.get(stack.launch_url(pid))
        assert page.url.startswith(stack.app_url + "/review?launch=") and 'id="read-only"' in page.text
        assert 'id="write-button"' not in page.text
        session = browser.get(stack.app_url + "/api/session").json()
        assert session["write_allowed"] is False and not any(s.endswith(".c") for s in session["scopes"])
        assert (
            browser.post(stack.app_url + "/write", data={"csrf": session["csrf"], "confirmed": "yes"}).status_code
            == 403
        )
        assert browser.post(stack.app_url + "/api/write", headers={"X-CSRF-Token": session["csrf"]}).status_code == 403
    assert _hapi_drafts(fhir_base_url, pid) == 0


@pytest.mark.server
def test_sandbox_short_lived_token_is_refreshed_and_no_secret_reaches_the_browser(fhir_base_url, sandbox_patients):
    from sandbox.testing import sandbox_stack

    pid, _ = sandbox_patients[0]
    store = MemoryStore()
    clock = ManualClock()
    with sandbox_stack(fhir_base_url, store=store, access_token_lifetime=3, refresh_leeway=1, clock=clock) as stack:
        browser = Recorder()
        browser.get(stack.launch_url(pid))
        first = store.get(f"sid:{browser.cookies[COOKIE]}")["token"]
        assert first.get("refresh_token"), "the EHR issued no refresh token (online_access)"
        clock.advance(3.2)  # past the app's view of the expiry: the next call refreshes
        assert browser.get(stack.app_url + "/api/report").status_code == 200
        second = store.get(f"sid:{browser.cookies[COOKIE]}")["token"]
        assert second["access_token"] != first["access_token"]
        assert browser.get(stack.app_url + "/review").status_code == 200
        for response in browser.seen:
            blob = response.text + str(dict(response.headers)) + response.url
            for secret in (
                first["access_token"],
                first["refresh_token"],
                second["access_token"],
                second["refresh_token"],
            ):
                assert secret not in blob, f"a token reached the browser in {response.url}"
