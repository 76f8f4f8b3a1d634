"""The policy server (lapa_dist/serving.py) over real HTTP: request encodings, errors, limits, concurrency."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lapa_dist import serving
from lapa_dist.serving import decode_json_numpy, encode_json_numpy, make_app, start_server
from launch import serve as serve_cli
from tools import act_client

ROOT = Path(__file__).resolve().parent.parent
MAX_REQUEST_BYTES = 256 * 1024
MAX_IMAGE_PIXELS = 64 * 64


class MeanPolicy:
    """Deterministic test policy: action = per-channel image mean (3 values) and the instruction's length.
    Instruction "raise" raises, "nan" returns a non-finite action. It records how many calls overlapped."""

    # A test double for the server's contract (exact expected values, injected failures, overlap counting);
    # test_serves_a_real_policy_directory serves a real lapa_dist.policy.Policy.
    metadata = {"action_dim": 4, "image_size": 8, "instruction_examples": ["close the drawer"],
                "checkpoint": {"name": "mean-policy", "step": 0}}

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.active = self.max_active = self.calls = 0
        self._guard = threading.Lock()

    def predict(self, images: np.ndarray, instructions: list[str]) -> np.ndarray:
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, (images.dtype, images.shape)
        assert len(instructions) == len(images)
        with self._guard:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if instructions[0] == "raise":
                raise RuntimeError("boom")
            if instructions[0] == "nan":
                return np.full((len(images), 4), np.nan, dtype=np.float32)
            return expected_actions(images, instructions)
        finally:
            with self._guard:
                self.active -= 1


def expected_actions(images: np.ndarray, instructions: list[str]) -> np.ndarray:
    means = images.reshape(len(images), -1, 3).mean(axis=1)
    lengths = np.array([[len(text)] for text in instructions], dtype=np.float64)
    return np.concatenate([means, lengths], axis=1).astype(np.float32)


def expected_action(image: np.ndarray, instruction: str) -> np.ndarray:
    return expected_actions(image[None], [instruction])[0]


@pytest.fixture(scope="module")
def policy():
    return MeanPolicy(delay=0.005)


@pytest.fixture(scope="module")
def server(policy):
    with start_server(policy, max_request_bytes=MAX_REQUEST_BYTES, max_image_pixels=MAX_IMAGE_PIXELS) as running:
        yield running


def image_of(seed: int, height: int = 8, width: int = 8, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def file_bytes(image: np.ndarray, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(server, body, path: str = "/act", method: str = "POST") -> tuple[int, object]:
    """Status and decoded JSON body; ``body`` is raw bytes or an object to JSON-encode."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_serving(server) -> None:
    image = image_of(99)
    status, content = post(server, {"image": encode_json_numpy(image), "instruction": "still there?"})
    assert status == 200, content
    np.testing.assert_array_equal(decode_json_numpy(content), expected_action(image, "still there?"))


def raw_exchange(server, request: bytes) -> tuple[int, dict]:
    """Send raw bytes in one go and read the response (for requests urllib will not make)."""
    import http.client

    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


# --- valid requests


def test_json_numpy_image_openvla_shape(server):
    image = image_of(0, 12, 10)
    # What json_numpy.dumps writes for a uint8 array (dtype descr "|u1"), built by hand, not by our encoder.
    encoded = {"__numpy__": b64(image.tobytes()), "dtype": "|u1", "shape": [12, 10, 3]}
    status, content = post(server, {"image": encoded, "instruction": "close the drawer", "unnorm_key": None})
    assert status == 200, content
    assert set(content) == {"__numpy__", "dtype", "shape"} and content["dtype"] == "<f4" and content["shape"] == [4]
    action = np.frombuffer(base64.b64decode(content["__numpy__"]), dtype="<f4")
    np.testing.assert_array_equal(action, expected_action(image, "close the drawer"))


