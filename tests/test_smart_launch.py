"""The SMART launch steps (smart_launch._launch), the session store, and the app's launch flow
against a mocked EHR (``responses``), for the branches a real server won't show on demand:
a token endpoint that is down, malformed discovery, the CapabilityStatement fallback, v1 scopes."""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from fhir_plugin import LaunchError, UsageError
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import FakeEhr, live_server
from smart_launch import (
    DiscoveryCache,
    MemoryStore,
    Settings,
    SmartConfig,
    SqliteStore,
    build_authorize_url,
    build_token_request,
    can_write_drafts,
    choose_scopes,
    create_app,
    discover,
    missing_write_scopes,
    parse_launch_context,
    send_token_request,
)
from smart_launch._launch import SCOPES_V1, SCOPES_V2, config_from_capability_statement

ISS = "http://ehr.test/fhir"
TODAY = dt.date.today()
CONFIG = {
    "authorization_endpoint": "http://ehr.test/authorize",
    "token_endpoint": "http://ehr.test/token",
    "capabilities": ["launch-ehr", "permission-v2"],
    "code_challenge_methods_supported": ["S256"],
}


def _case(key: str):
    return next(c for c in generate_cases(TODAY) if c.key == key)


# ---------------------------------------------------------------- discovery


@responses.activate
def test_discover_reads_the_well_known_document_and_caches_it():
    responses.get(f"{ISS}/.well-known/smart-configuration", json=CONFIG)
    cache = DiscoveryCache()
    config = discover(ISS + "/", requests.Session(), cache=cache)
    assert (config.iss, config.token_endpoint, config.source) == (ISS, "http://ehr.test/token", "well-known")
    assert config.supports("permission-v2")
    assert discover(ISS, requests.Session(), cache=cache) is config
    assert len(responses.calls) == 1  # the second call came from the cache


@responses.activate
def test_discover_falls_back_to_the_capability_statement():
    responses.get(f"{ISS}/.well-known/smart-configuration", status=404)
    responses.get(
        f"{ISS}/metadata",
        json={
            "resourceType": "CapabilityStatement",
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "extension": [
                            {
                                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                "extension": [
                                    {"url": "authorize", "valueUri": "http://ehr.test/auth2"},
                                    {"url": "token", "valueUri": "http://ehr.test/token2"},
                                ],
                            }
                        ]
                    },
                }
            ],
        },
    )
    config = discover(ISS, requests.Session(), cache=None)
    assert (config.authorization_endpoint, config.token_endpoint) == ("http://ehr.test/auth2", "http://ehr.test/token2")
    assert config.source == "capability-statement"
    # a server found only this way predates SMART 2: v1 scopes
    assert choose_scopes(config) == SCOPES_V1


@pytest.mark.parametrize(
    "body, words",
    [
        ("not json at all", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"authorization_endpoint": "http://ehr.test/authorize"}, "token endpoint"),
        ({**CONFIG, "token_endpoint": "/relative/token"}, "not an absolute"),
        ({**CONFIG, "code_challenge_methods_supported": ["plain"]}, "S256"),
    ],
)
@responses.activate
def test_a_malformed_smart_configuration_is_refused_clearly(body, words):
    if isinstance(body, str):
        responses.get(f"{ISS}/.well-known/smart-configuration", body=body)
    else:
        responses.get(f"{ISS}/.well-known/smart-configuration", json=body)
    with pytest.raises(LaunchError, match=words):
        discover(ISS, requests.Session(), cache=None)


def test_https_issuer_endpoints_must_be_https():
    with pytest.raises(LaunchError, match="plain http"):
        from smart_launch._launch import config_from_well_known

        config_from_well_known("https://ehr.test/fhir", CONFIG)


def test_a_capability_statement_without_oauth_uris_is_refused():
    with pytest.raises(LaunchError, match="no SMART endpoints"):
        config_from_capability_statement(ISS, {"resourceType": "CapabilityStatement", "rest": [{}]})


@responses.activate
def test_discover_when_the_ehr_is_down():
    responses.get(f"{ISS}/.well-known/smart-configuration", body=requests.ConnectionError("refused"))
    with pytest.raises(LaunchError, match="could not be reached"):
        discover(ISS, requests.Session(), cache=None)


