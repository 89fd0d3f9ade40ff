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

from ._capabilities import ServerCapabilities
from ._client import FhirClient
from ._read import BatchReader, PerTypeReader, RecordReader
from ._write import DraftWriter, PerResourceWriter, TransactionWriter

__all__ = ["Strategies", "strategies_for"]


@dataclass(frozen=True)
class Strategies:
    """The reader and the writer chosen for one server."""

    reader: RecordReader
    writer: DraftWriter


def strategies_for(client: FhirClient,
                   capabilities: ServerCapabilities | Mapping[str, Any] | None = None) -> Strategies:
    """The reader and writer for ``client``'s server, from its capabilities (or CapabilityStatement) when given."""
    if capabilities is None:
        return Strategies(BatchReader(client), TransactionWriter(client))
    if not isinstance(capabilities, ServerCapabilities):
        capabilities = ServerCapabilities.from_statement(capabilities)
    reader: RecordReader = BatchReader(client) if capabilities.batch else PerTypeReader(client)
    writer: DraftWriter = TransactionWriter(client) if capabilities.transaction else PerResourceWriter(client)
    return Strategies(reader, writer)
