"""Training throughput: phase timers, counted FLOPs, MFU, and the profile of the LAQ training step.

A step is split into consecutive phases (data wait, host-to-device, forward, backward, optimizer), timed
with CUDA events on a GPU (one synchronize per step) and with perf_counter on CPU; the step time is the
wall clock of the whole step, so the phases sum to it. FLOPs are counted, not estimated: torch's
FlopCounterMode over the first warm-up step (matmuls, convolutions, attention; attention on SDPA for that
step, as the Triton and flash-attn kernels are invisible to it), divided by the batch.
MFU is achieved FLOP/s over the device's dense peak for the matmul precision in use (a small table of
datasheet numbers below; None where the device is not in it, e.g. any CPU).

The LAQ step is LAQTrainer.train_step's work without DeepSpeed: forward, backward, grad-norm clip and a plain
torch AdamW step (counted as "optimizer"); no EMA, no dead-code replacement. With deepspeed.precision bf16 the
parameters themselves are bf16 (DeepSpeed would keep fp32 master weights, so its optimizer step costs more).
Profiling is single-process: there is no gradient communication, and the breakdown says so.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import platform
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from lapa_dist.data.loader import VideoLoader
from lapa_dist.models import attention
from lapa_dist.models.laq import LAQ, LAQModelConfig
from lapa_dist.train.config import OptimConfig
from lapa_dist.train.engine import engine_dtype
from lapa_dist.train.laq import LAQRunConfig, to_unit_float

PHASES = ("data_wait", "to_device", "forward", "backward", "optimizer")
NO_COMMUNICATION = "single process: no gradient communication, 0 by construction"
LAQ_SECTION = "## LAQ training throughput"

# Dense peak TFLOP/s by device-name pattern (first match wins) and matmul precision. NVIDIA datasheets
# list Tensor Core TF32/BF16 figures "with sparsity"; the dense peak is half of that. FP32 is non-Tensor-Core.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 SXM5 ("NVIDIA H100 80GB HBM3"), H100 datasheet: FP32 67, TF32 989*, BF16 1,979* (* sparsity).
    (r"H100 80GB HBM3", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    # H100 PCIe, same datasheet: FP32 51, TF32 756*, BF16 1,513*.
    (r"H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    # H200 SXM, H200 datasheet: FP32 67, TF32 989*, BF16 1,979* (the H100 SXM's compute). Not the H200 NVL.
    (r"H200(?! NVL)", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    # A100 SXM4 and PCIe, 40 and 80 GB, A100 datasheet: FP32 19.5, TF32 156 (312*), BF16 312 (624*).
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
)


def matmul_precision(dtype: torch.dtype) -> str:
    """The peak-table column that bounds matmuls in ``dtype``: bf16, tf32 (fp32 with TF32 allowed) or fp32."""
    if dtype == torch.bfloat16:
        return "bf16"
    return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a GPU by its name (torch.cuda.get_device_name), or None if not in the table."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[precision]
    return None


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _convolution_backward_flops(grad_out, x, weight, bias, stride, padding, dilation, transposed, output_padding,
                                groups, output_mask, out_shape=None, **kwargs) -> int:
    """grad_input and grad_weight each do the forward's multiply-adds once (the weight shape holds the groups)."""
    return conv_flop_count(x, weight, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1]))


# Corrections to torch's FlopCounterMode table. (1) It knows the CUDA SDPA kernels but not the CPU flash
# kernel that SDPA without a mask dispatches to, and would count it as 0 FLOPs: the same formulas, registered
# for the CPU kernel. (2) Its convolution backward counts a grouped convolution's grad_weight as if the
# convolution were dense, `groups` times too many (x1024 for the paper LAQ's depthwise position convs).
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
    torch.ops.aten.convolution_backward: _convolution_backward_flops,
}


