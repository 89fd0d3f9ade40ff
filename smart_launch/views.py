"""What the pages show: pure view helpers, the EHR's style, and the page/refusal renderer.

The helpers turn core objects (a report, a draft Bundle, a Patient) into the
plain dicts the Jinja templates read; ``Pages`` renders a template or, for the
JSON API, the same refusal as ``{"error": ...}``.  ``_fetch_style`` is the one
piece of I/O: the EHR's optional ``smart_style_url`` document.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import requests
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from fhir_plugin import PatientRecord, PluginError, Profile, Report, __version__, phases_of
from fhir_plugin._record import subject_patient_id
from fhir_plugin._urls import origin, safe_url

from ._launch import WriteAccess
from .state import LaunchSession

if TYPE_CHECKING:  # deps imports this module; the type only
    from .deps import Reviewed

__all__ = [
    "Pages",
    "VIEWABLE",
    "PLAIN_TYPES",
    "plain_refs",
    "plain_form",
    "plain_reason",
    "GROUPS",
    "review_context",
    "draft_view",
    "subject_of",
    "_fetch_style",
    "style_css",
    "evidence_index",
    "resource_facts",
    "gap_actions",
    "verdict",
    "alternatives",
    "trends",
    "svg_plot",
    "Series",
]

_HERE = Path(__file__).parent
#: resource types the evidence viewer shows (the patient's own record; SPEC §7's drafts)
VIEWABLE = ("Patient", "Condition", "Observation", "Encounter", "CarePlan", "Goal", "Provenance", "DocumentReference")
GROUPS = (
    ("conflict", "Conflicts"),
    ("missing", "Missing"),
    ("not-yet-due", "Not yet due"),
    ("proposed", "Proposed"),
    ("met", "Met"),
)


# ---------------------------------------------------------------- pure helpers for the views


def subject_of(resource: Mapping[str, Any]) -> str | None:
    """The patient a resource belongs to: the same reading as the check's (``subject_patient_id``)."""
    return subject_patient_id(resource)


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
    return {
        "name": _human_name(patient),
        "gender": str(patient.get("gender") or "unknown"),
        "birth_date": str(patient.get("birthDate") or "unknown"),
        "id": patient_id,
    }


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

    phases = [
        {
            "number": p.number,
            "title": p.title,
            "start": p.start,
            "end": p.end,
            "goals": [goal_text(g) for g in p.goals],
            "activities": list(p.activities),
        }
        for p in phases_of(careplan)
    ]
    extra = [(a.get("detail") or {}) for a in careplan.get("activity") or [] if not a.get("extension")]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["resource"]["resourceType"]] = counts.get(e["resource"]["resourceType"], 0) + 1
    return {
        "condition": {
            "codes": [
                {"system": c.get("system", ""), "code": c.get("code", ""), "display": c.get("display", "")}
                for c in codings
            ],
            "clinical_status": ((condition.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code"),
            "verification_status": ((condition.get("verificationStatus") or {}).get("coding") or [{}])[0].get("code"),
            "body_site": ", ".join(b.get("text", "") for b in condition.get("bodySite") or []),
            "onset": condition.get("onsetDateTime"),
            "note": " ".join(n.get("text", "") for n in condition.get("note") or []),
            "evidence": [d.get("reference") for ev in condition.get("evidence") or [] for d in ev.get("detail") or []],
        },
        "careplan": {
            "title": careplan.get("title"),
            "status": careplan.get("status"),
            "intent": careplan.get("intent"),
            "phases": phases,
            "other_activities": [
                {"title": (d.get("code") or {}).get("text", ""), "description": d.get("description", "")} for d in extra
            ],
        },
        "counts": counts,
    }


_COLOUR = re.compile(r"#[0-9A-Fa-f]{3,8}|rgba?\([0-9., %]{5,40}\)")
_FONT = re.compile(r"[A-Za-z0-9 ,\-\"']{1,120}")
#: SMART style keys (scopes-and-launch-context.html, "Styling") -> our CSS variables
_STYLE_VARS = {
    "color_background": "--bg",
    "color_text": "--text",
    "color_highlight": "--accent",
    "color_modal_backdrop": None,
    "color_error": "--bad",
    "color_success": "--ok",
    "dim_border": "--line",
    "font_family": "font-family",
}


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


#: what a clinician calls each kind of record the app shows or writes (the page's words, not FHIR's);
#: the only DocumentReference the plugin writes is its plan of care note
PLAIN_TYPES = {
    "Patient": "patient",
    "Condition": "diagnosis",
    "Observation": "observation",
    "Encounter": "visit",
    "CarePlan": "treatment plan",
    "Goal": "goal",
    "Provenance": "authorship record",
    "DocumentReference": "plan of care note",
}
_CONDITION_CATEGORY = {"problem-list-item": "problem-list entry", "encounter-diagnosis": "encounter diagnosis"}
_CONDITION_FORM = re.compile(r"^Condition \(([\w-]+), ([\w-]+)\)$")
_NO_CREATE = re.compile(r"^the server creates no (\w+)( and no DocumentReference)?(; .*)?$")
_NO_GRANT = re.compile(r"^the granted scopes allow no (\w+) create(; .*)?$")


def _plain(rtype: str) -> str:
    return PLAIN_TYPES.get(rtype, rtype)


def plain_refs(refs: list[str]) -> list[tuple[str, str]]:
    """Each written reference with its label in plain words ("Diagnosis", "Goal 2"), in order."""
    types = [ref.split("/", 1)[0] for ref in refs]
    counts = Counter(types)
    seen: Counter[str] = Counter()
    out = []
    for ref, rtype in zip(refs, types, strict=True):
        seen[rtype] += 1
        label = _plain(rtype).capitalize()
        out.append((ref, f"{label} {seen[rtype]}" if counts[rtype] > 1 else label))
    return out


def plain_form(draft: str, form: str) -> str:
    """How a draft was written on this EHR (``_fold``'s form), in plain words."""
    found = _CONDITION_FORM.match(form)
    if draft == "Condition" and found:
        category = _CONDITION_CATEGORY.get(found[1], found[1])
        return f"as a {found[2]} {category}"
    if draft == "CarePlan" and form.startswith("DocumentReference (preliminary plan note"):
        return "as a preliminary plan of care note, with the structured plan attached"
    if draft == "Goal" and form.startswith("in the plan note"):
        return "inside the plan of care note"
    return "as drafted" if form == draft else form


def plain_reason(reason: str) -> str:
    """Why a draft was not written (``_fold`` and the writer's reasons), in plain words."""
    rest = ""
    if found := _NO_CREATE.match(reason):
        text = f"this EHR accepts no {_plain(found[1])}" + (" and no note" if found[2] else "")
        rest = found[3] or ""
    elif found := _NO_GRANT.match(reason):
        text = f"the access this app was granted does not allow writing a {_plain(found[1])}"
        rest = found[2] or ""
    else:
        return reason
    if rest == "; the note and the Condition carry the machine-drafted tag":
        rest = "; the note and the diagnosis are marked as drafted by software"
    return text + rest


def _evidence_link(ref: str) -> str | None:
    parts = ref.split("/")
    if len(parts) == 2 and parts[0] in VIEWABLE:
        return f"/resource/{parts[0]}/{parts[1]}"
    return None


def review_context(
    sess: LaunchSession, loaded: Reviewed, *, shipped: tuple[str, ...] = (), access: WriteAccess | None = None
) -> dict[str, Any]:
    """What review.html shows for one launch: the verdict, the actions, the one button, then the details.

    ``access`` is what the grant lets the writer chosen for this EHR write (None: judged on the scopes alone).
    """
    report, record, drafts = loaded.report, loaded.record, loaded.drafts
    profile = loaded.profile
    assert profile is not None  # the review dependency always names the profile it used
    context = sess.context
    groups = [(status, title, [e for e in report.elements if e.status == status]) for status, title in GROUPS]
    written = bool(loaded.existing.written)
    return {
        "sess": sess,
        "report": report,
        "groups": groups,
        "banner": _banner(record.patient, sess.patient) if context.need_patient_banner else None,
        "drafts": draft_view(drafts) if drafts else None,
        "refused": loaded.refused,
        "settled": loaded.settled,
        "existing": loaded.existing,
        "written": written,
        "write_allowed": access.allowed if access is not None else sess.write_allowed,
        "missing_write": list(access.missing) if access is not None else sess.missing_write_scopes,
        "csrf": sess.csrf,
        "ehr_style": bool(context.smart_style_url),
        "verdict": verdict(report, settled=loaded.settled, written=written),
        "actions": gap_actions(report, profile),
        "evidence": evidence_index(record),
        "alternatives": alternatives(report, shipped),
        "trends": trends(record, profile),
        "profile_code": profile.code,
        "profile_display": profile.display,
    }


# ---------------------------------------------------------------- rendering


class Pages:
    """The Jinja environment (autoescaped) and the two ways the app answers: a page, or a refusal."""

    def __init__(self, *, profile_code: str, profile_display: str) -> None:
        self.templates = Environment(
            loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(default=True)
        )
        self.templates.globals.update(
            app_version=__version__,
            profile_code=profile_code,
            profile_display=profile_display,
            evidence_link=_evidence_link,
            human_name=_human_name,
            plain_refs=plain_refs,
            plain_form=plain_form,
            plain_reason=plain_reason,
            plain_type=lambda rtype: _plain(rtype).capitalize(),
        )

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """Render ``name``; ``lq`` is the query every link and form keeps: this tab's launch, and its code."""
        keep = {k: request.query_params[k] for k in ("launch", "code") if request.query_params.get(k)}
        context.setdefault("lq", ("?" + urlencode(keep)) if keep else "")
        context.setdefault("launch", keep.get("launch"))
        html = self.templates.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def refusal(self, request: Request, status: int, title: str, message: str) -> Response:
        """The error page, or ``{"error": message}`` under /api/ (the JSON API never gets HTML)."""
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return self.page(request, "error.html", status, title=title, message=message)


# ---------------------------------------------------------------- the five-second page (issue 13)

_SIDE = re.compile(r"\b(right|left)\b", re.IGNORECASE)
_GRADE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*\d+)?")


def _when(resource: Mapping[str, Any]) -> str:
    """The clinical date of a resource (YYYY-MM-DD), or ''."""
    for key in ("effectiveDateTime", "onsetDateTime", "recordedDate", "issued", "created", "authoredOn"):
        if isinstance(resource.get(key), str):
            return str(resource[key])[:10]
    for key in ("effectivePeriod", "period", "onsetPeriod"):
        start = (resource.get(key) or {}).get("start")
        if isinstance(start, str):
            return start[:10]
    return ""


def _text_of(concept: Any) -> str:
    """A CodeableConcept's words; anything else (a plain code string, nothing) reads as ''."""
    if not isinstance(concept, Mapping):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display"):
            return str(coding["display"])
    return ""


def _sites(resource: Mapping[str, Any]) -> list[str]:
    """bodySite's words: one CodeableConcept on an Observation, a list on a Condition (R4)."""
    sites = resource.get("bodySite")
    concepts = sites if isinstance(sites, list) else [sites] if isinstance(sites, dict) else []
    return [t for t in (_text_of(c) for c in concepts) if t]


def _value(resource: Mapping[str, Any]) -> str:
    """An Observation's value as a person reads it ("34.5 cm", "4/5", "yes")."""
    q = resource.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        unit = str(q.get("unit") or q.get("code") or "")
        unit = "" if unit.startswith("{") else unit
        return f"{q['value']:g} {unit}".strip() if isinstance(q["value"], (int, float)) else str(q["value"])
    if isinstance(resource.get("valueString"), str):
        return str(resource["valueString"])
    if isinstance(resource.get("valueBoolean"), bool):
        return "yes" if resource["valueBoolean"] else "no"
    if isinstance(resource.get("valueCodeableConcept"), dict):
        return _text_of(resource["valueCodeableConcept"])
    return ""


def evidence_index(record: PatientRecord) -> dict[str, dict[str, str]]:
    """``ResourceType/id`` -> what an evidence link shows: date, name and value, not a bare id. Pure."""
    out: dict[str, dict[str, str]] = {}
    for r in record.resources:
        types = r.get("type") if isinstance(r.get("type"), list) else []
        name = _text_of(r.get("code")) or (_text_of(types[0]) if types else "") or str(r.get("resourceType", ""))
        out[f"{r.get('resourceType')}/{r.get('id')}"] = {"date": _when(r), "name": name, "value": _value(r)}
    return out


def resource_facts(resource: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The resource viewer's readable lines (label, value); the raw JSON stays one click further."""
    facts = [("Type", str(resource.get("resourceType", "")))]
    # a note (the plan as the plugin folds it on EHRs without CarePlan create) is named by its type
    name = _text_of(resource.get("code")) or _text_of(resource.get("type"))
    if name:
        facts.append(("What", name))
    if resource.get("description"):
        facts.append(("Description", str(resource["description"])))
    if resource.get("docStatus"):
        facts.append(("Document status", str(resource["docStatus"])))
    if _when(resource):
        facts.append(("Date", _when(resource)))
    if _value(resource):
        facts.append(("Value", _value(resource)))
    sites = ", ".join(_sites(resource))
    if sites:
        facts.append(("Body site", sites))
    status = resource.get("status") or _text_of(resource.get("clinicalStatus"))
    if status:
        facts.append(("Status", str(status)))
    if resource.get("resourceType") == "Patient":
        facts.append(("Name", _human_name(resource)))
        facts.append(("Born", str(resource.get("birthDate") or "unknown")))
    for note in resource.get("note") or []:
        if note.get("text"):
            facts.append(("Note", str(note["text"])))
    return facts


def gap_actions(report: Report, profile: Profile) -> list[dict[str, Any]]:
    """The gaps as actions in plain words, one per action: two gaps one note closes are one line. Pure.

    The wording is profile data (element ``action``); an all-of element (medical necessity) is not its own
    action while one of its parts is a gap, since documenting the part closes it.
    """
    raw = {e["id"]: e for e in profile.raw.get("elements", [])}
    gaps = report.gaps()
    gap_ids = {g.id for g in gaps}
    undocumented = [f.title for f in report.red_flags if f.status == "not-documented"]
    actions: dict[str, dict[str, Any]] = {}
    for gap in gaps:
        spec = raw.get(gap.id, {})
        if spec.get("kind") == "all-of" and gap_ids & set(spec.get("of") or ()):
            continue
        words = str(spec.get("action") or gap.title)
        if spec.get("kind") == "red-flag-screen" and undocumented:
            words = f"{words}: {', '.join(t[:1].lower() + t[1:] for t in undocumented)}"
        item = actions.setdefault(words, {"action": words, "elements": [], "conflict": False})
        item["elements"].append(gap.title)
        item["conflict"] = item["conflict"] or gap.status == "conflict"
    return list(actions.values())


def verdict(report: Report, *, settled: str | None, written: bool) -> dict[str, str]:
    """The one line the page leads with: the referral first under a red flag, never "Complete" (SPEC §7.1)."""
    n = len(report.gaps())
    gaps = f"{n} gap{'' if n == 1 else 's'} to document" if n else ""
    if report.referral_recommended:
        flags = ", ".join(f.title for f in report.red_flags if f.status == "present")
        return {
            "kind": "bad",
            "text": f"Refer first: red flags present ({flags})",
            "sub": "The protocol waits for the evaluation." + (f" Also {gaps}." if gaps else ""),
        }
    if report.code_fit.status == "mismatch":
        # the gaps of a code that does not fit are not this patient's to-do list (issue 13, item 8)
        return {
            "kind": "bad",
            "text": "The record supports another code",
            "sub": f"Nothing is drafted under {report.profile_code}; review under the suggested code below.",
        }
    if report.complete:
        return {
            "kind": "ok",
            "text": "Complete",
            "sub": "Drafts written; nothing more to write."
            if written
            else ("Nothing new to write." if settled else "Every required element is documented."),
        }
    if report.code_fit.status == "insufficient":
        return {"kind": "gap", "text": "Code fit undetermined" + (f" · {gaps}" if gaps else ""), "sub": ""}
    return {
        "kind": "gap",
        "text": gaps[:1].upper() + gaps[1:] if gaps else "Draft plan awaits clinician review",
        "sub": "",
    }


def alternatives(report: Report, shipped: tuple[str, ...]) -> list[dict[str, Any]]:
    """The suggested codes of a mismatch, each with whether this app can review under it (its profile ships)."""
    return [
        {"code": s.code, "display": s.display, "reason": s.reason, "ships": s.code in shipped}
        for s in report.code_fit.suggested
    ]


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[tuple[str, float, str], ...]  # (date, value, shown value)


def _number(resource: Mapping[str, Any]) -> float | None:
    q = resource.get("valueQuantity")
    if isinstance(q, dict) and isinstance(q.get("value"), (int, float)):
        return float(q["value"])
    m = _GRADE.match(str(resource.get("valueString") or ""))
    return float(m.group(1)) if m else None


def trends(record: PatientRecord, profile: Profile) -> list[dict[str, Any]]:
    """The objective measures the profile names (``trends``), as series over the encounters. Pure."""
    out = []
    observations = [r for r in record.of_type("Observation") if r.get("status") != "entered-in-error"]
    for spec in profile.raw.get("trends") or []:
        words = [w.lower() for w in spec.get("keywords") or []]
        loinc = set(spec.get("loinc") or [])
        lines: dict[str, list[tuple[str, float, str]]] = {}
        for obs in observations:
            codes = {c.get("code") for c in (obs.get("code") or {}).get("coding") or []}
            name = _text_of(obs.get("code")).lower()
            if not (codes & loinc or any(w in name for w in words)):
                continue
            value, when = _number(obs), _when(obs)
            if value is None or not when:
                continue
            label = "all"
            if spec.get("by_side"):
                text = " ".join(_sites(obs) + [str(n.get("text", "")) for n in obs.get("note") or []])
                found = _SIDE.search(text)
                label = found.group(1).lower() if found else "unsided"
            lines.setdefault(label, []).append((when, value, _value(obs)))
        if lines:
            series = [Series(k, tuple(sorted(v))) for k, v in sorted(lines.items())]
            out.append(
                {
                    "id": spec["id"],
                    "title": spec["title"],
                    "unit": spec.get("unit", ""),
                    "series": series,
                    "svg": Markup(svg_plot(series, title=spec["title"])),
                }
            )
    return out


_COLOURS = ("#2457a6", "#b3261e", "#1f7a3a", "#7a4b9a")


def svg_plot(series: list[Series], *, title: str, width: int = 320, height: int = 140) -> str:
    """A small line chart as inline SVG: presentation attributes only, so the CSP (no inline style) holds. Pure.

    The table beside it carries the same numbers for screen readers; the SVG is aria-hidden.
    """
    dates = sorted({p[0] for s in series for p in s.points})
    values = [p[1] for s in series for p in s.points]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    pad = (high - low) * 0.15
    low, high = low - pad, high + pad
    left, right, top, bottom = 44, 12, 10, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(d: str) -> float:
        return left + (plot_w * dates.index(d) / (len(dates) - 1) if len(dates) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (high - v) / (high - low)

    parts = [
        f'<svg class="plot" viewBox="0 0 {width} {height}" width="100%" role="presentation" '
        f'aria-hidden="true" focusable="false" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="#8a97a6"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#8a97a6"/>',
    ]
    for v in (low + pad, high - pad):
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" fill="#3d4a58">{v:g}</text>'
        )
    for i, d in enumerate(dates):  # the last date's label ends at its point, so it never runs off the edge
        anchor = "end" if i == len(dates) - 1 and len(dates) > 1 else "middle"
        parts.append(
            f'<text x="{x(d) + (4 if anchor == "end" else 0):.1f}" y="{height - 8}" text-anchor="{anchor}" '
            f'font-size="11" fill="#3d4a58">{html.escape(d[5:])}</text>'
        )
    for i, s in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v, _ in s.points)
        if len(s.points) > 1:
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for d, v, _ in s.points:
            parts.append(f'<circle cx="{x(d):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}"/>')
        if s.label != "all":
            d, v, _ = s.points[-1]
            parts.append(
                f'<text x="{min(x(d) + 6, width - right - 30):.1f}" y="{y(v) - 6:.1f}" font-size="11" '
                f'fill="{colour}">{html.escape(s.label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
