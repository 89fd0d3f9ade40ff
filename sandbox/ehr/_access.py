"""What a bearer token may do on the FHIR proxy.  Pure: request in, plan or refusal out.

The rules (SMART App Launch 2.x, "Scopes for requesting FHIR resources"):

- a request needs a scope that grants its interaction on its type:
  read/vread/instance history ``r``, search ``s``, create ``c``,
  update/patch ``u``, delete ``d``; v1 ``read`` = rs, ``write`` = cud;
- ``user/`` and ``system/`` scopes reach every resource of the type;
  ``patient/`` scopes reach only the patient in context: the Patient itself
  and the resources of its compartment (FHIR R4 CompartmentDefinition
  "patient").  Types outside the compartment that carry no patient's data
  (Practitioner, Medication, PlanDefinition…) are readable under
  ``patient/`` scopes; every other type is refused (fail closed);
- a search under a ``patient/`` scope must name the patient
  (``patient=<id>``, ``subject=Patient/<id>``…); every resource in the
  answer is checked again before it is passed on;
- a ``transaction`` or ``batch`` Bundle is checked entry by entry and
  refused whole, naming the first entry that fails.

Nothing here does I/O: the proxy fetches what ``Plan.owned`` lists and hands
the answers back to :func:`check_owned` and :func:`check_answer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from ._scopes import ResourceScope

TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# The elements that tie a resource to its patient, by type: the elements behind the R4
# CompartmentDefinition "patient" params whose paths are plain references.  Only elements the
# type really has are listed (issue 11, item 2: a Condition has no ``patient``, and counting one
# let a made-up element vouch for a resource whose real subject was another patient).
_S, _P = ("subject",), ("patient",)
COMPARTMENT_LINKS: dict[str, tuple[str, ...]] = {
    **{
        t: _S
        for t in (
            "Account",
            "AdverseEvent",
            "Basic",
            "CarePlan",
            "CareTeam",
            "ChargeItem",
            "ClinicalImpression",
            "Communication",
            "CommunicationRequest",
            "Composition",
            "Condition",
            "DeviceRequest",
            "DeviceUseStatement",
            "DiagnosticReport",
            "DocumentManifest",
            "DocumentReference",
            "Encounter",
            "Flag",
            "Goal",
            "ImagingStudy",
            "Invoice",
            "List",
            "Media",
            "MedicationAdministration",
            "MedicationDispense",
            "MedicationRequest",
            "MedicationStatement",
            "Observation",
            "Procedure",
            "QuestionnaireResponse",
            "RiskAssessment",
            "ServiceRequest",
            "Specimen",
        )
    },
    **{
        t: _P
        for t in (
            "AllergyIntolerance",
            "BodyStructure",
            "Claim",
            "ClaimResponse",
            "Consent",
            "CoverageEligibilityRequest",
            "DetectedIssue",
            "EpisodeOfCare",
            "ExplanationOfBenefit",
            "FamilyMemberHistory",
            "Immunization",
            "ImmunizationEvaluation",
            "ImmunizationRecommendation",
            "MolecularSequence",
            "NutritionOrder",
            "RelatedPerson",
            "SupplyDelivery",
            "VisionPrescription",
        )
    },
    "Coverage": ("beneficiary", "subscriber", "policyHolder"),
    "Provenance": ("target",),
    "Appointment": ("participant.actor",),
}
# The search parameters that name a resource's patient, by type.
_FILTER_PARAMS: dict[str, tuple[str, ...]] = {"Coverage": ("beneficiary", "patient"), "Provenance": ("patient",)}
_DEFAULT_FILTERS = ("patient", "subject")
# Types readable under patient/ scopes without a patient filter: no patient's data in them.
NON_PATIENT_TYPES = frozenset(
    {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Location",
        "HealthcareService",
        "Endpoint",
        "Medication",
        "Substance",
        "Device",
        "PlanDefinition",
        "ActivityDefinition",
        "Questionnaire",
        "ValueSet",
        "CodeSystem",
        "ConceptMap",
        "StructureDefinition",
        "Library",
        "Measure",
        "SearchParameter",
    }
)

READ = frozenset("rs")
PERMISSION_NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


class Denied(Exception):
    """A request the token may not make; ``status`` 403, or 400 for a malformed one."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Access:
    """A token's reach: its resource scopes and, for patient/ scopes, the patient in context."""

    scopes: tuple[ResourceScope, ...]
    patient: str | None = None

    def mode(self, permission: str, rtype: str) -> str | None:
        """ "all" when a user/system scope grants it, "patient" when only a patient/ scope does, else None."""
        found = None
        for scope in self.scopes:
            if scope.allows(permission, rtype):
                if scope.context in ("user", "system"):
                    return "all"
                if self.patient:  # a patient/ scope without a patient in context grants nothing
                    found = "patient"
        return found

    def readable(self, rtype: str) -> str | None:
        modes = {self.mode("r", rtype), self.mode("s", rtype)}
        return "all" if "all" in modes else "patient" if "patient" in modes else None


