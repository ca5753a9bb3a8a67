"""The local web app: upload a CXR, see the lung mask, refine it with clicks or a box, download the results.

Endpoints (all JSON unless stated):

``GET /``, ``GET /app.js``, ``GET /style.css``
    The page (``static/``; no build step, no CDN, no inline script or style).
``GET /api/info``
    Whether uploads get an automatic mask (a CNN run was given), the models, the upload limits.
``POST /api/images`` (multipart field ``file``)
    Reads the upload into memory, decodes it by content (:func:`cxrsam.data.io.read_image_bytes`),
    encodes it once, and -- with a CNN run -- segments it from the CNN's draft. Returns ``id``, the
    image as a PNG data URL and the state (below).
``POST /api/images/{id}/segment``
    with ``{"box": [x0, y0, x1, y1] | null, "points": [[x, y], ...], "labels": [1|0, ...]}``
    Decodes the prompts against the cached embedding (milliseconds on CPU for LiteMedSAM). Without
    a box, points refine the automatic (draft) prompts; with no prompts at all the automatic mask
    comes back (or none without a CNN run). Boxes need x0 < x1 and y0 < y1; boxes and points must
    lie inside the image (x in [0, W-1], y in [0, H-1]), else 422.
``GET /api/images/{id}/mask.png``, ``GET /api/images/{id}/result.json``
    Downloads of the current mask ({0, 255}, original size) and its JSON record.
``GET /api/images/{id}/seg.dcm``
    The current mask as a DICOM Segmentation (one segment per lung; DICOM uploads only, else 409).

State returned after upload and each refinement: ``mask`` (PNG data URL or null), ``mask_pixels``,
``uncertainty`` (the prompt-disagreement map as a grey PNG data URL, 255 = most disagreement; null when the
segmenter measures none), ``quality`` (``ok`` / ``review`` / null), ``dicom`` (whether the upload was DICOM, so a
DICOM-SEG can be downloaded), ``result`` (the JSON record of :func:`cxrsam.pipeline.outputs.result_dict`, with
the quality flags and reasons, or null) and ``message``.

Safety:

* Only the app's own hosts are served: a request whose ``Host`` header is not in ``allowed_hosts``
  (``host`` or ``host:port``; default the loopback names 127.0.0.1, localhost and [::1]) gets 400,
  and a POST whose ``Origin`` header is not ``http(s)://`` + an allowed host gets 403, before any
  other work. Other web pages therefore cannot drive the app, not even by DNS rebinding; requests
  without ``Origin`` (curl, scripts) are served.
* Every response carries a Content-Security-Policy that allows only the app's own scripts, styles
  and images (plus ``data:`` images), forbids framing, plugins and ``<base>``, and
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``.
* Request bodies over ``max_upload_mb`` (uploads) or :data:`PROMPT_BYTES` (anything else) are
  refused with 413 before they are read in full. The upload is parsed in memory (never spooled to a
  temporary file) and dropped once decoded.
* The file type is decided by decoding the content, never by its name; the image size is read from
  the header (PNG, JPEG, TIFF, BMP, GIF; DICOM Rows x Columns x frames) and more than ``max_pixels``
  pixels is refused with 400 before the pixels are decoded; a deflated DICOM is inflated only as far
  as its declared image needs. The client's file name is only shown (sanitised); no client text
  becomes a path. Bad client input gets a 4xx with a JSON ``detail``, never a 500.
* Memory is bounded by the session cap: decoded uploads live in memory only, in a store of
  ``max_sessions`` (least recently used dropped), and the segmenter keeps at most ``max_sessions``
  image embeddings in memory. One session holds about 6 bytes per pixel (float32 image, draft and
  mask) plus one embedding (4 MiB for LiteMedSAM and SAM), so at most
  ``max_sessions x (6 B x max_pixels + 4 MiB)``. One upload is decoded and encoded at a time; each
  request body being received is held in memory too (at most ``max_upload_mb``).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrsam.data.io import read_image_bytes
from cxrsam.data.xray import MAX_PIXELS, XRay
from cxrsam.errors import CxrsamError
from cxrsam.pipeline.outputs import Segmentation, image_png, mask_dicom_seg, mask_png, result_dict, uncertainty_png
from cxrsam.pipeline.segmenter import Segmenter, validate_points

ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_POINTS = 64
MULTIPART_OVERHEAD = 64 * 1024
"""Bytes allowed on top of the file for multipart headers and boundaries."""
PROMPT_BYTES = 64 * 1024
"""Largest request body other than an upload (bytes); prompts take a few hundred."""
UPLOAD_PATH = "/api/images"
APP_MAX_PIXELS = 25_000_000
"""Default largest upload (pixels): real CXR have at most ~4300x4300 (18.5 MP)."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
"""Hosts served by default (any port); see :func:`create_app`."""
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "frame-ancestors 'none'; object-src 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/style.css": ("style.css", "text/css; charset=utf-8")}
HOST_PATTERN = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")


