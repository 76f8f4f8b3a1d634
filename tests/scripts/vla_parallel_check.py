"""Multi-rank parity of the whole VLA (vision tower, backbone, heads, weighted loss), run by tests/test_vla_training.py.

Rank 0 trains a plain copy of the model in one process on the whole global batch (torch AdamW, clipping);
every rank then trains the same initial model through ``lapa_dist.train.engine.build_engine`` under the given
ZeRO stage and tensor-parallel size, each data-parallel replica on its rows of the global batch. Rank 0 writes
per-step losses and gradient norms of both, and the largest difference of the final weights, to OUT/<name>.json;
the test decides what passes. ``--accumulation k`` feeds each replica's rows as k micro-batches per step.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.models.vla_sequence import build_example, collate_examples
from lapa_dist.parallel.distributed import init_distributed
from lapa_dist.parallel.layout import ParallelLayout
from lapa_dist.parallel.tensor_parallel import full_state_dict, parallelize
from lapa_dist.train.config import DeepSpeedConfig, OptimConfig
from lapa_dist.train.engine import build_engine

STEPS, MICRO = 4, 2
OPTIM = OptimConfig(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5)
INSTRUCTIONS = ["pick up the red block", "push the blue cube to the left", "open the drawer", "close the gripper"]


def global_batch(config: VLAConfig, tokenizer, size: int, image_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    sequence = config.sequence
    image_placeholder = torch.zeros(sequence.num_image_tokens, dtype=torch.long)
    latents = torch.randint(0, sequence.latent_vocab_size, (size, sequence.latent_length), generator=generator)
    examples = [build_example(tokenizer, INSTRUCTIONS[i % len(INSTRUCTIONS)], image_placeholder, latents[i], sequence)
                for i in range(size)]
    batch = collate_examples(examples, pad_token_id=0)
    batch["images"] = torch.rand(size, 3, image_size, image_size, generator=generator)
    return batch


def rows(batch: dict, start: int, stop: int) -> dict:
    return {name: value[start:stop] for name, value in batch.items()}


def reference_training(model: VLA, batch: dict) -> tuple[list[float], list[float]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                  weight_decay=OPTIM.weight_decay)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = model(batch).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(trainable, OPTIM.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def full_weights(engine, layout: ParallelLayout, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter at full size (rank 0), gathered over ZeRO-3 partitions and TP slices."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {name: p.detach().clone() for name, p in module.named_parameters()}
    full = {f"llm.{name}": tensor for name, tensor in full_state_dict(module.llm, layout).items()}
    full.update({name: p.detach() for name, p in module.named_parameters() if not name.startswith("llm.")})
    return full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", type=Path, required=True, help="a VLARunConfig JSON; its model section is used")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    context = init_distributed()
    layout = ParallelLayout.create(context, tp=args.tp)
    config = VLAConfig.model_validate(json.loads(args.config.read_text())["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer), local_files_only=True)
    torch.manual_seed(5)
    model = VLA(config)
    batch = global_batch(config, tokenizer, MICRO * layout.dp, model.image_size)
    reference = copy.deepcopy(model) if layout.rank == 0 else None
    ref_losses, ref_norms = reference_training(reference, batch) if reference is not None else (None, None)
    if layout.tp > 1:
        parallelize(model.llm, layout)
    micro = MICRO // args.accumulation
    engine = build_engine(model, OPTIM, DeepSpeedConfig(zero_stage=args.zero, gradient_accumulation=args.accumulation),
                          micro, layout.dp, STEPS, mpu=layout.mpu())
    start = layout.dp_rank * MICRO  # a replica's rows; the same on its TP ranks
    micro_batches = [rows(batch, start + i * micro, start + (i + 1) * micro) for i in range(args.accumulation)]
    losses, norms = [], []
    for _ in range(STEPS):
        step_loss = torch.zeros(())
        for inputs in micro_batches:
            loss = engine(inputs).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / args.accumulation
        dist.all_reduce(step_loss, group=layout.dp_group)
        losses.append(step_loss.item() / layout.dp)
        norms.append(float(engine.get_global_grad_norm()))
    full = full_weights(engine, layout, args.zero)
    if context.is_main:
        final = dict(reference.named_parameters())
        result = {"losses": losses, "reference_losses": ref_losses, "grad_norms": norms,
                  "reference_grad_norms": ref_norms, "weights_compared": len(full),
                  "max_weight_diff": max((full[n].float() - final[n].detach().float()).abs().max().item()
                                         for n in final)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