@dataclass
class Interaction:
    """One FHIR interaction: from the URL, or from a Bundle entry."""

    method: str
    kind: str  # read | vread | history | search | create | update | patch | delete | page
    rtype: str | None
    rid: str | None = None
    params: list[tuple[str, str]] = field(default_factory=list)
    resource: Mapping[str, Any] | None = None
    compartment_patient: str | None = None  # GET Patient/<id>/<Type>
    if_none_exist: list[tuple[str, str]] | None = None  # a conditional create's search (header or ifNoneExist)

    @property
    def permission(self) -> str:
        return {
            "read": "r",
            "vread": "r",
            "history": "r",
            "search": "s",
            "page": "s",
            "create": "c",
            "update": "u",
            "patch": "u",
            "delete": "d",
        }[self.kind]

    def describe(self) -> str:
        target = self.rtype or "the base"
        if self.rid:
            target += "/" + self.rid
        return f"{self.method} {target}"


@dataclass
class Plan:
    """An allowed request: what the proxy still has to check around the upstream call."""

    owned: list[tuple[str, str]] = field(default_factory=list)  # existing resources that must be the patient's
    check_answer: bool = False  # check every resource in the answer
    read_entries: list[int] | None = None  # batch/transaction: which entries read
    check_written: bool = False  # a write's answer must be the patient's
    write_entries: list[int] = field(default_factory=list)  # batch/transaction: writes so checked


# ------------------------------------------------------------------ URL → interaction


