"""Reading every action of a shard set without decoding video: what the action tokenizer is fitted on."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import numpy as np

from lapa_dist.data.config import DatasetSpec
from lapa_dist.data.reader import ParsedSample, iter_parsed_samples


def read_actions(datasets: list[DatasetSpec], max_clips: int | None = None) -> tuple[np.ndarray, Counter]:
    """All per-frame actions [N, action_dim] float32 of the datasets' readable clips (shards in manifest order,
    the first ``max_clips`` readable clips when given) and the clips skipped, by reason (bad clips, clips without
    actions).

    Every dataset must have the same action_dim; a mismatch is an error naming both datasets.
    """
    rows: list[np.ndarray] = []
    skipped: Counter = Counter()
    first: tuple[str, int] | None = None  # (dataset, action_dim) of the first clip with actions
    for spec, parsed in itertools.islice(_readable_clips(datasets, skipped), max_clips):
        actions = parsed.actions
        if actions is None:
            skipped["no_actions"] += 1
            continue
        if first is None:
            first = (spec.name, actions.shape[1])
        elif actions.shape[1] != first[1]:
            raise ValueError(f"dataset {spec.name!r} has actions of dimension {actions.shape[1]} but "
                             f"{first[0]!r} has {first[1]}: one action tokenizer needs one action space")
        rows.append(actions)
    if not rows:
        raise ValueError("no clip with actions in the finetuning data: action finetuning needs actions.npy")
    return np.concatenate(rows), skipped  # [N, action_dim]


def _readable_clips(datasets: list[DatasetSpec], skipped: Counter) -> Iterator[tuple[DatasetSpec, ParsedSample]]:
    for spec in datasets:
        for parsed in iter_parsed_samples(spec.path, skipped):
            yield spec, parsed
