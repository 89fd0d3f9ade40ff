"""The JSON API: the same data as the pages, for the page's script and for integrations.

Authenticated by the session cookie, like the pages; a POST also needs the
session's CSRF token in the ``X-CSRF-Token`` header.  A refusal is
``{"error": "<one sentence>"}`` with the error's HTTP status.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from fhir_plugin import WriteResult

from ..deps import CurrentSession, HeaderCsrf, MayWrite, ReviewedDep, WriteAccessDep, WriterDep
from ..views import draft_view

__all__ = ["router"]

log = logging.getLogger("smart_launch.app")
router = APIRouter(prefix="/api")


@router.get("/session", summary="The launch this session is bound to, and its CSRF token")
def api_session(sess: CurrentSession, access: WriteAccessDep) -> dict[str, Any]:
    return {
        "patient": f"Patient/{sess.patient}",
        "encounter": f"Encounter/{sess.encounter}" if sess.encounter else None,
        "scopes": list(sess.scopes),
        "write_allowed": access.allowed,
        "missing_write_scopes": list(access.missing),
        "csrf": sess.csrf,
        "need_patient_banner": sess.context.need_patient_banner,
    }


@router.get("/report", summary="The documentation report (SPEC §6) for the launched patient")
def api_report(loaded: ReviewedDep) -> Response:
    response = JSONResponse(loaded.report.to_json())
    response.headers["Server-Timing"] = loaded.server_timing()
    return response


@router.get("/drafts", summary="The draft transaction Bundle (SPEC §7) and its phases, or why it was refused")
def api_drafts(access: WriteAccessDep, loaded: ReviewedDep) -> Response:
    if loaded.drafts is None:
        return JSONResponse(
            {
                "error": loaded.refused or loaded.settled,
                "refused": loaded.refused is not None,
                "existing": loaded.existing.to_json(),
            },
            status_code=409,
        )
    return JSONResponse(
        {
            "drafts": loaded.drafts,
            "existing": loaded.existing.to_json(),
            "phases": draft_view(loaded.drafts)["careplan"]["phases"],
            "write_allowed": access.allowed,
        }
    )


@router.post("/write", summary="Write the drafts as one transaction (needs the X-CSRF-Token header)")
def api_write(_csrf: HeaderCsrf, sess: MayWrite, loaded: ReviewedDep, writer: WriterDep) -> Response:
    if loaded.drafts is None and loaded.existing.written:  # SPEC §7.1: already written; nothing new is sent
        result = WriteResult((), loaded.existing.written)
        return JSONResponse({**result.to_json(), "summary": result.summary()})
    if loaded.drafts is None and loaded.settled:
        return JSONResponse(
            {"error": loaded.settled, "refused": False, "existing": loaded.existing.to_json()}, status_code=409
        )
    if loaded.drafts is None:
        return JSONResponse({"error": loaded.refused, "refused": True}, status_code=409)
    result = writer.write(loaded.drafts)
    log.info("write: Patient/%s created %d, existing %d", sess.patient, len(result.created), len(result.existing))
    return JSONResponse({**result.to_json(), "summary": result.summary()})
