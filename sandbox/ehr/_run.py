"""Run the sandbox EHR: in a background thread (tests, demos) or in the foreground (the CLI)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import requests
import uvicorn

from ._app import create_app
from ._clients import ClientRegistry
from ._config import EhrConfig

log = logging.getLogger("sandbox.ehr")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the usual bind-to-0 trick; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RunningEhr:
    """A sandbox EHR serving in a thread of this process."""

    config: EhrConfig
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

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
    def store(self):
        return self.app.state.ehr.store

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(fhir_upstream: str, *, host: str = "127.0.0.1", port: int | None = None,
                    startup_timeout: float = 15.0, **settings: Any) -> RunningEhr:
    """Start a sandbox EHR on ``host:port`` (a free port by default) and wait until it answers.

    ``settings`` are :class:`EhrConfig` fields (``auto_approve=True``, ``clients=...``…).
    Call ``stop()`` on the result, or use :func:`running_ehr`.
    """
    port = port or free_port(host)
    config = EhrConfig(base_url=f"http://{host}:{port}", fhir_upstream=fhir_upstream, **settings)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"sandbox-ehr-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if server.started:
            try:
                requests.get(config.base_url + "/.well-known/smart-configuration", timeout=2)
                return RunningEhr(config, app, server, thread)
            except requests.RequestException:
                pass
        if not thread.is_alive():
            break
        time.sleep(0.05)
    server.should_exit = True
    thread.join(5)
    raise RuntimeError(f"the sandbox EHR did not start on {host}:{port}")


@contextmanager
def running_ehr(fhir_upstream: str, **kwargs: Any) -> Iterator[RunningEhr]:
    """``with running_ehr(hapi_base, auto_approve=True) as ehr: ...`` — stopped on exit."""
    ehr = start_in_thread(fhir_upstream, **kwargs)
    try:
        yield ehr
    finally:
        ehr.stop()
