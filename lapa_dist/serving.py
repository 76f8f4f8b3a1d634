"""HTTP serving of an action policy, in the request/response shape of OpenVLA's ``POST /act`` server.

    python launch/serve.py --policy DIR [--host 127.0.0.1] [--port 8000] [--max-request-bytes N]

Endpoints
- ``POST /act`` with a JSON object ``{"image": IMAGE, "instruction": "close the drawer"}`` returns the action,
  float32 [action_dim], json_numpy-encoded: ``{"__numpy__": base64 of the little-endian bytes, "dtype": "<f4",
  "shape": [action_dim]}`` (a client that ran ``json_numpy.patch()`` reads it as an ndarray). Optional fields:
  ``"action_format": "list"`` returns a plain JSON list instead; ``"unnorm_key"`` exists for OpenVLA clients and
  must be null or absent (a policy here has the one action normalisation of its training data; a dataset key it
  cannot honour is refused rather than ignored). Any other field is refused, so a misspelt field cannot pass
  unnoticed.
- ``{"encoded": "<the request object above as a JSON string>"}`` is OpenVLA's form for clients without json_numpy;
  the response is then a JSON string holding the encoded action.
- ``GET /health`` returns ``{"status": "ok", "metadata": policy.metadata, "requests": counts, "limits": ...}``.

IMAGE, told apart by its JSON type (one image per request, never a path on the server):
- object: a json_numpy array ``{"__numpy__", "dtype", "shape"}`` (what OpenVLA clients send);
- array: a nested list [H][W][3] of integers;
- string: base64 of a PNG or JPEG file (an optional ``data:image/...;base64,`` prefix is allowed).
Arrays must be [H, W, 3] or [H, W, 4] (alpha dropped, not composited) of an integer dtype with values in
[0, 255]; float images are refused rather than guessed at (is 1.0 white or nearly black?). Files are decoded by
Pillow with PNG and JPEG decoders only; 8-bit modes (RGB, RGBA, L, LA, P, 1, CMYK, ...) are converted to RGB
(alpha dropped), 16-bit and float modes refused. H x W is capped at ``max_image_pixels`` before a file is
decoded, so a small compressed file cannot expand into a huge image.

Errors are ``{"error": "..."}`` naming what is wrong: 400 body not JSON, not an object, or a field missing,
unknown or of the wrong JSON type; 413 body over ``max_request_bytes`` (the declared Content-Length is checked
before any of the body is read; a chunked body is counted as it arrives and refused at the first byte over);
422 an image or instruction that cannot be used; 500 the policy raised or returned no usable action (not finite,
wrong shape); 404 / 405 unknown path or method. The server keeps serving after each.

Concurrency: Starlette (FastAPI's core, installed with it; its request parsing is not used because the body is
read and checked here) on uvicorn, one process and one event loop. The body is read on the loop; JSON parsing and
image decoding run in the worker thread pool, in parallel across requests; ``policy.predict`` runs under one lock,
one request at a time, so a policy needs no thread safety and one model on one device never runs two forward
passes at once. Not micro-batching: images of different sizes cannot share a batch, and one failing request
would fail its batch-mates.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # a 1024 x 1024 RGB image as a nested JSON list is about 12 MiB
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
REQUIRED_FIELDS = ("image", "instruction")
OPTIONAL_FIELDS = ("unnorm_key", "action_format")
ACTION_FORMATS = ("json_numpy", "list")
IMAGE_FILE_FORMATS = ("PNG", "JPEG")
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integer, float
DATA_URL_PREFIX = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")
JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class RequestError(Exception):
    """A request the server refuses: the HTTP ``status`` and a message naming what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class PolicyOutputError(RuntimeError):
    """The policy returned something that is not one finite action per image."""


