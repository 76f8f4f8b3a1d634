"""Wrapping a plain model in a DeepSpeed engine from our config sections."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from lapa_dist.train.config import DeepSpeedConfig, OptimConfig


def deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, micro_batch: int, data_parallel_size: int) -> dict:
    zero: dict = {"stage": ds.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "train_batch_size": micro_batch * ds.gradient_accumulation * data_parallel_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": not torch.cuda.is_available()},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the base lr at an optimizer step: linear warm-up, then constant or cosine."""

    def multiplier(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_engine(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, micro_batch: int,
                 data_parallel_size: int, total_steps: int, load_universal: bool = False, mpu=None):
    """``load_universal``: the checkpoint to resume from is a universal one (another data-parallel size).
    ``mpu``: a ``ParallelLayout.mpu()`` under tensor parallelism (ZeRO then works over its data-parallel group)."""
    import deepspeed

    config = deepspeed_config(optim, ds, micro_batch, data_parallel_size)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=config, mpu=mpu,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lr_lambda(optim, total_steps)),
    )
    return engine


def engine_dtype(ds: DeepSpeedConfig) -> torch.dtype:
    return torch.bfloat16 if ds.precision == "bf16" else torch.float32
