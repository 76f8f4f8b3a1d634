"""RLDS episode datasets (Open X-Embodiment, BridgeData V2) read without TensorFlow.

An RLDS dataset as TFDS writes it (shared FORMATS.md section 1) is a ``<dataset>/<version>``
directory holding ``dataset_info.json`` (splits and their TFRecord files), ``features.json`` (the
nested feature schema) and TFRecord files with one ``tf.train.Example`` per episode, in which every
``steps/...`` feature is stacked over the episode's steps. One work unit is one TFRecord file; each
episode becomes one clip: frames from one camera, the instruction, and the actions [T - 1, d]
(RLDS action t is taken at observation t, so the last step's action has no next frame).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lapa_dist.data.convert import SkipClip, Source
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.data.tfrecord import (
    FeatureValue,
    TFRecordError,
    count_records,
    iter_records,
    parse_example,
)

log = logging.getLogger(__name__)

# Control frequency (Hz) of Open X-Embodiment datasets, from the OXE dataset spreadsheet.
OXE_FPS = {
    "fractal20220817_data": 3.0,
    "bridge": 5.0,
    "bridge_dataset": 5.0,
    "bridge_orig": 5.0,
    "kuka": 10.0,
    "taco_play": 15.0,
    "jaco_play": 10.0,
    "language_table": 10.0,
    "berkeley_autolab_ur5": 5.0,
    "austin_buds_dataset_converted_externally_to_rlds": 20.0,
    "austin_sailor_dataset_converted_externally_to_rlds": 20.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 20.0,
    "viola": 20.0,
    "toto": 30.0,
    "stanford_hydra_dataset_converted_externally_to_rlds": 10.0,
    "bc_z": 10.0,
    "nyu_door_opening_surprising_effectiveness": 3.0,
    "droid": 15.0,
}
DEFAULT_INSTRUCTION_KEYS = ("steps/language_instruction", "steps/observation/natural_language_instruction")
DEFAULT_ACTION_KEY = "steps/action"
DEFAULT_FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
NONE = "none"  # --instruction-key none / --action-keys none
EPISODE_ID_KEYS = ("episode_metadata/episode_id", "episode_metadata/file_path")
NUMERIC_DTYPES = {"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                  "uint32", "uint64"}


@dataclass(frozen=True)
class FeatureSpec:
    """One leaf of features.json, under its flattened Example key (e.g. ``steps/observation/image_0``)."""

    key: str
    kind: str  # tensor, image, text, class_label or other
    shape: tuple[int, ...]  # of one step for per-step features; -1 = unknown
    dtype: str
    sequence_depth: int  # enclosing sequences: 0 = per episode, 1 = per step (under steps)
    encoding: str = "none"  # tensors: none, bytes or zlib

    @property
    def per_step(self) -> bool:
        return self.sequence_depth == 1 and self.key.startswith("steps/")

    @property
    def values_per_step(self) -> int | None:
        """Flattened values of one step, or None when a dimension is unknown."""
        return None if -1 in self.shape else int(np.prod(self.shape, dtype=np.int64))

    def describe(self) -> str:
        return f"{self.key} ({self.kind} {self.dtype}{list(self.shape)})"


@dataclass(frozen=True)
class RecordFile:
    """A work unit: one TFRecord file of the split, read up to ``max_records`` episodes."""

    index: int
    path: str
    max_records: int | None


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --rlds-dir must be a TFDS <dataset>/<version> directory ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_features(path: Path) -> dict[str, FeatureSpec]:
    """Flatten features.json (the Feature proto as JSON) into {Example key: FeatureSpec}."""
    node = read_json(path, "its features.json describes the episode schema")
    features: dict[str, FeatureSpec] = {}
    _flatten_feature(node, "", 0, features, path)
    return features


def _flatten_feature(node: Any, key: str, depth: int, out: dict[str, FeatureSpec], path: Path) -> None:
    if not isinstance(node, dict):
        # ValueError, not TypeError: tools/make_shards.py reports ValueErrors as input errors.
        raise ValueError(f"{path}: feature {key or '<root>'!r} is not a JSON object")  # noqa: TRY004
    if "type" in node and "content" in node:
        raise ValueError(f"{path}: old-style TFDS features.json ('type'/'content') is not supported")
    if "featuresDict" in node:
        for name, child in node["featuresDict"].get("features", {}).items():
            _flatten_feature(child, f"{key}/{name}" if key else name, depth, out, path)
    elif "sequence" in node:
        _flatten_feature(node["sequence"].get("feature"), key, depth + 1, out, path)
    elif "tensor" in node or "image" in node:
        kind = "tensor" if "tensor" in node else "image"
        content = node[kind]
        shape = tuple(int(d) for d in content.get("shape", {}).get("dimensions", []))
        out[key] = FeatureSpec(key, kind, shape, content.get("dtype", ""), depth, content.get("encoding", "none"))
    elif "text" in node:
        out[key] = FeatureSpec(key, "text", (), "string", depth)
    elif "classLabel" in node:
        out[key] = FeatureSpec(key, "class_label", (), "int64", depth)
    else:
        out[key] = FeatureSpec(key, "other", (), "", depth)


def shard_file_name(template: str, dataset: str, split: str, file_format: str, index: int, num_shards: int) -> str:
    digits = max(5, len(str(num_shards)))
    shard_index, total = f"{index:0{digits}d}", f"{num_shards:0{digits}d}"
    try:
        return template.format(
            DATASET=dataset, SPLIT=split, FILEFORMAT=file_format, SHARD_INDEX=shard_index,
            NUM_SHARDS=total, SHARD_X_OF_Y=f"{shard_index}-of-{total}",
        )
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"dataset_info.json: cannot fill filepathTemplate {template!r} ({error})") from None


def split_files(version_dir: Path, info: dict, split: str) -> list[tuple[Path, int | None]]:
    """(TFRecord path, episodes in it or None if unknown) for every file of ``split``, in order."""
    where = version_dir / "dataset_info.json"
    splits = {entry.get("name"): entry for entry in info.get("splits", [])}
    if split not in splits:
        raise ValueError(f"--split {split!r}: {where} lists the splits {sorted(splits)}")
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "tfrecord":
        raise ValueError(f"{where}: fileFormat {file_format!r} is not supported (only tfrecord)")
    entry, dataset = splits[split], info.get("name") or version_dir.parent.name
    lengths = [int(n) for n in entry.get("shardLengths", [])]
    num_shards = len(lengths) or int(entry.get("numShards", 0))
    if num_shards == 0:
        paths = sorted(version_dir.glob(f"{dataset}-{split}.{file_format}-*"))
        if not paths:
            raise FileNotFoundError(f"{where}: split {split!r} gives no shard count and no files match")
        return [(path, None) for path in paths]
    template = entry.get("filepathTemplate") or DEFAULT_FILE_TEMPLATE
    paths = [
        version_dir / shard_file_name(template, dataset, split, file_format, index, num_shards)
        for index in range(num_shards)
    ]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"split {split!r}: {len(missing)} of {num_shards} files missing, first {missing[0]}")
    return list(zip(paths, lengths or [None] * num_shards))


def _listing(specs: list[FeatureSpec]) -> str:
    return ", ".join(spec.describe() for spec in specs) or "none"


def resolve_image_key(features: dict[str, FeatureSpec], image_key: str | None) -> str:
    candidates = [spec for spec in features.values() if spec.kind == "image" and spec.per_step]
    if image_key is not None:
        if image_key not in {spec.key for spec in candidates}:
            raise ValueError(
                f"--image-key {image_key!r}: not a per-step image feature; candidates: {_listing(candidates)}"
            )
        return image_key
    observed = [spec for spec in candidates if spec.key.startswith("steps/observation/")] or candidates
    if not observed:
        raise ValueError("no per-step image feature in features.json; pass --image-key")
    if len(observed) > 1:
        log.info("rlds: using camera %s of %s (choose with --image-key)", observed[0].key, _listing(observed))
    return observed[0].key


def resolve_instruction_key(features: dict[str, FeatureSpec], instruction_key: str | None) -> str | None:
    texts = [spec for spec in features.values() if spec.kind == "text"]
    if instruction_key == NONE:
        return None
    if instruction_key is not None:
        if instruction_key not in {spec.key for spec in texts}:
            raise ValueError(
                f"--instruction-key {instruction_key!r}: not a text feature; text features: {_listing(texts)}"
            )
        return instruction_key
    found = [key for key in DEFAULT_INSTRUCTION_KEYS if key in features]
    if not found:
        log.warning("rlds: no %s; clips get empty instructions", " or ".join(DEFAULT_INSTRUCTION_KEYS))
    return found[0] if found else None


def resolve_action_keys(features: dict[str, FeatureSpec], action_keys: str | None) -> list[str]:
    """The per-step tensors whose values, concatenated, form the action; [] for --action-keys none."""
    if action_keys == NONE:
        return []
    usable = [
        spec for spec in features.values()
        if spec.kind == "tensor" and spec.per_step and spec.dtype in NUMERIC_DTYPES
        and spec.encoding == "none" and spec.values_per_step is not None
    ]
    if action_keys is None:
        if DEFAULT_ACTION_KEY in {spec.key for spec in usable}:
            return [DEFAULT_ACTION_KEY]
        nested = [spec for spec in usable if spec.key.startswith(DEFAULT_ACTION_KEY + "/")]
        raise ValueError(
            f"{DEFAULT_ACTION_KEY} is not a single tensor; choose --action-keys KEY,KEY,... (or 'none') from "
            f"{_listing(nested or usable)}"
        )
    keys = [key.strip() for key in action_keys.split(",") if key.strip()]
    unknown = [key for key in keys if key not in {spec.key for spec in usable}]
    if unknown or not keys:
        raise ValueError(
            f"--action-keys: {unknown or action_keys!r} not per-step numeric tensors of known shape; "
            f"available: {_listing(usable)}"
        )
    return keys


def resolve_fps(dataset: str, fps: float | None) -> float:
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"--fps must be positive, got {fps}")
        return fps
    if dataset not in OXE_FPS:
        raise ValueError(f"dataset {dataset!r}: frame rate unknown (not in the OXE table); pass --fps")
    return OXE_FPS[dataset]


def decode_image(data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] from JPEG or PNG bytes, told apart by their magic bytes."""
    if data[:2] == b"\xff\xd8":
        image_format = "JPEG"
    elif data[:4] == b"\x89PNG":
        image_format = "PNG"
    else:
        raise ValueError(f"neither JPEG nor PNG (starts with {data[:4].hex()})")
    with Image.open(io.BytesIO(data), formats=[image_format]) as image:
        return np.asarray(image.convert("RGB"))


