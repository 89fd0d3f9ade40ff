"""`fhir-plugin sandbox` (README "try the app"): one command, and the URL it prints launches the app."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from sandbox.testing import free_port, treat_loopback_as_secure

treat_loopback_as_secure()

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(bool(os.environ.get("FHIR_BASE_URL")), reason="needs the sandbox HAPI of this checkout"),
]


def test_sandbox_command_prints_a_launch_url_that_opens_the_review(fhir_base_url):
    hapi_port = urlsplit(fhir_base_url).port  # already running: the command reuses it and leaves it running
    ehr_port, app_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_plugin._cli",
            "sandbox",
            "--hapi-port",
            str(hapi_port),
            "--ehr-port",
            str(ehr_port),
            "--app-port",
            str(app_port),
            "--auto-approve",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C" in line or not line:
                break
        # issue 13: three chart pages (writable, red flag, complete), each embedding the app in a frame
        charts = [text.strip() for text in lines if "/ehr/chart?" in text]
        assert len(charts) == 3, "no chart URLs printed:\n" + "".join(lines)
        assert charts[0].startswith(f"http://localhost:{ehr_port}/ehr/chart?patient=fp-missing-treatment-plan")
        chart = requests.get(charts[0], timeout=60)
        src = re.search(r'<iframe class="app" src="([^"]+)"', chart.text).group(1).replace("&amp;", "&")
        assert src.startswith(f"http://127.0.0.1:{ehr_port}/ehr/launch?")  # a cross-site frame from localhost
        page = requests.get(src, timeout=60)  # auto-approve: EHR -> app -> EHR authorize -> app callback
        assert page.status_code == 200 and page.url.startswith(f"http://127.0.0.1:{app_port}/review?launch=")
        assert "Documentation review" in page.text and "fp-missing-treatment-plan" in page.text
        assert 'id="write-button"' in page.text
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            pytest.fail("fhir-plugin sandbox did not stop within 90 s of SIGTERM:\n" + "".join(lines) + rest)
    assert proc.returncode == 0, "".join(lines) + rest
    assert time.monotonic() - started < 60
    assert requests.get(f"{fhir_base_url}/metadata", timeout=10).status_code == 200  # not ours to stop
