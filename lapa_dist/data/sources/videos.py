"""A folder of video files (any format PyAV reads) described by a manifest, one clip per row.

The manifest is JSONL (one object per line) or CSV (a header row), chosen by its extension, with
the columns:

    path         the video, relative to --videos-dir
    instruction  the task description (may be empty)
    actions      optional: a .npy of float [num_frames - 1, action_dim], relative to --videos-dir
    episode_id   optional: defaults to the path
    fps          optional: defaults to the container's frame rate

A malformed manifest (missing or unknown column, bad fps) is an error before anything is
converted; a row whose video is missing or undecodable, or whose actions do not fit the video, is
skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lapa_dist.data.convert import SkipClip, Source
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.data.sources._video_files import check_resize, read_clip_video

REQUIRED_COLUMNS = ("path", "instruction")
OPTIONAL_COLUMNS = ("actions", "episode_id", "fps")


@dataclass(frozen=True)
class ManifestRow:
    line: int  # line of the row in the manifest (1-based), which also makes the clip key
    path: str
    instruction: str
    actions: str | None
    episode_id: str
    fps: float | None


def read_manifest(manifest: Path) -> list[ManifestRow]:
    """Parse a JSONL or CSV manifest; raises ValueError naming the line and column at fault."""
    suffix = manifest.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(manifest)
    elif suffix == ".csv":
        records = _csv_records(manifest)
    else:
        raise ValueError(f"{manifest}: manifest must end in .jsonl or .csv, not {suffix!r}")
    rows = [_parse_record(f"{manifest} line {line}", line, record) for line, record in records]
    if not rows:
        raise ValueError(f"{manifest}: manifest has no rows")
    return rows


def _jsonl_records(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for line, text in enumerate(manifest.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest} line {line}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{manifest} line {line}: expected a JSON object, got {type(record).__name__}")
        records.append((line, record))
    return records


def _csv_records(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in REQUIRED_COLUMNS if column not in header]
        if missing:
            raise ValueError(f"{manifest} line 1: header lacks column(s) {missing}; it has {header}")
        records = []
        for record in reader:
            if None in record:
                raise ValueError(f"{manifest} line {reader.line_num}: more cells than the header has columns")
            # An empty cell in an optional column means "not given".
            given = {k: v for k, v in record.items() if k in REQUIRED_COLUMNS or v not in (None, "")}
            records.append((reader.line_num, given))
    return records


def _parse_record(where: str, line: int, record: dict[str, Any]) -> ManifestRow:
    unknown = sorted(set(record) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}; expected {REQUIRED_COLUMNS + OPTIONAL_COLUMNS}")
    for column in REQUIRED_COLUMNS:
        if not isinstance(record.get(column), str):
            raise ValueError(f"{where}: missing column {column!r} (a string)")
    if not record["path"]:
        raise ValueError(f"{where}: column 'path' is empty")
    fps = record.get("fps")
    if fps is not None:
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: column 'fps' is {fps!r}, not a number") from None
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"{where}: column 'fps' must be a positive number, got {fps}")
    actions = record.get("actions")
    if actions is not None and not isinstance(actions, str):
        raise ValueError(f"{where}: column 'actions' must be a path, got {actions!r}")
    episode_id = record.get("episode_id")
    return ManifestRow(
        line=line,
        path=record["path"],
        instruction=record["instruction"],
        actions=actions or None,
        episode_id=record["path"] if episode_id is None else str(episode_id),
        fps=fps,
    )


def load_actions(key: str, path: Path) -> np.ndarray:
    """float32 [N, action_dim] from a .npy file; raises SkipClip when missing or malformed."""
    if not path.is_file():
        raise SkipClip(key, "missing_actions", str(path))
    try:
        actions = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise SkipClip(key, "bad_actions", f"{path}: {error}") from None
    numeric = np.issubdtype(actions.dtype, np.floating) or np.issubdtype(actions.dtype, np.integer)
    if actions.ndim != 2 or not numeric:
        raise SkipClip(key, "bad_actions", f"{path}: expected numeric [N, d], got {actions.dtype} {actions.shape}")
    actions = actions.astype(np.float32)
    if not np.isfinite(actions).all():
        raise SkipClip(key, "bad_actions", f"{path}: NaN or inf")
    return actions


class VideoFolderSource(Source):
    name = "videos"
    default_units_per_shard = 64

    def __init__(self, videos_dir: str, manifest: str, resize: int | None = None, max_frames: int | None = None):
        self.videos_dir, self.manifest = Path(videos_dir), Path(manifest)
        if not self.videos_dir.is_dir():
            raise FileNotFoundError(f"--videos-dir {videos_dir}: no such directory")
        if not self.manifest.is_file():
            raise FileNotFoundError(f"--manifest {manifest}: no such file")
        check_resize(resize)
        if max_frames is not None and max_frames < 2:
            raise ValueError(f"--max-frames {max_frames}: a clip needs at least 2 frames")
        self.resize, self.max_frames = resize, max_frames

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--videos-dir", required=True, help="Folder the manifest's paths are relative to.")
        parser.add_argument("--manifest", required=True,
                            help="JSONL or CSV with columns path, instruction[, actions, episode_id, fps].")
        parser.add_argument("--resize", type=int, default=None, help="Shorter side in pixels (aspect kept).")
        parser.add_argument("--max-frames", type=int, default=None, help="Keep at most this many leading frames.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VideoFolderSource:
        return cls(args.videos_dir, args.manifest, args.resize, args.max_frames)

    def work_units(self) -> list[ManifestRow]:
        return read_manifest(self.manifest)

    def clips(self, row: ManifestRow) -> Iterator[Clip]:
        key = f"video-{row.line:08d}"
        video_path = self.videos_dir / row.path
        video = read_clip_video(
            key, video_path, shorter_side=self.resize, max_frames=self.max_frames, count_all=row.actions is not None
        )
        actions = load_actions(key, self.videos_dir / row.actions) if row.actions else None
        fps = row.fps or video.fps
        if fps is None:
            raise SkipClip(key, "unknown_fps", f"{video_path}: the container gives no frame rate; set the fps column")
        num_frames, height, width = video.frames.shape[:3]
        if actions is not None:
            if len(actions) != video.frames_in_window - 1:
                raise SkipClip(key, "bad_actions", f"{len(actions)} actions for {video.frames_in_window} frames "
                                                   f"(expected {video.frames_in_window - 1})")
            actions = actions[: num_frames - 1]
        meta = ClipMeta(
            instruction=row.instruction,
            fps=fps,
            num_frames=num_frames,
            width=width,
            height=height,
            source=self.name,
            episode_id=row.episode_id,
            action_dim=None if actions is None else actions.shape[1],
            extra={"path": row.path},
        )
        yield Clip(key=key, frames=video.frames, meta=meta, actions=actions)