@runtime_checkable
class ServablePolicy(Protocol):
    """What the server drives: ``lapa_dist.policy.Policy`` or anything with the same two members."""

    metadata: dict  # JSON-serialisable; shown by GET /health ("action_dim", when present, is enforced)

    def predict(self, images: np.ndarray, instructions: list[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] (any H, W) + B instructions -> float actions [B, action_dim]."""
        ...


# --- json_numpy wire format: {"__numpy__": base64 of the raw bytes, "dtype": numpy dtype string, "shape": [...]}


def encode_json_numpy(array: np.ndarray) -> dict:
    """A numeric array as a json_numpy object (what ``json_numpy.dumps`` writes for it)."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in NUMERIC_KINDS:
        raise TypeError(f"only numeric arrays are encoded; got dtype {array.dtype}")
    return {"__numpy__": base64.b64encode(array.tobytes()).decode("ascii"), "dtype": array.dtype.str,
            "shape": list(array.shape)}


def decode_json_numpy(obj: dict) -> np.ndarray:
    """The numeric array a json_numpy object holds (a writable copy); ValueError naming what is wrong."""
    if set(obj) != {"__numpy__", "dtype", "shape"}:
        raise ValueError(f"a json_numpy array has exactly the keys __numpy__, dtype, shape; got {sorted(obj)}")
    data, dtype_text, shape = obj["__numpy__"], obj["dtype"], obj["shape"]
    if not isinstance(data, str) or not isinstance(dtype_text, str):
        raise ValueError("json_numpy __numpy__ and dtype must be strings")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"json_numpy shape must be a list of non-negative integers; got {shape!r}")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError) as error:
        raise ValueError(f"json_numpy dtype {dtype_text!r} is not a numpy dtype") from error
    if dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"json_numpy dtype {dtype_text!r} is not numeric")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as error:
        raise ValueError(f"json_numpy __numpy__ is not valid base64: {error}") from error
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"json_numpy data has {len(raw)} bytes; shape {shape} of {dtype_text} needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


# --- request parsing


@dataclass(frozen=True)
class ActRequest:
    image: np.ndarray  # uint8 [H, W, 3]
    instruction: str
    action_format: str = "json_numpy"
    double_encoded: bool = False  # OpenVLA's {"encoded": "..."} form: the response is encoded the same way


def json_type(value: Any) -> str:
    return "null" if value is None else JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"{what} is not valid JSON: {error}") from error


