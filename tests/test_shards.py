import numpy as np
import pytest

from lapa_dist.data.convert import convert
from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import read_shard_clips
from lapa_dist.data.sources.sprites import SpriteSource, make_sprite_clip
from lapa_dist.data.writer import ShardWriter
from tests.shard_helpers import index_clip


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_writer_round_trip(tmp_path, codec):
    clips = [make_sprite_clip(i, num_frames=10, size=48) for i in range(3)]
    with ShardWriter(tmp_path / "shard-000000.tar", codec=codec) as writer:
        for clip in clips:
            writer.write(clip)
    back = list(read_shard_clips(tmp_path / "shard-000000.tar"))
    assert [c.key for c in back] == [c.key for c in clips]
    for original, decoded in zip(clips, back):
        assert np.abs(original.frames.astype(int) - decoded.frames).mean() < 3
        np.testing.assert_array_equal(original.actions, decoded.actions)
        assert decoded.meta.instruction == original.meta.instruction and decoded.meta.codec == codec


def test_writer_rejects_bad_clips(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as writer:
        clip = index_clip("a.b", 5)
        with pytest.raises(ValueError, match="key may hold only"):
            writer.write(clip)
        clip = index_clip("a", 5)
        clip.actions = clip.actions[:-1]
        with pytest.raises(ValueError, match=r"actions must be float32 \[num_frames - 1 = 4"):
            writer.write(clip)
        clip = index_clip("a", 5)
        clip.meta.num_frames = 6
        with pytest.raises(ValueError, match="disagree with json"):
            writer.write(clip)


def test_aborted_shard_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "shard-000000.tar") as writer:
            writer.write(index_clip("a", 5))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_convert_resumes_and_counts(tmp_path):
    manifest = convert(SpriteSource(clips=10, num_frames=6, size=32), tmp_path, units_per_shard=4, progress=False)
    assert (len(manifest.shards), manifest.clips, manifest.frames) == (3, 10, 60)
    assert manifest.shards[2].keys == [f"sprites-{i:08d}" for i in (8, 9)]
    shard1 = tmp_path / "shard-000001.tar"
    mtime = shard1.stat().st_mtime_ns
    (tmp_path / "shard-000002.tar.json").unlink()  # an unfinished shard is redone, finished ones kept
    again = convert(SpriteSource(clips=10, num_frames=6, size=32), tmp_path, units_per_shard=4, processes=2,
                    progress=False)
    assert shard1.stat().st_mtime_ns == mtime
    assert again == manifest == Manifest.read(tmp_path)
