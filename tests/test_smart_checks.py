"""The shared SMART checks (fhir_plugin._smart), the typed session state, and token expiry on an injected clock."""

from __future__ import annotations

import pytest
import responses
from authlib.integrations.base_client import InvalidTokenError

from fhir_plugin._errors import LaunchError
from fhir_plugin._smart import EndpointRule, endpoint_fault, stamp_expiry, token_expired, token_fault
from sandbox.testing import ManualClock
from smart_launch import LaunchContext, SmartConfig, authorized_session
from smart_launch.state import LaunchState, PendingAuthorization

ISS = "http://ehr.test/fhir"


@pytest.mark.parametrize(
    "url, issuer, follow_issuer, https_or_loopback",
    [
        ("https://ehr.test/token", "https://ehr.test/fhir", None, None),
        ("http://ehr.test/token", "http://ehr.test/fhir", None, "plain-http"),  # the app follows an http issuer
        ("http://ehr.test/token", "https://ehr.test/fhir", "plain-http", "plain-http"),
        ("http://127.0.0.1:9090/token", "https://ehr.test/fhir", "plain-http", None),  # backend: loopback only
        ("http://localhost/token", "", None, None),
        ("/relative/token", "http://ehr.test/fhir", "not-absolute", "plain-http"),
        ("https://ehr.test/token#x", "https://ehr.test/fhir", "not-absolute", None),
        ("", "https://ehr.test/fhir", "missing", "missing"),
        (None, "https://ehr.test/fhir", "missing", "missing"),
    ],
)
def test_the_two_endpoint_rules(url, issuer, follow_issuer, https_or_loopback):
    assert endpoint_fault(url, EndpointRule.FOLLOW_ISSUER, issuer=issuer) == follow_issuer
    assert endpoint_fault(url, EndpointRule.HTTPS_OR_LOOPBACK, issuer=issuer) == https_or_loopback


@pytest.mark.parametrize(
    "body, fault",
    [
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 60}, None),
        ({"access_token": "a", "token_type": "bearer"}, None),
        ({"token_type": "Bearer"}, "no-access-token"),
        ({"access_token": "", "token_type": "Bearer"}, "no-access-token"),
        ([1, 2], "no-access-token"),
        ({"access_token": "a", "token_type": "mac"}, "not-bearer"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "soon"}, "bad-expires-in"),
    ],
)
def test_token_response_faults(body, fault):
    assert token_fault(body) == fault


def test_expiry_is_stamped_and_judged_on_the_given_clock():
    token = stamp_expiry({"access_token": "a", "expires_in": 300}, 1000.4)
    assert token["expires_at"] == 1300
    assert not token_expired(token, 1269, leeway=30) and token_expired(token, 1271, leeway=30)
    assert not token_expired({"access_token": "a"}, 10**12, leeway=30)  # no expiry recorded: never


@responses.activate
def test_the_app_session_refreshes_when_its_clock_says_the_token_expired():
    clock = ManualClock(start=10_000.0)
    responses.post(
        "http://ehr.test/token",
        json={"access_token": "second", "token_type": "Bearer", "expires_in": 60, "refresh_token": "r2"},
    )
    responses.get(f"{ISS}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    saved = []
    first = stamp_expiry(
        {"access_token": "first", "token_type": "Bearer", "expires_in": 60, "refresh_token": "r1"}, clock()
    )
    session = authorized_session(
        first, client_id="app", token_endpoint="http://ehr.test/token", on_refresh=saved.append, leeway=5, clock=clock
    )
    session.get(f"{ISS}/Patient/p1")
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer first" and saved == []
    clock.advance(56)  # within the leeway of the expiry
    session.get(f"{ISS}/Patient/p1")
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer second"
    assert [t["access_token"] for t in saved] == ["second"] and saved[0]["expires_at"] == int(clock()) + 60


def test_an_expired_token_without_a_refresh_token_is_not_sent():
    clock = ManualClock(start=10_000.0)
    token = stamp_expiry({"access_token": "only", "token_type": "Bearer", "expires_in": 60}, clock())
    session = authorized_session(
        token, client_id="app", token_endpoint="http://ehr.test/token", on_refresh=lambda t: None, leeway=0, clock=clock
    )
    clock.advance(61)
    with responses.RequestsMock() as rsps, pytest.raises(InvalidTokenError):
        session.get(f"{ISS}/Patient/p1")
    assert len(rsps.calls) == 0  # the expired token never left the app


def test_the_session_state_round_trips_through_json_with_the_stored_keys():
    config = SmartConfig(
        iss=ISS,
        authorization_endpoint="http://ehr.test/auth",
        token_endpoint="http://ehr.test/token",
        capabilities=frozenset({"launch-ehr"}),
    )
    pending = LaunchState(
        iss=ISS, config=config, requested_scope="launch openid", standalone=False, started=5.0, state="s" * 43
    )
    signed = pending.signed(
        token={"access_token": "a", "refresh_token": "r"},
        context=LaunchContext("p1", "e1", True, None, (), None, None),
        csrf="c" * 43,
        scopes=("launch", "patient/Condition.c"),
    )
    stored = signed.to_json()
    assert "state" not in stored and stored["token"]["access_token"] == "a" and stored["context"]["patient"] == "p1"
    assert LaunchState.from_json(stored) == signed and signed.signed_in and not pending.signed_in
    assert LaunchState.from_json(pending.to_json()) == pending
    ticket = PendingAuthorization("sid1", "verifier", "http://app/callback")
    assert PendingAuthorization.from_json(ticket.to_json()) == ticket and "verifier" not in repr(ticket)


def test_backend_and_app_keep_their_own_sentences():
    from fhir_plugin._backend_auth import _check_endpoint_url
    from smart_launch._launch import config_from_well_known

    with pytest.raises(LaunchError, match="plain http is allowed on loopback only"):
        _check_endpoint_url("http://ehr.test/token", "token endpoint")
    with pytest.raises(LaunchError, match="the EHR at https://ehr.test/fhir gives a token endpoint over plain http"):
        config_from_well_known(
            "https://ehr.test/fhir",
            {"authorization_endpoint": "https://ehr.test/a", "token_endpoint": "http://ehr.test/token"},
        )
