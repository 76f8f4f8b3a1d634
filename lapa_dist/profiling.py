"""Training throughput: phase timers, FLOPs, MFU, and the profiles of the LAQ and VLA training steps.

A step is split into consecutive phases (data wait, host-to-device, forward, backward, optimizer), timed
with CUDA events on a GPU (one synchronize per step) and with perf_counter on CPU; the step time is the
wall clock of the whole step, so the phases sum to it (a phase repeated within a step, as with gradient
accumulation, is summed). MFU is achieved FLOP/s over the device's dense peak for the matmul precision in
use (a small table of datasheet numbers below; None where the device is not in it, e.g. any CPU, unless a
peak is given).

LAQ (``profile_laq``). FLOPs are counted, not estimated: torch's FlopCounterMode over the first warm-up step
(matmuls, convolutions, attention; attention on SDPA for that step, as the Triton and flash-attn kernels are
invisible to it), divided by the batch. The step is LAQTrainer.train_step's work without DeepSpeed: forward,
backward, grad-norm clip and a plain torch AdamW step (counted as "optimizer"); no EMA, no dead-code
replacement. With deepspeed.precision bf16 the parameters themselves are bf16 (DeepSpeed would keep fp32
master weights, so its optimizer step costs more). Profiling is single-process: there is no gradient
communication, and the breakdown says so.

VLA (``profile_vla``, stages pretrain and finetune). The step is VLATrainer.train_step's: per micro-batch
the DeepSpeed engine's forward, ``engine.backward`` and ``engine.step``, gradient_accumulation micro-batches
per step, with the config's ZeRO stage, precision and tensor-parallel layout (one rank as plain ``python``,
or every rank under the deepspeed launcher; each rank measures itself). Inputs: synthetic batches of the
configured shape (the prompt of one representative instruction built with the configured tokenizer, uint8
images of data.image_size, random latent codes or actions), converted and put on the device once, so the
step measures compute; or, with ``with_data``, the config's loader converted every step as the trainer does.
Weights are random (``init`` is not read): step time does not depend on their values.

VLA model FLOPs are analytic, per token of a sequence of T positions. Backbone: L layers, width d, SwiGLU
width f, key/value width d_kv (num_kv_heads x head_dim), text vocabulary V; latent (or action) vocabulary C.
The weights w used in a matmul at every position, |w| their sizes:

    per layer   q, o: d*d    k, v: d*d_kv    gate, up, down: d*f      (N_layer = 2d^2 + 2 d d_kv + 3 d f)
    heads       LM head d*V (the text loss reads it at every position), latent head d*C
    N = L * N_layer + d * (V + C)
    forward    2 N + 4 L T d
    backward   sum over w of 2 |w| (g_W + g_x)  +  8 T d per layer whose attention inputs need gradients

g_W = 1 where w trains (dL/dW); g_x = 1 where w's input needs a gradient (dL/dx): some trainable parameter lies
upstream (an embedding table or vision projector feeding the sequence, an earlier layer, the norm before it).
Everything trains (latent pretraining): 6 N + 12 L T d. Backbone frozen under a trainable latent embedding:
4 N + 12 L T d + 2 d C. Attention: q.k^T and p.v, 2 T d each per layer (d = num_heads x head_dim), over the
full T x T scores as PaLM's MFU counts them (a causal kernel skips about half); twice that backward.
Not counted: the embedding lookups (no matmul; 6 x all parameters would count them), activation recomputation
(backbone.recompute re-runs blocks in backward: hardware work, not model FLOPs), the flash-attention backward's
recomputed q.k^T (FlopCounterMode counts it) and elementwise work. The vision tower's FLOPs per image are
counted separately, with FlopCounterMode on one image (forward, and backward where it trains; the frozen
VQGAN only encodes). Per step: the sum of t * F(t) over the sequences at their real (unpadded) lengths t,
plus the tower's FLOPs per image. Per rank: a replica's model FLOPs / tensor_parallel, so work that TP ranks
duplicate (the vision tower, the replicated latent head) counts once.
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from lapa_dist.config import ConfigError
from lapa_dist.data.actions import read_actions
from lapa_dist.data.loader import VideoLoader
from lapa_dist.models import attention, llama
from lapa_dist.models.action_tokenizer import ActionTokenizer
from lapa_dist.models.laq import LAQ, LAQModelConfig
from lapa_dist.models.vla import VLA
from lapa_dist.models.vla_sequence import SequenceConfig
from lapa_dist.parallel.distributed import gather_objects, init_distributed
from lapa_dist.parallel.layout import ParallelLayout
from lapa_dist.parallel.tensor_parallel import parallelize
from lapa_dist.train.config import OptimConfig
from lapa_dist.train.engine import build_engine, engine_dtype
from lapa_dist.train.laq import LAQRunConfig, to_unit_float
from lapa_dist.train.vla import ExampleBuilder, VLARunConfig, model_batch, new_model, stage_model_config

PHASES = ("data_wait", "to_device", "forward", "backward", "optimizer")
NO_COMMUNICATION = "single process: no gradient communication, 0 by construction"
LAQ_SECTION = "## LAQ training throughput"
VLA_SECTION = "## VLA training throughput"
DEFAULT_INSTRUCTION = "pick up the red block and put it in the drawer"
"""The instruction of the synthetic VLA batches: its prompt sets the sequence length."""

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
        times: dict[str, float] = {}
        for name, phase_seconds in zip(self.names, seconds):
            times[name] = times.get(name, 0.0) + phase_seconds
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
    peak, basis = device_peak(device, dtype, peak_override)
    return {"achieved_tflops": achieved, "peak_tflops": peak, "peak_basis": basis,
            "mfu": achieved / peak if peak else None}


def device_peak(device: torch.device, dtype: torch.dtype, peak_override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it comes from): ``peak_override``, else the GPU table; None on CPU."""
    if peak_override is not None:
        return peak_override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on CPU (no peak table; give --peak-tflops)"
    precision = matmul_precision(dtype)
    peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    return peak, f"datasheet dense {precision} peak" if peak else f"{precision} peak of this GPU not in the table"


