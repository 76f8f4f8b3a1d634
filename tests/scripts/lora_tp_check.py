"""Multi-rank check of LoRA on the tensor-parallel backbone, run by tests/test_lora.py under deepspeed (2 ranks, TP=2).

Every rank builds the tiny backbone (recomputation on, so the adapters also run inside checkpointed blocks) from the
same seed, parallelizes it and applies LoRA; rank 0 also keeps a TP=1 copy with the same LoRA config. Then:

1. init: the gathered A against TP=1's A (exact), B zero, the loss against the base model's loss;
2. gradients: B set to the same non-zero values (each TP slice cut by ``copy_full_into`` from one full tensor,
   which also checks the split attributes), one forward/backward: loss and every gathered LoRA gradient against
   TP=1, replicated gradients equal on both TP ranks, no gradient on base weights;
3. training: DeepSpeed ZeRO-1 (TP=2 x DP=1, AdamW, gradient clipping that acts on every step) against torch AdamW
   with ``clip_grad_norm_`` at TP=1: losses, pre-clip global gradient norms (DeepSpeed must count the split
   matrices on both ranks and the replicated ones once) and the trained LoRA matrices;
4. merge: ``merge_lora`` on both; the gathered merged weights against TP=1's merged weights, logits before and
   after the merge, and ``merge_lora_state_dict`` of the gathered unmerged state against the merged weights.

Rank 0 writes the measurements to OUT/lora_tp.json; the test decides what passes.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.models.lora import (
    LoRAConfig,
    apply_lora,
    merge_lora,
    merge_lora_state_dict,
    planned_partition_dim_with_lora,
)
from lapa_dist.parallel.distributed import init_distributed
from lapa_dist.parallel.layout import ParallelLayout
from lapa_dist.parallel.tensor_parallel import copy_full_into, full_state_dict, gather_tp, parallelize, partition_dim

ROOT = Path(__file__).resolve().parents[2]
LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0, seed=3)
STEPS, LR, CLIP = 4, 1e-2, 0.01


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if ".lora_" in name}


def replica_spread(tensor: torch.Tensor, layout: ParallelLayout) -> float:
    """Largest difference between the TP ranks' copies of a replicated tensor (0.0 on ranks other than 0)."""
    copies = gather_tp(tensor, 0, layout)
    return 0.0 if copies is None else max_diff(copies[: tensor.shape[0]], copies[tensor.shape[0]:])


def full_shape(param: torch.Tensor, layout: ParallelLayout) -> list[int]:
    shape, dim = list(param.shape), partition_dim(param)
    if dim is not None:
        shape[dim] *= layout.tp
    return shape


def check_init(model, reference, base_loss, batch, layout) -> dict:
    a_diffs, b_max = [], 0.0
    for name, param in lora_params(model).items():
        full = gather_tp(param.detach(), partition_dim(param), layout)
        if name.endswith("lora_a.weight") and full is not None:
            a_diffs.append(max_diff(full, dict(reference.named_parameters())[name]))
        b_max = max(b_max, param.abs().max().item()) if name.endswith("lora_b.weight") else b_max
    with torch.no_grad():
        loss = model(*batch).item()
    return {} if layout.rank else {"a_max_diff": max(a_diffs), "a_compared": len(a_diffs), "b_max_abs": b_max,
                                   "loss_diff": abs(loss - base_loss)}


def check_gradients(model, reference, batch, layout) -> dict:
    torch.manual_seed(11)  # the same full B on every rank, sliced for this one
    full_b = {name: 0.05 * torch.randn(full_shape(p, layout)) for name, p in lora_params(model).items()
              if name.endswith("lora_b.weight")}
    for name, param in lora_params(model).items():
        if name in full_b:
            copy_full_into(param, full_b[name], layout, name)
    loss = model(*batch)
    loss.backward()
    diffs, spread = {}, 0.0
    ref_grads = {}
    if layout.rank == 0:
        with torch.no_grad():
            for name, param in lora_params(reference).items():
                if name in full_b:
                    param.copy_(full_b[name])
        ref_loss = reference(*batch)
        ref_loss.backward()
        ref_grads = {name: param.grad for name, param in lora_params(reference).items()}
    for name, param in lora_params(model).items():
        dim = partition_dim(param)
        if dim is None:
            spread = max(spread, replica_spread(param.grad, layout))
        full = gather_tp(param.grad, dim, layout)
        if full is not None:
            diffs[name] = max_diff(full, ref_grads[name]) / ref_grads[name].abs().max().item()
    base_grads = [name for name, param in model.named_parameters() if ".lora_" not in name and param.grad is not None]
    model.zero_grad(set_to_none=True)
    if layout.rank:
        return {}
    reference.zero_grad(set_to_none=True)
    return {"loss_diff": abs(loss.item() - ref_loss.item()), "loss": loss.item(),
            "max_relative_grad_diff": max(diffs.values()), "grads_compared": sorted(diffs),
            "reference_lora_params": sorted(lora_params(reference)), "replicated_grad_spread": spread,
            "base_params_with_grad": base_grads,
            "trainable_reference": sorted(n for n, p in reference.named_parameters() if p.requires_grad)}


