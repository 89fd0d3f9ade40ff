"""The FHIR proxy: bearer token in, scope check, HAPI behind, URLs rewritten on the way out.

The checks are :mod:`._access` (pure); this module only authenticates the
token, fetches what the plan asks, forwards with ``requests`` and rewrites
HAPI's absolute URLs (Bundle links, fullUrl, Location) to the proxy's base
so clients page and follow links through the proxy, never around it.  Bulk Data
export calls and files are allowed by :mod:`._bulk`; a metered EHR's limit is
:mod:`._throttle` (429 with Retry-After).

Logs carry the method, the resource type, the status and the time — never
the query (it may hold names), bodies, or the token.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import requests

from . import _access, _bulk, _personality, _scopes
from ._config import EhrConfig
from ._store import Store, Token
from ._throttle import Throttle

log = logging.getLogger("sandbox.ehr")

FHIR_JSON = "application/fhir+json"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
# cache-control passes through: HAPI reuses a search's results for a minute unless told no-cache,
# and an app reading just after its own write must see what it wrote
_FORWARD_REQUEST_HEADERS = (
    "content-type",
    "if-none-exist",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "prefer",
    "cache-control",
)
_FORWARD_RESPONSE_HEADERS = (
    "content-type",
    "location",
    "content-location",
    "etag",
    "last-modified",
    "retry-after",
    "x-progress",
)


def outcome(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


@dataclass
class ProxyResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fhir(cls, status: int, resource: Mapping[str, Any], headers: Mapping[str, str] | None = None):
        return cls(status, json.dumps(resource).encode(), {"Content-Type": FHIR_JSON, **(headers or {})})


def rewrite_urls(body: Any, upstream: str, proxy: str) -> Any:
    """Bundle links, fullUrls and entry locations on ``upstream`` moved to ``proxy`` (in place)."""

    def move(url: Any) -> Any:
        if isinstance(url, str) and (
            url == upstream or url.startswith(upstream + "/") or url.startswith(upstream + "?")
        ):
            return proxy + url[len(upstream) :]
        return url

    if not isinstance(body, dict):
        return body
    if body.get("resourceType") == "Bundle":
        for link in body.get("link") or []:
            if isinstance(link, dict):
                link["url"] = move(link.get("url"))
        for entry in body.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            if "fullUrl" in entry:
                entry["fullUrl"] = move(entry["fullUrl"])
            response = entry.get("response")
            if isinstance(response, dict) and "location" in response:
                response["location"] = move(response["location"])
            rewrite_urls(entry.get("resource"), upstream, proxy)
    elif body.get("resourceType") == "CapabilityStatement":
        impl = body.get("implementation")
        if isinstance(impl, dict) and "url" in impl:
            impl["url"] = move(impl["url"])
    return body


#: requests the proxy's ``seen`` and ``answered`` keep at least (at most twice as many)
RECORDED = 100_000


def _record(entries: list[Any], entry: Any) -> None:
    """Append, and past ``2 * RECORDED`` drop all but the last ``RECORDED`` (amortised: one cut per ``RECORDED``)."""
    entries.append(entry)
    if len(entries) > 2 * RECORDED:
        del entries[: len(entries) - RECORDED]


def access_for(token: Token) -> _access.Access:
    return _access.Access(tuple(_scopes.resource_scopes(token.scope)), token.context.patient)


class FhirProxy:
    """Forward authorized requests to the upstream FHIR server."""

    def __init__(self, config: EhrConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self._local = threading.local()
        self._metadata: dict[str, Any] | None = None
        self._metadata_lock = threading.Lock()
        self.personality = _personality.personality(config.personality)
        self.exports = _bulk.Exports()
        self.throttle = Throttle(*config.rate_limit, config.clock) if config.rate_limit else None
        #: (method, path) of every FHIR request the proxy was sent, for tests to show (never the query); the
        #: last ``RECORDED`` to ``2 * RECORDED`` of them, so a sandbox left running does not grow without end
        self.seen: list[tuple[str, str]] = []
        #: (method, path, status) of every FHIR request answered, for tests that count refusals (bounded alike)
        self.answered: list[tuple[str, str, int]] = []
        #: called with (method, path, status, request body as JSON or None) after the upstream answered and
        #: before the client gets the answer: a test holds it here to kill its client at a known point
        self.after_forward: Callable[[str, str, int, Any], None] | None = None

    @property
    def bases(self) -> tuple[str, str]:
        return (self.config.fhir_base_url, self.config.fhir_upstream)

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # loopback upstream; never through a proxy from the environment
            self._local.session = session
        return session

    # -------------------------------------------------------------- entry points

    def metadata(self) -> ProxyResponse:
        """The upstream CapabilityStatement with SMART's oauth-uris in rest.security (open, no token)."""
        with self._metadata_lock:
            cached = self._metadata
        if cached is None:
            try:
                answer = self.session().get(
                    self.config.fhir_upstream + "/metadata",
                    headers={"Accept": FHIR_JSON},
                    timeout=self.config.upstream_timeout,
                )
            except requests.RequestException as exc:
                return self._unreachable(exc)
            if answer.status_code != 200:
                return ProxyResponse(
                    answer.status_code, answer.content, {"Content-Type": answer.headers.get("Content-Type", FHIR_JSON)}
                )
            try:
                cached = answer.json()
            except ValueError:
                return ProxyResponse.fhir(502, outcome("exception", "the FHIR server's metadata is not JSON"))
            cached = self._add_security(rewrite_urls(cached, self.config.fhir_upstream, self.config.fhir_base_url))
            cached = _personality.rewrite_capabilities(self.personality, cached)
            with self._metadata_lock:
                self._metadata = cached
        return ProxyResponse.fhir(200, cached)

    def _add_security(self, capability: dict[str, Any]) -> dict[str, Any]:
        security = {
            "extension": [
                {
                    "url": OAUTH_URIS,
                    "extension": [
                        {"url": "authorize", "valueUri": self.config.authorize_url},
                        {"url": "token", "valueUri": self.config.token_url},
                    ],
                }
            ],
            "service": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR",
                        }
                    ],
                    "text": "OAuth2 using SMART-on-FHIR profile",
                }
            ],
        }
        rests = capability.get("rest") or [{"mode": "server"}]
        for rest in rests:
            if isinstance(rest, dict) and rest.get("mode", "server") == "server":
                rest["security"] = copy.deepcopy(security)
        capability["rest"] = rests
        return capability

    def precheck(self, headers: Mapping[str, str]) -> ProxyResponse | None:
        """What can be refused before the body is read: no valid token (401), a declared size past
        ``max_request_body`` (413).  None: read the body (at most ``max_request_body`` bytes)."""
        _, failure = self._authenticate(headers)
        if failure is not None:
            return failure
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            return ProxyResponse.fhir(400, outcome("structure", "Content-Length is not a number"))
        if declared > self.config.max_request_body:
            return self.too_large()
        return None

    def too_large(self) -> ProxyResponse:
        return ProxyResponse.fhir(
            413, outcome("too-costly", f"the request body is larger than {self.config.max_request_body} bytes")
        )

    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> ProxyResponse:
        """One proxied request (``path`` relative to the FHIR base, ``query`` raw)."""
        started = time.monotonic()
        response = self._handle(method.upper(), path.strip("/"), query, headers, body)
        _record(self.answered, (method.upper(), "/" + path.strip("/"), response.status))
        rtype = path.strip("/").split("/")[0] or "-"
        log.info(
            "fhir %s %s -> %d (%d ms)", method.upper(), rtype[:64], response.status, (time.monotonic() - started) * 1000
        )
        return response

    # -------------------------------------------------------------- the steps

    def _handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> ProxyResponse:
        _record(self.seen, (method, "/" + path))
        token, failure = self._authenticate(headers)
        if failure is not None:
            return failure
        assert token is not None
        if self.throttle is not None and (wait := self.throttle.admit(token.client_id)):
            calls, seconds = self.config.rate_limit or (0, 0)
            return ProxyResponse.fhir(
                429,
                outcome("throttled", f"more than {calls} calls in {seconds:g} s from this app; try again later"),
                {"Retry-After": str(wait)},
            )
        access = access_for(token)
        if len(body) > self.config.max_request_body:
            return self.too_large()
        call = _bulk.export_call(path)
        if call is not None:
            return self._export(call, method, path, query, headers, token)
        parts = path.split("/")
        if len(parts) == 2 and parts[0] == "Binary" and (owner := self.exports.file_owner(parts[1])) is not None:
            return self._export_file(method, path, headers, token, owner)
        if any(k == "_format" and "json" not in v for k, v in parse_qsl(query, keep_blank_values=True)):
            return ProxyResponse.fhir(406, outcome("not-supported", "the sandbox proxy speaks FHIR JSON only"))
        resource, form = None, ""
        content_type = headers.get("content-type", "")
        if body and method in ("POST", "PUT", "PATCH"):
            if "x-www-form-urlencoded" in content_type:
                form = body.decode("utf-8", "replace")
            elif "json" in content_type or not content_type:
                try:
                    resource = json.loads(body)
                except ValueError:
                    return ProxyResponse.fhir(400, outcome("structure", "the body is not JSON"))
            else:
                return ProxyResponse.fhir(415, outcome("not-supported", "send FHIR JSON (application/fhir+json)"))
        refused = _personality.refusal(self.personality, method, path, query, headers, resource)
        if refused is not None:
            return ProxyResponse.fhir(*refused)
        try:
            plan = _access.plan_request(
                access,
                method,
                path,
                query,
                body=resource,
                form=form,
                bases=self.bases,
                if_none_exist=headers.get("if-none-exist"),
            )
            for rtype, rid in plan.owned:
                existing = self._fetch_existing(rtype, rid)
                _access.check_owned(access, rtype, existing, bases=self.bases)
        except _access.Denied as exc:
            return self._denied(exc)
        except _UpstreamError as exc:
            return exc.response

        try:
            answer = self._forward(method, path, query, headers, body)
        except requests.RequestException as exc:
            return self._unreachable(exc)
        if self.after_forward is not None:
            self.after_forward(method, "/" + path, answer.status_code, resource)
        out_headers = self._answer_headers(answer)
        data: Any = None
        if answer.content and "json" in answer.headers.get("Content-Type", ""):
            try:
                data = answer.json()
            except ValueError:
                data = None
        if (plan.check_answer or plan.check_written) and answer.status_code < 300:
            if data is None and answer.content:
                return ProxyResponse.fhir(502, outcome("exception", "the FHIR server's answer is not JSON"))
            try:
                _access.check_answer(access, data, plan=plan, bases=self.bases)
            except _access.Denied as exc:
                return self._denied(exc)
        if data is not None:
            rewrite_urls(data, self.config.fhir_upstream, self.config.fhir_base_url)
            return ProxyResponse(answer.status_code, json.dumps(data).encode(), out_headers)
        return ProxyResponse(answer.status_code, answer.content, out_headers)

    def _export(
        self, call: _bulk.ExportCall, method: str, path: str, query: str, headers: Mapping[str, str], token: Token
    ) -> ProxyResponse:
        """A Bulk Data kick-off or status call: allowed by ``_bulk``, forwarded, its URLs moved to the proxy."""
        params = parse_qsl(query, keep_blank_values=True)
        try:
            if call.kind == "kickoff":
                if method != "GET":
                    raise _access.Denied("kick off an export with GET", 405)
                _bulk.check_kickoff(call, params, _scopes.resource_scopes(token.scope), self.personality.export_levels)
            else:
                if method not in ("GET", "DELETE"):
                    raise _access.Denied(f"{method} on an export's status is not supported", 405)
                job = _bulk.job_id(query)
                if job is None or self.exports.owner(job) != token.client_id:
                    # another app's export, or none: not found, whether or not it exists
                    return ProxyResponse.fhir(404, outcome("not-found", "no such export"))
        except _access.Denied as exc:
            return self._denied(exc)
        try:
            answer = self._forward(method, path, query, headers, b"")
        except requests.RequestException as exc:
            return self._unreachable(exc)
        out_headers = self._answer_headers(answer)
        if call.kind == "kickoff":
            job = _bulk.job_id(answer.headers.get("content-location", ""))
            if answer.status_code == 202 and job:
                self.exports.started(job, token.client_id)
            return ProxyResponse(answer.status_code, answer.content, out_headers)
        if method == "GET" and answer.status_code == 200:
            try:
                manifest = answer.json()
            except ValueError:
                return ProxyResponse.fhir(502, outcome("exception", "the FHIR server's export manifest is not JSON"))
            if isinstance(manifest, dict):
                manifest, files = _bulk.rewrite_manifest(manifest, self._move, self.config.fhir_upstream)
                self.exports.listed(files, token.client_id)
                out_headers["Content-Type"] = "application/json"
                return ProxyResponse(200, json.dumps(manifest).encode(), out_headers)
        return ProxyResponse(answer.status_code, answer.content, out_headers)

    def _export_file(
        self, method: str, path: str, headers: Mapping[str, str], token: Token, owner: str
    ) -> ProxyResponse:
        """One of an export's files: to the app that ran the export only, as the server sends it (NDJSON)."""
        if owner != token.client_id:
            return ProxyResponse.fhir(404, outcome("not-found", "no such file"))
        if method != "GET":
            return self._denied(_access.Denied(f"{method} on an export's file is not supported", 405))
        try:
            answer = self._forward(
                method, path, "", headers, b"", accept=headers.get("accept") or "application/fhir+ndjson"
            )
        except requests.RequestException as exc:
            return self._unreachable(exc)
        out_headers = {
            name.title(): answer.headers[name] for name in ("content-type", "etag") if name in answer.headers
        }
        return ProxyResponse(answer.status_code, answer.content, out_headers)

    def _authenticate(self, headers: Mapping[str, str]) -> tuple[Token | None, ProxyResponse | None]:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if not auth:
            return None, self._unauthorized("no bearer token", None)
        if scheme.lower() != "bearer" or not value.strip():
            return None, self._unauthorized("the Authorization header must be 'Bearer <token>'", "invalid_request")
        token = self.store.by_access_token(value.strip())
        if token is None or not token.access_valid(self.store.now()):
            # RFC 6750 §3.1: invalid_token covers expired, revoked and unknown alike.
            return None, self._unauthorized("the access token is invalid or expired", "invalid_token")
        return token, None

    def _unauthorized(self, text: str, error: str | None) -> ProxyResponse:
        challenge = 'Bearer realm="sandbox-ehr"'
        if error:
            challenge += f', error="{error}", error_description="{text}"'
        return ProxyResponse.fhir(401, outcome("login", text), {"WWW-Authenticate": challenge})

    def _denied(self, exc: _access.Denied) -> ProxyResponse:
        headers = {}
        if exc.status == 403:
            headers["WWW-Authenticate"] = 'Bearer realm="sandbox-ehr", error="insufficient_scope"'
        code = {403: "forbidden", 405: "not-supported"}.get(exc.status, "invalid")
        log.info("fhir request refused (%d): %s", exc.status, exc.message)
        return ProxyResponse.fhir(exc.status, outcome(code, exc.message), headers)

    def _unreachable(self, exc: Exception) -> ProxyResponse:
        status = 504 if isinstance(exc, requests.Timeout) else 502
        log.warning("FHIR server unreachable: %s", type(exc).__name__)
        return ProxyResponse.fhir(status, outcome("transient", "the FHIR server behind the sandbox did not answer"))

    def _answer_headers(self, answer: requests.Response) -> dict[str, str]:
        """The upstream answer's headers a client may see, their URLs moved to the proxy."""
        return {
            name.title(): self._move(answer.headers[name])
            for name in _FORWARD_RESPONSE_HEADERS
            if name in answer.headers
        }

    def _move(self, url: str) -> str:
        upstream = self.config.fhir_upstream
        if url.startswith(upstream + "/") or url == upstream:
            return self.config.fhir_base_url + url[len(upstream) :]
        return url

    def _fetch_existing(self, rtype: str, rid: str) -> dict[str, Any] | None:
        try:
            answer = self.session().get(
                f"{self.config.fhir_upstream}/{rtype}/{rid}",
                headers={"Accept": FHIR_JSON},
                timeout=self.config.upstream_timeout,
            )
        except requests.RequestException as exc:
            raise _UpstreamError(self._unreachable(exc)) from None
        if answer.status_code in (404, 410):
            return None
        if answer.status_code != 200:
            raise _UpstreamError(
                ProxyResponse.fhir(
                    502, outcome("exception", f"could not check the existing {rtype} (HTTP {answer.status_code})")
                )
            )
        try:
            return answer.json()
        except ValueError:
            raise _UpstreamError(
                ProxyResponse.fhir(502, outcome("exception", "the FHIR server's answer is not JSON"))
            ) from None

    def _forward(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes, *, accept: str = FHIR_JSON
    ):
        url = self.config.fhir_upstream + ("/" + path if path else "")
        if query:
            url += "?" + query
        out = {"Accept": accept}
        for name in _FORWARD_REQUEST_HEADERS:
            if name in headers:
                out[name] = headers[name]
        return self.session().request(
            method, url, headers=out, data=body or None, timeout=self.config.upstream_timeout, allow_redirects=False
        )


class _UpstreamError(Exception):
    def __init__(self, response: ProxyResponse) -> None:
        super().__init__(response.status)
        self.response = response