def check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1 (the first warm-up step may count FLOPs); "
                         f"got steps={steps}, warmup={warmup}")


def profile_laq(config: LAQRunConfig, steps: int, warmup: int, with_data: bool = False,
                peak_override: float | None = None) -> dict:
    """Train the config's LAQ for ``warmup`` + ``steps`` steps at ``config.data.batch_size``; the measured
    steps give throughput and breakdown, the first warm-up step (under FlopCounterMode) the FLOPs."""
    check_steps(steps, warmup)
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


# ---- VLA stages: analytic model FLOPs, the DeepSpeed training step, per-rank throughput ----


@dataclass(frozen=True)
class Matmul:
    """A weight used in a matmul at every position: its size and the gradients backward computes through it."""

    name: str
    params: int
    weight_grad: bool
    """The weight trains: backward computes dL/dW, 2 FLOPs per weight and token."""
    input_grad: bool
    """The matmul's input needs a gradient: backward computes dL/dx, 2 FLOPs per weight and token."""


@dataclass(frozen=True)
class VLAFlops:
    """Model FLOPs of a VLA training step, per token of a T-position sequence (formula in the module docstring)."""

    matmuls: tuple[Matmul, ...]
    layers: int
    attention_width: int
    """d = num_heads x head_dim: the width of q and of the attention output."""
    attention_backward_layers: int
    """Layers whose attention inputs (q, k, v) need gradients."""

    @property
    def matmul_params(self) -> int:
        """N: the weights used in matmuls (embedding tables excluded)."""
        return sum(m.params for m in self.matmuls)

    def attention_forward(self, seq_len: int) -> int:
        return 4 * self.layers * seq_len * self.attention_width

    def attention_backward(self, seq_len: int) -> int:
        return 8 * self.attention_backward_layers * seq_len * self.attention_width

    def forward(self, seq_len: int) -> int:
        return 2 * self.matmul_params + self.attention_forward(seq_len)

    def backward(self, seq_len: int) -> int:
        weights = sum(2 * m.params * (int(m.weight_grad) + int(m.input_grad)) for m in self.matmuls)
        return weights + self.attention_backward(seq_len)

    def per_token(self, seq_len: int) -> int:
        return self.forward(seq_len) + self.backward(seq_len)

    def per_sequence(self, seq_len: int) -> int:
        return seq_len * self.per_token(seq_len)


