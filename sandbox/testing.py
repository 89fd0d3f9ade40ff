"""The app under test: served on a free loopback port in this process, a mocked EHR, the sandbox stack.

For the tests and the benchmarks; production code never imports it.
Starlette's TestClient is not used: it needs ``httpx2``, which would switch
authlib over to it.  A real uvicorn server on 127.0.0.1 is closer to
production anyway (cookies, redirects and headers as a browser sees them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from smart_launch._serve import LiveServer, free_port

__all__ = ["free_port", "LiveServer", "live_server", "ManualClock"]


@contextlib.contextmanager
def live_server(app: Any, port: int | None = None) -> Iterator[LiveServer]:
    server = LiveServer(app, port).start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- a clock tests move by hand


class ManualClock:
    """Epoch seconds that stand still until a test calls ``advance`` (for ``create_app(clock=)`` and ``FakeEhr``).

    A test that needs a token to expire moves this clock past the expiry
    instead of sleeping; it starts at the real time so dates stay plausible.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------- a mocked EHR, for unit tests


class FakeEhr:
    """A SMART EHR and FHIR server made of ``responses`` callbacks, for tests that need branches on demand.

    ``authorize(url)`` plays the user's browser at the authorization endpoint
    and returns the redirect back to the app; the token endpoint checks the
    code (once), the PKCE verifier and the redirect URI, and grants the asked
    scopes (minus write scopes when ``read_only``).  FHIR reads are answered
    from ``resources``, a transaction stores conditional creates once.
    """

    def __init__(
        self,
        rsps: Any,
        resources: list[dict[str, Any]],
        *,
        iss: str = "http://ehr.test/fhir",
        capabilities: tuple[str, ...] = (
            "launch-ehr",
            "launch-standalone",
            "client-public",
            "context-ehr-patient",
            "permission-v2",
            "permission-v1",
        ),
        discovery: str = "well-known",
        read_only: bool = False,
        expires_in: int = 300,
        need_patient_banner: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import itertools
        import re

        self.rsps = rsps
        self.iss = iss
        self.origin = iss.rsplit("/", 1)[0]
        self.resources = {f"{r['resourceType']}/{r['id']}": r for r in resources}
        self.read_only = read_only
        self.expires_in = expires_in
        self.need_patient_banner = need_patient_banner
        self.clock = clock
        self.codes: dict[str, dict[str, Any]] = {}
        self.access_tokens: dict[str, dict[str, Any]] = {}
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.issued: list[str] = []  # every access and refresh token handed out
        self.token_requests: list[dict[str, str]] = []
        self.transactions: list[dict[str, Any]] = []
        self.created: dict[str, str] = {}  # ifNoneExist -> reference
        self._ids = itertools.count(1)
        self._re = re
        config = {
            "authorization_endpoint": f"{self.origin}/authorize",
            "token_endpoint": f"{self.origin}/token",
            "capabilities": list(capabilities),
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
        }
        if discovery == "well-known":
            rsps.get(f"{iss}/.well-known/smart-configuration", json=config)
        else:
            rsps.get(f"{iss}/.well-known/smart-configuration", status=404)
            rsps.get(
                f"{iss}/metadata",
                json={
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "fhirVersion": "4.0.1",
                    "rest": [
                        {
                            "mode": "server",
                            "security": {
                                "extension": [
                                    {
                                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                        "extension": [
                                            {"url": "authorize", "valueUri": config["authorization_endpoint"]},
                                            {"url": "token", "valueUri": config["token_endpoint"]},
                                        ],
                                    }
                                ]
                            },
                        }
                    ],
                },
            )
        rsps.add_callback("POST", f"{self.origin}/token", callback=self._token)
        rsps.add_callback("POST", iss, callback=self._bundle)
        rsps.add_callback("GET", re.compile(re.escape(iss) + r"/[A-Z][A-Za-z]+/[A-Za-z0-9.\-]+$"), callback=self._read)

    # the user's browser at /authorize
    def authorize(self, url: str, *, patient: str, encounter: str | None = None, error: str | None = None) -> str:
        from urllib.parse import parse_qs, urlencode, urlsplit

        params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        if error:
            return f"{params['redirect_uri']}?{urlencode({'error': error, 'state': params['state']})}"
        code = generate_code()
        self.codes[code] = {**params, "patient": patient, "encounter": encounter}
        return f"{params['redirect_uri']}?{urlencode({'code': code, 'state': params['state']})}"

    def _json(self, status: int, body: Any) -> tuple[int, dict[str, str], str]:
        import json

        return status, {"Content-Type": "application/json"}, json.dumps(body)

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qsl

        from authlib.oauth2.rfc7636 import create_s256_code_challenge

        form = dict(parse_qsl(request.body if isinstance(request.body, str) else request.body.decode()))
        self.token_requests.append(form)
        if form.get("grant_type") == "refresh_token":
            grant = self.refresh_tokens.get(form.get("refresh_token", ""))
            if grant is None:
                return self._json(400, {"error": "invalid_grant"})
            return self._json(200, self._issue(grant))
        grant = self.codes.pop(form.get("code", ""), None)  # single use
        if grant is None:
            return self._json(400, {"error": "invalid_grant", "error_description": "unknown or used code"})
        if (
            create_s256_code_challenge(form.get("code_verifier", "")) != grant["code_challenge"]
            or form.get("redirect_uri") != grant["redirect_uri"]
            or form.get("client_id") != grant["client_id"]
        ):
            return self._json(400, {"error": "invalid_grant"})
        scopes = grant["scope"].split()
        if self.read_only:
            scopes = [s for s in scopes if not s.endswith((".c", ".write"))]
        grant = {"scope": " ".join(scopes), "patient": grant["patient"], "encounter": grant["encounter"]}
        return self._json(200, self._issue(grant))

    def _issue(self, grant: dict[str, Any]) -> dict[str, Any]:
        access, refresh = generate_code(40), generate_code(40)
        self.access_tokens[access] = {**grant, "expires": self.clock() + self.expires_in}
        self.refresh_tokens[refresh] = grant
        self.issued += [access, refresh]
        body = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": grant["scope"],
            "refresh_token": refresh,
            "patient": grant["patient"],
            "need_patient_banner": self.need_patient_banner,
            "smart_style_url": f"{self.origin}/style.json",
        }
        if grant.get("encounter"):
            body["encounter"] = grant["encounter"]
        return body

    def _grant(self, request: Any) -> dict[str, Any] | None:
        auth = request.headers.get("Authorization", "")
        grant = self.access_tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if grant is None or grant["expires"] < self.clock():
            return None
        return grant

    def _outcome(self, status: int, text: str) -> tuple[int, dict[str, str], str]:
        return self._json(
            status,
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "security", "diagnostics": text}],
            },
        )

    def _read(self, request: Any) -> tuple[int, dict[str, str], str]:
        grant = self._grant(request)
        if grant is None:
            return self._outcome(401, "no valid token")
        ref = request.url.split(self.iss + "/", 1)[1]
        resource = self.resources.get(ref)
        if resource is None:
            return self._outcome(404, f"{ref} not found")
        return self._json(200, resource)

    def _bundle(self, request: Any) -> tuple[int, dict[str, str], str]:
        import json

        grant = self._grant(request)
        if grant is None:
            return self._outcome(401, "no valid token")
        bundle = json.loads(request.body)
        if bundle.get("type") == "transaction":
            scopes = set(grant["scope"].split())
            types = {e["resource"]["resourceType"] for e in bundle["entry"]}
            if not all(scopes & {f"patient/{t}.c", f"patient/{t}.write", "patient/*.write"} for t in types):
                return self._outcome(403, "the token has no write scope for every entry")
            self.transactions.append(bundle)
            entries: list[dict[str, Any]] = []
            for entry in bundle["entry"]:
                key = entry["request"].get("ifNoneExist") or str(next(self._ids))
                if key in self.created:
                    entries.append({"response": {"status": "200 OK", "location": self.created[key]}})
                else:
                    ref = f"{entry['resource']['resourceType']}/d{next(self._ids)}"
                    self.created[key] = ref
                    entries.append({"response": {"status": "201 Created", "location": f"{ref}/_history/1"}})
            return self._json(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
        entries = []
        for entry in bundle["entry"]:
            url = entry["request"]["url"]
            if "?" not in url:
                resource = self.resources.get(url)
                entries.append(
                    {"resource": resource, "response": {"status": "200 OK"}}
                    if resource
                    else {"response": {"status": "404 Not Found"}}
                )
                continue
            rtype, query = url.split("?", 1)
            pid = self._re.search(r"patient=([^&]+)", query).group(1)  # type: ignore[union-attr]
            if pid != grant["patient"]:
                entries.append({"response": {"status": "403 Forbidden"}})
                continue
            found = [
                r
                for r in self.resources.values()
                if r["resourceType"] == rtype
                and (r.get("subject") or r.get("patient") or {}).get("reference") == f"Patient/{pid}"
            ]
            entries.append(
                {
                    "resource": {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "total": len(found),
                        "entry": [{"resource": r, "search": {"mode": "match"}} for r in found],
                    },
                    "response": {"status": "200 OK"},
                }
            )
        return self._json(200, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})