def parse_interaction(
    method: str,
    path: str,
    query: str = "",
    form: str = "",
    resource: Mapping[str, Any] | None = None,
    *,
    bases: Sequence[str] = (),
) -> Interaction:
    """The interaction a request makes; Denied(400) when the URL is not one the proxy knows."""
    method = method.upper()
    for base in bases:
        if base and path.startswith(base.rstrip("/") + "/"):
            path = path[len(base.rstrip("/")) + 1 :]
            break
    if "?" in path:
        path, _, extra = path.partition("?")
        query = f"{extra}&{query}" if query else extra
    parts = [p for p in path.strip("/").split("/") if p]
    params = parse_qsl(query, keep_blank_values=True)
    if any(p.startswith("$") for p in parts):
        raise Denied("FHIR operations are not available through the sandbox proxy")
    if not parts:
        if method == "GET" and any(k == "_getpages" for k, _ in params):
            return Interaction(method, "page", None, params=params)
        if method == "GET":
            return Interaction(method, "search", None, params=params)
        raise Denied(f"{method} on the base is not supported", 405)
    rtype = parts[0]
    if not TYPE_RE.match(rtype):
        raise Denied(f"not a FHIR resource type: {rtype[:64]!r}", 400)
    if len(parts) == 1:
        if method == "GET":
            return Interaction(method, "search", rtype, params=params)
        if method == "POST":
            return Interaction(method, "create", rtype, params=params, resource=resource)
        if method in ("PUT", "PATCH", "DELETE") and params:  # conditional update / delete
            kind = {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
            return Interaction(method, kind, rtype, params=params, resource=resource)
        raise Denied(f"{method} {rtype} is not supported", 405)
    if parts[1] == "_search" and len(parts) == 2 and method == "POST":
        return Interaction(method, "search", rtype, params=params + parse_qsl(form, keep_blank_values=True))
    if parts[1] == "_history" and len(parts) == 2 and method == "GET":
        return Interaction(method, "history", rtype, params=params)
    rid = parts[1]
    if not ID_RE.match(rid):
        raise Denied(f"not a FHIR id: {rid[:64]!r}", 400)
    if len(parts) == 2:
        found = {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if found is None:
            raise Denied(f"{method} {rtype}/{rid} is not supported", 405)
        kind = found
        return Interaction(method, kind, rtype, rid, params=params, resource=resource)
    if method == "GET" and parts[2] == "_history" and len(parts) in (3, 4):
        return Interaction(method, "vread" if len(parts) == 4 else "history", rtype, rid, params=params)
    if method == "GET" and rtype == "Patient" and len(parts) == 3 and TYPE_RE.match(parts[2]):
        return Interaction(method, "search", parts[2], params=params, compartment_patient=rid)
    raise Denied(f"{method} {'/'.join(parts)[:100]} is not supported", 400)


# ------------------------------------------------------------------ who owns a resource


def _references(resource: Mapping[str, Any], path: str) -> list[str]:
    values: list[Any] = [resource]
    for name in path.split("."):
        nxt: list[Any] = []
        for value in values:
            item = value.get(name) if isinstance(value, Mapping) else None
            if isinstance(item, list):
                nxt.extend(item)
            elif item is not None:
                nxt.append(item)
        values = nxt
    return [v["reference"] for v in values if isinstance(v, Mapping) and isinstance(v.get("reference"), str)]


def _patient_of(reference: str, bases: Sequence[str]) -> str | None:
    """The patient id a reference names (relative or absolute on one of ``bases``), else None."""
    ref = reference
    for base in bases:
        if base and ref.startswith(base.rstrip("/") + "/"):
            ref = ref[len(base.rstrip("/")) + 1 :]
            break
    parts = ref.split("/")
    if len(parts) >= 2 and parts[0] == "Patient":
        return parts[1]
    return None


def belongs(
    resource: Mapping[str, Any],
    patient: str,
    *,
    local: Mapping[str, Mapping[str, Any]] | None = None,
    bases: Sequence[str] = (),
    _seen: frozenset[int] = frozenset(),
) -> bool:
    """Whether a resource is ``patient``'s: the Patient itself, or a compartment resource whose links
    name this patient and no other.  A link to another entry of the same Bundle (``local``, by
    fullUrl) counts as that entry's patient — a Provenance whose targets are the Condition and
    CarePlan being written with it belongs to their patient."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return resource.get("id") == patient
    links = COMPARTMENT_LINKS.get(rtype if isinstance(rtype, str) else "")
    if not links:
        return False
    if id(resource) in _seen:
        return False
    seen = _seen | {id(resource)}
    mine = False
    for path in links:
        for ref in _references(resource, path):
            other = _patient_of(ref, bases)
            if other is not None:
                if other != patient:
                    return False
                mine = True
            elif local and ref in local:
                if belongs(local[ref], patient, local=local, bases=bases, _seen=seen):
                    mine = True
                elif local[ref].get("resourceType") == "Patient" or _names_patient(local[ref], bases):
                    return False
    return mine


def _all_references(value: Any, depth: int = 0) -> Iterator[str]:
    """Every ``reference`` string anywhere in a resource (any element can hold a Reference)."""
    if depth > 64:
        raise Denied("the resource is nested too deeply", 400)
    if isinstance(value, Mapping):
        ref = value.get("reference")
        if isinstance(ref, str):
            yield ref
        for item in value.values():
            if isinstance(item, (Mapping, list)):
                yield from _all_references(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _all_references(item, depth + 1)


def check_references(
    resource: Mapping[str, Any],
    patient: str,
    bases: Sequence[str],
    local: Mapping[str, Mapping[str, Any]] | None = None,
    bare_local: frozenset[str] = frozenset(),
) -> None:
    """A patient-level write may point nowhere outside its patient (issue 11, item 2).

    Refused: a conditional reference (``Patient?_id=B`` — the server resolves it
    after the proxy has looked), any reference naming another Patient, wherever
    it sits, and a reference to an entry of the Bundle that carries no resource
    (a GET entry's ``fullUrl``)."""
    for ref in _all_references(resource):
        if "?" in ref:
            raise Denied("conditional references are not available to patient-level tokens")
        other = _patient_of(ref, bases)
        if other is not None and other != patient:
            raise Denied("the resource refers to another patient")
        if ref in bare_local and not (local and ref in local):
            raise Denied("the resource refers to a Bundle entry that carries no resource")


def _names_patient(resource: Mapping[str, Any], bases: Sequence[str]) -> bool:
    links = COMPARTMENT_LINKS.get(str(resource.get("resourceType")), ())
    return any(_patient_of(ref, bases) for path in links for ref in _references(resource, path))


# ------------------------------------------------------------------ decisions


def _need(access: Access, it: Interaction, rtype: str) -> str:
    mode = access.mode(it.permission, rtype)
    if mode is None:
        raise Denied(f"the token's scopes do not allow {PERMISSION_NAMES[it.permission]} on {rtype}")
    return mode


def _search_names_patient(rtype: str, params: Iterable[tuple[str, str]], patient: str, bases: Sequence[str]) -> bool:
    """Whether a search is limited to ``patient``: some patient filter, and every patient filter naming only them."""
    allowed = ("_id",) if rtype == "Patient" else _FILTER_PARAMS.get(rtype, _DEFAULT_FILTERS)
    named = False
    for key, value in params:
        name, _, modifier = key.partition(":")
        if name not in allowed or (modifier and modifier != "Patient"):
            continue
        for item in value.split(","):
            item = item.strip()
            pid = item if rtype == "Patient" or "/" not in item else _patient_of(item, bases)
            if pid != patient:
                return False
            named = True
    return named


def _conditional_names_patient(
    rtype: str,
    params: list[tuple[str, str]],
    patient: str,
    bases: Sequence[str],
    local: Mapping[str, Mapping[str, Any]] | None,
) -> bool:
    """A conditional create's search is the patient's: it names the patient like any search, or (a
    Provenance in a Bundle) it names ``target``s that are entries of the Bundle belonging to the patient
    — the server resolves those placeholders to the resources it is writing."""
    if _search_names_patient(rtype, params, patient, bases):
        return True
    if rtype != "Provenance" or not local:
        return False
    targets = [v for k, v in params if k.partition(":")[0] == "target"]
    if any(k.partition(":")[0] == "patient" for k, _ in params) or not targets:
        return False
    return all(t in local and belongs(local[t], patient, local=local, bases=bases) for t in targets)


def _provenance_targets(params: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ``target=Type/id`` values of a Provenance search, when every parameter is a plain target or _tag."""
    found: list[tuple[str, str]] = []
    for key, value in params:
        if (
            key == "target"
            and re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", value)
            and value.split("/")[0] in COMPARTMENT_LINKS
        ):
            found.append((value.split("/")[0], value.split("/")[1]))
        elif key not in ("_tag", "_count"):
            return []
    return found


def _no_has(params: Iterable[tuple[str, str]]) -> None:
    """``_has`` (reverse chaining) answers yes/no about the resources it reaches, other patients' included."""
    if any(key.startswith("_has") for key, _ in params):
        raise Denied("_has searches are not available to patient-level tokens")


def _check_patient_scope(
    access: Access,
    it: Interaction,
    rtype: str,
    plan: Plan,
    local: Mapping[str, Mapping[str, Any]] | None,
    bases: Sequence[str],
    bare_local: frozenset[str] = frozenset(),
) -> None:
    patient = access.patient or ""
    _no_has(it.params)
    _no_has(it.if_none_exist or ())
    if rtype in NON_PATIENT_TYPES:
        if it.kind not in ("read", "vread", "history", "search"):
            raise Denied(f"a patient-level token cannot {it.kind} {rtype}")
        return
    if rtype != "Patient" and rtype not in COMPARTMENT_LINKS:
        raise Denied(f"{rtype} is outside the patient compartment; a patient-level token cannot reach it")
    if it.kind in ("read", "vread", "history"):
        if rtype == "Patient" and it.rid != patient:
            raise Denied("a patient-level token can read only the patient in context")
        plan.check_answer = True
        return
    if it.kind == "search":
        if it.compartment_patient is not None:
            if it.compartment_patient != patient:
                raise Denied("a patient-level token can search only the compartment of the patient in context")
        elif rtype == "Provenance" and _provenance_targets(it.params):
            # the Provenances about resources of this patient (issue 12: how a writer without conditional
            # create finds its own); each target must be the patient's, fetched and checked first
            # (the answer holds only Provenances about those resources, so it is not checked again)
            plan.owned.extend(_provenance_targets(it.params))
            plan.check_answer = False  # only target/_tag/_count: no _include can bring in anything else
            return
        elif not _search_names_patient(rtype, it.params, patient, bases):
            raise Denied(
                f"a patient-level search on {rtype} must name the patient in context "
                f"(patient=<id> or subject=Patient/<id>)"
            )
        plan.check_answer = True
        return
    if it.kind == "patch":
        raise Denied("PATCH is not available to patient-level tokens (the patch could move the resource)")
    if it.kind in ("update", "delete") and it.rid is None:
        if not _search_names_patient(rtype, it.params, patient, bases):
            raise Denied(f"a conditional {it.kind} under a patient-level token must name the patient in context")
    if it.if_none_exist is not None and not _conditional_names_patient(rtype, it.if_none_exist, patient, bases, local):
        # issue 11, item 1: the match of a conditional create is returned (or its count leaks as
        # 412), so its search is held to the rules of any other patient-level search
        raise Denied(
            "a conditional create under a patient-level token must name the patient in context "
            "in its If-None-Exist search"
        )
    if it.kind in ("create", "update"):
        if not isinstance(it.resource, Mapping):
            raise Denied(f"{it.kind} needs a resource", 400)
        check_references(it.resource, patient, bases, local, bare_local)
        if not belongs(it.resource, patient, local=local, bases=bases):
            # a Provenance created on its own (no Bundle, issue 12) is the patient's when every
            # resource it is about is: those are fetched and checked before it is forwarded
            targets = (
                _provenance_targets(
                    [("target", str((t or {}).get("reference", ""))) for t in it.resource.get("target") or []]
                )
                if rtype == "Provenance" and it.kind == "create"
                else []
            )
            if not targets:
                raise Denied(f"the {rtype} does not belong to the patient in context")
            plan.owned.extend(targets)
            return
    # What a write answers with (Prefer: return=representation, a conditional create's match) is
    # checked like a read's answer.
    plan.check_written = True
    if it.kind in ("update", "delete") and it.rid is not None:
        if rtype == "Patient" and it.rid != patient:
            raise Denied("a patient-level token can change only the patient in context")
        plan.owned.append((rtype, it.rid))


def _check_one(
    access: Access,
    it: Interaction,
    plan: Plan,
    local: Mapping[str, Mapping[str, Any]] | None,
    bases: Sequence[str],
    bare_local: frozenset[str] = frozenset(),
) -> None:
    if it.kind == "page":
        # A page of an earlier search: HAPI knows which; every resource it returns is checked.
        if not any(s.permissions & READ and (s.context != "patient" or access.patient) for s in access.scopes):
            raise Denied("the token's scopes allow no reads")
        plan.check_answer = True
        return
    if it.rtype is None:
        # A search across all types: only a user/system scope on every type reaches it.
        if access.mode("s", "*") != "all":
            raise Denied("a search across all types needs a user/*.s or system/*.s scope")
        plan.check_answer = True
        return
    if it.resource is not None and it.kind in ("create", "update"):
        body_type = it.resource.get("resourceType")
        if body_type != it.rtype:
            raise Denied(f"the body is a {str(body_type)[:64]}, the URL says {it.rtype}", 400)
        if it.kind == "update" and it.rid is not None and it.resource.get("id") != it.rid:
            raise Denied("the body's id differs from the URL's", 400)
    mode = _need(access, it, it.rtype)
    if it.kind in ("read", "vread", "history", "search"):
        plan.check_answer = True  # the types in the answer are checked in every mode (_include)
    if mode == "patient":
        _check_patient_scope(access, it, it.rtype, plan, local, bases, bare_local)
    if it.kind == "history" and it.rid is None and mode == "patient":
        raise Denied("type-level history is not available to patient-level tokens")


def _conditional(it: Interaction, if_none_exist: str | None) -> Interaction:
    """Attach a conditional create's search (the ``If-None-Exist`` header or entry ``ifNoneExist``)."""
    if if_none_exist is None:
        return it
    if it.kind != "create":
        raise Denied("If-None-Exist belongs on a create only", 400)
    query = if_none_exist.split("?", 1)[1] if "?" in if_none_exist else if_none_exist
    it.if_none_exist = parse_qsl(query, keep_blank_values=True)
    return it


def plan_request(
    access: Access,
    method: str,
    path: str,
    query: str = "",
    *,
    body: Any = None,
    form: str = "",
    bases: Sequence[str] = (),
    if_none_exist: str | None = None,
) -> Plan:
    """Allow or refuse one request to the proxy; raises Denied with the reason."""
    plan = Plan()
    if method.upper() == "POST" and not path.strip("/"):
        return plan_bundle(access, body, bases=bases)
    it = parse_interaction(method, path, query, form, body if isinstance(body, Mapping) else None, bases=bases)
    it = _conditional(it, if_none_exist)
    if it.kind in ("create", "update") and not isinstance(body, Mapping):
        raise Denied(f"{it.kind} needs a FHIR JSON resource in the body", 400)
    _check_one(access, it, plan, None, bases)
    return plan


def plan_bundle(access: Access, bundle: Any, *, bases: Sequence[str] = ()) -> Plan:
    """Check every entry of a transaction or batch; the first entry that fails refuses them all."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise Denied("only a transaction or batch Bundle may be posted to the base", 400)
    if bundle.get("type") not in ("transaction", "batch"):
        raise Denied("only a transaction or batch Bundle may be posted to the base", 400)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise Denied("Bundle.entry must be a list", 400)
    local = {
        e["fullUrl"]: e["resource"]
        for e in entries
        if isinstance(e, Mapping) and isinstance(e.get("fullUrl"), str) and isinstance(e.get("resource"), Mapping)
    }
    bare_local = frozenset(
        e["fullUrl"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("fullUrl"), str)
    )
    read_entries: list[int] = []
    plan = Plan(read_entries=read_entries)
    for index, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, Mapping) else None
        if (
            not isinstance(request, Mapping)
            or not isinstance(request.get("method"), str)
            or not isinstance(request.get("url"), str)
        ):
            raise Denied(f"entry {index}: no request method and url", 400)
        resource = entry.get("resource")
        try:
            it = parse_interaction(
                request["method"],
                request["url"],
                "",
                "",
                resource if isinstance(resource, Mapping) else None,
                bases=bases,
            )
            if it.kind == "page":
                raise Denied("paging inside a Bundle is not supported", 400)
            if it.kind in ("create", "update") and not isinstance(resource, Mapping):
                raise Denied(f"{it.kind} needs a resource", 400)
            if_none_exist = request.get("ifNoneExist")
            if if_none_exist is not None and not isinstance(if_none_exist, str):
                raise Denied("ifNoneExist must be a string", 400)
            it = _conditional(it, if_none_exist)
            _check_full_url(entry.get("fullUrl"), it, bases)
            entry_plan = Plan()
            _check_one(access, it, entry_plan, local, bases, bare_local)
        except Denied as exc:
            label = f"{request['method'].upper()} {request['url'].split('?')[0][:100]}"
            raise Denied(f"entry {index} ({label}): {exc.message}", exc.status) from None
        plan.owned.extend(entry_plan.owned)
        if entry_plan.check_answer:
            read_entries.append(index)
        elif entry_plan.check_written:
            plan.write_entries.append(index)
    plan.check_answer = bool(plan.read_entries)
    plan.check_written = bool(plan.write_entries)
    return plan


def _check_full_url(full_url: Any, it: Interaction, bases: Sequence[str]) -> None:
    """An entry's ``fullUrl``: none, a ``urn:uuid:``/``urn:oid:`` placeholder, or the resource's own
    ``Type/id`` (relative or on the proxy).  Anything else — ``Patient?_id=B`` above all — would let
    the server bind references to a resource the proxy never checked (issue 11, item 2)."""
    if full_url is None:
        return
    if not isinstance(full_url, str):
        raise Denied("fullUrl must be a string", 400)
    if "?" in full_url:
        raise Denied("a conditional fullUrl is not supported", 400)
    if re.fullmatch(r"urn:uuid:[0-9a-fA-F-]{36}|urn:oid:[0-2](\.[0-9]+)+", full_url):
        return
    resource = it.resource or {}
    own = f"{resource.get('resourceType')}/{resource.get('id')}"
    ref = full_url
    for base in bases:
        if base and ref.startswith(base.rstrip("/") + "/"):
            ref = ref[len(base.rstrip("/")) + 1 :]
            break
    if it.resource is None or ref != own:
        raise Denied("fullUrl must be a urn:uuid:, a urn:oid: or the resource's own Type/id", 400)


def check_owned(access: Access, rtype: str, resource: Mapping[str, Any] | None, *, bases: Sequence[str] = ()) -> None:
    """Before an update or delete: the existing resource (None when there is none) is the patient's."""
    if resource is None:
        return
    if not belongs(resource, access.patient or "", bases=bases):
        raise Denied(f"the existing {rtype} does not belong to the patient in context")


def _resources(body: Any) -> Iterable[Mapping[str, Any]]:
    if not isinstance(body, Mapping):
        return
    if body.get("resourceType") == "Bundle":
        for entry in body.get("entry") or []:
            if isinstance(entry, Mapping) and isinstance(entry.get("resource"), Mapping):
                yield from _resources(entry["resource"])
    else:
        yield body


def check_answer(access: Access, body: Any, *, plan: Plan | None = None, bases: Sequence[str] = ()) -> None:
    """Every resource a read returns must be of a readable type, and the patient's under patient/ scopes."""
    if plan is not None and plan.read_entries is not None:
        # batch/transaction-response: the entries that were reads carry data to check, and so do
        # writes under patient/ scopes (a conditional create's match, a returned representation).
        entries = body.get("entry") if isinstance(body, Mapping) else None
        for index in plan.read_entries:
            if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], Mapping):
                _check_resources(access, entries[index].get("resource"), bases, f"entry {index}: ")
        for index in plan.write_entries:
            if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], Mapping):
                _check_written(access, entries[index].get("resource"), bases, f"entry {index}: ")
        return
    if plan is not None and plan.check_written and not plan.check_answer:
        _check_written(access, body, bases, "")
        return
    _check_resources(access, body, bases, "")


