"""The sandbox EHR as one FastAPI app: discovery, authorize, token, EHR launch, FHIR proxy.

Endpoints (``B`` = the EHR's base URL, ``B/fhir`` = its FHIR base = SMART ``iss``):

- ``GET  B/.well-known/smart-configuration`` and ``B/fhir/.well-known/smart-configuration``
- ``GET  B/.well-known/jwks.json``        the key that signs id_tokens
- ``GET|POST B/authorize``                 SMART authorize (``authorize-post``)
- ``POST B/authorize/consent``             the approval page's answer
- ``POST B/token``                         authorization_code, refresh_token, client_credentials
- ``GET  B/ehr/launch?patient=&encounter=&app=|client_id=``   start an EHR launch
- ``GET  B/ehr``                           the patient list with launch links
- ``GET  B/fhir/metadata``                 open CapabilityStatement with SMART oauth-uris
- ``*    B/fhir/...``                      the proxy to HAPI (bearer token, scopes enforced)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from authlib.oauth2.rfc6749 import OAuth2Error
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from . import _pages, _scopes
from ._access import ID_RE
from ._cds_client import cds_router
from ._config import EhrConfig
from ._proxy import FHIR_JSON, FhirProxy, ProxyResponse
from ._server import SandboxAuthorizationServer, SandboxRequest
from ._store import Approval, LaunchContext, Store

log = logging.getLogger("sandbox.ehr")

CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-asymmetric",
    "client-confidential-symmetric",
    "context-passthrough-banner",
    "context-passthrough-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "permission-v2",
    "permission-v1",
    "permission-patient",
    "permission-user",
    "permission-offline",
    "permission-online",
    "authorize-post",
]
SUPPORTED_OTHER_SCOPES = [
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
]
PENDING_LIFETIME = 900
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def smart_configuration(config: EhrConfig) -> dict[str, Any]:
    """The SMART discovery document (SMART App Launch 2.x §"Conformance")."""
    caps = [c for c in CAPABILITIES if not (config.permission_v1_only and c == "permission-v2")]
    if config.issue_id_token:
        caps.append("sso-openid-connect")
    if config.permission_v1_only:
        resource = [
            "patient/*.read",
            "patient/*.write",
            "patient/*.*",
            "user/*.read",
            "user/*.write",
            "system/*.read",
            "system/*.write",
        ]
    else:
        resource = [
            "patient/*.rs",
            "patient/*.cruds",
            "user/*.rs",
            "user/*.cruds",
            "system/*.rs",
            "system/*.cruds",
            "patient/*.read",
            "patient/*.write",
            "system/*.read",
            "system/*.write",
        ]
    doc: dict[str, Any] = {
        "issuer": config.base_url,
        "authorization_endpoint": config.authorize_url,
        "token_endpoint": config.token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": SUPPORTED_OTHER_SCOPES + resource,
        "capabilities": caps,
    }
    if config.issue_id_token:
        doc["jwks_uri"] = config.jwks_url
        doc["id_token_signing_alg_values_supported"] = ["RS256"]
    return doc


def _with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class SandboxEhr:
    """The state behind the routes: config, store, authlib server, proxy."""

    def __init__(self, config: EhrConfig) -> None:
        self.config = config
        self.store = Store(clock=config.clock)
        self.server = SandboxAuthorizationServer(config, self.store)
        self.proxy = FhirProxy(config, self.store)

    # -------------------------------------------------------------- authorize

    def launch_context(self, params: dict[str, str], scope: str | None) -> tuple[LaunchContext, bool]:
        """The context a validated authorize request gets, and whether a patient must still be chosen."""
        scopes = _scopes.split(scope)
        wants_patient = "launch/patient" in scopes or _scopes.has_patient_scope(scope)
        base = LaunchContext(
            user_id=self.config.user_id, nonce=params.get("nonce"), smart_style_url=self.config.style_url
        )
        launch_id = params.get("launch")
        if launch_id:
            launch = self.store.get_launch(launch_id)
            if launch is not None:  # validated moments ago; None only if it expired in between
                fhir_context = ({"reference": f"Encounter/{launch.encounter}"},) if launch.encounter else ()
                context = dataclasses.replace(
                    base,
                    patient=launch.patient,
                    encounter=launch.encounter,
                    need_patient_banner=launch.need_patient_banner,
                    fhir_context=fhir_context,
                    launch_id=launch.launch_id,
                )
                return context, wants_patient and not launch.patient
        return base, wants_patient

    def authorize_error(self, oreq: SandboxRequest, error: OAuth2Error) -> Response:
        """RFC 6749 §4.1.2.1: back to the app only when the client and its redirect_uri are confirmed."""
        if error.redirect_uri:
            return self.server.handle_error_response(oreq, error)
        log.info("authorize refused without redirect: %s", error.error)
        return HTMLResponse(
            _pages.error_page("The authorization request was refused", f"{error.error}: {error.description or ''}"),
            status_code=400,
        )

    def consent_response(
        self,
        pending_id: str,
        client_name: str,
        scope: str,
        context: LaunchContext,
        needs_patient: bool,
        hint: str | None,
        patients: list[dict[str, str]],
        message: str = "",
    ) -> HTMLResponse:
        scopes = _scopes.split(scope)
        writes = [s for s in scopes if isinstance(p := _scopes.parse_scope(s), _scopes.ResourceScope) and p.writes]
        html = _pages.consent_page(
            action=self.config.base_url + "/authorize/consent",
            pending_id=pending_id,
            client_name=client_name,
            patient=context.patient,
            encounter=context.encounter,
            needs_patient=needs_patient,
            hint=hint,
            patients=patients,
            read_scopes=[s for s in scopes if s not in writes],
            write_scopes=writes,
            message=message,
        )
        # framed only by the EHR's own pages (an embedded app's sign-in runs in the EHR's frame), never elsewhere
        ancestors = " ".join(["'self'", *self.config.frame_ancestors])
        return HTMLResponse(html, headers={**_NO_STORE, "Content-Security-Policy": f"frame-ancestors {ancestors}"})

    def _search_all(self, resource_type: str, params: dict[str, str], cap: int = 100_000) -> list[dict[str, Any]]:
        """Every resource of a search, following the Bundle's ``next`` links (a page is never the whole list)."""
        out: list[dict[str, Any]] = []
        url: str | None = f"{self.config.fhir_upstream}/{resource_type}"
        query: dict[str, str] | None = params
        while url and len(out) < cap:
            try:
                answer = self.proxy.session().get(url, params=query, headers={"Accept": FHIR_JSON}, timeout=10)
                bundle = answer.json() if answer.status_code == 200 else {}
            except (requests.RequestException, ValueError):
                break
            out += [e.get("resource") or {} for e in bundle.get("entry") or []]
            url = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            query = None  # the next link carries its own query
        return out

    def list_patients(self, limit: int = 500) -> list[dict[str, str]]:
        """Patients on the upstream server for the picker (name and id; never logged), every page read."""
        out = []
        for resource in self._search_all("Patient", {"_count": str(limit), "_elements": "name"}):
            if resource.get("resourceType") == "Patient" and resource.get("id"):
                out.append({"id": resource["id"], "label": _patient_label(resource)})
        return out

    def patient_exists(self, patient_id: str) -> bool | None:
        """Whether the upstream server holds Patient ``patient_id``; None when it cannot be asked."""
        try:
            answer = self.proxy.session().get(
                f"{self.config.fhir_upstream}/Patient/{patient_id}",
                params={"_elements": "id"},
                headers={"Accept": FHIR_JSON},
                timeout=10,
            )
        except requests.RequestException:
            return None
        if answer.status_code in (404, 410):
            return False
        return True if answer.status_code == 200 else None

    def list_encounters(self, limit: int = 500) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for resource in self._search_all("Encounter", {"_count": str(limit), "_elements": "subject"}):
            ref = (resource.get("subject") or {}).get("reference") or ""
            if ref.startswith("Patient/") and resource.get("id"):
                out.setdefault(ref.split("/", 1)[1], []).append(resource["id"])
        return out


