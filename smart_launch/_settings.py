"""What the app is configured with: from code (``Settings(...)``) or the environment (``Settings.from_env``).

Environment variables (for ``fhir-plugin serve`` and uvicorn workers):

  SMART_CLIENT_ID          the client id registered with the EHR            (default fhir-plugin)
  SMART_REDIRECT_URI       this app's /callback URL, as registered          (default http://127.0.0.1:8000/callback)
  SMART_ALLOWED_ISSUERS    FHIR base URLs the app will follow, comma or space separated (required: none
                           means every launch is refused)
  SMART_FRAME_ANCESTORS    origins allowed to embed the app in a frame (default: the issuers' origins)
  SMART_SESSION_STORE      the SQLite file for sessions, or "memory"         (default var/smart-sessions.sqlite)
  SMART_PROFILE            the condition profile code                       (default M62.561)
  SMART_SCOPES             scopes to ask for instead of the defaults (SMART v2, or v1 when the EHR has only v1)
  CDS_CLIENTS              a JSON file of trusted CDS clients: [{"iss", "jwks" | "jwks_url", "jku": [...]}]
                           (none: every hook call is refused with 401)
  CDS_FEEDBACK_STORE       the SQLite file for CDS cards, feedback and JWT ids (default var/cds-feedback.sqlite)
  CDS_BASE_URL             this service's public base URL, the ``aud`` CDS clients sign for
                           (default: the URL the request came in on)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fhir_plugin import DEFAULT_PROFILE, UsageError

from ._cds_auth import CdsClientTrust, trust_from_json

__all__ = ["Settings", "normalize_issuer", "origin_of"]


def normalize_issuer(iss: str) -> str:
    """An issuer (FHIR base URL) as compared against the allow-list: lower-case scheme and host, no trailing /."""
    parts = urlsplit(iss.strip())
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ValueError(f"not a FHIR base URL: {iss!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(x for x in re.split(r"[\s,]+", value or "") if x)


@dataclass(frozen=True)
class Settings:
    """Everything ``create_app`` needs; see the module docstring for the environment names."""

    client_id: str = "fhir-plugin"
    redirect_uri: str = "http://127.0.0.1:8000/callback"
    allowed_issuers: tuple[str, ...] = ()
    #: origins that may frame the app (CSP frame-ancestors); empty: the allowed issuers' origins
    allowed_frame_ancestors: tuple[str, ...] = ()
    #: SQLite file path, or "memory"
    session_store: str = "var/smart-sessions.sqlite"
    profile_code: str = DEFAULT_PROFILE
    #: scopes to request instead of the defaults chosen from the EHR's capabilities
    scopes: str | None = None
    session_ttl: float = 8 * 3600
    launch_ttl: float = 600
    http_timeout: float = 15.0
    #: refresh the access token this many seconds before it expires
    refresh_leeway: float = 30.0
    discovery_ttl: float = 300.0
    #: CDS Hooks: the clients (EHRs) whose signed JWTs the hook endpoints accept
    cds_clients: tuple[CdsClientTrust, ...] = ()
    #: SQLite file path for CDS cards, feedback and JWT ids, or "memory"
    cds_feedback_store: str = "var/cds-feedback.sqlite"
    #: the public base URL CDS clients address (their JWT's ``aud`` is ``<base>/cds-services/<id>``)
    cds_base_url: str | None = None
    #: how drafts are written (issue 12): auto = from the EHR's CapabilityStatement, or a forced writer
    write_strategy: str = "auto"
    #: SQLite file of the ledger writer (draft identifier -> created id), for EHRs without conditional create
    ledger_store: str = "var/fhir-plugin-ledger.sqlite"
    issuers: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            normal = frozenset(normalize_issuer(i) for i in self.allowed_issuers)
        except ValueError as exc:
            raise UsageError(f"SMART_ALLOWED_ISSUERS: {exc}") from exc
        object.__setattr__(self, "issuers", normal)
        if urlsplit(self.redirect_uri).scheme not in ("http", "https"):
            raise UsageError(f"the redirect URI must be an http(s) URL, got {self.redirect_uri!r}")
        for origin in self.allowed_frame_ancestors:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise UsageError(f"a frame ancestor must be an origin like https://ehr.example.org, got {origin!r}")

    def allows(self, iss: str) -> bool:
        """Whether ``iss`` is on the allow-list (exact match after normalising case and a trailing /)."""
        try:
            return normalize_issuer(iss) in self.issuers
        except ValueError:
            return False

    def frame_ancestors(self) -> tuple[str, ...]:
        if self.allowed_frame_ancestors:
            return tuple(dict.fromkeys(self.allowed_frame_ancestors))
        return tuple(sorted({origin_of(i) for i in self.issuers}))

    @property
    def app_launch_url(self) -> str:
        """The app's SMART launch URL (a CDS card's ``smart`` link): beside the registered redirect URI."""
        return origin_of(self.redirect_uri) + "/launch"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            cds_clients=_cds_clients(env.get("CDS_CLIENTS")),
            cds_feedback_store=env.get("CDS_FEEDBACK_STORE", "var/cds-feedback.sqlite"),
            cds_base_url=(env.get("CDS_BASE_URL") or "").rstrip("/") or None,
            client_id=env.get("SMART_CLIENT_ID", "fhir-plugin"),
            redirect_uri=env.get("SMART_REDIRECT_URI", "http://127.0.0.1:8000/callback"),
            allowed_issuers=_split(env.get("SMART_ALLOWED_ISSUERS")),
            allowed_frame_ancestors=_split(env.get("SMART_FRAME_ANCESTORS")),
            session_store=env.get("SMART_SESSION_STORE", "var/smart-sessions.sqlite"),
            profile_code=env.get("SMART_PROFILE", DEFAULT_PROFILE),
            scopes=env.get("SMART_SCOPES") or None,
            write_strategy=env.get("FHIR_PLUGIN_STRATEGY") or "auto",
            ledger_store=env.get("SMART_LEDGER_STORE", "var/fhir-plugin-ledger.sqlite"),
        )


def _cds_clients(path: str | None) -> tuple[CdsClientTrust, ...]:
    """The trusted CDS clients from the ``CDS_CLIENTS`` JSON file (none when unset)."""
    if not path:
        return ()
    try:
        return trust_from_json(json.loads(open(path, encoding="utf-8").read()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"CDS_CLIENTS: cannot read trusted CDS clients from {path} ({type(exc).__name__})") from exc