class Prompt(BaseModel):
    """Prompts of one refinement, in original image pixels (x = column, y = row)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = Field(default_factory=list, max_length=MAX_POINTS)
    labels: list[Literal[0, 1]] = Field(default_factory=list, max_length=MAX_POINTS)

    @model_validator(mode="after")
    def _consistent(self) -> Prompt:
        if len(self.labels) != len(self.points):
            raise ValueError("points must be [x, y] pairs with one label each")
        if self.box is not None and not (self.box[0] < self.box[2] and self.box[1] < self.box[3]):
            raise ValueError("box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        return self


@dataclass
class Upload:
    """One uploaded image: its pixels, shown name, CNN draft (and its probability map when the prompts draw
    points with it) and latest segmentation."""

    xray: XRay
    name: str
    draft: np.ndarray | None
    probability: np.ndarray | None = None
    segmentation: Segmentation | None = None


def safe_name(filename: str | None) -> str:
    """The client's file name reduced to a harmless display name (no folders, ASCII word characters)."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return cleaned or "upload"


def parse_host(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a Host header, an Origin's authority, an allow-list entry) as (lower-case
    host, port or None), or None when it is not a name, an IPv4 address or a [bracketed] IPv6 address."""
    match = HOST_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        return None
    return match[1], None if match[2] is None else int(match[2])


def allowed_host_set(entries: Sequence[str]) -> set[tuple[str, int | None]]:
    """The allow-list ``entries`` (``host`` or ``host:port``) parsed; raises :class:`CxrsamError` on a malformed one."""
    allowed = set()
    for entry in entries:
        parsed = parse_host(entry)
        if parsed is None:
            raise CxrsamError(f"allowed host {entry!r} is not host[:port] (a name, an IPv4 address "
                              "or a [bracketed] IPv6 address)")
        allowed.add(parsed)
    return allowed


def served_hosts(host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The allow-list of ``cxrsam app``: the loopback names and the bound ``host``, each at ``port``,
    then the ``extra`` entries as given (validated: :class:`CxrsamError` on a malformed one)."""
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    entries = [f"{name}:{port}" for name in dict.fromkeys((*LOOPBACK_HOSTS, bound))] + list(extra)
    allowed_host_set(entries)
    return entries


class RequestGuard:
    """ASGI middleware: serve only the allowed hosts and origins; add :data:`SECURITY_HEADERS` to every response.

    A request without exactly one ``Host`` header, or with one not allowed, gets 400; a request with
    a method other than GET/HEAD/OPTIONS and an ``Origin`` header that is not ``http(s)://`` + an
    allowed host gets 403. ``allowed`` comes from :func:`allowed_host_set`; an entry without a
    port allows any port.
    """

    def __init__(self, app: ASGIApp, allowed: set[tuple[str, int | None]]):
        self.app = app
        self.allowed = allowed
        self.headers = [(key.lower().encode(), value.encode()) for key, value in SECURITY_HEADERS.items()]

    def allows(self, host: str) -> bool:
        """True if ``host[:port]`` is in the allow-list."""
        parsed = parse_host(host)
        return parsed is not None and (parsed in self.allowed or (parsed[0], None) in self.allowed)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        """The error response for a foreign Host or Origin, or None to serve the request."""
        headers = scope.get("headers", [])
        hosts = [value.decode("latin-1") for key, value in headers if key == b"host"]
        if len(hosts) != 1 or not self.allows(hosts[0]):
            shown = hosts[0] if len(hosts) == 1 else f"{len(hosts)} Host headers"
            return JSONResponse({"detail": f"host {shown!r} is not served (add it with cxrsam app --allow-host)"},
                                status_code=400)
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        for key, value in headers:
            if key == b"origin":
                scheme, separator, authority = value.decode("latin-1").partition("://")
                if scheme not in ("http", "https") or not separator or not self.allows(authority):
                    return JSONResponse({"detail": f"cross-origin request from {value.decode('latin-1')!r} refused"},
                                        status_code=403)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


