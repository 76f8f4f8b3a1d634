"""Validation of a whole shard set (tools/check_shards.py): decode everything, count problems."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import BadSample, decode_clip, iter_raw_samples


@dataclass
class CheckReport:
    clips: int = 0
    frames: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "shard: key: reason (detail)"

    def add(self, shard: str, bad: BadSample) -> None:
        self.problems[bad.reason] += 1
        self.examples.append(f"{shard}: {bad}")

    def summary(self, verbose: bool = False) -> str:
        lines = [f"{self.clips} clips checked, {self.frames} frames decoded"]
        if not self.problems:
            lines.append("no problems")
        for reason, count in sorted(self.problems.items()):
            lines.append(f"  {reason}: {count}")
        shown = self.examples if verbose else self.examples[:10]
        lines += [f"    {example}" for example in shown]
        if len(shown) < len(self.examples):
            lines.append(f"    ... {len(self.examples) - len(shown)} more (--verbose)")
        return "\n".join(lines)


def check_shard_set(directory: str | Path, offset_frames: int = 1) -> CheckReport:
    """Decode every clip of the set; also compare shard contents with the manifest."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    report = CheckReport()
    for shard in manifest.shards:
        path = directory / shard.name
        if not path.is_file():
            report.add(shard.name, BadSample(shard.name, "truncated_tar", "shard file missing"))
            continue
        keys_seen, problems_before = [], len(report.examples)
        for sample in iter_raw_samples(path):
            report.clips += 1
            if isinstance(sample, BadSample):
                report.add(shard.name, sample)
                continue
            keys_seen.append(sample.key)
            try:
                clip = decode_clip(sample)
                if len(clip.frames) != clip.meta.num_frames:
                    raise BadSample(sample.key, "undecodable_video",
                                    f"json says {clip.meta.num_frames} frames, video has {len(clip.frames)}")
                if clip.meta.num_frames < offset_frames + 1:
                    raise BadSample(sample.key, "too_short", f"{clip.meta.num_frames} frames < H + 1")
                report.frames += len(clip.frames)
            except BadSample as bad:
                report.add(shard.name, bad)
        if keys_seen != shard.keys and len(report.examples) == problems_before:  # bad clips explain a difference
            report.problems["manifest_mismatch"] += 1
            report.examples.append(f"{shard.name}: clips differ from the manifest's list")
    return report
