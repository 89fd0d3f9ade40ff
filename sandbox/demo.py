"""``fhir-plugin sandbox``: the whole demo on one machine, in one command.

Starts the sandbox HAPI (unless one of ours already runs on the port), loads
the synthetic patients, starts the sandbox EHR in front of it and the SMART
app, and prints chart URLs that open the app embedded in the EHR's page (a
cross-site frame, as real EHRs show SMART apps) for three patients: one whose
drafts can be written, one with a red flag, and a complete one.
Ctrl-C stops what it started.  Runs from a checkout: the HAPI module is
built from ``sandbox/hapi`` with Maven.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path
from urllib.parse import urlencode

from fhir_plugin import PluginError, UsageError

__all__ = ["run_sandbox"]

HAPI_RUN = Path(__file__).resolve().parent / "hapi" / "run"
#: the demo's patients, one per state the review page shows (issue 13)
DEMO_PATIENTS = (
    ("fp-missing-treatment-plan", "drafts can be written"),
    ("fp-flag-neuro", "red flag: referral first"),
    ("fp-complete", "complete: a plan exists, nothing to write"),
)


def _hapi(command: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HAPI_RUN), command, "--port", str(port)], text=True, capture_output=command != "start")


def run_sandbox(
    *,
    hapi_port: int = 8080,
    ehr_port: int = 9090,
    app_port: int = 8000,
    auto_approve: bool = False,
    frame_ancestors: tuple[str, ...] | None = None,
    personality: str = "hapi",
) -> int:
    """Run HAPI + synthetic patients + sandbox EHR + SMART app until interrupted."""
    from fhir_plugin._examples import example_cases
    from fhir_plugin._sources import load_into_server
    from smart_launch._app import create_app
    from smart_launch._cds_auth import trust_from_json
    from smart_launch._serve import LiveServer
    from smart_launch._settings import Settings

    from .ehr import Client, ClientRegistry, start_in_thread
    from .ehr.__main__ import EXAMPLE_CLIENTS
    from .ehr._cds_client import trust_entry

    if not HAPI_RUN.exists():
        raise UsageError(f"the sandbox HAPI module is not here ({HAPI_RUN}): run fhir-plugin sandbox from a checkout")
    started_hapi = _hapi("status", hapi_port).returncode != 0
    if started_hapi and _hapi("start", hapi_port).returncode != 0:
        raise PluginError(f"the sandbox HAPI did not start on port {hapi_port} (see the lines above)")
    hapi_base = f"http://127.0.0.1:{hapi_port}/fhir"
    ehr = None
    try:
        cases = example_cases(date.today())
        load_into_server(hapi_base, cases)
        app_url = f"http://127.0.0.1:{app_port}"
        # the app's registration from the example registry, at the ports chosen here
        example = json.loads(EXAMPLE_CLIENTS.read_text(encoding="utf-8"))
        entry = next(c for c in example["clients"] if c["client_id"] == "fhir-plugin")
        entry.update(redirect_uris=[f"{app_url}/callback"], launch_url=f"{app_url}/launch")
        clients = ClientRegistry()
        clients.register(Client.from_dict(entry, base_dir=EXAMPLE_CLIENTS.parent))
        # the EHR's chart pages embed the app; from http://localhost the frame (on 127.0.0.1) is cross-site
        chart_origin = f"http://localhost:{ehr_port}"
        ancestors = frame_ancestors or (chart_origin, f"http://127.0.0.1:{ehr_port}")
        ehr = start_in_thread(
            hapi_base,
            port=ehr_port,
            clients=clients,
            auto_approve=auto_approve,
            frame_ancestors=ancestors,
            personality=personality,
            cds_services_url=f"{app_url}/cds-services",
        )
        # the app's CDS Hooks service trusts this EHR's signed JWTs by iss + jku (its key is made at start)
        settings = Settings(
            client_id="fhir-plugin",
            redirect_uri=f"{app_url}/callback",
            allowed_issuers=(ehr.fhir_base_url,),
            session_store="memory",
            allowed_frame_ancestors=ancestors,
            cds_clients=trust_from_json([trust_entry(ehr.base_url)]),
            cds_feedback_store="memory",
        )
        launches = []
        for pid, state in DEMO_PATIENTS:
            case = next(c for c in cases if c.patient_id == pid)
            query = {"patient": case.patient_id, "client_id": "fhir-plugin"}
            if case.encounter_id:
                query["encounter"] = case.encounter_id
            launches.append(f"  {state}:\n    {chart_origin}/ehr/chart?{urlencode(query)}")
        first = next(c for c in cases if c.patient_id == DEMO_PATIENTS[0][0])
        cards_page = f"{ehr.base_url}/ehr/patient/{first.patient_id}" + (
            f"?encounter={first.encounter_id}" if first.encounter_id else ""
        )
        try:  # print the URLs only once the app answers
            server = LiveServer(create_app(settings), app_port, name="smart-app").start()
        except RuntimeError as exc:
            raise PluginError(f"the SMART app could not start on port {app_port}") from exc
        print(
            f"\nsandbox HAPI   {hapi_base}  ({len(cases)} synthetic patients loaded)\n"
            f"sandbox EHR    {ehr.base_url}/ehr  (every patient, with a launch link)\n"
            f"SMART app      {app_url}  (CDS Hooks: {app_url}/cds-services)\n\n"
            f"Open the app inside the EHR's chart (frame-ancestors: {' '.join(ancestors)}):\n"
            + "\n".join(launches)
            + "\n"
            f"Open a patient in the EHR, with the CDS cards:\n  {cards_page}" + "\n\nCtrl-C stops everything.",
            flush=True,
        )
        stop = threading.Event()
        # Ctrl-C or a service manager's SIGTERM; set explicitly, since a shell starting us in the
        # background leaves SIGINT ignored
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while server.running and not stop.wait(0.5):
            pass
        server.stop()
        return 0
    finally:
        if ehr is not None:
            ehr.stop()
        if started_hapi:
            _hapi("stop", hapi_port)
            print("sandbox HAPI stopped", file=sys.stderr)
