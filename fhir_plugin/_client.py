"""The FHIR R4 client: a patient's record in one round trip, transactions out, faults survived.

Sync only, over ``requests``.  A SMART app or the backend-services job passes
authlib's ``OAuth2Session`` as ``session`` (token refresh comes with it); a
plain ``token`` adds ``Authorization: Bearer`` instead.

Every request goes through ``FhirClient._send``, where these rules hold:

- it is sent only to a URL under the FHIR base, paging ``next`` links
  included, so the bearer token never leaves the server it was issued for
  (the URL is read with urllib3's parser, as ``requests`` connects: ``_urls``);
- a search follows at most ``max_pages`` pages and a body is read, as a
  stream, up to ``max_response_bytes``: a hostile server cannot page or
  stream the client out of memory;
- every attempt, retries included, passes the client's pacer first
  (``_pace.RateLimiter``, shared by the threads using the client): at most
  ``max_requests_per_minute`` a minute when given, and after a 429 or 503
  whose ``Retry-After`` is usable, no thread sends until it has passed (EHRs meter
  the app, not the request: threads waiting out their own 429s apart would
  spend their retries together);
- 429 is always retried (the server says it did not act); 502/503/504, a 409
  (a concurrent writer's conflict), timeouts and dropped connections are retried
  only when repeating the request is harmless (GET, or a Bundle whose entries
  are all reads, PUTs, deletes or conditional creates).  The wait honours ``Retry-After``, else bounded
  exponential backoff with jitter, never more than ``max_retry_after``;
- logs carry the method, the path with query names but no values, the status
  and the time: ids only, never a token or a body.

What needs no I/O (URL checks, Retry-After, the status-to-exception map, the
batch that reads a record) is plain functions at module level.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from urllib3.util import parse_url

from ._errors import AuthError, InputError, MultipleMatches, NotFound, ServerError, TransportError, UsageError
from ._pace import RateLimiter
from ._record import CLINICAL_TYPES, PatientRecord, validate_resource
from ._urls import is_absolute, origin, safe_url
from ._vocab import PLAN_NOTE_TYPE, is_plugin_draft

__all__ = [
    "FhirClient",
    "Params",
    "PAGE_SIZE",
    "MAX_PAGES",
    "MAX_RESPONSE_BYTES",
    "error_for_status",
    "is_safe_to_repeat",
    "record_batch",
    "PLAN_NOTE_SEARCH",
    "own_plan_notes",
    "search_matches",
    "resolve_url",
    "retry_after_seconds",
    "backoff_delay",
]

log = logging.getLogger("fhir_plugin.client")

FHIR_JSON = "application/fhir+json"
#: page size asked for when reading a record; HAPI may cap it lower, then ``next`` links are followed
PAGE_SIZE = 500
#: default cap on the pages one search follows (issue 11, item 6: distinct ``next`` links forever)
MAX_PAGES = 1000
#: default cap on one response body, read as a stream and dropped past it (issue 11: 300 MB answers)
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

#: search parameters: a mapping (a list value repeats the name) or (name, value) pairs
Params = Mapping[str, Any] | Sequence[tuple[str, Any]]

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # the R4 ``id`` datatype (datatypes.html#id)
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_REPEATABLE_ENTRY_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})  # idempotent by http.html
# Statuses that mean "try again later": 429 says the request was not acted on, so it is
# retried whatever the method; a gateway's 502/504 (or a 503) may follow a request that
# was carried out, so those are retried only when repeating is harmless.  So is a 409: a
# concurrent writer's identical conditional create won (HAPI refuses the second of two such
# transactions at once), and sent again, the conditional creates find what it wrote.
_RETRY_ALWAYS = frozenset({429})
_RETRY_IF_SAFE = frozenset({409, 502, 503, 504})
#: statuses whose Retry-After speaks for the whole server, so every thread waits it out (RFC 9110 §10.2.3)
_HOLD_ALL = frozenset({429, 503})
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


# ---------------------------------------------------------------- pure parts


def _normal_base(base_url: str) -> str:
    """The base URL without a trailing slash; refuse what cannot be a FHIR base."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"the FHIR base URL must start with http:// or https:// and name a host, got {base_url!r}")
    if parts.query or parts.fragment:
        raise UsageError("the FHIR base URL must not carry a query or a fragment")
    return base_url.strip().rstrip("/")