def count_flops(function: Callable[[], object]) -> tuple[int, object]:
    """(FLOPs of matmuls, convolutions and attention while ``function`` runs, its return value)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        value = function()
    return counter.get_total_flops(), value


@contextlib.contextmanager
def countable_attention(model: torch.nn.Module) -> Iterator[None]:
    """Inside: attention runs on torch SDPA. FlopCounterMode cannot see the Triton cross-attention kernel
    (kernels.cross_attention "auto" on CUDA) or flash_attn_func; SDPA does the same FLOPs and is counted."""
    cross = [m for m in model.modules() if isinstance(m, attention.Attention) and m.cross_attention is not None]
    backends = [m.cross_attention for m in cross]
    for module in cross:
        module.cross_attention = "sdpa"
    try:
        with mock.patch.object(attention, "flash_attn_func", None):
            yield
    finally:
        for module, backend in zip(cross, backends):
            module.cross_attention = backend


class PhaseClock:
    """Times the consecutive phases of one step: CUDA events on a GPU, perf_counter on CPU.

    ``start()``, then ``mark(phase)`` at the end of each phase, then ``finish()`` -> {phase: seconds,
    "step": wall seconds of the whole step}. On a GPU ``start`` and ``finish`` synchronize, so a step's
    GPU work is inside its own step and the phases (event to event) partition the step time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.names: list[str] = []
        self.wall_start = time.perf_counter()
        self.marks = [self._now()]

    def mark(self, phase: str) -> None:
        self.names.append(phase)
        self.marks.append(self._now())

    def finish(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            seconds = [begin.elapsed_time(end) / 1e3 for begin, end in itertools.pairwise(self.marks)]
        else:
            seconds = [end - begin for begin, end in itertools.pairwise(self.marks)]
        times = dict(zip(self.names, seconds))
        times["step"] = time.perf_counter() - self.wall_start
        return times

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = names[0] if names else model
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): allocated GPU memory since the reset, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated (tensors only)"
    # ru_maxrss is in KiB on Linux; it cannot be reset, so it covers the process's whole life.
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024, "process peak RSS (ru_maxrss: whole process, Python and torch runtime included)"


def synthetic_batches(model: LAQModelConfig, batch_size: int, device: torch.device) -> Iterator[dict]:
    """One random uint8 batch made on the device, yielded forever: the data pipeline costs nothing."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch_size, model.channels, model.image_size, model.image_size)
    frames = [torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator) for _ in range(2)]
    return itertools.repeat({"x_t": frames[0], "x_next": frames[1]})


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Plain AdamW with the run's hyperparameters (fused on a GPU, like DeepSpeed's FusedAdam)."""
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=device.type == "cuda")


def timed_train_step(model: LAQ, optimizer: torch.optim.Optimizer, batches: Iterator[dict], grad_clip: float,
                     dtype: torch.dtype, clock: PhaseClock) -> dict[str, float]:
    """One LAQ training step (LAQTrainer.train_step's work without DeepSpeed), timed phase by phase."""
    clock.start()
    batch = next(batches)
    clock.mark("data_wait")
    x_t = to_unit_float(batch["x_t"], clock.device, dtype)
    x_next = to_unit_float(batch["x_next"], clock.device, dtype)
    clock.mark("to_device")
    output = model(x_t, x_next)
    clock.mark("forward")
    output.loss.backward()
    clock.mark("backward")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.mark("optimizer")
    return clock.finish()


def summarize_steps(step_times: list[dict[str, float]], batch_size: int) -> dict:
    """samples/s over the measured steps, mean step time, its range, and the mean of each phase."""
    count, total = len(step_times), sum(times["step"] for times in step_times)
    breakdown = {phase: sum(times[phase] for times in step_times) / count for phase in PHASES}
    breakdown["communication"] = 0.0
    return {
        "samples_per_s": batch_size * count / total,
        "step_s": total / count,
        "step_s_range": [min(t["step"] for t in step_times), max(t["step"] for t in step_times)],
        "breakdown_s": breakdown,
        "communication_note": NO_COMMUNICATION,
    }


def utilization(flops_per_sample: float, samples_per_s: float, device: torch.device, dtype: torch.dtype,
                peak_override: float | None) -> dict:
    """Achieved TFLOP/s and MFU against ``peak_override`` or the table's dense peak (None when unknown)."""
    achieved = flops_per_sample * samples_per_s / 1e12
    precision = matmul_precision(dtype)
    peak, basis = peak_override, "--peak-tflops"
    if peak is None and device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), precision)
        basis = f"datasheet dense {precision} peak" if peak else f"{precision} peak of this GPU not in the table"
    elif peak is None:
        basis = "n/a on CPU (no peak table)"
    return {"achieved_tflops": achieved, "peak_tflops": peak, "peak_basis": basis,
            "mfu": achieved / peak if peak else None}


