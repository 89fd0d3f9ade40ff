"""Attacks on the sandbox EHR's authorization server (issue 11, weak points: token family, code replay).

The EHR here has no FHIR server behind it: whether a token still works is
asked of the EHR's own store (the proxy would answer 401 or, for a live
token, fail to reach the absent upstream).
"""

from __future__ import annotations

import pytest
import requests
from test_sandbox_ehr import APP, UNREACHABLE, _query, app_client, authorize, exchange, pkce, sign_in

from sandbox.ehr import running_ehr

SCOPE = "launch/patient patient/*.rs offline_access"


@pytest.fixture(scope="module")
def ehr():
    with running_ehr(UNREACHABLE, auto_approve=True) as server:
        server.clients.register(app_client())
        yield server


def refresh(ehr, refresh_token: str) -> requests.Response:
    return requests.post(
        ehr.config.token_url,
        data={"grant_type": "refresh_token", "client_id": APP, "refresh_token": refresh_token},
        timeout=10,
    )


def live(ehr, access_token: str) -> bool:
    token = ehr.store.by_access_token(access_token)
    return token is not None and token.access_valid(ehr.store.now())


def test_a_replayed_rotated_refresh_token_revokes_its_whole_family(ehr):
    first = sign_in(ehr, patient="p-1", scope=SCOPE)
    second = refresh(ehr, first["refresh_token"]).json()
    third = refresh(ehr, second["refresh_token"]).json()
    assert live(ehr, third["access_token"])
    other = sign_in(ehr, patient="p-1", scope=SCOPE)  # another grant of the same user: not this family

    # The first refresh token was rotated away: whoever presents it again holds a stolen copy
    # (or the legitimate app does, and the thief holds the newer one).  Both lose.
    replay = refresh(ehr, first["refresh_token"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert not live(ehr, second["access_token"]) and not live(ehr, third["access_token"])
    assert refresh(ehr, third["refresh_token"]).json()["error"] == "invalid_grant"
    assert live(ehr, other["access_token"])
    assert refresh(ehr, other["refresh_token"]).status_code == 200


def test_a_spent_code_without_the_verifier_is_refused_but_revokes_nothing(ehr):
    verifier, challenge = pkce()
    code = _query(authorize(ehr, challenge=challenge, patient="p-1").headers["Location"])["code"]
    tokens = exchange(ehr, code, verifier).json()

    # Someone who saw the code (a log, a Referer) but not the verifier: refused, and the user keeps working.
    for guess in (None, pkce()[0]):
        replay = exchange(ehr, code, guess)
        assert replay.status_code == 400
    assert live(ehr, tokens["access_token"])
    assert refresh(ehr, tokens["refresh_token"]).status_code == 200


def test_a_spent_code_with_the_verifier_revokes_its_tokens_and_their_successors(ehr):
    verifier, challenge = pkce()
    code = _query(authorize(ehr, challenge=challenge, patient="p-1").headers["Location"])["code"]
    tokens = exchange(ehr, code, verifier).json()
    renewed = refresh(ehr, tokens["refresh_token"]).json()

    assert exchange(ehr, code, verifier).json()["error"] == "invalid_grant"
    assert not live(ehr, tokens["access_token"]) and not live(ehr, renewed["access_token"])
    assert refresh(ehr, renewed["refresh_token"]).json()["error"] == "invalid_grant"
