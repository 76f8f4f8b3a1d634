"""The video loader: disjoint shards per reader, decode-once sampling, exact resumption.

Each rank runs ``num_workers`` readers (one per DataLoader worker; one in-process when 0). A reader
reads blocks of ``shuffle_block_clips`` clips, each drawn from the mixture by weight, builds
``samples_per_clip`` samples per clip, shuffles the block and emits batches. Every batch carries the
reader's position (the cursors at the start of its block, the block number and the index within the
block), and the main process keeps the latest position of each reader: that is the loader state. On
resume each reader re-reads its current block and skips what was already emitted, and the worker
order is rotated so batches continue in the same round-robin order: a resumed run sees exactly the
samples an uninterrupted one would (same world size and workers; otherwise it restarts the epoch).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lapa_dist.data.clip_stream import ClipStream, Cursor
from lapa_dist.data.config import DataConfig
from lapa_dist.data.reader import BadSample
from lapa_dist.data.samples import FrameDecoder, PyAVDecoder, assemble_samples, plan_clip

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataQualityError(RuntimeError):
    """Too large a fraction of the clips read is bad: the run stops rather than train on little data."""


class BadDataTracker:
    """Counts clips read and bad clips by reason; raises once the bad fraction passes the limit."""

    def __init__(self, max_fraction: float, check_after: int):
        self.max_fraction, self.check_after = max_fraction, check_after
        self.clips = 0
        self.bad: Counter = Counter()

    def good(self) -> None:
        self.clips += 1

    def record(self, sample: BadSample) -> None:
        self.clips += 1
        self.bad[sample.reason] += 1
        log.warning("skipping bad clip %s", sample)
        total_bad = sum(self.bad.values())
        if self.clips >= self.check_after and total_bad > self.max_fraction * self.clips:
            raise DataQualityError(
                f"{total_bad} of {self.clips} clips read were bad ({total_bad / self.clips:.1%} > "
                f"data.max_bad_fraction = {self.max_fraction:.1%}); by reason: {dict(self.bad)}; "
                f"last: {sample}. Run `python tools/check_shards.py` on the shard sets."
            )

    def state_dict(self) -> dict:
        return {"clips": self.clips, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.clips, self.bad = state["clips"], Counter(state["bad"])


def frame_decoder(config: DataConfig) -> FrameDecoder:
    """The decoder ``config.decoder`` names; DALI (an optional dependency) is imported only then."""
    if config.decoder == "dali":
        from lapa_dist.data.dali_decoder import DaliDecoder

        return DaliDecoder(config)
    return PyAVDecoder()


class ReaderStream:
    """Reader ``reader`` of ``num_readers``: an endless iterator of batches with their positions."""

    def __init__(self, config: DataConfig, reader: int, num_readers: int, decoder: FrameDecoder | None = None):
        self.config, self.reader = config, reader
        self.decoder = decoder or frame_decoder(config)
        self.streams = [
            ClipStream(spec.path, index, config.seed, reader, num_readers) for index, spec in enumerate(config.datasets)
        ]
        weights = np.array([spec.weight for spec in config.datasets])
        self.probabilities = weights / weights.sum()
        self.tracker = BadDataTracker(config.max_bad_fraction, config.bad_check_after)
        self.block_id, self.index_in_block = 0, 0

    def load_state_dict(self, state: dict) -> None:
        for stream, cursor in zip(self.streams, state["block_start"]):
            stream.cursor = Cursor(**cursor)
        self.tracker.load_state_dict(state["tracker"])
        self.block_id, self.index_in_block = state["block_id"], state["index_in_block"]

    def _read_block(self, clip_iterators: list[Iterator]) -> list[dict]:
        rng = np.random.default_rng([self.config.seed, self.reader, self.block_id])
        choices = rng.choice(len(self.streams), self.config.shuffle_block_clips, p=self.probabilities)
        plans = []
        for dataset_index in choices.tolist():
            epoch, raw = next(clip_iterators[dataset_index])
            try:
                if isinstance(raw, BadSample):
                    raise raw
                plans.append(plan_clip(self.config, self.config.datasets[dataset_index], raw, epoch))
            except BadSample as bad:
                self.tracker.record(bad)
        samples: list[dict] = []
        for plan, frames in zip(plans, self.decoder.decode(plans)):
            if isinstance(frames, BadSample):
                self.tracker.record(frames)
            else:
                self.tracker.good()
                samples.extend(assemble_samples(self.config, plan, frames))
        return [samples[i] for i in rng.permutation(len(samples))]

    def samples(self) -> Iterator[tuple[dict, dict]]:
        """(sample, position after it) forever."""
        clip_iterators = [iter(stream) for stream in self.streams]
        while True:
            block_start = self._position(index_in_block=0)
            block = self._read_block(clip_iterators)
            self.block_id += 1
            next_block_start = self._position(index_in_block=0)  # the position after the whole block
            for index in range(self.index_in_block, len(block)):
                last = index + 1 == len(block)
                yield block[index], next_block_start if last else {**block_start, "index_in_block": index + 1}
            self.index_in_block = 0

    def _position(self, index_in_block: int) -> dict:
        return {
            "block_start": [stream.cursor.as_dict() for stream in self.streams],
            "tracker": copy.deepcopy(self.tracker.state_dict()),
            "block_id": self.block_id,
            "index_in_block": index_in_block,
        }

    def batches(self) -> Iterator[dict]:
        batch: list[dict] = []
        for sample, position in self.samples():
            batch.append(sample)
            if len(batch) == self.config.batch_size:
                collated = collate(batch)
                collated["loader_state"] = position
                collated["bad_clips"] = self.tracker.state_dict()
                yield collated
                batch = []


def collate(samples: list[dict]) -> dict:
    """Stack samples in the form that crosses the worker -> main process boundary cheaply: all frames
    in ONE uint8 tensor [B, F, S, S, 3] (F = 2 for pairs, 1 for frames; one shared-memory transfer)
    and the small arrays as numpy (pickled inline); ``to_batch`` makes the user-facing batch."""
    names = [name for name in ("x_t", "x_next") if name in samples[0]]
    frames = torch.empty((len(samples), len(names), *samples[0]["x_t"].shape), dtype=torch.uint8)  # [B, F, S, S, 3]
    if get_worker_info() is not None:
        frames.share_memory_()  # filled in place: the DataLoader then sends it without another copy
    frames_view = frames.numpy()
    for index, sample in enumerate(samples):
        for position, name in enumerate(names):
            frames_view[index, position] = sample[name]
    batch: dict = {"frames": frames, "frame_names": names}
    for name in ("instruction", "key", "dataset"):
        batch[name] = [s[name] for s in samples]
    batch["t"] = np.array([s["t"] for s in samples])
    if "offset" in samples[0]:
        batch["offset"] = np.array([s["offset"] for s in samples])
    for name in ("actions", "latents", "target"):
        present = [s[name] for s in samples if name in s]
        if not present or len({a.shape for a in present}) != 1:
            continue  # absent, or shapes differ across the mixture: not batchable
        filler = np.zeros_like(present[0])
        batch[name] = np.stack([s.get(name, filler) for s in samples])
        batch[f"{name}_mask"] = np.array([name in s for s in samples])
    return batch


def to_batch(wire: dict) -> dict:
    """The batch users see: x_t / x_next uint8 [B, 3, S, S] (channel-first views), arrays as tensors."""
    frames = wire.pop("frames")
    batch = {name: frames[:, i].permute(0, 3, 1, 2) for i, name in enumerate(wire.pop("frame_names"))}
    for name, value in wire.items():
        batch[name] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    return batch


class VideoDataset(IterableDataset):
    """The per-rank IterableDataset; workers map to readers rotated by ``rotation`` (see module doc)."""

    def __init__(self, config: DataConfig, rank: int, world_size: int, reader_states: dict, rotation: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.reader_states, self.rotation = reader_states, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        logical = (worker + self.rotation) % num_workers
        reader = self.rank * num_workers + logical
        stream = ReaderStream(self.config, reader, self.world_size * num_workers)
        if logical in self.reader_states:
            stream.load_state_dict(self.reader_states[logical])
        for batch in stream.batches():
            batch["reader"] = logical
            yield batch


def _identity(batch: dict) -> dict:
    return batch


class VideoLoader:
    """Iterable of batches for one rank, with ``state_dict()`` / ``load_state_dict()`` for checkpoints."""

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        for index, spec in enumerate(config.datasets):  # fail here, not inside a worker
            ClipStream(spec.path, index, config.seed, rank, world_size)
        self.num_readers_per_rank = max(1, config.num_workers)
        self.batches_consumed = 0
        self.reader_states: dict[int, dict] = {}
        self.bad_clips: dict[int, dict] = {}
        self.worker_pids: list[int] = []  # of the current iteration's DataLoader workers (for profiling)

    def __iter__(self) -> Iterator[dict]:
        rotation = self.batches_consumed % self.num_readers_per_rank
        dataset = VideoDataset(self.config, self.rank, self.world_size, dict(self.reader_states), rotation)
        workers = self.config.num_workers
        loader = DataLoader(  # collate_fn=identity: batches are already collated (and must stay numpy)
            dataset, batch_size=None, collate_fn=_identity, num_workers=workers, prefetch_factor=4 if workers else None,
            persistent_workers=False, multiprocessing_context="fork" if workers else None,
            # its own generator: starting workers must not draw from the global torch RNG, which the
            # training step uses (a resumed run starts its loader at another point of that stream)
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        loader_iter = iter(loader)
        self.worker_pids = [worker.pid for worker in getattr(loader_iter, "_workers", [])]
        for batch in loader_iter:
            reader = batch.pop("reader")
            self.reader_states[reader] = batch.pop("loader_state")
            self.bad_clips[reader] = batch.pop("bad_clips")
            self.batches_consumed += 1
            yield to_batch(batch)

    def bad_counts(self) -> dict:
        """Clips read and bad clips by reason, summed over this rank's readers."""
        reasons: Counter = Counter()
        for state in self.bad_clips.values():
            reasons.update(state["bad"])
        return {"clips": sum(s["clips"] for s in self.bad_clips.values()), "bad": dict(reasons)}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "num_readers_per_rank": self.num_readers_per_rank,
            "seed": self.config.seed,
            "datasets": [spec.name for spec in self.config.datasets],
            "batches_consumed": self.batches_consumed,
            "readers": copy.deepcopy(self.reader_states),
            "bad_clips": copy.deepcopy(self.bad_clips),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        same_layout = (
            state["world_size"] == self.world_size
            and state["num_readers_per_rank"] == self.num_readers_per_rank
            and state["seed"] == self.config.seed
            and state["datasets"] == [spec.name for spec in self.config.datasets]
        )
        self.batches_consumed = state["batches_consumed"]
        if same_layout:
            self.reader_states = {int(k): v for k, v in state["readers"].items()}
            self.bad_clips = {int(k): v for k, v in state["bad_clips"].items()}
            return
        log.warning(
            "loader state from %d ranks x %d readers (seed %s, datasets %s) does not match this run (%d x %d, "
            "seed %s): restarting each dataset at the earliest epoch any reader was in, not sample-exact",
            state["world_size"], state["num_readers_per_rank"], state["seed"], state["datasets"],
            self.world_size, self.num_readers_per_rank, self.config.seed,
        )
        self.reader_states = self._epoch_restart_states(state)
        self.bad_clips = {}

    def _epoch_restart_states(self, state: dict) -> dict[int, dict]:
        names = [spec.name for spec in self.config.datasets]
        epochs: dict[str, list[int]] = {name: [] for name in names}
        for reader_state in state["readers"].values():
            for name, cursor in zip(state["datasets"], reader_state["block_start"]):
                if name in epochs:
                    epochs[name].append(cursor["epoch"])
        start = {
            "block_start": [Cursor(epoch=min(epochs[name], default=0)).as_dict() for name in names],
            "tracker": {"clips": 0, "bad": {}},
            # fresh block numbers, so the mixture draws do not repeat those of the first blocks
            "block_id": 1 + max((r["block_id"] for r in state["readers"].values()), default=0),
            "index_in_block": 0,
        }
        return {reader: copy.deepcopy(start) for reader in range(self.num_readers_per_rank)}
