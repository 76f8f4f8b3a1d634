import io
import itertools
import json
import logging
import tarfile
from collections import Counter

import av
import numpy as np
import pytest

from lapa_dist.data.actions import read_actions
from lapa_dist.data.config import DataConfig, DatasetSpec
from lapa_dist.data.format import Manifest, npy_bytes
from lapa_dist.data.loader import VideoLoader
from lapa_dist.data.reader import iter_parsed_samples
from lapa_dist.data.video import encode_video
from tests.shard_helpers import index_clip, index_set, write_set
from tools import check_shards

H = 3


def members_of(clip):
    return {
        "mp4": encode_video(clip.frames, clip.meta.fps),
        "json": clip.meta.model_dump_json().encode(),
        "actions.npy": npy_bytes(clip.actions),
    }


def empty_mp4() -> bytes:
    """What the mp4 muxer writes for a stream that never got a frame: nothing."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
    assert buffer.getvalue() == b""
    return buffer.getvalue()


def bad_samples() -> dict[str, dict[str, bytes]]:
    """One sample per bad-data case, keyed by the reason the loader must report."""
    good = members_of(index_clip("x", 12))
    short = members_of(index_clip("x", H))  # needs H + 1 frames
    wrong_actions = dict(good, **{"actions.npy": npy_bytes(np.zeros((5, 2), np.float32))})
    missing_field = json.loads(good["json"])
    del missing_field["fps"]
    return {
        "undecodable_video": dict(good, mp4=b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50),
        "empty_video": dict(good, mp4=empty_mp4()),
        "missing_json": {k: v for k, v in good.items() if k != "json"},
        "invalid_json": dict(good, json=b"{not json"),
        "missing_video": {k: v for k, v in good.items() if k != "mp4"},
        "too_short": short,
        "bad_actions": wrong_actions,
        "invalid_json_field": dict(good, json=json.dumps(missing_field).encode()),
    }


def write_tar(path, samples: dict[str, dict[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def add_shard(directory, name, samples: dict | None = None, raw: bytes | None = None, keys=()):
    """Add a hand-made shard to a set and to its manifest."""
    if raw is None:
        write_tar(directory / name, samples)
    else:
        (directory / name).write_bytes(raw)
    manifest = Manifest.read(directory)
    entry = manifest.shards[0].model_copy(update={"name": name, "keys": list(samples or keys)})
    manifest.shards.append(entry)
    manifest.clips += entry.clips
    manifest.write(directory)


def truncated_shard(tmp_path) -> bytes:
    write_set(tmp_path / "whole", [[index_clip(f"t{i}", 12) for i in range(4)]])
    data = (tmp_path / "whole" / "shard-000000.tar").read_bytes()
    return data[: len(data) // 2]  # t0 and t1 stay readable


@pytest.fixture
def dirty_set(tmp_path):
    """Shard 0: 6 good clips; shard 1: every bad case, each followed by a good clip."""
    directory = index_set(tmp_path / "dirty", num_shards=1, clips_per_shard=6, num_frames=12)
    samples = {}
    for i, (reason, members) in enumerate(bad_samples().items()):
        samples[f"bad-{reason.replace('_', '-')}"] = members
        samples[f"good{i:02d}"] = members_of(index_clip(f"good{i:02d}", 12))
    add_shard(directory, "shard-000001.tar", samples)
    return directory


def read(directory, samples, max_bad_fraction=1.0):
    cfg = DataConfig(
        datasets=[{"name": "d", "path": str(directory), "offset_frames": H}], image_size=32, batch_size=1,
        num_workers=0, samples_per_clip=1, shuffle_block_clips=1, max_bad_fraction=max_bad_fraction, bad_check_after=5,
    )
    loader = VideoLoader(cfg)
    keys = [k for batch in itertools.islice(iter(loader), samples) for k in batch["key"]]
    return loader, keys


def test_loader_skips_and_counts_every_bad_case(dirty_set, caplog):
    caplog.set_level(logging.WARNING)
    loader, keys = read(dirty_set, 14)  # the 14 good clips: one epoch, every bad clip read once
    expected = {"undecodable_video": 1, "empty_video": 1, "missing_json": 1, "invalid_json": 2, "missing_video": 1,
                "too_short": 1, "bad_actions": 1}
    assert loader.bad_counts() == {"clips": 22, "bad": expected}
    assert sorted(keys) == sorted([f"c000_{i:03d}" for i in range(6)] + [f"good{i:02d}" for i in range(8)])
    assert "bad-too-short: too_short" in caplog.text  # logged with its key


def test_loader_skips_rest_of_truncated_tar(tmp_path):
    directory = index_set(tmp_path / "set", num_shards=1, clips_per_shard=3)
    add_shard(directory, "shard-000001.tar", raw=truncated_shard(tmp_path), keys=[f"t{i}" for i in range(4)])
    loader, keys = read(directory, 6)  # 5 readable clips, then the first of epoch 2
    assert loader.bad_counts()["bad"] == {"truncated_tar": 1}
    assert {"t0", "t1"} <= set(keys) and not {"t2", "t3"} & set(keys)


def test_loader_stops_past_bad_fraction(dirty_set):
    with pytest.raises(RuntimeError, match=r"max_bad_fraction = 10.0%.*check_shards"):
        read(dirty_set, 14, max_bad_fraction=0.1)


def test_check_shards_counts_problems(dirty_set, tmp_path, capsys):
    add_shard(dirty_set, "shard-000002.tar", raw=truncated_shard(tmp_path), keys=[f"t{i}" for i in range(4)])
    assert check_shards.main([str(dirty_set), "--offset-frames", str(H)]) == 1
    out = capsys.readouterr().out
    for reason in ("undecodable_video", "empty_video", "missing_json", "invalid_json", "too_short", "bad_actions",
                   "truncated_tar", "missing_video"):
        assert reason in out


def test_check_shards_clean_set(tmp_path, capsys):
    clean = index_set(tmp_path / "clean", 2, 2)
    assert check_shards.main([str(clean)]) == 0
    assert "no problems" in capsys.readouterr().out
    assert check_shards.main([str(tmp_path)]) == 2


def test_parsed_samples_skip_and_count_what_does_not_parse(dirty_set, tmp_path):
    skipped = Counter()
    keys = [parsed.key for parsed in iter_parsed_samples(dirty_set, skipped)]
    # video problems (undecodable, empty, too short) need decoding: the parsed view keeps those clips
    assert skipped == Counter(missing_json=1, invalid_json=2, missing_video=1, bad_actions=1)
    assert len(keys) == 6 + 8 + 3 and "bad-too-short" in keys and "bad-missing-json" not in keys
    wanted = Counter()
    picked = [p.key for p in iter_parsed_samples(dirty_set, wanted, shards={"shard-000001.tar"}, keys={"good03"})]
    assert picked == ["good03"] and not wanted
    add_shard(dirty_set, "shard-000002.tar", raw=truncated_shard(tmp_path), keys=[f"t{i}" for i in range(4)])
    truncated = Counter()
    assert [p.key for p in iter_parsed_samples(dirty_set, truncated, shards={"shard-000002.tar"})] == ["t0", "t1"]
    assert truncated == Counter(truncated_tar=1)


def test_read_actions_counts_skips_limits_clips_and_refuses_mixed_action_spaces(tmp_path):
    with_actions = index_set(tmp_path / "a", num_shards=2, clips_per_shard=3, num_frames=12)
    write_set(tmp_path / "none", [[index_clip("n0", 12, action_dim=None)]])
    specs = [DatasetSpec(name="a", path=str(with_actions), offset_frames=H),
             DatasetSpec(name="none", path=str(tmp_path / "none"), offset_frames=H)]
    actions, skipped = read_actions(specs)
    assert actions.shape == (6 * 11, 2) and skipped == Counter(no_actions=1)
    first_two, _ = read_actions(specs, max_clips=2)
    np.testing.assert_array_equal(first_two, actions[:22])
    write_set(tmp_path / "wide", [[index_clip("w0", 12, action_dim=3)]])
    with pytest.raises(ValueError, match="'wide' has actions of dimension 3 but 'a' has 2"):
        read_actions([specs[0], DatasetSpec(name="wide", path=str(tmp_path / "wide"), offset_frames=H)])
    with pytest.raises(ValueError, match="no clip with actions"):
        read_actions(specs[1:])
