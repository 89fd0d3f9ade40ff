"""Benchmarks run against a real FHIR server: the one given, or the sandbox HAPI started here."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "sandbox" / "hapi" / "run"


@contextlib.contextmanager
def fhir_server(url: str | None, port: int) -> Iterator[str]:
    """Yield a FHIR base URL; start (and afterwards stop) the sandbox HAPI unless ``url`` is given."""
    if url:
        yield url.rstrip("/")
        return
    running = subprocess.run([str(RUN), "status", "--port", str(port)], capture_output=True).returncode == 0
    if not running:
        subprocess.run([str(RUN), "start", "--port", str(port)], check=True)
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        if not running:
            subprocess.run([str(RUN), "stop", "--port", str(port)], check=False)
