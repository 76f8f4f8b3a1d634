"""Send one image and an instruction to a running policy server (launch/serve.py) and print the action.

    python tools/act_client.py --url http://127.0.0.1:8000 --image frame.png --instruction "close the drawer"
    python tools/act_client.py --random 64x64 --instruction "close the drawer" [--encoding list] [--seed 0]
    python tools/act_client.py --health

As a library: ``act(url, image, instruction) -> float32 [action_dim]``, where image is a PNG/JPEG file path (its
bytes are sent base64-encoded, unchanged) or a uint8 [H, W, 3] array (sent json_numpy-encoded, or with
``encoding="list"`` / ``"png"`` as a nested list / base64 PNG). A refused request raises ActError with the
server's status and message.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lapa_dist.serving import decode_json_numpy, encode_json_numpy

DEFAULT_URL = "http://127.0.0.1:8000"
ENCODINGS = ("json_numpy", "list", "png")


class ActError(RuntimeError):
    """The server refused or failed a request: HTTP ``status`` and its ``{"error": ...}`` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def encode_image(image: str | Path | np.ndarray, encoding: str = "json_numpy") -> Any:
    """The request's ``image`` value: a file's bytes as base64, or an array in ``encoding``."""
    if isinstance(image, (str, Path)):
        return base64.b64encode(Path(image).read_bytes()).decode("ascii")
    array = np.asarray(image)
    if encoding == "json_numpy":
        return encode_json_numpy(array)
    if encoding == "list":
        return array.tolist()
    if encoding == "png":
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise ValueError(f"encoding {encoding!r}: expected one of {list(ENCODINGS)}")


def request_json(url: str, payload: dict | None = None, timeout: float = 30.0) -> Any:
    """GET (no payload) or POST a JSON payload; the decoded JSON response, or ActError.

    The response is read even when sending failed half-way: a server refusing an oversized body (413) answers
    and closes before taking all of it, and its answer is still waiting in the socket."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {url!r}: expected http://HOST:PORT/...")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    body = None if payload is None else json.dumps(payload).encode()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        try:
            connection.request("GET" if body is None else "POST", target, body=body,
                               headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status >= 400:
        try:
            message = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            message = data.decode(errors="replace")
        raise ActError(response.status, message)
    return json.loads(data)


def decode_action(content: Any) -> np.ndarray:
    """A /act response (json_numpy object or plain list) -> float32 [action_dim]."""
    array = decode_json_numpy(content) if isinstance(content, dict) else np.asarray(content)
    return array.astype(np.float32)


def act(url: str, image: str | Path | np.ndarray, instruction: str, *, encoding: str = "json_numpy",
        timeout: float = 30.0) -> np.ndarray:
    """The action the server at ``url`` (e.g. http://127.0.0.1:8000) returns for one image and instruction."""
    payload = {"image": encode_image(image, encoding), "instruction": instruction}
    return decode_action(request_json(url.rstrip("/") + "/act", payload, timeout))


def health(url: str, timeout: float = 10.0) -> dict:
    return request_json(url.rstrip("/") + "/health", timeout=timeout)


def random_image(size: str, seed: int) -> np.ndarray:
    try:
        height, width = (int(n) for n in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--random {size!r}: expected HxW, e.g. 64x64") from None
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="PNG or JPEG file")
    source.add_argument("--random", metavar="HxW", help="a random uint8 image of this size")
    source.add_argument("--health", action="store_true", help="print GET /health and exit")
    parser.add_argument("--instruction", default="", help="required with --image / --random")
    parser.add_argument("--encoding", default="json_numpy", choices=ENCODINGS, help="how --random is sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        if args.health:
            print(json.dumps(health(args.url, args.timeout), indent=1))
            return 0
        if not args.instruction.strip():
            parser.error("--instruction is required with --image / --random")
        image = args.image if args.image else random_image(args.random, args.seed)
        action = act(args.url, image, args.instruction, encoding=args.encoding, timeout=args.timeout)
    except (ActError, ValueError, OSError) as error:  # URLError and file errors are OSErrors
        print(f"act_client: {error}", file=sys.stderr)
        return 1
    print(json.dumps(action.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
