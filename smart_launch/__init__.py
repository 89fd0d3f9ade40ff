"""The SMART on FHIR app: EHR and standalone launch, the review page, and its JSON API.

``create_app(settings)`` builds the FastAPI app from the routers in
``routes/`` and the dependencies in ``deps.py``; ``serve`` runs it under
uvicorn (``fhir-plugin serve``).  The launch steps are free functions in
``_launch`` (re-exported here); the session is a typed ``LaunchState``
(``state.py``) kept in a ``SessionStore`` (``_store``).
"""

from ._app import COOKIE, create_app
from ._launch import (
    AuthorizeRequest,
    DiscoveryCache,
    LaunchContext,
    SmartConfig,
    TokenRequest,
    authorized_session,
    build_authorize_url,
    build_token_request,
    can_write_drafts,
    choose_scopes,
    discover,
    granted_scopes,
    missing_write_scopes,
    parse_launch_context,
    send_token_request,
)
from ._serve import serve
from ._settings import Settings
from ._store import MemoryStore, SessionStore, SqliteStore, open_store
from .state import LaunchState, PendingAuthorization

__all__ = [
    "create_app",
    "Settings",
    "serve",
    "COOKIE",
    "SessionStore",
    "MemoryStore",
    "SqliteStore",
    "open_store",
    "LaunchState",
    "PendingAuthorization",
    "SmartConfig",
    "AuthorizeRequest",
    "TokenRequest",
    "LaunchContext",
    "DiscoveryCache",
    "discover",
    "choose_scopes",
    "build_authorize_url",
    "build_token_request",
    "send_token_request",
    "parse_launch_context",
    "authorized_session",
    "granted_scopes",
    "can_write_drafts",
    "missing_write_scopes",
]
