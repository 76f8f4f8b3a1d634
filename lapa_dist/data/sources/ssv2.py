"""Something-Something v2: a folder of ``<id>.webm`` (VP9, 12 fps, 240 px high) and an annotation
file (train or validation json: an array of {id, label, template, placeholders}).

The instruction is the filled ``label`` ("putting a cup on a table"); the template, placeholders and,
given labels.json, the class index go to ``extra``. The class is looked up by the template with its
brackets removed, as the dataset's own tools do. A missing or undecodable video is skipped and
counted; a malformed annotation or an unknown template is an error before anything is converted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapa_dist.data.convert import Source
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.data.sources._video_files import check_resize, read_clip_video
from lapa_dist.data.writer import KEY_PATTERN

SSV2_FPS = 12.0  # the frame rate of every SSv2 video, used when a container does not state it


@dataclass(frozen=True)
class SSv2Entry:
    video_id: str
    label: str
    template: str
    placeholders: tuple[str, ...]
    class_index: int | None  # None without labels.json


def template_class_name(template: str) -> str:
    """The labels.json key of a template: the template with every '[' and ']' removed."""
    return template.replace("[", "").replace("]", "")


def read_labels(path: Path) -> dict[str, int]:
    """labels.json: {class name: index as a string} -> {class name: index}."""
    labels = _read_json(path)
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: expected an object of class name -> index, got {type(labels).__name__}")
    try:
        return {name: int(index) for name, index in labels.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: class indices must be integers ({error})") from None


def read_annotations(path: Path, labels: dict[str, int] | None) -> list[SSv2Entry]:
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON array of annotations, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{path}: no annotations")
    return [_parse_entry(f"{path} entry {position}", record, labels) for position, record in enumerate(entries)]


def _parse_entry(where: str, record: Any, labels: dict[str, int] | None) -> SSv2Entry:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for field in ("id", "label", "template"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: missing string field {field!r} (the test split has no labels)")
    placeholders = record.get("placeholders", [])
    if not isinstance(placeholders, list) or not all(isinstance(p, str) for p in placeholders):
        raise ValueError(f"{where}: 'placeholders' must be a list of strings, got {placeholders!r}")
    if not KEY_PATTERN.match(record["id"]):
        raise ValueError(f"{where}: id {record['id']!r} may hold only letters, digits, '_' and '-'")
    class_index = None
    if labels is not None:
        class_name = template_class_name(record["template"])
        if class_name not in labels:
            raise ValueError(f"{where}: template {record['template']!r} ({class_name!r}) is not in labels.json")
        class_index = labels[class_name]
    return SSv2Entry(record["id"], record["label"], record["template"], tuple(placeholders), class_index)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


class SSv2Source(Source):
    name = "ssv2"
    default_units_per_shard = 128

    def __init__(self, videos_dir: str, annotations: str, labels: str | None = None, resize: int | None = None):
        self.videos_dir, self.annotations = Path(videos_dir), Path(annotations)
        self.labels = Path(labels) if labels else None
        if not self.videos_dir.is_dir():
            raise FileNotFoundError(f"--videos-dir {videos_dir}: no such directory")
        for option, path in (("--annotations", self.annotations), ("--labels", self.labels)):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{option} {path}: no such file")
        check_resize(resize)
        self.resize = resize

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--videos-dir", required=True, help="Folder of <id>.webm files.")
        parser.add_argument("--annotations", required=True,
                            help="something-something-v2-{train,validation}.json")
        parser.add_argument("--labels", default=None,
                            help="something-something-v2-labels.json, to store each clip's class index.")
        parser.add_argument("--resize", type=int, default=None, help="Shorter side in pixels (aspect kept).")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SSv2Source:
        return cls(args.videos_dir, args.annotations, args.labels, args.resize)

    def work_units(self) -> list[SSv2Entry]:
        labels = read_labels(self.labels) if self.labels else None
        return read_annotations(self.annotations, labels)

    def clips(self, entry: SSv2Entry) -> Iterator[Clip]:
        key = f"ssv2-{entry.video_id}"
        video = read_clip_video(key, self.videos_dir / f"{entry.video_id}.webm", shorter_side=self.resize)
        extra: dict[str, Any] = {"template": entry.template, "placeholders": list(entry.placeholders)}
        if entry.class_index is not None:
            extra["class_index"] = entry.class_index
        num_frames, height, width = video.frames.shape[:3]
        meta = ClipMeta(
            instruction=entry.label,
            fps=video.fps or SSV2_FPS,
            num_frames=num_frames,
            width=width,
            height=height,
            source=self.name,
            episode_id=entry.video_id,
            extra=extra,
        )
        yield Clip(key=key, frames=video.frames, meta=meta)