def generate_code(length: int = 32) -> str:
    from authlib.common.security import generate_token

    return str(generate_token(length))


# ---------------------------------------------------------------- the real sandbox: EHR + app

#: what the sandbox EHR lets the app be granted (a read-only registration drops the writes)
APP_CLIENT_SCOPES = [
    "launch",
    "launch/patient",
    "openid",
    "fhirUser",
    "online_access",
    "offline_access",
    "patient/*.cruds",
    "patient/*.read",
    "patient/*.write",
]
READ_ONLY_CLIENT_SCOPES = [
    "launch",
    "launch/patient",
    "openid",
    "fhirUser",
    "online_access",
    "patient/*.rs",
    "patient/*.read",
]


class SandboxStack:
    """The sandbox EHR (auto-approve) in front of a HAPI base, and this app registered with it."""

    def __init__(self, ehr: Any, app_server: LiveServer, app: Any, client_id: str) -> None:
        self.ehr = ehr
        self.app_server = app_server
        self.app = app
        self.client_id = client_id

    @property
    def app_url(self) -> str:
        return self.app_server.url

    @property
    def iss(self) -> str:
        return str(self.ehr.fhir_base_url)

    def launch_url(self, patient: str, encounter: str | None = None) -> str:
        from urllib.parse import urlencode

        params = {"patient": patient, "client_id": self.client_id, **({"encounter": encounter} if encounter else {})}
        return f"{self.ehr.base_url}/ehr/launch?{urlencode(params)}"

    @property
    def chart_origin(self) -> str:
        """The EHR's pages as a browser reaches them on another host: its frame (on 127.0.0.1) is cross-site."""
        return self.ehr.base_url.replace("://127.0.0.1:", "://localhost:")

    def chart_url(self, patient: str, encounter: str | None = None) -> str:
        """The EHR's chart page for ``patient`` with the app embedded in a cross-site frame (issue 13)."""
        from urllib.parse import urlencode

        params = {"patient": patient, "client_id": self.client_id, **({"encounter": encounter} if encounter else {})}
        return f"{self.chart_origin}/ehr/chart?{urlencode(params)}"


