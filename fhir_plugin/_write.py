"""Writing the drafts: writer strategies behind one small protocol, and what each created or found.

A writer takes the draft transaction Bundle (SPEC §7) and returns one
``WriteResult``, whatever way it sends it.  ``TransactionWriter`` sends one
transaction of conditional creates (all or nothing); ``PerResourceWriter``
sends one conditional create per resource in Bundle order, for servers
without transactions; ``LedgerWriter`` looks for each draft among the
patient's resources and creates only what is missing, remembering what it
created in a local ledger, for servers without conditional create.  All are
idempotent: sending twice creates nothing new.
Which one a server gets is decided in ``_strategies``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._capabilities import ServerCapabilities
from ._client import FhirClient, is_safe_to_repeat
from ._errors import Forbidden, InputError, NotFound, ServerError, UsageError
from ._fold import ENCOUNTER_DIAGNOSIS_PROFILE, PROBLEM_LIST_PROFILE, fold_drafts
from ._ledger import Ledger
from ._vocab import URI_IDENTIFIER

__all__ = [
    "WriteResult",
    "DraftWriter",
    "TransactionWriter",
    "PerResourceWriter",
    "LedgerWriter",
    "FoldingWriter",
    "needs_folding",
    "read_outcome",
    "check_matches",
    "draft_key",
]


@dataclass(frozen=True)
class WriteResult:
    """Per draft, the server's id; ``created`` were new, ``existing`` matched a conditional create.

    ``forms`` says in which form each draft went (``draft type -> form``; empty:
    every draft as drafted) and ``not_written`` which drafts no form could carry,
    with why (issue 12, writer d: nothing is dropped silently).
    """

    created: tuple[str, ...]
    existing: tuple[str, ...]
    forms: tuple[tuple[str, str], ...] = ()
    not_written: tuple[tuple[str, str], ...] = ()

    @property
    def wrote_anything(self) -> bool:
        return bool(self.created)

    @property
    def folded(self) -> tuple[tuple[str, str], ...]:
        """Each draft type written in another form than drafted, once (what a user must be told)."""
        return tuple(dict.fromkeys((d, f) for d, f in self.forms if f != d))

    def to_json(self) -> dict[str, Any]:
        return {
            "created": list(self.created),
            "existing": list(self.existing),
            "forms": [{"draft": d, "form": f} for d, f in self.forms],
            "not_written": [{"draft": d, "reason": r} for d, r in self.not_written],
        }

    def summary(self) -> str:
        if not self.created:
            text = "nothing new written; the drafts already exist: " + ", ".join(self.existing)
        else:
            text = "created " + ", ".join(self.created)
            text += f"; already there: {', '.join(self.existing)}" if self.existing else ""
        folded = [f"{d} as {f}" for d, f in self.folded]
        if folded:
            text += "; written as: " + "; ".join(folded)
        if self.not_written:
            text += "; not written: " + "; ".join(f"{d} ({r})" for d, r in self.not_written)
        return text


def _resource_ref(location: str) -> str:
    parts = [p for p in location.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def read_outcome(sent: Mapping[str, Any], response: Mapping[str, Any]) -> WriteResult:
    """Pair the transaction-response entries with what was sent (FHIR keeps their order)."""
    created: list[str] = []
    existing: list[str] = []
    answers = response.get("entry") or []
    if len(answers) != len(sent.get("entry") or []):
        raise ServerError(
            f"the server answered the transaction with {len(answers)} entries for {len(sent.get('entry') or [])} sent"
        )
    for answer in answers:
        result = answer.get("response") or {}
        status = str(result.get("status", ""))
        ref = _resource_ref(str(result.get("location", "")))
        (created if status.startswith("201") else existing).append(ref)
    return WriteResult(tuple(created), tuple(existing))


def _local_ref(reference: Any) -> str:
    """``Type/id`` of a reference, whatever base or ``_history`` suffix it carries."""
    return _resource_ref(reference) if isinstance(reference, str) else ""


def check_matches(
    sent: Mapping[str, Any], response: Mapping[str, Any], *, written: Mapping[str, str] | None = None
) -> None:
    """Every existing resource a conditional create matched must be this patient's (issue 11, item 3).

    Checked on the representation the server returned with the entry: its
    ``subject`` must be the subject sent, and a Provenance may target only what
    this transaction wrote or matched.  A match for another patient raises
    Forbidden — it is never reported as "already there".  An entry the server
    answered without a representation is accepted on its key, which names the
    patient (``_drafts._entry``).  ``written`` maps the placeholders of drafts
    sent earlier (one by one) to their ids.
    """
    entries = sent.get("entry") or []
    answers = response.get("entry") or []
    placed = {
        **(written or {}),
        **{
            e.get("fullUrl"): _local_ref((a.get("response") or {}).get("location"))
            for e, a in zip(entries, answers, strict=False)
            if isinstance(a, Mapping)
        },
    }
    for entry, answer in zip(entries, answers, strict=False):
        if not isinstance(answer, Mapping) or str((answer.get("response") or {}).get("status", "")).startswith("201"):
            continue
        found = answer.get("resource")
        if not isinstance(found, Mapping):
            continue
        mine = entry["resource"]
        rtype = mine["resourceType"]
        if "subject" in mine:
            theirs = _local_ref((found.get("subject") or {}).get("reference"))
            if theirs != _local_ref(mine["subject"]["reference"]):
                where = _local_ref((answer.get("response") or {}).get("location"))
                raise Forbidden(
                    f"the server matched the draft {rtype} to {where}, which belongs to another patient; "
                    "nothing was taken as already there"
                )
        elif rtype == "Provenance":
            allowed = {placed.get(t["reference"], t["reference"]) for t in mine.get("target") or []}
            targets = {_local_ref(t.get("reference")) for t in found.get("target") or [] if isinstance(t, Mapping)}
            if not targets or not targets <= allowed:
                raise Forbidden(
                    "the server matched the draft Provenance to one about other resources; "
                    "nothing was taken as already there"
                )


class DraftWriter(Protocol):
    """Sends a draft transaction Bundle to a server in some form; running it twice creates nothing new."""

    def write(self, drafts: Mapping[str, Any]) -> WriteResult: ...


class TransactionWriter:
    """The drafts as ONE transaction of conditional creates: all of it is written, or none (FHIR transaction rules).

    The server is asked for the representation of every entry, so an existing
    match can be checked to be this patient's before it is reported.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        if isinstance(self.client, FhirClient):
            response = self.client.request(
                "POST",
                "",
                body=dict(drafts),
                headers={"Prefer": "return=representation"},
                safe_to_retry=is_safe_to_repeat(drafts),
            )
            if response.get("resourceType") != "Bundle":
                raise InputError(
                    f"the server answered a transaction with a {response.get('resourceType')}, not a Bundle"
                )
        else:  # a stand-in with only ``transaction`` (tests)
            response = self.client.transaction(drafts)
        outcome = read_outcome(drafts, response)
        check_matches(drafts, response)
        return outcome


