"""SSv2Source: <id>.webm (VP9, 12 fps) plus the train/validation json and labels.json, round-tripped."""

import argparse
import json

import pytest

from lapa_dist.data.sources.ssv2 import SSv2Source
from tests.video_helpers import (
    convert_and_read,
    mean_abs_error,
    smooth_frames,
    write_video,
)

MAX_MEAN_ABS_ERROR = 3.0  # two lossy encodes (the test webm, then the shard) of smooth content

LABELS = {"Putting something on a surface": "0", "Pushing something from left to right": "1"}
ANNOTATIONS = [
    {"id": "101", "label": "putting a cup on a table", "template": "Putting [something] on a surface",
     "placeholders": ["a cup"]},
    {"id": "202", "label": "pushing a pen from left to right", "template": "Pushing [something] from left to right",
     "placeholders": ["a pen"]},
    {"id": "303", "label": "putting a box on a table", "template": "Putting [something] on a surface",
     "placeholders": ["a box"]},
]


@pytest.fixture
def ssv2(tmp_path):
    """Videos 101 (even width) and 202 (odd width, as SSv2 widths vary); 303 has no video."""
    videos = tmp_path / "20bn-something-something-v2"
    frames = {"101": smooth_frames(14, 32, 48, seed=3), "202": smooth_frames(10, 32, 43, seed=4)}
    for video_id, video_frames in frames.items():
        write_video(videos / f"{video_id}.webm", video_frames, fps=12, codec="libvpx-vp9")
    annotations = tmp_path / "something-something-v2-validation.json"
    annotations.write_text(json.dumps(ANNOTATIONS))
    labels = tmp_path / "something-something-v2-labels.json"
    labels.write_text(json.dumps(LABELS))
    return videos, annotations, labels, frames


def test_round_trip_with_labels(ssv2, tmp_path):
    videos, annotations, labels, frames = ssv2
    source = SSv2Source(str(videos), str(annotations), str(labels))
    manifest, clips = convert_and_read(source, tmp_path / "out", units_per_shard=2, processes=2)
    assert sorted(clips) == ["ssv2-101", "ssv2-202"]
    assert manifest.skipped == {"missing_video": 1}
    cup, pen = clips["ssv2-101"], clips["ssv2-202"]
    assert cup.meta.instruction == "putting a cup on a table" and cup.meta.episode_id == "101"
    assert cup.meta.extra == {"template": "Putting [something] on a surface", "placeholders": ["a cup"],
                              "class_index": 0}
    assert (cup.meta.fps, cup.meta.num_frames, cup.meta.width, cup.meta.height) == (12, 14, 48, 32)
    assert mean_abs_error(cup.frames, frames["101"]) < MAX_MEAN_ABS_ERROR
    assert pen.meta.extra["class_index"] == 1 and pen.meta.instruction == "pushing a pen from left to right"
    assert (pen.meta.num_frames, pen.meta.width, pen.meta.height) == (10, 42, 32)  # odd width 43 cropped
    assert mean_abs_error(pen.frames, frames["202"][:, :, :42]) < MAX_MEAN_ABS_ERROR
    assert cup.actions is None


def test_without_labels_and_with_resize_from_command_line(ssv2, tmp_path):
    videos, annotations, _, _ = ssv2
    parser = argparse.ArgumentParser()
    SSv2Source.add_arguments(parser)
    args = parser.parse_args(["--videos-dir", str(videos), "--annotations", str(annotations), "--resize", "16"])
    _, clips = convert_and_read(SSv2Source.from_args(args), tmp_path / "out")
    cup = clips["ssv2-101"]
    assert cup.meta.extra == {"template": "Putting [something] on a surface", "placeholders": ["a cup"]}
    assert cup.frames.shape == (14, 16, 24, 3)  # 48x32 -> 24x16
    assert clips["ssv2-202"].frames.shape == (10, 16, 22, 3)  # 43x32 -> 21.5x16, rounded to 22x16


def test_undecodable_video_is_skipped(ssv2, tmp_path):
    videos, annotations, labels, _ = ssv2
    (videos / "303.webm").write_bytes(b"\x1a\x45\xdf\xa3" + b"garbage" * 50)
    manifest, clips = convert_and_read(SSv2Source(str(videos), str(annotations), str(labels)), tmp_path / "out")
    assert sorted(clips) == ["ssv2-101", "ssv2-202"]
    assert manifest.skipped == {"undecodable_video": 1}


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"id": "101"}], "entry 0: missing string field 'label'"),
        ([ANNOTATIONS[0], {**ANNOTATIONS[1], "template": "Dropping [something]"}],
         "entry 1: template 'Dropping \\[something\\]' \\('Dropping something'\\) is not in labels.json"),
        ([{**ANNOTATIONS[0], "id": "../101"}], "entry 0: id '../101' may hold only"),
        ([{**ANNOTATIONS[0], "placeholders": "a cup"}], "entry 0: 'placeholders' must be a list of strings"),
        ({"101": ANNOTATIONS[0]}, "expected a JSON array"),
    ],
)
def test_malformed_annotations_fail_before_converting(ssv2, tmp_path, entries, message):
    videos, annotations, labels, _ = ssv2
    annotations.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        convert_and_read(SSv2Source(str(videos), str(annotations), str(labels)), tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*"))


def test_missing_inputs_are_named(ssv2, tmp_path):
    videos, annotations, _, _ = ssv2
    with pytest.raises(FileNotFoundError, match="--labels"):
        SSv2Source(str(videos), str(annotations), str(tmp_path / "labels.json"))
    with pytest.raises(FileNotFoundError, match="--videos-dir"):
        SSv2Source(str(tmp_path / "nowhere"), str(annotations))
