"""The local web app: upload a CXR, see the lung mask, refine it with clicks or a box, download the results.

Endpoints (all JSON unless stated):

``GET /``, ``GET /app.js``, ``GET /style.css``
    The page (``static/``; no build step, no CDN).
``GET /api/info``
    Whether uploads get an automatic mask (a CNN run was given), the models, the upload limit.
``POST /api/images`` (multipart field ``file``)
    Decodes the upload by content (:func:`cxrsam.data.io.read_image` on a private temp file that is
    deleted right after), encodes it once, and -- with a CNN run -- segments it from the CNN's draft.
    Returns ``id``, the image as a PNG data URL and the state (below).
``POST /api/images/{id}/segment`` with ``{"box": [x0, y0, x1, y1] | null, "points": [[x, y], ...], "labels": [1|0, ...]}``
    Decodes the prompts against the cached embedding (milliseconds on CPU for LiteMedSAM). Without
    a box, points refine the automatic (draft) prompts; with no prompts at all the automatic mask
    comes back (or none without a CNN run).
``GET /api/images/{id}/mask.png``, ``GET /api/images/{id}/result.json``
    Downloads of the current mask ({0, 255}, original size) and its JSON record.

State returned after upload and each refinement: ``mask`` (PNG data URL or null), ``mask_pixels``,
``result`` (the JSON record of :func:`cxrsam.pipeline.outputs.result_dict`, or null) and ``message``.

Safety: bind to loopback (the CLI's default); request bodies above ``max_upload_mb`` are refused
with 413 before they are read in full; the file type is decided by decoding the content, never by
its name; the client's file name is only shown (sanitised), and no client text becomes a path.
Uploads live in an in-memory store capped at ``max_sessions`` (least recently used dropped).
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
from fastapi import FastAPI, File, HTTPException, Path as PathParam, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cxrsam.data.io import XRay, read_image
from cxrsam.errors import CxrsamError
from cxrsam.pipeline.outputs import Segmentation, image_png, mask_png, result_dict
from cxrsam.pipeline.segmenter import Segmenter, validate_points

ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_POINTS = 64
MULTIPART_OVERHEAD = 64 * 1024
"""Bytes allowed on top of the file for multipart headers and boundaries."""
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/style.css": ("style.css", "text/css; charset=utf-8")}


class Prompt(BaseModel):
    """Prompts of one refinement, in original image pixels (x = column, y = row)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    box: list[float] | None = Field(None, min_length=4, max_length=4)
    points: list[list[float]] = Field(default_factory=list, max_length=MAX_POINTS)
    labels: list[int] = Field(default_factory=list, max_length=MAX_POINTS)


@dataclass
class Upload:
    """One uploaded image: its pixels, shown name, CNN draft and latest segmentation."""

    xray: XRay
    name: str
    draft: np.ndarray | None
    segmentation: Segmentation | None = None


def safe_name(filename: str | None) -> str:
    """The client's file name reduced to a harmless display name (no folders, ASCII word characters)."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return cleaned or "upload"


class UploadLimit:
    """ASGI middleware: refuse request bodies larger than ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the body is
    counted as it streams in and reading stops at the limit.
    """

    def __init__(self, app, max_bytes: int, limit_text: str):
        self.app = app
        self.max_bytes = max_bytes
        self.limit_text = limit_text

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = {"detail": f"upload larger than {self.limit_text}"}
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(too_large, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large["detail"])
            return message

        return await self.app(scope, limited_receive, send)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def create_app(segmenter: Segmenter, max_upload_mb: float = 64.0, max_sessions: int = 16) -> FastAPI:
    """The FastAPI app around one :class:`~cxrsam.pipeline.segmenter.Segmenter`.

    Args:
        segmenter: SAM (LoRA run or pretrained) and, optionally, the CNN giving automatic drafts.
        max_upload_mb: largest accepted request body in MiB.
        max_sessions: uploads kept in memory (least recently used dropped; their embeddings are
            kept by the segmenter's engine cache).
    """
    max_bytes = int(max_upload_mb * 2**20)
    static = {route: (resources.files("cxrsam.app").joinpath("static", name).read_bytes(), media)
              for route, (name, media) in STATIC_FILES.items()}
    sessions: OrderedDict[str, Upload] = OrderedDict()
    lock = threading.Lock()
    automatic = segmenter.drafter is not None

    app = FastAPI(title="cxrsam", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimit, max_bytes=max_bytes + MULTIPART_OVERHEAD, limit_text=f"{max_upload_mb:g} MiB")

    def page(route: str):
        content, media = static[route]
        return lambda: Response(content, media_type=media, headers={"Cache-Control": "no-store"})

    for route in static:
        app.add_api_route(route, page(route), methods=["GET"], include_in_schema=False)

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
                    labels=prompt.labels or None, draft=upload.draft)
        except CxrsamError as exc:
            upload.segmentation = None
            return f"{exc.problem}; drag a box around the lungs"
        return "; ".join(upload.segmentation.warnings)

    @app.get("/api/info")
    def info() -> dict:
        return {"automatic": automatic, "models": segmenter.models, "max_upload_mb": max_upload_mb}

    @app.post("/api/images")
    def upload_image(file: UploadFile = File(...)) -> dict:
        name = safe_name(file.filename)
        with tempfile.TemporaryDirectory(prefix="cxrsam-upload-") as folder:
            path = Path(folder) / "upload"
            size = 0
            with path.open("wb") as handle:
                while chunk := file.file.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise HTTPException(413, f"{name}: upload larger than {max_upload_mb:g} MiB")
                    handle.write(chunk)
            try:
                xray = read_image(path)
            except CxrsamError as exc:
                raise HTTPException(400, f"{name}: {exc.problem}") from None
        xray.path = Path(name)
        with lock:
            draft = segmenter.draft(xray)
            segmenter.engine.embed([xray])
        upload = Upload(xray=xray, name=name, draft=draft if draft is not None and draft.any() else None)
        message = segment(upload, None)
        image_id = uuid.uuid4().hex
        with lock:
            sessions[image_id] = upload
            while len(sessions) > max_sessions:
                sessions.popitem(last=False)
        height, width = xray.size
        return {"id": image_id, "name": name, "width": width, "height": height, "automatic": automatic,
                "image": _data_url(image_png(xray.pixels)), **state(upload, message)}

    @app.post("/api/images/{image_id}/segment")
    def refine(prompt: Prompt, image_id: str = PathParam(pattern=ID_PATTERN)) -> dict:
        upload = get_upload(image_id)
        if len(prompt.labels) != len(prompt.points) or any(len(p) != 2 for p in prompt.points):
            raise HTTPException(422, "points must be [x, y] pairs with one label each")
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

    @app.get("/api/images/{image_id}/result.json")
    def download_json(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return attachment(image_id, ".json", "application/json", lambda upload: json.dumps(
            result_dict(upload.segmentation, upload.name), indent=2) + "\n")

    return app