def resolve_url(base: str, url: str) -> str:
    """The absolute URL for ``url`` (a path relative to ``base``, or an absolute URL under it).

    An absolute URL on another origin, or outside the base path, is refused with
    UsageError: the request would carry the bearer token to a server it was not
    issued for (fhir-py refuses the same).  Origins are compared as urllib3 (the
    parser ``requests`` connects with) reads them, after ``_urls.safe_url`` has
    refused the forms parsers disagree on (issue 11, item 4).
    """
    if url.startswith("//"):  # scheme-relative: the base's scheme, then the same origin check
        full = f"{urlsplit(base).scheme}:{url}"
    elif is_absolute(url):
        full = url
    elif url.startswith("?"):
        full = base + url
    else:
        full = f"{base}/{url.lstrip('/')}" if url else base
    parts, b = safe_url(full, what="request URL"), parse_url(base)
    base_path = (b.path or "").rstrip("/")
    path = parts.path or ""
    inside = path.rstrip("/") == base_path or path.startswith(base_path + "/")
    if origin(parts) != origin(b) or not inside:
        shown = f"{parts.scheme}://{parts.host}{f':{parts.port}' if parts.port else ''}{path}"
        raise UsageError(
            f"refusing to send a request to {shown}: it is not under the FHIR base {base}, "
            "and the access token must not leave its server"
        )
    return full


def _relative_path(base: str, full_url: str) -> str:
    """The path of ``full_url`` below the base, without the query (ids only, no search values)."""
    path = urlsplit(full_url).path
    base_path = urlsplit(base).path.rstrip("/")
    return path[len(base_path) :].lstrip("/") if path.startswith(base_path) else path.lstrip("/")


def _query_names(full_url: str, params: Params | None) -> list[str]:
    names = [pair.split("=", 1)[0] for pair in urlsplit(full_url).query.split("&") if pair]
    if params:
        items = params.items() if isinstance(params, Mapping) else params
        names += [str(name) for name, _ in items]
    return list(dict.fromkeys(names))


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, backoff: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Wait before retry number ``attempt`` (1-based): ``backoff * 2**(attempt-1)`` capped, with jitter.

    Half the delay is fixed and half random ("equal jitter"), so clients that
    failed together do not come back together, yet each still waits.
    """
    delay = min(cap, backoff * 2 ** (attempt - 1))
    return delay / 2 + rand() * delay / 2


def is_safe_to_repeat(bundle: Mapping[str, Any]) -> bool:
    """Whether POSTing this batch/transaction twice does no harm (so a timeout may be retried).

    True when every entry is a GET/HEAD, a PUT or a DELETE (idempotent by the
    FHIR HTTP spec), or a conditional create (``request.ifNoneExist``): a second
    try finds what the first one created instead of creating it again.
    """
    for entry in bundle.get("entry") or []:
        request = (entry or {}).get("request") or {}
        method = str(request.get("method", "")).upper()
        if method in _REPEATABLE_ENTRY_METHODS or (method == "POST" and request.get("ifNoneExist")):
            continue
        return False
    return True


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        raise UsageError(f"{value!r} is not a valid FHIR {what} id (1-64 letters, digits, '-' or '.')")
    return value


def _check_type(value: str) -> str:
    if not isinstance(value, str) or not _TYPE_NAME.fullmatch(value):
        raise UsageError(f"{value!r} is not a FHIR resource type name")
    return value


#: the search for a patient's plan-of-care notes beside ``patient=`` (US Core's patient+type): where the plugin's
#: plan is on a server without CarePlan create (issue 12, writer d); one page of them is read, no more
PLAN_NOTE_SEARCH = {"type": f"{PLAN_NOTE_TYPE['system']}|{PLAN_NOTE_TYPE['code']}", "_count": PAGE_SIZE}


def own_plan_notes(page: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plugin's own notes on one DocumentReference searchset page: the only notes a record keeps."""
    return [r for r in search_matches(page) if r.get("resourceType") == "DocumentReference" and is_plugin_draft(r)]


