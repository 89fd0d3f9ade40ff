"""What the pages show: pure view helpers, the EHR's style, and the page/refusal renderer.

The helpers turn core objects (a report, a draft Bundle, a Patient) into the
plain dicts the Jinja templates read; ``Pages`` renders a template or, for the
JSON API, the same refusal as ``{"error": ...}``.  ``_fetch_style`` is the one
piece of I/O: the EHR's optional ``smart_style_url`` document.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import requests
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fhir_plugin import PatientRecord, PluginError, Report, __version__, phases_of
from fhir_plugin._urls import origin, safe_url

from .state import LaunchSession

__all__ = ["Pages", "VIEWABLE", "GROUPS", "review_context", "draft_view", "subject_of", "_fetch_style", "style_css"]

_HERE = Path(__file__).parent
#: resource types the evidence viewer shows (the patient's own record; SPEC §7's drafts)
VIEWABLE = ("Patient", "Condition", "Observation", "Encounter", "CarePlan", "Goal", "Provenance")
GROUPS = (("conflict", "Conflicts"), ("missing", "Missing"), ("not-yet-due", "Not yet due"),
          ("proposed", "Proposed"), ("met", "Met"))


# ---------------------------------------------------------------- pure helpers for the views

def subject_of(resource: Mapping[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
    if isinstance(ref, str) and ref.split("/")[-2:-1] == ["Patient"]:
        return ref.split("/")[-1]
    return None


def _human_name(patient: Mapping[str, Any] | None) -> str:
    for name in (patient or {}).get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = list(name.get("given") or []) + ([name["family"]] if name.get("family") else [])
        if parts:
            return " ".join(parts)
    return "(no name recorded)"


def _banner(patient: Mapping[str, Any] | None, patient_id: str) -> dict[str, str]:
    patient = patient or {}
    return {"name": _human_name(patient), "gender": str(patient.get("gender") or "unknown"),
            "birth_date": str(patient.get("birthDate") or "unknown"), "id": patient_id}


def draft_view(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """What the preview shows of the drafts: the Condition, the phases of the CarePlan, the counts."""
    entries = bundle.get("entry") or []
    by_url = {e.get("fullUrl"): e.get("resource") or {} for e in entries}
    resources: list[Mapping[str, Any]] = [e["resource"] for e in entries]
    condition = next((r for r in resources if r["resourceType"] == "Condition"), {})
    careplan = next((r for r in resources if r["resourceType"] == "CarePlan"), {})
    codings = (condition.get("code") or {}).get("coding") or []

    def goal_text(ref: str) -> str:
        return ((by_url.get(ref) or {}).get("description") or {}).get("text") or ref

    phases = [{"number": p.number, "title": p.title, "start": p.start, "end": p.end,
               "goals": [goal_text(g) for g in p.goals], "activities": list(p.activities)}
              for p in phases_of(careplan)]
    extra = [(a.get("detail") or {}) for a in careplan.get("activity") or [] if not a.get("extension")]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["resource"]["resourceType"]] = counts.get(e["resource"]["resourceType"], 0) + 1
    return {
        "condition": {
            "codes": [{"system": c.get("system", ""), "code": c.get("code", ""), "display": c.get("display", "")}
                      for c in codings],
            "clinical_status": ((condition.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code"),
            "verification_status": ((condition.get("verificationStatus") or {}).get("coding") or [{}])[0].get("code"),
            "body_site": ", ".join(b.get("text", "") for b in condition.get("bodySite") or []),
            "onset": condition.get("onsetDateTime"),
            "note": " ".join(n.get("text", "") for n in condition.get("note") or []),
            "evidence": [d.get("reference") for ev in condition.get("evidence") or [] for d in ev.get("detail") or []],
        },
        "careplan": {"title": careplan.get("title"), "status": careplan.get("status"),
                     "intent": careplan.get("intent"), "phases": phases,
                     "other_activities": [{"title": (d.get("code") or {}).get("text", ""),
                                           "description": d.get("description", "")} for d in extra]},
        "counts": counts,
    }


_COLOUR = re.compile(r"#[0-9A-Fa-f]{3,8}|rgba?\([0-9., %]{5,40}\)")
_FONT = re.compile(r"[A-Za-z0-9 ,\-\"']{1,120}")
#: SMART style keys (scopes-and-launch-context.html, "Styling") -> our CSS variables
_STYLE_VARS = {"color_background": "--bg", "color_text": "--text", "color_highlight": "--accent",
               "color_modal_backdrop": None, "color_error": "--bad", "color_success": "--ok",
               "dim_border": "--line", "font_family": "font-family"}


def _fetch_style(http: requests.Session, url: str | None, iss: str) -> dict[str, str]:
    """The style document's safe values, or {} (it is optional: any problem means our own look)."""
    if not url:
        return {}
    try:
        # the parser requests connects with, so a backslash or userinfo trick cannot reach another host
        if origin(safe_url(url, what="smart_style_url")) != origin(safe_url(iss, what="issuer")):
            return {}
    except PluginError:
        return {}
    try:
        answer = http.get(url, timeout=3, allow_redirects=False, headers={"Accept": "application/json"})
        doc = answer.json() if answer.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}
    out = {}
    for key, var in _STYLE_VARS.items():
        value = doc.get(key) if isinstance(doc, dict) else None
        if var and isinstance(value, str):
            pattern = _FONT if key == "font_family" else _COLOUR
            if pattern.fullmatch(value.strip()):
                out[var] = value.strip()
    return out


def style_css(style: Mapping[str, str]) -> str:
    variables = "".join(f"{k}: {v}; " for k, v in style.items() if k.startswith("--"))
    css = f":root {{ {variables}}}\n" if variables else ""
    if style.get("font-family"):
        css += f"body {{ font-family: {style['font-family']}; }}\n"
    return css


def _evidence_link(ref: str) -> str | None:
    parts = ref.split("/")
    if len(parts) == 2 and parts[0] in VIEWABLE:
        return f"/resource/{parts[0]}/{parts[1]}"
    return None


def review_context(sess: LaunchSession, report: Report, record: PatientRecord, drafts: Mapping[str, Any] | None,
                   refused: str | None) -> dict[str, Any]:
    """What review.html shows for one launch: the grouped checklist, the banner, the drafts or the refusal."""
    context = sess.context
    groups = [(status, title, [e for e in report.elements if e.status == status]) for status, title in GROUPS]
    return {
        "sess": sess, "report": report, "groups": groups,
        "banner": _banner(record.patient, sess.patient) if context.need_patient_banner else None,
        "drafts": draft_view(drafts) if drafts else None, "refused": refused,
        "write_allowed": sess.write_allowed, "missing_write": sess.missing_write_scopes,
        "csrf": sess.csrf, "ehr_style": bool(context.smart_style_url),
    }


# ---------------------------------------------------------------- rendering

class Pages:
    """The Jinja environment (autoescaped) and the two ways the app answers: a page, or a refusal."""

    def __init__(self, *, profile_code: str, profile_display: str) -> None:
        self.templates = Environment(loader=FileSystemLoader(_HERE / "templates"),
                                     autoescape=select_autoescape(default=True))
        self.templates.globals.update(app_version=__version__, profile_code=profile_code,
                                      profile_display=profile_display, evidence_link=_evidence_link)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def refusal(self, request: Request, status: int, title: str, message: str) -> Response:
        """The error page, or ``{"error": message}`` under /api/ (the JSON API never gets HTML)."""
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return self.page(request, "error.html", status, title=title, message=message)
