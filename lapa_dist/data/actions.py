"""Reading every action of a shard set without decoding video: what the action tokenizer is fitted on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from lapa_dist.data.config import DatasetSpec
from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import BadSample, iter_raw_samples, parse_arrays, parse_meta


def read_actions(datasets: list[DatasetSpec], max_clips: int | None = None) -> tuple[np.ndarray, Counter]:
    """All per-frame actions [N, action_dim] float32 of the datasets' clips (shards in manifest order, the
    first ``max_clips`` clips when given) and the clips skipped, by reason (bad clips, clips without actions).

    Every dataset must have the same action_dim; a mismatch is an error naming both datasets.
    """
    rows: list[np.ndarray] = []
    skipped: Counter = Counter()
    first: tuple[str, int] | None = None  # (dataset, action_dim) of the first clip with actions
    clips = 0
    for spec in datasets:
        manifest = Manifest.read(spec.path)
        for shard in manifest.shards:
            for sample in iter_raw_samples(Path(spec.path) / shard.name):
                if max_clips is not None and clips >= max_clips:
                    return _stack(rows, first), skipped
                clips += 1
                try:
                    if isinstance(sample, BadSample):
                        raise sample
                    actions, _ = parse_arrays(sample, parse_meta(sample))
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    continue
                if actions is None:
                    skipped["no_actions"] += 1
                    continue
                if first is None:
                    first = (spec.name, actions.shape[1])
                elif actions.shape[1] != first[1]:
                    raise ValueError(f"dataset {spec.name!r} has actions of dimension {actions.shape[1]} but "
                                     f"{first[0]!r} has {first[1]}: one action tokenizer needs one action space")
                rows.append(actions)
    return _stack(rows, first), skipped


def _stack(rows: list[np.ndarray], first: tuple[str, int] | None) -> np.ndarray:
    if not rows:
        raise ValueError("no clip with actions in the finetuning data: action finetuning needs actions.npy")
    return np.concatenate(rows)  # [N, action_dim]
