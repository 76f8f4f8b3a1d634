"""LeRobotSource on synthetic LeRobotDataset roots in the v2.x and v3.0 layouts, round-tripped through shards."""

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lapa_dist.data.sources.lerobot import LeRobotSource
from tests.video_helpers import (
    convert_and_read,
    mean_abs_error,
    smooth_frames,
    write_video,
)

FPS = 10
HEIGHT, WIDTH = 48, 64
CAMERAS = ("observation.images.top", "observation.images.wrist")
TASKS = ["pick up the red block", "open the drawer"]
MAX_MEAN_ABS_ERROR = 3.0  # two lossy encodes (the dataset's video, then the shard) of smooth content
V2_PATHS = {
    "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
    "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
}
V3_PATHS = {
    "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
    "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
}


@dataclass
class Episode:
    index: int
    task_index: int
    frames: dict[str, np.ndarray]  # camera -> uint8 [length, H, W, 3]
    actions: np.ndarray  # float32 [length, 3]

    @property
    def length(self) -> int:
        return len(self.actions)


def make_episodes(lengths: list[int]) -> list[Episode]:
    rng = np.random.default_rng(0)
    return [
        Episode(
            index=index,
            task_index=index % len(TASKS),
            frames={camera: smooth_frames(length, HEIGHT, WIDTH, seed=10 * index + c)
                    for c, camera in enumerate(CAMERAS)},
            actions=rng.normal(size=(length, 3)).astype(np.float32),
        )
        for index, length in enumerate(lengths)
    ]


def write_info(root, version: str, episodes: list[Episode], paths: dict) -> None:
    video = {"dtype": "video", "shape": [HEIGHT, WIDTH, 3], "names": ["height", "width", "channels"],
             "info": {"video.fps": FPS, "video.height": HEIGHT, "video.width": WIDTH, "video.channels": 3,
                      "video.codec": "h264", "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                      "has_audio": False}}
    scalar = {"shape": [1], "names": None}
    features = {
        "action": {"dtype": "float32", "shape": [3], "names": {"motors": ["x", "y", "gripper"]}},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        **{camera: video for camera in CAMERAS},
        "timestamp": {"dtype": "float32", **scalar},
        **{name: {"dtype": "int64", **scalar} for name in ("frame_index", "episode_index", "index", "task_index")},
    }
    info = {"codebase_version": version, "robot_type": "so100", "fps": FPS, "total_episodes": len(episodes),
            "total_frames": sum(e.length for e in episodes), "total_tasks": len(TASKS), "chunks_size": 1000,
            "splits": {"train": f"0:{len(episodes)}"}, "features": features, **paths}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))


def data_table(episodes: list[Episode], first_index: int, fixed_size_lists: bool) -> pa.Table:
    """One row per frame, as LeRobot writes it; vectors as fixed-size (v3) or plain (v2) lists."""
    actions = np.concatenate([e.actions for e in episodes])
    frame_index = np.concatenate([np.arange(e.length) for e in episodes])
    if fixed_size_lists:
        action_column = pa.FixedSizeListArray.from_arrays(pa.array(actions.ravel()), 3)
    else:
        action_column = pa.array(actions.tolist(), pa.list_(pa.float32()))
    return pa.table({
        "action": action_column,
        "observation.state": pa.array((actions * 2).tolist(), pa.list_(pa.float32())),
        "timestamp": pa.array(frame_index / FPS, pa.float32()),
        "frame_index": pa.array(frame_index, pa.int64()),
        "episode_index": pa.array(np.concatenate([[e.index] * e.length for e in episodes]), pa.int64()),
        "index": pa.array(first_index + np.arange(len(actions)), pa.int64()),
        "task_index": pa.array(np.concatenate([[e.task_index] * e.length for e in episodes]), pa.int64()),
    })


def write_v2(root, episodes: list[Episode], version: str = "v2.1", codec: str = "libsvtav1") -> None:
    """meta/{info.json, episodes.jsonl, tasks.jsonl}, one parquet and one mp4 per episode and camera."""
    write_info(root, version, episodes, V2_PATHS)
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": task}) + "\n" for i, task in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e.index, "tasks": [TASKS[e.task_index]], "length": e.length}) + "\n"
        for e in episodes))
    first_index = 0
    for episode in episodes:
        data_path = root / V2_PATHS["data_path"].format(episode_chunk=0, episode_index=episode.index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data_table([episode], first_index, fixed_size_lists=False), data_path)
        first_index += episode.length
        for camera in CAMERAS:
            video_path = V2_PATHS["video_path"].format(episode_chunk=0, video_key=camera, episode_index=episode.index)
            write_video(root / video_path, episode.frames[camera], FPS, codec=codec, gop=2)