def _check_written(access: Access, body: Any, bases: Sequence[str], label: str) -> None:
    """A write's answer under patient/ scopes: nothing that names another patient (the write scope may
    lack read, so readability is not asked; a Provenance whose targets are server ids cannot be traced
    here, which is why its conditional create must target the Bundle's own entries)."""
    patient = access.patient or ""
    for resource in _resources(body):
        rtype = resource.get("resourceType")
        if rtype == "OperationOutcome" or rtype in NON_PATIENT_TYPES:
            continue
        if rtype == "Patient" and resource.get("id") != patient:
            raise Denied(f"{label}the answer holds another patient")
        for path in COMPARTMENT_LINKS.get(str(rtype), ()):
            for ref in _references(resource, path):
                other = _patient_of(ref, bases)
                if "?" in ref or (other is not None and other != patient):
                    raise Denied(f"{label}the answer holds a {str(rtype)[:64]} of another patient")


def _check_resources(access: Access, body: Any, bases: Sequence[str], label: str) -> None:
    for resource in _resources(body):
        rtype = resource.get("resourceType")
        if rtype == "OperationOutcome":
            continue
        if not isinstance(rtype, str):
            raise Denied(f"{label}the answer holds a resource without a type")
        mode = access.readable(rtype)
        if mode is None:
            raise Denied(f"{label}the answer holds {rtype} resources the token's scopes do not allow reading")
        if (
            mode == "patient"
            and rtype not in NON_PATIENT_TYPES
            and not belongs(resource, access.patient or "", bases=bases)
        ):
            raise Denied(f"{label}the answer holds a {rtype} of another patient")
