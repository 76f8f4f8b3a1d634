"""VideoFolderSource: a folder of mp4/webm files with a JSONL or CSV manifest, round-tripped through shards."""

import argparse
import csv
import json

import numpy as np
import pytest

from lapa_dist.data.sources.videos import VideoFolderSource
from tests.video_helpers import (
    convert_and_read,
    mean_abs_error,
    smooth_frames,
    write_video,
)

MAX_MEAN_ABS_ERROR = 3.0  # two lossy encodes (the test file, then the shard) of smooth content


@pytest.fixture
def folder(tmp_path):
    """Two clips: an H.264 mp4 with actions and an odd-width VP9 webm in a subfolder without."""
    videos = tmp_path / "videos"
    frames_a = smooth_frames(12, 48, 64, seed=1)
    frames_b = smooth_frames(15, 32, 45, seed=2)
    write_video(videos / "a.mp4", frames_a, fps=10)
    write_video(videos / "sub" / "b.webm", frames_b, fps=12, codec="libvpx-vp9")
    actions_a = np.random.default_rng(0).normal(size=(11, 3)).astype(np.float32)
    np.save(videos / "a_actions.npy", actions_a)
    return videos, {"a": frames_a, "b": frames_b}, actions_a


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def good_rows():
    return [
        {"path": "a.mp4", "instruction": "pick up the cup", "actions": "a_actions.npy", "episode_id": 7},
        {"path": "sub/b.webm", "instruction": "", "episode_id": "ep-b"},
    ]


def test_jsonl_round_trip(folder, tmp_path):
    videos, frames, actions_a = folder
    manifest_path = write_jsonl(tmp_path / "manifest.jsonl", good_rows())
    manifest, clips = convert_and_read(VideoFolderSource(str(videos), str(manifest_path)), tmp_path / "out")
    assert manifest.clips == 2 and manifest.skipped == {}
    a, b = clips["video-00000001"], clips["video-00000002"]
    assert a.meta.instruction == "pick up the cup" and a.meta.episode_id == "7"
    assert (a.meta.fps, a.meta.num_frames, a.meta.width, a.meta.height, a.meta.action_dim) == (10, 12, 64, 48, 3)
    assert mean_abs_error(a.frames, frames["a"]) < MAX_MEAN_ABS_ERROR
    np.testing.assert_array_equal(a.actions, actions_a)
    # The odd width 45 is cropped to 44; the frame rate comes from the webm container.
    assert b.meta.instruction == "" and b.meta.episode_id == "ep-b" and b.actions is None
    assert (b.meta.fps, b.meta.num_frames, b.meta.width, b.meta.height) == (12, 15, 44, 32)
    assert mean_abs_error(b.frames, frames["b"][:, :, :44]) < MAX_MEAN_ABS_ERROR


def test_csv_manifest_with_empty_optional_cells_and_fps(folder, tmp_path):
    videos, _, actions_a = folder
    manifest_path = tmp_path / "manifest.csv"
    with open(manifest_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "instruction", "actions", "fps"])
        writer.writerow(["a.mp4", "open the drawer, slowly", "a_actions.npy", "30"])
        writer.writerow(["sub/b.webm", "wipe the table", "", ""])
    _, clips = convert_and_read(VideoFolderSource(str(videos), str(manifest_path)), tmp_path / "out")
    a, b = clips["video-00000002"], clips["video-00000003"]  # CSV line numbers, after the header
    assert (a.meta.instruction, a.meta.fps, a.meta.episode_id) == ("open the drawer, slowly", 30, "a.mp4")
    np.testing.assert_array_equal(a.actions, actions_a)
    assert (b.meta.instruction, b.meta.fps, b.actions) == ("wipe the table", 12, None)


def test_resize_and_max_frames_from_command_line(folder, tmp_path):
    videos, _, actions_a = folder
    manifest_path = write_jsonl(tmp_path / "manifest.jsonl", good_rows())
    parser = argparse.ArgumentParser()
    VideoFolderSource.add_arguments(parser)
    args = parser.parse_args(["--videos-dir", str(videos), "--manifest", str(manifest_path),
                              "--resize", "33", "--max-frames", "5"])
    _, clips = convert_and_read(VideoFolderSource.from_args(args), tmp_path / "out")
    a, b = clips["video-00000001"], clips["video-00000002"]
    # 64x48 -> 44x33 -> cropped to 44x32; 45x32 -> 46x33 -> 46x32.
    assert a.frames.shape == (5, 32, 44, 3) and (a.meta.width, a.meta.height) == (44, 32)
    assert b.frames.shape == (5, 32, 46, 3)
    np.testing.assert_array_equal(a.actions, actions_a[:4])  # checked against all 12 frames, then cut


