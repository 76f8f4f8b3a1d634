"""The VPT baseline on sprite clips: an IDM trained on labelled clips predicts held-out actions, pseudo-labels
actionless clips (video bytes unchanged, re-runs skip finished shards), resumes training exactly, and rejects bad
inputs with messages that say what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lapa_dist.baselines.vpt import IDM, IDMModelConfig, is_held_out, predict_clip
from lapa_dist.data.config import DataConfig, DatasetSpec
from lapa_dist.data.format import Manifest, npy_load
from lapa_dist.data.loader import VideoLoader
from lapa_dist.data.reader import iter_raw_samples
from lapa_dist.data.sources.sprites import make_sprite_clip
from lapa_dist.data.writer import ShardWriter
from tests.shard_helpers import write_set
from tools.vpt import main as vpt_main

FRAMES, SIZE = 16, 32
TINY = ["--set", f"model.image_size={SIZE}", "--set", "model.widths=[16,32,64]", "--set", "model.hidden=64",
        "--set", "batch_size=32", "--set", "logging.progress=false", "--set", "logging.log_every=50"]
TRAIN_STEPS = 300  # about 20 s on one loaded CPU core; held-out R² measured 0.93 / 0.92 (dx / dy)
R2_BAR = 0.7
"""Held-out R² every action dimension must reach; always predicting the training mean scores about 0."""


def sprite_set(directory, indices, clips_per_shard=8, with_actions=True):
    shards = []
    for start in range(0, len(indices), clips_per_shard):
        clips = [make_sprite_clip(i, FRAMES, SIZE) for i in indices[start : start + clips_per_shard]]
        if not with_actions:
            for clip in clips:
                clip.actions, clip.meta = None, clip.meta.model_copy(update={"action_dim": None})
        shards.append(clips)
    return write_set(directory, shards, source="sprites")


def read_clips(directory) -> dict[str, dict[str, bytes]]:
    clips = {}
    for shard in Manifest.read(directory).shards:
        for sample in iter_raw_samples(directory / shard.name):
            clips[sample.key] = sample.members
    return clips


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpt")
    labelled = sprite_set(root / "labelled", list(range(80)))
    idm = root / "idm"
    assert vpt_main(["train", "--labelled", str(labelled), "--out", str(idm), *TINY,
                     "--set", f"steps={TRAIN_STEPS}"]) == 0
    return root, labelled, idm


def test_idm_beats_the_mean_action_on_held_out_clips(trained):
    _, labelled, idm = trained
    metrics = json.loads((idm / "val_metrics.json").read_text())
    keys = {key for shard in Manifest.read(labelled).shards for key in shard.keys}
    held_out = {key for key in keys if is_held_out(key, 0.2)}
    assert metrics["val_clips"] == len(held_out) and metrics["train_clips"] == len(keys) - len(held_out)
    assert metrics["val_actions"] == len(held_out) * (FRAMES - 1)
    assert min(metrics["r2_per_dim"]) > R2_BAR, metrics
    assert max(metrics["mean_baseline_r2_per_dim"]) < 0.05
    assert all(m < b / 3 for m, b in zip(metrics["mse_per_dim"], metrics["mean_baseline_mse_per_dim"]))
    config = json.loads((idm / "config.json").read_text())
    assert config["model"]["action_dim"] == 2 and config["steps"] == TRAIN_STEPS
    weights = load_file(str(idm / "model.safetensors"))
    assert weights["action_std"].shape == (2,) and (weights["action_std"] > 0).all()
    assert len(list((idm / "checkpoints").glob("step-*"))) == 1
    steps = [json.loads(line)["step"] for line in (idm / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(50, TRAIN_STEPS + 1, 50))


def write_label_input(directory):
    """Shard 0: clips without actions; shard 1: clips with true actions (to be replaced) and an undecodable clip."""
    sprite_set(directory, list(range(100, 104)), with_actions=False)
    clips = [make_sprite_clip(i, FRAMES, SIZE) for i in range(104, 108)]
    with ShardWriter(directory / "shard-000001.tar") as writer:
        for clip in clips:
            writer.write(clip)
        broken = clips[0].meta.model_copy(update={"episode_id": "broken"})
        writer.write_members("broken", {"mp4": b"not a video at all", "json": broken.model_dump_json().encode()})
    Manifest.gather(directory, "sprites").write(directory)
    return directory


def test_pseudo_labels_every_clip_keeps_the_video_and_tracks_the_true_actions(trained, capsys):
    root, _, idm = trained
    source, output = write_label_input(root / "videos"), root / "pseudo"
    assert vpt_main(["label", "--idm", str(idm), "--input", str(source), "--output", str(output)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["clips_labelled"] == 8 and counts["clips_copied_unlabelled"] == 1
    assert counts["shards_labelled"] == 2 and "shards_skipped" not in counts
    inputs, outputs = read_clips(source), read_clips(output)
    assert sorted(outputs) == sorted(inputs)
    assert Manifest.read(output).clips == 9 and Manifest.read(output).source == "vpt_pseudo:sprites"
    true, pseudo = [], []
    for key, members in outputs.items():
        assert members["mp4"] == inputs[key]["mp4"]
        if key == "broken":
            assert members == inputs[key]
            continue
        meta = json.loads(members["json"])
        actions = npy_load(members["actions.npy"])
        assert actions.dtype == np.float32 and actions.shape == (FRAMES - 1, 2) and meta["action_dim"] == 2
        assert meta["extra"]["actions_source"] == f"vpt_idm:{idm.resolve()}"
        if "actions.npy" in inputs[key]:
            assert not np.array_equal(actions, npy_load(inputs[key]["actions.npy"]))  # replaced, not kept
        true.append(make_sprite_clip(int(key.split("-")[1]), FRAMES, SIZE).actions)
        pseudo.append(actions)
    true, pseudo = np.concatenate(true), np.concatenate(pseudo)
    for dim in range(2):
        assert np.corrcoef(true[:, dim], pseudo[:, dim])[0, 1] > 0.8

    loader = VideoLoader(DataConfig(datasets=[DatasetSpec(name="pseudo", path=str(output), offset_frames=1)],
                                    view="frames", target="actions", image_size=SIZE, batch_size=4, num_workers=0))
    assert next(iter(loader))["target"].shape == (4, 2)  # the VLA stages read the pseudo actions as targets

    before = {path.name: path.stat().st_mtime_ns for path in output.glob("shard-*")}
    assert vpt_main(["label", "--idm", str(idm), "--input", str(source), "--output", str(output)]) == 0
    assert json.loads(capsys.readouterr().out) == {"shards_skipped": 2}
    assert {path.name: path.stat().st_mtime_ns for path in output.glob("shard-*")} == before


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """k = 2 (the pair (x_t, x_{t+2}) predicts a_t, a_{t+1}); constant lr, so stopping at 6 changes no schedule."""
    labelled = sprite_set(tmp_path / "labelled", list(range(24)))
    args = [*TINY, "--set", "model.frame_offset=2", "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=0",
            "--set", "save_every=3", "--set", "logging.log_every=1", "--set", "batch_size=8"]

    def train(out, steps):
        return vpt_main(["train", "--labelled", str(labelled), "--out", str(out), *args, "--set", f"steps={steps}"])

    assert train(tmp_path / "straight", 10) == 0
    assert train(tmp_path / "resumed", 6) == 0
    assert train(tmp_path / "resumed", 10) == 0
    straight, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "resumed"))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")] == ["step-00000010"]
    metrics = json.loads((tmp_path / "resumed" / "val_metrics.json").read_text())
    assert metrics["val_actions"] == metrics["val_clips"] * (FRAMES - 1)  # the window's tail rows fill every step
    assert train(tmp_path / "resumed", 10) == 0  # a finished run: nothing to train, weights written again
    changed = ["train", "--labelled", str(labelled), "--out", str(tmp_path / "resumed"), *args,
               "--set", "steps=10", "--set", "model.hidden=32"]
    assert vpt_main(changed) == 2


class IndexIDM(IDM):
    """Predicts, for the pair starting at frame t, the actions t .. t + k - 1 (frames are filled with t / 100)."""

    @torch.no_grad()
    def predict(self, x_t, x_next):
        start = x_t[:, 0, 0, 0] * 100  # [B]
        rows = start[:, None] + torch.arange(self.config.frame_offset)  # [B, k]
        return rows[..., None].expand(-1, -1, self.config.action_dim)


@pytest.mark.parametrize("frame_offset", [1, 2, 4])
def test_every_step_gets_the_row_of_the_window_that_predicts_it(frame_offset):
    model = IndexIDM(IDMModelConfig(image_size=8, frame_offset=frame_offset, action_dim=3))
    frames = (torch.arange(11, dtype=torch.float32) / 100)[:, None, None, None].expand(11, 3, 8, 8)
    actions = predict_clip(model, frames, batch_size=3, device=torch.device("cpu"))
    assert actions.shape == (10, 3)
    np.testing.assert_allclose(actions[:, 0], np.arange(10), atol=1e-4)
    with pytest.raises(ValueError, match="at least k"):
        predict_clip(model, frames[:frame_offset], batch_size=3, device=torch.device("cpu"))


def test_held_out_split_is_by_key_and_about_the_asked_fraction():
    keys = [f"clip-{i:05d}" for i in range(4000)]
    held = [is_held_out(key, 0.2) for key in keys]
    assert 0.17 < np.mean(held) < 0.23
    assert held == [is_held_out(key, 0.2) for key in keys]
    assert all(is_held_out(key, 0.5) for key, h in zip(keys, held) if h)  # a larger fraction keeps the smaller one's


def test_bad_inputs_give_clear_errors(tmp_path, trained, capsys):
    _, labelled, idm = trained

    def error_of(*args) -> str:
        assert vpt_main(list(args)) == 2
        return capsys.readouterr().err

    absent = str(tmp_path / "absent")
    assert "no such directory" in error_of("train", "--labelled", absent, "--out", str(tmp_path / "o"))
    one_clip = write_set(tmp_path / "one_clip", [[make_sprite_clip(0, FRAMES, SIZE)]])
    assert "held-out clips" in error_of("train", "--labelled", str(one_clip), "--out", str(tmp_path / "o"), *TINY)
    no_actions = sprite_set(tmp_path / "no_actions", [0, 1, 2], with_actions=False)
    assert "no clip holds actions.npy" in error_of("train", "--labelled", str(no_actions), "--out", str(tmp_path / "o"))

    empty = tmp_path / "empty"
    empty.mkdir()
    Manifest.gather(empty, "test").write(empty)
    out = str(tmp_path / "out")
    assert "holds no clips" in error_of("label", "--idm", str(idm), "--input", str(empty), "--output", out)
    assert "not a shard set" in error_of("label", "--idm", str(idm), "--input", str(tmp_path), "--output", out)
    assert "no such directory" in error_of("label", "--idm", str(idm), "--input", str(tmp_path / "x"), "--output", out)
    assert "no such directory" in error_of("label", "--idm", str(tmp_path / "x"), "--input", str(labelled),
                                           "--output", out)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(idm / "config.json", unfinished / "config.json")
    assert "no model.safetensors" in error_of("label", "--idm", str(unfinished), "--input", str(labelled),
                                              "--output", out)
    assert "no config.json" in error_of("label", "--idm", str(tmp_path / "empty"), "--input", str(labelled),
                                        "--output", out)
    assert "must differ" in error_of("label", "--idm", str(idm), "--input", str(labelled), "--output", str(labelled))
