"""Tensor parallelism for the Llama backbone: megatron-core layers swapped into the plain model.

The Megatron split, without sequence parallelism:

- column-parallel (weight rows split, output left split): q/k/v, gate/up projections and the LM head;
- row-parallel (weight columns split, output all-reduced): o_proj and down_proj;
- vocab-parallel embedding (rows split, output all-reduced) and cross entropy on the split logits.

So each rank holds num_heads/tp query heads, num_kv_heads/tp key/value heads, intermediate/tp SwiGLU
columns and vocab/tp embedding and head rows; the RMSNorm weights are replicated (their gradients agree
across TP ranks because the column-parallel layers all-reduce their input gradient).

The parallelize step, in order: ``parallelize`` (this tensor parallelism) on the plain model; activation
recomputation is the model's ``recompute`` flag and runs on top of it; ZeRO comes last, from
``deepspeed.initialize(mpu=layout.mpu())``. Sharded weights carry megatron's ``tensor_model_parallel`` and
``partition_dim`` attributes: DeepSpeed's gradient clipping counts them on every TP rank and the
replicated ones on TP rank 0 only, which gives the right global norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import (
    copy_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from torch import nn

from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.parallel.layout import ParallelLayout

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed_tokens",)


class _PlainStateDict:
    """Keep a megatron layer's state dict to its parameters: megatron adds an ``_extra_state`` entry (for
    Transformer Engine) and a load hook that inserts one; our checkpoints stay the plain model's keys."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()


class ColumnParallel(_PlainStateDict, ColumnParallelLinear):
    """x [B, T, in] -> [B, T, out/tp], this rank's output columns (no bias, no gather)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallel(_PlainStateDict, RowParallelLinear):
    """x [B, T, in/tp] (this rank's input columns) -> [B, T, out], summed over TP ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelCrossEntropy(nn.Module):
    """Per-token cross entropy [B, T] from vocab-split logits [B, T, V/tp]; overwrites the logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets)


def check_divisible(config: LlamaConfig, tp: int) -> None:
    for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{name} {getattr(config, name)} is not divisible by tensor-parallel size {tp}")


def parallelize(model: Llama, layout: ParallelLayout) -> Llama:
    """Swap the model's projections, embedding, LM head and loss for tensor-parallel ones, in place.

    Each new layer gets this rank's slice of the plain weight; a model built on the meta device stays on
    it (slices only, so a 7B model is never whole anywhere): ``materialize`` it, then load a checkpoint.
    """
    check_divisible(model.config, layout.tp)
    for name, plain in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in COLUMN_PARALLEL + ROW_PARALLEL + VOCAB_PARALLEL:
            setattr(model.get_submodule(parent_name), leaf, _parallel_module(leaf, plain, layout))
    if model.config.tie_word_embeddings:  # both are [V/tp, D] with the same contiguous vocabulary range
        model.lm_head.weight = model.embed_tokens.weight
    model.cross_entropy = VocabParallelCrossEntropy()
    return model


def _parallel_module(leaf: str, plain: nn.Module, layout: ParallelLayout) -> nn.Module:
    weight = plain.weight
    config = ModelParallelConfig(tensor_model_parallel_size=layout.tp, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=weight.dtype)
    common = {"config": config, "init_method": None, "tp_group": layout.tp_group}  # init_method: never called
    with torch.device(weight.device):
        if leaf in VOCAB_PARALLEL:
            module, dim = VocabParallelEmbedding(plain.num_embeddings, plain.embedding_dim, **common), 0
        elif leaf in COLUMN_PARALLEL:
            module, dim = ColumnParallel(plain.in_features, plain.out_features, bias=False, **common), 0
        else:
            module, dim = RowParallel(plain.in_features, plain.out_features, bias=False, input_is_parallel=True,
                                      skip_bias_add=False, **common), 1
    set_tensor_model_parallel_attributes(module.weight, is_parallel=True, dim=dim, stride=1)
    module.weight.requires_grad_(weight.requires_grad)
    if not weight.is_meta:
        size = module.weight.shape[dim]
        with torch.no_grad():
            module.weight.copy_(weight.narrow(dim, layout.tp_rank * size, size))
    return module


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Give every meta parameter uninitialised storage on ``device``, keeping ties and TP attributes.

    (``nn.Module.to_empty`` makes new Parameter objects, which drops both.)
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                copy_tensor_model_parallel_attributes(new, param)
                replaced[id(param)] = new
            setattr(module, name, replaced[id(param)])
    return model


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension along which ``param`` is split over TP ranks, None when it is replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def gather_tp(tensor: torch.Tensor, dim: int | None, layout: ParallelLayout) -> torch.Tensor | None:
    """The full tensor on TP rank 0 (slices concatenated along ``dim``), None on the other TP ranks.

    A replicated tensor (``dim`` None) is returned as it is on TP rank 0.
    """
    if dim is None or layout.tp == 1:
        return tensor if layout.tp_rank == 0 else None
    tensor = tensor.contiguous()
    pieces = [torch.empty_like(tensor) for _ in range(layout.tp)] if layout.tp_rank == 0 else None
    dist.gather(tensor, pieces, group=layout.tp_group, group_dst=0)
    return torch.cat(pieces, dim=dim) if pieces is not None else None


def full_state_dict(model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """Every parameter at full size on TP rank 0 ({} on the others); tied parameters once, under their
    first name. Call on all TP ranks together."""
    full = {}
    for name, param in model.named_parameters():
        gathered = gather_tp(param.detach(), partition_dim(param), layout)
        if gathered is not None:
            full[name] = gathered
    return full


def planned_partition_dim(name: str) -> int | None:
    """The split dimension the plan gives the Llama parameter ``name`` (e.g. ``layers.0.attn.q_proj.weight``),
    None for a replicated one; for reading TP-sliced checkpoints without building the model."""
    leaf = name.rpartition(".")[0].rpartition(".")[2]
    if leaf in COLUMN_PARALLEL + VOCAB_PARALLEL:
        return 0
    return 1 if leaf in ROW_PARALLEL else None


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor, layout: ParallelLayout, name: str) -> None:
    """Copy this TP rank's slice of the full tensor ``full`` into ``param`` (whole when it is replicated)."""
    dim = partition_dim(param)
    expected = list(param.shape)
    if dim is not None:
        expected[dim] *= layout.tp
    if list(full.shape) != expected:
        raise ValueError(f"{name}: source shape {list(full.shape)}, model expects {expected} (tp {layout.tp})")
    if dim is not None:
        full = full.narrow(dim, layout.tp_rank * param.shape[dim], param.shape[dim])
    param.copy_(full)
