"""Benchmarks run against a real FHIR server: the one given, or the sandbox HAPI started here."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "sandbox" / "hapi" / "run"


@contextlib.contextmanager
def fhir_server(url: str | None, port: int, *, java_opts: str | None = None) -> Iterator[str]:
    """Yield a FHIR base URL; start (and afterwards stop) the sandbox HAPI unless ``url`` is given.

    ``java_opts`` replaces the sandbox's JVM options for a server started here (not for one that runs).
    """
    if url:
        yield url.rstrip("/")
        return
    running = subprocess.run([str(RUN), "status", "--port", str(port)], capture_output=True).returncode == 0
    if not running:
        env = dict(os.environ, **({"SANDBOX_HAPI_JAVA_OPTS": java_opts} if java_opts else {}))
        subprocess.run([str(RUN), "start", "--port", str(port)], check=True, env=env)
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        if not running:
            subprocess.run([str(RUN), "stop", "--port", str(port)], check=False)
