"""The one URL-safety check: every URL the plugin follows or fetches passes here first.

Why one function, built on ``urllib3.util.parse_url``: ``requests`` hands every
URL to that parser before it connects.  A check made with another parser
(``urllib.parse.urlsplit``) can see another host than the one the request
goes to — ``http://a:1\\@b:2/`` is host ``b`` for ``urlsplit`` and host
``a`` for urllib3 — and a bearer token then leaves its server (issue 11,
item 4).  So the host, port and scheme are read with the parser that
connects, and the forms the two parsers disagree on are refused outright:

- a backslash, raw or encoded (``%5C``);
- userinfo (``user:pass@host``): no URL the plugin follows needs one;
- dot segments in the path, raw or encoded (``..``, ``%2e%2e``): a server
  or proxy that decodes them walks out of the FHIR base;
- control characters and spaces; a scheme other than http/https; no host.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

from ._errors import UsageError

__all__ = ["safe_url", "origin", "is_absolute"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


def is_absolute(url: str) -> bool:
    """Whether ``url`` names its own scheme or host (``http:…``, ``//host…``), so it is not a base-relative path."""
    return bool(_SCHEME.match(url)) or url.startswith(("//", "\\\\", "/\\", "\\/"))


def origin(parsed: Url) -> Origin:
    """Scheme, lower-case host and port (the default one filled in) of a URL ``safe_url`` accepted."""
    scheme = (parsed.scheme or "").lower()
    return Origin(scheme, (parsed.host or "").lower(), parsed.port or (443 if scheme == "https" else 80))


def safe_url(url: str, *, what: str = "URL") -> Url:
    """``url`` parsed as ``requests`` will parse it, or UsageError when it is a form the check refuses.

    The message names the reason and never the query (it may hold patient data).
    """
    if not isinstance(url, str) or not url:
        raise UsageError(f"refusing an empty {what}")
    shown = url.split("?", 1)[0][:200]
    if "\\" in url or "%5c" in url.lower():
        raise UsageError(f"refusing the {what} {shown!r}: it holds a backslash, which URL parsers read differently")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise UsageError(f"refusing the {what} {shown!r}: it holds a space or a control character")
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise UsageError(f"refusing the {what} {shown!r}: it cannot be parsed") from exc
    if (parsed.scheme or "").lower() not in ("http", "https") or not parsed.host:
        raise UsageError(f"refusing the {what} {shown!r}: it must be an http or https URL naming a host")
    if parsed.auth is not None or "@" in (_AUTHORITY.match(url) or [""])[0]:
        raise UsageError(f"refusing the {what} {shown!r}: it carries a user name or password before the host")
    raw_path = _AUTHORITY.sub("", url.split("#", 1)[0].split("?", 1)[0], count=1)
    if any(segment in (".", "..") for segment in unquote(raw_path).split("/")):
        raise UsageError(f"refusing the {what} {shown!r}: its path has a '..' or '.' segment (raw or encoded)")
    return parsed
