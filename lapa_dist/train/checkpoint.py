"""Saving and resuming a DeepSpeed run: everything needed to continue exactly.

A checkpoint ``RUN_DIR/checkpoints/step-NNNNNNNN/`` holds the DeepSpeed shards (model, optimizer,
LR schedule, written by every rank), one ``extra_rank{r}.pt`` per rank (step, loader state, RNG states,
and whatever state the trainer adds, e.g. the EMA) and, last, the ``COMPLETE`` marker written by rank 0
after every rank finished. Old checkpoints beyond ``keep`` are deleted only after a new one is complete.
"""

from __future__ import annotations

import shutil

import torch

from lapa_dist.parallel.distributed import barrier, rng_state, set_rng_state
from lapa_dist.train.run_dir import COMPLETE_MARKER, RunDir, checkpoint_tag


def save_checkpoint(engine, run_dir: RunDir, step: int, extra: dict, rank: int, keep: int) -> str:
    tag = checkpoint_tag(step)
    directory = run_dir.checkpoints / tag
    if (directory / COMPLETE_MARKER).is_file():
        return tag  # already saved (a resumed run re-reaching a save step)
    engine.save_checkpoint(str(run_dir.checkpoints), tag=tag, save_latest=False)
    torch.save({**extra, "step": step, "rng": rng_state()}, directory / f"extra_rank{rank}.pt")
    barrier()
    if rank == 0:
        (directory / COMPLETE_MARKER).write_text(str(step))
        (run_dir.checkpoints / "latest").write_text(tag)
        _prune(run_dir, keep)
    barrier()
    return tag


def _prune(run_dir: RunDir, keep: int) -> None:
    complete = sorted(p for p in run_dir.checkpoints.glob("step-*") if (p / COMPLETE_MARKER).is_file())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def saved_world_size(run_dir: RunDir, tag: str) -> int:
    return len(list((run_dir.checkpoints / tag).glob("extra_rank*.pt")))


def prepare_resume(run_dir: RunDir, world_size: int, rank: int) -> tuple[str | None, bool]:
    """(tag to resume from or None, whether it must be loaded as a universal checkpoint).

    A checkpoint written by another number of ranks is converted once (by rank 0) into DeepSpeed's
    universal format under checkpoints/universal/, which any data-parallel size can load."""
    tag = run_dir.latest_checkpoint()
    if tag is None or saved_world_size(run_dir, tag) == world_size:
        return tag, False
    universal = run_dir.checkpoints / "universal" / tag
    if rank == 0 and not (universal / COMPLETE_MARKER).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        ds_to_universal(Namespace(
            input_folder=str(run_dir.checkpoints / tag), output_folder=str(universal), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
        (universal / COMPLETE_MARKER).write_text(tag)
    barrier()
    return tag, True


def load_checkpoint(engine, run_dir: RunDir, tag: str, rank: int, world_size: int, universal: bool = False) -> dict:
    """Restore engine state and RNG; returns this rank's extra state (rank 0's when ranks changed)."""
    directory = run_dir.checkpoints / tag
    saved_ranks = saved_world_size(run_dir, tag)
    load_dir = run_dir.checkpoints / "universal" if universal else run_dir.checkpoints
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_module_strict=True,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"{directory}: DeepSpeed could not load this checkpoint")
    same_layout = saved_ranks == world_size
    extra = torch.load(directory / f"extra_rank{rank if same_layout else 0}.pt", weights_only=False)
    if same_layout:
        set_rng_state(extra["rng"])
    extra["same_layout"] = same_layout
    extra["saved_world_size"] = saved_ranks
    return extra