def test_nested_list_image_and_list_response(server):
    image = image_of(1)
    status, content = post(server, {"image": image.tolist(), "instruction": "open", "action_format": "list"})
    assert status == 200, content
    assert isinstance(content, list) and len(content) == 4
    np.testing.assert_array_equal(np.asarray(content, dtype=np.float32), expected_action(image, "open"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_base64_file_image(server, fmt):
    image = image_of(2, 16, 12)
    data = file_bytes(image, fmt)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # JPEG is lossy: compare to its decoding
    for value in (b64(data), f"data:image/{fmt.lower()};base64,{b64(data)}"):
        status, content = post(server, {"image": value, "instruction": "push"})
        assert status == 200, content
        np.testing.assert_array_equal(decode_json_numpy(content), expected_action(decoded, "push"))


def test_alpha_dropped_and_grayscale_expanded(server):
    rgba = image_of(3, channels=4)
    for value in (encode_json_numpy(rgba), b64(file_bytes(rgba, "PNG"))):
        status, content = post(server, {"image": value, "instruction": "pick"})
        assert status == 200, content
        np.testing.assert_array_equal(decode_json_numpy(content), expected_action(rgba[..., :3], "pick"))
    gray = image_of(4)[..., 0]
    status, content = post(server, {"image": b64(file_bytes(gray, "PNG")), "instruction": "pick"})
    assert status == 200, content
    np.testing.assert_array_equal(decode_json_numpy(content), expected_action(np.stack([gray] * 3, -1), "pick"))


def test_wider_integer_dtypes_within_range(server):
    image = image_of(5).astype(np.int64)
    status, content = post(server, {"image": encode_json_numpy(image), "instruction": "slide"})
    assert status == 200, content
    np.testing.assert_array_equal(decode_json_numpy(content), expected_action(image.astype(np.uint8), "slide"))


def test_openvla_double_encoded_form(server):
    image = image_of(6)
    inner = json.dumps({"image": encode_json_numpy(image), "instruction": "reach"})
    status, content = post(server, {"encoded": inner})
    assert status == 200, content
    assert isinstance(content, str)
    np.testing.assert_array_equal(decode_json_numpy(json.loads(content)), expected_action(image, "reach"))


def test_health(server, policy):
    status, content = post(server, None, path="/health", method="GET")
    assert status == 200
    assert content["status"] == "ok"
    assert content["metadata"] == MeanPolicy.metadata
    assert content["limits"] == {"max_request_bytes": MAX_REQUEST_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS}
    assert content["requests"]["served"] <= policy.calls


# --- malformed requests: 4xx with a JSON error naming the problem, and the server keeps serving

GOOD = encode_json_numpy(image_of(7))


def png_16bit() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buffer, format="PNG")
    return b64(buffer.getvalue())


MALFORMED = {
    "not json": (b"{not json", 400, "not valid JSON"),
    "not utf-8": (b"\xff\xfe\xfa", 400, "not valid JSON"),
    "deeply nested": (b"[" * 100_000, 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "must be a JSON object, got array"),
    "missing image": ({"instruction": "go"}, 400, "missing field(s) ['image']"),
    "missing instruction": ({"image": GOOD}, 400, "missing field(s) ['instruction']"),
    "unknown field": ({"image": GOOD, "instruction": "go", "camera": "top"}, 400, "unknown field(s) ['camera']"),
    "instruction not a string": ({"image": GOOD, "instruction": 5}, 400, "instruction must be a string"),
    "empty instruction": ({"image": GOOD, "instruction": "  "}, 422, "instruction is empty"),
    "unnorm_key": ({"image": GOOD, "instruction": "go", "unnorm_key": "bridge_orig"}, 400, "unnorm_key"),
    "action_format": ({"image": GOOD, "instruction": "go", "action_format": "xml"}, 400, "action_format"),
    "image null": ({"image": None, "instruction": "go"}, 400, "got null"),
    "image 2-D": ({"image": encode_json_numpy(image_of(0)[..., 0]), "instruction": "go"}, 422, "[8, 8]"),
    "image batched": ({"image": encode_json_numpy(image_of(0)[None]), "instruction": "go"}, 422, "[1, 8, 8, 3]"),
    "image 2 channels": ({"image": encode_json_numpy(image_of(0)[..., :2]), "instruction": "go"}, 422, "[8, 8, 2]"),
    "image empty": ({"image": encode_json_numpy(np.zeros((0, 8, 3), np.uint8)), "instruction": "go"}, 422, "empty"),
    "image float": ({"image": encode_json_numpy(np.zeros((8, 8, 3), np.float32)), "instruction": "go"}, 422,
                    "dtype float32"),
    "list of floats": ({"image": (np.zeros((8, 8, 3)) + 0.5).tolist(), "instruction": "go"}, 422, "dtype float64"),
    "list out of range": ({"image": np.full((8, 8, 3), 300).tolist(), "instruction": "go"}, 422, "[0, 255]"),
    "ragged list": ({"image": [[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]], "instruction": "go"}, 422, "regular"),
    "json_numpy byte count": ({"image": {**GOOD, "shape": [8, 8, 4]}, "instruction": "go"}, 422, "needs 256"),
    "json_numpy object dtype": ({"image": {**GOOD, "dtype": "|O"}, "instruction": "go"}, 422, "not numeric"),
    "json_numpy bad dtype": ({"image": {**GOOD, "dtype": "nonsense"}, "instruction": "go"}, 422, "not a numpy dtype"),
    "json_numpy missing key": ({"image": {"__numpy__": GOOD["__numpy__"]}, "instruction": "go"}, 422, "keys"),
    "json_numpy bad base64": ({"image": {**GOOD, "__numpy__": "%%%"}, "instruction": "go"}, 422, "base64"),
    "image not base64": ({"image": "not base64!!", "instruction": "go"}, 422, "not base64"),
    "image not a file": ({"image": b64(b"hello world"), "instruction": "go"}, 422, "not a decodable PNG or JPEG"),
    "truncated png": ({"image": b64(file_bytes(image_of(0), "PNG")[:60]), "instruction": "go"}, 422,
                      "not a decodable PNG or JPEG"),
    "gif": ({"image": b64(file_bytes(image_of(0), "GIF")), "instruction": "go"}, 422, "not a decodable PNG or JPEG"),
    "16-bit png": ({"image": png_16bit(), "instruction": "go"}, 422, "8-bit"),
    "too many pixels": ({"image": b64(file_bytes(image_of(0, 65, 64), "PNG")), "instruction": "go"}, 422,
                        "65 x 64 pixels exceeds the limit of 4096"),
    "encoded not a string": ({"encoded": {"image": GOOD}}, 400, "'encoded' must be a string"),
    "encoded with fields": ({"encoded": "{}", "instruction": "go"}, 400, "no other fields"),
    "encoded not json": ({"encoded": "{oops"}, 400, "'encoded' string is not valid JSON"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request(server, case):
    body, expected_status, expected_text = MALFORMED[case]
    status, content = post(server, body)
    assert status == expected_status, content
    assert set(content) == {"error"} and expected_text in content["error"], content
    assert_serving(server)


def test_unknown_path_and_method(server):
    status, content = post(server, None, path="/nope", method="GET")
    assert status == 404 and "error" in content
    status, content = post(server, None, path="/act", method="GET")
    assert status == 405 and "GET /act" in content["error"]


def test_oversized_declared_body_refused_before_it_is_sent(server):
    # Headers only: the server must answer from Content-Length alone, without waiting for the body.
    head = f"POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {MAX_REQUEST_BYTES + 1}"
    status, content = raw_exchange(server, f"{head}\r\n\r\n".encode())
    assert status == 413 and f"limit of {MAX_REQUEST_BYTES} bytes" in content["error"]
    assert_serving(server)


def test_oversized_chunked_body_refused(server):
    chunk = b"x" * (MAX_REQUEST_BYTES // 2 + 1)
    body = b"".join(b"%X\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
    head = b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, content = raw_exchange(server, head + body)
    assert status == 413 and "exceeds the limit" in content["error"]
    assert_serving(server)


def test_body_just_under_the_limit_is_read(server):
    image = image_of(8)
    body = json.dumps({"image": encode_json_numpy(image), "instruction": "go"}).encode()
    padded = body[:-1] + b" " * (MAX_REQUEST_BYTES - len(body)) + b"}"  # exactly the limit: still accepted
    status, content = post(server, padded)
    assert status == 200, content
    np.testing.assert_array_equal(decode_json_numpy(content), expected_action(image, "go"))


# --- policy failures and concurrency


def test_policy_exception_gives_500_and_server_keeps_serving(server):
    status, content = post(server, {"image": GOOD, "instruction": "raise"})
    assert status == 500 and "RuntimeError: boom" in content["error"]
    status, content = post(server, {"image": GOOD, "instruction": "nan"})
    assert status == 500 and "non-finite" in content["error"]
    assert_serving(server)
    _, health = post(server, None, path="/health", method="GET")
    assert health["requests"]["failed"] >= 2


def test_unexpected_server_error_is_a_json_500(server, monkeypatch):
    def broken_parser(body, max_image_pixels):
        raise KeyError("a bug")

    monkeypatch.setattr(serving, "parse_act_request", broken_parser)
    status, content = post(server, {"image": GOOD, "instruction": "go"})
    assert status == 500 and "KeyError" in content["error"]
    monkeypatch.undo()
    assert_serving(server)


def test_concurrent_requests_each_get_their_own_answer(server, policy):
    def one(index: int) -> tuple[np.ndarray, np.ndarray]:
        image = np.full((8 + index, 8, 3), [index, 2 * index, 255 - index], dtype=np.uint8)
        instruction = "x" * (index + 1)
        return act_client.act(server.url, image, instruction), expected_action(image, instruction)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for got, want in results:
        np.testing.assert_array_equal(got, want)
    assert policy.max_active == 1  # predict is called under the lock, one request at a time


# --- the client, the CLI and construction checks


@pytest.mark.parametrize("encoding", ["json_numpy", "list", "png"])
def test_client_array_encodings(server, encoding):
    image = image_of(9, 10, 6)
    action = act_client.act(server.url, image, "turn the knob", encoding=encoding)
    assert action.dtype == np.float32 and action.shape == (4,)
    np.testing.assert_array_equal(action, expected_action(image, "turn the knob"))


def test_client_file_and_errors(server, tmp_path, capsys):
    image = image_of(10)
    path = tmp_path / "frame.png"
    path.write_bytes(file_bytes(image, "PNG"))
    np.testing.assert_array_equal(act_client.act(server.url, path, "go"), expected_action(image, "go"))
    with pytest.raises(act_client.ActError) as refused:
        act_client.act(server.url, image.astype(np.float32), "go")
    assert refused.value.status == 422 and "dtype float32" in refused.value.message
    assert act_client.health(server.url)["metadata"]["action_dim"] == 4

    assert act_client.main(["--url", server.url, "--image", str(path), "--instruction", "go"]) == 0
    np.testing.assert_array_equal(json.loads(capsys.readouterr().out), expected_action(image, "go"))
    assert act_client.main(["--url", server.url, "--random", "8x8", "--instruction", "go", "--encoding", "list"]) == 0
    random = act_client.random_image("8x8", 0)
    np.testing.assert_array_equal(json.loads(capsys.readouterr().out), expected_action(random, "go"))
    assert act_client.main(["--url", server.url, "--random", "8x8", "--instruction", "raise"]) == 1
    assert "HTTP 500" in capsys.readouterr().err


def test_client_reads_the_413_of_a_large_image(server):
    # ~6 MB of JSON: the server answers from Content-Length and closes while the client is still sending.
    with pytest.raises(act_client.ActError) as refused:
        act_client.act(server.url, np.zeros((1500, 1000, 3), np.uint8), "go")
    assert refused.value.status == 413 and "exceeds the limit" in refused.value.message
    assert_serving(server)


def test_serve_in_a_subprocess_until_sigterm():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("from tests.test_serve import MeanPolicy; from lapa_dist.serving import serve; "
            f"serve(MeanPolicy(), port={port}, log_level='info')")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert act_client.health(f"http://127.0.0.1:{port}")["status"] == "ok"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.05)
        image = image_of(11)
        np.testing.assert_array_equal(act_client.act(f"http://127.0.0.1:{port}", image, "go"),
                                      expected_action(image, "go"))
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM.
        assert process.wait(timeout=10) == -signal.SIGTERM
    assert "Finished server process" in process.stderr.read()


def test_json_numpy_round_trip():
    for dtype in (np.uint8, np.int16, np.float32, np.float64, np.bool_):
        array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
        decoded = decode_json_numpy(json.loads(json.dumps(encode_json_numpy(array))))
        assert decoded.dtype == array.dtype and decoded.flags.writeable
        np.testing.assert_array_equal(decoded, array)
    with pytest.raises(TypeError):
        encode_json_numpy(np.array(["a"]))


def test_make_app_rejects_what_it_cannot_serve():
    with pytest.raises(TypeError, match="predict"):
        make_app(object())
    bad = MeanPolicy()
    bad.metadata = {"action_dim": np.int64(4)}
    with pytest.raises(TypeError, match="JSON-serialisable"):
        make_app(bad)
    with pytest.raises(ValueError, match="positive"):
        make_app(MeanPolicy(), max_request_bytes=0)


def test_launch_serve_refuses_missing_policy_directory(tmp_path, capsys):
    assert serve_cli.main(["--policy", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serves_a_real_policy_directory(tmp_path):
    from lapa_dist.policy import Policy
    from tests.vla_helpers import tiny_metaworld_policy

    policy = Policy.from_pretrained(tiny_metaworld_policy(tmp_path), device="cpu")
    images = [image_of(seed, 64, 64) for seed in range(3)]
    expected = policy.predict(np.stack(images), ["reach the goal"] * 3)  # [3, 4]
    with start_server(policy) as running:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda image: act_client.act(running.url, image, "reach the goal"), images))
        health = act_client.health(running.url)
    assert all(answer.shape == (4,) for answer in answers)
    np.testing.assert_array_equal(np.stack(answers), expected)
    assert health["metadata"]["action_dim"] == 4 and health["metadata"]["head"] == "action"
