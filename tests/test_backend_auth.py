"""SMART Backend Services on the client side: keys, the signed assertion, discovery, the token, 401 renewal.

The token endpoint is mocked with ``responses``; the mock checks each
assertion with the public key, as an EHR would.  The run against a real
authorization server is in tests/test_sync_server.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from urllib.parse import parse_qs

import pytest
import requests
import responses
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_plugin._backend_auth import (
    ASSERTION_TYPE,
    MAX_ASSERTION_LIFETIME,
    BearerAuth,
    Token,
    TokenCache,
    backend_session,
    client_assertion,
    discover_token_endpoint,
    fetch_token,
    load_signing_key,
    token_request_form,
)
from fhir_plugin._client import FhirClient
from fhir_plugin._errors import AuthError, LaunchError, UsageError

FHIR = "https://ehr.test/fhir"
TOKEN_URL = "https://ehr.test/auth/token"
CLIENT_ID = "sync-job-7"
SMART_CONFIG = {
    "token_endpoint": TOKEN_URL,
    "grant_types_supported": ["client_credentials"],
    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
}


# ---------------------------------------------------------------- keys on disk


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, private=True)


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-384", private=True)


@pytest.fixture
def rsa_pem(tmp_path, rsa_key):
    path = tmp_path / "rsa.pem"
    path.write_bytes(rsa_key.as_pem(private=True))
    return path


@pytest.fixture
def ec_pem(tmp_path, ec_key):
    path = tmp_path / "ec.pem"
    path.write_bytes(ec_key.as_pem(private=True))
    return path


def test_rsa_pem_signs_rs384_with_the_thumbprint_as_kid(rsa_pem, rsa_key):
    key = load_signing_key(rsa_pem)
    assert key.alg == "RS384"
    assert key.kid == rsa_key.thumbprint()
    assert "d" not in key.public_jwk() and key.public_jwk()["kid"] == key.kid


def test_ec_pem_signs_es384_and_kid_can_be_named(ec_pem):
    key = load_signing_key(ec_pem, kid="ehr-registered-1")
    assert (key.alg, key.kid) == ("ES384", "ehr-registered-1")


def test_jwk_file_keeps_its_own_kid(tmp_path, ec_key):
    path = tmp_path / "key.jwk.json"
    path.write_text(json.dumps({**ec_key.as_dict(private=True), "kid": "from-the-jwk"}))
    assert load_signing_key(path).kid == "from-the-jwk"


def test_jwks_file_with_one_private_key_is_accepted(tmp_path, rsa_key, ec_key):
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps({"keys": [ec_key.as_dict(private=False), {**rsa_key.as_dict(private=True), "kid": "k1"}]})
    )
    key = load_signing_key(path)
    assert (key.alg, key.kid) == ("RS384", "k1")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ECKey.generate_key("P-256", private=True).as_pem(private=True), "P-384"),
        (lambda: ECKey.generate_key("P-384", private=True).as_pem(private=False), "neither"),
        (lambda: json.dumps(ECKey.generate_key("P-384").as_dict(private=False)).encode(), "public key"),
        (lambda: b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", "usable"),
        (lambda: b"hello", "neither"),
    ],
)
def test_unusable_keys_are_refused_in_one_sentence(tmp_path, make, message):
    path = tmp_path / "bad.key"
    path.write_bytes(make())
    with pytest.raises(UsageError, match=message):
        load_signing_key(path)


def test_missing_key_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        load_signing_key(tmp_path / "nope.pem")


# ---------------------------------------------------------------- the assertion


def _decode(assertion: str, key) -> jwt.Token:
    return jwt.decode(assertion, key, algorithms=["RS384", "ES384"])


@pytest.mark.parametrize("which", ["rsa_pem", "ec_pem"])
def test_assertion_header_and_claims_follow_smart_backend_services(request, which):
    path = request.getfixturevalue(which)
    key = load_signing_key(path, kid="kid-42")
    before = int(time.time())
    token = _decode(client_assertion(key, CLIENT_ID, TOKEN_URL), key.key)
    assert token.header == {"alg": key.alg, "kid": "kid-42", "typ": "JWT"}
    claims = token.claims
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == TOKEN_URL
    assert before <= claims["iat"] <= int(time.time())
    assert 0 < claims["exp"] - claims["iat"] <= MAX_ASSERTION_LIFETIME
    assert len(claims["jti"]) >= 16


def test_every_assertion_has_a_new_jti(ec_pem):
    key = load_signing_key(ec_pem)
    jtis = {_decode(client_assertion(key, CLIENT_ID, TOKEN_URL), key.key).claims["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_assertion_lifetime_over_five_minutes_is_refused(ec_pem):
    key = load_signing_key(ec_pem)
    with pytest.raises(UsageError, match="1-300"):
        client_assertion(key, CLIENT_ID, TOKEN_URL, lifetime=3600)


def test_token_request_form(ec_pem):
    key = load_signing_key(ec_pem)
    form = token_request_form(key, CLIENT_ID, TOKEN_URL, "system/Patient.rs")
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/Patient.rs"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert _decode(form["client_assertion"], key.key).claims["aud"] == TOKEN_URL


# ---------------------------------------------------------------- discovery


@responses.activate
def test_discovery_reads_the_token_endpoint():
    responses.get(f"{FHIR}/.well-known/smart-configuration", json=SMART_CONFIG)
    assert discover_token_endpoint(requests.Session(), FHIR, alg="ES384") == TOKEN_URL


@pytest.mark.parametrize(
    "config, message",
    [
        ({**SMART_CONFIG, "token_endpoint_auth_methods_supported": ["client_secret_basic"]}, "private_key_jwt"),
        ({**SMART_CONFIG, "token_endpoint_auth_signing_alg_values_supported": ["RS256"]}, "ES384"),
        ({**SMART_CONFIG, "grant_types_supported": ["authorization_code"]}, "client_credentials"),
        ({**SMART_CONFIG, "token_endpoint": "http://ehr.test/token"}, "https"),
        ({"authorization_endpoint": "x"}, "no token_endpoint"),
    ],
)
@responses.activate
def test_discovery_refuses_what_cannot_work(config, message):
    responses.get(f"{FHIR}/.well-known/smart-configuration", json=config)
    with pytest.raises(LaunchError, match=message):
        discover_token_endpoint(requests.Session(), FHIR, alg="ES384")


@responses.activate
def test_discovery_on_a_server_without_smart():
    responses.get(f"{FHIR}/.well-known/smart-configuration", status=404)
    with pytest.raises(LaunchError, match="404"):
        discover_token_endpoint(requests.Session(), FHIR)


def test_plain_http_token_endpoint_is_allowed_on_loopback_only():
    from fhir_plugin._backend_auth import _check_endpoint_url

    assert _check_endpoint_url("http://127.0.0.1:9090/token", "x")
    assert _check_endpoint_url("http://localhost:9090/token", "x")
    with pytest.raises(LaunchError):
        _check_endpoint_url("http://10.0.0.8/token", "x")


# ---------------------------------------------------------------- the token endpoint, mocked like an EHR


class FakeTokenEndpoint:
    """A token endpoint that verifies each assertion like an EHR, refuses replays, and counts."""

    def __init__(self, public_key, *, lifetime: int = 300, fail_first: int = 0, status: int = 503) -> None:
        self.public_key = public_key
        self.lifetime = lifetime
        self.fail_first = fail_first
        self.status = status
        self.jtis: list[str] = []
        self.issued: list[str] = []
        self.assertions: list[str] = []

    def __call__(self, request):
        form = {k: v[0] for k, v in parse_qs(request.body).items()}
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == ASSERTION_TYPE
        self.assertions.append(form["client_assertion"])
        claims = _decode(form["client_assertion"], self.public_key).claims
        assert claims["aud"] == TOKEN_URL and claims["iss"] == claims["sub"] == CLIENT_ID
        if claims["jti"] in self.jtis:
            return 400, {}, json.dumps({"error": "invalid_client", "error_description": "jti replayed"})
        self.jtis.append(claims["jti"])
        if self.fail_first:
            self.fail_first -= 1
            return self.status, {}, json.dumps({"error": "temporarily_unavailable"})
        token = f"access-{len(self.issued) + 1}-SECRET"
        self.issued.append(token)
        return (
            200,
            {},
            json.dumps(
                {
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": self.lifetime,
                    "scope": form.get("scope", ""),
                }
            ),
        )


@responses.activate
def test_fetch_token_sends_a_verified_assertion(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    token = fetch_token(requests.Session(), TOKEN_URL, key, CLIENT_ID, "system/Patient.rs")
    assert token.access_token == "access-1-SECRET"
    assert token.lifetime == 300 and token.scope == "system/Patient.rs"
    assert "SECRET" not in repr(token)


@responses.activate
def test_a_busy_token_endpoint_is_tried_again_with_a_new_assertion(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key, fail_first=2)
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    token = fetch_token(requests.Session(), TOKEN_URL, key, CLIENT_ID, "s", sleep=lambda s: None)
    assert token.access_token == "access-1-SECRET"
    assert len(set(endpoint.jtis)) == 3


@responses.activate
def test_a_refused_client_is_one_sentence_without_the_assertion(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    responses.add_callback(
        responses.POST,
        TOKEN_URL,
        callback=lambda r: (
            endpoint(r),
            (401, {}, json.dumps({"error": "invalid_client", "error_description": "unknown kid"})),
        )[1],
    )
    with pytest.raises(LaunchError) as info:
        fetch_token(requests.Session(), TOKEN_URL, key, CLIENT_ID, "s", sleep=lambda s: None)
    assert "invalid_client: unknown kid" in str(info.value) and CLIENT_ID in str(info.value)
    assert endpoint.assertions[0] not in str(info.value)
    assert len(endpoint.assertions) == 1  # a refusal is not retried


@responses.activate
def test_an_unreachable_token_endpoint(ec_pem):
    key = load_signing_key(ec_pem)
    responses.add(responses.POST, TOKEN_URL, body=requests.ConnectionError("refused"))
    with pytest.raises(LaunchError, match="could not reach the token endpoint"):
        fetch_token(requests.Session(), TOKEN_URL, key, CLIENT_ID, "s", sleep=lambda s: None)


# ---------------------------------------------------------------- the cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _counting_fetch(clock: Clock, lifetime: float = 300.0):
    issued: list[str] = []

    def fetch() -> Token:
        issued.append(f"t{len(issued) + 1}")
        return Token(issued[-1], clock() + lifetime, lifetime)

    return fetch, issued


def test_cache_reuses_the_token_and_renews_it_before_expiry():
    clock = Clock()
    fetch, issued = _counting_fetch(clock)
    cache = TokenCache(fetch, clock=clock)
    assert cache.get() == "t1"
    clock.now += 200
    assert cache.get() == "t1"
    clock.now += 45  # 55 s left: inside the 60 s renewal margin
    assert cache.get() == "t2"
    assert issued == ["t1", "t2"]


def test_short_tokens_renew_at_four_fifths_of_their_life():
    clock = Clock()
    fetch, _ = _counting_fetch(clock, lifetime=10)
    cache = TokenCache(fetch, clock=clock)
    cache.get()
    clock.now += 7.9
    assert cache.get() == "t1"
    clock.now += 0.2
    assert cache.get() == "t2"


def test_invalidate_drops_only_the_token_that_was_rejected():
    clock = Clock()
    fetch, _ = _counting_fetch(clock)
    cache = TokenCache(fetch, clock=clock)
    cache.get()
    cache.invalidate("some-older-token")
    assert cache.get() == "t1"
    cache.invalidate("t1")
    assert cache.get() == "t2"


def test_threads_share_one_fetch():
    clock = Clock()
    calls = []

    def slow_fetch() -> Token:
        calls.append(1)
        time.sleep(0.05)
        return Token("shared", clock() + 300, 300)

    cache = TokenCache(slow_fetch, clock=clock)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["shared"] * 8 and len(calls) == 1


# ---------------------------------------------------------------- the session: bearer on every request, 401 renewal


def _session_with(endpoint: FakeTokenEndpoint, key) -> tuple[requests.Session, TokenCache]:
    responses.get(f"{FHIR}/.well-known/smart-configuration", json=SMART_CONFIG)
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    return backend_session(FHIR, CLIENT_ID, key, "system/Patient.rs")


def _fhir_server(accepted: set[str], seen: list[str]):
    def answer(request):
        header = request.headers.get("Authorization", "")
        seen.append(header)
        if header.removeprefix("Bearer ") not in accepted:
            return (
                401,
                {},
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "login", "diagnostics": "token expired"}],
                    }
                ),
            )
        body = json.loads(request.body) if request.body else None
        if body and body.get("resourceType") == "Bundle":
            return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []})
        return 200, {}, json.dumps({"resourceType": "Patient", "id": "p1"})

    return answer


@responses.activate
def test_every_request_carries_the_token_and_one_token_serves_many(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    session, cache = _session_with(endpoint, key)
    seen: list[str] = []
    responses.add_callback(responses.GET, f"{FHIR}/Patient/p1", callback=_fhir_server({"access-1-SECRET"}, seen))
    client = FhirClient(FHIR, session=session)
    for _ in range(5):
        assert client.read("Patient", "p1")["id"] == "p1"
    assert seen == ["Bearer access-1-SECRET"] * 5
    assert cache.fetches == 1


@responses.activate
def test_a_401_mid_run_renews_the_token_once_and_repeats_the_request(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    session, cache = _session_with(endpoint, key)
    accepted = {"access-1-SECRET"}
    seen: list[str] = []
    responses.add_callback(responses.GET, f"{FHIR}/Patient/p1", callback=_fhir_server(accepted, seen))
    responses.add_callback(responses.POST, FHIR, callback=_fhir_server(accepted, seen))
    client = FhirClient(FHIR, session=session)
    client.read("Patient", "p1")
    accepted.clear()
    accepted.add("access-2-SECRET")  # the server expired the first token early
    answer = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    assert answer["type"] == "transaction-response"
    assert seen == ["Bearer access-1-SECRET", "Bearer access-1-SECRET", "Bearer access-2-SECRET"]
    assert cache.fetches == 2
    sent = [c.request.body for c in responses.calls if c.request.url.rstrip("/") == FHIR]
    assert len(sent) == 2 and sent[0] == sent[1]  # the same transaction, sent again


@responses.activate
def test_a_second_401_is_an_auth_error_not_a_loop(ec_pem):
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    session, cache = _session_with(endpoint, key)
    seen: list[str] = []
    responses.add_callback(responses.GET, f"{FHIR}/Patient/p1", callback=_fhir_server(set(), seen))
    client = FhirClient(FHIR, session=session)
    with pytest.raises(AuthError) as info:
        client.read("Patient", "p1")
    assert len(seen) == 2 and cache.fetches == 2
    assert "SECRET" not in str(info.value)


@responses.activate
def test_no_token_or_assertion_reaches_the_logs(ec_pem, caplog):
    caplog.set_level(logging.DEBUG)
    key = load_signing_key(ec_pem)
    endpoint = FakeTokenEndpoint(key.key)
    session, _ = _session_with(endpoint, key)
    accepted = {"access-1-SECRET"}
    seen: list[str] = []
    responses.add_callback(responses.GET, f"{FHIR}/Patient/p1", callback=_fhir_server(accepted, seen))
    client = FhirClient(FHIR, session=session)
    client.read("Patient", "p1")
    accepted.clear()
    accepted.add("access-2-SECRET")
    client.read("Patient", "p1")  # a 401 and a renewal, logged
    assert any("renewing" in r.getMessage() for r in caplog.records)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET" not in text
    assert not any(a in text for a in endpoint.assertions)
    assert not any(a.split(".")[1] in text for a in endpoint.assertions)


def test_bearer_auth_never_shows_the_token():
    cache = TokenCache(lambda: Token("SECRET-x", time.monotonic() + 300, 300))
    cache.get()
    assert "SECRET" not in repr(BearerAuth(cache)) and "SECRET" not in repr(cache)


def test_keygen_writes_a_0600_private_key_the_job_loads_and_prints_its_public_jwks(tmp_path, capsys):
    import os
    import stat

    from fhir_plugin._backend_auth import load_signing_key
    from fhir_plugin._cli import main

    out = tmp_path / "backend.pem"
    assert main(["keygen", "--out", str(out)]) == 0
    jwks = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = load_signing_key(out)
    [public] = jwks["keys"]
    assert key.alg == "RS384" and public["alg"] == "RS384" and public["kid"] == key.kid
    assert "d" not in public and "p" not in public  # the public half only
    assert main(["keygen", "--out", str(out)]) == 2  # never overwrites a key
