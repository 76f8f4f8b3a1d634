"""Optional LoRA adapters on the backbone's projections, plain or tensor-parallel (after ``parallelize``).

Each target layer with weight W gets y = base(x) + (alpha/r) · B·A·dropout(x), A [r, in] and B [out, r];
B starts at zero, so the model's output is unchanged at init, and every parameter of the model passed to
``apply_lora`` except A and B is frozen.

Our own adapters, not peft's megatron-core LoRA. Tried (peft 0.21.2, megatron-core 0.16.1, TP=2 on our
ColumnParallel/RowParallel): injection fails with ``KeyError: 'fan_in_fan_out'`` (tp_layer.dispatch_megatron),
then ``KeyError: 'default'`` (lora_bias never set); with both patched, its forward multiplies the
``(output, bias)`` tuple of its megatron lora_A/lora_B, and once that is patched too its own
``result, bias = self.base_layer(x)`` unpacks our layers' plain tensor output along the batch (batch 3:
"too many values to unpack"; batch 2: the two rows become output and bias) and it returns a tuple that our
attention cannot ``view``.
Past those four patches: the row-parallel A is initialised per rank from the local fan-in (std 0.10 against
TP=1's 0.072 at in=64) with identical slices on equally seeded ranks, so TP=2 is not TP=1; and the
state-dict keys change (``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight`` and megatron
``_extra_state`` entries), which breaks HF loading, ``planned_partition_dim`` and the TP checkpoint merge. The
code here is under 200 lines on public torch APIs with none of those, and TP=2 equals TP=1 exactly at init.

How an adapter is attached: ``lora_a`` and ``lora_b`` (bias-free ``nn.Linear``) and ``lora_dropout`` become
children of the target layer, and a forward hook adds the LoRA term to the layer's output. The layer itself is
not replaced, so the base weight keeps its name and megatron attributes. State-dict keys, e.g.::

    layers.0.attn.q_proj.weight         base, unchanged (frozen)
    layers.0.attn.q_proj.lora_a.weight  A [r, in]   (row-parallel layer: [r, in/tp], this rank's columns)
    layers.0.attn.q_proj.lora_b.weight  B [out, r]  (column-parallel layer: [out/tp, r], this rank's rows)

Tensor parallelism (no sequence parallelism; u = A·x is only r wide, so its all-reduce is cheap):

- column-parallel base (W [out/tp, in], x whole on every rank, output left split): A whole and replicated,
  B split along dim 0. Forward y_k += s·B_k·u with u = A·x identical on all ranks. Backward: each rank's
  du_k = s·B_kᵀ·dy_k holds only its output rows' share, so du is all-reduced (identity forward, sum
  backward); then dA = du·xᵀ is the full gradient, identical on every rank, and dx = Aᵀ·du is whole too.
- row-parallel base (W [out, in/tp], x split along its last dim, output all-reduced): A split along dim 1,
  B whole and replicated. u = Σ_k A_k·x_k is all-reduced in forward (identity backward: dy, so du, is the
  same on every rank), then y += s·B·u. dB = s·dy·uᵀ is identical on every rank, dA_k = du·x_kᵀ is this
  rank's slice, dx_k = A_kᵀ·du.

The split matrices carry megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes, the replicated
ones none, so DeepSpeed's gradient norm counts split ones on every TP rank and replicated ones on TP rank 0
(``tensor_parallel``'s rule). A is initialised like ``nn.Linear`` (uniform ±1/sqrt(in), as loralib and peft
do) from a generator seeded by ``LoRAConfig.seed`` and the layer's name, drawn at full size and sliced, so
every TP rank agrees and TP=2 equals TP=1 exactly; the global RNG is not touched. Dropout acts on the layer
input: under TP the ranks of a replica must draw the same random numbers (``seed_everything(seed, dp_rank)``
does), and TP=2 matches TP=1 exactly only without dropout (a row-parallel layer's slices then share one mask).

Order in a trainer: ``parallelize`` → load the base weights → ``apply_lora`` → ``deepspeed.initialize``.
For export, ``merge_lora`` folds s·B·A into W and removes the adapters (on TP slices too: B_k·A or B·A_k is
exactly this rank's slice of the full update; not inside a ZeRO-3 engine, whose parameters are partitioned), or
``merge_lora_state_dict`` does it on a gathered state dict.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn

from lapa_dist.config import StrictModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = (".lora_a.weight", ".lora_b.weight")
Kind = Literal["plain", "column", "row"]


class LoRAConfig(StrictModel):
    """Low-rank adapters on the backbone's projections."""

    enabled: bool = False
    """Use LoRA; when false ``apply_lora`` returns the model unchanged and the whole backbone trains as before."""
    rank: int = Field(default=16, ge=1)
    """r: rows of A, columns of B."""
    alpha: float = Field(default=32.0, gt=0)
    """The update is scaled by alpha / rank."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the LoRA path only (the base path sees the undropped input)."""
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    """Leaf names of the layers to adapt (every module with such a name); must be Linear or our TP layers."""
    seed: int = Field(default=0, ge=0)
    """Seed of A's initialisation (combined with each layer's name)."""

    @field_validator("targets")
    @classmethod
    def _leaf_names(cls, targets: list[str]) -> list[str]:
        duplicates = sorted({name for name in targets if targets.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate target names {duplicates}")
        dotted = [name for name in targets if "." in name or not name]
        if dotted:
            raise ValueError(f"targets are leaf module names without dots, got {dotted}")
        return targets

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; the gradient is summed over the TP group (the input feeds rank-local outputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverTP(torch.autograd.Function):
    """Sum of the TP ranks' partial results in forward; identity backward (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class LoRAHook:
    """The forward hook of an adapted layer: output + scale · lora_b(TP-sum(lora_a(lora_dropout(x))))."""

    def __init__(self, kind: Kind, scale: float, group: dist.ProcessGroup | None):
        self.kind, self.scale, self.group = kind, scale, group
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        u = module.lora_a(module.lora_dropout(args[0]))  # [..., r]
        if self.group is not None and self.group.size() > 1:
            u = (_SumGradOverTP if self.kind == "column" else _SumOverTP).apply(u, self.group)
        return output + module.lora_b(u) * self.scale


def _layer_kind(module: nn.Module, name: str) -> Kind:
    if isinstance(module, nn.Linear):
        return "plain"
    from lapa_dist.parallel.tensor_parallel import ColumnParallel, RowParallel  # megatron only when TP is used

    if isinstance(module, ColumnParallel) and not module.gather_output:
        return "column"
    if isinstance(module, RowParallel) and module.input_is_parallel:
        return "row"
    raise TypeError(f"lora target {name} is a {type(module).__name__}; supported: nn.Linear, and ColumnParallel "
                    f"(gather_output=False) / RowParallel (input_is_parallel=True) from parallelize")


def _initial_a(name: str, rank: int, fan_in: int, seed: int) -> torch.Tensor:
    """A [r, fan_in] at full size, uniform ±1/sqrt(fan_in), from a generator of (seed, layer name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)


def _tp_place(module: nn.Module, name: str, kind: Kind, layout) -> tuple[int, int, dist.ProcessGroup | None]:
    """(tp size, tp rank, group) of a target layer, checked against the layout."""
    if kind == "plain":
        return 1, 0, None
    if layout is None:
        raise ValueError(f"lora target {name} is tensor-parallel: pass the ParallelLayout to apply_lora")
    group = module.tp_group
    if (group.size(), group.rank()) != (layout.tp, layout.tp_rank):
        raise ValueError(f"lora target {name}: its TP group (size {group.size()}, rank {group.rank()}) is not the "
                         f"layout's (tp {layout.tp}, rank {layout.tp_rank})")
    return layout.tp, layout.tp_rank, layout.tp_group


def _attach(module: nn.Module, name: str, config: LoRAConfig, layout) -> None:
    kind = _layer_kind(module, name)
    weight = module.weight
    if weight.is_meta:
        raise ValueError(f"lora target {name} is on the meta device: materialize and load the weights first")
    tp, tp_rank, group = _tp_place(module, name, kind, layout)
    out_local, in_local = weight.shape
    a = _initial_a(name, config.rank, in_local * tp if kind == "row" else in_local, config.seed)
    if kind == "row":
        a = a.narrow(1, tp_rank * in_local, in_local)
    factory = {"bias": False, "device": weight.device, "dtype": weight.dtype}
    module.lora_a = nn.utils.skip_init(nn.Linear, a.shape[1], config.rank, **factory)
    module.lora_b = nn.utils.skip_init(nn.Linear, config.rank, out_local, **factory)
    with torch.no_grad():
        module.lora_a.weight.copy_(a)
        module.lora_b.weight.zero_()
    if kind != "plain":
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        split, dim = (module.lora_b.weight, 0) if kind == "column" else (module.lora_a.weight, 1)
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=dim, stride=1)
    module.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
    hook = LoRAHook(kind, config.scale, group)
    hook.handle = module.register_forward_hook(hook)
    module.lora_hook = hook


def apply_lora(model: nn.Module, config: LoRAConfig, layout=None) -> nn.Module:
    """Attach adapters to every module of ``model`` whose leaf name is in ``config.targets``, in place, and
    freeze everything else in ``model``; returns ``model`` (unchanged when ``config.enabled`` is false).

    ``model`` is plain or already ``parallelize``d (then ``layout``, a ``ParallelLayout``, is required) with its
    base weights loaded. Pass the backbone (``vla.llm``) to leave the VLA's own embeddings and heads as they are.
    """
    if not config.enabled:
        return model
    targets = [(name, module) for name, module in model.named_modules()
               if name.rpartition(".")[2] in config.targets]
    missing = sorted(set(config.targets) - {name.rpartition(".")[2] for name, _ in targets})
    if missing:
        raise ValueError(f"lora.targets: no module named {missing} in the model")
    if any(True for _ in adapted_modules(model)):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    for name, module in targets:
        _attach(module, name, config, layout)
    return model


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every layer that carries an adapter."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_hook", None), LoRAHook):
            yield name, module


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scale·B·A into each adapted layer's weight (computed in fp32) and remove the adapters, in place.

    Works on TP slices without communication; the state dict is then the plain model's again.
    """
    for _, module in list(adapted_modules(model)):
        hook = module.lora_hook
        delta = module.lora_b.weight.float() @ module.lora_a.weight.float() * hook.scale
        module.weight.add_(delta.to(module.weight.dtype))
        hook.handle.remove()
        del module.lora_a, module.lora_b, module.lora_dropout, module.lora_hook
    return model


@torch.no_grad()
def merge_lora_state_dict(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """A full (TP-gathered) state dict with every ``X.lora_a.weight`` / ``X.lora_b.weight`` pair folded into
    ``X.weight`` (W + scale·B·A in fp32, cast back); the LoRA keys are dropped. For export from checkpoints."""
    merged = {key: value for key, value in state.items() if not key.endswith(LORA_SUFFIXES)}
    prefixes = sorted({key[: -len(suffix)] for key in state for suffix in LORA_SUFFIXES if key.endswith(suffix)})
    for prefix in prefixes:
        needed = [prefix + ".weight", *(prefix + suffix for suffix in LORA_SUFFIXES)]
        absent = [key for key in needed if key not in state]
        if absent:
            raise ValueError(f"LoRA state of {prefix}: missing {absent}")
        weight, a, b = (state[key] for key in needed)
        if a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise ValueError(f"{prefix}: LoRA rank {a.shape[0]} in the state dict, config rank {config.rank}")
        merged[prefix + ".weight"] = (weight.float() + b.float() @ a.float() * config.scale).to(weight.dtype)
    return merged


def planned_partition_dim_with_lora(name: str) -> int | None:
    """``tensor_parallel.planned_partition_dim`` extended to LoRA keys: ``X.lora_b.weight`` of a column-parallel
    X splits along 0, ``X.lora_a.weight`` of a row-parallel X along 1, the other LoRA matrices are replicated."""
    from lapa_dist.parallel.tensor_parallel import COLUMN_PARALLEL, ROW_PARALLEL, planned_partition_dim

    if not name.endswith(LORA_SUFFIXES):
        return planned_partition_dim(name)
    base, matrix, _ = name.rsplit(".", 3)[-3:]
    if matrix == "lora_b" and base in COLUMN_PARALLEL:
        return 0
    return 1 if matrix == "lora_a" and base in ROW_PARALLEL else None
