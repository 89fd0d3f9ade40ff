"""Vendor personalities of the sandbox EHR's FHIR proxy (issue 12, item 4).  Pure.

``hapi`` is the open server behind the proxy, as it is.  ``epic-like`` and
``oracle-like`` are built from the public facts the issue lists: what such a
server refuses (with the status and OperationOutcome it answers), and the
CapabilityStatement rewritten to declare exactly what it allows, so a client
that reads the statement needs no vendor switch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["Personality", "PERSONALITIES", "personality", "refusal", "rewrite_capabilities"]

_PROBLEMS = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns"
_DIAGNOSIS = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-encounter-diagnosis"


@dataclass(frozen=True)
class Personality:
    """What one kind of server allows; every refusal and the rewritten statement follow from these fields."""

    name: str
    bundles: bool = True  # transaction and batch at the base
    bundle_refusal: int = 400  # the status a Bundle POST gets when refused
    conditional_create: bool = True  # If-None-Exist honoured
    creatable: frozenset[str] | None = None  # None: every type
    condition_categories: frozenset[str] | None = None
    condition_provisional_only: bool = False
    note_needs_encounter: bool = False  # DocumentReference create needs context.encounter
    search_needs: frozenset[str] = frozenset()  # one of these parameters on every search
    observation_needs_category: bool = False
    revinclude: frozenset[str] | None = None  # None: any _revinclude
    v1_scopes: bool = False  # grants scopes in SMART v1 spelling
    #: Bulk Data export levels offered: system ($export), patient (Patient/$export), group (Group/[id]/$export)
    export_levels: frozenset[str] = frozenset({"system", "patient", "group"})

    def can_create(self, resource_type: str) -> bool:
        return self.creatable is None or resource_type in self.creatable


PERSONALITIES: dict[str, Personality] = {
    "hapi": Personality("hapi"),
    # Epic: no Bundles, no conditional create; Condition as a provisional problem-list item only; a clinical
    # note on an encounter; per-patient searches, some Observation searches need a category; v1 scopes;
    # Bulk Data export of a Group only
    "epic-like": Personality(
        "epic-like",
        bundles=False,
        bundle_refusal=400,
        conditional_create=False,
        creatable=frozenset({"Condition", "DocumentReference"}),
        condition_categories=frozenset({"problem-list-item"}),
        condition_provisional_only=True,
        note_needs_encounter=True,
        search_needs=frozenset({"patient", "subject", "_id"}),
        observation_needs_category=True,
        revinclude=frozenset(),
        v1_scopes=True,
        export_levels=frozenset({"group"}),
    ),
    # Oracle Health: a batch of creates is 422; no conditional create; Goal and CarePlan read-only;
    # Condition as problem-list-item or encounter-diagnosis; Provenance and DocumentReference create;
    # Bulk Data export of a Group or of all patients (Patient/$export)
    "oracle-like": Personality(
        "oracle-like",
        bundles=False,
        bundle_refusal=422,
        conditional_create=False,
        creatable=frozenset({"Condition", "DocumentReference", "Provenance"}),
        condition_categories=frozenset({"problem-list-item", "encounter-diagnosis"}),
        search_needs=frozenset({"patient", "subject", "_id"}),
        revinclude=frozenset({"Provenance:target"}),
        export_levels=frozenset({"group", "patient"}),
    ),
}


def personality(name: str) -> Personality:
    try:
        return PERSONALITIES[name]
    except KeyError:
        raise ValueError(f"unknown personality {name!r}; choose one of {', '.join(PERSONALITIES)}") from None


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def _codes(concepts: Any) -> set[str]:
    return {
        str(c.get("code"))
        for concept in concepts or []
        if isinstance(concept, Mapping)
        for c in concept.get("coding") or []
        if isinstance(c, Mapping)
    }


def refusal(
    p: Personality, method: str, path: str, query: str, headers: Mapping[str, str], resource: Any
) -> tuple[int, dict[str, Any]] | None:
    """The status and OperationOutcome this kind of server answers the request with, or None: it is served."""
    parts = [s for s in path.strip("/").split("/") if s]
    params = parse_qsl(query, keep_blank_values=True)
    if method == "POST" and not parts:
        if not p.bundles:
            return p.bundle_refusal, _outcome("not-supported", "transaction and batch Bundles are not supported")
        return None
    if method == "POST" and len(parts) == 1 and not parts[0].startswith("$"):
        rtype = parts[0]
        if headers.get("if-none-exist") and not p.conditional_create:
            return 400, _outcome("not-supported", "conditional create (If-None-Exist) is not supported")
        if not p.can_create(rtype):
            return 405, _outcome("not-supported", f"{rtype} create is not supported")
        if not isinstance(resource, Mapping):
            return None
        if rtype == "Condition":
            categories = _codes(resource.get("category"))
            if p.condition_categories is not None and not categories & p.condition_categories:
                return 422, _outcome(
                    "business-rule",
                    "a Condition is created as " + " or ".join(sorted(p.condition_categories)) + " only",
                )
            if p.condition_provisional_only and _codes([resource.get("verificationStatus")]) != {"provisional"}:
                return 422, _outcome("business-rule", "a Condition is created with verificationStatus provisional only")
        if (
            rtype == "DocumentReference"
            and p.note_needs_encounter
            and not (resource.get("context") or {}).get("encounter")
        ):
            return 422, _outcome("required", "a clinical note needs an existing encounter (context.encounter)")
        return None
    if method == "GET" and len(parts) == 1 and not parts[0].startswith(("$", "metadata")):
        names = {k for k, _ in params}
        # a Provenance is found by what it is about (its target), every other type by its patient
        needs = p.search_needs | {"target"} if parts[0] == "Provenance" and p.search_needs else p.search_needs
        if needs and parts[0] != "Patient" and not names & needs:
            return 400, _outcome("required", "a search needs " + " or ".join(sorted(needs)))
        if parts[0] == "Observation" and p.observation_needs_category and "category" not in names:
            return 400, _outcome("required", "an Observation search needs a category")
        wanted = {v for k, v in params if k == "_revinclude"}
        if p.revinclude is not None and not wanted <= p.revinclude:
            return 400, _outcome("not-supported", "_revinclude is not supported for " + ", ".join(sorted(wanted)))
    return None


def rewrite_capabilities(p: Personality, statement: Mapping[str, Any]) -> dict[str, Any]:
    """The upstream CapabilityStatement declaring exactly what ``p`` allows."""
    out = copy.deepcopy(dict(statement))
    if p.name == "hapi":
        return out
    for rest in out.get("rest") or []:
        if not isinstance(rest, dict):
            continue
        if "system" not in p.export_levels:
            rest["operation"] = [o for o in rest.get("operation") or [] if o.get("name") != "export"]
        if not p.bundles:
            rest["interaction"] = [
                i for i in rest.get("interaction") or [] if i.get("code") not in ("transaction", "batch")
            ]
        for resource in rest.get("resource") or []:
            rtype = resource.get("type")
            if not p.can_create(str(rtype)):
                resource["interaction"] = [i for i in resource.get("interaction") or [] if i.get("code") != "create"]
            if not p.conditional_create:
                resource["conditionalCreate"] = False
            level = {"Patient": "patient", "Group": "group"}.get(str(rtype))
            if level and level not in p.export_levels:
                resource["operation"] = [o for o in resource.get("operation") or [] if o.get("name") != "export"]
            if rtype == "Condition" and p.condition_categories is not None:
                resource["supportedProfile"] = [
                    prof
                    for cat, prof in (("problem-list-item", _PROBLEMS), ("encounter-diagnosis", _DIAGNOSIS))
                    if cat in p.condition_categories
                ]
    return out
