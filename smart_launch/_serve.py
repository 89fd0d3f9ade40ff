"""``fhir-plugin serve``: run the SMART app under uvicorn, configured from the environment.

Workers are separate processes; they share sessions through the SQLite store
(``SMART_SESSION_STORE``), which is why a memory store is refused with more
than one worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from fhir_plugin import UsageError

from ._settings import Settings

__all__ = ["serve", "app_from_env", "free_port", "LiveServer"]


def app_from_env():  # type: ignore[no-untyped-def]
    """The app factory uvicorn calls in each worker (``--factory``)."""
    from ._app import create_app

    # each worker is its own process: set up logging here (ids and paths only are ever logged)
    logging.basicConfig(
        level=os.environ.get("SMART_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    return create_app(Settings.from_env())


def serve(host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1, log_level: str = "info") -> int:
    """Run the app until interrupted; returns 0 on a clean stop."""
    import uvicorn

    settings = Settings.from_env()  # fail here, once, with one sentence, not in every worker
    if not settings.issuers:
        raise UsageError("no EHR is trusted: set SMART_ALLOWED_ISSUERS to the FHIR base URL(s) that may launch the app")
    if workers > 1 and settings.session_store in ("memory", ":memory:"):
        raise UsageError("several workers need a shared session store: set SMART_SESSION_STORE to a file path")
    os.environ.setdefault("SMART_LOG_LEVEL", log_level)
    uvicorn.run(
        "smart_launch._serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
        server_header=False,
        access_log=False,
    )  # uvicorn's access log prints query strings: ours (smart_launch.access) does not
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the usual bind-to-0 trick; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """An ASGI app served by uvicorn in a daemon thread of this process; ``url`` is its base URL.

    The one way the sandbox, the demo, the tests and the benchmarks run an app
    in-process: ``start`` returns once uvicorn is listening.
    """

    def __init__(
        self,
        app: Any,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_level: str = "warning",
        name: str = "uvicorn",
    ) -> None:
        import uvicorn

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level=log_level, access_log=False, lifespan="off", server_header=False
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # not the main thread
        self._thread = threading.Thread(target=self._server.run, name=f"{name}-{self.port}", daemon=True)

    def start(self, timeout: float = 20.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
