"""The web demo: draw or upload an image of any size, see the answer and where the model looked.

`Predictor` (no web framework) answers one image; `create_app` is the FastAPI app over it (one
static page, ``POST /api/predict``, ``GET /api/health``, docs at ``/docs``); `run` serves it
with uvicorn, on 127.0.0.1 unless told otherwise. FastAPI and uvicorn are the ``serve`` extra
and load only when an app is made.

Example:
    >>> from gapnet.models import create
    >>> predictor = Predictor(create("convnet-tiny"), list("0123456789"), source="untrained")
    >>> predictor.info()["min_input_size"], predictor.info()["fixed_size"]
    (4, None)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gapnet.serve.predictor import (
    MAX_PIXELS,
    InputError,
    Predictor,
    demo_checkpoint,
    demo_config,
    load_predictor,
    model_input,
)

MAX_BYTES = 5_000_000  # largest request body; larger ones get 413
HOST = "127.0.0.1"  # this machine only, unless told otherwise
PORT = 8000
INSTALL_HINT = "install the serve extra: pip install 'gapnet[serve]'"

__all__ = [
    "HOST", "MAX_BYTES", "MAX_PIXELS", "PORT", "InputError", "Predictor", "create_app",
    "demo_checkpoint", "demo_config", "load_predictor", "model_input", "run", "serving",
]  # fmt: skip


def create_app(predictor: Predictor, **options: Any) -> Any:
    """The FastAPI app over `predictor` (`gapnet.serve.app.create_app`; options: max_bytes,
    workers)."""
    try:
        from gapnet.serve import app
    except ImportError as e:
        raise ImportError(f"gapnet serve needs {e.name or 'fastapi'}: {INSTALL_HINT}") from e
    return app.create_app(predictor, **options)


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"gapnet serve needs uvicorn: {INSTALL_HINT}") from e
    return uvicorn


def run(
    predictor: Predictor,
    *,
    host: str = HOST,
    port: int = PORT,
    max_bytes: int = MAX_BYTES,
    workers: int | None = None,
) -> None:
    """Serve the demo with uvicorn until Ctrl-C.

    Args:
        predictor: the model.
        host: address to bind; the default, 127.0.0.1, takes connections from this machine only.
        port: TCP port.
        max_bytes: largest request body.
        workers: model runs at a time (default `gapnet.serve.app.WORKERS`).
    """
    options: dict[str, Any] = {"max_bytes": max_bytes}
    if workers is not None:
        options["workers"] = workers
    app = create_app(predictor, **options)
    uvicorn = _uvicorn()
    print(f"gapnet serve: {predictor.source} on {_url(host, port)}/ (API docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def serving(app: Any, host: str = HOST, port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app (`create_app`'s) from a background thread while the block runs.

    For scripts, notebooks and tests: yields the base URL (``http://127.0.0.1:PORT``); on
    leaving the block the server finishes its requests and stops.

    Args:
        app: the app.
        host: address to bind.
        port: TCP port; 0 picks a free one.
        timeout: seconds to wait for the server to start.
    """
    uvicorn = _uvicorn()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"gapnet serve: the server on {host} did not start")
        time.sleep(0.02)
    try:
        yield _url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
