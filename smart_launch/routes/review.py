"""The pages: ``/review`` (checklist and drafts), ``/write`` (confirm, then one write), ``/resource`` (evidence viewer).

Every route reads the patient bound to the session at its launch; none takes
a patient id from the browser.  A write needs, in this order: a session, the
form's CSRF token, and scopes that let the app create every draft type
(SPEC §7) — the order of the handler's parameters is the order of the checks.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from fhir_plugin import Forbidden, UsageError, WriteResult, available_profiles

from ..deps import CurrentSession, Fhir, FormCsrf, MayWrite, PagesDep, ReviewedDep, WriteAccessDep, WriterDep
from ..views import VIEWABLE, draft_view, resource_facts, review_context, subject_of

__all__ = ["router"]

log = logging.getLogger("smart_launch.app")
router = APIRouter()


@router.get("/review", response_class=HTMLResponse, summary="The review page for the launched patient")
def review(
    request: Request, sess: CurrentSession, loaded: ReviewedDep, pages: PagesDep, access: WriteAccessDep
) -> Response:
    context = review_context(sess, loaded, shipped=tuple(available_profiles()), access=access)
    response = pages.page(request, "review.html", **context)
    response.headers["Server-Timing"] = loaded.server_timing()
    return response


@router.post("/write", response_class=HTMLResponse, summary="Confirm, then write the drafts (form, CSRF token)")
def write(
    request: Request,
    _csrf: FormCsrf,
    sess: MayWrite,
    loaded: ReviewedDep,
    writer: WriterDep,
    pages: PagesDep,
    confirmed: Annotated[str, Form()] = "",
    patient: Annotated[str, Form()] = "",
) -> Response:
    if patient and patient != sess.patient:
        # the page was confirmed for another patient than this launch's: never write across launches
        raise Forbidden(
            "this confirmation was made on another patient's page, so nothing was written; "
            "go back to the review and confirm again"
        )
    if loaded.drafts is None and loaded.existing.written:  # SPEC §7.1: after a write, show it, write nothing
        return pages.page(
            request,
            "written.html",
            result=WriteResult((), loaded.existing.written),
            report=loaded.report,
            patient=loaded.record.patient,
        )
    if loaded.drafts is None:
        return pages.page(
            request,
            "error.html",
            409,
            title="Nothing to write",
            message=_sentence(loaded.refused or loaded.settled or "there are no drafts"),
            back="/review",
        )
    if confirmed != "yes":
        return pages.page(
            request,
            "confirm.html",
            drafts=draft_view(loaded.drafts),
            csrf=sess.csrf,
            report=loaded.report,
            patient=sess.patient,
        )
    result = writer.write(loaded.drafts)
    log.info("write: Patient/%s created %d, existing %d", sess.patient, len(result.created), len(result.existing))
    return pages.page(request, "written.html", result=result, report=loaded.report, patient=loaded.record.patient)


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


@router.get(
    "/resource/{resource_type}/{resource_id}",
    response_class=HTMLResponse,
    summary="A small viewer for one evidence resource of the launched patient",
)
def resource(
    request: Request, resource_type: str, resource_id: str, sess: CurrentSession, client: Fhir, pages: PagesDep
) -> Response:
    if resource_type not in VIEWABLE:
        raise UsageError(f"{resource_type} resources are not shown here")
    found = client.read(resource_type, resource_id)
    if subject_of(found) != sess.patient:
        # the token may be broader than this launch; the session still only sees its own patient
        raise Forbidden("that resource does not belong to the patient this app was launched for")
    return pages.page(
        request,
        "resource.html",
        ref=f"{resource_type}/{resource_id}",
        facts=resource_facts(found),
        text=json.dumps(found, indent=2, ensure_ascii=False),
    )
