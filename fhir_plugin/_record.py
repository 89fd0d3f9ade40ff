"""A patient's record as the check sees it: plain R4 JSON, validated once at the edge.

The check reads plain dicts (fast, and what FHIRPath engines want); every
resource is first validated against the R4 models of ``fhir.resources.R4B``
(R4B equals R4 for every resource read here; the package's default R5 models
would reject R4 Encounters).  Validation happens here, at the boundary, so a
malformed record becomes an ``InputError`` naming the resource, never a crash
deeper in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ._errors import InputError
from ._vocab import CLINICAL_TYPES, READ_TYPES

__all__ = [
    "PatientRecord",
    "CLINICAL_TYPES",
    "validate_resource",
    "records_from_bundle",
    "load_bundle_file",
    "subject_patient_id",
    "patient_id_of",
]


@dataclass(frozen=True)
class PatientRecord:
    """One patient's resources, as plain R4 JSON dicts, each validated."""

    patient_id: str
    resources: tuple[dict[str, Any], ...] = field(default=())

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r.get("resourceType") == resource_type]

    @property
    def patient(self) -> dict[str, Any] | None:
        found = self.of_type("Patient")
        return found[0] if found else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.resources:
            out[r["resourceType"]] = out.get(r["resourceType"], 0) + 1
        return out


def _label(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '(no id)')}"


def validate_resource(resource: Any) -> dict[str, Any]:
    """Check one resource against the R4 model; return it unchanged (as a dict) or raise InputError."""
    if not isinstance(resource, dict):
        raise InputError(f"expected a FHIR resource (a JSON object), got {type(resource).__name__}")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InputError("a resource has no resourceType")
    try:
        model = get_fhir_model_class(rtype)
    except KeyError as exc:
        raise InputError(f"{rtype!r} is not an R4 resource type") from exc
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "root") or "(resource)"
        raise InputError(f"{_label(resource)} is not valid FHIR R4 at {where}: {first.get('msg')}") from exc
    return resource


def patient_id_of(reference: Any) -> str | None:
    """The id a ``Patient/id`` reference (relative or absolute) names, or None for anything else."""
    if not isinstance(reference, str):
        return None
    parts = reference.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1] else None


def subject_patient_id(resource: Mapping[str, Any]) -> str | None:
    """The Patient id a clinical resource belongs to (``subject`` or ``patient``), or None."""
    if resource.get("resourceType") == "Patient":
        found = resource.get("id")
        return found if isinstance(found, str) else None
    return patient_id_of((resource.get("subject") or resource.get("patient") or {}).get("reference"))


def _local_ref(ref: str) -> str | None:
    """``Type/id`` of an absolute URL ending in ``Type/id`` (``_history`` dropped), else None."""
    if "://" not in ref:
        return None
    path = ref.split("/_history/")[0].rstrip("/").split("?")[0]
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha() and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def _resolved(value: Any, full_urls: Mapping[str, str]) -> Any:
    """``value`` with every reference written ``Type/id`` (SPEC §3.1); unchanged objects are reused."""
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                new = full_urls.get(item) or _local_ref(item) or item
            else:
                new = _resolved(item, full_urls)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if isinstance(value, list):
        items = [_resolved(v, full_urls) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def _bundle_resources(bundle: Mapping[str, Any]) -> list[Any]:
    """A Bundle's resources with ``urn:uuid:`` and absolute references resolved through its fullUrls."""
    entries = [e for e in bundle.get("entry", []) or [] if isinstance(e, dict) and e.get("resource") is not None]
    full_urls: dict[str, str] = {}
    resources: list[Any] = []
    for entry in entries:
        res = entry["resource"]
        url = entry.get("fullUrl")
        if isinstance(res, dict) and isinstance(url, str):
            if not res.get("id") and url.startswith("urn:uuid:"):
                res = {**res, "id": url[len("urn:uuid:") :]}  # Synthea-style: the uuid is the id
            if isinstance(res.get("resourceType"), str) and isinstance(res.get("id"), str):
                full_urls[url] = f"{res['resourceType']}/{res['id']}"
        resources.append(res)
    return [_resolved(r, full_urls) for r in resources]


def records_from_bundle(bundle: Any) -> list[PatientRecord]:
    """Group a Bundle's (or a bare resource list's) resources by patient, validating each.

    Any valid R4 input (SPEC §3.1): a Bundle of any type, a JSON array of resources
    or one resource; references ``Type/id``, absolute, or ``urn:uuid:`` through the
    Bundle's fullUrls are all read as ``Type/id``.  Resource types the check does not
    read are ignored; a clinical resource without a subject is an error, since the
    record it belongs to cannot be known.
    """
    if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle":
        resources: Iterable[Any] = _bundle_resources(bundle)
    elif isinstance(bundle, dict) and isinstance(bundle.get("resourceType"), str):
        resources = [_resolved(bundle, {})]
    elif isinstance(bundle, list):
        resources = [_resolved(r, {}) for r in bundle]
    else:
        raise InputError("expected a FHIR Bundle (a JSON object with resourceType 'Bundle')")
    by_patient: dict[str, list[dict[str, Any]]] = {}
    wrong_types: set[str] = set()
    for res in resources:
        if not isinstance(res, dict):
            raise InputError("a Bundle entry's resource is not a JSON object")
        rtype = res.get("resourceType")
        if rtype not in READ_TYPES:
            wrong_types.add(str(rtype))
            continue
        validate_resource(res)
        pid = subject_patient_id(res)
        if pid is None:
            raise InputError(f"{_label(res)} has no subject Patient reference, so it belongs to no record")
        by_patient.setdefault(pid, []).append(res)
    if not by_patient:
        found = ", ".join(sorted(wrong_types)) or "nothing"
        raise InputError(f"the Bundle holds no Patient, Condition, Observation or Encounter (found {found})")
    return [PatientRecord(pid, tuple(items)) for pid, items in by_patient.items()]


def _ndjson(text: str) -> list[Any] | None:
    """NDJSON (one resource a line, SPEC §3.1) as a list, or None when the text is not NDJSON."""
    items = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(item, dict):
            return None
        items.append(item)
    return items or None


def load_bundle_file(path: str | Path) -> list[PatientRecord]:
    """Read a JSON Bundle, a JSON array of resources or an NDJSON file into patient records.

    Any problem is one InputError naming the file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from exc
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        data = _ndjson(text)
        if data is None:
            raise InputError(f"{p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    try:
        return records_from_bundle(data)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from exc
