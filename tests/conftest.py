"""Shared pytest fixtures.

``fhir_base_url`` is the FHIR R4 base that tests marked ``@pytest.mark.server`` talk to:

* ``FHIR_BASE_URL`` when set (any R4 server, e.g. a public HAPI sandbox);
* otherwise the sandbox HAPI server (sandbox/hapi; fixture ``sandbox_hapi_url``, which the Bulk
  Data export tests use whatever FHIR_BASE_URL says), started once per test session with
  ``sandbox/hapi/run start --port P`` (P from ``SANDBOX_HAPI_PORT``, default 18080) and stopped
  when the session ends. A sandbox server of ours already running on that port is reused and
  left running, and so is a ``FHIR_BASE_URL`` that is our sandbox (a shared one started from
  another checkout): its CapabilityStatement names it, so no second HAPI is started beside it.

A failed build or start fails the tests that need the server, with the script's output and the
server log's tail; it never skips them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
SANDBOX_HAPI_RUN = REPO / "sandbox" / "hapi" / "run"
DEFAULT_SANDBOX_PORT = 18080
# A cold first build downloads HAPI FHIR from Maven Central; the script itself waits at most
# 240 s for the server to answer once it is built.
START_TIMEOUT_S = 1500


def sandbox_hapi_port() -> int:
    return int(os.environ.get("SANDBOX_HAPI_PORT", DEFAULT_SANDBOX_PORT))


def run_sandbox_hapi(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``sandbox/hapi/run ARGS...`` and return its result (output captured as text)."""
    return subprocess.run(
        [str(SANDBOX_HAPI_RUN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _log_tail(port: int, lines: int = 60) -> str:
    log = REPO / "sandbox" / "hapi" / ".run" / f"hapi-{port}.log"
    if not log.exists():
        return "(no server log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_for_metadata(base_url: str, timeout_s: float) -> bool:
    """True once GET BASE/metadata answers 200 (a reused server may still be starting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/metadata", timeout=10).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(1)
    return False


#: what sandbox/hapi's CapabilityStatement says it is (SandboxRestConfig)
SANDBOX_DESCRIPTION = "fhir-plugin sandbox HAPI FHIR R4 server"


def _is_our_sandbox(base_url: str) -> bool:
    """True when ``base_url`` is a running sandbox HAPI of ours (it can export), wherever it was started."""
    try:
        statement = requests.get(f"{base_url}/metadata", timeout=30).json()
    except (requests.RequestException, ValueError):
        return False
    return isinstance(statement, dict) and (statement.get("implementation") or {}).get("description") == (
        SANDBOX_DESCRIPTION
    )


@pytest.fixture(scope="session")
def fhir_base_url(request):
    external = os.environ.get("FHIR_BASE_URL")
    if external:
        yield external.rstrip("/")
        return
    yield request.getfixturevalue("sandbox_hapi_url")


@pytest.fixture(scope="session")
def sandbox_hapi_url():
    """Our sandbox HAPI (started or reused on SANDBOX_HAPI_PORT), whatever FHIR_BASE_URL says.

    For tests of what only our sandbox is known to offer (Bulk Data ``$export``).
    """
    external = os.environ.get("FHIR_BASE_URL", "").rstrip("/")
    if external and _is_our_sandbox(external):
        yield external  # started elsewhere: reused, never stopped here
        return
    port = sandbox_hapi_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    started_here = False
    if run_sandbox_hapi("status", "--port", str(port)).returncode != 0:
        try:
            result = run_sandbox_hapi("start", "--port", str(port), timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            run_sandbox_hapi("stop", "--port", str(port), timeout=180)
            pytest.fail(
                f"sandbox/hapi/run start --port {port} took over {START_TIMEOUT_S} s.\n"
                f"Server log tail:\n{_log_tail(port)}",
                pytrace=False,
            )
        if result.returncode != 0:
            pytest.fail(
                f"sandbox/hapi/run start --port {port} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nServer log tail:\n{_log_tail(port)}",
                pytrace=False,
            )
        started_here = True
    elif not _wait_for_metadata(base_url, timeout_s=240):
        pytest.fail(
            f"The sandbox HAPI server already running on port {port} does not answer "
            f"{base_url}/metadata.\nServer log tail:\n{_log_tail(port)}",
            pytrace=False,
        )

    try:
        yield base_url
    finally:
        if started_here:
            # Up to 90 s: the first server after a build writes its class-data-sharing archive.
            run_sandbox_hapi("stop", "--port", str(port), timeout=180)


# The app's embedded-mode cookie is Secure on loopback, as browsers allow there; make requests' jar agree.
from sandbox.testing import treat_loopback_as_secure  # noqa: E402

treat_loopback_as_secure()


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession (two cores) for every Spark test: starting Spark is the slow part."""
    from fhir_plugin._population._job import SparkSettings, spark_session

    session = spark_session(SparkSettings(master="local[2]", shuffle_partitions=4))
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(autouse=True)
def mocked_servers_declare_an_open_server(request, monkeypatch):
    """A server mocked with ``responses`` declares what HAPI does (batch, transaction, conditional create).

    The entry points now read the server's CapabilityStatement before choosing
    a reader and writer (issue 12).  Tests that mock a server in-process are
    about other things, so their server is taken to declare an open server —
    without a ``metadata`` request, so the round trips they count are the
    reads and writes alone.  Tests against a real server (``server``,
    ``browser``) and tests of the detection itself (``detects_capabilities``)
    fetch the real statement, from a cache cleared before each test.  The
    reader's memory of servers whose Observation searches need a category (and
    of those that refuse a batch for its plan-note search) is cleared too, so no
    test inherits another's server.
    """
    from fhir_plugin import _capabilities, _read, _strategies

    with _capabilities._lock:
        _capabilities._cache.clear()
    with _read._memory_lock:
        _read._needs_category.clear()
        _read._notes_refused.clear()
    if not any(request.node.get_closest_marker(m) for m in ("server", "browser", "detects_capabilities")):
        open_server = _capabilities.ServerCapabilities(frozenset({"batch", "transaction"}))
        monkeypatch.setattr(_strategies, "capabilities_of", lambda client: open_server)
