"""Run the sandbox EHR: in a background thread (tests, demos) or in the foreground (the CLI)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from smart_launch._serve import LiveServer, free_port

from ._app import create_app
from ._clients import ClientRegistry
from ._config import EhrConfig

log = logging.getLogger("sandbox.ehr")


@dataclass
class RunningEhr:
    """A sandbox EHR serving in a thread of this process."""

    config: EhrConfig
    app: Any
    server: LiveServer

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def fhir_base_url(self) -> str:
        return self.config.fhir_base_url

    @property
    def clients(self) -> ClientRegistry:
        return self.config.clients

    @property
    def store(self) -> Any:
        return self.app.state.ehr.store

    @property
    def proxy(self) -> Any:
        """The FHIR proxy: its ``seen`` lists the requests it was sent (tests show them)."""
        return self.app.state.ehr.proxy

    def stop(self, timeout: float = 10.0) -> None:
        self.server.stop(timeout)


def start_in_thread(
    fhir_upstream: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 15.0,
    **settings: Any,
) -> RunningEhr:
    """Start a sandbox EHR on ``host:port`` (a free port by default) and wait until it answers.

    ``settings`` are :class:`EhrConfig` fields (``auto_approve=True``, ``clients=...``…).
    Call ``stop()`` on the result, or use :func:`running_ehr`.
    """
    port = port or free_port(host)
    config = EhrConfig(base_url=f"http://{host}:{port}", fhir_upstream=fhir_upstream, **settings)
    app = create_app(config)
    try:
        server = LiveServer(app, port, host=host, name="sandbox-ehr").start(startup_timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"the sandbox EHR did not start on {host}:{port}") from exc
    return RunningEhr(config, app, server)


@contextmanager
def running_ehr(fhir_upstream: str, **kwargs: Any) -> Iterator[RunningEhr]:
    """``with running_ehr(hapi_base, auto_approve=True) as ehr: ...`` — stopped on exit."""
    ehr = start_in_thread(fhir_upstream, **kwargs)
    try:
        yield ehr
    finally:
        ehr.stop()