# ---------------------------------------------------------------- scopes


def test_scopes_v2_by_default_and_v1_when_only_v1_is_advertised():
    v2 = SmartConfig(ISS, "http://a", "http://t", frozenset({"permission-v2", "permission-v1"}))
    v1 = SmartConfig(ISS, "http://a", "http://t", frozenset({"permission-v1"}))
    assert choose_scopes(v2) == SCOPES_V2
    assert "patient/Condition.rs" in SCOPES_V2.split() and "patient/Provenance.c" in SCOPES_V2.split()
    assert choose_scopes(v1) == SCOPES_V1
    assert "patient/*.read" in SCOPES_V1.split() and "patient/Goal.write" in SCOPES_V1.split()
    standalone = choose_scopes(v2, standalone=True).split()
    assert "launch/patient" in standalone and "launch" not in standalone
    assert choose_scopes(v2, override="launch/patient openid patient/*.rs").split()[0] == "launch"


@pytest.mark.parametrize(
    "scopes, allowed, missing",
    [
        (SCOPES_V2, True, []),
        (SCOPES_V1, True, []),
        ("launch patient/*.cruds", True, []),
        ("launch patient/*.read", False, ["Condition", "Goal", "CarePlan", "Provenance"]),
        ("patient/Condition.rs patient/Condition.c patient/CarePlan.c patient/Goal.c", False, ["Provenance"]),
        (
            "patient/Condition.c?category=problem-list-item patient/CarePlan.c patient/Goal.c patient/Provenance.c",
            False,
            ["Condition"],
        ),
    ],
)
def test_write_permission_is_read_from_the_granted_scopes(scopes, allowed, missing):
    assert can_write_drafts(scopes.split()) is allowed
    assert missing_write_scopes(scopes.split()) == missing


# ---------------------------------------------------------------- authorize and token


def test_the_authorize_url_carries_pkce_s256_state_aud_and_launch():
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    config = SmartConfig(ISS, "http://ehr.test/authorize?tenant=7", "http://ehr.test/token")
    first = build_authorize_url(
        config, client_id="app", redirect_uri="http://app/callback", scope="launch openid", launch="L-123"
    )
    second = build_authorize_url(config, client_id="app", redirect_uri="http://app/callback", scope="launch openid")
    q = {k: v[0] for k, v in parse_qs(urlsplit(first.url).query).items()}
    assert q["response_type"] == "code" and q["client_id"] == "app" and q["tenant"] == "7"
    assert q["aud"] == ISS and q["launch"] == "L-123" and q["state"] == first.state
    assert q["code_challenge_method"] == "S256"
    assert q["code_challenge"] == create_s256_code_challenge(first.code_verifier)
    assert first.code_verifier not in first.url
    assert len(first.state) >= 32 and first.state != second.state and first.code_verifier != second.code_verifier
    assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", first.code_verifier)
    assert "launch" not in parse_qs(urlsplit(second.url).query)


def test_the_token_request_is_built_without_sending_it_and_hides_its_secrets():
    config = SmartConfig(ISS, "http://ehr.test/authorize", "http://ehr.test/token")
    req = build_token_request(
        config, code="CODE-1", redirect_uri="http://app/callback", code_verifier="V" * 50, client_id="app"
    )
    assert req.url == "http://ehr.test/token"
    assert req.data == {
        "grant_type": "authorization_code",
        "code": "CODE-1",
        "redirect_uri": "http://app/callback",
        "code_verifier": "V" * 50,
        "client_id": "app",
    }
    assert "CODE-1" not in repr(req) and "VVVV" not in repr(req)


