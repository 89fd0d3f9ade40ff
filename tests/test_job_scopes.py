"""Which SMART scopes the jobs ask for, and what they do with what is granted (issue 12, item 5).

Pure rules (spelling v2 or v1 from the server's smart-configuration, reading
the granted string, narrowing the writer) and the token negotiation against a
mocked token endpoint that refuses v2 with ``invalid_scope``.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest
import requests
import responses
from joserfc.jwk import ECKey

from fhir_plugin._backend_auth import (
    ScopeRequest,
    granted_creates,
    load_signing_key,
    negotiated_session,
    scope_candidates,
)
from fhir_plugin._capabilities import ServerCapabilities
from fhir_plugin._client import FhirClient
from fhir_plugin._errors import LaunchError, ScopeRefused
from fhir_plugin._strategies import WRITE_TYPES, strategies_for
from fhir_plugin._sync import Selection, job_scopes
from fhir_plugin._write import FoldingWriter, TransactionWriter

FHIR = "https://ehr.test/fhir"
TOKEN_URL = "https://ehr.test/auth/token"
CONFIG = {
    "token_endpoint": TOKEN_URL,
    "grant_types_supported": ["client_credentials"],
    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
}
WRITE = job_scopes(Selection(group="g"), write=True)


# ---------------------------------------------------------------- spelling


def test_the_write_job_asks_to_create_apart_from_reading_in_both_spellings():
    v2, v1 = WRITE.v2().split(), WRITE.v1().split()
    assert {"system/Condition.rs", "system/Condition.cs", "system/DocumentReference.cs", "system/Group.r"} <= set(v2)
    assert {"system/Condition.read", "system/Condition.write", "system/DocumentReference.write"} <= set(v1)
    assert not any(s.endswith((".cruds", ".crs")) for s in v2)  # a refused create never costs the read
    read_only = job_scopes(Selection(), write=False)
    assert not any(".c" in s or s.endswith(".write") for s in read_only.v2().split() + read_only.v1().split())


@pytest.mark.parametrize(
    ("config", "spellings"),
    [
        ({"capabilities": ["permission-v2", "permission-v1"]}, ["v2", "v1"]),
        ({"capabilities": ["permission-v1"], "scopes_supported": ["system/*.rs"]}, ["v1"]),  # capabilities win
        ({"scopes_supported": ["openid", "system/*.read", "system/*.write"]}, ["v1"]),  # only v1 spellings listed
        ({"scopes_supported": ["system/*.rs", "system/*.read"]}, ["v2", "v1"]),
        ({}, ["v2", "v1"]),  # says nothing: v2 first, v1 if refused
        (None, ["v2", "v1"]),  # token endpoint given, no discovery
    ],
)
def test_the_servers_smart_configuration_decides_the_spelling(config, spellings):
    request = ScopeRequest(("Patient", "Condition"), creates=("Condition",))
    spelled = {"v2": request.v2(), "v1": request.v1()}
    assert scope_candidates(request, config) == [spelled[s] for s in spellings]


@pytest.mark.parametrize(
    ("granted", "creatable"),
    [
        ("system/*.read system/*.write", set(WRITE_TYPES)),  # v1 wildcard
        ("system/Condition.write system/*.read", {"Condition"}),
        ("system/Condition.cs system/DocumentReference.c system/Goal.rs", {"Condition", "DocumentReference"}),
        ("system/*.cruds", set(WRITE_TYPES)),
        ("system/*.rs system/*.read", set()),  # read only, either spelling
        ("patient/*.write user/Condition.c", set()),  # not a system grant
        ("system/Condition.c?category=problem-list-item", set()),  # a granular grant covers only some
    ],
)
def test_the_granted_scope_says_what_the_job_may_create(granted, creatable):
    assert granted_creates(granted, WRITE_TYPES) == creatable


# ---------------------------------------------------------------- the writer follows the grant


def test_types_not_granted_are_folded_like_types_the_server_cannot_create():
    client = FhirClient(FHIR)
    full = strategies_for(client, None, creatable=frozenset(WRITE_TYPES))
    assert isinstance(full.writer, TransactionWriter)  # everything granted: today's writer
    narrowed = strategies_for(client, None, creatable=frozenset({"Condition", "DocumentReference"}))
    assert isinstance(narrowed.writer, FoldingWriter)
    caps = narrowed.writer.capabilities
    assert caps.can_create("Condition") and caps.can_create("DocumentReference")
    assert not any(caps.can_create(t) for t in ("CarePlan", "Goal", "Provenance"))


def test_narrowing_keeps_what_the_server_declares_and_only_removes_create():
    statement = ServerCapabilities.assumed_open(WRITE_TYPES)
    narrowed = statement.creating_only(frozenset({"Condition"}), WRITE_TYPES)
    assert narrowed.transaction and narrowed.can_create_conditionally("Condition")
    assert not narrowed.can_create("Goal") and "search-type" in narrowed.of("Goal").interactions


# ---------------------------------------------------------------- negotiation at the token endpoint


class V1OnlyTokenEndpoint:
    """Grants v1 scopes (and only ``grant``); refuses any v2 request with invalid_scope, as Epic does."""

    def __init__(self, grant: set[str] | None = None) -> None:
        self.asked: list[str] = []
        self.grant = grant

    def __call__(self, request):
        scope = parse_qs(request.body)["scope"][0]
        self.asked.append(scope)
        if any(not s.endswith((".read", ".write", ".*")) for s in scope.split()):
            return 400, {}, json.dumps({"error": "invalid_scope", "error_description": "v2 scopes are not supported"})
        granted = [s for s in scope.split() if self.grant is None or s in self.grant]
        body = {"access_token": "tok-SECRET", "token_type": "Bearer", "expires_in": 300, "scope": " ".join(granted)}
        return 200, {}, json.dumps(body)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(ECKey.generate_key("P-384", private=True).as_pem(private=True))
    return load_signing_key(path)


@responses.activate
def test_a_refused_v2_request_is_asked_once_more_in_v1_and_the_grant_is_read(key):
    endpoint = V1OnlyTokenEndpoint(grant={"system/Patient.read", "system/Condition.read", "system/Condition.write"})
    responses.get(f"{FHIR}/.well-known/smart-configuration", json={**CONFIG, "capabilities": ["permission-v2"]})
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    session, cache, granted = negotiated_session(FHIR, "job", key, WRITE, session=requests.Session())
    assert endpoint.asked == [WRITE.v2(), WRITE.v1()]  # v2 refused once, then v1
    assert granted_creates(granted, WRITE_TYPES) == {"Condition"}
    assert cache.get() == "tok-SECRET" and cache.fetches == 1  # the negotiated token serves the run


@responses.activate
def test_a_v1_only_server_is_asked_in_v1_at_once(key):
    endpoint = V1OnlyTokenEndpoint()
    responses.get(f"{FHIR}/.well-known/smart-configuration", json={**CONFIG, "capabilities": ["permission-v1"]})
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    _, _, granted = negotiated_session(FHIR, "job", key, WRITE)
    assert endpoint.asked == [WRITE.v1()] and granted == WRITE.v1()


@responses.activate
def test_an_explicit_scope_is_asked_as_it_is_and_a_refusal_says_so(key):
    endpoint = V1OnlyTokenEndpoint()
    responses.get(f"{FHIR}/.well-known/smart-configuration", json={**CONFIG, "capabilities": ["permission-v2"]})
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    with pytest.raises(ScopeRefused, match="invalid_scope") as info:
        negotiated_session(FHIR, "job", key, "system/Condition.rs")
    assert isinstance(info.value, LaunchError) and info.value.exit_code == 9
    assert endpoint.asked == ["system/Condition.rs"]  # --scope is never respelled
    assert "SECRET" not in str(info.value)


# ---------------------------------------------------------------- the app: can the chosen writer write?

OPEN = None  # the server's creates not known: any
EPIC_LIKE = {"Condition", "DocumentReference"}.__contains__  # no CarePlan, Goal or Provenance create


@pytest.mark.parametrize(
    ("scopes", "server", "allowed", "missing"),
    [
        ("patient/*.write patient/*.read", OPEN, True, ()),
        ("patient/Condition.c patient/CarePlan.c patient/Goal.c", OPEN, True, ()),  # Provenance: named, not needed
        ("patient/Condition.c patient/DocumentReference.c", OPEN, True, ()),  # the plan as the note
        ("patient/Condition.c patient/DocumentReference.c", EPIC_LIKE, True, ()),
        ("patient/Condition.c patient/CarePlan.c patient/Goal.c", EPIC_LIKE, False, ("DocumentReference",)),
        ("patient/*.rs", OPEN, False, ("Condition", "Goal", "CarePlan")),
        ("patient/*.read", EPIC_LIKE, False, ("Condition", "DocumentReference")),
        ("patient/DocumentReference.c", OPEN, False, ("Condition",)),
    ],
)
def test_the_app_may_write_when_the_writer_for_this_server_has_what_it_needs(scopes, server, allowed, missing):
    from smart_launch._launch import write_access

    access = write_access(scopes.split(), server)
    assert (access.allowed, access.missing) == (allowed, missing)
