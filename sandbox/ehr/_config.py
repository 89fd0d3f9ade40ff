"""The sandbox EHR's settings: one dataclass, built by the CLI or by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._clients import ClientRegistry


@dataclass
class EhrConfig:
    """Settings of one sandbox EHR.

    ``base_url`` is where the EHR is reached (``http://127.0.0.1:9090``); its
    FHIR base, the SMART ``iss`` and the required ``aud``, is ``base_url + "/fhir"``.
    ``fhir_upstream`` is the HAPI FHIR base the proxy forwards to.
    """

    base_url: str
    fhir_upstream: str
    clients: ClientRegistry = field(default_factory=ClientRegistry)
    auto_approve: bool = False  # no approval page: approve everything asked and allowed
    access_token_lifetime: int = 300  # seconds
    refresh_token_lifetime: int = 24 * 3600
    code_lifetime: int = 60  # RFC 6749 §4.1.2: short-lived, 10 min at most
    launch_lifetime: int = 600
    assertion_max_lifetime: int = 300  # SMART Backend Services: exp no more than 5 min ahead
    assertion_leeway: int = 10  # clock skew allowed on a client assertion's exp
    permission_v1_only: bool = False  # advertise and grant only SMART v1 scopes
    issue_id_token: bool = True  # with openid + fhirUser: an RS256 id_token
    user_id: str = "Practitioner/sandbox-clinician"  # the one simulated EHR user
    smart_style_url: str | None = None  # default: the sandbox's own style document
    upstream_timeout: float = 30.0
    cds_services_url: str | None = None  # a CDS Hooks discovery URL: the patient page shows its cards
    # The proxy refuses a request body larger than this (413), from Content-Length before reading
    # and while streaming otherwise, and only after the bearer token checked out (issue 11).
    max_request_body: int = 20 * 1024 * 1024
    # hapi | epic-like | oracle-like: what the proxy refuses and declares, and how scopes are granted (issue 12)
    personality: str = "hapi"
    #: (calls, seconds): each app (client id) may make at most this many FHIR calls in any such window;
    #: past it the proxy answers 429 with Retry-After, as metered EHRs do.  None: no limit
    rate_limit: tuple[int, float] | None = None
    # Seconds since the epoch; tests pass a clock they advance instead of sleeping.
    clock: Callable[[], float] = time.time
    #: origins besides the EHR's own that may frame its pages (the approval page inside an embedded app)
    frame_ancestors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.fhir_upstream = self.fhir_upstream.rstrip("/")
        if self.access_token_lifetime <= 0 or self.refresh_token_lifetime <= 0:
            raise ValueError("token lifetimes must be positive")
        if self.max_request_body <= 0:
            raise ValueError("max_request_body must be positive")
        if self.rate_limit is not None and (self.rate_limit[0] < 1 or not self.rate_limit[1] > 0):
            raise ValueError("rate_limit is (calls, seconds), at least one call in a positive number of seconds")
        from ._personality import personality

        if personality(self.personality).v1_scopes:
            self.permission_v1_only = True  # Epic grants v1 spellings even to apps registered with v2

    @property
    def fhir_base_url(self) -> str:
        return self.base_url + "/fhir"

    @property
    def authorize_url(self) -> str:
        return self.base_url + "/authorize"

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/.well-known/jwks.json"

    @property
    def style_url(self) -> str:
        return self.smart_style_url or self.base_url + "/smart-style.json"