@responses.activate
def test_send_token_request_success_and_refusals():
    req = build_token_request(
        SmartConfig(ISS, "http://ehr.test/a", "http://ehr.test/token"),
        code="c",
        redirect_uri="http://app/cb",
        code_verifier="v" * 43,
        client_id="app",
    )
    responses.post(
        "http://ehr.test/token",
        json={"access_token": "AT", "token_type": "bearer", "expires_in": 60, "patient": "p1", "scope": "launch"},
    )
    token = send_token_request(req, requests.Session())
    assert token["access_token"] == "AT" and token["expires_at"] > 0
    responses.replace(
        responses.POST,
        "http://ehr.test/token",
        status=400,
        json={"error": "invalid_grant", "error_description": "code c was used, AT"},
    )
    with pytest.raises(LaunchError, match="invalid_grant") as info:
        send_token_request(req, requests.Session())
    assert "AT" not in str(info.value) and "was used" not in str(info.value)
    responses.replace(responses.POST, "http://ehr.test/token", json={"access_token": "AT", "token_type": "mac"})
    with pytest.raises(LaunchError, match="not a bearer"):
        send_token_request(req, requests.Session())
    responses.replace(responses.POST, "http://ehr.test/token", body=requests.ConnectionError("down"))
    with pytest.raises(LaunchError, match="could not be reached"):
        send_token_request(req, requests.Session())


def test_the_launch_context_is_parsed():
    ctx = parse_launch_context(
        {
            "patient": "p-1",
            "need_patient_banner": True,
            "smart_style_url": "http://e/s.json",
            "fhirContext": [{"reference": "Encounter/e-9"}, {"reference": "Coverage/x"}, "junk"],
        }
    )
    assert (ctx.patient, ctx.encounter, ctx.need_patient_banner) == ("p-1", "e-9", True)
    assert ctx.smart_style_url == "http://e/s.json" and len(ctx.fhir_context) == 2
    assert parse_launch_context({"patient": "Patient/p-2", "encounter": "e-1"}).patient == "p-2"
    assert parse_launch_context({"patient": "p", "need_patient_banner": "false"}).need_patient_banner is False
    with pytest.raises(LaunchError, match="not a FHIR id"):
        parse_launch_context({"patient": "../../admin"})


# ---------------------------------------------------------------- settings and the store


def test_settings_allow_list_is_exact_after_normalising():
    s = Settings(allowed_issuers=("HTTP://EHR.test/fhir/",), session_store="memory")
    assert s.allows("http://ehr.test/fhir") and s.allows("http://ehr.test/fhir/")
    assert (
        not s.allows("http://ehr.test/fhir2")
        and not s.allows("http://ehr.test")
        and not s.allows("http://ehr.test.evil/fhir")
        and not s.allows("javascript:alert(1)")
    )
    assert s.frame_ancestors() == ("http://ehr.test",)
    assert Settings.from_env({"SMART_ALLOWED_ISSUERS": "http://a/fhir, http://b/fhir"}).issuers == {
        "http://a/fhir",
        "http://b/fhir",
    }
    with pytest.raises(UsageError):
        Settings(allowed_issuers=("ftp://x",))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_store_gets_sets_unsets_and_expires(kind, tmp_path):
    now = [1000.0]
    store = (
        MemoryStore(clock=lambda: now[0]) if kind == "memory" else SqliteStore(tmp_path / "s.db", clock=lambda: now[0])
    )
    store.set("a", {"x": 1}, ttl=10)
    assert store.get("a") == {"x": 1} and store.get("b") is None
    assert store.unset("a") is True and store.unset("a") is False and store.get("a") is None
    store.set("b", {"y": [1, 2]}, ttl=10)
    now[0] += 11
    assert store.get("b") is None and store.unset("b") is False


