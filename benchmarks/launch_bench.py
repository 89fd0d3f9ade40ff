"""Launch-to-review time of the SMART app on the sandbox: median and p95 over N EHR launches.

What one launch measures, as a browser would live it: from the EHR's launch redirect
(``GET /ehr/launch`` on the sandbox EHR) through the app's ``/launch`` (discovery is cached after
the first launch, as in production), the EHR's ``/authorize`` (auto-approve), the app's
``/callback`` (token exchange), to the fully rendered ``/review`` page (one batch read of the
record through the EHR's scope-checking proxy, the check, the drafts, the template with the
measures plotted as inline SVG).

The check's own share comes from the review page's ``Server-Timing`` header (read / review
(check and drafts) durations measured inside the app) divided by the whole launch.

With ``--browser`` each launch runs in a fresh headless Chromium context and is timed until the
review page's ``load`` event (stylesheet and script included); without it, plain HTTP requests
follow the same redirects and receive the same server-rendered page.

Needs a HAPI FHIR base: ``--fhir URL`` (default: start the sandbox HAPI with sandbox/hapi/run on
port 18090 and stop it afterwards).  Usage:

    .venv/bin/python benchmarks/launch_bench.py [--launches 50] [--fhir http://127.0.0.1:18080/fhir] [--browser]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fhir_plugin.synthetic import generate_cases  # noqa: E402
from sandbox.testing import (  # noqa: E402
    headless_chromium,
    load_fresh_case,
    sandbox_stack,
    treat_loopback_as_secure,
)

treat_loopback_as_secure()  # the app's embedded-mode cookie is Secure on loopback, as browsers allow


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur) / 1000
    return out


def _in_chromium(url: str, app_url: str, launches: int, executable: str, record) -> None:  # type: ignore[no-untyped-def]
    """Each launch in a fresh headless Chromium context, timed until the review page's load event."""
    with headless_chromium(executable) as chromium:  # one browser; each launch gets a fresh context
        for i in range(launches + 1):
            context = chromium.new_context()
            page = context.new_page()
            started = time.perf_counter()
            response = page.goto(url, wait_until="load")
            elapsed = time.perf_counter() - started
            if (
                response is None
                or not page.url.startswith(app_url + "/review?launch=")
                or not page.locator("#summary").count()
                or not page.locator("#trends svg").count()
            ):
                raise SystemExit(f"launch failed at {page.url}")
            if i:  # the first launch warms up Chromium itself
                record(elapsed, response.headers.get("server-timing", ""))
            context.close()


def run(fhir_base: str, launches: int, case_key: str, browser_path: str | None = None) -> dict:
    case = next(c for c in generate_cases(dt.date.today()) if c.key == case_key)
    case = load_fresh_case(fhir_base, case, "bench" + uuid.uuid4().hex[:6])
    pid, resources = case.patient_id, case.resources
    encounter = sorted((r for r in resources if r["resourceType"] == "Encounter"), key=lambda r: r["period"]["start"])[
        -1
    ]["id"]
    totals, shares, parts = [], [], {"read": [], "review": []}

    def record(elapsed: float, server_timing: str) -> None:
        timing = _server_timing(server_timing)
        totals.append(elapsed)
        shares.append(timing.get("review", 0.0) / elapsed)
        for name in parts:
            parts[name].append(timing.get(name, 0.0))

    with sandbox_stack(fhir_base) as stack:
        url = stack.launch_url(pid, encounter)
        requests.Session().get(url).raise_for_status()  # warm-up: discovery cache, ICD-10-CM data, connections
        if browser_path:
            _in_chromium(url, stack.app_url, launches, browser_path, record)
        else:
            for _ in range(launches):
                browser = requests.Session()  # a fresh browser each time: no cookies carried over
                started = time.perf_counter()
                page = browser.get(url)
                elapsed = time.perf_counter() - started
                if (
                    page.status_code != 200
                    or not page.url.startswith(stack.app_url + "/review?launch=")
                    or "Documentation review" not in page.text
                    or '<svg class="plot"' not in page.text
                ):
                    raise SystemExit(f"launch failed: {page.status_code} at {page.url}")
                record(elapsed, page.headers.get("Server-Timing", ""))
    return {
        "launches": launches,
        "patient_resources": len(resources),
        "client": "chromium" if browser_path else "requests",
        "median_s": statistics.median(totals),
        "p95_s": _percentile(totals, 0.95),
        "max_s": max(totals),
        "check_share_median": statistics.median(shares),
        "check_share_p95": _percentile(shares, 0.95),
        "median_read_s": statistics.median(parts["read"]),
        "median_review_s": statistics.median(parts["review"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--fhir", metavar="URL", help="HAPI FHIR base (default: start the sandbox HAPI)")
    parser.add_argument("--port", type=int, default=18090, help="port for the sandbox HAPI this script starts")
    parser.add_argument("--case", default="missing-treatment-plan", help="synthetic case to launch for")
    parser.add_argument(
        "--browser",
        metavar="CHROMIUM",
        nargs="?",
        const="/usr/bin/chromium",
        help="drive headless Chromium (default /usr/bin/chromium) and time until the page's "
        "load event, instead of plain HTTP requests",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    started_here = False
    fhir = args.fhir
    run_script = REPO / "sandbox" / "hapi" / "run"
    if not fhir:
        fhir = f"http://127.0.0.1:{args.port}/fhir"
        if subprocess.run([str(run_script), "status", "--port", str(args.port)], capture_output=True).returncode:
            subprocess.run([str(run_script), "start", "--port", str(args.port)], check=True)
            started_here = True
    try:
        result = run(fhir.rstrip("/"), args.launches, args.case, args.browser)
    finally:
        if started_here:
            subprocess.run([str(run_script), "stop", "--port", str(args.port)], check=False)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['launches']} EHR launches to a rendered review page, client {result['client']} "
            f"({result['patient_resources']} resources in the record)"
        )
        print(
            f"  median {result['median_s'] * 1000:.0f} ms   p95 {result['p95_s'] * 1000:.0f} ms   "
            f"max {result['max_s'] * 1000:.0f} ms   (target p95 <= 1000 ms)"
        )
        print(
            f"  inside the review request (medians): read {result['median_read_s'] * 1000:.1f} ms, "
            f"review (check + drafts) {result['median_review_s'] * 1000:.1f} ms"
        )
        print(
            f"  the review's (check + drafts) share of a launch: median {result['check_share_median']:.1%}, "
            f"p95 {result['check_share_p95']:.1%}   (target < 10%)"
        )
    return 0 if result["p95_s"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