def write_v3(root, episodes: list[Episode], files: list[list[int]]) -> None:
    """meta/{info.json, tasks.parquet, episodes/chunk-000/file-000.parquet}; the episodes listed in
    ``files[k]`` share data/chunk-000/file-00k.parquet and one concatenated mp4 per camera."""
    write_info(root, "v3.0", episodes, V3_PATHS)
    pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": TASKS}),
                   root / "meta" / "tasks.parquet")
    records, first_index = [], 0
    for file_index, members in enumerate(files):
        group = [episodes[i] for i in members]
        data_path = root / V3_PATHS["data_path"].format(chunk_index=0, file_index=file_index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data_table(group, first_index, fixed_size_lists=True), data_path)
        for camera in CAMERAS:
            frames = np.concatenate([e.frames[camera] for e in group])
            video_path = V3_PATHS["video_path"].format(video_key=camera, chunk_index=0, file_index=file_index)
            write_video(root / video_path, frames, FPS, gop=4)
        start = 0.0
        for episode in group:
            records.append(episode_record(episode, file_index, first_index, start))
            start += episode.length / FPS
            first_index += episode.length
    episodes_path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), episodes_path)


def episode_record(episode: Episode, file_index: int, first_index: int, start: float) -> dict:
    record = {"episode_index": episode.index, "tasks": [TASKS[episode.task_index]], "length": episode.length,
              "data/chunk_index": 0, "data/file_index": file_index,
              "dataset_from_index": first_index, "dataset_to_index": first_index + episode.length}
    for camera in CAMERAS:
        record.update({f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_index,
                       f"videos/{camera}/from_timestamp": start,
                       f"videos/{camera}/to_timestamp": start + episode.length / FPS})
    record.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                   "stats/action/mean": episode.actions.mean(0).tolist()})
    return record


def check_clip(clip, episode: Episode, camera: str, num_frames: int | None = None) -> None:
    """The clip holds the episode's first ``num_frames`` frames (default all) and actions[:num_frames - 1]."""
    num_frames = num_frames or episode.length
    assert clip.meta.instruction == TASKS[episode.task_index]
    assert (clip.meta.episode_id, clip.meta.camera, clip.meta.fps) == (str(episode.index), camera, FPS)
    assert (clip.meta.num_frames, clip.meta.width, clip.meta.height, clip.meta.action_dim) == (num_frames, WIDTH,
                                                                                               HEIGHT, 3)
    assert mean_abs_error(clip.frames, episode.frames[camera][:num_frames]) < MAX_MEAN_ABS_ERROR
    np.testing.assert_array_equal(clip.actions, episode.actions[: num_frames - 1])


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_v2_round_trip(tmp_path, version):
    episodes = make_episodes([12, 9])
    write_v2(tmp_path / "ds", episodes, version)
    manifest, clips = convert_and_read(LeRobotSource(str(tmp_path / "ds")), tmp_path / "out")
    assert manifest.skipped == {} and sorted(clips) == ["lerobot-000000", "lerobot-000001"]
    for episode in episodes:
        check_clip(clips[f"lerobot-{episode.index:06d}"], episode, CAMERAS[0])
    assert clips["lerobot-000001"].meta.extra == {"codebase_version": version, "task_index": 1, "robot_type": "so100"}


def test_v3_concatenated_episodes_decode_only_their_frames(tmp_path):
    episodes = make_episodes([10, 12, 8])
    write_v3(tmp_path / "ds", episodes, files=[[0, 1], [2]])
    manifest, clips = convert_and_read(  # two worker processes: the source and its episodes must pickle
        LeRobotSource(str(tmp_path / "ds")), tmp_path / "out", units_per_shard=2, processes=2
    )
    assert manifest.skipped == {} and len(manifest.shards) == 2
    for episode in episodes:
        check_clip(clips[f"lerobot-{episode.index:06d}"], episode, CAMERAS[0])
    # Episode 1 starts 1 s into its file: its frames are its own, not episode 0's.
    assert mean_abs_error(clips["lerobot-000001"].frames[:10], episodes[0].frames[CAMERAS[0]]) > 10


