"""CDS Hooks cards from a review: data in, data out (CDS Hooks 2.0 "CDS Service Response"). Pure.

The CDS service (``smart_launch/routes/cds.py``) and anything else that
shows the review inside an EHR's workflow call these functions; they never
read a server or a clock.  The shapes follow the CDS Hooks 2.0 specification:
discovery ("Discovery" §: ``services`` with ``hook``, ``id``, ``prefetch``),
cards ("Card Attributes": ``uuid``, ``summary`` under 140 characters,
``indicator``, ``source``, ``suggestions`` with ``selectionBehavior``,
``links`` of type ``smart`` with ``appContext``) and the feedback body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._check import conditions_under_review
from ._profile import Profile
from ._report import ElementResult, Report
from ._review import Review
from ._vocab import ICD10CM, URI_IDENTIFIER, is_plugin_draft

__all__ = [
    "CardContext",
    "PREFETCH",
    "SUMMARY_LIMIT",
    "cds_service_id",
    "cds_discovery",
    "cards_for_review",
    "order_sign_cards",
    "needs_review",
    "orders_for_code",
    "gap_phrase",
    "suggestion_actions",
    "OVERRIDE_REASONS",
    "OVERRIDE_SYSTEM",
    "HOOKS",
]

#: CDS Hooks 2.0, Card.summary: "<140-character summary"
SUMMARY_LIMIT = 140
#: the hooks served per profile (issue 14: patient-view everywhere; order-sign as Epic and Da Vinci CRD use it)
HOOKS = ("patient-view", "order-sign")
#: prefetch templates for what the check reads (SPEC §3: Patient, Condition, Observation, Encounter, CarePlan)
PREFETCH: dict[str, str] = {
    "patient": "Patient/{{context.patientId}}",
    "conditions": "Condition?patient={{context.patientId}}",
    "observations": "Observation?patient={{context.patientId}}",
    "encounters": "Encounter?patient={{context.patientId}}",
    "carePlans": "CarePlan?patient={{context.patientId}}",
}
OVERRIDE_SYSTEM = "urn:fhir-plugin:cds-override-reason"
#: Card.overrideReasons: what a clinician may say when dismissing a card (stored by the feedback endpoint)
OVERRIDE_REASONS: tuple[dict[str, str], ...] = (
    {"system": OVERRIDE_SYSTEM, "code": "already-documented", "display": "Already documented elsewhere"},
    {"system": OVERRIDE_SYSTEM, "code": "not-applicable", "display": "Does not apply to this patient"},
    {"system": OVERRIDE_SYSTEM, "code": "document-later", "display": "Will document later in this visit"},
)
_NAMESPACE = uuid.UUID("0b7c7f4e-7d57-5d0f-9d9e-51c7a3c2e6aa")
#: gap statuses that still need work now (SPEC §3 statuses); not-yet-due and proposed are only reminders
_OPEN = ("conflict", "missing")
_REMINDER = ("not-yet-due", "proposed")


@dataclass(frozen=True)
class CardContext:
    """What a card needs besides the review: who asks, and where the app and its source page live."""

    service_id: str
    hook_instance: str
    app_launch_url: str  # the SMART app's launch URL (the card's ``smart`` link)
    source_url: str  # a page about the service (Card.source.url)
    encounter: str | None = None  # ``Encounter/id`` from the hook's context, carried in appContext


def cds_service_id(hook: str, profile_code: str) -> str:
    """A stable service id per hook and profile (``patient-view-m62-561``): ids are URL path segments."""
    return f"{hook}-{profile_code.lower().replace('.', '-')}"


def cds_discovery(profiles: Iterable[Profile]) -> dict[str, Any]:
    """The discovery document (CDS Hooks 2.0 "Discovery"): a patient-view and an order-sign service per profile."""
    services = []
    for profile in profiles:
        for hook in HOOKS:
            what = (
                "when a patient's chart is opened"
                if hook == "patient-view"
                else "when an order whose reason is the code is signed"
            )
            services.append(
                {
                    "hook": hook,
                    "id": cds_service_id(hook, profile.code),
                    "title": f"{profile.code} documentation check ({hook})",
                    "description": f"Checks the documentation {profile.code} ({profile.display}) needs, {what}: "
                    "red flags, code fit and documentation gaps, with the review app one click away.",
                    "prefetch": dict(PREFETCH),
                    "usageRequirements": "Send a signed JWT; send the prefetch, or fhirServer with fhirAuthorization.",
                }
            )
    return {"services": services}


def needs_review(conditions: Iterable[Mapping[str, Any]], profile: Profile) -> bool:
    """The fast path: is the profile's code under review for the patient (SPEC §3)? Reads Conditions only."""
    return bool(conditions_under_review(conditions, profile))


def _icd(code: str) -> str:
    return code.replace(".", "").upper()


