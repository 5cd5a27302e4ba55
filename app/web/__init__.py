"""The clinician's web page: `GET /` and its two assets under `/ui/`.

No build step and no separate server: three hand-written files ship inside the package
(`app/web/static/`, included in the wheel by hatch and copied by the Dockerfile with `app/`).
The page talks to the service only through the public JSON API, with the key the user types,
kept in the tab's `sessionStorage` and sent as `X-API-Key` (never in a URL, so never in a log).

Every answer of this router carries a strict Content-Security-Policy: scripts and styles only
from this origin (no inline script, no `eval`), images from this origin, `data:` (the Grad-CAM
overlay) and `blob:` (thumbnails fetched with the key), and nothing else, so nothing is fetched
from a third party and an injected label cannot run code even if the escaping had a hole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: The only files served under /ui/ (an allow-list: no path from the request touches the disk).
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate every time (an upgrade must not leave an old script in a browser), but a
    # matching ETag costs a 304 with no body.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def load_asset(name: str) -> Asset:
    """One shipped file, read once per process."""
    media_type = "text/html; charset=utf-8" if name == "index.html" else ASSETS[name]
    body = (STATIC_DIR / name).read_bytes()
    return Asset(
        body=body, media_type=media_type, etag=f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    )


def _respond(request: Request, asset: Asset) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(content=asset.body, media_type=asset.media_type, headers=headers)


router = APIRouter(tags=["web"])


@router.get(
    "/",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}, "description": "The web page"}},
    summary="The clinician's web page (diagnose, references, models and jobs); asks for a key",
)
def page(request: Request) -> Response:
    return _respond(request, load_asset("index.html"))


@router.get("/ui/{name}", include_in_schema=False)
def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no asset {name!r}; the page is at /")
    return _respond(request, load_asset(name))