def test_sqlite_store_is_shared_between_instances_like_workers(tmp_path):
    one, two = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    one.set("state:x", {"sid": "1"}, ttl=60)
    assert two.get("state:x") == {"sid": "1"}
    assert two.unset("state:x") is True and one.unset("state:x") is False  # single use across workers
    assert oct((tmp_path / "s.db").stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- the app against a mocked EHR


@pytest.fixture
def mocked():
    """The app on a free port; a mocked EHR behind ``responses`` (the app itself passes through)."""
    case = _case("missing-treatment-plan")
    settings = Settings(
        allowed_issuers=(ISS,), session_store="memory", client_id="app", redirect_uri="http://127.0.0.1:1/callback"
    )
    store = MemoryStore()
    app = create_app(settings, store=store)
    with live_server(app) as server, responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_passthru(server.url)
        yield {"server": server, "rsps": rsps, "case": case, "store": store, "settings": settings}


def _start(base: str, browser: requests.Session, iss: str = ISS, launch: str | None = "L1") -> requests.Response:
    params = {"iss": iss, **({"launch": launch} if launch else {})}
    return browser.get(f"{base}/launch", params=params, allow_redirects=False)


def _back_to_app(base: str, callback: str) -> str:
    """The EHR redirects to the registered redirect URI; the test app listens elsewhere."""
    return base + "/callback?" + urlsplit(callback).query


def test_launch_exchange_and_review_with_the_mocked_ehr(mocked):
    base, case = mocked["server"].url, mocked["case"]
    ehr = FakeEhr(mocked["rsps"], case.resources)
    browser = requests.Session()
    started = _start(base, browser)
    assert started.status_code == 302 and started.headers["Location"].startswith("http://ehr.test/authorize?")
    back = ehr.authorize(started.headers["Location"], patient=case.patient_id)
    done = browser.get(_back_to_app(base, back), allow_redirects=False)
    assert done.status_code == 303 and done.headers["Location"].startswith(
        "/review?launch="
    )  # one session per launch (issue 13)
    page = browser.get(base + "/review")
    assert page.status_code == 200 and "Documentation review" in page.text
    assert 'id="patient-banner"' in page.text
    assert 'data-element="treatment-plan" data-status="missing"' in page.text
    report = browser.get(base + "/api/report").json()
    assert report["patient"] == f"Patient/{case.patient_id}"
    assert {e["id"]: e["status"] for e in report["elements"]}["treatment-plan"] == "missing"


def test_server_down_during_token_exchange_gives_a_one_sentence_launch_error_page(mocked):
    base, case = mocked["server"].url, mocked["case"]
    ehr = FakeEhr(mocked["rsps"], case.resources)
    browser = requests.Session()
    back = ehr.authorize(_start(base, browser).headers["Location"], patient=case.patient_id)
    mocked["rsps"].replace(responses.POST, "http://ehr.test/token", body=requests.ConnectionError("connection refused"))
    page = browser.get(_back_to_app(base, back), allow_redirects=False)
    assert page.status_code == 502
    message = re.search(r'<p class="message">(.*?)</p>', page.text, re.S).group(1)
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert "could not be reached" in message
    assert "Traceback" not in page.text and "ConnectionError" not in page.text
    code = parse_qs(urlsplit(back).query)["code"][0]
    assert code not in page.text and all(code not in v for v in page.headers.values())
    assert browser.get(base + "/review").status_code == 401  # nothing half-signed-in is left


def test_a_malformed_smart_configuration_is_refused_by_the_app_without_a_redirect(mocked):
    mocked["rsps"].get(f"{ISS}/.well-known/smart-configuration", json={"authorization_endpoint": "http://ehr.test/a"})
    page = _start(mocked["server"].url, requests.Session())
    assert page.status_code == 400 and "Location" not in page.headers
    assert "does not name its token endpoint" in page.text


def test_capability_statement_fallback_and_v1_scopes_through_the_app(mocked):
    base, case = mocked["server"].url, mocked["case"]
    ehr = FakeEhr(mocked["rsps"], case.resources, discovery="capability-statement")
    browser = requests.Session()
    started = _start(base, browser)
    scope = parse_qs(urlsplit(started.headers["Location"]).query)["scope"][0]
    assert scope == SCOPES_V1
    browser.get(_back_to_app(base, ehr.authorize(started.headers["Location"], patient=case.patient_id)))
    session = browser.get(base + "/api/session").json()
    assert session["write_allowed"] is True and "patient/Condition.write" in session["scopes"]


def test_v1_only_ehr_gets_v1_scopes(mocked):
    base, case = mocked["server"].url, mocked["case"]
    FakeEhr(mocked["rsps"], case.resources, capabilities=("launch-ehr", "permission-v1"))
    started = _start(base, requests.Session())
    assert parse_qs(urlsplit(started.headers["Location"]).query)["scope"][0] == SCOPES_V1


def test_standalone_launch_asks_for_launch_patient(mocked):
    base, case = mocked["server"].url, mocked["case"]
    FakeEhr(mocked["rsps"], case.resources)
    started = _start(base, requests.Session(), launch=None)
    q = parse_qs(urlsplit(started.headers["Location"]).query)
    assert "launch" not in q and "launch/patient" in q["scope"][0].split()


def test_the_ehr_saying_no_is_a_clear_refusal(mocked):
    base, case = mocked["server"].url, mocked["case"]
    ehr = FakeEhr(mocked["rsps"], case.resources)
    browser = requests.Session()
    back = ehr.authorize(_start(base, browser).headers["Location"], patient=case.patient_id, error="access_denied")
    page = browser.get(_back_to_app(base, back))
    assert page.status_code == 400 and "did not authorize the app (access_denied)" in page.text


def test_drafts_refused_for_a_mismatch_show_a_message_and_no_write_button(mocked):
    base = mocked["server"].url
    case = _case("left-lower-leg")
    ehr = FakeEhr(mocked["rsps"], case.resources)
    browser = requests.Session()
    browser.get(_back_to_app(base, ehr.authorize(_start(base, browser).headers["Location"], patient=case.patient_id)))
    page = browser.get(base + "/review")
    assert page.status_code == 200 and 'id="drafts-refused"' in page.text and "M62.562" in page.text
    assert 'id="write-button"' not in page.text
    assert browser.get(base + "/api/drafts").status_code == 409


def test_openapi_document_lists_the_api(mocked):
    doc = requests.get(mocked["server"].url + "/openapi.json").json()
    assert {"/api/report", "/api/drafts", "/api/write", "/launch", "/callback", "/review"} <= set(doc["paths"])


def test_the_ehr_style_is_applied_with_safe_values_only(mocked):
    base, case = mocked["server"].url, mocked["case"]
    ehr = FakeEhr(mocked["rsps"], case.resources)
    mocked["rsps"].get(
        "http://ehr.test/style.json",
        json={
            "color_background": "#f6f8fa",
            "color_highlight": "#0969da",
            "color_text": "red; } body { display: none",
            "font_family": "Inter, sans-serif",
        },
    )
    browser = requests.Session()
    browser.get(_back_to_app(base, ehr.authorize(_start(base, browser).headers["Location"], patient=case.patient_id)))
    assert '<link rel="stylesheet" href="/style.css">' in browser.get(base + "/review").text
    css = browser.get(base + "/style.css")
    assert css.headers["content-type"].startswith("text/css")
    assert "--bg: #f6f8fa;" in css.text and "--accent: #0969da;" in css.text and "Inter, sans-serif" in css.text
    assert "display" not in css.text and "red" not in css.text
    browser.get(base + "/style.css")
    assert sum(c.request.url.endswith("/style.json") for c in mocked["rsps"].calls) == 1  # fetched once a session


def test_a_style_url_off_the_issuer_is_not_fetched():
    from smart_launch._app import _fetch_style

    with responses.RequestsMock() as rsps:
        assert _fetch_style(requests.Session(), "http://elsewhere.test/style.json", ISS) == {}
        assert _fetch_style(requests.Session(), None, ISS) == {}
        assert len(rsps.calls) == 0


def test_a_present_red_flag_shows_the_referral_banner_and_the_referral_activity(mocked):
    base = mocked["server"].url
    case = _case("flag-fever")
    # SPEC §7.1: the case's own active CarePlan would mean no plan is drafted; without it the draft leads
    # with the referral
    ehr = FakeEhr(
        mocked["rsps"], [r for r in case.resources if r["resourceType"] != "CarePlan"], need_patient_banner=False
    )
    browser = requests.Session()
    browser.get(_back_to_app(base, ehr.authorize(_start(base, browser).headers["Location"], patient=case.patient_id)))
    page = browser.get(base + "/review").text
    assert 'id="referral"' in page and "Referral recommended" in page
    assert 'data-flag="fever" data-status="present"' in page
    assert "Referral to a specialist" in page  # the draft CarePlan's extra activity
    assert 'id="patient-banner"' not in page  # the EHR shows its own banner
