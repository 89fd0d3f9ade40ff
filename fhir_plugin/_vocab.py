"""Identifiers and code systems the plugin itself mints, shared by the check and the drafts.

The check must recognise the plugin's own drafts (SPEC §3: a draft CarePlan
makes ``treatment-plan`` *proposed*, and a draft's gap note is never evidence),
so the tag that marks them lives here rather than in the drafting module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
URI_IDENTIFIER = "urn:ietf:rfc:3986"

#: meta.tag on every resource the plugin drafts: machine-drafted, awaiting clinician review
DRAFT_TAG = {
    "system": "urn:fhir-plugin:tag",
    "code": "machine-drafted",
    "display": "Drafted by fhir-plugin for clinician review",
}
#: extension on a CarePlan activity naming the protocol phase it belongs to
PHASE_EXTENSION = "urn:fhir-plugin:StructureDefinition:careplan-phase"
PLUGIN_NAME = "fhir-plugin"
#: the type of the note a server without CarePlan create gets the plan in (issue 12, writer d)
PLAN_NOTE_TYPE = {"system": LOINC, "code": "18776-5", "display": "Plan of care note"}
#: extension on a plan note naming the Provenance key that completes its set (SPEC §7.1: a rerun after a write
#: part-way, the note made and its Provenance not, must still offer the Provenance)
NOTE_PROVENANCE_EXTENSION = "urn:fhir-plugin:StructureDefinition:plan-note-provenance"

#: the resource types the check reads beside the Patient (SPEC §3: evidence, and CarePlan for the plan)
CLINICAL_TYPES = ("Condition", "Observation", "Encounter", "CarePlan")
#: everything a review reads: the Patient and its clinical resources
READ_TYPES = ("Patient",) + CLINICAL_TYPES
#: Observation categories (R4 observation-category) a per-category search walks through when a server
#: refuses an Observation search without ``category`` (Epic does for some)
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
OBSERVATION_CATEGORIES = (
    "vital-signs",
    "exam",
    "social-history",
    "survey",
    "laboratory",
    "procedure",
    "imaging",
    "therapy",
    "activity",
)
#: the resource types the drafts create (SPEC §7), in the order they are written
DRAFT_TYPES = ("Condition", "Goal", "CarePlan", "Provenance")


def is_plugin_draft(resource: Mapping[str, Any]) -> bool:
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(t.get("system") == DRAFT_TAG["system"] and t.get("code") == DRAFT_TAG["code"] for t in tags)
