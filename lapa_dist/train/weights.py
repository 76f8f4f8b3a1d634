"""Reading trained weights back out of a run directory, whatever the ZeRO stage it trained with."""

from __future__ import annotations

import json

import torch

from lapa_dist.train.run_dir import RunDir


def trained_state_dict(run_dir: RunDir, tag: str | None = None, prefer_ema: bool = True) -> tuple[dict, str]:
    """The module's state dict at checkpoint ``tag`` (default: the newest complete one) and a description.

    The EMA weights are used when the run kept them and ``prefer_ema``; buffers come from the checkpoint."""
    tag = tag or run_dir.latest_checkpoint()
    if tag is None:
        raise FileNotFoundError(f"{run_dir.path}: no complete checkpoint under checkpoints/")
    directory = run_dir.checkpoints / tag
    zero_stage = json.loads((run_dir.path / "config.json").read_text())["deepspeed"]["zero_stage"]
    if zero_stage == 0:
        state = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir.checkpoints), tag=tag)  # fp32 masters + buffers
    extra = torch.load(directory / "extra_rank0.pt", map_location="cpu", weights_only=False)
    source = f"{directory} (ZeRO-{zero_stage})"
    if prefer_ema and "ema" in extra:
        state = {**state, **extra["ema"]}
        source += ", EMA weights"
    return state, source
