"""The sandbox EHR: SMART authorization server and scope-enforcing FHIR proxy.

Three layers:

* pure unit tests of the scope grammar and of the proxy's access plan;
* the OAuth flows against an EHR served in a thread (its FHIR upstream is
  unreachable there, on purpose: nothing in those flows may need it);
* ``@pytest.mark.server``: the proxy in front of the real sandbox HAPI
  (``fhir_base_url``), with patients written under unique ids per run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from sandbox.ehr import Client, ClientConfigError, ClientRegistry, running_ehr, smart_configuration
from sandbox.ehr._access import Access, Denied, belongs, check_answer, plan_request
from sandbox.ehr._config import EhrConfig
from sandbox.ehr._scopes import ScopeError, allowed, downgrade_writes, enforceable, parse_scope, resource_scopes

UNREACHABLE = "http://127.0.0.1:9/fhir"
APP = "test-app"
REDIRECT = "http://127.0.0.1:8765/callback"
LAUNCH_URL = "http://127.0.0.1:8765/launch"
APP_SCOPES = [
    "launch",
    "launch/patient",
    "openid",
    "fhirUser",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.read",
    "patient/*.write",
    "user/*.rs",
]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# ------------------------------------------------------------------ helpers


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def app_client(**overrides) -> Client:
    values = dict(
        client_id=APP,
        redirect_uris=[REDIRECT],
        launch_url=LAUNCH_URL,
        scope=APP_SCOPES,
        token_endpoint_auth_method="none",
        name="Test app",
    )
    values.update(overrides)
    return Client(**values)


class Backend:
    """A backend-services client: its key pair made here, its public JWKS registered with the EHR."""

    def __init__(self, client_id: str, alg: str) -> None:
        self.client_id = client_id
        self.alg = alg
        self.key = (
            RSAKey.generate_key(2048, auto_kid=True) if alg == "RS384" else ECKey.generate_key("P-384", auto_kid=True)
        )
        self.jwks = KeySet([self.key]).as_dict(private=False)

    def client(self, scope=("system/*.rs", "system/Condition.c")) -> Client:
        return Client(
            client_id=self.client_id,
            token_endpoint_auth_method="private_key_jwt",
            grant_types=["client_credentials"],
            scope=list(scope),
            jwks=self.jwks,
        )

    def assertion(
        self, token_url: str, *, key=None, lifetime: int = 240, iat_offset: int = 0, jti: str | None = None, **claims
    ) -> str:
        now = int(time.time()) + iat_offset
        body = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti or uuid.uuid4().hex,
        }
        body.update(claims)
        signing = key or self.key
        return jwt.encode({"alg": self.alg, "kid": signing.kid, "typ": "JWT"}, body, signing, algorithms=[self.alg])

    def token(self, ehr, scope: str = "system/*.rs", **kwargs) -> requests.Response:
        return requests.post(
            ehr.config.token_url,
            data={
                "grant_type": "client_credentials",
                "scope": scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(ehr.config.token_url, **kwargs),
            },
            timeout=10,
        )


def authorize(
    ehr,
    *,
    scope: str = "launch/patient patient/*.rs offline_access",
    challenge: str | None = None,
    method: str | None = "S256",
    client_id: str = APP,
    redirect_uri: str = REDIRECT,
    aud: str | None = None,
    state: str = "st-123",
    **extra,
) -> requests.Response:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": aud if aud is not None else ehr.fhir_base_url,
    }
    if challenge is not None:
        params["code_challenge"] = challenge
    if method is not None and challenge is not None:
        params["code_challenge_method"] = method
    params.update(extra)
    return requests.get(ehr.base_url + "/authorize", params=params, allow_redirects=False, timeout=10)


def exchange(
    ehr, code: str, verifier: str | None, *, redirect_uri: str = REDIRECT, client_id: str = APP
) -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "client_id": client_id}
    if verifier is not None:
        data["code_verifier"] = verifier
    return requests.post(ehr.config.token_url, data=data, timeout=10)


def sign_in(ehr, patient: str = "p-1", scope: str = "launch/patient patient/*.rs offline_access") -> dict:
    verifier, challenge = pkce()
    answer = authorize(ehr, scope=scope, challenge=challenge, patient=patient)
    assert answer.status_code == 302, answer.text
    code = _query(answer.headers["Location"])["code"]
    token = exchange(ehr, code, verifier)
    assert token.status_code == 200, token.text
    return token.json()


@pytest.fixture(scope="module")
def ehr():
    """An auto-approving EHR whose FHIR upstream does not exist: the OAuth flows must not need it."""
    with running_ehr(UNREACHABLE, auto_approve=True) as server:
        server.clients.register(app_client())
        yield server


# ------------------------------------------------------------------ scopes (pure)


def test_scope_grammar_v1_and_v2():
    assert parse_scope("patient/Condition.rs").permissions == frozenset("rs")
    assert parse_scope("patient/*.write").permissions == frozenset("cud")
    assert parse_scope("system/*.*").permissions == frozenset("cruds")
    assert parse_scope("launch/patient") == "launch/patient"
    for bad in (
        "patient/Condition.sr",
        "patient/Condition.x",
        "patient/condition.rs",
        "doctor/*.rs",
        "patient/*",
        "patient/*.read?x=1",
        "launch/nope",
    ):
        with pytest.raises(ScopeError):
            parse_scope(bad)


def test_allowed_scopes_compare_permissions_across_versions():
    assert allowed("patient/Condition.rs patient/CarePlan.c launch", ["patient/*.read", "launch"]) == [
        "patient/Condition.rs",
        "launch",
    ]
    assert allowed("user/Condition.rs", ["patient/*.cruds"]) == []
    assert allowed("patient/Condition.cruds", ["patient/Condition.rs"]) == []


def test_granular_and_v2_scopes_are_not_granted_when_unenforceable():
    assert enforceable(["patient/Observation.rs?category=vital-signs", "patient/Condition.rs"]) == [
        "patient/Condition.rs"
    ]
    assert enforceable(["patient/Condition.rs", "patient/Condition.read"], v2=False) == ["patient/Condition.read"]


def test_unticked_write_scopes_keep_their_reads():
    assert downgrade_writes(
        ["patient/*.cruds", "patient/CarePlan.c", "patient/*.write", "patient/*.*", "launch"], keep_write=[]
    ) == ["patient/*.rs", "patient/*.read", "launch"]
    assert downgrade_writes(["patient/CarePlan.c"], keep_write=["patient/CarePlan.c"]) == ["patient/CarePlan.c"]


# ------------------------------------------------------------------ access plan (pure)

P = "pat-a"
BASES = ("http://ehr.test/fhir", "http://hapi.test/fhir")


def _access(scope: str, patient: str | None = P) -> Access:
    return Access(tuple(resource_scopes(scope)), patient)


def _condition(patient: str, cid: str | None = None) -> dict:
    resource = {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient}"}}
    if cid:
        resource["id"] = cid
    return resource


def test_patient_search_must_name_the_patient_in_context():
    access = _access("patient/*.rs")
    assert plan_request(access, "GET", "Condition", f"patient={P}").check_answer
    plan_request(access, "GET", "Condition", f"subject=Patient/{P}&_count=5")
    plan_request(access, "GET", "Observation", f"subject={BASES[0]}/Patient/{P}", bases=BASES)
    for query in ("", "patient=pat-b", f"patient={P},pat-b", f"patient={P}&patient=pat-b", "code=M62.561"):
        with pytest.raises(Denied):
            plan_request(access, "GET", "Condition", query)
    with pytest.raises(Denied):
        plan_request(access, "GET", "Patient/pat-b")
    plan_request(access, "GET", f"Patient/{P}")


def test_interactions_need_their_permission_letter():
    access = _access("patient/Condition.rs")
    with pytest.raises(Denied, match="create on Condition"):
        plan_request(access, "POST", "Condition", body=_condition(P))
    with pytest.raises(Denied, match="search on CarePlan"):
        plan_request(access, "GET", "CarePlan", f"patient={P}")
    plan_request(_access("patient/Condition.c"), "POST", "Condition", body=_condition(P))
    plan_request(_access("patient/Condition.write"), "POST", "Condition", body=_condition(P))
    with pytest.raises(Denied, match="another|belong"):
        plan_request(_access("patient/Condition.c"), "POST", "Condition", body=_condition("pat-b"))
    plan = plan_request(_access("patient/Condition.u"), "PUT", "Condition/c1", body=_condition(P, "c1"))
    assert plan.owned == [("Condition", "c1")]


def test_transaction_entries_are_checked_one_by_one_with_bundle_local_references():
    condition_url, careplan_url = "urn:uuid:" + str(uuid.uuid4()), "urn:uuid:" + str(uuid.uuid4())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": condition_url, "resource": _condition(P), "request": {"method": "POST", "url": "Condition"}},
            {
                "fullUrl": careplan_url,
                "resource": {"resourceType": "CarePlan", "subject": {"reference": f"Patient/{P}"}},
                "request": {"method": "POST", "url": "CarePlan"},
            },
            {
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": condition_url}, {"reference": careplan_url}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    access = _access("patient/*.cruds")
    plan_request(access, "POST", "", body=bundle)
    bundle["entry"].append({"resource": _condition("pat-b"), "request": {"method": "POST", "url": "Condition"}})
    with pytest.raises(Denied, match=r"entry 3 \(POST Condition\)"):
        plan_request(access, "POST", "", body=bundle)
    with pytest.raises(Denied, match="entry 0"):
        plan_request(_access("patient/Condition.rs"), "POST", "", body=bundle)


def test_provenance_pointing_at_another_patients_entry_is_not_the_patients():
    other = "urn:uuid:" + str(uuid.uuid4())
    local = {other: _condition("pat-b")}
    provenance = {"resourceType": "Provenance", "target": [{"reference": other}]}
    assert not belongs(provenance, P, local=local)
    assert not belongs({"resourceType": "Condition", "subject": {"reference": "Group/g"}}, P)
    assert not belongs(
        {
            "resourceType": "Coverage",
            "beneficiary": {"reference": f"Patient/{P}"},
            "subscriber": {"reference": "Patient/pat-b"},
        },
        P,
    )


def test_answers_are_checked_for_type_and_patient():
    access = _access("patient/Condition.rs")
    check_answer(access, {"resourceType": "Bundle", "entry": [{"resource": _condition(P)}]})
    with pytest.raises(Denied, match="another patient"):
        check_answer(access, {"resourceType": "Bundle", "entry": [{"resource": _condition("pat-b")}]})
    with pytest.raises(Denied, match="Observation"):
        check_answer(
            access,
            {
                "resourceType": "Bundle",
                "entry": [{"resource": {"resourceType": "Observation", "subject": {"reference": f"Patient/{P}"}}}],
            },
        )
    check_answer(_access("system/*.rs", None), {"resourceType": "Bundle", "entry": [{"resource": _condition("x")}]})


def test_system_scopes_reach_every_patient_but_only_their_types():
    access = _access("system/Condition.rs system/CarePlan.c", None)
    plan_request(access, "GET", "Condition", "_lastUpdated=gt2024-01-01")
    plan_request(access, "POST", "CarePlan", body={"resourceType": "CarePlan"})
    with pytest.raises(Denied):
        plan_request(access, "POST", "Condition", body=_condition("any"))
    with pytest.raises(Denied):
        plan_request(_access("patient/*.rs", None), "GET", "Condition", f"patient={P}")  # no patient in context


def test_operations_and_odd_urls_are_refused():
    access = _access("system/*.cruds", None)
    for path in ("Patient/$everything", "Condition/../Patient", "condition", "Patient/a b"):
        with pytest.raises(Denied):
            plan_request(access, "GET", path)


# ------------------------------------------------------------------ registry and discovery


def test_client_registry_refuses_unusable_registrations(tmp_path):
    with pytest.raises(ClientConfigError):
        Client(client_id="x", token_endpoint_auth_method="private_key_jwt")  # no jwks
    with pytest.raises(ClientConfigError):
        Client(client_id="x", grant_types=["client_credentials"])  # public + client_credentials
    with pytest.raises(ClientConfigError):
        Client(client_id="x", scope=["patient/*.rx"])
    private = RSAKey.generate_key(2048).as_dict(private=True)
    with pytest.raises(ClientConfigError, match="public keys only"):
        Client(client_id="x", token_endpoint_auth_method="private_key_jwt", jwks={"keys": [private]})
    backend = Backend("svc", "ES384")
    (tmp_path / "svc.jwks.json").write_text(json.dumps(backend.jwks))
    (tmp_path / "clients.json").write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": "svc",
                        "token_endpoint_auth_method": "private_key_jwt",
                        "scope": "system/*.rs",
                        "jwks_file": "svc.jwks.json",
                    },
                    {
                        "client_id": "later",
                        "token_endpoint_auth_method": "private_key_jwt",
                        "scope": "system/*.rs",
                        "jwks_file": "missing.json",
                    },
                ]
            }
        )
    )
    registry = ClientRegistry.from_file(tmp_path / "clients.json")
    assert [c.client_id for c in registry.all()] == ["svc"]
    assert registry.get("svc").check_grant_type("client_credentials")


def test_the_example_client_file_loads():
    registry = ClientRegistry.from_file("sandbox/ehr/clients.example.json")
    assert registry.get("fhir-plugin").public


def test_discovery_document(ehr):
    for url in (
        ehr.base_url + "/.well-known/smart-configuration",
        ehr.fhir_base_url + "/.well-known/smart-configuration",
    ):
        doc = requests.get(url, timeout=10).json()
        assert doc["token_endpoint"] == ehr.base_url + "/token"
        assert doc["authorization_endpoint"] == ehr.base_url + "/authorize"
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert {
            "launch-ehr",
            "permission-v2",
            "permission-v1",
            "client-confidential-asymmetric",
            "authorize-post",
        } <= set(doc["capabilities"])
        assert {"private_key_jwt", "none", "client_secret_basic"} <= set(doc["token_endpoint_auth_methods_supported"])
    v1 = smart_configuration(EhrConfig("http://x", UNREACHABLE, permission_v1_only=True))
    assert "permission-v2" not in v1["capabilities"] and "permission-v1" in v1["capabilities"]


# ------------------------------------------------------------------ authorization code + PKCE


def test_ehr_launch_gives_the_launch_context_in_the_token(ehr):
    launched = requests.get(
        ehr.base_url + "/ehr/launch",
        params={"patient": "p-7", "encounter": "e-9", "app": LAUNCH_URL},
        allow_redirects=False,
        timeout=10,
    )
    assert launched.status_code == 302
    target = launched.headers["Location"]
    assert target.startswith(LAUNCH_URL + "?")
    params = _query(target)
    assert params["iss"] == ehr.fhir_base_url

    verifier, challenge = pkce()
    answer = authorize(
        ehr,
        scope="launch openid fhirUser patient/Condition.rs patient/CarePlan.c offline_access",
        challenge=challenge,
        launch=params["launch"],
        nonce="n-1",
        state="xyz",
    )
    assert answer.status_code == 302
    back = _query(answer.headers["Location"])
    assert answer.headers["Location"].startswith(REDIRECT + "?")
    assert back["state"] == "xyz" and "code" in back

    token = exchange(ehr, back["code"], verifier)
    assert token.status_code == 200, token.text
    assert token.headers["Cache-Control"] == "no-store"
    body = token.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    assert body["patient"] == "p-7" and body["encounter"] == "e-9"
    assert body["fhirContext"] == [{"reference": "Encounter/e-9"}]
    assert body["need_patient_banner"] is True and body["smart_style_url"].startswith(ehr.base_url)
    assert set(body["scope"].split()) == {
        "launch",
        "openid",
        "fhirUser",
        "patient/Condition.rs",
        "patient/CarePlan.c",
        "offline_access",
    }
    assert body["refresh_token"]
    keys = KeySet.import_key_set(requests.get(ehr.base_url + "/.well-known/jwks.json", timeout=10).json())
    claims = jwt.decode(body["id_token"], keys).claims
    assert claims["aud"] == APP and claims["iss"] == ehr.base_url and claims["nonce"] == "n-1"
    assert claims["fhirUser"].startswith(ehr.fhir_base_url + "/Practitioner/")

    # A launch id is single-use.
    again = authorize(ehr, scope="launch patient/Condition.rs", challenge=pkce()[1], launch=params["launch"])
    assert _query(again.headers["Location"])["error"] == "invalid_request"


def test_standalone_launch_with_patient_hint_and_authorize_post(ehr):
    verifier, challenge = pkce()
    answer = requests.post(
        ehr.base_url + "/authorize",
        data={
            "response_type": "code",
            "client_id": APP,
            "redirect_uri": REDIRECT,
            "scope": "launch/patient patient/*.rs",
            "state": "s",
            "aud": ehr.fhir_base_url,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "patient": "p-42",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302
    body = exchange(ehr, _query(answer.headers["Location"])["code"], verifier).json()
    assert body["patient"] == "p-42" and "encounter" not in body
    assert "refresh_token" not in body  # neither offline_access nor online_access asked


def test_unknown_launch_is_refused_back_to_the_app(ehr):
    answer = authorize(ehr, scope="launch patient/*.rs", challenge=pkce()[1], launch="not-a-launch")
    assert _query(answer.headers["Location"]) == {
        "error": "invalid_request",
        "error_description": "unknown, expired or used launch",
        "state": "st-123",
    }


@pytest.mark.parametrize("challenge, method", [(None, None), ("x" * 43, "plain"), ("x" * 43, None)])
def test_pkce_missing_or_plain_is_refused(ehr, challenge, method):
    answer = authorize(ehr, challenge=challenge, method=method, patient="p-1")
    assert answer.status_code == 302
    back = _query(answer.headers["Location"])
    assert back["error"] == "invalid_request" and back["state"] == "st-123" and "code" not in back


def test_wrong_or_missing_code_verifier_is_refused(ehr):
    verifier, challenge = pkce()
    code = _query(authorize(ehr, challenge=challenge, patient="p-1").headers["Location"])["code"]
    wrong = exchange(ehr, code, pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    missing = exchange(ehr, code, None)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"


def test_replayed_code_is_refused_and_its_tokens_revoked(ehr):
    verifier, challenge = pkce()
    code = _query(authorize(ehr, challenge=challenge, patient="p-1").headers["Location"])["code"]
    first = exchange(ehr, code, verifier)
    assert first.status_code == 200
    second = exchange(ehr, code, verifier)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    # RFC 6749 §4.1.2: the tokens issued from a replayed code are revoked — the proxy refuses them
    # before it would ever reach the (absent) FHIR server.
    refused = requests.get(
        ehr.fhir_base_url + "/Condition",
        params={"patient": "p-1"},
        headers={"Authorization": "Bearer " + first.json()["access_token"]},
        timeout=10,
    )
    assert refused.status_code == 401
    renewed = requests.post(
        ehr.config.token_url,
        data={"grant_type": "refresh_token", "client_id": APP, "refresh_token": first.json()["refresh_token"]},
        timeout=10,
    )
    assert renewed.json()["error"] == "invalid_grant"


def test_wrong_redirect_uri_is_never_redirected_to(ehr):
    evil = "http://127.0.0.1:8765/callback-evil"
    answer = authorize(ehr, challenge=pkce()[1], redirect_uri=evil, patient="p-1")
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert "text/html" in answer.headers["Content-Type"]
    unknown = authorize(ehr, challenge=pkce()[1], client_id="nobody", patient="p-1")
    assert unknown.status_code == 400 and "Location" not in unknown.headers
    # At the token endpoint the redirect_uri must equal the one the code was issued for.
    verifier, challenge = pkce()
    code = _query(authorize(ehr, challenge=challenge, patient="p-1").headers["Location"])["code"]
    refused = exchange(ehr, code, verifier, redirect_uri=REDIRECT + "/other")
    assert refused.json()["error"] == "invalid_grant"


def test_aud_must_be_the_fhir_base(ehr):
    for aud in ("http://127.0.0.1:1/fhir", ""):
        answer = authorize(ehr, challenge=pkce()[1], aud=aud, patient="p-1")
        back = _query(answer.headers["Location"])
        assert back["error"] == "invalid_request" and "aud" in back["error_description"]


def test_scopes_beyond_the_registration_are_not_granted(ehr):
    body = sign_in(ehr, scope="launch/patient patient/Condition.rs system/*.cruds user/*.cruds")
    assert body["scope"] == "launch/patient patient/Condition.rs"
    answer = authorize(ehr, challenge=pkce()[1], scope="system/*.rs", patient="p-1")
    assert _query(answer.headers["Location"])["error"] == "invalid_scope"


def test_confidential_symmetric_client_must_authenticate(ehr):
    ehr.clients.register(
        Client(
            "conf-app",
            redirect_uris=[REDIRECT],
            scope="launch/patient patient/*.rs online_access",
            token_endpoint_auth_method="client_secret_basic",
            client_secret="s3cret",
        )
    )
    verifier, challenge = pkce()
    answer = authorize(
        ehr, client_id="conf-app", challenge=challenge, patient="p-1", scope="launch/patient patient/*.rs online_access"
    )
    code = _query(answer.headers["Location"])["code"]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    wrong = requests.post(ehr.config.token_url, data=data, auth=("conf-app", "wrong"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    as_public = requests.post(ehr.config.token_url, data={**data, "client_id": "conf-app"}, timeout=10)
    assert as_public.json()["error"] == "invalid_client"
    right = requests.post(ehr.config.token_url, data=data, auth=("conf-app", "s3cret"), timeout=10)
    assert right.status_code == 200 and right.json()["patient"] == "p-1" and right.json()["refresh_token"]


def test_approval_page_lets_the_user_untick_write_scopes():
    with running_ehr(UNREACHABLE) as server:  # no auto-approve: the page is shown
        server.clients.register(app_client())
        verifier, challenge = pkce()
        page = authorize(
            server, challenge=challenge, scope="launch/patient patient/*.rs patient/CarePlan.c", patient="p-3"
        )
        assert page.status_code == 200 and "Approve" in page.text and "patient/CarePlan.c" in page.text
        pending = page.text.split('name="pending" value="')[1].split('"')[0]
        # The picker could not list patients (no FHIR server): it asks for an id, prefilled from the hint.
        answer = requests.post(
            server.base_url + "/authorize/consent",
            data={"pending": pending, "decision": "approve", "patient": "p-3"},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 302
        body = exchange(server, _query(answer.headers["Location"])["code"], verifier).json()
        assert body["scope"] == "launch/patient patient/*.rs" and body["patient"] == "p-3"
        # The same approval cannot be answered twice.
        replay = requests.post(
            server.base_url + "/authorize/consent", data={"pending": pending, "decision": "approve"}, timeout=10
        )
        assert replay.status_code == 400

        page = authorize(server, challenge=pkce()[1], patient="p-3")
        pending = page.text.split('name="pending" value="')[1].split('"')[0]
        denied = requests.post(
            server.base_url + "/authorize/consent",
            data={"pending": pending, "decision": "deny"},
            allow_redirects=False,
            timeout=10,
        )
        back = _query(denied.headers["Location"])
        assert back["error"] == "access_denied" and back["state"] == "st-123" and "code" not in back


def test_v1_only_server_grants_v1_scopes_only():
    with running_ehr(UNREACHABLE, auto_approve=True, permission_v1_only=True) as server:
        server.clients.register(app_client())
        body = sign_in(server, scope="launch/patient patient/Condition.rs patient/*.read")
        assert body["scope"] == "launch/patient patient/*.read"


# ------------------------------------------------------------------ backend services


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_client_credentials_with_a_signed_assertion(ehr, alg):
    backend = Backend(f"svc-{alg.lower()}-{uuid.uuid4().hex[:6]}", alg)
    ehr.clients.register(backend.client())
    answer = backend.token(ehr, scope="system/*.rs system/Condition.c system/CarePlan.c patient/*.rs")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scope"] == "system/*.rs system/Condition.c"
    assert body["expires_in"] == 300 and "refresh_token" not in body and "patient" not in body


def test_assertion_rules(ehr):
    backend = Backend(f"svc-{uuid.uuid4().hex[:6]}", "RS384")
    ehr.clients.register(backend.client())
    url = ehr.config.token_url

    def refused(answer):
        assert answer.status_code in (400, 401), answer.text
        return answer.json()["error"]

    assert refused(backend.token(ehr, lifetime=301)) == "invalid_client"  # exp − iat > 5 min
    assert refused(backend.token(ehr, lifetime=400, iat_offset=-200)) == "invalid_client"
    assert refused(backend.token(ehr, lifetime=-30)) == "invalid_client"  # expired
    assert refused(backend.token(ehr, aud=ehr.base_url)) == "invalid_client"  # aud is not the token URL
    assert refused(backend.token(ehr, iss="someone-else")) == "invalid_client"
    other = RSAKey.generate_key(2048, auto_kid=True)
    assert refused(backend.token(ehr, key=other)) == "invalid_client"  # unknown kid
    impostor = RSAKey.import_key(other.as_dict(private=True) | {"kid": backend.key.kid})
    assert refused(backend.token(ehr, key=impostor)) == "invalid_client"  # right kid, wrong key
    jti = uuid.uuid4().hex
    assert backend.token(ehr, jti=jti).status_code == 200
    assert refused(backend.token(ehr, jti=jti)) == "invalid_client"  # jti reused
    assert refused(backend.token(ehr, scope="patient/*.rs")) == "invalid_scope"
    hs = jwt.encode(
        {"alg": "HS256"},
        {"iss": backend.client_id, "sub": backend.client_id, "aud": url, "exp": int(time.time()) + 60, "jti": "j"},
        __import__("joserfc.jwk", fromlist=["OctKey"]).OctKey.generate_key(256),
    )
    answer = requests.post(
        url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": hs,
        },
        timeout=10,
    )
    assert refused(answer) == "invalid_client"
    # A public client cannot use client_credentials at all.
    public = requests.post(
        url, data={"grant_type": "client_credentials", "client_id": APP, "scope": "system/*.rs"}, timeout=10
    )
    assert refused(public) in ("invalid_client", "unauthorized_client")


def test_no_secret_reaches_the_logs(ehr, caplog):
    caplog.set_level(logging.DEBUG)
    verifier, challenge = pkce()
    code = _query(
        authorize(ehr, challenge=challenge, patient="p-1", scope="launch/patient patient/*.rs offline_access").headers[
            "Location"
        ]
    )["code"]
    token = exchange(ehr, code, verifier).json()
    renewed = requests.post(
        ehr.config.token_url,
        data={"grant_type": "refresh_token", "client_id": APP, "refresh_token": token["refresh_token"]},
        timeout=10,
    ).json()
    backend = Backend(f"svc-{uuid.uuid4().hex[:6]}", "ES384")
    ehr.clients.register(backend.client())
    assertion = backend.assertion(ehr.config.token_url)
    system = requests.post(
        ehr.config.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        timeout=10,
    ).json()
    requests.get(
        ehr.fhir_base_url + "/Condition",
        headers={"Authorization": "Bearer " + system["access_token"]},
        params={"patient": "p-1"},
        timeout=10,
    )
    secrets_seen = [
        code,
        verifier,
        assertion,
        token["access_token"],
        token["refresh_token"],
        renewed["access_token"],
        renewed["refresh_token"],
        system["access_token"],
    ]
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("sandbox", "authlib", "uvicorn", "fastapi")]
    assert any(r.name == "sandbox.ehr" for r in ours)
    text = "\n".join(r.getMessage() for r in ours)
    assert not [s for s in secrets_seen if s in text]


def test_proxy_answers_with_an_operation_outcome_when_the_fhir_server_is_down(ehr):
    token = sign_in(ehr, patient="p-1", scope="launch/patient patient/*.rs")["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    down = requests.get(ehr.fhir_base_url + "/Condition", params={"patient": "p-1"}, headers=headers, timeout=10)
    assert down.status_code == 502 and down.json()["resourceType"] == "OperationOutcome"
    xml = requests.get(
        ehr.fhir_base_url + "/Condition", params={"patient": "p-1", "_format": "xml"}, headers=headers, timeout=10
    )
    assert xml.status_code == 406


# ------------------------------------------------------------------ the proxy, against HAPI


def _hapi_transaction(base: str, entries: list[dict]) -> requests.Response:
    answer = requests.post(
        base,
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={"Content-Type": "application/fhir+json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:500]
    return answer


def _put(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


@pytest.fixture(scope="module")
def world(fhir_base_url):
    """Two patients on HAPI (ids unique to this run), three Conditions for A, one for B, and an EHR in front."""
    tag = uuid.uuid4().hex[:8]
    a, b, enc = f"ehr-{tag}-a", f"ehr-{tag}-b", f"ehr-{tag}-e"
    entries = [
        _put({"resourceType": "Patient", "id": a, "name": [{"family": "Alpha"}]}),
        _put({"resourceType": "Patient", "id": b, "name": [{"family": "Beta"}]}),
        _put(
            {
                "resourceType": "Encounter",
                "id": enc,
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": f"Patient/{a}"},
            }
        ),
    ]
    for i in range(3):
        entries.append(_put({**_condition(a, f"ehr-{tag}-ca{i}"), "code": {"text": "knee"}}))
    entries.append(_put({**_condition(b, f"ehr-{tag}-cb0"), "code": {"text": "knee"}}))
    _hapi_transaction(fhir_base_url, entries)
    with running_ehr(fhir_base_url, auto_approve=True) as server:
        server.clients.register(app_client())
        yield {"ehr": server, "a": a, "b": b, "encounter": enc, "hapi": fhir_base_url, "tag": tag}


def _get(world, path: str, token: str | None, **params) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{world['ehr'].fhir_base_url}/{path}", params=params, headers=headers, timeout=30)


def _count(base: str, rtype: str, **params) -> int:
    # HAPI reuses an identical search's results for a minute unless told not to.
    answer = requests.get(
        f"{base}/{rtype}", params={**params, "_summary": "count"}, headers={"Cache-Control": "no-cache"}, timeout=30
    )
    return answer.json()["total"]


@pytest.mark.server
def test_proxy_refuses_requests_without_a_valid_token(world):
    answer = _get(world, "Condition", None, patient=world["a"])
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert answer.json()["resourceType"] == "OperationOutcome"
    bogus = _get(world, "Condition", "not-a-token", patient=world["a"])
    assert bogus.status_code == 401 and 'error="invalid_token"' in bogus.headers["WWW-Authenticate"]
    metadata = requests.get(world["ehr"].fhir_base_url + "/metadata", timeout=60)
    assert metadata.status_code == 200
    security = metadata.json()["rest"][0]["security"]
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris == {"authorize": world["ehr"].base_url + "/authorize", "token": world["ehr"].base_url + "/token"}


@pytest.mark.server
def test_proxy_keeps_a_patient_token_to_its_patient(world):
    token = sign_in(world["ehr"], patient=world["a"], scope="launch/patient patient/*.rs")["access_token"]
    mine = _get(world, "Condition", token, patient=world["a"])
    assert mine.status_code == 200 and mine.json()["total"] >= 3
    assert {e["resource"]["subject"]["reference"] for e in mine.json()["entry"]} == {f"Patient/{world['a']}"}
    assert _get(world, "Patient/" + world["a"], token).status_code == 200
    for path, params in (
        ("Condition", {"patient": world["b"]}),
        ("Condition", {"subject": f"Patient/{world['b']}"}),
        ("Condition", {}),
        ("Patient/" + world["b"], {}),
        ("Condition/" + f"ehr-{world['tag']}-cb0", {}),
    ):
        refused = _get(world, path, token, **params)
        assert refused.status_code == 403, (path, params, refused.text)
        assert refused.json()["resourceType"] == "OperationOutcome"
    # The record batch the plugin sends: one GET per type, all for the patient in context.
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{world['a']}"}},
            {"request": {"method": "GET", "url": f"Condition?patient={world['a']}&_count=50"}},
        ],
    }
    answer = requests.post(
        world["ehr"].fhir_base_url,
        json=batch,
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["entry"][1]["resource"]["total"] >= 3


@pytest.mark.server
def test_proxy_needs_the_create_scope(world):
    token = sign_in(world["ehr"], patient=world["a"], scope="launch/patient patient/*.rs")["access_token"]
    before = _count(world["hapi"], "Condition", patient=world["a"])
    answer = requests.post(
        world["ehr"].fhir_base_url + "/Condition",
        json=_condition(world["a"]),
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 403 and "create" in answer.json()["issue"][0]["diagnostics"]
    assert _count(world["hapi"], "Condition", patient=world["a"]) == before


@pytest.mark.server
def test_proxy_transactions_all_or_nothing(world):
    token = sign_in(world["ehr"], patient=world["a"], scope="launch/patient patient/*.cruds")["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    cond_url = f"urn:uuid:{uuid.uuid4()}"
    good = [
        {
            "fullUrl": cond_url,
            "resource": {**_condition(world["a"]), "code": {"text": "draft"}},
            "request": {"method": "POST", "url": "Condition"},
        },
        {
            "resource": {
                "resourceType": "Provenance",
                "target": [{"reference": cond_url}],
                "recorded": "2024-01-01T00:00:00Z",
                "agent": [{"who": {"display": "fhir-plugin"}}],
            },
            "request": {"method": "POST", "url": "Provenance"},
        },
    ]
    bad = good + [{"resource": _condition(world["b"]), "request": {"method": "POST", "url": "Condition"}}]
    before = {p: _count(world["hapi"], "Condition", patient=world[p]) for p in ("a", "b")}
    refused = requests.post(
        world["ehr"].fhir_base_url,
        headers=headers,
        timeout=30,
        json={"resourceType": "Bundle", "type": "transaction", "entry": bad},
    )
    assert refused.status_code == 403
    assert "entry 2 (POST Condition)" in refused.json()["issue"][0]["diagnostics"]
    assert {p: _count(world["hapi"], "Condition", patient=world[p]) for p in ("a", "b")} == before

    passed = requests.post(
        world["ehr"].fhir_base_url,
        headers=headers,
        timeout=60,
        json={"resourceType": "Bundle", "type": "transaction", "entry": good},
    )
    assert passed.status_code == 200, passed.text[:500]
    assert _count(world["hapi"], "Condition", patient=world["a"]) == before["a"] + 1
    assert all(e["response"]["status"].startswith("201") for e in passed.json()["entry"])


@pytest.mark.server
def test_proxy_rewrites_links_to_its_own_base(world):
    token = sign_in(world["ehr"], patient=world["a"], scope="launch/patient patient/*.rs")["access_token"]
    page = _get(world, "Condition", token, patient=world["a"], _count="1")
    assert page.status_code == 200
    links = {link["relation"]: link["url"] for link in page.json()["link"]}
    assert links["next"].startswith(world["ehr"].fhir_base_url)
    assert all(e["fullUrl"].startswith(world["ehr"].fhir_base_url) for e in page.json()["entry"])
    assert world["hapi"] not in page.text
    following = requests.get(links["next"], headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert following.status_code == 200 and following.json()["entry"][0]["resource"]["resourceType"] == "Condition"
    assert requests.get(links["next"], timeout=30).status_code == 401

    # A create's Location header points at the proxy too.
    writer = sign_in(world["ehr"], patient=world["a"], scope="launch/patient patient/Condition.c")["access_token"]
    created = requests.post(
        world["ehr"].fhir_base_url + "/Condition",
        json=_condition(world["a"]),
        timeout=30,
        headers={"Authorization": f"Bearer {writer}", "Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text[:300]
    assert created.headers["Location"].startswith(world["ehr"].fhir_base_url + "/Condition/")


@pytest.mark.server
def test_backend_token_reads_across_patients(world):
    backend = Backend(f"svc-{uuid.uuid4().hex[:6]}", "ES384")
    world["ehr"].clients.register(backend.client(scope=("system/Condition.rs",)))
    token = backend.token(world["ehr"], scope="system/Condition.rs").json()["access_token"]
    answer = _get(world, "Condition", token, _id=f"ehr-{world['tag']}-ca0,ehr-{world['tag']}-cb0")
    assert answer.status_code == 200 and answer.json()["total"] == 2
    assert _get(world, "Patient/" + world["a"], token).status_code == 403


class Clock:
    """The EHR's clock, moved by the test instead of waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.server
