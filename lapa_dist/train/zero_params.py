"""Overwriting a parameter outside the optimizer, under any ZeRO stage.

ZeRO keeps fp32 master copies (partitioned) inside the optimizer; writing only ``param.data`` would
be undone by the next step. ``set_full_param`` writes the master copy too, and resets the Adam
moments of the rows it replaced, so a revived code starts fresh.
"""

from __future__ import annotations

import torch


def set_full_param(engine, param: torch.nn.Parameter, value: torch.Tensor, zero_stage: int,
                   reset_rows: torch.Tensor | None = None) -> None:
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(torch.float32)
    if zero_stage == 0:
        with torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))
        state = engine.optimizer.state.get(param, {}) if hasattr(engine.optimizer, "state") else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and reset_rows is not None:
                state[key][reset_rows.to(state[key].device)] = 0
        return
    safe_set_full_fp32_param(param, value)
    if zero_stage < 3:  # the module's own (replicated) copy, used by the next forward
        with torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))
    if reset_rows is not None and reset_rows.any():
        for key in ("exp_avg", "exp_avg_sq"):
            moments = safe_get_full_optimizer_state(param, key)
            if moments is not None:
                moments = moments.clone()
                moments[reset_rows.to(moments.device)] = 0
                safe_set_full_optimizer_state(param, moments, key)
