"""The web demo's FastAPI app: one static page and a JSON API over a `Predictor`.

Routes: ``GET /`` (the page), ``POST /api/predict`` (multipart field ``file``, optional
``top_k``), ``GET /api/health``, and FastAPI's OpenAPI docs at ``/docs``. Every error is JSON,
``{"error": message, "status": code}``: 413 for a body over the limit (checked before anything
parses it), 400 for a request without an image file or with a bad field, 422 for an image the
decoder or the model refuses (not an image, truncated, corrupt, over the pixel limit, too
small). The model runs in worker threads, at most `workers` at a time, never on the event loop.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gapnet.serve import MAX_BYTES
from gapnet.serve.predictor import DEFAULT_TOP_K, InputError, Predictor

DRAIN_BYTES = 64_000_000  # a body over the limit is read (and dropped) up to this, then cut
BODY_SECONDS = 30.0  # a body must arrive within this (408 after), so no slow client holds on
WORKERS = 2  # model runs at a time (each uses torch's threads)


# ----------------------------------------------------------------------------- body limit


async def _send_error(send: Send, status: int, message: str) -> None:
    response = JSONResponse({"error": message, "status": status}, status_code=status)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class _Replay:
    """An ASGI receive that gives the buffered body once, then the client's own messages."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body: bytes | None = body
        self.receive = receive

    async def __call__(self) -> Message:
        if self.body is None:
            return await self.receive()
        body, self.body = self.body, None
        return {"type": "http.request", "body": body, "more_body": False}


class BodyLimit:
    """ASGI middleware: read the whole request body first, and answer 413 if it is too large.

    Counted as it arrives, so a body without a Content-Length (chunked) is refused as surely
    as one that declares its size; nothing behind it ever sees an oversized body. An
    oversized body is still read to its end (up to `DRAIN_BYTES`) so that the client, still
    sending, receives the 413 instead of a reset connection.

    Args:
        app: the ASGI app behind it.
        max_bytes: the largest body passed on.
        seconds: time allowed for the whole body to arrive (408 after).
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BYTES, seconds: float = BODY_SECONDS):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_error(send, 400, f"bad Content-Length header: {declared.decode()!r}")
            return
        if declared is not None and int(declared) > DRAIN_BYTES:
            await _send_error(send, 413, self._too_large(int(declared)))
            return
        try:
            with anyio.fail_after(self.seconds):
                body, size = await self._read(receive)
        except TimeoutError:
            await _send_error(send, 408, f"the request body did not arrive in {self.seconds:g} s")
            return
        if body is None:
            if size >= 0:
                await _send_error(send, 413, self._too_large(size))
            return  # the client went away
        await self.app(scope, _Replay(body, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, int]:
        """(body, size); (None, size) when it is over the limit, (None, -1) on disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, -1
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > DRAIN_BYTES:
                break
        return (b"".join(chunks), size) if size <= self.max_bytes else (None, size)

    def _too_large(self, size: int) -> str:
        more = "more than " if size > DRAIN_BYTES else ""
        return (
            f"the request body is {more}{size:,} bytes, over the limit of {self.max_bytes:,} "
            "(gapnet serve --max-bytes)"
        )


# ----------------------------------------------------------------------------- schemas


class TopClass(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: int = Field(alias="class", description="class index")
    name: str = Field(description="class name")
    prob: float = Field(description="softmax probability")


class ImageInfo(BaseModel):
    name: str = Field(description="the uploaded file's name")
    size: list[int] = Field(description="[W, H] as stored")
    mode: str = Field(description="PIL mode as stored: L, RGB, RGBA, ...")
    inverted: bool = Field(description="dark-on-light, so inverted to the model's light-on-dark")


class Cam(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: int = Field(alias="class", description="the class mapped: the predicted one")
    box: list[int] = Field(description="[x0, y0, x1, y1], ends exclusive, in input pixels")
    overlay: str = Field(description="the map over the input, with the box: a PNG data URL")


class Prediction(BaseModel):
    top_k: list[TopClass] = Field(description="the most likely classes, most likely first")
    probs: list[float] = Field(description="every class's probability; they sum to 1")
    image: ImageInfo
    input: list[int] = Field(description="[C, H, W] the model saw")
    resized: str | None = Field(description="why the image was resized; null if it was not")
    cam: Cam | None = Field(description="class activation map; null for an fc head")
    cam_note: str | None = Field(description="why there is no map, if there is none")
    seconds: float = Field(description="time to decode, run the model and draw the overlay")


class Error(BaseModel):
    error: str = Field(description="what was wrong")
    status: int


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in [
        (400, "no image file in the request, or a bad field"),
        (413, "the request body is over the size limit"),
        (422, "not an image, truncated or corrupt, over the pixel limit, or too small"),
    ]
}


# ----------------------------------------------------------------------------- the app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """One line for FastAPI's validation errors, the missing file said in plain words."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
        if field == "file":
            parts.append(
                "no image file: send it as the multipart/form-data field 'file' "
                "(curl -F file=@digit.png http://HOST:PORT/api/predict)"
            )
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _page() -> str:
    return resources.files("gapnet.serve").joinpath("static/index.html").read_text("utf-8")


def create_app(
    predictor: Predictor, *, max_bytes: int = MAX_BYTES, workers: int = WORKERS
) -> FastAPI:
    """The demo's FastAPI app over `predictor`.

    Args:
        predictor: answers each image.
        max_bytes: largest request body (413 over it).
        workers: model runs at a time, each in a worker thread off the event loop.
    """
    app = FastAPI(
        title="gapnet demo",
        description="A global-average-pooling classifier that takes images of any size, with "
        "the class activation map that shows where it looked.",
        version="1",
    )
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.state.predictor = predictor
    limiter = anyio.CapacityLimiter(workers)
    page = _page()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """The server is up: the model it serves and its limits."""
        return {"status": "ok", "model": predictor.info(), "max_bytes": max_bytes}

    @app.post("/api/predict", response_model=Prediction, responses=ERRORS)
    async def predict(
        file: Annotated[UploadFile, File(description="the image: PNG, JPEG, ... any size, mode")],
        top_k: Annotated[int, Form(ge=1, description="classes to list (at most all)")] = (
            DEFAULT_TOP_K
        ),
    ) -> Any:
        """Classify one image at its own size; the answer, the map and its box."""
        image = await file.read()
        if not image:
            return _error(400, f"the file {file.filename or 'file'!r} is empty")
        run = functools.partial(
            predictor.predict, image, name=file.filename or "image", top_k=top_k
        )
        try:
            return await anyio.to_thread.run_sync(run, limiter=limiter)
        except InputError as e:
            return _error(422, str(e))

    return app