@contextlib.contextmanager
def sandbox_stack(
    hapi_base: str,
    *,
    client_id: str = "fhir-plugin",
    read_only: bool = False,
    access_token_lifetime: int = 300,
    store: Any = None,
    clock: Callable[[], float] = time.time,
    cds: bool = False,
    personality: str = "hapi",
    client_scopes: list[str] | None = None,
    **app_settings: Any,
) -> Iterator[SandboxStack]:
    """Start the sandbox EHR and the app on free ports, the app registered as a public client.

    ``clock`` is the app's (``create_app(clock=)``): a test moves it to make the app see its token expire.
    ``cds=True`` makes the EHR a CDS Hooks client of the app (its patient page shows the cards) and has
    the app trust the EHR's signed JWTs.  ``personality`` shapes the EHR's proxy like a vendor's server
    (``hapi``, ``epic-like``, ``oracle-like``; issue 12).  ``client_scopes`` registers the app for exactly
    those scopes (default: everything, or read only with ``read_only``), so the EHR grants fewer than asked.
    """
    from sandbox.ehr import Client, running_ehr
    from smart_launch._app import create_app
    from smart_launch._settings import Settings

    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    ehr_settings: dict[str, Any] = {"cds_services_url": f"{app_url}/cds-services"} if cds else {}
    with running_ehr(
        hapi_base,
        auto_approve=True,
        access_token_lifetime=access_token_lifetime,
        personality=personality,
        **ehr_settings,
    ) as ehr:
        # the EHR's chart pages (on localhost and on 127.0.0.1) may frame the app, as real EHRs do
        app_settings.setdefault(
            "allowed_frame_ancestors", (ehr.base_url.replace("://127.0.0.1:", "://localhost:"), ehr.base_url)
        )
        ehr.clients.register(
            Client(
                client_id,
                redirect_uris=[f"{app_url}/callback"],
                launch_url=f"{app_url}/launch",
                name="M62.561 documentation check",
                scope=list(client_scopes or (READ_ONLY_CLIENT_SCOPES if read_only else APP_CLIENT_SCOPES)),
            )
        )
        if cds:
            from sandbox.ehr._cds_client import trust_entry
            from smart_launch._cds_auth import trust_from_json

            app_settings = {
                "cds_clients": trust_from_json([trust_entry(ehr.base_url)]),
                "cds_feedback_store": "memory",
                **app_settings,
            }
        settings = Settings(
            **{
                "client_id": client_id,
                "redirect_uri": f"{app_url}/callback",
                "allowed_issuers": (ehr.fhir_base_url,),
                "session_store": "memory",
                **app_settings,
            }
        )
        from smart_launch._store import MemoryStore

        app = create_app(settings, store=store if store is not None else MemoryStore(), clock=clock)
        with live_server(app, port) as server:
            yield SandboxStack(ehr, server, app, client_id)


