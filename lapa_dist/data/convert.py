"""The converter driver: turns any :class:`Source` into a shard set, in parallel and resumably.

A source lists its work units (videos, TFRecord files, episodes, ...) in a deterministic order; the
driver groups consecutive units into shards, so shard k always holds the same units, converts the
shards in a process pool, skips shards already finished on a re-run, and writes the manifest. Each
process holds one clip at a time, so memory is bounded whatever the dataset size.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lapa_dist.data.format import SHARD_PATTERN, Clip, Manifest, sidecar_path
from lapa_dist.data.writer import ShardWriter

log = logging.getLogger(__name__)


class SkipClip(Exception):
    """Raised by a source for a clip it cannot convert; the driver skips and counts it by reason."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        super().__init__(f"{key}: {reason} {detail}".strip())
        self.key, self.reason, self.detail = key, reason, detail


class Source(ABC):
    """A dataset on disk that the driver can convert. Subclasses are picklable (sent to workers)."""

    name: str = ""
    default_units_per_shard: int = 64

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this source's command-line options."""

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace) -> Source:
        """Build the source from parsed options, checking that its inputs exist."""

    @abstractmethod
    def work_units(self) -> Sequence[Any]:
        """Picklable units of work in a deterministic order."""

    @abstractmethod
    def clips(self, unit: Any) -> Iterator[Clip]:
        """The clips of one unit. Raise or yield :class:`SkipClip` for a clip that cannot be converted."""


@dataclass
class ShardJob:
    source: Source
    index: int
    units: Sequence[Any]
    shard_path: Path
    codec: str
    crf: int


def _with_skips(clips: Iterator[Clip]) -> Iterator[Clip | SkipClip]:
    """A source may yield a SkipClip and go on, or raise one, which ends its iterator: both become items."""
    try:
        yield from clips
    except SkipClip as skip:
        yield skip


def _convert_shard(job: ShardJob) -> Counter:
    """Write one shard; returns the clips skipped, by reason."""
    with ShardWriter(job.shard_path, codec=job.codec, crf=job.crf) as writer:
        for unit in job.units:
            for item in _with_skips(job.source.clips(unit)):
                if isinstance(item, SkipClip):
                    writer.skipped[item.reason] += 1
                    log.warning("skipped %s", item)
                else:
                    writer.write(item)
    return writer.skipped


def convert(
    source: Source,
    output: str | os.PathLike,
    units_per_shard: int | None = None,
    processes: int = 1,
    codec: str = "h264",
    crf: int = 18,
    progress: bool = True,
) -> Manifest:
    """Convert ``source`` into a shard set in ``output``; finished shards are kept and skipped."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    units = list(source.work_units())
    if not units:
        raise ValueError(f"source {source.name!r}: found nothing to convert")
    per_shard = units_per_shard or source.default_units_per_shard
    if per_shard < 1:
        raise ValueError(f"units_per_shard must be >= 1, got {per_shard}")
    jobs = []
    for index, start in enumerate(range(0, len(units), per_shard)):
        shard_path = output / SHARD_PATTERN.format(index=index)
        if shard_path.is_file() and sidecar_path(shard_path).is_file():
            continue
        jobs.append(ShardJob(source, index, units[start : start + per_shard], shard_path, codec, crf))
    total_shards = -(-len(units) // per_shard)
    log.info("%s: %d units -> %d shards, %d to write", source.name, len(units), total_shards, len(jobs))
    skipped: Counter = Counter()
    bar = tqdm(total=len(jobs), desc=f"{source.name} shards", unit="shard", disable=not progress)
    if processes > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(processes, len(jobs))) as pool:
            for job_skipped in pool.imap_unordered(_convert_shard, jobs):
                skipped.update(job_skipped)
                bar.update()
    else:
        for job in jobs:
            skipped.update(_convert_shard(job))
            bar.update()
    bar.close()
    if skipped:
        log.warning("%s: skipped clips by reason: %s", source.name, dict(skipped))
    manifest = Manifest.gather(output, source=source.name)
    manifest.write(output)
    return manifest
