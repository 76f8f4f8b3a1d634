"""Starting the process group and describing this process's place in it.

Launched by ``deepspeed`` (or torchrun), each process reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment; launched as plain ``python``, it is a world of one. CPU uses gloo, GPUs use nccl.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistributedContext:
    """Initialise torch.distributed through DeepSpeed (its comm layer wraps the process group)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU shared-memory all-reduce op serves only its inference all-reduce, which nothing here calls; its
    # set-up costs every launch a JIT build (~60 s on a new machine) behind a file lock that a rank killed while
    # holding it leaves for good, ~66 MB of /dev/shm per rank, left behind at exit, and a busy-wait for every other
    # local rank's buffer. Marking the op incompatible is DeepSpeed's own way to skip it; training collectives go
    # through the process group (gloo / nccl) either way.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) differently per rank, reproducibly."""
    rank_seed = seed * 1000 + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, in place; returns the tensor (a no-op in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def deepspeed_launcher(ranks: int, master_port: int) -> list[str]:
    """The argv prefix that starts ``ranks`` processes with this environment's deepspeed launcher."""
    executable = Path(sys.executable).with_name("deepspeed")
    return [str(executable), "--num_gpus", str(ranks), "--master_port", str(master_port)]