def reference_training(reference, batch) -> tuple[list[float], list[float]]:
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = reference(*batch)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(trainable, CLIP).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def check_training(model, reference, batch, layout) -> tuple[torch.nn.Module, dict]:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": batch[0].shape[0], "gradient_accumulation_steps": 1,
              "train_batch_size": batch[0].shape[0], "gradient_clipping": CLIP,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config, mpu=layout.mpu())
    losses, norms = [], []
    for _ in range(STEPS):
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    ref_losses, ref_norms = reference_training(reference, batch) if layout.rank == 0 else (None, None)
    diffs = {}
    ref_params = lora_params(reference) if layout.rank == 0 else {}
    for name, param in lora_params(engine.module).items():
        full = gather_tp(param.detach(), partition_dim(param), layout)
        if full is not None:
            diffs[name] = max_diff(full, ref_params[name].detach())
    result = {"losses": losses, "reference_losses": ref_losses, "grad_norms": norms, "reference_grad_norms": ref_norms,
              "clip": CLIP, "max_lora_param_diff": max(diffs.values()) if diffs else None,
              "lora_params_compared": len(diffs)}
    return engine.module, ({} if layout.rank else result)


def check_merge(model, reference, batch, layout) -> dict:
    """Give the TP model TP=1's trained LoRA matrices (sliced), so both merge the same update; then merge both."""
    shared = [{n: p.detach() for n, p in lora_params(reference).items()} if layout.rank == 0 else None]
    dist.broadcast_object_list(shared, src=layout.tp_src_rank, group=layout.tp_group)
    for name, param in lora_params(model).items():
        copy_full_into(param, shared[0][name], layout, name)
    inputs = batch[0]
    with torch.no_grad():
        before = gather_tp(model(inputs), 2, layout)  # [B, T, V]
    unmerged = full_state_dict(model, layout)
    plan_mismatch = [name for name, param in model.named_parameters()
                     if partition_dim(param) != planned_partition_dim_with_lora(name)]
    merge_lora(model)
    with torch.no_grad():
        after = gather_tp(model(inputs), 2, layout)
    merged = full_state_dict(model, layout)
    if layout.rank:
        return {}
    with torch.no_grad():
        ref_before = reference(inputs)
        ref_after = merge_lora(reference)(inputs)
    ref_state = dict(reference.named_parameters())
    from_state_dict = merge_lora_state_dict(unmerged, LORA)
    return {"logits_scale": ref_before.abs().max().item(),
            "unmerged_logits_vs_tp1": max_diff(before, ref_before), "merged_logits_vs_tp1": max_diff(after, ref_after),
            "merged_vs_unmerged_logits": max_diff(after, before),
            "keys_match": sorted(merged) == sorted(ref_state) == sorted(from_state_dict),
            "plain_keys": sorted(merged) == sorted(dict(Llama(reference.config).named_parameters())),
            "max_merged_weight_diff": max(max_diff(merged[n], ref_state[n].detach()) for n in ref_state),
            "max_state_dict_merge_diff": max(max_diff(merged[n], from_state_dict[n]) for n in merged),
            "weights_changed_by_merge": sorted(n for n in merged if not torch.equal(merged[n], unmerged[n])),
            "partition_plan_mismatch": plan_mismatch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    context = init_distributed()
    layout = ParallelLayout.create(context, tp=2)
    tree = json.loads((ROOT / "configs/vla/backbone_tiny.json").read_text())
    config = LlamaConfig(**{**tree, "recompute": True})
    torch.manual_seed(1)
    model = Llama(config)
    tokens = torch.randint(0, config.vocab_size, (2, 25))
    batch = (tokens[:, :-1], tokens[:, 1:], (torch.rand(2, 24) > 0.3).float())  # inputs, targets, loss mask
    reference, base_loss = None, None
    if layout.rank == 0:
        reference = apply_lora(copy.deepcopy(model), LORA)
        with torch.no_grad():
            base_loss = model(*batch).item()
    apply_lora(parallelize(model, layout), LORA, layout)
    results = {"init": check_init(model, reference, base_loss, batch, layout),
               "gradients": check_gradients(model, reference, batch, layout)}
    model, results["training"] = check_training(model, reference, batch, layout)
    results["merge"] = check_merge(model, reference, batch, layout)
    if context.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lora_tp.json").write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
