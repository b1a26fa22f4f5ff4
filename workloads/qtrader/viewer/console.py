"""The live console: one read-only page (``GET /console``) over the viewers' ``/events`` stream.

Three files shipped in the package (``qtrader/viewer/console/``: the page, its script, its
style; plain JavaScript, no build step, nothing fetched from anywhere but this server), read once
when the routes are made. The page opens ``/events`` on the host that served it, so the stream's
Origin check lets it in and refuses the same page served from anywhere else.

Read-only by construction: the page has no form and sends nothing on the WebSocket; the stream
ignores whatever a client sends. No token: the same port serves ``/metrics`` and
``/viewer/stats`` unauthenticated with the same figures (equity, positions, drawdown), so a token
on this page alone would protect nothing; who may reach the port is the network's to decide
(``networkPolicy.healthFrom`` in the chart, loopback with ``qtrader up``).

The headers keep the page to itself: a Content-Security-Policy that allows only this origin's
script, style and WebSocket (no inline script, no other host), no framing, no referrer, no
content sniffing; ``no-cache`` so a new release's script is never mixed with an old page.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Response

PACKAGE = "qtrader.viewer"
FOLDER = "console"
PAGE = "index.html"
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> bytes:
    """One of the console's files, from the installed package (a wheel ships them)."""
    return resources.files(PACKAGE).joinpath(FOLDER, name).read_bytes()


def console_router() -> APIRouter:
    router = APIRouter()
    page = read_asset(PAGE)
    assets = {name: read_asset(name) for name in ASSETS}

    @router.get("/console", include_in_schema=False)
    async def console() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @router.get("/console/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(status_code=404)
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

    return router