def orders_for_code(draft_orders: Mapping[str, Any] | None, profile: Profile) -> list[str]:
    """``Type/id`` of each draft order (order-sign ``context.draftOrders``) whose reason is the profile's code."""
    wanted = _icd(profile.code)
    found = []
    for entry in (draft_orders or {}).get("entry") or []:
        order = (entry or {}).get("resource") or {}
        codings = [c for concept in order.get("reasonCode") or [] for c in (concept or {}).get("coding") or []]
        if any(c.get("system") == ICD10CM and _icd(str(c.get("code", ""))) == wanted for c in codings):
            found.append(f"{order.get('resourceType', 'Resource')}/{order.get('id', '(draft)')}")
    return found


def gap_phrase(element: ElementResult, profile: Profile) -> str:
    """A gap in plain words: the profile's ``action`` for the element when it has one, else from its title."""
    title = element.title or element.id
    lowered = title[:1].lower() + title[1:]
    if element.status == "not-yet-due":
        return f"{lowered} not yet due"
    if element.status == "proposed":
        return f"{lowered} drafted, awaiting review"
    spec = next((e for e in profile.elements if e.get("id") == element.id), {})
    action = spec.get("action")
    if isinstance(action, str) and action.strip():
        return action.strip()
    verb = "resolve the conflict in" if element.status == "conflict" else "document"
    return f"{verb} {lowered}"


def _gaps(report: Report) -> tuple[list[ElementResult], list[ElementResult]]:
    """Required elements still open (conflicts first: a wrong site or side outweighs a missing note) and reminders."""
    required = [e for e in report.elements if e.required]
    open_ = [e for e in required if e.status == "conflict"] + [e for e in required if e.status == "missing"]
    return open_, [e for e in required if e.status in _REMINDER]


def _fit(summary_start: str, phrases: Sequence[str], limit: int = SUMMARY_LIMIT) -> str:
    """``summary_start`` and as many phrases as fit under ``limit`` characters, then "and N more"."""
    shown: list[str] = []
    for i, phrase in enumerate(phrases):
        rest = len(phrases) - i - 1
        tail = f" and {rest} more" if rest else ""
        candidate = summary_start + ", ".join(shown + [phrase]) + tail
        if len(candidate) >= limit:
            break
        shown.append(phrase)
    left = len(phrases) - len(shown)
    text = summary_start + ", ".join(shown) + (f" and {left} more" if left and shown else "")
    if not shown:
        text = summary_start.rstrip(": ")
    return text if len(text) < limit else text[: limit - 2] + "…"


def _uuid(ctx: CardContext, patient: str, kind: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "|".join((ctx.service_id, ctx.hook_instance, patient, kind))))


def _link(ctx: CardContext, profile: Profile, encounter: str | None) -> dict[str, Any]:
    # CDS Hooks 2.0 Link: type "smart" launches the app; appContext is a string the app receives at launch
    app_context = json.dumps({"encounter": encounter, "profile": profile.code}, separators=(",", ":"))
    return {
        "label": "Open the documentation review",
        "url": ctx.app_launch_url,
        "type": "smart",
        "appContext": app_context,
    }


def _logical(resource: Mapping[str, Any]) -> dict[str, Any] | None:
    ident = next((i for i in resource.get("identifier") or [] if i.get("system") == URI_IDENTIFIER), None)
    return {"identifier": {"system": ident["system"], "value": ident["value"]}} if ident else None