def parse_act_request(body: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ActRequest:
    """A ``POST /act`` body -> the image, instruction and response format; RequestError when unusable."""
    payload = parse_json(body, "request body")
    double_encoded = isinstance(payload, dict) and "encoded" in payload
    if double_encoded:
        payload = unwrap_encoded(payload)
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body must be a JSON object, got {json_type(payload)}")
    check_fields(payload)
    action_format = payload.get("action_format", "json_numpy")
    if action_format not in ACTION_FORMATS:
        raise RequestError(400, f"action_format must be one of {list(ACTION_FORMATS)}; got {action_format!r}")
    if payload.get("unnorm_key") is not None:
        raise RequestError(400, f"unnorm_key {payload['unnorm_key']!r}: this policy has the one action "
                                "normalisation of its training data; send null or leave the field out")
    instruction = check_instruction(payload["instruction"])
    image = decode_image(payload["image"], max_image_pixels)
    return ActRequest(image, instruction, action_format, double_encoded)


def unwrap_encoded(payload: dict) -> Any:
    if len(payload) != 1:
        raise RequestError(400, f"an 'encoded' request has no other fields; got {sorted(payload)}")
    if not isinstance(payload["encoded"], str):
        raise RequestError(400, f"'encoded' must be a string holding the request as JSON; got "
                                f"{json_type(payload['encoded'])}")
    return parse_json(payload["encoded"], "the 'encoded' string")


def check_fields(payload: dict) -> None:
    missing = [name for name in REQUIRED_FIELDS if name not in payload]
    if missing:
        raise RequestError(400, f"missing field(s) {missing}; a request needs {list(REQUIRED_FIELDS)}")
    unknown = sorted(set(payload) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; accepted: {[*REQUIRED_FIELDS, *OPTIONAL_FIELDS]}")


def check_instruction(instruction: Any) -> str:
    if not isinstance(instruction, str):
        raise RequestError(400, f"instruction must be a string, got {json_type(instruction)}")
    if not instruction.strip():
        raise RequestError(422, "instruction is empty")
    return instruction


def decode_image(value: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A request's ``image`` (json_numpy object, nested list or base64 PNG/JPEG string) -> uint8 [H, W, 3]."""
    if isinstance(value, str):
        return image_from_file_bytes(value, max_pixels)
    if isinstance(value, dict):
        try:
            array = decode_json_numpy(value)
        except ValueError as error:
            raise RequestError(422, f"image: {error}") from error
    elif isinstance(value, list):
        try:
            array = np.asarray(value)
        except (ValueError, OverflowError) as error:
            raise RequestError(422, f"image list is not a regular [H][W][3] nesting: {error}") from error
    else:
        raise RequestError(400, "image must be a json_numpy object, a nested [H][W][3] list or a base64 PNG/JPEG "
                                f"string; got {json_type(value)}")
    return image_from_array(array, max_pixels)


def check_image_size(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise RequestError(422, f"image is empty ({height} x {width})")
    if height * width > max_pixels:
        raise RequestError(422, f"image of {height} x {width} pixels exceeds the limit of {max_pixels} pixels")


def image_from_array(array: np.ndarray, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An [H, W, 3 or 4] integer array with values in [0, 255] -> uint8 [H, W, 3] (alpha dropped)."""
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise RequestError(422, f"image must have shape [H, W, 3] (or [H, W, 4], alpha dropped); got "
                                f"{list(array.shape)}")
    check_image_size(array.shape[0], array.shape[1], max_pixels)
    if array.dtype.kind not in "iu":
        raise RequestError(422, f"image dtype {array.dtype} is not an integer type: send pixel values 0..255 "
                                "(uint8 for json_numpy); float images are not rescaled by guesswork")
    if array.dtype != np.uint8:
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise RequestError(422, f"image values must lie in [0, 255]; got [{low}, {high}]")
    return np.ascontiguousarray(array[..., :3], dtype=np.uint8)


def image_from_file_bytes(text: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Base64 of a PNG or JPEG file -> uint8 [H, W, 3]; the size is checked before the pixels are decoded."""
    prefix = DATA_URL_PREFIX.match(text)
    try:
        raw = base64.b64decode(text[prefix.end():] if prefix else text, validate=True)
    except ValueError as error:  # binascii.Error, or non-ASCII characters
        raise RequestError(422, f"image string is not base64 (expected base64 PNG/JPEG bytes): {error}") from error
    if not raw:
        raise RequestError(422, "image string decodes to no bytes")
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FILE_FORMATS) as image:
            check_image_size(image.height, image.width, max_pixels)
            if image.mode.startswith("I") or image.mode == "F":
                raise RequestError(422, f"image file has {image.mode} pixels; send an 8-bit PNG or JPEG")
            return np.array(image.convert("RGB"))
    except RequestError:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        message = f"image bytes are not a decodable PNG or JPEG: {type(error).__name__}: {error}"
        raise RequestError(422, message) from error


# --- the policy call


class PolicyRunner:
    """Calls the policy for one image at a time, under a lock, and checks that it returned one finite action."""

    def __init__(self, policy: ServablePolicy):
        if not isinstance(policy, ServablePolicy):
            raise TypeError(f"{type(policy).__name__} has no predict(images, instructions) and metadata")
        try:
            self.metadata = json.loads(json.dumps(policy.metadata))
        except (TypeError, ValueError) as error:
            raise TypeError(f"policy metadata must be JSON-serialisable: {error}") from error
        action_dim = self.metadata.get("action_dim") if isinstance(self.metadata, dict) else None
        self.action_dim = action_dim if isinstance(action_dim, int) else None
        self.policy = policy
        self._lock = threading.Lock()

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """uint8 [H, W, 3] + instruction -> float32 [action_dim]."""
        with self._lock:
            actions = self.policy.predict(image[None], [instruction])
        return self.check(actions)

    def check(self, actions: Any) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.dtype.kind not in NUMERIC_KINDS or actions.ndim != 2 or actions.shape[0] != 1:
            raise PolicyOutputError(f"policy returned {actions.dtype} {list(actions.shape)} for one image; "
                                    "expected numbers of shape [1, action_dim]")
        if self.action_dim is not None and actions.shape[1] != self.action_dim:
            raise PolicyOutputError(f"policy returned {actions.shape[1]} action dimensions; its metadata says "
                                    f"action_dim {self.action_dim}")
        action = actions[0].astype(np.float32)
        if action.size == 0 or not np.isfinite(action).all():
            raise PolicyOutputError(f"policy returned an empty or non-finite action {action.tolist()}")
        return action


def format_action(action: np.ndarray, action_format: str = "json_numpy", double_encoded: bool = False) -> Any:
    """The response body for float32 [action_dim] in the requested format."""
    content = encode_json_numpy(action.astype("<f4")) if action_format == "json_numpy" else action.tolist()
    return json.dumps(content) if double_encoded else content


# --- the app and the server


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes "
                                    "(--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(policy: ServablePolicy, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
             max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """The ASGI app serving ``policy``: ``POST /act`` and ``GET /health`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if max_request_bytes < 1 or max_image_pixels < 1:
        raise ValueError(f"max_request_bytes ({max_request_bytes}) and max_image_pixels ({max_image_pixels}) "
                         "must be positive")
    runner = PolicyRunner(policy)
    counts = {"served": 0, "rejected": 0, "failed": 0}  # touched only on the event loop
    limits = {"max_request_bytes": max_request_bytes, "max_image_pixels": max_image_pixels}
    started = time.monotonic()

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def act(request):
        try:
            body = await read_body(request, max_request_bytes)
            parsed = await run_in_threadpool(parse_act_request, body, max_image_pixels)
        except RequestError as refused:
            counts["rejected"] += 1
            return error(refused.status, refused.message)
        try:
            action = await run_in_threadpool(runner.act, parsed.image, parsed.instruction)
        except Exception as failure:
            logger.exception("policy failed on a %s image", list(parsed.image.shape))
            counts["failed"] += 1
            return error(500, f"policy failed: {type(failure).__name__}: {failure}")
        counts["served"] += 1
        return JSONResponse(format_action(action, parsed.action_format, parsed.double_encoded))

    async def health(request):
        return JSONResponse({"status": "ok", "metadata": runner.metadata, "requests": dict(counts),
                             "limits": limits, "uptime_s": round(time.monotonic() - started, 3)})

    async def http_error(request, exc):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)

    async def internal_error(request, exc):  # a bug here, not in the request (Starlette then logs it)
        return error(500, f"internal server error: {type(exc).__name__}: {exc}")

    routes = [Route("/act", act, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})


def uvicorn_server(app, host: str, port: int, log_level: str = "info", configure_logging: bool = True):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=configure_logging,
                            log_config=uvicorn.config.LOGGING_CONFIG if configure_logging else None)
    return uvicorn.Server(config)


def serve(policy: ServablePolicy, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
          log_level: str = "info") -> None:
    """Serve ``policy`` on host:port until interrupted (Ctrl-C / SIGTERM)."""
    app = make_app(policy, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels)
    uvicorn_server(app, host, port, log_level).run()


class RunningServer:
    """A server on a background thread; ``close()`` (or leaving the ``with`` block) stops it."""

    def __init__(self, server, thread: threading.Thread, host: str, port: int):
        self._server, self._thread = server, thread
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def start_server(policy: ServablePolicy, host: str = DEFAULT_HOST, port: int = 0, *,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 startup_timeout: float = 10.0) -> RunningServer:
    """Serve ``policy`` from a background thread of this process (port 0: a free port; see ``.url``).
    For tests and in-process clients; it leaves the logging configuration alone."""
    app = make_app(policy, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn_server(app, host, port, log_level="warning", configure_logging=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lapa-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout} s")
        time.sleep(0.01)
    return RunningServer(server, thread, host, port)
