"""The TF-free RLDS converter: TFRecord framing, Example decoding, and RLDS episodes -> shards."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lapa_dist.data import tfrecord
from lapa_dist.data.convert import SkipClip, convert
from lapa_dist.data.format import Clip, Manifest
from lapa_dist.data.reader import read_shard_clips
from lapa_dist.data.sources.rlds import RLDSSource
from lapa_dist.data.tfrecord import (
    TFRecordError,
    count_records,
    crc32c,
    crc32c_python,
    encode_example,
    encode_field,
    encode_varint,
    iter_records,
    parse_example,
    write_records,
)
from tests.fixtures import make_rlds_fixture as fixture
from tools.make_shards import main as make_shards

BRIDGE_DIR = fixture.FIXTURE_DIR


def test_crc32c_known_value_and_python_fallback_agree():
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert crc32c(data) == crc32c_python(data)


def test_records_verify_with_the_python_crc_fallback(monkeypatch):
    path = BRIDGE_DIR / "bridge_dataset-val.tfrecord-00000-of-00001"
    expected = [data for _, data in iter_records(path)]
    monkeypatch.setattr(tfrecord, "_crc32c_native", None)
    assert [data for _, data in iter_records(path)] == expected


def write_three_records(tmp_path):
    path = tmp_path / "data.tfrecord"
    records = [b"first", b"", b"third record" * 10]
    write_records(path, records)
    return path, records


def test_records_round_trip_with_offsets(tmp_path):
    path, records = write_three_records(tmp_path)
    read = list(iter_records(path))
    assert [data for _, data in read] == records
    assert [offset for offset, _ in read] == [0, 16 + 5, 16 + 5 + 16]
    assert count_records(path) == 3


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_corrupt_byte_is_detected_with_file_and_offset(tmp_path, where):
    path, records = write_three_records(tmp_path)
    third = 16 + 5 + 16  # offset of the third record
    position = {"length": third, "length_crc": third + 9, "data": third + 12 + 7, "data_crc": path.stat().st_size - 2}
    raw = bytearray(path.read_bytes())
    raw[position[where]] ^= 0x40
    path.write_bytes(bytes(raw))
    reader = iter_records(path)
    assert next(reader)[1] == records[0] and next(reader)[1] == records[1]
    with pytest.raises(TFRecordError, match=rf"{path}: corrupt record .* at offset {third} \(CRC mismatch\)"):
        next(reader)


def test_truncated_file_is_detected(tmp_path):
    path, _ = write_three_records(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(TFRecordError, match=rf"{path}: truncated record at offset 37"):
        list(iter_records(path))
    with pytest.raises(TFRecordError, match="truncated record at offset 37"):
        count_records(path)
    path.write_bytes(path.read_bytes()[:25])  # inside the second header
    with pytest.raises(TFRecordError, match="truncated record header at offset 21"):
        list(iter_records(path))


def test_example_decodes_every_list_kind_packed():
    int64s = np.array([0, 1, -1, 300, -(2**63), 2**63 - 1, -123456789])
    features = {
        "image": [b"\xff\xd8jpeg", b"", b"\x00" * 300],
        "floats": np.array([1.5, -2.25, 1e-30, np.inf], np.float32),
        "ints": int64s,
        "bools": np.array([True, False]),
        "empty_floats": np.zeros(0, np.float32),
        "empty_bytes": [],
    }
    decoded = parse_example(encode_example(features))
    assert decoded["image"] == features["image"] and decoded["empty_bytes"] == []
    assert decoded["floats"].dtype == np.float32 and np.array_equal(decoded["floats"], features["floats"])
    assert decoded["ints"].dtype == np.int64 and np.array_equal(decoded["ints"], int64s)
    assert np.array_equal(decoded["bools"], [1, 0])
    assert decoded["empty_floats"].dtype == np.float32 and decoded["empty_floats"].size == 0
    assert len(encode_varint(-1)) == 10  # negative int64: 10-byte two's complement, not zigzag


def test_example_decodes_unpacked_lists_and_skips_unknown_fields():
    def tag(number, wire_type):
        return encode_varint(number << 3 | wire_type)

    floats = np.array([0.5, -3.0], "<f4")
    float_list = b"".join(tag(1, 5) + value.tobytes() for value in floats)  # wire type 5, one per value
    int64_list = b"".join(tag(1, 0) + encode_varint(value) for value in (7, -2, 2**40))  # wire type 0
    entries = b"".join(
        encode_field(1, encode_field(1, key) + encode_field(2, feature))
        for key, feature in [(b"f", encode_field(2, float_list)), (b"i", encode_field(3, int64_list))]
    )
    unknown = tag(9, 0) + encode_varint(5) + tag(10, 1) + b"\x00" * 8  # fields a decoder must skip
    decoded = parse_example(unknown + encode_field(1, entries))
    assert np.array_equal(decoded["f"], floats)
    assert np.array_equal(decoded["i"], [7, -2, 2**40])
    with pytest.raises(TFRecordError, match="length 100 runs past"):
        parse_example(tag(1, 2) + encode_varint(100) + b"short")


def read_set(directory):
    clips = {}
    for shard in sorted(directory.glob("shard-*.tar")):
        clips.update({clip.key: clip for clip in read_shard_clips(shard)})
    return clips


def test_make_shards_round_trip_bridge_fixture(tmp_path):
    output = tmp_path / "shards"
    assert make_shards(["--source", "rlds", "--rlds-dir", str(BRIDGE_DIR), "--output", str(output),
                        "--units-per-shard", "1"]) == 0
    manifest = Manifest.read(output)
    assert (manifest.clips, len(manifest.shards), manifest.skipped) == (3, 2, {})
    clips = read_set(output)
    train_files = fixture.bridge_layout()["train"]
    for file_index, episodes in enumerate(train_files):
        for record_index, (episode_index, num_steps) in enumerate(episodes):
            clip = clips[f"bridge_dataset-train-{file_index:05d}-{record_index:06d}"]
            episode = fixture.bridge_episode(episode_index, num_steps)
            meta = clip.meta
            assert (meta.num_frames, meta.height, meta.width) == (num_steps, fixture.IMAGE_HEIGHT, fixture.IMAGE_WIDTH)
            assert (meta.fps, meta.camera, meta.source, meta.action_dim) == (5.0, "image_0", "rlds", 7)
            assert meta.instruction == episode["instruction"]
            assert meta.episode_id == str(episode["episode_id"])
            np.testing.assert_array_equal(clip.actions, episode["actions"][:-1])
            error = np.abs(clip.frames.astype(np.float32) - episode["frames"]["image_0"]).mean()
            assert error < 4, f"{clip.key}: mean abs error {error:.2f} after JPEG + H.264"


def test_split_selection_and_max_episodes():
    val = RLDSSource(BRIDGE_DIR, split="val")
    val_clips = [clip for unit in val.work_units() for clip in val.clips(unit)]
    assert [clip.key for clip in val_clips] == ["bridge_dataset-val-00000-000000"]
    assert val_clips[0].meta.instruction == fixture.bridge_episode(3, 4)["instruction"]
    for max_episodes, expected in [(1, [(0, 1)]), (2, [(0, 2)]), (3, [(0, 2), (1, 1)]), (9, [(0, 2), (1, 1)])]:
        source = RLDSSource(BRIDGE_DIR, max_episodes=max_episodes)
        units = source.work_units()
        assert [(unit.index, unit.max_records) for unit in units] == expected
        assert sum(1 for unit in units for _ in source.clips(unit)) == min(max_episodes, 3)


@pytest.mark.parametrize("shard_info", ["numShards", "none"])
def test_older_dataset_info_without_shard_lengths(tmp_path, shard_info):
    version_dir = tmp_path / "bridge_dataset" / "1.0.0"
    shutil.copytree(BRIDGE_DIR, version_dir)
    info = json.loads((version_dir / "dataset_info.json").read_text())
    for split in info["splits"]:
        del split["filepathTemplate"]
        lengths = split.pop("shardLengths")
        if shard_info == "numShards":
            split["numShards"] = str(len(lengths))
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    source = RLDSSource(version_dir, max_episodes=3)  # episodes per file are counted from the framing
    assert [(unit.index, unit.max_records) for unit in source.work_units()] == [(0, 2), (1, 1)]
    assert [Path(path).name for path, _ in source.files] == [
        "bridge_dataset-train.tfrecord-00000-of-00002", "bridge_dataset-train.tfrecord-00001-of-00002"]


def test_camera_and_instruction_options():
    source = RLDSSource(BRIDGE_DIR, image_key="steps/observation/image_1", instruction_key="none",
                        action_keys="steps/action,steps/reward,steps/is_last")
    clip = next(source.clips(source.work_units()[0]))
    episode = fixture.bridge_episode(0, 6)
    assert clip.meta.camera == "image_1" and clip.meta.instruction == "" and clip.meta.action_dim == 9
    assert np.abs(clip.frames.astype(np.float32) - episode["frames"]["image_1"]).mean() < 3
    is_last = (np.arange(6) == 5).astype(np.float32)[:, None]
    np.testing.assert_array_equal(clip.actions, np.concatenate([episode["actions"], is_last, is_last], 1)[:-1])


def oxe_bridge_dataset(root, height=27, width=33, num_steps=5):
    """An OXE-bridge-0.1.0-like dataset: dict-shaped actions, instruction under observation, odd PNG images."""
    action = fixture.dict_node({
        "world_vector": fixture.tensor_node((3,), "float32"),
        "rotation_delta": fixture.tensor_node((3,), "float32"),
        "open_gripper": fixture.tensor_node((), "bool"),
        "terminate_episode": fixture.tensor_node((), "float32"),
    })
    observation = fixture.dict_node({"image": fixture.image_node(height, width, "png"),
                                     "natural_language_instruction": fixture.text_node()})
    features = fixture.dict_node({"steps": fixture.dataset_node(fixture.dict_node({
        "action": action, "observation": observation, "is_first": fixture.tensor_node((), "bool")}))})
    rng = np.random.default_rng(3)
    frames = fixture.episode_frames(0, num_steps, height, width)
    episode = {
        "steps/action/world_vector": rng.normal(size=(num_steps, 3)).astype(np.float32),
        "steps/action/rotation_delta": rng.normal(size=(num_steps, 3)).astype(np.float32),
        "steps/action/open_gripper": np.array([True, False, True, True, False][:num_steps]),
        "steps/action/terminate_episode": np.zeros(num_steps, np.float32),
        "steps/observation/image": [fixture.encode_image(frame, "PNG") for frame in frames],
        "steps/observation/natural_language_instruction": [b"pick up the spoon"] * num_steps,
        "steps/is_first": np.arange(num_steps) == 0,
    }
    version_dir = root / "bridge" / "0.1.0"
    fixture.write_rlds_dataset(version_dir, "bridge", features, {"train": [[encode_example(episode)]]})
    return version_dir, episode, frames


def test_dict_shaped_actions_need_action_keys_and_odd_sizes_are_cropped(tmp_path):
    version_dir, episode, frames = oxe_bridge_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"--action-keys .*steps/action/world_vector \(tensor float32\[3\]\).*"
                                         r"steps/action/open_gripper \(tensor bool\[\]\)"):
        RLDSSource(version_dir)
    keys = "steps/action/world_vector,steps/action/rotation_delta,steps/action/open_gripper"
    source = RLDSSource(version_dir, action_keys=keys)
    [clip] = list(source.clips(source.work_units()[0]))
    np.testing.assert_array_equal(clip.frames, frames[:, :26, :32])  # PNG is lossless; one row and column cropped
    assert (clip.meta.width, clip.meta.height, clip.meta.camera) == (32, 26, "image")
    assert clip.meta.instruction == "pick up the spoon" and clip.meta.fps == 5.0
    assert clip.meta.episode_id == clip.key == "bridge-train-00000-000000"
    expected = np.concatenate([episode["steps/action/world_vector"], episode["steps/action/rotation_delta"],
                               episode["steps/action/open_gripper"][:, None].astype(np.float32)], axis=1)
    np.testing.assert_array_equal(clip.actions, expected[:-1])
    manifest = convert(source, tmp_path / "shards", progress=False)
    [stored] = read_shard_clips(tmp_path / "shards" / manifest.shards[0].name)
    assert stored.frames.shape == (5, 26, 32, 3) and np.array_equal(stored.actions, expected[:-1])


def test_bad_episodes_are_skipped_and_counted(tmp_path):
    good = fixture.bridge_example(fixture.bridge_episode(0, 3))
    steps = {"steps/action": np.zeros(0, np.float32), "steps/observation/image_0": [], "steps/observation/image_1": [],
             "steps/language_instruction": []}
    empty = encode_example(steps)
    episode = fixture.bridge_episode(1, 3)
    episode["actions"] = episode["actions"][:2]  # 2 action rows for 3 images
    inconsistent = fixture.bridge_example(episode)
    undecodable = parse_example(good)
    undecodable["steps/observation/image_0"][1] = b"GIF89a not an image"
    records = [good, empty, inconsistent, encode_example(undecodable), good]
    version_dir = tmp_path / "bridge_dataset" / "1.0.0"
    fixture.write_rlds_dataset(version_dir, "bridge_dataset", fixture.bridge_features(), {"train": [records]})
    source = RLDSSource(version_dir)
    produced = list(source.clips(source.work_units()[0]))
    assert [type(item) for item in produced] == [Clip, SkipClip, SkipClip, SkipClip, Clip]
    manifest = convert(source, tmp_path / "shards", progress=False)
    assert manifest.clips == 2
    assert manifest.skipped == {"empty_episode": 1, "inconsistent_steps": 1, "undecodable_image": 1}


def test_corrupt_tfrecord_raises_naming_file_and_offset(tmp_path):
    version_dir = tmp_path / "bridge_dataset" / "1.0.0"
    shutil.copytree(BRIDGE_DIR, version_dir)
    path = version_dir / "bridge_dataset-train.tfrecord-00000-of-00002"
    raw = bytearray(path.read_bytes())
    second = 12 + struct.unpack("<Q", raw[:8])[0] + 4
    raw[second + 500] ^= 1
    path.write_bytes(bytes(raw))
    source = RLDSSource(version_dir)
    with pytest.raises(TFRecordError, match=rf"{path}: corrupt record data at offset {second}"):
        list(source.clips(source.work_units()[0]))


def test_clear_errors_for_bad_options(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--image-key 'steps/observation/wrist'.*steps/observation/image_0"):
        RLDSSource(BRIDGE_DIR, image_key="steps/observation/wrist")
    with pytest.raises(ValueError, match=r"--split 'test'.*\['train', 'val'\]"):
        RLDSSource(BRIDGE_DIR, split="test")
    with pytest.raises(ValueError, match=r"--instruction-key 'steps/action'.*steps/language_instruction"):
        RLDSSource(BRIDGE_DIR, instruction_key="steps/action")
    with pytest.raises(ValueError, match=r"--action-keys: \['steps/observation/image_0'\]"):
        RLDSSource(BRIDGE_DIR, action_keys="steps/action,steps/observation/image_0")
    copy = tmp_path / "my_robot" / "1.0.0"
    shutil.copytree(BRIDGE_DIR, copy)
    info = (copy / "dataset_info.json").read_text().replace('"bridge_dataset"', '"my_robot"')
    (copy / "dataset_info.json").write_text(info)
    missing = r"2 of 2 files missing, first .*my_robot-train\.tfrecord-00000-of-00002"
    with pytest.raises(FileNotFoundError, match=missing):
        RLDSSource(copy, fps=10)
    for path in copy.glob("bridge_dataset-*"):
        path.rename(copy / path.name.replace("bridge_dataset", "my_robot"))
    with pytest.raises(ValueError, match="dataset 'my_robot': frame rate unknown .*pass --fps"):
        RLDSSource(copy)
    assert RLDSSource(copy, fps=10).fps == 10
    (copy / "dataset_info.json").unlink()
    assert make_shards(["--source", "rlds", "--rlds-dir", str(copy), "--output", str(tmp_path / "out")]) == 2
    assert f"{copy / 'dataset_info.json'}: not found" in capsys.readouterr().err


def tfds_episode(rng, index, num_steps, height, width):
    smooth = fixture.episode_frames(index, num_steps, height, width)  # JPEG camera; the PNG one is noise
    return {
        "steps": [
            {
                "observation": {
                    "image_0": smooth[step],
                    "wrist": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                },
                "action": rng.normal(size=4).astype(np.float32),
                "gripper": bool(rng.integers(2)),
                "language_instruction": f"task {index} \u00e9",
                "is_first": step == 0,
            }
            for step in range(num_steps)
        ],
        "episode_metadata": {"file_path": f"/raw/episode_{index}"},
    }


def build_tfds_dataset(tfds, data_dir, height=24, width=32):
    """A real RLDS dataset written by tensorflow_datasets (features.json, dataset_info.json and all)."""
    with tfds.core.registered.skip_registration():

        class TinyRlds(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                step = {
                    "observation": {
                        "image_0": tfds.features.Image(shape=(height, width, 3), encoding_format="jpeg"),
                        "wrist": tfds.features.Image(shape=(height, width, 3), encoding_format="png"),
                    },
                    "action": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "gripper": tfds.features.Scalar(dtype=np.bool_),
                    "language_instruction": tfds.features.Text(),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                }
                features = {
                    "steps": tfds.features.Dataset(step),
                    "episode_metadata": {"file_path": tfds.features.Text()},
                }
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                rng = np.random.default_rng(0)
                for index in range(4):
                    yield f"episode_{index}", tfds_episode(rng, index, 3 + index, height, width)

        builder = TinyRlds(data_dir=str(data_dir))
        builder.download_and_prepare()
    return builder


def assert_matches_tensorflow(ours: dict, example) -> None:
    """parse_example's output holds exactly what TensorFlow parsed from the same record."""
    assert set(ours) == set(example.features.feature)
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value)
        if kind == "bytes_list":
            assert ours[key] == values, key
        else:
            assert ours[key].dtype == (np.float32 if kind == "float_list" else np.int64), key
            np.testing.assert_array_equal(ours[key], np.array(values, ours[key].dtype), err_msg=key)