def test_expiry_and_refresh(fhir_base_url, world):
    clock = Clock()
    with running_ehr(fhir_base_url, auto_approve=True, access_token_lifetime=4, clock=clock) as server:
        server.clients.register(app_client())
        first = sign_in(server, patient=world["a"], scope="launch/patient patient/*.rs offline_access")
        assert first["expires_in"] == 4

        def read(token):
            return requests.get(
                server.fhir_base_url + "/Condition",
                params={"patient": world["a"]},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )

        def refresh(refresh_token):
            return requests.post(
                server.config.token_url,
                data={"grant_type": "refresh_token", "client_id": APP, "refresh_token": refresh_token},
                timeout=10,
            )

        assert read(first["access_token"]).status_code == 200
        clock.advance(2)
        renewed = refresh(first["refresh_token"])
        assert renewed.status_code == 200, renewed.text
        second = renewed.json()
        assert second["patient"] == world["a"] and second["refresh_token"] != first["refresh_token"]
        # The old access token still dies at its own expiry; the new one lives on.
        clock.advance(2.3)
        expired = read(first["access_token"])
        assert expired.status_code == 401 and 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
        assert read(second["access_token"]).status_code == 200
        # The refresh token rotates: the old one is spent.  Presenting it again is a replay (one of the
        # two holders stole it), so the whole family dies with it (issue 11): the successor too.
        reused = refresh(first["refresh_token"])
        assert reused.json()["error"] == "invalid_grant"
        assert read(second["access_token"]).status_code == 401
        assert refresh(second["refresh_token"]).json()["error"] == "invalid_grant"


