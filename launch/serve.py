"""Serve a trained policy over HTTP: POST /act (image + instruction -> action), GET /health.

    python launch/serve.py --policy DIR [--host 127.0.0.1] [--port 8000] [--device cuda:0] \\
        [--max-request-bytes 16777216] [--max-image-pixels 16777216]

Requests and responses follow OpenVLA's server (JSON with a json_numpy image and an instruction; the action back
json_numpy-encoded); base64 PNG/JPEG and nested lists are accepted too. See lapa_dist/serving.py for the API.
The server has no authentication: it binds 127.0.0.1 unless --host says otherwise.
"""

import argparse
import sys
from pathlib import Path

from lapa_dist.serving import DEFAULT_HOST, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, serve

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="exported policy directory (Policy.from_pretrained)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", help="torch device for the policy (default: the policy's choice)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 before they are read")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images (H x W) get 422 before they are decoded")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.policy).is_dir():
        print(f"serve: policy directory {args.policy} does not exist", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535 or args.max_request_bytes < 1 or args.max_image_pixels < 1:
        print("serve: --port must lie in [0, 65535]; --max-request-bytes and --max-image-pixels must be positive",
              file=sys.stderr)
        return 2
    from lapa_dist.policy import Policy  # lazily: loading torch and the model only once the arguments are sound

    try:
        policy = Policy.from_pretrained(args.policy, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        print(f"serve: {error}", file=sys.stderr)
        return 2
    if policy.metadata.get("head") == "latent":
        print(f"serve: {args.policy} has a latent-action head (pretrained); /act serves a finetuned policy's actions",
              file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_HOSTS:
        print(f"serve: binding {args.host}: anyone who can reach this port can drive the policy", file=sys.stderr)
    serve(policy, args.host, args.port, max_request_bytes=args.max_request_bytes,
          max_image_pixels=args.max_image_pixels, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