def first_text(values: FeatureValue) -> str:
    """The first non-empty entry of a bytes list as text, or the first number of a numeric list."""
    if isinstance(values, list):
        return next((v.decode("utf-8", "replace").strip() for v in values if v.strip()), "")
    return str(values[0].item()) if len(values) else ""


class RLDSSource(Source):
    name = "rlds"
    default_units_per_shard = 4  # TFRecord files per shard; an OXE file holds tens of episodes

    def __init__(
        self,
        rlds_dir: str | Path,
        split: str = "train",
        image_key: str | None = None,
        instruction_key: str | None = None,
        action_keys: str | None = None,
        fps: float | None = None,
        max_episodes: int | None = None,
    ):
        self.rlds_dir = Path(rlds_dir)
        if not self.rlds_dir.is_dir():
            raise FileNotFoundError(f"--rlds-dir {self.rlds_dir}: not a directory")
        if max_episodes is not None and max_episodes < 1:
            raise ValueError(f"--max-episodes must be >= 1, got {max_episodes}")
        info = read_json(self.rlds_dir / "dataset_info.json", "its dataset_info.json lists the splits")
        self.dataset = info.get("name") or self.rlds_dir.parent.name
        self.split = split
        self.files = split_files(self.rlds_dir, info, split)
        self.features = load_features(self.rlds_dir / "features.json")
        self.image_key = resolve_image_key(self.features, image_key)
        self.instruction_key = resolve_instruction_key(self.features, instruction_key)
        self.action_keys = resolve_action_keys(self.features, action_keys)
        self.fps = resolve_fps(self.dataset, fps)
        self.max_episodes = max_episodes

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rlds-dir", required=True,
                            help="The <dataset>/<version> directory, e.g. bridge_dataset/1.0.0.")
        parser.add_argument("--split", default="train")
        parser.add_argument("--image-key", default=None,
                            help="Per-step image feature; default: the first under steps/observation.")
        parser.add_argument("--instruction-key", default=None,
                            help=f"Text feature; default: {' or '.join(DEFAULT_INSTRUCTION_KEYS)}; 'none' for empty.")
        parser.add_argument("--action-keys", default=None,
                            help="Comma-separated per-step tensors, concatenated; default steps/action; "
                                 "'none' to omit.")
        parser.add_argument("--fps", type=float, default=None, help="Frame rate; default from the OXE table.")
        parser.add_argument("--max-episodes", type=int, default=None, help="Convert only the first N episodes.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RLDSSource:
        return cls(args.rlds_dir, args.split, args.image_key, args.instruction_key, args.action_keys, args.fps,
                   args.max_episodes)

    def work_units(self) -> list[RecordFile]:
        units: list[RecordFile] = []
        remaining = self.max_episodes
        for index, (path, num_records) in enumerate(self.files):
            if remaining is None:
                units.append(RecordFile(index, str(path), None))
                continue
            take = min(remaining, num_records if num_records is not None else count_records(path))
            if take:
                units.append(RecordFile(index, str(path), take))
            remaining -= take
            if remaining == 0:
                break
        return units

    def clips(self, unit: RecordFile) -> Iterator[Clip | SkipClip]:
        """One clip per episode record; unconvertible episodes are yielded as SkipClip, so the
        file's later episodes are still read."""
        for record_index, (offset, data) in enumerate(iter_records(unit.path)):
            if unit.max_records is not None and record_index >= unit.max_records:
                return
            try:
                example = parse_example(data)
            except TFRecordError as error:
                raise TFRecordError(f"{unit.path}: record {record_index} at offset {offset}: {error}") from None
            key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.dataset}-{self.split}-{unit.index:05d}-{record_index:06d}")
            try:
                yield self.episode_clip(example, key, unit, record_index)
            except SkipClip as skip:
                yield skip

    def episode_clip(self, example: dict[str, FeatureValue], key: str, unit: RecordFile, record_index: int) -> Clip:
        num_steps = self.num_steps(example, key)
        frames = self.frames(example[self.image_key], key)
        actions = self.actions(example, num_steps, key)
        episode_id = next((first_text(example[k]) for k in EPISODE_ID_KEYS if k in example), "") or key
        meta = ClipMeta(
            instruction=first_text(example[self.instruction_key]) if self.instruction_key else "",
            fps=self.fps,
            num_frames=num_steps,
            width=frames.shape[2],
            height=frames.shape[1],
            source=self.name,
            episode_id=episode_id,
            camera=self.image_key.rsplit("/", 1)[-1],
            action_dim=None if actions is None else actions.shape[1],
            extra={"dataset": self.dataset, "split": self.split, "file": Path(unit.path).name, "record": record_index},
        )
        return Clip(key=key, frames=frames, meta=meta, actions=actions)

    def num_steps(self, example: dict[str, FeatureValue], key: str) -> int:
        """Steps T of the episode, checked to agree across every per-step feature it holds."""
        needed = [self.image_key, *self.action_keys] + ([self.instruction_key] if self.instruction_key else [])
        missing = [name for name in needed if name not in example]
        if missing:
            raise SkipClip(key, "missing_feature", ", ".join(missing))
        steps_by_key = {}
        for spec in self.features.values():
            if not spec.per_step or spec.key not in example:
                continue
            values = example[spec.key]
            per_step = 1 if isinstance(values, list) else spec.values_per_step  # bytes: one entry per step
            if per_step is None or per_step == 0:
                continue
            if len(values) % per_step:
                raise SkipClip(key, "inconsistent_steps", f"{spec.key}: {len(values)} values, {per_step} per step")
            steps_by_key[spec.key] = len(values) // per_step
        counts = set(steps_by_key.values())
        if len(counts) > 1:
            raise SkipClip(key, "inconsistent_steps", f"steps per feature: {steps_by_key}")
        if not counts or counts == {0}:
            raise SkipClip(key, "empty_episode")
        return counts.pop()

    def frames(self, images: FeatureValue, key: str) -> np.ndarray:
        """uint8 [T, H, W, 3]; an odd height or width loses its last row or column (4:2:0 video)."""
        if not isinstance(images, list):
            raise SkipClip(key, "undecodable_image", f"{self.image_key} holds numbers, not encoded images")
        frames = None
        for step, data in enumerate(images):
            try:
                rgb = decode_image(data)
            except (OSError, ValueError, SyntaxError) as error:
                raise SkipClip(key, "undecodable_image", f"step {step}: {error}") from None
            if frames is None:
                height, width = rgb.shape[0] - rgb.shape[0] % 2, rgb.shape[1] - rgb.shape[1] % 2
                if height == 0 or width == 0:
                    raise SkipClip(key, "undecodable_image", f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels")
                frames = np.empty((len(images), height, width, 3), np.uint8)
                first_shape = rgb.shape
            if rgb.shape != first_shape:
                raise SkipClip(key, "inconsistent_image_size", f"step {step}: {rgb.shape} vs {first_shape}")
            frames[step] = rgb[: frames.shape[1], : frames.shape[2]]
        return frames

    def actions(self, example: dict[str, FeatureValue], num_steps: int, key: str) -> np.ndarray | None:
        """float32 [T - 1, d]: the action keys concatenated per step (bools as 0/1), last step dropped."""
        if not self.action_keys:
            return None
        parts = []
        for name in self.action_keys:
            values = example[name]
            if isinstance(values, list):
                raise SkipClip(key, "bad_actions", f"{name} holds bytes, not numbers")
            parts.append(np.asarray(values, np.float32).reshape(num_steps, -1))
        actions = np.concatenate(parts, axis=1)[:-1]
        if not np.isfinite(actions).all():
            raise SkipClip(key, "non_finite_actions")
        return np.ascontiguousarray(actions)