@pytest.mark.slow
def test_reference_tensorflow_writers_decode_identically(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    rows = [{"b": [b"abc", b""], "f": [1.5, -0.25], "i": [-1, 2**62, 0]}, {"b": [], "f": [], "i": [-(2**63)]}]
    path = tmp_path / "reference.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for row in rows:
            feature = {
                "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=row["b"])),
                "f": tf.train.Feature(float_list=tf.train.FloatList(value=row["f"])),
                "i": tf.train.Feature(int64_list=tf.train.Int64List(value=row["i"])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for row, (_, data) in zip(rows, iter_records(path), strict=True):
        decoded = parse_example(data)
        assert decoded["b"] == row["b"] and list(decoded["f"]) == row["f"] and list(decoded["i"]) == row["i"]
    ours = tmp_path / "ours.tfrecord"
    write_records(ours, [encode_example({"f": np.array([2.5], np.float32), "i": np.array([-7])})])
    [record] = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(ours))]
    assert list(record.features.feature["i"].int64_list.value) == [-7]
    assert list(record.features.feature["f"].float_list.value) == [2.5]

    builder = build_tfds_dataset(tfds, tmp_path / "tfds")
    [tfds_file] = (tmp_path / "tfds" / "tiny_rlds" / "1.0.0").glob("*.tfrecord-*")
    for (_, data), record in zip(iter_records(tfds_file), tf.data.TFRecordDataset(str(tfds_file)), strict=True):
        assert_matches_tensorflow(parse_example(data), tf.train.Example.FromString(record.numpy()))
    source = RLDSSource(tmp_path / "tfds" / "tiny_rlds" / "1.0.0", fps=10,
                        action_keys="steps/action,steps/gripper")
    clips = {clip.meta.episode_id: clip for unit in source.work_units() for clip in source.clips(unit)}
    wrist = RLDSSource(source.rlds_dir, fps=10, image_key="steps/observation/wrist", action_keys="none")
    wrist_frames = {clip.meta.episode_id: clip.frames for unit in wrist.work_units() for clip in wrist.clips(unit)}
    reference = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(clips) == len(reference) == 4
    for episode in reference:
        steps = list(episode["steps"])
        clip = clips[episode["episode_metadata"]["file_path"].decode()]
        assert clip.meta.instruction == steps[0]["language_instruction"].decode()
        actions = np.array([np.append(s["action"], np.float32(s["gripper"])) for s in steps], np.float32)
        np.testing.assert_array_equal(clip.actions, actions[:-1])
        # PIL's and TensorFlow's JPEG decoders round apart (TF defaults to the fast IDCT): ours must be
        # close to TensorFlow's and no further than it from the images before JPEG encoding.
        tf_jpeg = np.stack([s["observation"]["image_0"] for s in steps]).astype(np.int16)
        index = int(clip.meta.episode_id.rsplit("_", 1)[1])
        original = fixture.episode_frames(index, len(steps), 24, 32).astype(np.int16)
        assert np.abs(clip.frames - tf_jpeg).mean() < 2
        assert np.abs(clip.frames - original).mean() <= np.abs(tf_jpeg - original).mean()
        tf_png = np.stack([s["observation"]["wrist"] for s in steps])
        np.testing.assert_array_equal(wrist_frames[clip.meta.episode_id], tf_png)
