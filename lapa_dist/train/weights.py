"""Reading trained weights back out of a run directory, whatever the ZeRO stage and tensor-parallel size."""

from __future__ import annotations

import json

import torch

from lapa_dist.models.lora import planned_partition_dim_with_lora
from lapa_dist.train.run_dir import RunDir

TP_ROOT = "llm."
"""Prefix of the tensor-parallel backbone's parameters in a VLA state dict."""


def trained_state_dict(run_dir: RunDir, tag: str | None = None, prefer_ema: bool = True) -> tuple[dict, str]:
    """The module's full state dict at checkpoint ``tag`` (default: the newest complete one) and a description.

    ZeRO-1/2/3 runs give the fp32 master weights; tensor-parallel runs (ZeRO-0/1/2) the module weights of every
    TP rank, concatenated along each backbone parameter's split dimension (in the training precision). The EMA
    weights are used when the run kept them and ``prefer_ema``; buffers come from the checkpoint."""
    tag = tag or run_dir.latest_checkpoint()
    if tag is None:
        raise FileNotFoundError(f"{run_dir.path}: no complete checkpoint under checkpoints/")
    directory = run_dir.checkpoints / tag
    config = json.loads((run_dir.path / "config.json").read_text())
    zero_stage = config["deepspeed"]["zero_stage"]
    tp = config.get("parallel", {}).get("tensor_parallel", 1)
    if tp > 1:
        state = _merge_tensor_parallel(directory, tp)
    elif zero_stage == 0:
        state = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir.checkpoints), tag=tag)  # fp32 masters + buffers
    extra = torch.load(directory / "extra_rank0.pt", map_location="cpu", weights_only=False)
    source = f"{directory} (ZeRO-{zero_stage}" + (f", TP {tp})" if tp > 1 else ")")
    if prefer_ema and "ema" in extra:
        state = {**state, **extra["ema"]}
        source += ", EMA weights"
    return state, source


def _merge_tensor_parallel(directory, tp: int) -> dict[str, torch.Tensor]:
    """Full tensors from the per-TP-rank module states ``mp_rank_XX_model_states.pt``."""
    slices = [torch.load(directory / f"mp_rank_{rank:02d}_model_states.pt", map_location="cpu",
                         weights_only=False)["module"] for rank in range(tp)]
    merged = {}
    for name, first in slices[0].items():
        dim = planned_partition_dim_with_lora(name[len(TP_ROOT):]) if name.startswith(TP_ROOT) else None
        merged[name] = first if dim is None else torch.cat([piece[name] for piece in slices], dim=dim)
    return merged
