import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from lapa_dist.data.config import DataConfig
from lapa_dist.data.loader import VideoLoader
from tests.shard_helpers import frame_index, index_set


def config(datasets, **overrides) -> DataConfig:
    base = dict(
        datasets=datasets, image_size=32, batch_size=4, num_workers=0, samples_per_clip=3, shuffle_block_clips=2
    )
    base.update(overrides)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return index_set(tmp_path_factory.mktemp("data") / "a", num_shards=4, clips_per_shard=3, num_frames=14)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def sample_ids(batches):
    return [(k, int(t)) for b in batches for k, t in zip(b["key"], b["t"])]


def test_pair_offsets_and_targets_exact(shard_set):
    loader = VideoLoader(config([{"name": "a", "path": str(shard_set), "offset_frames": 5}]))
    for batch in take(loader, 6):
        assert batch["x_t"].shape == (4, 3, 32, 32) and batch["x_t"].dtype == torch.uint8
        np.testing.assert_array_equal(frame_index(batch["x_t"]), batch["t"].numpy())
        np.testing.assert_array_equal(frame_index(batch["x_next"]), batch["t"].numpy() + 5)
        # actions t .. t+H-1 take frame t to t+H; index_clip stores action value t in dim 0
        expected = batch["t"][:, None] + torch.arange(5)[None]
        torch.testing.assert_close(batch["actions"][..., 0], expected.float())
        assert batch["instruction"][0] == f"instruction of {batch['key'][0]}"


def test_offset_in_seconds_uses_fps(shard_set):
    loader = VideoLoader(config([{"name": "a", "path": str(shard_set), "offset_seconds": 0.3}]))  # fps 10 -> H = 3
    batch = take(loader, 1)[0]
    np.testing.assert_array_equal(frame_index(batch["x_next"]) - frame_index(batch["x_t"]), 3)


def test_frames_view_with_action_target(shard_set):
    cfg = config([{"name": "a", "path": str(shard_set), "offset_frames": 1}], view="frames", target="actions")
    batch = take(VideoLoader(cfg), 1)[0]
    assert "x_next" not in batch
    np.testing.assert_array_equal(frame_index(batch["x_t"]), batch["t"].numpy())
    torch.testing.assert_close(batch["target"][:, 0], batch["t"].float())


def test_readers_disjoint_over_ranks_and_workers(shard_set):
    """2 ranks x 2 workers read disjoint shards that together cover the set once per epoch."""
    cfg = config(
        [{"name": "a", "path": str(shard_set), "offset_frames": 2}],
        num_workers=2,
        samples_per_clip=1,
        batch_size=1,
        shuffle_block_clips=1,
    )
    per_rank = [sample_ids(take(VideoLoader(cfg, rank, 2), 6)) for rank in range(2)]  # 4 readers x 3 clips: one epoch
    keys = [{k for k, _ in ids} for ids in per_rank]
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 12
    shards_per_rank = [{k.split("_")[0] for k in ks} for ks in keys]
    assert not shards_per_rank[0] & shards_per_rank[1]


def test_clip_mode_when_fewer_shards_than_readers(tmp_path):
    small = index_set(tmp_path / "small", num_shards=1, clips_per_shard=8)
    cfg = config(
        [{"name": "s", "path": str(small), "offset_frames": 2}],
        num_workers=2,
        samples_per_clip=1,
        batch_size=1,
        shuffle_block_clips=1,
    )
    keys = [{k for k, _ in sample_ids(take(VideoLoader(cfg, rank, 2), 4))} for rank in range(2)]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(shard_set, workers):
    cfg = config([{"name": "a", "path": str(shard_set), "offset_frames": 2}], num_workers=workers)
    uninterrupted = sample_ids(take(VideoLoader(cfg), 40))  # > 1 epoch (12 clips x 3 samples = 9 batches)
    first = VideoLoader(cfg)
    head = sample_ids(take(first, 13))
    resumed = VideoLoader(cfg)
    resumed.load_state_dict(first.state_dict())
    tail = sample_ids(take(resumed, 27))
    assert head + tail == uninterrupted


def test_resume_with_other_worker_count_restarts_epoch(shard_set, caplog):
    cfg = config([{"name": "a", "path": str(shard_set), "offset_frames": 2}], num_workers=2)
    first = VideoLoader(cfg)
    take(first, 5)
    other = VideoLoader(cfg.model_copy(update={"num_workers": 0}))
    other.load_state_dict(first.state_dict())
    assert len(take(other, 3)) == 3
    assert "not sample-exact" in caplog.text


def test_mixture_weights(tmp_path):
    a = index_set(tmp_path / "a", 2, 4, prefix="a")
    b = index_set(tmp_path / "b", 2, 4, prefix="b")
    cfg = config(
        [
            {"name": "a", "path": str(a), "offset_frames": 1, "weight": 3.0},
            {"name": "b", "path": str(b), "offset_frames": 1, "weight": 1.0},
        ],
        samples_per_clip=1,
        batch_size=8,
        shuffle_block_clips=8,
    )
    counts = Counter(d for batch in take(VideoLoader(cfg), 50) for d in batch["dataset"])
    fraction_a = counts["a"] / sum(counts.values())
    assert abs(fraction_a - 0.75) < 0.05, counts


def test_augmentation_keeps_pair_consistent(shard_set):
    cfg = config([{"name": "a", "path": str(shard_set), "offset_frames": 4}], augment={"enabled": True})
    batch = take(VideoLoader(cfg), 1)[0]
    assert batch["x_t"].shape == (4, 3, 32, 32)
    # jitter changes levels, but identically for both frames: x_next - x_t keeps its sign everywhere
    assert (batch["x_next"].float().mean((1, 2, 3)) > batch["x_t"].float().mean((1, 2, 3))).all()


def test_deterministic_for_a_seed(shard_set):
    cfg = config([{"name": "a", "path": str(shard_set), "offset_frames": 2}])
    assert sample_ids(take(VideoLoader(cfg), 5)) == sample_ids(take(VideoLoader(cfg), 5))
    other = sample_ids(take(VideoLoader(cfg.model_copy(update={"seed": 1})), 5))
    assert other != sample_ids(take(VideoLoader(cfg), 5))
