"""SMART scopes as data: parse, compare, narrow.  Pure, no I/O.

Grammar (SMART App Launch 2.x, "Scopes and Launch Context"):

- v2 resource scopes ``<patient|user|system>/<Type|*>.<cruds>`` where the
  permission letters appear at most once each and in the order c r u d s,
  optionally followed by ``?param=value`` (granular scopes);
- v1 resource scopes ``<patient|user|system>/<Type|*>.<read|write|*>``:
  read = r+s, write = c+u+d, * = all (SMART 2.x §"Scopes for requesting
  FHIR resources", table of v1 → v2 equivalents);
- context and identity scopes: ``launch``, ``launch/patient``,
  ``launch/encounter``, ``openid``, ``fhirUser``, ``profile``,
  ``offline_access``, ``online_access``.

The sandbox does not enforce granular (``?param=``) scopes, so it never
grants them: granting less than asked is always allowed (SMART: "the server
can decide which scopes to grant"), granting a filter it cannot enforce is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CONTEXTS = ("patient", "user", "system")
PERMISSIONS = "cruds"
WRITE_PERMISSIONS = frozenset("cud")
READ_PERMISSIONS = frozenset("rs")
V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(PERMISSIONS)}
OTHER_SCOPES = frozenset(
    {"launch", "launch/patient", "launch/encounter", "openid", "fhirUser", "profile", "offline_access", "online_access"}
)

_RESOURCE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([A-Za-z*]+)(\?.*)?$")
_V2_PERMS = re.compile(r"^c?r?u?d?s?$")


class ScopeError(ValueError):
    """A scope string that is not SMART syntax."""


@dataclass(frozen=True)
class ResourceScope:
    """One resource scope, v1 or v2, with its permissions as letters of ``cruds``."""

    text: str
    context: str  # patient | user | system
    resource_type: str  # a FHIR type or "*"
    permissions: frozenset[str]
    version: int  # 1 or 2
    query: str = ""  # granular filter, "" when none

    def allows(self, permission: str, resource_type: str) -> bool:
        return permission in self.permissions and self.resource_type in ("*", resource_type)

    def covers(self, other: ResourceScope) -> bool:
        """Whether a client allowed this scope may be granted ``other``."""
        if self.context != other.context or self.query and self.query != other.query:
            return False
        if self.resource_type != "*" and self.resource_type != other.resource_type:
            return False
        return other.permissions <= self.permissions

    @property
    def writes(self) -> bool:
        return bool(self.permissions & WRITE_PERMISSIONS)

    def without_write(self) -> ResourceScope | None:
        """The same scope with c, u and d taken away; None when nothing is left."""
        left = self.permissions - WRITE_PERMISSIONS
        if not left:
            return None
        if self.version == 1:
            perms = "read"  # v1 has no finer read grant than read = r+s
            left = V1_PERMISSIONS["read"]
        else:
            perms = "".join(p for p in PERMISSIONS if p in left)
        text = f"{self.context}/{self.resource_type}.{perms}{self.query}"
        return ResourceScope(text, self.context, self.resource_type, frozenset(left), self.version, self.query)


def parse_scope(text: str) -> ResourceScope | str:
    """A resource scope, or the text itself for a context/identity scope; ScopeError otherwise."""
    if text in OTHER_SCOPES:
        return text
    match = _RESOURCE.match(text)
    if not match:
        raise ScopeError(f"not a SMART scope: {text[:80]!r}")
    context, rtype, perms, query = match.group(1), match.group(2), match.group(3), match.group(4) or ""
    if perms in V1_PERMISSIONS:
        if query:
            raise ScopeError(f"v1 scopes take no query: {text[:80]!r}")
        return ResourceScope(text, context, rtype, V1_PERMISSIONS[perms], 1)
    if perms == "*" or not _V2_PERMS.match(perms) or not perms:
        raise ScopeError(f"permissions must be read, write, * or letters of cruds in that order: {text[:80]!r}")
    return ResourceScope(text, context, rtype, frozenset(perms), 2, query)


def split(scope: str | None) -> list[str]:
    """The scope strings of a space-separated scope parameter, in order, without repeats."""
    seen: list[str] = []
    for item in (scope or "").split():
        if item not in seen:
            seen.append(item)
    return seen


def join(scopes: Iterable[str]) -> str:
    return " ".join(split(" ".join(scopes)))


def validate(scope: str | None) -> None:
    """Raise ScopeError on the first scope that is not SMART syntax."""
    for item in split(scope):
        parse_scope(item)


def resource_scopes(scope: str | None) -> list[ResourceScope]:
    """The resource scopes in a granted scope string (anything else ignored)."""
    out = []
    for item in split(scope):
        try:
            parsed = parse_scope(item)
        except ScopeError:
            continue
        if isinstance(parsed, ResourceScope):
            out.append(parsed)
    return out


def allowed(requested: str | None, client_allowed: Iterable[str]) -> list[str]:
    """The requested scopes a client's registration covers, in request order.

    A context scope is covered by the same string; a resource scope by any
    allowed resource scope of the same context whose type is * or the same
    and whose permissions include the requested ones (v1 and v2 compare by
    permissions, so ``patient/*.read`` covers ``patient/Condition.rs``).
    """
    allowed_other = set()
    allowed_resource = []
    for item in client_allowed:
        parsed = parse_scope(item)
        if isinstance(parsed, ResourceScope):
            allowed_resource.append(parsed)
        else:
            allowed_other.add(parsed)
    out = []
    for item in split(requested):
        parsed = parse_scope(item)
        if isinstance(parsed, ResourceScope):
            if any(a.covers(parsed) for a in allowed_resource):
                out.append(item)
        elif parsed in allowed_other:
            out.append(item)
    return out


def enforceable(scopes: Iterable[str], *, v2: bool = True) -> list[str]:
    """Drop what the sandbox will not grant: granular scopes, and v2 syntax when only v1 is on."""
    out = []
    for item in scopes:
        parsed = parse_scope(item)
        if isinstance(parsed, ResourceScope):
            if parsed.query or (parsed.version == 2 and not v2):
                continue
        out.append(item)
    return out


def downgrade_writes(scopes: Iterable[str], keep_write: Iterable[str]) -> list[str]:
    """The scopes after the user's choice: write scopes not in ``keep_write`` lose c, u and d."""
    keep = set(keep_write)
    out = []
    for item in scopes:
        parsed = parse_scope(item)
        if isinstance(parsed, ResourceScope) and parsed.writes and item not in keep:
            reduced = parsed.without_write()
            if reduced is not None and reduced.text not in out:
                out.append(reduced.text)
            continue
        if item not in out:
            out.append(item)
    return out


def has_patient_scope(scope: str | None) -> bool:
    return any(s.context == "patient" for s in resource_scopes(scope))