class UploadLimit:
    """ASGI middleware: refuse request bodies larger than ``max_bytes`` (uploads to :data:`UPLOAD_PATH`)
    or :data:`PROMPT_BYTES` (any other request) with 413.

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the body is
    counted as it streams in and reading stops at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, limit_text: str):
        self.app = app
        self.max_bytes = max_bytes
        self.limit_text = limit_text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == UPLOAD_PATH
        limit = self.max_bytes if upload else PROMPT_BYTES
        too_large = {"detail": f"upload larger than {self.limit_text}" if upload
                     else f"request body larger than {PROMPT_BYTES // 1024} KiB"}
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse(too_large, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large["detail"])
            return message

        return await self.app(scope, limited_receive, send)


async def read_upload(request: Request, max_bytes: int) -> tuple[str, bytes]:
    """The multipart field ``file`` of ``request`` as (shown name, content), parsed in memory.

    Starlette spools file parts over 1 MiB to a temporary file; here the spool limit is the body
    limit (at most ``max_bytes`` plus :data:`MULTIPART_OVERHEAD`), so the upload never reaches disk.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send the image as multipart/form-data in the field 'file'")
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=1)
    parser.spool_max_size = max_bytes + MULTIPART_OVERHEAD
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed upload ({exc.message})") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise HTTPException(422, "send the image as a file in the multipart field 'file'")
    with file.file:
        return safe_name(file.filename), file.file.read()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def create_app(segmenter: Segmenter, max_upload_mb: float = 64.0, max_sessions: int = 16,
               max_pixels: int = APP_MAX_PIXELS, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The FastAPI app around one :class:`~cxrsam.pipeline.segmenter.Segmenter`.

    Args:
        segmenter: SAM (LoRA run or pretrained) and, optionally, the CNN giving automatic drafts.
            Its engine's in-memory embedding cache is capped at ``max_sessions``.
        max_upload_mb: largest accepted upload in MiB.
        max_sessions: uploads kept in memory (least recently used dropped).
        max_pixels: largest accepted image in pixels (at most :data:`cxrsam.data.xray.MAX_PIXELS`),
            checked from the file header before decoding.
        allowed_hosts: ``host`` or ``host:port`` entries served (Host header, and Origin of POSTs);
            an entry without a port allows any port.
    """
    if not 0 < max_pixels <= MAX_PIXELS:
        raise ValueError(f"max_pixels must be in 1..{MAX_PIXELS}, got {max_pixels}")
    max_bytes = int(max_upload_mb * 2**20)
    static = {route: (resources.files("cxrsam.app").joinpath("static", name).read_bytes(), media)
              for route, (name, media) in STATIC_FILES.items()}
    sessions: OrderedDict[str, Upload] = OrderedDict()
    lock = threading.Lock()
    automatic = segmenter.drafter is not None
    segmenter.engine.memory_items = min(segmenter.engine.memory_items, max_sessions)

    app = FastAPI(title="cxrsam", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimit, max_bytes=max_bytes + MULTIPART_OVERHEAD, limit_text=f"{max_upload_mb:g} MiB")
    app.add_middleware(RequestGuard, allowed=allowed_host_set(allowed_hosts))  # outermost: before any other work

    def page(route: str):
        content, media = static[route]
        return lambda: Response(content, media_type=media, headers={"Cache-Control": "no-store"})

    for route in static:
        app.add_api_route(route, page(route), methods=["GET"], include_in_schema=False)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each problem without echoing the input (FastAPI's would, and NaN made it a 500)."""
        problems = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    def get_upload(image_id: str) -> Upload:
        with lock:
            upload = sessions.get(image_id)
            if upload is None:
                raise HTTPException(404, "unknown image id (expired or never uploaded); upload the image again")
            sessions.move_to_end(image_id)
            return upload

    def state(upload: Upload, message: str = "") -> dict:
        seg = upload.segmentation
        return {"mask": None if seg is None else _data_url(mask_png(seg.mask)),
                "mask_pixels": 0 if seg is None else int(seg.mask.sum()),
                "uncertainty": None if seg is None or seg.uncertainty is None
                else _data_url(uncertainty_png(seg.uncertainty)),
                "quality": None if seg is None or seg.quality is None else seg.quality.status.value,
                "dicom": upload.xray.dicom is not None,
                "result": None if seg is None else result_dict(seg, upload.name),
                "message": message}

    def segment(upload: Upload, prompt: Prompt | None) -> str:
        """Run the segmenter for ``prompt`` (None: automatic); returns a message for the user."""
        prompt = prompt or Prompt()
        if prompt.box is None and not prompt.points and upload.draft is None:
            upload.segmentation = None
            return "drag a box around the lungs (or click inside a lung) to segment"
        try:
            with lock:
                upload.segmentation = segmenter.segment(
                    upload.xray, box=prompt.box, points=prompt.points or None,
                    labels=prompt.labels or None, draft=upload.draft, probability=upload.probability)
        except CxrsamError as exc:
            upload.segmentation = None
            return f"{exc.problem}; drag a box around the lungs"
        return "; ".join(upload.segmentation.warnings)

    def add_upload(data: bytes, name: str) -> dict:
        """Decode, encode and (with a CNN) segment one upload; one at a time, so memory stays bounded."""
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: upload larger than {max_upload_mb:g} MiB")
        with lock:
            try:
                xray = read_image_bytes(data, name, max_pixels)
            except CxrsamError as exc:
                raise HTTPException(400, f"{name}: {exc.problem}") from None
            draft = segmenter.draft(xray)
            probability = segmenter.probability(xray)
            segmenter.engine.embed([xray])
        upload = Upload(xray=xray, name=name, draft=draft if draft is not None and draft.any() else None,
                        probability=probability)
        message = segment(upload, None)
        image_id = uuid.uuid4().hex
        with lock:
            sessions[image_id] = upload
            while len(sessions) > max_sessions:
                sessions.popitem(last=False)
        height, width = xray.size
        return {"id": image_id, "name": name, "width": width, "height": height, "automatic": automatic,
                "image": _data_url(image_png(xray.pixels)), **state(upload, message)}

    @app.get("/api/info")
    def info() -> dict:
        return {"automatic": automatic, "models": segmenter.models, "max_upload_mb": max_upload_mb,
                "max_pixels": max_pixels}

    @app.post(UPLOAD_PATH)
    async def upload_image(request: Request) -> dict:
        name, data = await read_upload(request, max_bytes)
        return await run_in_threadpool(add_upload, data, name)

    @app.post("/api/images/{image_id}/segment")
    def refine(prompt: Prompt, image_id: str = PathParam(pattern=ID_PATTERN)) -> dict:
        upload = get_upload(image_id)
        height, width = upload.xray.size
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box  # ordered by Prompt
            if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
                raise HTTPException(422, f"box must lie inside the {width}x{height} image")
        try:
            validate_points(prompt.points, prompt.labels, upload.xray.size)
        except CxrsamError as exc:
            raise HTTPException(422, exc.problem) from None
        return state(upload, segment(upload, prompt))

    def attachment(image_id: str, suffix: str, media_type: str, render) -> Response:
        upload = get_upload(image_id)
        if upload.segmentation is None:
            raise HTTPException(404, "no mask yet")
        filename = f"{Path(upload.name).stem}{suffix}"
        return Response(render(upload), media_type=media_type,
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/api/images/{image_id}/mask.png")
    def download_mask(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return attachment(image_id, "_mask.png", "image/png", lambda upload: mask_png(upload.segmentation.mask))

    def dicom_seg(upload: Upload) -> bytes:
        if upload.xray.dicom is None:
            raise HTTPException(409, "a DICOM-SEG needs a DICOM upload")
        try:
            return mask_dicom_seg(upload.segmentation)
        except CxrsamError as exc:
            raise HTTPException(409, exc.problem) from None

    @app.get("/api/images/{image_id}/seg.dcm")
    def download_seg(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return attachment(image_id, "_seg.dcm", "application/dicom", dicom_seg)

    @app.get("/api/images/{image_id}/result.json")
    def download_json(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return attachment(image_id, ".json", "application/json", lambda upload: json.dumps(
            result_dict(upload.segmentation, upload.name), indent=2) + "\n")

    return app
