"""The DALI decoding path (CPU pipelines, VP9 shards) behind the loader's FrameDecoder interface."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: the DALI decoder cannot be tested")

from lapa_dist.data.config import DataConfig
from lapa_dist.data.dali_decoder import DaliDecoder
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.data.loader import ReaderStream, VideoLoader, to_batch
from lapa_dist.data.reader import BadSample, iter_raw_samples
from lapa_dist.data.samples import PyAVDecoder, plan_clip
from lapa_dist.data.video import encode_video
from tests.shard_helpers import frame_index, index_clip, index_set, write_set

H = 5


def config(path, **overrides) -> DataConfig:
    base = {
        "datasets": [{"name": "d", "path": str(path), "offset_frames": H}],
        "image_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        "samples_per_clip": 3,
        "shuffle_block_clips": 3,
        "decoder": "dali",
        "dali_device": "cpu",
    }
    return DataConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def vp9_set(tmp_path_factory):
    return index_set(
        tmp_path_factory.mktemp("dali") / "vp9", num_shards=2, clips_per_shard=3, num_frames=14, codec="vp9"
    )


def smooth_clip(key: str, num_frames: int, height: int, width: int) -> Clip:
    """Colour waves moving over time: smooth content with chroma detail, to compare resizers."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    t = np.arange(num_frames)[:, None, None] / num_frames
    red = 128 + 100 * np.sin(2 * np.pi * (xx + t))
    green = 128 + 100 * np.cos(2 * np.pi * (1.5 * yy - t))
    blue = np.broadcast_to(128 + 80 * np.sin(2 * np.pi * (xx + yy)), red.shape)
    frames = np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8)
    meta = ClipMeta(
        instruction="", fps=10, num_frames=num_frames, width=width, height=height, source="test", episode_id=key
    )
    return Clip(key=key, frames=frames, meta=meta)


def plans_of(cfg: DataConfig, shard_set):
    shards = sorted(shard_set.glob("shard-*.tar"))
    raws = [raw for shard in shards for raw in iter_raw_samples(shard)]
    return [plan_clip(cfg, cfg.datasets[0], raw, epoch=0) for raw in raws]


def test_reader_stream_frame_indices_exact(vp9_set):
    cfg = config(vp9_set)
    stream = ReaderStream(cfg, 0, 1, decoder=DaliDecoder(cfg))
    for wire in itertools.islice(stream.batches(), 6):  # 24 samples: 3 blocks of 3 clips x 3 pairs
        batch = to_batch(wire)
        assert batch["x_t"].shape == (4, 3, 32, 32) and batch["x_t"].dtype == torch.uint8
        np.testing.assert_array_equal(frame_index(batch["x_t"]), batch["t"].numpy())
        np.testing.assert_array_equal(frame_index(batch["x_next"]), batch["t"].numpy() + H)
    assert stream.tracker.state_dict() == {"clips": 9, "bad": {}}


def test_unsorted_repeated_indices_match_pyav(vp9_set, tmp_path):
    smooth_set = write_set(
        tmp_path / "smooth", [[smooth_clip("s0", 12, 96, 128), smooth_clip("s1", 12, 64, 64)]], codec="vp9"
    )
    cfg = config(vp9_set, image_size=64, shuffle_block_clips=4)
    plans = plans_of(cfg, vp9_set)[:2] + plans_of(cfg, smooth_set)
    plans = [dataclasses.replace(plan, indices=[9, 2, 9, 0, 11, 2]) for plan in plans]
    assert [plan.size for plan in plans] == [(64, 64), (64, 64), (85, 64), (64, 64)]  # resized and kept alike
    for plan, dali, pyav in zip(plans, DaliDecoder(cfg).decode(plans), PyAVDecoder().decode(plans)):
        assert dali.shape == pyav.shape == (6, plan.size[1], plan.size[0], 3) and dali.dtype == np.uint8
        # measured 0.1-3.1: swscale's RGB conversion (PyAV) is ~1 level bright and upsamples chroma coarsely
        assert np.abs(dali.astype(int) - pyav).mean() < 4.0, plan.raw.key
        if plan.raw.key.startswith("c"):  # index clips: frame i has grey level 6 i + 8
            as_torch = torch.from_numpy(dali).permute(0, 3, 1, 2)
            np.testing.assert_array_equal(frame_index(as_torch), plan.indices)


