"""The parallel layout: tensor parallel (TP) x data parallel (DP) = world size, and its process groups.

Ranks are TP-major, megatron-core's order "tp-dp": the ``tp`` ranks of one model replica are adjacent
(global rank = dp_rank * tp + tp_rank), so on a multi-GPU node a replica's TP traffic stays on one
node. Both TP ranks of a replica must be fed the same micro-batch; data is sharded by ``dp_rank``.

megatron-core's tensor-parallel layers and cross entropy read the TP group from ``parallel_state``
globals, so ``ParallelLayout.create`` initialises them; everything of ours gets the layout passed
explicitly and reads the groups from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lapa_dist.parallel.distributed import DistributedContext


def data_parallel_size(world_size: int, tp: int) -> int:
    """dp such that dp x tp = world_size; a one-line error naming the numbers otherwise."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp} "
                         f"(need dp x tp = world size)")
    return world_size // tp


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    dp: int
    rank: int
    device: torch.device
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @classmethod
    def create(cls, context: DistributedContext, tp: int) -> ParallelLayout:
        """Split the initialised world into dp replicas of tp ranks (megatron's parallel_state included)."""
        from megatron.core import parallel_state

        dp = data_parallel_size(context.world_size, tp)
        if parallel_state.model_parallel_is_initialized():
            raise RuntimeError("megatron parallel_state is already initialised: one layout per process")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        layout = cls(tp, dp, context.rank, context.device, parallel_state.get_tensor_model_parallel_group(),
                     parallel_state.get_data_parallel_group())
        if (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()) != (
                layout.tp_rank, layout.dp_rank):
            raise RuntimeError("megatron's rank order differs from the layout's tp-major order")
        return layout

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 of this replica."""
        return self.rank - self.tp_rank

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks holding the same TP slice as this one, one per replica."""
        return [self.tp_rank + replica * self.tp for replica in range(self.dp)]

    def mpu(self) -> DeepSpeedMPU:
        """The object to pass as ``deepspeed.initialize(mpu=...)``."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """What DeepSpeed asks of its ``mpu`` argument, answered from a layout (pipeline parallel size 1).

    DeepSpeed's engine, ZeRO optimizers and utils/bwc.py call these to find the data-parallel group
    (gradient averaging, ZeRO partitioning) and the model-parallel group (gradient-norm reduction; a
    parameter without ``tensor_model_parallel`` set counts on TP rank 0 only). Deliberately absent:
    ``initialize_sequence_parallel`` (DeepSpeed would then ignore this object) and ``get_sequence_*``
    (DeepSpeed would assume Ulysses sequence parallelism).
    """

    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.layout.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.layout.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.tp_src_rank

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.layout.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.layout.dp_ranks

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
