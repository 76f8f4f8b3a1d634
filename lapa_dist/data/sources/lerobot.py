"""LeRobotDataset v2.0, v2.1 and v3.0 (huggingface/lerobot): one clip per episode and camera.

Layouts (docs: /work/shared/FORMATS.md section 2):
- v2.x: ``meta/episodes.jsonl`` and ``meta/tasks.jsonl``; one parquet and one mp4 per episode.
- v3.0: ``meta/episodes/chunk-*/file-*.parquet`` and ``meta/tasks.parquet``; parquet and mp4 files
  hold several episodes one after another; an episode's frames start at ``from_timestamp`` in its
  camera's file and end before ``to_timestamp``. Only the episode's frames are decoded.

The instruction is the task of the episode's first frame; actions are the parquet column of
``--action-key`` without its last row (action t takes frame t to t+1). A video with one frame more
or less than the episode is trimmed to the shorter of the two; other mismatches are skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lapa_dist.data.convert import SkipClip, Source
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.data.sources._video_files import check_resize, read_clip_video

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")


@dataclass(frozen=True)
class LeRobotEpisode:
    index: int
    length: int  # frames (parquet rows) of the episode
    data_file: str  # parquet, relative to the root
    video_file: str  # mp4 of the chosen camera, relative to the root
    from_timestamp: float  # where the episode starts in the video file (0 in v2)
    to_timestamp: float | None  # where it ends (v3); None: at the end of the file (v2)


def read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"--root {root}: no meta/info.json; is it a LeRobotDataset root?")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: codebase_version {version!r} is not supported; expected one of {SUPPORTED_VERSIONS}")
    for key in ("fps", "features", "data_path", "chunks_size"):
        if key not in info:
            raise ValueError(f"{path}: missing key {key!r}")
    if not info.get("video_path"):
        raise ValueError(f"{path}: the dataset stores no videos (video_path is null)")
    return info


def choose_camera(info: dict[str, Any], camera: str | None) -> str:
    """``camera`` if it is a video feature, else the first video feature when ``camera`` is None."""
    cameras = [name for name, feature in info["features"].items() if feature.get("dtype") == "video"]
    if not cameras:
        raise ValueError("meta/info.json: no feature of dtype 'video'; image-only datasets are not supported")
    if camera is None:
        return cameras[0]
    if camera not in cameras:
        raise ValueError(f"--camera {camera!r}: not a video feature of this dataset; available: {cameras}")
    return camera


def check_action_key(info: dict[str, Any], action_key: str) -> None:
    numeric = [name for name, feature in info["features"].items()
               if feature.get("dtype") in ("float32", "float64", "int64", "int32", "bool")]
    if action_key not in numeric:
        raise ValueError(f"--action-key {action_key!r}: not a numeric feature of this dataset; available: {numeric}")


def read_tasks(root: Path, version: str) -> dict[int, str]:
    """task_index -> task string, from meta/tasks.jsonl (v2) or meta/tasks.parquet (v3)."""
    if version.startswith("v2"):
        records = _read_jsonl(root / "meta" / "tasks.jsonl", ("task_index", "task"))
        return {int(record["task_index"]): record["task"] for record in records}
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    table = pq.read_table(path)
    # pandas saves the frame's index (the task strings) as __index_level_0__ unless it was reset.
    task_column = next((name for name in ("task", "__index_level_0__") if name in table.column_names), None)
    if task_column is None or "task_index" not in table.column_names:
        raise ValueError(f"{path}: expected columns task_index and task (or __index_level_0__); "
                         f"got {table.column_names}")
    return dict(zip(table.column("task_index").to_pylist(), table.column(task_column).to_pylist()))


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The objects of a JSONL file; raises ValueError naming the line that lacks a ``required`` key."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {line}: not valid JSON ({error})") from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{path} line {line}: missing key(s) {missing}")
        records.append(record)
    return records


def read_episodes_v2(root: Path, info: dict[str, Any], camera: str) -> list[LeRobotEpisode]:
    episodes = []
    for record in _read_jsonl(root / "meta" / "episodes.jsonl", ("episode_index", "length")):
        index = int(record["episode_index"])
        chunk = index // int(info["chunks_size"])
        episodes.append(LeRobotEpisode(
            index=index,
            length=int(record["length"]),
            data_file=info["data_path"].format(episode_chunk=chunk, episode_index=index),
            video_file=info["video_path"].format(episode_chunk=chunk, video_key=camera, episode_index=index),
            from_timestamp=0.0,
            to_timestamp=None,
        ))
    return episodes


def read_episodes_v3(root: Path, info: dict[str, Any], camera: str) -> list[LeRobotEpisode]:
    video = f"videos/{camera}/"
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index", video + "chunk_index",
               video + "file_index", video + "from_timestamp", video + "to_timestamp"]
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet episode files")
    episodes = []
    for path in files:
        missing = [name for name in columns if name not in pq.read_schema(path).names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for row in pq.read_table(path, columns=columns).to_pylist():
            episodes.append(LeRobotEpisode(
                index=int(row["episode_index"]),
                length=int(row["length"]),
                data_file=info["data_path"].format(
                    chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]),
                video_file=info["video_path"].format(
                    video_key=camera, chunk_index=row[video + "chunk_index"], file_index=row[video + "file_index"]),
                from_timestamp=float(row[video + "from_timestamp"]),
                to_timestamp=float(row[video + "to_timestamp"]),
            ))
    return sorted(episodes, key=lambda episode: episode.index)


def read_data_columns(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """Columns of a data parquet. The last file read is kept: in v3 consecutive episodes share one."""
    return _read_data_columns_cached(path, columns, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _read_data_columns_cached(path: Path, columns: tuple[str, ...], modified_ns: int) -> pa.Table:
    return pq.read_table(path, columns=list(columns))  # modified_ns only keys the cache


def column_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A parquet feature column as float32 [rows, d]: list columns give d values per row, scalars 1."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        return np.stack(array.to_numpy(zero_copy_only=False)).astype(np.float32)  # fails on ragged or null rows
    return array.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)


def matched_length(key: str, video_frames: int, episode_length: int) -> int:
    """Frames to keep: the episode length, or one less where the video ends a frame early or late."""
    if abs(video_frames - episode_length) > 1:
        raise SkipClip(key, "frame_count_mismatch", f"video has {video_frames} frames, episode {episode_length}")
    return min(video_frames, episode_length)


class LeRobotSource(Source):
    name = "lerobot"
    default_units_per_shard = 32

    def __init__(self, root: str, camera: str | None = None, action_key: str = "action",
                 episodes: list[int] | None = None, resize: int | None = None):
        self.root = Path(root)
        self.info = read_info(self.root)
        self.version = self.info["codebase_version"]
        self.camera = choose_camera(self.info, camera)
        check_action_key(self.info, action_key)
        check_resize(resize)
        self.action_key, self.episode_subset, self.resize = action_key, episodes, resize
        self.tasks = read_tasks(self.root, self.version)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, help="Dataset root (holds meta/info.json).")
        parser.add_argument("--camera", default=None,
                            help="Video feature, e.g. observation.images.top; default: the first one.")
        parser.add_argument("--action-key", default="action", help="Parquet column of the actions.")
        parser.add_argument("--episodes", type=int, nargs="+", default=None, help="Convert only these episodes.")
        parser.add_argument("--resize", type=int, default=None, help="Shorter side in pixels (aspect kept).")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LeRobotSource:
        return cls(args.root, args.camera, args.action_key, args.episodes, args.resize)

    def work_units(self) -> list[LeRobotEpisode]:
        read_episodes = read_episodes_v2 if self.version.startswith("v2") else read_episodes_v3
        episodes = read_episodes(self.root, self.info, self.camera)
        if self.episode_subset is None:
            return episodes
        known = {episode.index for episode in episodes}
        unknown = sorted(set(self.episode_subset) - known)
        if unknown:
            raise ValueError(f"--episodes: {unknown} not in the dataset ({len(known)} episodes)")
        wanted = set(self.episode_subset)
        return [episode for episode in episodes if episode.index in wanted]

    def clips(self, episode: LeRobotEpisode) -> Iterator[Clip]:
        key = f"lerobot-{episode.index:06d}"
        actions, task_index = self._episode_rows(key, episode)
        video = read_clip_video(key, self.root / episode.video_file, shorter_side=self.resize,
                                start_s=episode.from_timestamp, end_s=episode.to_timestamp)
        num_frames = matched_length(key, len(video.frames), episode.length)
        frames = video.frames[:num_frames]
        extra = {"codebase_version": self.version, "task_index": task_index}
        if self.info.get("robot_type"):
            extra["robot_type"] = self.info["robot_type"]
        meta = ClipMeta(
            instruction=self.tasks[task_index],
            fps=float(self.info["fps"]),
            num_frames=num_frames,
            width=frames.shape[2],
            height=frames.shape[1],
            source=self.name,
            episode_id=str(episode.index),
            camera=self.camera,
            action_dim=actions.shape[1],
            extra=extra,
        )
        yield Clip(key=key, frames=frames, meta=meta, actions=actions[: num_frames - 1])

    def _episode_rows(self, key: str, episode: LeRobotEpisode) -> tuple[np.ndarray, int]:
        """The episode's actions float32 [length, d] and the task index of its first frame."""
        path = self.root / episode.data_file
        if not path.is_file():
            raise SkipClip(key, "missing_data", str(path))
        try:
            table = read_data_columns(path, (self.action_key, "task_index", "episode_index"))
        except (pa.ArrowException, OSError) as error:
            raise SkipClip(key, "bad_data", f"{path}: {error}") from None
        table = table.filter(pc.equal(table.column("episode_index"), episode.index))
        if table.num_rows == 0 or table.num_rows != episode.length:
            raise SkipClip(key, "bad_data", f"{path}: {table.num_rows} rows, episode length {episode.length}")
        try:
            actions = column_rows(table.column(self.action_key))
        except (ValueError, TypeError, pa.ArrowException) as error:
            raise SkipClip(key, "bad_actions", f"{path}: column {self.action_key!r}: {error}") from None
        if not np.isfinite(actions).all():
            raise SkipClip(key, "bad_actions", f"{path}: column {self.action_key!r} holds NaN or inf")
        task_index = int(table.column("task_index")[0].as_py())
        if task_index not in self.tasks:
            raise SkipClip(key, "unknown_task", f"{path}: task_index {task_index} is not in the tasks table")
        return actions, task_index
