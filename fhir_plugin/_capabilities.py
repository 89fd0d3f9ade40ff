"""What a FHIR server says it can do, read from its CapabilityStatement (FHIR ``metadata``).

Pure parsing: ``ServerCapabilities.from_statement`` takes the statement as
JSON and answers the questions the reader and writer choice asks — batch?
transaction? may this type be created, conditionally? searched by which
parameters?  ``capabilities_of(client)`` fetches the statement once per
server and process (again after an hour), so every patient of a run costs no
extra round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._client import FhirClient

__all__ = ["ServerCapabilities", "TypeCapabilities", "capabilities_of", "CAPABILITIES_TTL"]


@dataclass(frozen=True)
class TypeCapabilities:
    """One ``rest.resource`` entry: its interactions, conditional create, and search parameter names."""

    interactions: frozenset[str] = frozenset()
    conditional_create: bool = False
    search_params: frozenset[str] = frozenset()
    #: ``supportedProfile`` canonicals: which US Core Condition category a server takes is said there
    profiles: frozenset[str] = frozenset()

    @property
    def creatable(self) -> bool:
        return "create" in self.interactions

    @property
    def searchable(self) -> bool:
        return "search-type" in self.interactions


@dataclass(frozen=True)
class ServerCapabilities:
    """The server side of a CapabilityStatement (``rest.mode`` server), reduced to what the plugin asks."""

    system: frozenset[str] = frozenset()
    types: Mapping[str, TypeCapabilities] = field(default_factory=dict)
    declared: bool = True

    @classmethod
    def from_statement(cls, statement: Mapping[str, Any] | None) -> ServerCapabilities:
        """Parse a CapabilityStatement; anything malformed reads as "not declared", never as an error."""
        if not isinstance(statement, Mapping) or statement.get("resourceType") != "CapabilityStatement":
            return cls(declared=False)
        system: set[str] = set()
        types: dict[str, TypeCapabilities] = {}
        for rest in statement.get("rest") or []:
            if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
                continue
            system.update(_codes(rest.get("interaction")))
            for resource in rest.get("resource") or []:
                if not isinstance(resource, Mapping) or not isinstance(resource.get("type"), str):
                    continue
                params = {p.get("name") for p in resource.get("searchParam") or [] if isinstance(p, Mapping)}
                types[resource["type"]] = TypeCapabilities(
                    interactions=frozenset(_codes(resource.get("interaction"))),
                    conditional_create=resource.get("conditionalCreate") is True,
                    search_params=frozenset(p for p in params if isinstance(p, str)),
                    profiles=frozenset(p for p in resource.get("supportedProfile") or [] if isinstance(p, str)),
                )
        return cls(frozenset(system), types)

    @classmethod
    def assumed_open(cls, types: tuple[str, ...]) -> ServerCapabilities:
        """What an open server (no statement at hand) is taken to offer: batch, transaction, conditional create."""
        every = TypeCapabilities(frozenset({"read", "search-type", "create"}), conditional_create=True)
        return cls(frozenset({"batch", "transaction"}), dict.fromkeys(types, every))

    def of(self, resource_type: str) -> TypeCapabilities:
        return self.types.get(resource_type, TypeCapabilities())

    @property
    def batch(self) -> bool:
        return "batch" in self.system

    @property
    def transaction(self) -> bool:
        return "transaction" in self.system

    def can_create(self, resource_type: str) -> bool:
        return self.of(resource_type).creatable

    def can_create_conditionally(self, resource_type: str) -> bool:
        return self.of(resource_type).creatable and self.of(resource_type).conditional_create

    def searches_by(self, resource_type: str, param: str) -> bool:
        return param in self.of(resource_type).search_params

    def creating_only(self, allowed: frozenset[str], types: tuple[str, ...]) -> ServerCapabilities:
        """These capabilities with create taken from each of ``types`` not in ``allowed``.

        What the token grants narrows what the server declares (issue 12, item 5):
        a type the job may not create is folded like one the server cannot create.
        """
        narrowed = dict(self.types)
        for t in types:
            if t not in allowed and t in narrowed:
                kept = narrowed[t]
                narrowed[t] = TypeCapabilities(
                    kept.interactions - {"create"}, kept.conditional_create, kept.search_params, kept.profiles
                )
        return ServerCapabilities(self.system, narrowed, self.declared)


def _codes(interactions: Any) -> set[str]:
    return {str(i.get("code")) for i in interactions or [] if isinstance(i, Mapping) and i.get("code")}


#: how long a server's statement is trusted before it is read again: a server upgraded or reconfigured while a
#: long-running app or job keeps going is seen within the hour (issue 12, "Capabilities")
CAPABILITIES_TTL = 3600.0

_cache: dict[str, tuple[ServerCapabilities, float]] = {}
_lock = threading.Lock()


def capabilities_of(
    client: FhirClient, *, clock: Callable[[], float] = time.monotonic, ttl: float = CAPABILITIES_TTL
) -> ServerCapabilities:
    """The server's capabilities, fetched once per base URL in this process and again after ``ttl`` seconds."""
    now = clock()
    with _lock:
        known = _cache.get(client.base_url)
    if known is not None and now - known[1] < ttl:
        return known[0]
    found = ServerCapabilities.from_statement(client.capabilities())
    with _lock:
        _cache[client.base_url] = (found, now)
    return found