def _replace_references(value: Any, assigned: Mapping[str, str]) -> Any:
    """A copy of ``value`` with every ``reference`` to a known ``urn:uuid`` replaced by ``Type/id``."""
    if isinstance(value, dict):
        return {
            key: (
                assigned.get(item, item)
                if key == "reference" and isinstance(item, str)
                else _replace_references(item, assigned)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_replace_references(item, assigned) for item in value]
    return value


def _urn_references(value: Any) -> set[str]:
    """Every ``reference`` in ``value`` that is still a ``urn:uuid``."""
    if isinstance(value, dict):
        found = {value["reference"]} if str(value.get("reference", "")).startswith("urn:uuid:") else set()
        return found.union(*(_urn_references(item) for key, item in value.items() if key != "reference"))
    if isinstance(value, list):
        return set().union(*(_urn_references(item) for item in value))
    return set()


class PerResourceWriter:
    """One request per draft, in Bundle order, for servers that take no transaction.

    POST entries keep their ``ifNoneExist`` as an ``If-None-Exist`` header
    (conditional create, FHIR http.html#ccreate), so a rerun finds what the
    first run created; ``urn:uuid`` references (in the resource and in the
    ``ifNoneExist`` query) are rewritten to the ids just assigned, so an entry
    may refer only to entries before it.  A match is checked to be this
    patient's, as the transaction writer checks it.  Not atomic: a failure
    part-way leaves the first drafts written, and a rerun completes the rest.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        assigned: dict[str, str] = {}
        created: list[str] = []
        existing: list[str] = []
        for entry in drafts.get("entry") or []:
            request = entry.get("request") or {}
            method = str(request.get("method", "")).upper()
            resource = _replace_references(entry.get("resource") or {}, assigned)
            pending = _urn_references(resource)
            if pending:
                raise UsageError(
                    f"drafts are written in Bundle order, and an entry refers to "
                    f"{sorted(pending)[0]} before it is written"
                )
            headers = {"Prefer": "return=representation"}
            if method == "POST":
                if request.get("ifNoneExist"):
                    headers["If-None-Exist"] = _with_ids(str(request["ifNoneExist"]), assigned)
                status, answer = self.client.send_resource(
                    "POST",
                    str(resource.get("resourceType")),
                    resource,
                    headers=headers,
                    safe_to_retry=bool(request.get("ifNoneExist")),
                )
            elif method == "PUT":
                status, answer = self.client.send_resource(
                    "PUT", str(request.get("url")), resource, headers=headers, safe_to_retry=True
                )
            else:
                raise UsageError(f"drafts are written with POST and PUT entries only, not {method or 'none'}")
            if not answer.get("resourceType") or not answer.get("id"):
                raise InputError("the server did not return the written resource with its id")
            ref = f"{answer['resourceType']}/{answer['id']}"
            if status != 201:
                check_matches(
                    {"entry": [{**entry, "resource": resource}]},
                    {"entry": [{"response": {"status": str(status), "location": ref}, "resource": answer}]},
                    written=assigned,
                )
            (created if status == 201 else existing).append(ref)
            if entry.get("fullUrl"):
                assigned[entry["fullUrl"]] = ref
        return WriteResult(tuple(created), tuple(existing))


def _with_ids(query: str, assigned: Mapping[str, str]) -> str:
    """A conditional-create query with every ``urn:uuid`` placeholder already written replaced by its id."""
    for placeholder, ref in assigned.items():
        query = query.replace(placeholder, ref)
    return query


def draft_key(resource: Mapping[str, Any]) -> str:
    """The stable identifier a draft carries (SPEC §7): its ``identifier`` value, or a Provenance's tag code."""
    if resource.get("resourceType") == "Provenance":
        found = [
            t.get("code")
            for t in (resource.get("meta") or {}).get("tag") or []
            if isinstance(t, Mapping) and t.get("system") == URI_IDENTIFIER
        ]
    else:
        found = [
            i.get("value")
            for i in resource.get("identifier") or []
            if isinstance(i, Mapping) and i.get("system") == URI_IDENTIFIER
        ]
    if not found or not isinstance(found[0], str):
        raise UsageError(f"a draft {resource.get('resourceType')} carries no plugin identifier to be found by")
    return found[0]


def _is_the_draft(found: Mapping[str, Any], mine: Mapping[str, Any], key: str) -> bool:
    """``found`` is ``mine`` on the server: same type, same identifier (or tag), same patient (or Condition)."""
    if found.get("resourceType") != mine.get("resourceType"):
        return False
    try:
        if draft_key(found) != key:
            return False
    except UsageError:
        return False
    if mine.get("resourceType") == "Provenance":
        # bound to the Condition it is about, as the conditional-create key is (``_drafts``)
        wanted = _local_ref((mine.get("target") or [{}])[0].get("reference"))
        return wanted in {_local_ref(t.get("reference")) for t in found.get("target") or [] if isinstance(t, Mapping)}
    return _local_ref((found.get("subject") or {}).get("reference")) == _local_ref(mine["subject"]["reference"])


class LedgerWriter:
    """One plain create per missing draft, for servers without conditional create (issue 12, writer c).

    For each draft, in Bundle order: a resource the ledger says was created is
    read back by id; otherwise the patient's resources are searched for the
    draft's identifier (with ``identifier=`` where the server declares that
    search parameter, else all of the patient's resources of the type, matched
    here).  Only a draft found nowhere is created — and its intent is committed
    to the ledger before the create, its id after it, so a crash in between
    leaves an ``intent`` row whose rerun searches before creating: neither lost
    nor doubled.  ``after_create`` is a test hook called in that window.
    """

    def __init__(
        self,
        client: FhirClient,
        ledger: Ledger | Callable[[], Ledger],
        *,
        capabilities: ServerCapabilities | None = None,
        after_create: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self._ledger = ledger
        self.capabilities = capabilities
        self.after_create = after_create

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened on first use: a writer chosen only for its reader's sake opens no file."""
        if not isinstance(self._ledger, Ledger):
            self._ledger = self._ledger()
        return self._ledger

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        assigned: dict[str, str] = {}
        created: list[str] = []
        existing: list[str] = []
        base = self.client.base_url
        for entry in drafts.get("entry") or []:
            if str((entry.get("request") or {}).get("method", "")).upper() != "POST":
                raise UsageError("the ledger writer sends POST entries only")
            resource = _replace_references(entry.get("resource") or {}, assigned)
            pending = _urn_references(resource)
            if pending:
                raise UsageError(
                    f"drafts are written in Bundle order, and an entry refers to "
                    f"{sorted(pending)[0]} before it is written"
                )
            key = draft_key(resource)
            ref = self._known(base, key, resource) or self._search(resource, key)
            if ref is not None:
                self.ledger.record(base, key, ref)
                existing.append(ref)
            else:
                ref = self._create(base, key, resource)
                created.append(ref)
            if entry.get("fullUrl"):
                assigned[entry["fullUrl"]] = ref
        return WriteResult(tuple(created), tuple(existing))

    def _known(self, base: str, key: str, resource: Mapping[str, Any]) -> str | None:
        """The ledger's id for the draft, read back to be sure it is still there and still this patient's."""
        entry = self.ledger.get(base, key)
        if entry is None or entry.state != "created" or not entry.ref or "/" not in entry.ref:
            return None
        if resource.get("resourceType") == "Provenance":
            return None  # about other resources, not a patient: EHRs let it be found by its target only
        rtype, rid = entry.ref.split("/", 1)
        try:
            found = self.client.read(rtype, rid)
        except NotFound:
            self.ledger.forget(base, key)  # deleted on the server since: look for it anew
            return None
        if not _is_the_draft(found, resource, key):
            raise Forbidden(
                f"the draft ledger names {entry.ref} for a draft {rtype}, but the server holds another "
                "resource there; nothing was taken as already there"
            )
        return entry.ref

    def _search(self, resource: Mapping[str, Any], key: str) -> str | None:
        """The draft among the patient's resources (or the Condition's Provenances), if it is there."""
        rtype = str(resource["resourceType"])
        if rtype == "Provenance":
            params = {"target": _local_ref((resource.get("target") or [{}])[0].get("reference"))}
            if self._declares(rtype, "_tag"):
                params["_tag"] = f"{URI_IDENTIFIER}|{key}"
        else:
            # per patient, as every EHR requires (``patient=``); the identifier narrows it where declared
            params = {"patient": _local_ref(resource["subject"]["reference"]).split("/")[-1]}
            if self._declares(rtype, "identifier"):
                params["identifier"] = f"{URI_IDENTIFIER}|{key}"
        for found in self.client.search(rtype, params):
            if _is_the_draft(found, resource, key) and found.get("id"):
                return f"{rtype}/{found['id']}"
        return None

    def _declares(self, resource_type: str, param: str) -> bool:
        return self.capabilities is None or self.capabilities.searches_by(resource_type, param)

    def _create(self, base: str, key: str, resource: Mapping[str, Any]) -> str:
        self.ledger.intend(base, key)  # committed before the request: a crash after it is searched for on rerun
        _, answer = self.client.send_resource(
            "POST",
            str(resource["resourceType"]),
            resource,
            headers={"Prefer": "return=representation"},
            safe_to_retry=False,
        )
        if not answer.get("resourceType") or not answer.get("id"):
            raise InputError("the server did not return the created resource with its id")
        ref = f"{answer['resourceType']}/{answer['id']}"
        if self.after_create is not None:
            self.after_create(ref)
        self.ledger.record(base, key, ref)
        return ref


def _condition_category(capabilities: ServerCapabilities) -> str | None:
    """The one Condition category the server's declared profiles allow, if it allows only one."""
    profiles = capabilities.of("Condition").profiles
    if PROBLEM_LIST_PROFILE in profiles and ENCOUNTER_DIAGNOSIS_PROFILE not in profiles:
        return "problem-list-item"
    if ENCOUNTER_DIAGNOSIS_PROFILE in profiles and PROBLEM_LIST_PROFILE not in profiles:
        return "encounter-diagnosis"
    return None


def needs_folding(capabilities: ServerCapabilities) -> bool:
    """A server that declares its types and cannot create one of the drafts' as drafted (issue 12, writer d)."""
    declared = [t for t in ("Condition", "Goal", "CarePlan", "Provenance") if t in capabilities.types]
    return bool(declared) and (
        any(not capabilities.can_create(t) for t in ("Condition", "Goal", "CarePlan", "Provenance"))
        or _condition_category(capabilities) not in (None, "encounter-diagnosis")
    )


class FoldingWriter:
    """Folds the drafts into what the server can create, then sends them with ``inner`` (issue 12, writer d).

    The result keeps the inner writer's ids and adds each draft's form and
    what could not be written, so every entry point shows it.
    """

    def __init__(
        self, inner: DraftWriter, capabilities: ServerCapabilities, *, not_granted: frozenset[str] = frozenset()
    ) -> None:
        self.inner = inner
        self.capabilities = capabilities
        #: types the server creates but the token may not: their reason names the grant, not the server
        self.not_granted = not_granted

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        folded = fold_drafts(
            drafts, self.capabilities.can_create, condition_category=_condition_category(self.capabilities)
        )
        result = self.inner.write(folded.drafts)
        not_written = tuple((d, self._reason(d, r)) for d, r in folded.not_written)
        return WriteResult(result.created, result.existing, folded.forms, not_written)

    def _reason(self, draft: str, reason: str) -> str:
        server_says = f"the server creates no {draft}"
        if draft in self.not_granted and reason.startswith(server_says):
            return f"the granted scopes allow no {draft} create" + reason[len(server_says) :]
        return reason