def broken_clips() -> list[Clip]:
    """Two good VP9 clips around two that DALI cannot decode, all claiming 14 frames."""
    garbage = dataclasses.replace(index_clip("garbage", 14), video_bytes=b"\x00\x00\x00\x18ftypmp42" + b"x" * 400)
    short_video = encode_video(index_clip("short", 6).frames, fps=10, codec="vp9")  # frames >= 6 are missing
    lying = dataclasses.replace(index_clip("short", 14), video_bytes=short_video)
    for clip in (garbage, lying):
        clip.meta = clip.meta.model_copy(update={"codec": "vp9"})
    good = [index_clip(f"good{i}", 14) for i in range(2)]
    return [good[0], garbage, lying, good[1]]


def test_bad_clip_fails_alone_in_its_block(tmp_path):
    shard_set = write_set(tmp_path / "broken", [broken_clips()], codec="vp9")
    cfg = config(shard_set, shuffle_block_clips=4)
    plans = plans_of(cfg, shard_set)
    results = DaliDecoder(cfg).decode(plans)
    outcome = {
        plan.raw.key: result.reason if isinstance(result, BadSample) else "ok" for plan, result in zip(plans, results)
    }
    assert outcome == {"good0": "ok", "garbage": "undecodable_video", "short": "undecodable_video", "good1": "ok"}
    assert "out-of-bounds frame index" in results[2].detail

    stream = ReaderStream(cfg, 0, 1, decoder=DaliDecoder(cfg))
    block = [sample for sample, _ in itertools.islice(stream.samples(), 2 * cfg.samples_per_clip)]
    assert sorted({sample["key"] for sample in block}) == ["good0", "good1"]
    assert stream.tracker.state_dict() == {"clips": 4, "bad": {"undecodable_video": 2}}


def test_empty_video_is_a_bad_sample(vp9_set):
    cfg = config(vp9_set)
    plans = plans_of(cfg, vp9_set)[:2]
    plans[0].raw.members["mp4"] = b""
    empty, good = DaliDecoder(cfg).decode(plans)
    assert isinstance(empty, BadSample) and empty.reason == "empty_video"
    assert good.shape == (2 * cfg.samples_per_clip, 32, 32, 3)


def test_h264_with_cpu_decoder_is_a_config_error(tmp_path):
    h264_set = index_set(tmp_path / "h264", num_shards=1, clips_per_shard=2, num_frames=8)
    cfg = config(h264_set)
    stream = ReaderStream(cfg, 0, 1, decoder=DaliDecoder(cfg))
    with pytest.raises(ValueError, match=r"data.dali_device='cpu'.*cannot decode h264.*dali_device='mixed'"):
        next(stream.batches())


def test_video_loader_with_dali_resumes_exactly(vp9_set):
    cfg = config(vp9_set)
    ids = lambda batches: [(k, int(t)) for b in batches for k, t in zip(b["key"], b["t"])]  # noqa: E731
    uninterrupted = ids(itertools.islice(iter(VideoLoader(cfg)), 8))
    first = VideoLoader(cfg)
    head = ids(itertools.islice(iter(first), 3))
    resumed = VideoLoader(cfg)
    resumed.load_state_dict(first.state_dict())
    assert head + ids(itertools.islice(iter(resumed), 5)) == uninterrupted
    with pytest.raises(ValueError, match="set num_workers to 0"):
        config(vp9_set, num_workers=2)
