"""Which reader and writer a server gets: decided in this one place, from what the server declares.

A CapabilityStatement (FHIR ``metadata``) that lists the ``batch`` system
interaction gets the one-round-trip ``BatchReader``, one that lists
``transaction`` gets the ``TransactionWriter``; a server that declares neither
gets the per-type reader and the per-resource writer.  With no statement at
hand the defaults are batch and transaction, which every open FHIR server
(HAPI, Azure, Google, Medplum, Firely, Aidbox) offers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ._client import FhirClient
from ._read import BatchReader, PerTypeReader, RecordReader
from ._write import DraftWriter, PerResourceWriter, TransactionWriter

__all__ = ["Strategies", "declared_interactions", "strategies_for"]


def declared_interactions(capabilities: Mapping[str, Any] | None) -> frozenset[str]:
    """The system-level interactions (``batch``, ``transaction``, …) a server's ``rest[mode=server]`` lists."""
    found: set[str] = set()
    for rest in (capabilities or {}).get("rest") or []:
        if isinstance(rest, dict) and rest.get("mode", "server") == "server":
            found.update(str(i.get("code")) for i in rest.get("interaction") or [] if isinstance(i, dict))
    return frozenset(found)


@dataclass(frozen=True)
class Strategies:
    """The reader and the writer chosen for one server."""

    reader: RecordReader
    writer: DraftWriter


def strategies_for(client: FhirClient, capabilities: Mapping[str, Any] | None = None) -> Strategies:
    """The reader and writer for ``client``'s server, from its CapabilityStatement when one is given."""
    if capabilities is None:
        return Strategies(BatchReader(client), TransactionWriter(client))
    declared = declared_interactions(capabilities)
    reader: RecordReader = BatchReader(client) if "batch" in declared else PerTypeReader(client)
    writer: DraftWriter = TransactionWriter(client) if "transaction" in declared else PerResourceWriter(client)
    return Strategies(reader, writer)
