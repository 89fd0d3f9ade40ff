"""Which reader and writer a server gets: decided in this one place, from what the server declares.

A CapabilityStatement (FHIR ``metadata``) that lists the ``batch`` (or the
``transaction``) system interaction gets the one-round-trip ``BatchReader``, one that lists
``transaction`` gets the ``TransactionWriter``; a server that declares neither
gets the per-type reader and, for the writer (issue 12, "Writing"):

- the per-resource writer (one conditional create each) when the draft types
  it declares all allow conditional create (or it declares none of them);
- the ledger writer (search, then plain create, with a local ledger) when a
  draft type it declares has no ``conditionalCreate``.

With no statement at hand the defaults are batch and transaction, which every
open FHIR server (HAPI, Azure, Google, Medplum, Firely, Aidbox) offers.  An
explicit ``strategy`` overrides the writer for a server whose statement is
wrong (``--strategy`` / ``FHIR_PLUGIN_STRATEGY``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._capabilities import ServerCapabilities, capabilities_of
from ._client import FhirClient
from ._errors import AuthError, ServerError, TransportError, UsageError
from ._ledger import DEFAULT_LEDGER, Ledger
from ._read import BatchReader, PerTypeReader, RecordReader
from ._write import DraftWriter, FoldingWriter, LedgerWriter, PerResourceWriter, TransactionWriter, needs_folding

__all__ = [
    "Strategies",
    "strategies_for",
    "detected_strategies",
    "server_capabilities",
    "STRATEGIES",
    "DRAFT_TYPES",
    "WRITE_TYPES",
    "ledger_at",
    "STRATEGY_ENV",
]

#: the environment variable an operator sets to force the writer (CLI ``--strategy`` wins over it)
STRATEGY_ENV = "FHIR_PLUGIN_STRATEGY"

#: the writer choices an operator may force; ``auto`` is detection from the CapabilityStatement
STRATEGIES = ("auto", "transaction", "per-resource", "ledger")
#: the resource types the drafts create (SPEC §7)
DRAFT_TYPES = ("Condition", "Goal", "CarePlan", "Provenance")
#: every type a writer may create: the drafts, and the plan note they fold into (issue 12, writer d)
WRITE_TYPES = (*DRAFT_TYPES, "DocumentReference")


@dataclass(frozen=True)
class Strategies:
    """The reader and the writer chosen for one server."""

    reader: RecordReader
    writer: DraftWriter


_ledgers: dict[str, Ledger] = {}
_lock = threading.Lock()


def ledger_at(path: str | Path | None = None) -> Ledger:
    """The process's one open ledger for ``path`` (default beside the sync state), shared by every patient."""
    key = str(Path(path or DEFAULT_LEDGER).resolve())
    with _lock:
        if key not in _ledgers:
            _ledgers[key] = Ledger(key)
        return _ledgers[key]


def _needs_ledger(capabilities: ServerCapabilities) -> bool:
    """A draft type the server declares, without conditional create: it cannot de-duplicate for us."""
    return any(
        t in capabilities.types and capabilities.can_create(t) and not capabilities.can_create_conditionally(t)
        for t in WRITE_TYPES
    )


def strategies_for(
    client: FhirClient,
    capabilities: ServerCapabilities | Mapping[str, Any] | None = None,
    *,
    strategy: str = "auto",
    ledger: str | Path | None = None,
    creatable: frozenset[str] | None = None,
) -> Strategies:
    """The reader and writer for ``client``'s server, from its capabilities (or CapabilityStatement) when given.

    ``strategy`` forces the writer (one of ``STRATEGIES``); ``ledger`` is the
    ledger file's path, opened only when the ledger writer is chosen.
    ``creatable`` (None: no limit) are the types the token lets the job create:
    the others are folded as if the server could not create them.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown write strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if capabilities is not None and not isinstance(capabilities, ServerCapabilities):
        capabilities = ServerCapabilities.from_statement(capabilities)
    if capabilities is not None and not capabilities.declared:
        capabilities = None  # nothing usable declared: today's defaults
    not_granted: frozenset[str] = frozenset()
    if creatable is not None and not set(WRITE_TYPES) <= creatable:
        # the grant is narrower than the server: write only what it allows (issue 12, item 5)
        declared = capabilities or ServerCapabilities.assumed_open(WRITE_TYPES)
        not_granted = frozenset(t for t in WRITE_TYPES if declared.can_create(t) and t not in creatable)
        capabilities = declared.creating_only(creatable, WRITE_TYPES)
    # HAPI declares only ``transaction`` yet answers batches at the same endpoint, as every server with
    # transactions does (Azure, Google, Medplum, Firely, Aidbox); the EHRs that refuse batches refuse both
    reader: RecordReader = (
        BatchReader(client)
        if capabilities is None or capabilities.batch or capabilities.transaction
        else PerTypeReader(client)
    )
    if strategy == "auto":
        if capabilities is None or capabilities.transaction:
            strategy = "transaction"
        else:
            strategy = "ledger" if _needs_ledger(capabilities) else "per-resource"
    writer: DraftWriter
    if strategy == "transaction":
        writer = TransactionWriter(client)
    elif strategy == "per-resource":
        writer = PerResourceWriter(client)
    else:
        writer = LedgerWriter(client, lambda: ledger_at(ledger), capabilities=capabilities)
    if capabilities is not None and needs_folding(capabilities):
        # what it cannot (or may not) create goes in a form it can (writer d)
        writer = FoldingWriter(writer, capabilities, not_granted=not_granted)
    return Strategies(reader, writer)


def server_capabilities(client: FhirClient) -> ServerCapabilities | None:
    """What the server declares (``metadata``, cached per base URL), or None when it cannot be read.

    A server whose ``metadata`` cannot be read (an error status, no answer)
    gets the defaults, as before detection: the reads and writes that follow
    report their own errors.  A refused token is not hidden: it is raised.
    """
    try:
        return capabilities_of(client)
    except AuthError:
        raise
    except (ServerError, TransportError):
        return None


def detected_strategies(
    client: FhirClient,
    *,
    strategy: str = "auto",
    ledger: str | Path | None = None,
    creatable: frozenset[str] | None = None,
) -> Strategies:
    """What every entry point calls: the server's CapabilityStatement (``server_capabilities``) decides."""
    return strategies_for(client, server_capabilities(client), strategy=strategy, ledger=ledger, creatable=creatable)
