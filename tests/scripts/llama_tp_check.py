"""Multi-rank checks of the Llama backbone's tensor parallelism, run by tests/test_llama.py under deepspeed.

``--check tp`` (2 ranks, TP=2): the tiny backbone (untied GQA; tied with recomputation) against a TP=1
copy on rank 0 (loss and every gathered gradient); HF checkpoints loaded as TP slices from the meta device
against transformers' logits, and exported back; the 7B shape's per-rank parameter count on meta.
``--check zero`` (4 ranks, TP=2 x DP=2): a few AdamW steps under DeepSpeed ZeRO-1 with gradient clipping
against plain single-process training on rank 0.

Rank 0 writes the measurements to OUT/<check>.json; the test decides what passes.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from lapa_dist.models.hf_llama import (
    config_from_hf,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.parallel.distributed import init_distributed
from lapa_dist.parallel.layout import ParallelLayout
from lapa_dist.parallel.tensor_parallel import (
    full_state_dict,
    gather_tp,
    materialize,
    parallelize,
    partition_dim,
)

ROOT = Path(__file__).resolve().parents[2]


def load_config(name: str, **changes) -> LlamaConfig:
    tree = json.loads((ROOT / "configs" / "vla" / name).read_text())
    return LlamaConfig(**{**tree, **changes})


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tp_parity(config: LlamaConfig, layout: ParallelLayout, seed: int) -> dict:
    """Loss and gathered gradients of the TP model against the plain model on rank 0 (same seed, batch)."""
    torch.manual_seed(seed)
    model = Llama(config)
    tokens = torch.randint(0, config.vocab_size, (2, 25))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T]
    loss_mask = (torch.rand(targets.shape) > 0.3).float()
    reference = {}
    if layout.rank == 0:
        plain = copy.deepcopy(model)
        loss = plain(inputs, targets, loss_mask)
        loss.backward()
        reference = {"loss": loss.item(), "grads": {n: p.grad for n, p in plain.named_parameters()}}
    parallelize(model, layout)
    loss = model(inputs, targets, loss_mask)
    loss.backward()
    grad_diffs = {}
    for name, param in model.named_parameters():
        full = gather_tp(param.grad, partition_dim(param), layout)
        if full is not None:
            grad_diffs[name] = max_diff(full, reference["grads"][name]) / reference["grads"][name].abs().max().item()
    if layout.rank != 0:
        return {}
    return {
        "loss": loss.item(), "loss_diff": abs(loss.item() - reference["loss"]),
        "max_relative_grad_diff": max(grad_diffs.values()), "grads_compared": sorted(grad_diffs),
        "reference_grads": sorted(reference["grads"]),
        "state_dict_keys_plain": set(model.state_dict()) == set(Llama(config).state_dict()),
        "tied": model.lm_head.weight is model.embed_tokens.weight,
    }


def hf_round_trip(hf_dir: Path, export_dir: Path, layout: ParallelLayout) -> dict:
    """Build on meta, parallelize, load the HF checkpoint as TP slices, compare logits, export back."""
    config = config_from_hf(hf_dir)
    with torch.device("meta"):
        model = Llama(config)
    materialize(parallelize(model, layout), torch.device("cpu"))
    load_hf_checkpoint(model, hf_dir, layout.tp_rank, layout.tp)
    expected = torch.load(hf_dir / "reference.pt")
    with torch.no_grad():
        logits = gather_tp(model(expected["input_ids"]), 2, layout)  # [B, T, V]
    full = full_state_dict(model, layout)
    if layout.rank != 0:
        return {}
    save_hf_checkpoint(full, config, export_dir, max_shard_bytes=64 * 1024)
    return {"logits_diff": max_diff(logits, expected["logits"]),
            "local_params": sum(p.numel() for p in model.parameters())}


def meta_7b_local_params(layout: ParallelLayout) -> int:
    with torch.device("meta"):
        model = Llama(load_config("backbone_7b.json"))
    return sum(p.numel() for p in parallelize(model, layout).parameters())


def run_tp_checks(layout: ParallelLayout, args: argparse.Namespace) -> dict:
    tiny = load_config("backbone_tiny.json")
    results = {
        "untied_gqa": tp_parity(tiny, layout, seed=1),
        "tied_recompute": tp_parity(tiny.model_copy(update={"tie_word_embeddings": True, "recompute": True}),
                                    layout, seed=2),
        "hf": {hf_dir.name: hf_round_trip(hf_dir, args.out / f"export_{hf_dir.name}", layout)
               for hf_dir in args.hf_dirs},
    }
    results["meta_7b_local_params"] = meta_7b_local_params(layout)
    return results


def deepspeed_config(micro_batch: int, dp: int, lr: float, clip: float, weight_decay: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dp,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }


def reference_training(model: Llama, inputs, targets, steps: int, lr: float, clip: float, weight_decay: float):
    """Single-process TP=1 DP=1 training on the whole global batch: losses, pre-clip grad norms, model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses, norms = [], []
    for _ in range(steps):
        loss = model(inputs, targets)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def run_zero_check(layout: ParallelLayout, args: argparse.Namespace) -> dict:
    """TP=2 x DP=2 ZeRO-1 with clipping against plain training on rank 0 (same init, same global batch)."""
    import deepspeed

    steps, lr, clip, weight_decay, micro = 6, 3e-3, 0.5, 0.1, 2
    config = load_config("backbone_tiny.json")
    torch.manual_seed(3)
    model = Llama(config)
    tokens = torch.randint(0, config.vocab_size, (micro * layout.dp, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T], the global batch
    reference = copy.deepcopy(model) if layout.rank == 0 else None
    ref_losses, ref_norms = (reference_training(reference, inputs, targets, steps, lr, clip, weight_decay)
                             if reference is not None else (None, None))
    mine = slice(layout.dp_rank * micro, (layout.dp_rank + 1) * micro)  # both TP ranks of a replica: same rows
    engine, _, _, _ = deepspeed.initialize(model=parallelize(model, layout), model_parameters=model.parameters(),
                                           config=deepspeed_config(micro, layout.dp, lr, clip, weight_decay),
                                           mpu=layout.mpu())
    losses, norms = [], []
    for _ in range(steps):
        loss = engine(inputs[mine], targets[mine])
        engine.backward(loss)
        engine.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=layout.dp_group)
        losses.append(global_loss.item() / layout.dp)
        norms.append(float(engine.get_global_grad_norm()))
    full = full_state_dict(engine.module, layout)
    if layout.rank != 0:
        return {}
    final = dict(reference.named_parameters())
    return {"losses": losses, "reference_losses": ref_losses, "grad_norms": norms, "reference_grad_norms": ref_norms,
            "clip": clip, "max_weight_diff": max(max_diff(full[n], final[n].detach()) for n in final),
            "weights_compared": len(full)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", choices=["tp", "zero"], required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-dirs", type=Path, nargs="*", default=[])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    context = init_distributed()
    layout = ParallelLayout.create(context, tp=args.tp)
    results = run_tp_checks(layout, args) if args.check == "tp" else run_zero_check(layout, args)
    if context.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.check}.json").write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
