"""The home page, the EHR's look as CSS (``/style.css``), and the health check."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..deps import HttpDep, MaybeSession, PagesDep, SessionsDep, SettingsDep
from ..views import _fetch_style, style_css

__all__ = ["router"]

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def home(request: Request, pages: PagesDep) -> Response:
    return pages.page(request, "home.html")


@router.get("/style.css", include_in_schema=False)
def style(sess: MaybeSession, sessions: SessionsDep, http: HttpDep, settings: SettingsDep) -> Response:
    """The EHR's look (SMART ``smart_style_url``), as CSS variables over our stylesheet.

    Fetched once per session, server-side, only from the issuer's own origin; only values that
    are plainly colours or font names are kept, so the EHR's document cannot inject CSS.
    """
    if sess is None:
        return Response("", media_type="text/css")
    values = sess.state.style
    if values is None:
        values = _fetch_style(http, sess.context.smart_style_url, sess.state.iss)
        sessions.put(sess.sid, replace(sess.state, style=values), ttl=settings.session_ttl)
    return Response(style_css(values), media_type="text/css")


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}
