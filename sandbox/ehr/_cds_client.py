"""The sandbox EHR as a CDS Hooks 2.0 client: opening a patient calls the CDS services and shows their cards.

    GET  B/ehr/patient/{id}?encounter=              the patient's page: patient-view cards, each service called
                                                    with a signed JWT, the prefetch, fhirServer + fhirAuthorization
    POST B/ehr/patient/{id}/cards/{card}/accept     applies a card's suggestion through the EHR's FHIR proxy
                                                    (conditional creates on the plugin's identifier) + feedback
    POST B/ehr/patient/{id}/cards/{card}/override   the override reason, as feedback
    GET  B/cds/jwks.json                            the public key the EHR signs its CDS JWTs with

The signing key (ES384) is generated when the EHR starts and never written
down.  The JWT's ``jku`` names ``B/cds/jwks.json`` (Epic's way), so the service
trusts the EHR by an ``iss`` + ``jku`` allow-list.  Cards are kept server-side:
an accept names a card uuid, never a resource the browser could alter.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests
from fastapi import APIRouter, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, Response

from ._access import ID_RE
from ._proxy import FHIR_JSON
from ._store import LaunchContext, Token

__all__ = ["CdsSigner", "CdsClient", "cds_router", "JWKS_PATH", "trust_entry"]

log = logging.getLogger("sandbox.ehr.cds")
JWKS_PATH = "/cds/jwks.json"
CLIENT_ID = "sandbox-ehr-cds"
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
_TEMPLATES = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates")), autoescape=select_autoescape(default=True)
)


class CdsSigner:
    """The EHR's CDS signing key (made at run time) and the JWTs it signs (CDS Hooks 2.0 "Trusting CDS Clients")."""

    def __init__(self, iss: str, jku: str | None = None, *, lifetime: int = 300) -> None:
        self.iss = iss
        self.jku = jku
        self.lifetime = lifetime
        self.key = ECKey.generate_key(
            "P-384", parameters={"kid": secrets.token_hex(8), "use": "sig", "alg": "ES384"}, private=True
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def sign(self, aud: str) -> str:
        now = int(time.time())
        header = {"alg": "ES384", "typ": "JWT", "kid": self.key.kid}
        if self.jku:
            header["jku"] = self.jku
        claims = {
            "iss": self.iss,
            "sub": CLIENT_ID,
            "aud": aud,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(header, claims, self.key, algorithms=["ES384"])


def trust_entry(base_url: str) -> dict[str, Any]:
    """How a CDS service trusts a sandbox EHR at ``base_url`` (a ``CDS_CLIENTS`` entry): iss + jku allow-list."""
    return {"iss": base_url, "jku": [base_url + JWKS_PATH]}


class CdsClient:
    """Calls the CDS services for a patient and applies what the clinician accepts."""

    def __init__(self, ehr: Any, services_url: str) -> None:
        self.ehr = ehr
        self.config = ehr.config
        self.services_url = services_url.rstrip("/")
        self.signer = CdsSigner(self.config.base_url, self.config.base_url + JWKS_PATH)
        self.http = requests.Session()
        self._cards: dict[str, tuple[str, str, dict[str, Any]]] = {}  # card uuid -> (service, patient, card)
        self._lock = threading.Lock()

    # -------------------------------------------------------------- what a hook call carries
    def _token(self, patient: str, scope: str) -> str:
        """A proxy access token for ``patient`` (the service reads, the EHR itself writes an accepted suggestion)."""
        now = self.ehr.store.now()
        token = Token(
            token_id=secrets.token_hex(8),
            client_id=CLIENT_ID,
            scope=scope,
            context=LaunchContext(patient=patient),
            access_token=secrets.token_urlsafe(32),
            issued_at=now,
            expires_at=now + 300,
            grant_type="cds-hooks",
        )
        self.ehr.store.add_token(token)
        return token.access_token

    def prefetch(self, patient: str, templates: dict[str, str]) -> dict[str, Any]:
        """Each prefetch template filled for ``patient`` and read from the EHR's own store (HAPI upstream)."""
        out: dict[str, Any] = {}
        for key, template in templates.items():
            query = template.replace("{{context.patientId}}", patient)
            path, _, params = query.partition("?")
            url = f"{self.config.fhir_upstream}/{path}" + (f"?{params}&_count=500" if params else "")
            answer = self.ehr.proxy.session().get(
                url, headers={"Accept": FHIR_JSON, "Cache-Control": "no-cache"}, timeout=self.config.upstream_timeout
            )
            out[key] = answer.json() if answer.status_code == 200 else None  # null: the service reads it itself
        return out

    def services(self) -> list[dict[str, Any]]:
        answer = self.http.get(self.services_url, timeout=10)
        answer.raise_for_status()
        return [s for s in answer.json().get("services", []) if isinstance(s, dict)]

    def call(
        self, service: dict[str, Any], patient: str, encounter: str | None, *, with_prefetch: bool = True
    ) -> list[dict[str, Any]]:
        """One hook call; the cards it answered, remembered by uuid for accept and override."""
        url = f"{self.services_url}/{service['id']}"
        context = {
            "userId": self.config.user_id,
            "patientId": patient,
            **({"encounterId": encounter} if encounter else {}),
        }
        body: dict[str, Any] = {
            "hook": service["hook"],
            "hookInstance": str(uuid.uuid4()),
            "context": context,
            "fhirServer": self.config.fhir_base_url,
            "fhirAuthorization": {
                "access_token": self._token(patient, "patient/*.rs"),
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.rs",
                "subject": CLIENT_ID,
                "patient": patient,
            },
        }
        if with_prefetch:
            body["prefetch"] = self.prefetch(patient, service.get("prefetch") or {})
        answer = self.http.post(
            url, json=body, timeout=30, headers={"Authorization": f"Bearer {self.signer.sign(url)}"}
        )
        if answer.status_code != 200:
            log.info("CDS service %s answered %d", service["id"], answer.status_code)
            return []
        cards = [c for c in answer.json().get("cards", []) if isinstance(c, dict)]
        with self._lock:
            for card in cards:
                if card.get("uuid"):
                    self._cards[card["uuid"]] = (service["id"], patient, card)
        return cards

    def card(self, patient: str, card_id: str) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            found = self._cards.get(card_id)
        if found is None or found[1] != patient:
            return None
        return found[0], found[2]

    # -------------------------------------------------------------- accepting and overriding
    def apply(self, patient: str, card: dict[str, Any]) -> list[str]:
        """Every action of the card's suggestions through the FHIR proxy, each a conditional create on its
        identifier (so accepting twice creates nothing new). Returns one line per action."""
        token = self._token(patient, "patient/*.cruds")
        lines = []
        for suggestion in card.get("suggestions") or []:
            for action in suggestion.get("actions") or []:
                resource = action.get("resource") or {}
                rtype = resource.get("resourceType", "")
                if action.get("type") != "create" or not rtype:
                    continue
                headers = {"authorization": f"Bearer {token}", "content-type": FHIR_JSON}
                ident = next((i for i in resource.get("identifier") or [] if i.get("system") and i.get("value")), None)
                if ident:  # keyed on the patient too: a draft identifier alone could match another's (issue 11)
                    headers["if-none-exist"] = (
                        f"identifier={ident['system']}|{ident['value']}&subject=Patient/{patient}"
                    )
                result = self.ehr.proxy.handle("POST", rtype, "", headers, json.dumps(resource).encode())
                if result.status == 201:
                    lines.append(f"{rtype} created")
                elif result.status == 200:
                    lines.append(f"{rtype} already in the record: nothing new created")
                else:
                    lines.append(f"{rtype} not accepted by the FHIR server (HTTP {result.status})")
        return lines

    def feedback(
        self, service_id: str, card: dict[str, Any], outcome: str, reason: dict[str, Any] | None = None
    ) -> int:
        entry: dict[str, Any] = {
            "card": card["uuid"],
            "outcome": outcome,
            "outcomeTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if outcome == "accepted":
            entry["acceptedSuggestions"] = [{"id": s["uuid"]} for s in card.get("suggestions") or [] if s.get("uuid")]
        if reason:
            entry["overrideReason"] = {"reason": reason}
        url = f"{self.services_url}/{service_id}"
        answer = self.http.post(
            url + "/feedback",
            json={"feedback": [entry]},
            timeout=10,
            headers={"Authorization": f"Bearer {self.signer.sign(url)}"},
        )
        return answer.status_code


def _launch_link(card_link: dict[str, Any], patient: str, fallback_encounter: str | None) -> str:
    """The EHR's own launch URL for a card's ``smart`` link: the app, the patient, the encounter from appContext."""
    encounter = fallback_encounter
    try:
        app_context = json.loads(card_link.get("appContext") or "{}")
        encounter = str(app_context.get("encounter") or "").split("/")[-1] or encounter
    except ValueError:
        pass
    params = {"patient": patient, "app": card_link["url"], **({"encounter": encounter} if encounter else {})}
    return "/ehr/launch?" + urlencode(params)


def cds_router(ehr: Any, services_url: str) -> APIRouter:
    """The EHR's patient page and card actions, as a router ``create_app`` includes when a CDS URL is set."""
    client = CdsClient(ehr, services_url)
    ehr.cds = client
    router = APIRouter()

    @router.get(JWKS_PATH)
    def jwks() -> JSONResponse:
        return JSONResponse(client.signer.jwks())

    def _page(patient: str, encounter: str | None, message: list[str] | None = None) -> HTMLResponse:
        try:
            shown = []
            for service in client.services():
                if service.get("hook") != "patient-view":
                    continue
                for card in client.call(service, patient, encounter):
                    links = [
                        {"label": link.get("label", "Open app"), "href": _launch_link(link, patient, encounter)}
                        for link in card.get("links") or []
                        if link.get("type") == "smart"
                    ]
                    shown.append({"card": card, "links": links, "service": service["id"]})
            error = ""
        except (requests.RequestException, ValueError):
            shown, error = [], "The CDS service did not answer."
        html = _TEMPLATES.get_template("cds_patient.html").render(
            patient=patient, encounter=encounter, cards=shown, message=message or [], error=error
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def _ids(patient: str, encounter: str | None) -> Response | None:
        for value in (patient, encounter):
            if value is not None and not ID_RE.match(value):
                return HTMLResponse("not a FHIR id", status_code=400)
        return None

    @router.get("/ehr/patient/{patient}")
    async def patient_page(patient: str, request: Request) -> Response:
        encounter = request.query_params.get("encounter") or None
        bad = _ids(patient, encounter)
        if bad is not None:
            return bad
        return await run_in_threadpool(_page, patient, encounter)

    @router.post("/ehr/patient/{patient}/cards/{card_id}/accept")
    async def accept(patient: str, card_id: str, request: Request) -> Response:
        encounter = (await request.form()).get("encounter") or None
        bad = _ids(patient, str(encounter) if encounter else None)
        found = client.card(patient, card_id)
        if bad or found is None:
            return bad or HTMLResponse("unknown card", status_code=404)
        service_id, card = found
        lines = await run_in_threadpool(client.apply, patient, card)
        await run_in_threadpool(client.feedback, service_id, card, "accepted")
        log.info("CDS suggestion accepted: Patient/%s, %d action(s)", patient, len(lines))
        return await run_in_threadpool(_page, patient, str(encounter) if encounter else None, lines)

    @router.post("/ehr/patient/{patient}/cards/{card_id}/override")
    async def override(patient: str, card_id: str, request: Request) -> Response:
        form = await request.form()
        encounter = form.get("encounter") or None
        bad = _ids(patient, str(encounter) if encounter else None)
        found = client.card(patient, card_id)
        if bad or found is None:
            return bad or HTMLResponse("unknown card", status_code=404)
        service_id, card = found
        reason = next((r for r in card.get("overrideReasons") or [] if r.get("code") == form.get("reason")), None)
        await run_in_threadpool(client.feedback, service_id, card, "overridden", reason)
        return await run_in_threadpool(
            _page,
            patient,
            str(encounter) if encounter else None,
            ["Card dismissed; the reason was sent to the CDS service."],
        )

    return router
