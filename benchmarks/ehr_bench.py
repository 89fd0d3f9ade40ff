"""Read and write per patient on each sandbox EHR personality (issue 12), behind added latency.

For each personality (``hapi``, ``epic-like``, ``oracle-like``) the sandbox EHR's
proxy sits in front of HAPI with ``--latency`` ms added to every request it
forwards (``_latency.delayed``: the network a real EHR sits behind).  Per
patient the app is launched (auto-approve, plain HTTP), then timed:

- **read**: ``GET /api/report`` — the record read in the form the
  CapabilityStatement calls for (one batch, or one search per type in
  parallel), plus the check;
- **write**: ``POST /api/write`` — the drafts in the form the server accepts
  (one transaction; or ledger writes, folded into a note where needed).

Round trips are the FHIR requests the EHR's proxy saw for that step
(``proxy.seen``).  One run; numbers are medians over ``--patients``.

    .venv/bin/python benchmarks/ehr_bench.py --fhir http://127.0.0.1:18090/fhir [--patients 3] [--latency 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _latency import delayed  # noqa: E402

from fhir_plugin.synthetic import generate_cases  # noqa: E402
from sandbox.testing import (  # noqa: E402
    forget_folded_drafts,
    load_fresh_case,
    needing_drafts,
    sandbox_stack,
    treat_loopback_as_secure,
)

treat_loopback_as_secure()  # the app's embedded-mode cookie is Secure on loopback, as browsers allow

PERSONALITIES = ("hapi", "epic-like", "oracle-like")


def _one(stack, case, encounter: str) -> dict[str, float]:
    browser = requests.Session()
    page = browser.get(stack.launch_url(case.patient_id, encounter), timeout=120)
    page.raise_for_status()
    csrf = browser.get(f"{stack.app_url}/api/session", timeout=60).json()["csrf"]
    seen = stack.ehr.proxy.seen
    # the review page already read the record once; the report is read again here, timed on its own
    before = len(seen)
    started = time.perf_counter()
    browser.get(f"{stack.app_url}/api/report", timeout=120).raise_for_status()
    read_s, read_trips = time.perf_counter() - started, len(seen) - before
    before = len(seen)
    started = time.perf_counter()
    answer = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": csrf}, timeout=120)
    answer.raise_for_status()
    write_s, write_trips = time.perf_counter() - started, len(seen) - before
    return {
        "read_s": read_s,
        "read_trips": read_trips,
        "write_s": write_s,
        "write_trips": write_trips,
        "created": len(answer.json()["created"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fhir", required=True, help="HAPI FHIR base")
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--latency", type=float, default=20.0, help="ms added per request (default 20)")
    args = parser.parse_args()
    today = dt.date.today()
    chart = next(c for c in generate_cases(today) if c.key == "missing-onset")
    # a record that still needs every draft (SPEC §7.1: no clinician plan, the chart coded M62.56)
    template = dataclasses.replace(chart, resources=needing_drafts(chart.resources))
    rows = []
    with delayed(args.fhir, args.latency) as slow_hapi, tempfile.TemporaryDirectory() as tmp:
        for personality in PERSONALITIES:
            results = []
            with sandbox_stack(
                slow_hapi, personality=personality, ledger_store=str(Path(tmp) / f"{personality}.sqlite")
            ) as stack:
                for _ in range(args.patients):
                    case = load_fresh_case(args.fhir, template)
                    encounter = sorted(
                        (r for r in case.resources if r["resourceType"] == "Encounter"),
                        key=lambda r: r["period"]["start"],
                    )[-1]["id"]
                    results.append(_one(stack, case, encounter))
                    forget_folded_drafts(args.fhir, case.patient_id)  # the shared HAPI outlives the run
            rows.append((personality, {k: statistics.median(r[k] for r in results) for k in results[0]}))
    print("| personality | read round trips | read wall (ms) | write round trips | write wall (ms) | created |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['read_trips']:.0f} | {r['read_s'] * 1000:.0f} | {r['write_trips']:.0f} | "
            f"{r['write_s'] * 1000:.0f} | {r['created']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