def record_batch(patient_id: str, types: Iterable[str] = CLINICAL_TYPES, *, plan_notes: bool = False) -> dict[str, Any]:
    """The batch Bundle that reads one patient's record: the Patient, then one search per type.

    With ``plan_notes`` a last entry searches the patient's plan-of-care notes (``PLAN_NOTE_SEARCH``).
    """
    _check_id(patient_id, "Patient")
    entries = [{"request": {"method": "GET", "url": f"Patient/{patient_id}"}}]
    for rtype in types:
        if _check_type(rtype) == "Patient":
            raise UsageError("the Patient is always read; list only the clinical types")
        entries.append({"request": {"method": "GET", "url": f"{rtype}?patient={patient_id}&_count={PAGE_SIZE}"}})
    if plan_notes:
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in PLAN_NOTE_SEARCH.items())
        entries.append({"request": {"method": "GET", "url": f"DocumentReference?patient={patient_id}&{query}"}})
    return {"resourceType": "Bundle", "type": "batch", "entry": entries}


def _is_outcome(body: Any) -> bool:
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"


def _outcome_text(outcome: Mapping[str, Any], limit: int = 300) -> str:
    """The errors an OperationOutcome reports, on one line: diagnostics, else details text."""
    issues = [i for i in outcome.get("issue") or [] if isinstance(i, dict)]
    serious = [i for i in issues if i.get("severity") in ("fatal", "error")] or issues
    texts: list[str] = []
    for issue in serious:
        details = issue.get("details") or {}
        codings = details.get("coding") or [{}]
        text = issue.get("diagnostics") or details.get("text") or codings[0].get("display")
        if isinstance(text, str) and text.strip():
            text = " ".join(text.split()).rstrip(".")
            text = text if len(text) <= limit else text[: limit - 1] + "…"
            if text not in texts:
                texts.append(text)
    return "; ".join(texts[:3])


def error_for_status(
    status: int, outcome: Mapping[str, Any] | None, *, action: str, attempts: int = 1, redact: Iterable[str] = ()
) -> ServerError:
    """The one map from an error answer to an exception (FHIR http.html status codes).

    404/410 NotFound, 401/403 AuthError, 412 MultipleMatches, anything else
    ServerError.  The message is one sentence: the action, the status, and the
    OperationOutcome's own words when the answer carried one; never the body
    otherwise (it may hold patient data).  ``redact`` lists secrets a careless
    server might echo into its diagnostics.
    """
    outcome = dict(outcome) if outcome is not None and _is_outcome(outcome) else None
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    cls: type[ServerError] = {404: NotFound, 410: NotFound, 401: AuthError, 403: AuthError, 412: MultipleMatches}.get(
        status, ServerError
    )
    details = _outcome_text(outcome) if outcome else ""
    if not details and cls is AuthError:
        details = "the access token is missing, expired, or lacks the needed scope"
    message = f"{action} failed with {status} {phrase}".rstrip()
    if attempts > 1:
        message += f" after {attempts} attempts"
    message += f": {details}." if details else "."
    for secret in redact:
        if secret:
            message = message.replace(secret, "[redacted]")
    return cls(message, status=status, outcome=outcome)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests → urllib3 → socket), each once."""
    todo, seen = [exc], set[int]()
    while todo and len(seen) < 20:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        wrapped = [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
        todo += [w for w in wrapped if isinstance(w, BaseException)]


def _transport_reason(exc: BaseException, timeout: float) -> str:
    """A few words for why a request got no answer, from the innermost cause requests wraps."""
    causes = list(_causes(exc))
    text = str(exc).lower()
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or "connection refused" in text:
        return "connection refused"
    if any(isinstance(c, socket.gaierror) for c in causes) or "name resolution" in text:
        return "host name not found"
    if isinstance(exc, requests.exceptions.SSLError) or any(isinstance(c, ssl.SSLError) for c in causes):
        return "TLS handshake failed"
    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {timeout:g} s"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, _TRANSIENT):
        return "the connection dropped before the answer was complete"
    return f"the request could not be sent ({type(exc).__name__})"


def _entry_status(entry: Mapping[str, Any]) -> int:
    """The status of a batch-response entry: ``response.status`` starts with the code ("404 Not Found")."""
    status = str((entry.get("response") or {}).get("status", "")).split(" ", 1)[0]
    if not status.isdigit():
        raise InputError("a batch-response entry has no response status")
    return int(status)


def search_matches(bundle: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A searchset page's matching resources (not ``include`` or ``outcome`` entries)."""
    for entry in bundle.get("entry") or []:
        entry = entry if isinstance(entry, dict) else {}
        resource = entry.get("resource")
        if isinstance(resource, dict) and (entry.get("search") or {}).get("mode", "match") == "match":
            yield resource


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