def _trains(module: torch.nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def vla_flops(model: VLA) -> VLAFlops:
    """The model FLOPs of ``model``'s training step: sizes from its config, which gradients flow from its
    parameters' requires_grad (plain or tensor-parallel layers alike; sizes are the whole replica's)."""
    config, llm = model.config.backbone, model.llm
    d, f, d_kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    # A trainable table or tower feeding the input embeddings makes the whole sequence need gradients.
    flows = any(_trains(m) for m in (llm.embed_tokens, model.image_embed, model.latent_embed, model.vision))
    matmuls, attention_backward = [], 0
    for index, layer in enumerate(llm.layers):
        attn, mlp = layer.attn, layer.mlp
        x = flows or _trains(layer.attn_norm)
        sizes = {"q_proj": d * d, "k_proj": d * d_kv, "v_proj": d * d_kv}
        matmuls += [Matmul(f"layers.{index}.attn.{name}", size, _trains(getattr(attn, name)), x)
                    for name, size in sizes.items()]
        qkv = x or any(_trains(getattr(attn, name)) for name in sizes)
        attention_backward += int(qkv)
        matmuls.append(Matmul(f"layers.{index}.attn.o_proj", d * d, _trains(attn.o_proj), qkv))
        x = qkv or _trains(attn.o_proj) or _trains(layer.mlp_norm)
        matmuls += [Matmul(f"layers.{index}.mlp.{name}", d * f, _trains(getattr(mlp, name)), x)
                    for name in ("gate_proj", "up_proj")]
        gated = x or _trains(mlp.gate_proj) or _trains(mlp.up_proj)
        matmuls.append(Matmul(f"layers.{index}.mlp.down_proj", f * d, _trains(mlp.down_proj), gated))
        flows = gated or _trains(mlp.down_proj)
    hidden = flows or _trains(llm.norm)
    latent_vocab = model.config.sequence.latent_vocab_size
    matmuls += [Matmul("lm_head", d * config.vocab_size, _trains(llm.lm_head), hidden),
                Matmul("latent_head", d * latent_vocab, _trains(model.latent_head), hidden)]
    return VLAFlops(tuple(matmuls), config.num_layers, config.num_heads * config.head_dim, attention_backward)


def vision_flops_per_image(model: VLA, device: torch.device) -> int:
    """FLOPs of the vision tower on one image, counted with FlopCounterMode: its forward, and its backward
    where it trains (a ViT projector; the frozen VQGAN encodes under no_grad). Gradients it leaves are dropped."""
    image = torch.rand(1, 3, model.image_size, model.image_size, device=device,
                       generator=torch.Generator(device).manual_seed(0))

    def run() -> None:
        tokens = model.vision(image)
        if tokens.requires_grad:
            tokens.float().sum().backward()

    flops, _ = count_flops(run)
    for param in model.vision.parameters():
        param.grad = None
    return flops


def load_tokenizer(path: str):
    """The configured HF tokenizer, from a local directory only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer: cannot load a tokenizer from {path!r} ({type(error).__name__}); "
                          f"give a local tokenizer directory with --set tokenizer=DIR") from None


def synthetic_actions(count: int, dims: int, binary_dims: list[int], generator: torch.Generator) -> torch.Tensor:
    """Actions float [count, dims], uniform in [-1, 1]; the binary dimensions (those in range) are -1 or 1."""
    actions = torch.rand(count, dims, generator=generator) * 2 - 1
    binary = [dim for dim in binary_dims if 0 <= dim < dims]
    actions[:, binary] = torch.where(actions[:, binary] < 0, -1.0, 1.0)
    return actions


def action_tokenizer_for(config: VLARunConfig, with_data: bool) -> ActionTokenizer:
    """Finetuning's action tokenizer: fitted on the config's data as the trainer fits it, or without data on
    synthetic actions of model.sequence.action_tokens_per_action dimensions (an action head of
    actions.num_bins outputs, as data with that many distinct values per dimension gives)."""
    bins = config.actions
    if with_data:
        actions, _ = read_actions(config.data.datasets, bins.fit_max_clips)
    else:
        generator = torch.Generator().manual_seed(config.train.seed)
        dims = config.model.sequence.action_tokens_per_action
        actions = synthetic_actions(max(1024, 8 * bins.num_bins), dims, bins.binary_dims, generator).numpy()
    try:
        return ActionTokenizer.fit(actions, bins.num_bins, bins.binary_dims, bins.binary_values)
    except ValueError as error:
        raise ConfigError(f"actions: {error}") from None


def synthetic_vla_batch(config: VLARunConfig, sequence: SequenceConfig, action_tokenizer: ActionTokenizer | None,
                        instruction: str) -> dict:
    """One batch shaped like the loader's: x_t uint8 [B, 3, S, S], B copies of ``instruction`` and the targets
    (latent codes [B, s] or actions [B, D]) of data.batch_size examples."""
    generator = torch.Generator().manual_seed(config.train.seed)
    size, count = config.data.image_size, config.data.batch_size
    if action_tokenizer is None:
        target = torch.randint(0, sequence.latent_vocab_size, (count, sequence.latent_length), generator=generator)
    else:
        target = synthetic_actions(count, action_tokenizer.tokens_per_action, config.actions.binary_dims, generator)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return {"x_t": images, "instruction": [instruction] * count, "target": target}


def vla_model_batch(batch: dict, examples: ExampleBuilder, pad_token_id: int, action_tokenizer: ActionTokenizer | None,
                    device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The trainer's conversion (lapa_dist.train.vla.model_batch) and the real (unpadded) sequence lengths."""
    converted = model_batch(batch, examples, pad_token_id, action_tokenizer, device, dtype)
    return converted, converted["attention_mask"].sum(dim=1).tolist()


def timed_vla_step(engine, batches: Iterator[dict], convert: Callable, accumulation: int,
                   clock: PhaseClock) -> tuple[dict[str, float], list[int]]:
    """VLATrainer.train_step's work, timed phase by phase: (times, lengths of the sequences trained on)."""
    clock.start()
    lengths: list[int] = []
    for _ in range(accumulation):
        batch = next(batches)
        clock.mark("data_wait")
        model_batch, batch_lengths = convert(batch)
        clock.mark("to_device")
        output = engine(model_batch)
        clock.mark("forward")
        engine.backward(output.loss)
        clock.mark("backward")
        engine.step()
        clock.mark("optimizer")
        lengths += batch_lengths
    return clock.finish(), lengths


@dataclass
class VLARun:
    """What one rank profiles: its engine, its inputs and the FLOP model of the step."""

    config: VLARunConfig
    layout: ParallelLayout
    engine: object
    batches: Iterator[dict]
    convert: Callable
    flops: VLAFlops
    vision_flops: int
    sequence_length: int
    parameters: int
    trainable_parameters: int
    input: str

    def step(self, clock: PhaseClock) -> tuple[dict[str, float], list[int]]:
        return timed_vla_step(self.engine, self.batches, self.convert, self.config.deepspeed.gradient_accumulation,
                              clock)


def vla_inputs(config: VLARunConfig, layout: ParallelLayout, sequence: SequenceConfig,
               action_tokenizer: ActionTokenizer | None, convert: Callable, with_data: bool,
               instruction: str) -> tuple[Iterator[dict], Callable, int, str]:
    """(batches, their conversion, the representative sequence length, a description). Synthetic: one batch
    converted and put on the device once, then reused; with data: the config's loader, converted every step."""
    synthetic = synthetic_vla_batch(config, sequence, action_tokenizer, instruction)
    prepared = convert(synthetic)
    length = prepared[1][0]
    if with_data:
        loader = VideoLoader(config.data, layout.dp_rank, layout.dp)
        return iter(loader), convert, length, (f"VideoLoader (num_workers={config.data.num_workers}), converted "
                                               f"every step as VLATrainer.model_batch does")
    targets = "latent codes" if action_tokenizer is None else "actions"
    return itertools.repeat(synthetic), lambda _: prepared, length, (
        f"synthetic: {length}-position prompts of {instruction!r}, uint8 images of {config.data.image_size} px, "
        f"random {targets}; converted and put on the device once (data cost excluded)")


def build_vla_run(config: VLARunConfig, layout: ParallelLayout, steps: int, with_data: bool,
                  instruction: str) -> VLARun:
    """The model, its engine and the inputs, set up as VLATrainer sets them up; the FLOP model and the
    parameter counts come from the plain model, before tensor parallelism."""
    if config.lora.enabled:
        raise ConfigError("lora.enabled: the profiler does not apply LoRA adapters yet (nor count their FLOPs)")
    device, dtype = layout.device, engine_dtype(config.deepspeed)
    tokenizer = load_tokenizer(config.tokenizer)
    action_tokenizer = action_tokenizer_for(config, with_data) if config.stage == "finetune" else None
    model_config = stage_model_config(config, action_tokenizer)
    model = new_model(config, model_config, device)
    flops, vision = vla_flops(model), vision_flops_per_image(model, device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if layout.tp > 1:
        parallelize(model.llm, layout)
    engine = build_engine(model, config.optim, config.deepspeed, config.data.batch_size, layout.dp, steps,
                          mpu=layout.mpu())
    convert = partial(vla_model_batch, examples=ExampleBuilder(tokenizer, model_config.sequence),
                      pad_token_id=tokenizer.pad_token_id or 0, action_tokenizer=action_tokenizer, device=device,
                      dtype=dtype)
    batches, convert, length, source = vla_inputs(config, layout, model_config.sequence, action_tokenizer, convert,
                                                  with_data, instruction)
    return VLARun(config, layout, engine, batches, convert, flops, vision, length, total, trainable, source)


def count_first_step(run: VLARun, clock: PhaseClock) -> tuple[int, int]:
    """(FLOPs counted by FlopCounterMode on this rank during one step, the model FLOPs of that step per rank).
    flash-attn is invisible to the counter, so the backbone's attention runs on SDPA for that step."""
    with mock.patch.object(llama, "flash_attn_func", None):
        counted, (_, lengths) = count_flops(lambda: run.step(clock))
    return counted, step_model_flops(run, lengths) // run.layout.tp


def step_model_flops(run: VLARun, lengths: list[int]) -> int:
    """Model FLOPs of a replica's step over sequences of these real lengths (one image each)."""
    return sum(run.flops.per_sequence(length) for length in lengths) + run.vision_flops * len(lengths)


def rank_summary(run: VLARun, measured: list[tuple[dict[str, float], list[int]]]) -> dict:
    """This rank's numbers over the measured steps (totals over the steps divided by their total time)."""
    times = [step_times for step_times, _ in measured]
    seconds, count, tp = sum(t["step"] for t in times), len(measured), run.layout.tp
    tokens = sum(sum(lengths) for _, lengths in measured)
    samples = sum(len(lengths) for _, lengths in measured)
    model_flops = sum(step_model_flops(run, lengths) for _, lengths in measured)
    memory_bytes, memory_kind = peak_memory(run.layout.device)
    return {
        "rank": run.layout.rank, "tp_rank": run.layout.tp_rank, "dp_rank": run.layout.dp_rank,
        "step_s": seconds / count, "step_s_range": [min(t["step"] for t in times), max(t["step"] for t in times)],
        "breakdown_s": {phase: sum(t[phase] for t in times) / count for phase in PHASES},
        "tokens_per_step_per_replica": tokens / count,
        "tokens_per_s_per_replica": tokens / seconds, "tokens_per_s_per_rank": tokens / seconds / tp,
        "samples_per_s_per_replica": samples / seconds,
        "model_flops_per_step_per_replica": model_flops / count,
        "achieved_tflops_per_rank": model_flops / seconds / tp / 1e12,
        "peak_memory_bytes": memory_bytes, "peak_memory_kind": memory_kind,
    }


def profile_vla(config: VLARunConfig, steps: int, warmup: int, with_data: bool = False,
                peak_override: float | None = None, instruction: str = DEFAULT_INSTRUCTION,
                count: bool = False) -> dict | None:
    """Profile the config's VLA training step for ``warmup`` + ``steps`` steps on every rank of the world
    (one as plain python). Rank 0 returns the result with every rank's numbers, the other ranks None.
    ``count``: also count the first warm-up step with FlopCounterMode, a check of the analytic FLOPs."""
    check_steps(steps, warmup)
    started = not dist.is_initialized()
    context = init_distributed()
    try:
        try:
            layout = ParallelLayout.create(context, config.parallel.tensor_parallel)
        except ValueError as error:
            raise ConfigError(f"parallel.tensor_parallel: {error}") from None
        run = build_vla_run(config, layout, warmup + steps, with_data, instruction)
        clock = PhaseClock(layout.device)
        reset_peak_memory(layout.device)
        counted = count_first_step(run, clock) if count else None
        for _ in range(warmup - int(count)):
            run.step(clock)
        ranks = gather_objects(rank_summary(run, [run.step(clock) for _ in range(steps)]))
        run.engine.destroy()
        return vla_result(run, ranks, steps, warmup, peak_override, counted) if layout.rank == 0 else None
    finally:  # undo what was set up here, so that one process can profile again (the tests do)
        parallel_state.destroy_model_parallel()
        if started and dist.is_initialized():
            dist.destroy_process_group()


def vla_result(run: VLARun, ranks: list[dict], steps: int, warmup: int, peak_override: float | None,
               counted: tuple[int, int] | None) -> dict:
    """The JSON object: the mean over ranks of the per-rank figures, world totals, the FLOP model, every rank."""
    config, layout, dtype = run.config, run.layout, engine_dtype(run.config.deepspeed)

    def mean(key: str) -> float:
        return sum(rank[key] for rank in ranks) / len(ranks)

    peak, basis = device_peak(layout.device, dtype, peak_override)
    achieved = mean("achieved_tflops_per_rank")
    length = run.sequence_length
    flops = {
        "formula": "per token: 2N + 4LTd forward; sum_w 2|w|(g_W + g_x) + 8LTd backward (module docstring)",
        "matmul_params": run.flops.matmul_params, "layers": run.flops.layers,
        "attention_width": run.flops.attention_width, "sequence_length": length,
        "per_token": run.flops.per_token(length), "per_token_forward": run.flops.forward(length),
        "per_token_backward": run.flops.backward(length),
        "attention_per_token": run.flops.attention_forward(length) + run.flops.attention_backward(length),
        "vision_per_image": run.vision_flops,
        "vision_note": "counted with FlopCounterMode on one image (forward, backward where the tower trains)",
        "per_step_per_replica": mean("model_flops_per_step_per_replica"),
    }
    if counted is not None:
        flops["counted_first_step_rank0"], flops["model_first_step_per_rank"] = counted
    communication = ("world of one: none" if layout.world_size == 1 else
                     "inside forward/backward/optimizer (ZeRO gathers and reductions, TP all-reduces), not separated")
    return {
        "stage": config.stage, "device": device_description(layout.device),
        "date": datetime.date.today().isoformat(), "world_size": layout.world_size,
        "tensor_parallel": layout.tp, "data_parallel": layout.dp, "zero_stage": config.deepspeed.zero_stage,
        "precision": str(dtype).removeprefix("torch."), "micro_batch": config.data.batch_size,
        "gradient_accumulation": config.deepspeed.gradient_accumulation, "sequence_length": length,
        "image_size": config.data.image_size, "input": run.input, "steps": steps, "warmup": warmup,
        "step_s": mean("step_s"), "step_s_range": [min(r["step_s_range"][0] for r in ranks),
                                                   max(r["step_s_range"][1] for r in ranks)],
        "breakdown_s": {phase: sum(r["breakdown_s"][phase] for r in ranks) / len(ranks) for phase in PHASES},
        "communication_note": communication,
        "tokens_per_step_per_replica": mean("tokens_per_step_per_replica"),
        "tokens_per_s_per_rank": mean("tokens_per_s_per_rank"),
        "tokens_per_s_per_replica": mean("tokens_per_s_per_replica"),
        "tokens_per_s": sum(r["tokens_per_s_per_rank"] for r in ranks),
        "samples_per_s_per_replica": mean("samples_per_s_per_replica"),
        "samples_per_s": sum(r["samples_per_s_per_replica"] for r in ranks) / layout.tp,
        "flops": flops, "achieved_tflops_per_rank": achieved, "peak_tflops": peak, "peak_basis": basis,
        "mfu": achieved / peak if peak else None,
        "parameters": run.parameters, "trainable_parameters": run.trainable_parameters,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_kind": ranks[0]["peak_memory_kind"] + ", the largest over ranks",
        "weights": "random (init.* is not read: the step time does not depend on the values)",
        "per_rank": ranks,
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


def vla_markdown(result: dict, config_path: str, command: str, note: str | None) -> list[str]:
    """A heading, the command, what was measured and a one-row table of a VLA profile."""
    flops = result["flops"]
    low, high = (seconds * 1e3 for seconds in result["step_s_range"])
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    what = (f"`{command}`: stage {result['stage']}, {result['input']}; {result['precision']}, ZeRO-"
            f"{result['zero_stage']}, DeepSpeed engine; communication {result['communication_note']}. Means over "
            f"{result['steps']} steps after {result['warmup']} warm-up, averaged over ranks. Model FLOPs analytic "
            f"(lapa_dist/profiling.py): {flops['per_token'] / 1e9:.3g} GFLOP per token at {flops['sequence_length']} "
            f"positions, vision tower {flops['vision_per_image'] / 1e9:.3g} GFLOP per image; peak memory is "
            f"{result['peak_memory_kind']}; MFU: {result['peak_basis']}.")
    columns = ["ranks (tp x dp)", "micro-batch x accum", "positions", "tokens/s per rank", "samples/s (all ranks)",
               "step ms (min-max)", "data wait ms", "to device ms", "forward ms", "backward ms", "optimizer ms",
               "peak memory GiB", "params M (trainable)", "GFLOP/token", "TFLOP/s per rank", "MFU"]
    row = [f"{result['world_size']} ({result['tensor_parallel']} x {result['data_parallel']})",
           f"{result['micro_batch']} x {result['gradient_accumulation']}", str(result["sequence_length"]),
           f"{result['tokens_per_s_per_rank']:.4g}", f"{result['samples_per_s']:.3g}",
           f"{result['step_s'] * 1e3:.1f} ({low:.1f}-{high:.1f})",
           *(f"{result['breakdown_s'][phase] * 1e3:.1f}" for phase in PHASES),
           f"{result['peak_memory_bytes'] / 2**30:.2f}",
           f"{result['parameters'] / 1e6:.4g} ({result['trainable_parameters'] / 1e6:.4g})",
           f"{flops['per_token'] / 1e9:.3g}", f"{result['achieved_tflops_per_rank']:.3g}", mfu]
    lines = ["", f"### {result['date']}, {result['device']}, `{config_path}`", "", what]
    if note:
        lines += ["", note]
    return lines + ["", markdown_row(columns), markdown_row(["---"] * len(columns)), markdown_row(row)]
