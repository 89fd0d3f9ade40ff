"""``fhir-plugin serve``: run the SMART app under uvicorn, configured from the environment.

Workers are separate processes; they share sessions through the SQLite store
(``SMART_SESSION_STORE``), which is why a memory store is refused with more
than one worker.
"""

from __future__ import annotations

import logging
import os

from fhir_plugin import UsageError

from ._settings import Settings

__all__ = ["serve", "app_from_env"]


def app_from_env():  # type: ignore[no-untyped-def]
    """The app factory uvicorn calls in each worker (``--factory``)."""
    from ._app import create_app

    # each worker is its own process: set up logging here (ids and paths only are ever logged)
    logging.basicConfig(level=os.environ.get("SMART_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
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
    uvicorn.run("smart_launch._serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, proxy_headers=True, server_header=False,
                access_log=False)  # uvicorn's access log prints query strings: ours (smart_launch.access) does not
    return 0