def load_fresh_case(fhir_base: str, case: Any, tag: str | None = None) -> Any:
    """``case`` under new ids (``synthetic.renamed_case``), loaded straight into HAPI, not through the EHR.

    A test that writes drafts for it never changes what another test reads for the original patient.
    """
    import uuid

    from fhir_plugin.synthetic import load_into_server, renamed_case

    moved = renamed_case(case, tag or uuid.uuid4().hex[:8])
    load_into_server(fhir_base, [moved])
    return moved


def forwarding_handler(
    handle: Callable[[BaseHTTPRequestHandler, str], None], methods: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE")
) -> type[BaseHTTPRequestHandler]:
    """A quiet HTTP/1.1 request handler class that passes each request of ``methods`` to ``handle(h, method)``.

    For the tests' in-process proxies (a fault proxy, a bulk proxy) in front of the real HAPI.
    """
    attrs: dict[str, Any] = {
        "protocol_version": "HTTP/1.1",
        "log_message": lambda self, *args: None,
    }
    for method in methods:
        attrs[f"do_{method}"] = lambda self, _m=method: handle(self, _m)
    return type("ForwardingHandler", (BaseHTTPRequestHandler,), attrs)


def put_group(fhir_base: str, group_id: str, patient_ids: list[str], *, timeout: float = 60) -> str:
    """Put ``Group/<group_id>`` (an actual group of persons) with these patients as members; its id.

    The jobs take a population as a Group (``sync --group``, ``population --group``).
    """
    import requests

    body: dict[str, Any] = {
        "resourceType": "Group",
        "id": group_id,
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in patient_ids],
    }
    answer = requests.put(
        f"{fhir_base.rstrip('/')}/Group/{group_id}",
        json=body,
        timeout=timeout,
        headers={"Content-Type": "application/fhir+json"},
    )
    answer.raise_for_status()
    return group_id