def test_v3_camera_and_episode_subset_from_command_line(tmp_path):
    episodes = make_episodes([10, 12, 8])
    write_v3(tmp_path / "ds", episodes, files=[[0, 1, 2]])
    parser = argparse.ArgumentParser()
    LeRobotSource.add_arguments(parser)
    args = parser.parse_args(["--root", str(tmp_path / "ds"), "--camera", CAMERAS[1], "--episodes", "2", "1"])
    _, clips = convert_and_read(LeRobotSource.from_args(args), tmp_path / "out")
    assert sorted(clips) == ["lerobot-000001", "lerobot-000002"]
    for index in (1, 2):
        check_clip(clips[f"lerobot-{index:06d}"], episodes[index], CAMERAS[1])


def test_frame_count_is_checked_against_the_episode_length(tmp_path):
    episodes = make_episodes([10, 10, 10, 10])
    root = tmp_path / "ds"
    write_v2(root, episodes, codec="libx264")
    camera = CAMERAS[0]

    def rewrite_video(index, frames):
        path = root / V2_PATHS["video_path"].format(episode_chunk=0, video_key=camera, episode_index=index)
        write_video(path, frames, FPS)

    frames_1 = episodes[1].frames[camera]
    rewrite_video(1, np.concatenate([frames_1, frames_1[-1:]]))  # one frame too many: trimmed
    rewrite_video(2, episodes[2].frames[camera][:9])  # one frame short: the clip has 9 frames
    rewrite_video(3, episodes[3].frames[camera][:7])  # three short: skipped
    manifest, clips = convert_and_read(LeRobotSource(str(root)), tmp_path / "out")
    assert manifest.skipped == {"frame_count_mismatch": 1}
    check_clip(clips["lerobot-000000"], episodes[0], camera)
    check_clip(clips["lerobot-000001"], episodes[1], camera)
    check_clip(clips["lerobot-000002"], episodes[2], camera, num_frames=9)


def test_missing_files_and_bad_rows_are_skipped(tmp_path):
    episodes = make_episodes([10, 10, 10, 10])
    root = tmp_path / "ds"
    write_v2(root, episodes, codec="libx264")
    (root / V2_PATHS["video_path"].format(episode_chunk=0, video_key=CAMERAS[0], episode_index=0)).unlink()
    (root / V2_PATHS["data_path"].format(episode_chunk=0, episode_index=1)).unlink()
    data_2 = root / V2_PATHS["data_path"].format(episode_chunk=0, episode_index=2)
    pq.write_table(pq.read_table(data_2).slice(0, 6), data_2)  # parquet shorter than episodes.jsonl says
    manifest, clips = convert_and_read(LeRobotSource(str(root)), tmp_path / "out")
    assert sorted(clips) == ["lerobot-000003"]
    assert manifest.skipped == {"missing_video": 1, "missing_data": 1, "bad_data": 1}


def test_bad_options_and_metadata_are_clear_errors(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match="no meta/info.json"):
        LeRobotSource(str(root))
    write_v3(root, make_episodes([6, 6]), files=[[0, 1]])
    with pytest.raises(ValueError, match=r"--camera 'observation.images.front'.*available: \['observation.images.top', "
                                         r"'observation.images.wrist'\]"):
        LeRobotSource(str(root), camera="observation.images.front")
    with pytest.raises(ValueError, match="--action-key 'actions'.*available: .*'action'"):
        LeRobotSource(str(root), action_key="actions")
    with pytest.raises(ValueError, match=r"--episodes: \[5\] not in the dataset"):
        LeRobotSource(str(root), episodes=[1, 5]).work_units()
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(ValueError, match="codebase_version 'v1.6' is not supported"):
        LeRobotSource(str(root))


def test_malformed_v2_metadata_names_the_line(tmp_path):
    root = tmp_path / "ds"
    write_v2(root, make_episodes([6]), codec="libx264")
    (root / "meta" / "episodes.jsonl").write_text('{"episode_index": 0, "tasks": ["x"]}\n')
    with pytest.raises(ValueError, match=r"episodes.jsonl line 1: missing key\(s\) \['length'\]"):
        LeRobotSource(str(root)).work_units()