def test_bad_rows_are_skipped_and_counted(folder, tmp_path):
    videos, _, actions_a = folder
    (videos / "broken.mp4").write_bytes(b"not a video at all" * 10)
    np.save(videos / "short.npy", actions_a[:5])
    np.save(videos / "flat.npy", actions_a[:, 0])
    rows = good_rows() + [
        {"path": "gone.mp4", "instruction": "x"},
        {"path": "broken.mp4", "instruction": "x"},
        {"path": "a.mp4", "instruction": "x", "actions": "short.npy"},
        {"path": "a.mp4", "instruction": "x", "actions": "flat.npy"},
        {"path": "a.mp4", "instruction": "x", "actions": "nowhere.npy"},
    ]
    manifest_path = write_jsonl(tmp_path / "manifest.jsonl", rows)
    manifest, clips = convert_and_read(  # skips are counted across shards and worker processes
        VideoFolderSource(str(videos), str(manifest_path)), tmp_path / "out", units_per_shard=3, processes=2
    )
    assert sorted(clips) == ["video-00000001", "video-00000002"]
    assert manifest.skipped == {"missing_video": 1, "undecodable_video": 1, "bad_actions": 2, "missing_actions": 1}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"path": "a.mp4", "instruction": "x"}, {"path": "a.mp4"}], "line 2: missing column 'instruction'"),
        ([{"instruction": "x"}], "line 1: missing column 'path'"),
        ([{"path": "a.mp4", "instruction": "x", "action": "a.npy"}], r"line 1: unknown column\(s\) \['action'\]"),
        ([{"path": "a.mp4", "instruction": "x", "fps": "fast"}], "line 1: column 'fps' is 'fast'"),
        ([{"path": "a.mp4", "instruction": "x", "fps": -3}], "line 1: column 'fps' must be a positive number"),
        ([{"path": "", "instruction": "x"}], "line 1: column 'path' is empty"),
    ],
)
def test_malformed_jsonl_manifest_fails_before_converting(folder, tmp_path, rows, message):
    videos, _, _ = folder
    manifest_path = write_jsonl(tmp_path / "manifest.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        convert_and_read(VideoFolderSource(str(videos), str(manifest_path)), tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*"))


def test_malformed_csv_and_manifest_kinds(folder, tmp_path):
    videos, _, _ = folder
    header_only_path = tmp_path / "m.csv"
    header_only_path.write_text("path,task\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"line 1: header lacks column\(s\) \['instruction'\]"):
        VideoFolderSource(str(videos), str(header_only_path)).work_units()
    short_row_path = tmp_path / "short.csv"
    short_row_path.write_text("path,instruction\na.mp4,x\nb.mp4\n")
    with pytest.raises(ValueError, match="line 3: missing column 'instruction'"):
        VideoFolderSource(str(videos), str(short_row_path)).work_units()
    long_row_path = tmp_path / "long.csv"
    long_row_path.write_text("path,instruction\na.mp4,x,extra\n")
    with pytest.raises(ValueError, match="line 2: more cells than the header"):
        VideoFolderSource(str(videos), str(long_row_path)).work_units()
    bad_json_path = tmp_path / "m.jsonl"
    bad_json_path.write_text('{"path": "a.mp4", "instruction": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        VideoFolderSource(str(videos), str(bad_json_path)).work_units()
    text_path = tmp_path / "m.txt"
    text_path.write_text("a.mp4\n")
    with pytest.raises(ValueError, match="must end in .jsonl or .csv"):
        VideoFolderSource(str(videos), str(text_path)).work_units()
    with pytest.raises(FileNotFoundError, match="--manifest"):
        VideoFolderSource(str(videos), str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="--max-frames 1"):
        VideoFolderSource(str(videos), str(bad_json_path), max_frames=1)