# ---------------------------------------------------------------- the client


class _Answer(NamedTuple):
    response: requests.Response
    attempts: int
    action: str  # "GET http://host/fhir/Patient/1": method and URL without its query, for messages
    content: bytes = b""  # the body, read under ``max_response_bytes``


class FhirClient:
    """A FHIR R4 server, reached over ``requests``; see the module docstring for the rules it keeps.

    ``retries`` is how many times a failed request is repeated, so a request is
    tried at most ``retries + 1`` times.  ``round_trips`` counts every HTTP
    request tried (retries included), for the round-trip benchmark; the sync
    job's threads share one client, so the count is kept under a lock.

    ``max_pages`` caps the pages one search follows (default ``MAX_PAGES``) and
    ``max_response_bytes`` the size of one response body (default
    ``MAX_RESPONSE_BYTES``); past either the client stops with InputError
    instead of paging or buffering forever (issue 11).

    ``max_requests_per_minute`` paces every request (retries too) to stay under
    an EHR's published limit; ``pacer`` passes a ``RateLimiter`` instead (one
    shared by several clients, or a test's clock).  Either way 429 holds all
    callers of the pacer.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_retry_after: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        max_pages: int = MAX_PAGES,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_requests_per_minute: float | None = None,
        pacer: RateLimiter | None = None,
    ) -> None:
        if pacer is not None and max_requests_per_minute is not None:
            raise UsageError("give FhirClient a max_requests_per_minute or a pacer, not both")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_retry_after < 0:
            raise UsageError("timeout must be positive; retries, backoff and max_retry_after must not be negative")
        if max_pages < 1 or max_response_bytes < 1:
            raise UsageError("max_pages and max_response_bytes must be positive")
        if pacer is None:
            pacer = RateLimiter(max_requests_per_minute, what="max_requests_per_minute", sleep=sleep)
        self._pacer = pacer
        self.max_pages = max_pages
        self.max_response_bytes = max_response_bytes
        self.base_url = _normal_base(base_url)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self.round_trips = 0
        self._trips = threading.Lock()
        self._token = token
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._sleep = sleep

    def __repr__(self) -> str:  # never the token
        return f"FhirClient({self.base_url!r})"

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session if this client made it (a session passed in belongs to the caller)."""
        if self._owns_session:
            self._session.close()

    # -- reading

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET one resource by type and id."""
        _check_id(resource_id, _check_type(resource_type))
        return self.request("GET", f"{resource_type}/{resource_id}")

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (GET metadata)."""
        return self.request("GET", "metadata")

    def search_bundle_pages(self, resource_type: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        """Each searchset Bundle page of a search, following ``next`` links (fetched lazily)."""
        first = self.request("GET", _check_type(resource_type), params=params)
        yield from self._pages(first)

    def search(self, resource_type: str, params: Params | None = None) -> list[dict[str, Any]]:
        """Every matching resource of a search, over all pages (not validated: any type may come back)."""
        return [res for page in self.search_bundle_pages(resource_type, params) for res in search_matches(page)]

    def read_patient_record(
        self, patient_id: str, *, types: Sequence[str] = CLINICAL_TYPES, plan_notes: bool = False
    ) -> PatientRecord:
        """One patient's record in one round trip: a batch of the Patient read and one search per type.

        Extra round trips happen only for searchsets longer than a page.  Every
        resource is validated as R4; a missing patient is NotFound, any other
        failed entry the ServerError its status maps to.  With ``plan_notes``
        the batch also asks for the plugin's plan notes (SPEC §7.1, after a
        folded write): one page of them, and a refused search is no notes.
        """
        batch = record_batch(patient_id, types, plan_notes=plan_notes)
        answer = self.request("POST", "", body=batch, safe_to_retry=True)
        entries = answer.get("entry") or []
        if answer.get("resourceType") != "Bundle" or len(entries) != len(batch["entry"]):
            raise InputError(f"the server did not answer the batch with one entry per request ({self.base_url})")
        notes: list[dict[str, Any]] = []
        if plan_notes:
            last = entries.pop()
            page = last.get("resource") if isinstance(last, dict) else None
            answered = str(((last.get("response") if isinstance(last, dict) else None) or {}).get("status", ""))
            if answered.startswith("2") and isinstance(page, dict) and page.get("resourceType") == "Bundle":
                notes = own_plan_notes(page)
        patient = self._entry_resource(entries[0], batch["entry"][0], patient_id=patient_id)
        if patient.get("resourceType") != "Patient":
            raise InputError(f"the server answered Patient/{patient_id} with a {patient.get('resourceType')}")
        resources = [validate_resource(patient)]
        seen: set[tuple[str, str]] = {("Patient", patient_id)}
        for rtype, entry, sent in zip(types, entries[1:], batch["entry"][1 : 1 + len(types)], strict=True):
            for page in self._pages(self._entry_resource(entry, sent)):
                for resource in search_matches(page):
                    key = (str(resource.get("resourceType")), str(resource.get("id")))
                    if key[0] != rtype or key in seen:  # skip stray types, and repeats across pages
                        continue
                    seen.add(key)
                    resources.append(validate_resource(resource))
        for note in notes:
            key = ("DocumentReference", str(note.get("id")))
            if key not in seen:
                seen.add(key)
                resources.append(validate_resource(note))
        return PatientRecord(patient_id, tuple(resources))

    # -- writing

    def transaction(self, bundle: Mapping[str, Any], *, safe_to_retry: bool | None = None) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base; return the response Bundle.

        A timeout or 5xx is retried only when ``safe_to_retry`` says so; left
        None, it is worked out from the entries (``is_safe_to_repeat``).
        """
        if (
            not isinstance(bundle, Mapping)
            or bundle.get("resourceType") != "Bundle"
            or bundle.get("type") not in ("transaction", "batch")
        ):
            raise UsageError("transaction() takes a Bundle of type 'transaction' or 'batch'")
        safe = is_safe_to_repeat(bundle) if safe_to_retry is None else safe_to_retry
        answer = self.request("POST", "", body=dict(bundle), safe_to_retry=safe)
        if answer.get("resourceType") != "Bundle":
            raise InputError(f"the server answered a transaction with a {answer.get('resourceType')}, not a Bundle")
        return answer

    def send_resource(
        self,
        method: str,
        url: str,
        resource: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        safe_to_retry: bool | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """POST or PUT one resource; the status (201 created, 200 matched or updated) and the body."""
        answer = self._send(method, url, body=dict(resource), headers=headers, safe_to_retry=safe_to_retry)
        if answer.response.status_code >= 300:
            raise self._error(answer, self._body(answer, strict=False))
        return answer.response.status_code, self._body(answer, strict=True)

    def validate(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """The server's OperationOutcome for ``POST {type}/$validate``, whether it passed or not.

        HAPI answers 200 with warnings, or 400/412/422 with the errors; all of
        those are returned.  An auth failure or an answer without an
        OperationOutcome raises as usual.
        """
        rtype = _check_type(str(resource.get("resourceType")))
        answer = self._send("POST", f"{rtype}/$validate", body=dict(resource), safe_to_retry=True)
        body = self._body(answer, strict=False)
        if answer.response.status_code in (200, 400, 412, 422) and _is_outcome(body):
            return body
        if answer.response.status_code < 300:
            raise InputError(f"the answer to {answer.action} is not an OperationOutcome")
        raise self._error(answer, body)

    # -- the low level

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        safe_to_retry: bool | None = None,
    ) -> dict[str, Any]:
        """Send one FHIR request (retried as the module docstring says) and return its JSON body.

        ``url`` is relative to the base or an absolute URL under it.  An error
        status raises (``error_for_status``); an empty success body is ``{}``.
        ``safe_to_retry`` defaults to True for GET/HEAD only.
        """
        answer = self._send(method, url, params=params, body=body, headers=headers, safe_to_retry=safe_to_retry)
        if answer.response.status_code >= 300:
            raise self._error(answer, self._body(answer, strict=False))
        return self._body(answer, strict=True)

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        safe_to_retry: bool | None = None,
    ) -> _Answer:
        """Send with retries; translate ``requests`` errors to TransportError; leave statuses to the caller."""
        method = method.upper()
        full = resolve_url(self.base_url, url)
        path = _relative_path(self.base_url, full)
        names = _query_names(full, params)
        logged = path + ("?" + "&".join(names) if names else "")  # names only: values may be patient data
        action = f"{method} {self.base_url}/{path}".rstrip("/")
        safe = method in _SAFE_METHODS if safe_to_retry is None else safe_to_retry
        # no-cache: HAPI reuses a search's results for a minute by default, and a record read just
        # after drafts were written must see them (the check would report a stale treatment-plan)
        sent_headers = {"Accept": FHIR_JSON, "Cache-Control": "no-cache", **(headers or {})}
        data = None
        if body is not None:
            sent_headers["Content-Type"] = FHIR_JSON
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if self._token:
            sent_headers["Authorization"] = f"Bearer {self._token}"
        attempt = 0
        while True:
            attempt += 1
            self._pacer.wait()
            with self._trips:
                self.round_trips += 1
            started = time.monotonic()
            try:
                # No redirects: a redirect could carry the token off the base; it surfaces as a 3xx error.
                response = self._session.request(
                    method,
                    full,
                    params=params,
                    data=data,
                    headers=sent_headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                    stream=True,
                )
                retryable = response.status_code in _RETRY_ALWAYS or (safe and response.status_code in _RETRY_IF_SAFE)
                final = attempt > self.retries or not retryable
                # read here, inside the try: a connection dropped mid-body is retried like one dropped before
                content = self._read_capped(response, action) if final else b""
            except AuthlibBaseError as exc:  # an OAuth2Session with no token, or one it could not refresh
                raise AuthError(
                    f"{action} was not sent: the access token is missing or could not be renewed "
                    f"({getattr(exc, 'error', None) or type(exc).__name__})"
                ) from exc
            except requests.RequestException as exc:
                log.debug(
                    "%s /%s failed after %.3f s: %s", method, logged, time.monotonic() - started, type(exc).__name__
                )
                if attempt > self.retries or not safe or not isinstance(exc, _TRANSIENT):
                    reason = _transport_reason(exc, self.timeout)
                    tries = f" ({attempt} attempts)" if attempt > 1 else ""
                    raise TransportError(f"could not reach {self.base_url}: {reason}{tries}") from exc
                delay = backoff_delay(attempt, self.backoff, self.max_retry_after)
            else:
                log.debug("%s /%s -> %d in %.3f s", method, logged, response.status_code, time.monotonic() - started)
                if final:
                    return _Answer(response, attempt, action, content)
                waited = retry_after_seconds(response.headers.get("Retry-After"))
                delay = (
                    backoff_delay(attempt, self.backoff, self.max_retry_after)
                    if waited is None
                    else min(waited, self.max_retry_after)
                )
                response.close()
                if response.status_code in _HOLD_ALL and waited is not None:
                    self._pacer.hold_for(delay)  # the other threads wait too; this one sleeps below
            log.info("%s /%s: retry %d of %d in %.1f s", method, logged, attempt, self.retries, delay)
            self._sleep(delay)

    def _read_capped(self, response: requests.Response, action: str) -> bytes:
        """The body, read in chunks and given up past ``max_response_bytes`` (never all buffered first)."""
        cap = self.max_response_bytes
        too_big = InputError(
            f"the answer to {action} is larger than {cap} bytes; refusing to read it "
            "(raise max_response_bytes if the server is trusted)"
        )
        try:
            declared = int(response.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        if declared > cap:
            response.close()
            raise too_big
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                size += len(chunk)
                if size > cap:
                    raise too_big
                chunks.append(chunk)
        finally:
            response.close()
        return b"".join(chunks)

    def _body(self, answer: _Answer, *, strict: bool) -> Any:
        """The parsed JSON body; with ``strict``, a JSON object or InputError, else None when unusable."""
        response = answer.response
        if not answer.content:
            return {} if strict else None
        try:
            body = json.loads(answer.content)
        except ValueError as exc:
            if not strict:
                return None
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise InputError(f"the answer to {answer.action} is not JSON ({kind})") from exc
        if strict and not isinstance(body, dict):
            raise InputError(f"the answer to {answer.action} is not a JSON object")
        return body

    def _secrets(self) -> list[str]:
        """Secrets to keep out of messages: our token, and an OAuth2Session's tokens."""
        token = getattr(self._session, "token", None)
        found = [self._token] + (
            [token.get("access_token"), token.get("refresh_token")] if isinstance(token, Mapping) else []
        )
        return [s for s in found if isinstance(s, str) and s]

    def _error(self, answer: _Answer, body: Any) -> ServerError:
        status = answer.response.status_code
        action = answer.action
        if 300 <= status < 400 and answer.response.headers.get("Location"):
            target = urlsplit(answer.response.headers["Location"])
            action += f" (redirected to {target.scheme}://{target.netloc}{target.path}; is the base URL right?)"
        return error_for_status(status, body, action=action, attempts=answer.attempts, redact=self._secrets())

    def _pages(self, first: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The first searchset page and the pages its ``next`` links lead to, refusing loops and
        stopping with InputError past ``max_pages`` (distinct links could go on forever)."""
        page, seen = first, set[str]()
        while True:
            if page.get("resourceType") != "Bundle":
                raise InputError(f"a search answer from {self.base_url} is a {page.get('resourceType')}, not a Bundle")
            yield page
            link = _next_link(page)
            if link is None:
                return
            if link in seen:
                raise InputError(f"the search paging links of {self.base_url} go round in a loop")
            if len(seen) + 1 >= self.max_pages:
                raise InputError(
                    f"a search on {self.base_url} has more than {self.max_pages} pages; "
                    "stopping (raise max_pages if that is expected)"
                )
            seen.add(link)
            page = self.request("GET", link)

    def _entry_resource(
        self, entry: Mapping[str, Any], sent: Mapping[str, Any], *, patient_id: str | None = None
    ) -> dict[str, Any]:
        """The resource of a batch-response entry, or the exception its status maps to."""
        status = _entry_status(entry)
        resource = entry.get("resource")
        if status < 300 and isinstance(resource, dict):
            return resource
        outcome = (entry.get("response") or {}).get("outcome") or resource
        if patient_id is not None and status in (404, 410):
            raise NotFound(
                f"patient {patient_id} was not found on {self.base_url}",
                status=status,
                outcome=outcome if _is_outcome(outcome) else None,
            )
        if status < 300:
            raise InputError(f"the batch answer to {sent['request']['url'].split('?')[0]} holds no resource")
        path = sent["request"]["url"].split("?")[0]
        raise error_for_status(
            status, outcome, action=f"GET {self.base_url}/{path} (in a batch)", redact=self._secrets()
        )