def suggestion_actions(
    drafts: Mapping[str, Any], record_resources: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The create actions for the provisional Condition and the draft plan, from the review's drafts.

    Each resource keeps the plugin's identifier (SPEC §7), so a client that
    creates it conditionally on that identifier creates nothing the second
    time; a draft the record already holds is left out.  The transaction's
    ``urn:uuid`` links do not survive separate creates: the plan addresses the
    Condition by its identifier, and the Goals (not part of a card) are dropped.
    """
    held = {
        (i.get("system"), i.get("value"))
        for r in record_resources
        if is_plugin_draft(r)
        for i in r.get("identifier") or []
    }
    by_url = {e.get("fullUrl"): e.get("resource") or {} for e in drafts.get("entry") or []}
    actions = []
    for entry in drafts.get("entry") or []:
        resource = dict(entry.get("resource") or {})
        rtype = resource.get("resourceType")
        if rtype not in ("Condition", "CarePlan"):
            continue
        if any((i.get("system"), i.get("value")) in held for i in resource.get("identifier") or []):
            continue
        if rtype == "CarePlan":
            resource["addresses"] = [
                _logical(by_url.get(a.get("reference"), {})) or a for a in resource.get("addresses") or []
            ]
            resource.pop("goal", None)
            resource["activity"] = [_without_goals(a) for a in resource.get("activity") or []]
            description = "Create the draft care plan (status draft, for clinician review)"
        else:
            description = "Create the provisional diagnosis (verification status provisional)"
        actions.append({"type": "create", "description": description, "resource": resource})
    return actions


def _without_goals(activity: Mapping[str, Any]) -> dict[str, Any]:
    detail = {k: v for k, v in (activity.get("detail") or {}).items() if k != "goal"}
    return {**activity, "detail": detail}


def _card(
    ctx: CardContext,
    profile: Profile,
    review: Review,
    kind: str,
    indicator: str,
    summary: str,
    detail: str,
    actions: list[dict[str, Any]],
) -> dict[str, Any]:
    patient = review.report.patient
    card: dict[str, Any] = {
        "uuid": _uuid(ctx, patient, kind),
        "summary": summary,
        "detail": detail,
        "indicator": indicator,
        "source": {
            "label": f"fhir-plugin documentation check ({profile.code})",
            "url": ctx.source_url,
            "topic": {"system": OVERRIDE_SYSTEM.replace("override-reason", "card"), "code": kind},
        },
        "links": [_link(ctx, profile, ctx.encounter or review.report.encounter)],
        "overrideReasons": [dict(r) for r in OVERRIDE_REASONS],
    }
    if actions:
        card["suggestions"] = [
            {
                "label": f"Add the provisional {profile.code} diagnosis and the draft plan",
                "uuid": _uuid(ctx, patient, kind + "/suggestion"),
                "isRecommended": True,
                "actions": actions,
            }
        ]
        card["selectionBehavior"] = "any"
    return card


def cards_for_review(
    review: Review, profile: Profile, ctx: CardContext, record_resources: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The patient-view cards of one review (issue 14 "Cards"): red flags, code mismatch, documentation gaps.

    The caller has already established that the code is under review (``needs_review``);
    a complete record with no red flag gets no card.
    """
    report = review.report
    actions = suggestion_actions(review.drafts, record_resources) if review.drafts is not None else []
    cards = []
    present = [f for f in report.red_flags if f.status == "present"]
    if present:  # SPEC §4: any present red flag makes the report say "referral recommended"
        names = ", ".join(f.title.lower() for f in present)
        cards.append(
            _card(
                ctx,
                profile,
                review,
                "red-flags",
                "critical",
                _fit("Referral recommended: red flags present: ", [f.title.lower() for f in present]),
                f"Red flags documented for this patient: {names}. Evaluate before starting the "
                f"{profile.code} protocol; the draft plan holds its phases until then.",
                actions,
            )
        )
    if report.code_fit.status == "mismatch":  # SPEC §5: name the suggested codes with their official titles
        suggested = report.code_fit.suggested
        codes = [s.code for s in suggested]
        lines = "\n".join(f"- **{s.code}** {s.display}: {s.reason}" for s in suggested)
        detail = f"The documentation does not support {profile.code} ({profile.display}). " + (
            f"Suggested codes:\n\n{lines}" if lines else report.code_fit.detail
        )
        cards.append(
            _card(
                ctx,
                profile,
                review,
                "code-mismatch",
                "warning",
                _fit(f"{profile.code} may not fit the documentation; consider ", codes),
                detail,
                [],
            )
        )
    open_, reminders = _gaps(report)
    if open_ or reminders:
        gaps = open_ + reminders
        phrases = [gap_phrase(e, profile) for e in gaps]
        count = len(gaps)
        start = f"{count} documentation gap{'s' if count != 1 else ''} for {profile.code}: "
        lines = "\n".join(f"- {p[:1].upper() + p[1:]} ({e.status})" for p, e in zip(phrases, gaps, strict=True))
        cards.append(
            _card(
                ctx,
                profile,
                review,
                "documentation-gaps",
                "warning" if open_ else "info",
                _fit(start, phrases),
                f"Documentation the code needs:\n\n{lines}",
                actions,
            )
        )
    return cards


def order_sign_cards(
    review: Review,
    profile: Profile,
    ctx: CardContext,
    orders: Sequence[str],
    record_resources: Iterable[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The order-sign card: a draft order's reason is the profile's code and required documentation is missing."""
    open_, _reminders = _gaps(review.report)
    if not orders or not open_:
        return []
    actions = suggestion_actions(review.drafts, record_resources) if review.drafts is not None else []
    phrases = [gap_phrase(e, profile) for e in open_]
    count = len(open_)
    lines = "\n".join(f"- {p[:1].upper() + p[1:]}" for p in phrases)
    return [
        _card(
            ctx,
            profile,
            review,
            "order-documentation",
            "warning",
            _fit(f"Order for {profile.code} needs {count} more item{'s' if count != 1 else ''}: ", phrases),
            f"The order ({', '.join(orders)}) gives {profile.code} as its reason; the record still needs:\n\n{lines}",
            actions,
        )
    ]
