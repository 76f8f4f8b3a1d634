"""Which clips each reader (one loader worker on one rank) reads, in which order, and where it is.

A run has G = world_size x num_workers readers. Each epoch a dataset's shards are permuted with
(seed, dataset, epoch) and reader g takes every G-th shard from position g, so readers read disjoint
shards. A dataset with fewer shards than readers is split by clip instead (every reader scans all
shards and keeps every G-th clip), which only small sets need. A cursor (epoch, shard position,
clip position) says where a reader is; streams loop over epochs forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import BadSample, RawSample, iter_raw_samples


@dataclass
class Cursor:
    epoch: int = 0
    shard_pos: int = 0  # index into this reader's shard list of the epoch
    clip_pos: int = 0  # clips of that shard (this reader's share) already consumed

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardTask:
    path: Path
    clip_stride: int  # 1 in shard mode, G in clip mode
    clip_offset: int


class ClipStream:
    """The endless sequence of raw samples of one dataset for reader ``reader`` of ``num_readers``."""

    def __init__(self, directory: str, dataset_index: int, seed: int, reader: int, num_readers: int):
        self.directory = Path(directory)
        self.manifest = Manifest.read(directory)
        if not self.manifest.shards or self.manifest.clips == 0:
            raise ValueError(f"{directory}: the shard set holds no clips")
        self.dataset_index, self.seed = dataset_index, seed
        self.reader, self.num_readers = reader, num_readers
        self.shard_mode = len(self.manifest.shards) >= num_readers
        self.cursor = Cursor()

    def tasks(self, epoch: int) -> list[ShardTask]:
        order = np.random.default_rng([self.seed, self.dataset_index, epoch]).permutation(len(self.manifest.shards))
        names = [self.manifest.shards[i].name for i in order]
        if self.shard_mode:
            return [ShardTask(self.directory / n, 1, 0) for n in names[self.reader :: self.num_readers]]
        return [ShardTask(self.directory / n, self.num_readers, self.reader) for n in names]

    def __iter__(self) -> Iterator[tuple[int, RawSample | BadSample]]:
        """(epoch, sample) from the cursor on; the cursor always points past the last sample yielded."""
        while True:
            tasks = self.tasks(self.cursor.epoch)
            while self.cursor.shard_pos < len(tasks):
                for sample in self._read_shard(tasks[self.cursor.shard_pos]):
                    yield self.cursor.epoch, sample
                self.cursor.shard_pos += 1
                self.cursor.clip_pos = 0
            if not tasks:  # possible in shard mode only when a later epoch drew fewer shards: never
                raise RuntimeError(f"reader {self.reader}: no shards in {self.directory}")
            self.cursor = Cursor(epoch=self.cursor.epoch + 1)

    def _read_shard(self, task: ShardTask) -> Iterator[RawSample | BadSample]:
        # Own clips of a shard are raw indices offset, offset + stride, ...; clip_pos counts own clips.
        first_raw = task.clip_offset + self.cursor.clip_pos * task.clip_stride
        for raw_index, sample in enumerate(iter_raw_samples(task.path, skip=first_raw), start=first_raw):
            if isinstance(sample, BadSample) and sample.reason == "truncated_tar":
                self.cursor.clip_pos += 1
                yield sample
                return
            if (raw_index - task.clip_offset) % task.clip_stride:
                continue
            self.cursor.clip_pos += 1
            yield sample