def treat_loopback_as_secure() -> None:
    """Let ``requests`` send ``Secure`` cookies to http://127.0.0.1 and localhost, as browsers do.

    Browsers treat loopback as a secure context, so the app's embedded-mode cookie
    (``SameSite=None; Secure; Partitioned``) is sent there; Python's cookie jar only
    sends a ``Secure`` cookie over https.  Test clients call this once to act like a browser.
    """
    import http.cookiejar
    from urllib.parse import urlsplit

    policy = http.cookiejar.DefaultCookiePolicy
    if getattr(policy, "_fp_loopback", False):
        return
    original = policy.return_ok_secure

    def return_ok_secure(self: Any, cookie: Any, request: Any) -> bool:
        host = (urlsplit(request.get_full_url()).hostname or "").lower()
        return host in ("127.0.0.1", "localhost", "::1") or bool(original(self, cookie, request))

    policy.return_ok_secure = return_ok_secure  # type: ignore[method-assign]
    policy._fp_loopback = True  # type: ignore[attr-defined]


def without_clinician_plans(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A synthetic record without the clinician's own CarePlans: one the drafts still have a plan for.

    Since SPEC §7.1 an active plan means nothing is drafted; tests of the write paths (the sync job)
    use records like this so every patient still gets drafts (a CarePlan, its Goals, a Provenance
    around the record's own confirmed Condition).
    """
    from fhir_plugin._vocab import is_plugin_draft

    return [r for r in resources if r.get("resourceType") != "CarePlan" or is_plugin_draft(r)]


def needing_drafts(
    resources: list[dict[str, Any]], *, code: str = "M62.561", chart_code: str = "M62.56"
) -> list[dict[str, Any]]:
    """A synthetic record for which every draft is still to write (SPEC §7.1): no clinician plan, and the
    chart's Condition coded less specifically (``chart_code``), so the specific one is drafted too."""
    import copy

    out = copy.deepcopy(without_clinician_plans(resources))
    for resource in out:
        if resource.get("resourceType") == "Condition":
            for coding in (resource.get("code") or {}).get("coding") or []:
                if coding.get("code") == code:
                    coding["code"] = chart_code
    return out


def forget_folded_drafts(fhir_base: str, patient_id: str) -> int:
    """Delete the Provenances a folded write left about ``patient_id`` (targets include a plan note).

    The sandbox HAPI is shared by every personality: a Provenance about a
    DocumentReference plan note, left behind, is later matched by another
    test's transaction for the same patient and refused as "about other
    resources" (``_write.check_matches``).  Returns how many were deleted.
    """
    from fhir_plugin import FhirClient

    deleted = 0
    with FhirClient(fhir_base) as client:
        for condition in client.search("Condition", {"patient": patient_id}):
            for provenance in client.search("Provenance", {"target": f"Condition/{condition['id']}"}):
                if any(
                    str(t.get("reference", "")).startswith("DocumentReference/") for t in provenance.get("target") or []
                ):
                    client.request("DELETE", f"Provenance/{provenance['id']}")
                    deleted += 1
    return deleted


#: Debian's Chromium, which the browser tests and the launch benchmark drive through Playwright
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: headless, and quiet: no sandbox (root in CI), no GPU, no background traffic to anywhere
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextlib.contextmanager
def headless_chromium(executable: str = CHROMIUM) -> Iterator[Any]:
    """A Playwright Chromium browser on Debian's binary, closed on exit (the caller checks it exists)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
