"""Security of the CDS service: every way a CDS client's JWT can be wrong gets the same bare 401, and
no token or patient name reaches a log line (CDS Hooks 2.0 "Trusting CDS Clients").

Each test signs its own JWT with keys made here; the EHR's allow-list holds one ES384 key registered
in advance, one RS384 key behind an allowed ``jku``, and nothing else.  Expiry is judged against the
app's injected clock (no sleeping).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_plugin.synthetic import generate_cases
from sandbox.testing import ManualClock, live_server
from smart_launch._app import create_app
from smart_launch._cds_auth import CdsClientTrust
from smart_launch._settings import Settings

ISS = "https://ehr.example.test"
JKU_ISS = "https://epic.example.test"
PV = "patient-view-m62-561"
CASE = next(c for c in generate_cases(__import__("datetime").date.today()) if c.key == "missing-onset")


def _b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _Jwks(BaseHTTPRequestHandler):
    body = b"{}"
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def keys():
    return {
        "ec": ECKey.generate_key("P-384", parameters={"kid": "ec-1"}, private=True),
        "rsa": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True),
        "stranger": ECKey.generate_key("P-384", parameters={"kid": "ec-1"}, private=True),
    }


@pytest.fixture(scope="module")
def jwks_host(keys):
    _Jwks.body = json.dumps({"keys": [keys["rsa"].as_dict(private=False)]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def clock():
    return ManualClock()


@pytest.fixture(scope="module")
def app(keys, jwks_host, clock):
    trust = (
        CdsClientTrust(ISS, jwks={"keys": [keys["ec"].as_dict(private=False)]}),
        CdsClientTrust(JKU_ISS, jku=(f"{jwks_host}/jwks.json",)),
    )
    settings = Settings(
        allowed_issuers=("https://ehr.example.test/fhir",),
        session_store="memory",
        cds_feedback_store="memory",
        cds_clients=trust,
    )
    with live_server(create_app(settings, clock=clock)) as server:
        yield server


def _claims(app, clock, **over):
    now = int(clock())
    claims = {
        "iss": ISS,
        "sub": "ehr",
        "aud": f"{app.url}/cds-services/{PV}",
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_hex(8),
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key, claims, alg="ES384", **header):
    return jwt.encode({"alg": alg, "typ": "JWT", "kid": key.kid, **header}, claims, key, algorithms=[alg])


def _body():
    res = CASE.resources

    def bundle(t):
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in res if r["resourceType"] == t],
        }

    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": CASE.patient_id},
        "prefetch": {
            "patient": next(r for r in res if r["resourceType"] == "Patient"),
            "conditions": bundle("Condition"),
            "observations": bundle("Observation"),
            "encounters": bundle("Encounter"),
            "carePlans": bundle("CarePlan"),
        },
    }


def _post(app, token, path=f"/cds-services/{PV}", body=None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(app.url + path, json=body if body is not None else _body(), headers=headers, timeout=60)


_REASONS: list[str] = []


class _Reasons(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("CDS client JWT refused: "):
            _REASONS.append(record.getMessage().split(": ", 1)[1])


@pytest.fixture(scope="module", autouse=True)
def _reasons():
    handler = _Reasons()
    logger = logging.getLogger("smart_launch.cds")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.removeHandler(handler)
    logger.setLevel(old)


def _refused(answer, reason=None):
    """401 with the same bare body whatever went wrong; the log (only) says which check failed."""
    assert answer.status_code == 401
    assert answer.json() == {"error": "unauthorized"}
    if reason is not None:
        assert _REASONS and _REASONS[-1] == reason, _REASONS[-3:]
    return True


def test_a_good_jwt_is_accepted_both_algorithms(app, keys, clock):
    assert _post(app, _sign(keys["ec"], _claims(app, clock))).status_code == 200
    rsa = _sign(keys["rsa"], _claims(app, clock, iss=JKU_ISS), alg="RS384", jku=_Jwks.jku_url)
    assert _post(app, rsa).status_code == 200


@pytest.fixture(scope="module", autouse=True)
def _jku_url(jwks_host):
    _Jwks.jku_url = f"{jwks_host}/jwks.json"


def test_missing_jwt(app):
    assert _refused(_post(app, None), "no bearer JWT")
    assert _refused(
        requests.post(
            app.url + f"/cds-services/{PV}", json=_body(), headers={"Authorization": "Basic abc"}, timeout=10
        ),
        "no bearer JWT",
    )


def test_alg_none(app, clock):
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(app, clock))}."
    assert _refused(_post(app, token), "algorithm not allowed")


def test_hs256_signed_with_the_public_key(app, keys, clock):
    public_pem = keys["ec"].as_pem(private=False)
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'ec-1'})}.{_b64(_claims(app, clock))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert _refused(_post(app, f"{signing_input}.{_b64(signature)}"), "algorithm not allowed")


def test_es256_and_a_stranger_key_are_refused(app, keys, clock):
    es256 = ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True)
    assert _refused(_post(app, _sign(es256, _claims(app, clock), alg="ES256")), "algorithm not allowed")
    assert _refused(_post(app, _sign(keys["stranger"], _claims(app, clock))), "signature does not verify")


def test_expired(app, keys, clock):
    token = _sign(keys["ec"], _claims(app, clock, iat=int(clock()) - 400, exp=int(clock()) - 100))
    assert _refused(_post(app, token), "expired")
    fresh = _sign(keys["ec"], _claims(app, clock))
    clock.advance(600)  # the app's clock moves past exp: the same token is now refused
    try:
        assert _refused(_post(app, fresh), "expired")
    finally:
        clock.advance(-600)


def test_wrong_aud(app, keys, clock):
    elsewhere = _claims(app, clock, aud="https://elsewhere.test/cds-services/x")
    assert _refused(_post(app, _sign(keys["ec"], elsewhere)), "wrong aud")
    other_service = _claims(app, clock, aud=f"{app.url}/cds-services/patient-view-m62-830")
    assert _refused(_post(app, _sign(keys["ec"], other_service)), "wrong aud")


def test_reused_jti(app, keys, clock):
    token = _sign(keys["ec"], _claims(app, clock))
    assert _post(app, token).status_code == 200
    assert _refused(_post(app, token), "jti reused")
    assert _refused(_post(app, _sign(keys["ec"], _claims(app, clock, jti=None))), "no jti")


def test_jku_off_the_allow_list_is_never_fetched(app, keys, clock, jwks_host):
    before = _Jwks.hits
    token = _sign(keys["rsa"], _claims(app, clock, iss=JKU_ISS), alg="RS384", jku=f"{jwks_host}/other.json")
    assert _refused(_post(app, token), "jku not on the allow-list")
    token = _sign(keys["ec"], _claims(app, clock), jku=f"{jwks_host}/jwks.json")  # ISS registered no jku
    assert _refused(_post(app, token), "jku not on the allow-list")
    assert _Jwks.hits == before


def test_unknown_iss(app, keys, clock):
    stranger = _claims(app, clock, iss="https://unknown.example.test")
    assert _refused(_post(app, _sign(keys["ec"], stranger)), "unknown iss")


def test_feedback_needs_the_jwt_too(app, keys, clock):
    body = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted"}]}
    assert _refused(_post(app, None, path=f"/cds-services/{PV}/feedback", body=body))
    good = _sign(keys["ec"], _claims(app, clock))
    assert _post(app, good, path=f"/cds-services/{PV}/feedback", body=body).status_code == 200


def test_a_bad_jwt_is_refused_before_the_body_is_read(app):
    answer = requests.post(
        app.url + f"/cds-services/{PV}", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert _refused(answer, "no bearer JWT")


def test_no_token_or_patient_name_in_any_log_line(app, keys, clock, caplog):
    caplog.set_level(logging.DEBUG)
    patient = next(r for r in CASE.resources if r["resourceType"] == "Patient")
    names = [n for name in patient.get("name", []) for n in [*name.get("given", []), name.get("family")] if n]
    assert names
    body = _body()
    access = "fhir-access-" + secrets.token_hex(12)
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    body["fhirAuthorization"] = {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.rs",
        "subject": "ehr",
    }
    body["prefetch"]["carePlans"] = None  # forces a read through fhirServer (unreachable: 412), token in use
    token = _sign(keys["ec"], _claims(app, clock))
    assert _post(app, token, body=body).status_code == 412
    good = _sign(keys["ec"], _claims(app, clock))
    assert _post(app, good).status_code == 200
    bad = _sign(keys["ec"], _claims(app, clock, aud="https://elsewhere.test"))
    assert _refused(_post(app, bad))
    lines = [r.getMessage() for r in caplog.records]
    assert any("cds" in line for line in lines)  # the service did log: ids and reasons
    for line in lines:
        for secret in (access, token, good, bad, *names):
            assert secret not in line, line