# ------------------------------------------------------------------ issue 13: the EHR's own pages


@pytest.mark.server
def test_an_unknown_patient_is_refused_before_the_approval_page(fhir_base_url):
    with running_ehr(fhir_base_url) as ehr:
        ehr.clients.register(Client("app-13", redirect_uris=[REDIRECT], launch_url=LAUNCH_URL))
        answer = requests.get(
            ehr.base_url + "/ehr/launch",
            params={"patient": "no-such-patient-13", "client_id": "app-13"},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 404 and "Location" not in answer.headers
        assert "Unknown patient" in answer.text and "<main>" in answer.text


@pytest.mark.server
def test_the_patient_list_reads_every_page_and_the_chart_embeds_the_app(fhir_base_url):
    with running_ehr(fhir_base_url) as ehr:
        ehr.clients.register(Client("app-13", redirect_uris=[REDIRECT], launch_url=LAUNCH_URL, name="App 13"))
        total = requests.get(
            f"{fhir_base_url}/Patient", params={"_summary": "count"}, headers={"Cache-Control": "no-cache"}, timeout=30
        ).json()["total"]
        page = requests.get(ehr.base_url + "/ehr", timeout=60)
        assert page.status_code == 200 and "<main>" in page.text
        rows = {m for m in re.findall(r'/ehr/chart\?patient=([^&"]+)', page.text)}
        # more than one search page of patients, every one listed (others may add patients meanwhile)
        assert len(rows) >= total > 50
        chart = requests.get(
            ehr.base_url + "/ehr/chart", params={"patient": sorted(rows)[0], "client_id": "app-13"}, timeout=10
        )
        assert '<iframe class="app" src="' + ehr.base_url + "/ehr/launch?" in chart.text.replace("&amp;", "&")
