"""Triton kernels against their references on a GPU: NSVQ and the latent-action cross-attention.

    python tools/bench_kernels.py [--markdown docs/perf.md] [--peak-tbps 3.35]
    python tools/bench_kernels.py --dry-run [--markdown FILE]    # plumbing check on CPU, NOT a benchmark

For each kernel, shape, dtype and mode it times the Triton path and the reference (nsvq_reference, torch
SDPA) with triton.testing.do_bench (median), and prints one JSON line per measurement: both times, the speedup
(reference time / Triton time) and the Triton path's achieved bandwidth against a roofline. Bytes are what the
fused kernels must move: every input read once, every output and saved statistic written once (their small
partial-gradient buffers are not counted); the roofline is --peak-tbps (H100 SXM HBM3: 3.35 TB/s).
"forward" runs as in training (inputs require grad); "forward+backward" adds the backward of a fixed
upstream gradient. With --markdown FILE it appends a table with the device name and date.

Shapes are LAQ's: NSVQ with d = 32, K = 8 and N = 64 x 4 latent-action vectors (and larger N, where the
bandwidth means something); cross-attention with B = 64, heads = 16, Nk = 6 (4 action tokens + 2 null
key/values), dh = 64 and Nq = 64 (8 x 8 patches) and up.

Without a CUDA GPU it exits with a message and measures nothing. --dry-run instead runs tiny shapes on CPU,
timed with perf_counter, to exercise the plumbing (JSON, table): the Triton paths only when TRITON_INTERPRET=1
is set, the references always; every row and table says "dry run".
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch
import triton.testing

from lapa_dist.kernels.cross_attention import (
    cross_attention_reference,
    cross_attention_triton,
    cross_attention_triton_available,
)
from lapa_dist.kernels.nsvq import nsvq_reference, nsvq_triton, nsvq_triton_available

MODES = ("forward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NSVQ_ROWS = (64 * 4, 64 * 64, 64 * 4096)
NSVQ_DIM, NSVQ_CODES, NSVQ_EPS = 32, 8, 1e-12
ATTENTION_QUERIES = (64, 256, 1024, 4096)
ATTENTION_BATCH, ATTENTION_HEADS, ATTENTION_KEYS, ATTENTION_HEAD_DIM = 64, 16, 6, 64


def nsvq_case(rows: int, dtype_name: str, device: str) -> dict:
    """NSVQ inputs [rows, 32], codebook [8, 32] and the bytes each mode moves."""
    dtype, generator = DTYPES[dtype_name], torch.Generator(device).manual_seed(0)
    z = torch.randn(rows, NSVQ_DIM, device=device, generator=generator).to(dtype).requires_grad_()
    codebook = torch.randn(NSVQ_CODES, NSVQ_DIM, device=device, generator=generator).to(dtype).requires_grad_()
    noise = torch.randn(rows, NSVQ_DIM, device=device, generator=generator).to(dtype)
    row_bytes, codebook_bytes = NSVQ_DIM * z.element_size(), NSVQ_CODES * NSVQ_DIM * z.element_size()
    forward_bytes = rows * (3 * row_bytes + 8 + 2 * 4) + codebook_bytes  # z, noise, out; indices; two norms
    backward_bytes = rows * (4 * row_bytes + 8 + 2 * 4) + 2 * codebook_bytes  # grad_out, z, noise, grad_z
    return {
        "kernel": "nsvq", "shape": f"N={rows} d={NSVQ_DIM} K={NSVQ_CODES}", "dtype": dtype_name,
        "inputs": (z, codebook), "grad": torch.randn_like(z),
        "triton": lambda z, codebook: nsvq_triton(z, codebook, noise, NSVQ_EPS)[0],
        "reference": lambda z, codebook: nsvq_reference(z, codebook, noise, NSVQ_EPS)[0],
        "bytes": {"forward": forward_bytes, "forward+backward": forward_bytes + backward_bytes},
    }


def attention_case(batch: int, heads: int, queries: int, keys: int, head_dim: int, dtype_name: str,
                   device: str) -> dict:
    """q [B, H, Nq, dh], k and v [B, H, Nk, dh] and the bytes each mode moves; softmax scale dh^-0.5."""
    dtype, generator = DTYPES[dtype_name], torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, generator=generator).to(dtype).requires_grad_()
               for n in (queries, keys, keys))
    query_bytes, key_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    lse_bytes = batch * heads * queries * 4
    forward_bytes = 2 * query_bytes + 2 * key_bytes + lse_bytes  # q, out; k, v; logsumexp
    backward_bytes = 4 * query_bytes + 4 * key_bytes + lse_bytes  # q, out, grad_out, grad_q; k, v, grad_k, grad_v
    scale = head_dim ** -0.5
    return {
        "kernel": "cross_attention", "shape": f"B={batch} H={heads} Nq={queries} Nk={keys} dh={head_dim}",
        "dtype": dtype_name, "inputs": (q, k, v), "grad": torch.randn_like(q),
        "triton": lambda q, k, v: cross_attention_triton(q, k, v, scale),
        "reference": lambda q, k, v: cross_attention_reference(q, k, v, scale),
        "bytes": {"forward": forward_bytes, "forward+backward": forward_bytes + backward_bytes},
    }


def cases(dry_run: bool) -> list[dict]:
    if dry_run:  # tiny CPU shapes: plumbing only
        return [nsvq_case(37, "fp32", "cpu"),
                attention_case(1, 2, 50, ATTENTION_KEYS, ATTENTION_HEAD_DIM, "fp32", "cpu")]
    return ([nsvq_case(rows, dtype, "cuda") for rows in NSVQ_ROWS for dtype in DTYPES]
            + [attention_case(ATTENTION_BATCH, ATTENTION_HEADS, queries, ATTENTION_KEYS, ATTENTION_HEAD_DIM, dtype,
                              "cuda") for queries in ATTENTION_QUERIES for dtype in DTYPES])


def step(function, inputs: tuple, grad: torch.Tensor, mode: str):
    """The callable to time: a forward, or a forward and the backward of `grad` (gradients reset each call)."""
    def forward():
        function(*inputs)

    def forward_backward():
        for tensor in inputs:
            tensor.grad = None
        function(*inputs).backward(grad)

    return forward if mode == "forward" else forward_backward


def time_ms(callable_, dry_run: bool) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU; in a dry run, perf_counter over three CPU calls."""
    if not dry_run:
        return triton.testing.do_bench(callable_, return_mode="median")
    callable_()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        callable_()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(case: dict, mode: str, dry_run: bool, peak_tbps: float) -> dict:
    """One JSON row: Triton and reference times, speedup, Triton bandwidth and its fraction of the roofline."""
    device = case["inputs"][0].device
    available = nsvq_triton_available if case["kernel"] == "nsvq" else cross_attention_triton_available
    reference_ms = time_ms(step(case["reference"], case["inputs"], case["grad"], mode), dry_run)
    triton_ms = None
    if available(device):  # in a dry run, only under TRITON_INTERPRET=1
        triton_ms = time_ms(step(case["triton"], case["inputs"], case["grad"], mode), dry_run)
    bytes_moved = case["bytes"][mode]
    row = {"kernel": case["kernel"], "mode": mode, "shape": case["shape"], "dtype": case["dtype"],
           "triton_ms": triton_ms, "reference_ms": reference_ms, "bytes": bytes_moved, "dry_run": dry_run,
           "speedup": None, "triton_tbps": None, "roofline_fraction": None}
    if triton_ms is not None:
        tbps = bytes_moved / (triton_ms * 1e-3) / 1e12
        row.update(speedup=reference_ms / triton_ms, triton_tbps=tbps, roofline_fraction=tbps / peak_tbps)
    return row