def profile_laq(config: LAQRunConfig, steps: int, warmup: int, with_data: bool = False,
                peak_override: float | None = None) -> dict:
    """Train the config's LAQ for ``warmup`` + ``steps`` steps at ``config.data.batch_size``; the measured
    steps give throughput and breakdown, the first warm-up step (under FlopCounterMode) the FLOPs."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1 (FLOPs are counted in the first warm-up step); "
                         f"got steps={steps}, warmup={warmup}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, batch_size = engine_dtype(config.deepspeed), config.data.batch_size
    torch.manual_seed(config.train.seed)
    model = LAQ(config.model).to(device=device, dtype=dtype).train()
    optimizer = make_optimizer(model, config.optim, device)
    batches = iter(VideoLoader(config.data)) if with_data else synthetic_batches(config.model, batch_size, device)
    clock = PhaseClock(device)
    reset_peak_memory(device)

    def step() -> dict[str, float]:
        return timed_train_step(model, optimizer, batches, config.optim.grad_clip, dtype, clock)

    with countable_attention(model):
        flops_per_step, _ = count_flops(step)
    for _ in range(warmup - 1):
        step()
    summary = summarize_steps([step() for _ in range(steps)], batch_size)
    memory_bytes, memory_kind = peak_memory(device)
    flops_per_sample = flops_per_step / batch_size
    return {
        "stage": "laq", "device": device_description(device), "date": datetime.date.today().isoformat(),
        "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "input": (f"VideoLoader (num_workers={config.data.num_workers})" if with_data
                  else "synthetic uint8 batch on the device (data cost excluded)"),
        "precision": str(dtype).removeprefix("torch."), "optimizer": "torch AdamW",
        **summary, "peak_memory_bytes": memory_bytes, "peak_memory_kind": memory_kind,
        "parameters": sum(p.numel() for p in model.parameters()), "flops_per_sample": flops_per_sample,
        **utilization(flops_per_sample, summary["samples_per_s"], device, dtype, peak_override),
    }


def append_markdown(path: str | Path, section: str, lines: list[str]) -> None:
    """Append ``lines`` to ``path``, after the heading ``section`` if the file has no such line yet.
    Never rewrites what is there: other tools append their own sections to the same file."""
    path = Path(path)
    existing = path.read_text().splitlines() if path.is_file() else []
    block = ([] if section in existing else ["", section]) + lines
    with path.open("a") as handle:
        handle.write("\n".join(block) + "\n")


def laq_markdown(result: dict, config_path: str, command: str, note: str | None) -> list[str]:
    """A heading, the command, what was measured and a one-row table of an LAQ profile."""
    breakdown = [f"{result['breakdown_s'][phase] * 1e3:.1f}" for phase in (*PHASES, "communication")]
    low, high = (seconds * 1e3 for seconds in result["step_s_range"])
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    what = (f"`{command}`: {result['input']}; {result['precision']}; {result['optimizer']} "
            f"({result['communication_note']}). Means over {result['steps']} steps after {result['warmup']} "
            f"warm-up; peak memory is {result['peak_memory_kind']}; MFU: {result['peak_basis']}.")
    columns = ["batch", "samples/s", "step ms (min-max)", "data wait ms", "to device ms", "forward ms",
               "backward ms", "optimizer ms", "communication ms", "peak memory GiB", "params M", "GFLOP/sample",
               "TFLOP/s", "MFU"]
    row = [str(result["batch_size"]), f"{result['samples_per_s']:.3g}",
           f"{result['step_s'] * 1e3:.1f} ({low:.1f}-{high:.1f})", *breakdown,
           f"{result['peak_memory_bytes'] / 2**30:.2f}", f"{result['parameters'] / 1e6:.3g}",
           f"{result['flops_per_sample'] / 1e9:.3g}", f"{result['achieved_tflops']:.3g}", mfu]
    lines = ["", f"### {result['date']}, {result['device']}, `{config_path}`", "", what]
    if note:
        lines += ["", note]
    return lines + ["", markdown_row(columns), markdown_row(["---"] * len(columns)), markdown_row(row)]


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