def _patient_label(patient: dict[str, Any]) -> str:
    for name in patient.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("given") or []), name.get("family") or ""]
        label = " ".join(p for p in parts if p)
        if label:
            return label
    return "(no name)"


def create_app(config: EhrConfig) -> FastAPI:
    """The sandbox EHR as an ASGI app.  ``app.state.ehr`` holds the live state (store, clients)."""
    ehr = SandboxEhr(config)
    app = FastAPI(title="Sandbox EHR", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ehr = ehr
    app.state.config = config
    server = ehr.server

    # -------------------------------------------------------------- discovery

    @app.get("/.well-known/smart-configuration")
    @app.get("/fhir/.well-known/smart-configuration")
    def discovery() -> JSONResponse:
        return JSONResponse(smart_configuration(config))

    @app.get("/.well-known/jwks.json")
    def jwks() -> JSONResponse:
        return JSONResponse(server.public_jwks())

    @app.get("/smart-style.json")
    def style() -> JSONResponse:
        return JSONResponse(
            {
                "color_background": "#f6f8fa",
                "color_highlight": "#0969da",
                "color_text": "#1b1f24",
                "dim_border": "#d0d7de",
                "font_family": "system-ui, sans-serif",
                "version": "0.1",
            }
        )

    # -------------------------------------------------------------- authorize

    @app.api_route("/authorize", methods=["GET", "POST"])
    async def authorize(request: Request) -> Response:
        items = list((await request.form()).multi_items()) if request.method == "POST" else []
        form = [(k, v) for k, v in items if isinstance(v, str)]
        oreq = SandboxRequest(
            request.method, str(request.url), request.headers, list(request.query_params.multi_items()), form
        )
        try:
            grant = server.get_consent_grant(oreq)
        except OAuth2Error as error:
            return ehr.authorize_error(oreq, error)
        except ValueError:  # authlib refuses to echo characters RFC 6749 forbids in descriptions
            return HTMLResponse(
                _pages.error_page("The authorization request was refused", "invalid_request: malformed parameters"),
                status_code=400,
            )
        params = oreq.params()
        context, needs_patient = ehr.launch_context(params, oreq.scope)
        hint = params.get("patient")
        if config.auto_approve:
            if needs_patient and hint and ID_RE.match(hint):
                context, needs_patient = dataclasses.replace(context, patient=hint), False
            if not needs_patient:
                return server.create_authorization_response(oreq, Approval(context), grant)
        pending = ehr.store.add_pending(params, context, needs_patient, PENDING_LIFETIME)
        patients = await run_in_threadpool(ehr.list_patients) if needs_patient else []
        client = grant.request.client
        return ehr.consent_response(
            pending.pending_id,
            client.name or client.client_id,
            oreq.scope or "",
            context,
            needs_patient,
            hint,
            patients,
        )

    @app.post("/authorize/consent")
    async def consent(request: Request) -> Response:
        form = await request.form()
        pending = ehr.store.pop_pending(str(form.get("pending") or ""))
        if pending is None:
            return HTMLResponse(
                _pages.error_page(
                    "This approval has expired", "It was already answered or waited too long; start again from the app."
                ),
                status_code=400,
            )
        oreq = SandboxRequest("GET", config.authorize_url, {}, list(pending.params.items()))
        try:
            grant = server.get_consent_grant(oreq)
        except OAuth2Error as error:
            return ehr.authorize_error(oreq, error)
        if form.get("decision") != "approve":
            log.info("authorization denied by the user: client=%s", pending.params.get("client_id"))
            return server.create_authorization_response(oreq, None, grant)
        context = pending.launch_context
        if pending.needs_patient:
            chosen = str(form.get("patient") or "").strip()
            if not ID_RE.match(chosen):
                again = ehr.store.add_pending(pending.params, context, True, PENDING_LIFETIME)
                patients = await run_in_threadpool(ehr.list_patients)
                client = grant.request.client
                return ehr.consent_response(
                    again.pending_id,
                    client.name or client.client_id,
                    oreq.scope or "",
                    context,
                    True,
                    None,
                    patients,
                    message="Choose a patient.",
                )
            context = dataclasses.replace(context, patient=chosen)
        keep = tuple(v for v in form.getlist("write_scope") if isinstance(v, str))
        return server.create_authorization_response(oreq, Approval(context, keep_write=keep), grant)

    # -------------------------------------------------------------- token

    @app.post("/token")
    async def token(request: Request) -> Response:
        form = await request.form()
        pairs = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        oreq = SandboxRequest("POST", str(request.url), request.headers, [], pairs)
        try:
            return server.create_token_response(oreq)
        except ValueError:
            return JSONResponse(
                {"error": "invalid_request", "error_description": "malformed parameters"},
                status_code=400,
                headers=_NO_STORE,
            )

    # -------------------------------------------------------------- the EHR side

    @app.get("/ehr/launch")
    def ehr_launch(request: Request) -> Response:
        q = request.query_params
        patient, encounter = q.get("patient") or None, q.get("encounter") or None
        app_url, client_id = q.get("app") or None, q.get("client_id") or None
        for label, value in (("patient", patient), ("encounter", encounter)):
            if value is not None and not ID_RE.match(value):
                return HTMLResponse(_pages.error_page("Cannot launch", f"not a FHIR id: {label}"), 400)
        client = _launch_client(config, app_url, client_id)
        if client is None:
            return HTMLResponse(
                _pages.error_page(
                    "Cannot launch",
                    "Unknown app: register a client whose launch_url (or redirect address) "
                    "is on the same origin as the app URL.",
                ),
                status_code=400,
            )
        target = app_url or client.launch_url
        if not target:
            return HTMLResponse(_pages.error_page("Cannot launch", "The app has no launch_url."), 400)
        if patient is not None:
            exists = ehr.patient_exists(patient)
            if exists is False:  # refused here, before any approval page or token (issue 13)
                return HTMLResponse(
                    _pages.error_page(
                        "Unknown patient",
                        f"There is no patient {patient} on this EHR's FHIR server, so the app "
                        "was not launched. Go back to the patient list and choose a patient there.",
                    ),
                    status_code=404,
                )
            if exists is None:  # the server could not be asked: the launch goes on, the token step will tell
                log.warning("EHR launch: could not confirm the patient on the FHIR server")
        banner = (q.get("need_patient_banner") or "true").lower() != "false"
        launch = ehr.store.add_launch(patient, encounter, client.client_id, banner, config.launch_lifetime)
        log.info("EHR launch: client=%s patient=%s encounter=%s", client.client_id, patient or "-", encounter or "-")
        return RedirectResponse(
            _with_params(target, iss=config.fhir_base_url, launch=launch.launch_id), status_code=302
        )

    @app.get("/ehr/chart")
    def ehr_chart(request: Request) -> Response:
        """A patient's chart with the app embedded in it, as Epic, PowerChart and athena show SMART apps."""
        q = request.query_params
        params = {k: q[k] for k in ("patient", "encounter", "client_id", "app", "need_patient_banner") if q.get(k)}
        for label in ("patient", "encounter"):
            if params.get(label) is not None and not ID_RE.match(params[label]):
                return HTMLResponse(_pages.error_page("Cannot open the chart", f"not a FHIR id: {label}"), 400)
        # the frame is on the EHR's configured base URL: from a page on another host it is a cross-site frame
        src = f"{config.base_url}/ehr/launch?{urlencode(params)}"
        return HTMLResponse(
            _pages.chart_page(patient=params.get("patient"), encounter=params.get("encounter"), src=src),
            headers=_NO_STORE,
        )

    @app.get("/ehr")
    async def ehr_home() -> HTMLResponse:
        patients = await run_in_threadpool(ehr.list_patients)
        encounters = await run_in_threadpool(ehr.list_encounters)
        apps = [c for c in config.clients.all() if c.launch_url]
        rows = []
        for p in patients:
            for enc in encounters.get(p["id"], [None])[:5]:
                links = {}
                for c in apps:
                    params = {"patient": p["id"], "client_id": c.client_id}
                    if enc:
                        params["encounter"] = enc
                    links[c.client_id] = "/ehr/chart?" + urlencode(params)
                rows.append({"patient": p["id"], "label": p["label"], "encounter": enc, "links": links})
        message = "" if patients else "No patients on the FHIR server (or it is not reachable)."
        return HTMLResponse(
            _pages.ehr_page(
                rows=rows,
                apps=[{"client_id": c.client_id, "name": c.name or c.client_id} for c in apps],
                message=message,
            )
        )

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ehr", status_code=302)

    # -------------------------------------------------------------- FHIR

    def _to_response(result: ProxyResponse) -> Response:
        return Response(result.body, status_code=result.status, headers=result.headers)

    @app.get("/fhir/metadata")
    async def metadata() -> Response:
        return _to_response(await run_in_threadpool(ehr.proxy.metadata))

    @app.api_route("/fhir", methods=["GET", "POST"])
    @app.api_route("/fhir/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def fhir(request: Request, path: str = "") -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        # issue 11: the token and the declared size are checked before a byte of the body is read,
        # and the body is read only up to the cap (an unauthenticated 300 MB body was buffered first)
        refused = ehr.proxy.precheck(headers)
        if refused is not None:
            return _to_response(refused)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_request_body:
                return _to_response(ehr.proxy.too_large())
            chunks.append(chunk)
        body = b"".join(chunks)
        result = await run_in_threadpool(ehr.proxy.handle, request.method, path, request.url.query, headers, body)
        return _to_response(result)

    if config.cds_services_url:  # the EHR as a CDS Hooks client (_cds_client.py)
        app.include_router(cds_router(ehr, config.cds_services_url))
    return app


def _launch_client(config: EhrConfig, app_url: str | None, client_id: str | None):
    """The registered client an EHR launch is for: by client_id, by exact launch_url, or by origin."""
    if client_id:
        client = config.clients.get(client_id)
        if client is None:
            return None
        if app_url and not _same_origin_as_client(client, app_url):
            return None
        return client
    if not app_url:
        return None
    exact = config.clients.by_launch_url(app_url)
    if exact is not None:
        return exact
    matches = [c for c in config.clients.all() if _same_origin_as_client(c, app_url)]
    return matches[0] if len(matches) == 1 else None


def _same_origin_as_client(client, url: str) -> bool:
    origin = _origin(url)
    urls = list(client.redirect_uris) + ([client.launch_url] if client.launch_url else [])
    return any(_origin(u) == origin for u in urls)