def device_name(dry_run: bool) -> str:
    return "CPU (dry run)" if dry_run else torch.cuda.get_device_name()


def write_markdown(path: str, rows: list[dict], dry_run: bool, peak_tbps: float) -> None:
    def number(value, pattern):
        return "-" if value is None else pattern.format(value)

    title = ("DRY RUN on CPU, tiny shapes: NOT a benchmark (plumbing check)" if dry_run
             else f"roofline {peak_tbps} TB/s")
    lines = [f"\n### Triton kernels vs references, {datetime.date.today()}, {device_name(dry_run)}: {title}\n",
             "| kernel | mode | shape | dtype | Triton ms | reference ms | speedup | Triton TB/s | of roofline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['mode']} | {row['shape']} | {row['dtype']} | "
                     f"{number(row['triton_ms'], '{:.4f}')} | {row['reference_ms']:.4f} | "
                     f"{number(row['speedup'], '{:.2f}x')} | {number(row['triton_tbps'], '{:.3f}')} | "
                     f"{number(row['roofline_fraction'], '{:.0%}')} |")
    with open(path, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", help="Append a results table to this file (e.g. docs/perf.md).")
    parser.add_argument("--peak-tbps", type=float, default=3.35, help="Memory-bandwidth roofline in TB/s.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Tiny CPU shapes to check the plumbing; prints no benchmark numbers worth reading.")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here, nothing measured (timings need a GPU; --dry-run checks the "
              "plumbing on CPU)", file=sys.stderr)
        return 1
    rows = []
    for case in cases(args.dry_run):
        for mode in MODES:
            rows.append(measure(case, mode, args.dry_run, args.peak_tbps))
            print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        write_markdown(args.markdown, rows, args.dry_run, args.peak_tbps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
