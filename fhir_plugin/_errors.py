"""The one exception tree of the plugin.

Every error the library raises on purpose is a ``PluginError``; the command
line, the web app and the sync job catch that root and show its message as
one sentence.  Lower-level errors (``requests``, ``json``, pydantic) are
translated at one boundary and chained with ``raise ... from``.

    PluginError
    ├── UsageError               the caller asked for something impossible (bad option, unknown profile)
    │   ├── DraftsRefused        the record documents another code: drafting this one would write a wrong code
    │   └── DataUnavailable      a CDS hook call brought neither the prefetch nor a FHIR server to read from (412)
    ├── ProfileError             a condition profile under profiles/ is malformed
    ├── InputError               a patient record is malformed (bad JSON, wrong resource type, R5 shape)
    ├── TransportError           the FHIR server could not be reached or did not answer in time
    ├── ServerError              the FHIR server answered with an error status
    │   ├── NotFound             404 / 410: the patient or resource does not exist
    │   ├── AuthError            401 / 403: token missing, expired, or lacking a scope
    │   └── MultipleMatches      412: a conditional operation matched more than one resource
    ├── LaunchError              a SMART launch or token exchange failed (unknown iss, bad state, ...)
    ├── NotLaunched              a page needs a finished SMART launch and this browser has none
    ├── Forbidden                the session may not do what it asked (CSRF, no write scope, another patient)
    └── StateLocked              another sync job holds the state file

Each class carries what every entry point needs to show it: ``exit_code`` for
the command line, ``http_status`` and ``title`` for the web app, so both map
an error with one attribute look-up instead of an ``isinstance`` chain.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PluginError",
    "UsageError",
    "ProfileError",
    "InputError",
    "TransportError",
    "ServerError",
    "NotFound",
    "AuthError",
    "MultipleMatches",
    "LaunchError",
    "ScopeRefused",
    "DraftsRefused",
    "DataUnavailable",
    "NotLaunched",
    "Forbidden",
    "StateLocked",
]


class PluginError(Exception):
    """Root of every error the plugin raises on purpose."""

    #: process exit code the command line uses for this family of errors
    #: (0 and 1 are the check's own answers: complete / documentation gaps)
    exit_code: int = 11
    #: HTTP status and page title the web app answers with
    http_status: int = 500
    title: str = "Something went wrong"


class UsageError(PluginError):
    """Raised when a caller passes options or arguments that cannot work."""

    exit_code = 2
    http_status = 400
    title = "Request refused"


class ProfileError(PluginError):
    """Raised when a profile folder is malformed; the message names the file and the field."""

    exit_code = 3
    http_status = 500
    title = "The condition profile is malformed"

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        where = ", ".join(x for x in (path and f"file {path}", field and f"field {field!r}") if x)
        super().__init__(f"{message} ({where})" if where else message)
        self.path = path
        self.field = field


class InputError(PluginError):
    """Raised when a patient record (a Bundle file or a server answer) is not usable R4 data."""

    exit_code = 4
    http_status = 502
    title = "The FHIR server could not be used"


class TransportError(PluginError):
    """Raised when the server cannot be reached, the connection drops, or a request times out."""

    exit_code = 5
    http_status = 502
    title = "The FHIR server could not be used"


class ServerError(PluginError):
    """Raised when the server answers with an error status; keeps the OperationOutcome."""

    exit_code = 6
    http_status = 502
    title = "The FHIR server could not be used"

    def __init__(self, message: str, *, status: int | None = None, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class NotFound(ServerError):
    """Raised on 404 or 410: the resource (often the patient) does not exist on the server."""

    exit_code = 7
    http_status = 404
    title = "Not found"


class AuthError(ServerError):
    """Raised on 401 or 403: the token is missing, expired, refused, or lacks a scope."""

    exit_code = 8
    http_status = 401
    title = "The EHR refused the app's access"


class MultipleMatches(ServerError):
    """Raised on 412: a conditional create or update matched more than one resource."""


class LaunchError(PluginError):
    """Raised when a SMART launch cannot go on: unknown issuer, bad state, failed token exchange."""

    exit_code = 9
    http_status = 400
    title = "The launch could not be completed"


class ScopeRefused(LaunchError):
    """Raised when a token endpoint answers ``invalid_scope``: the job may ask again in another SMART spelling."""


class DraftsRefused(UsageError):
    """Raised when the record documents a different code: drafting this one would write a wrong code."""


class DataUnavailable(UsageError):
    """Raised when a CDS hook call lacks the data the check needs: no prefetch for it, and no FHIR server
    (or the server could not be read with the token given). CDS Hooks 2.0: answer 412 Precondition Failed."""

    http_status = 412
    title = "Precondition Failed"


class NotLaunched(PluginError):
    """Raised when a page needs a finished launch and this browser has none (or it expired)."""

    http_status = 401
    title = "No active launch"


class Forbidden(PluginError):
    """Raised when the session may not do what it asked (bad CSRF token, no write scopes, another patient)."""

    http_status = 403
    title = "Not allowed"


class StateLocked(PluginError):
    """Raised when another sync job holds the state file: two jobs must not work the same run at once."""

    exit_code = 10
