"""The CapabilityStatement cache (issue 12, "Capabilities"): read once per server, read again after its TTL."""

from __future__ import annotations

import pytest

from fhir_plugin._capabilities import CAPABILITIES_TTL, capabilities_of
from sandbox.testing import ManualClock

pytestmark = pytest.mark.detects_capabilities


class CountingServer:
    """A client whose server changes its statement between reads: transactions first, none after."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.reads = 0

    def capabilities(self) -> dict:
        self.reads += 1
        system = [{"code": "transaction"}] if self.reads == 1 else []
        return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "interaction": system}]}


def test_the_statement_is_read_once_per_server_until_the_ttl_runs_out():
    clock = ManualClock()
    server = CountingServer("http://ttl.test/fhir")
    assert capabilities_of(server, clock=clock).transaction
    clock.advance(CAPABILITIES_TTL - 1)
    assert capabilities_of(server, clock=clock).transaction and server.reads == 1  # still the cached one
    clock.advance(1)
    assert not capabilities_of(server, clock=clock).transaction and server.reads == 2  # the server changed: seen
    assert not capabilities_of(server, clock=clock).transaction and server.reads == 2


def test_each_server_has_its_own_entry():
    clock = ManualClock()
    first, second = CountingServer("http://a.test/fhir"), CountingServer("http://b.test/fhir")
    capabilities_of(first, clock=clock)
    capabilities_of(second, clock=clock)
    capabilities_of(first, clock=clock)
    assert (first.reads, second.reads) == (1, 1)
