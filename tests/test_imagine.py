"""Neural rollouts (lapa_dist/eval/imagine.py, tools/imagine.py) with a real tiny LAQ and a real tiny VLA policy,
both randomly initialised: the loop is checked step by step against independent recomputations."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lapa_dist.data.video import decode_frames
from lapa_dist.eval.imagine import (
    check_compatible,
    clip_frames,
    imagine_rollout,
    latents_path,
    save_rollout,
    write_video,
)
from lapa_dist.models.action_tokenizer import ActionTokenizer
from lapa_dist.models.laq import LAQ, LAQModelConfig
from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.policy import Policy, save_policy, square_images
from lapa_dist.train.laq import LAQRunConfig, load_trained_laq
from lapa_dist.train.run_dir import COMPLETE_MARKER, checkpoint_tag
from tests.launch_helpers import ROOT
from tests.shard_helpers import index_clip, write_set
from tests.tiny_tokenizer import load_tiny_tokenizer

LAQ_CONFIG = json.loads((ROOT / "configs/laq/tiny.json").read_text())  # 16 px, 8 codes, 4 per latent action
VLA_MODEL = json.loads((ROOT / "configs/vla/tiny_pretrain.json").read_text())["model"]  # 32 px, latent 4 of 8
POLICY_SIZE = 32
INSTRUCTION = "pick up the red block"


def make_laq(seed: int = 0, **changes) -> LAQ:
    torch.manual_seed(seed)
    return LAQ(LAQModelConfig.model_validate({**LAQ_CONFIG["model"], **changes})).eval()


def write_laq_run(directory: Path, laq: LAQ) -> Path:
    """A run directory as a ZeRO-0 LAQ run leaves it (config.json, one COMPLETE checkpoint), for load_trained_laq."""
    config = {**LAQ_CONFIG, "model": laq.config.model_dump(mode="json"), "deepspeed": {"zero_stage": 0}}
    config["data"]["datasets"][0]["path"] = "unused"
    checkpoint = directory / "checkpoints" / checkpoint_tag(1)
    checkpoint.mkdir(parents=True)
    (directory / "config.json").write_text(LAQRunConfig.model_validate(config).model_dump_json())
    torch.save({"module": laq.state_dict()}, checkpoint / "mp_rank_00_model_states.pt")
    torch.save({}, checkpoint / "extra_rank0.pt")
    (checkpoint / COMPLETE_MARKER).touch()
    return directory


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(1)
    model = VLA(VLAConfig.model_validate(VLA_MODEL))
    return Policy(model, tokenizer, None, "latent", POLICY_SIZE, {"source": "in-process"})


@pytest.fixture(scope="module")
def laq():
    return make_laq()


@pytest.fixture(scope="module")
def first_frame():
    return np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # not square, not 16 px


def decode_by_hand(laq: LAQ, frame: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] and a latent action [s] -> the decoder's next frame as uint8 [S, S, 3]."""
    x_t = torch.tensor(frame).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        prediction = laq.decode(x_t, torch.tensor(latent)[None])[0]
    return (prediction.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def test_each_step_is_the_policy_then_the_decoder(policy, laq, first_frame):
    steps = 4
    frames, latents = imagine_rollout(policy, laq, first_frame, INSTRUCTION, steps)
    assert frames.shape == (steps + 1, 16, 16, 3) and frames.dtype == np.uint8
    assert latents.shape == (steps, 4) and latents.dtype == np.int64
    assert latents.min() >= 0 and latents.max() < laq.config.codebook_size
    np.testing.assert_array_equal(frames[0], square_images(first_frame[None], 16)[0])
    for step in range(steps):
        np.testing.assert_array_equal(latents[step], policy.predict_latent(frames[step], INSTRUCTION)[0])
        np.testing.assert_array_equal(frames[step + 1], decode_by_hand(laq, frames[step], latents[step]))
    other = (latents[0] + 1) % laq.config.codebook_size  # the check above would see a wrong latent
    assert not np.array_equal(decode_by_hand(laq, frames[0], other), frames[1])
    assert not np.array_equal(frames[0], frames[1])


class ScriptedLatents(Policy):
    """The real tiny policy, but latent actions from a script; records the images it is shown."""

    def __init__(self, policy: Policy, script: np.ndarray):
        super().__init__(policy.model, policy.tokenizer, None, "latent", policy.image_size, policy.metadata)
        self.script, self.seen = script, []

    def predict_latent(self, images, instructions):
        self.seen.append((np.array(images), list(instructions)))
        return self.script[len(self.seen) - 1][None]


def test_the_policy_is_shown_the_imagined_frames(policy, laq, first_frame):
    script = np.array([[0, 1, 2, 3], [7, 7, 7, 7], [5, 0, 5, 0]])
    scripted = ScriptedLatents(policy, script)
    frames, latents = imagine_rollout(scripted, laq, first_frame, INSTRUCTION, len(script))
    np.testing.assert_array_equal(latents, script)
    assert [instructions for _, instructions in scripted.seen] == [[INSTRUCTION]] * len(script)
    for step, (images, _) in enumerate(scripted.seen):
        np.testing.assert_array_equal(images, frames[step : step + 1])
        np.testing.assert_array_equal(frames[step + 1], decode_by_hand(laq, frames[step], script[step]))


def test_policy_must_have_a_latent_head_that_fits_the_codebook(policy, laq, tokenizer):
    check_compatible(policy, laq)
    action_head = Policy(policy.model, tokenizer, None, "action", POLICY_SIZE, {})
    with pytest.raises(ValueError, match="latent head"):
        check_compatible(action_head, laq)
    with pytest.raises(ValueError, match="codebook_size: policy 8, LAQ 16"):
        imagine_rollout(policy, make_laq(codebook_size=16), np.zeros((16, 16, 3), np.uint8), INSTRUCTION, 1)
    with pytest.raises(ValueError, match="code_seq_len: policy 4, LAQ 1"):
        check_compatible(policy, make_laq(code_seq_len=1))


def expanded_gif(path: Path, fps: float) -> list[np.ndarray]:
    """GIF frames repeated by their durations (Pillow merges identical consecutive frames into a longer one)."""
    frames = []
    with Image.open(path) as gif:
        for index in range(gif.n_frames):
            gif.seek(index)
            repeats = round(gif.info["duration"] / (1000 / fps))
            frames += [np.asarray(gif.convert("RGB"))] * repeats
    return frames


def test_writers_decode_back_to_every_frame(tmp_path):
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    frames = np.stack([np.broadcast_to(np.roll(ramp, 4 * t)[None, :, None], (32, 32, 3)) for t in range(5)])
    frames[3] = frames[2]  # a fixed point: one longer GIF frame
    decoded = decode_frames(write_video(tmp_path / "a.mp4", frames, fps=5).read_bytes())
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 8
    gif = expanded_gif(write_video(tmp_path / "a.gif", frames, fps=5), fps=5)
    assert len(gif) == len(frames)
    assert max(np.abs(g.astype(int) - f).max() for g, f in zip(gif, frames)) <= 8
    with pytest.raises(ValueError, match="must end in"):
        write_video(tmp_path / "a.avi", frames, fps=5)


def test_save_rollout_side_by_side_and_latents_json(tmp_path, policy, laq, first_frame):
    frames, latents = imagine_rollout(policy, laq, first_frame, INSTRUCTION, 3)
    real = frames[:2] // 2 + 1  # a "real" clip that ends after 2 frames
    video, record = save_rollout(tmp_path / "r.mp4", frames, latents, 4.0, {"instruction": INSTRUCTION}, real, 2)
    assert record == latents_path(video) == tmp_path / "r.json"
    decoded = decode_frames(video.read_bytes())
    assert decoded.shape == (4, 32, 64, 3)  # 16 px × 2 (upscale), real | imagined
    assert decoded[2:, :, :32].mean() < 4  # black where the real clip has ended
    saved = json.loads(record.read_text())
    assert saved["latents"] == latents.tolist() and saved["steps"] == 3 and saved["image_size"] == 16
    assert saved["video_size"] == [32, 64] and saved["layout"] == "real | imagined"


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, policy, laq, tokenizer):
    """The tiny LAQ as a run directory, the tiny policy as a policy directory, a shard set, a PNG, and the
    mismatched inputs the CLI must refuse."""
    root = tmp_path_factory.mktemp("imagine")
    actions = np.random.default_rng(0).normal(size=(64, 4))
    observation = {"camera": "", "width": 24, "height": 24}
    paths = {"laq": write_laq_run(root / "laq", laq),
             "policy": save_policy(root / "policy", policy.model, tokenizer, None, POLICY_SIZE, observation, "test"),
             "laq16": write_laq_run(root / "laq16", make_laq(codebook_size=16)),
             "action_policy": save_policy(root / "action_policy", policy.model, tokenizer,
                                          ActionTokenizer.fit(actions, 8), POLICY_SIZE, observation, "test"),
             "shards": write_set(root / "shards", [[index_clip("a", 6, 24), index_clip("b", 7, 24)],
                                                   [labelled_clip()]]),
             "png": root / "first.png"}
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(paths["png"])
    return paths


def labelled_clip():
    """A clip labelled with latent actions at H = 2 (frame i has grey level 8 + 6 i)."""
    clip = index_clip("c", 9, 24)
    clip.meta = clip.meta.model_copy(update={"latent_offset": 2})
    clip.latents = np.zeros((7, 4), np.int16)
    return clip


def test_clip_frames_default_to_the_first_clip_and_the_labels_offset(on_disk):
    real, info = clip_frames(on_disk["shards"], None, 0, None, 10, 16)
    assert info["clip"] == "a" and info["stride"] == 1 and real.shape == (6, 16, 16, 3)
    real, info = clip_frames(on_disk["shards"], "c", 1, None, 3, 16)
    assert info["stride"] == 2 and info["real_frames"] == 3 and info["shard"] == "shard-000001.tar"
    np.testing.assert_allclose(real.reshape(3, -1).mean(1), [14, 26, 38], atol=2)  # frames 1, 3, 5
    with pytest.raises(ValueError, match="--start 9: clip c has 9 frames"):
        clip_frames(on_disk["shards"], "c", 9, None, 3, 16)


def cli(*args) -> int:
    from tools.imagine import main

    return main([str(arg) for arg in args])


def test_cli_from_an_image(on_disk, tmp_path):
    out = tmp_path / "rollout.mp4"
    assert cli("--policy", on_disk["policy"], "--laq", on_disk["laq"], "--image", on_disk["png"],
               "--instruction", INSTRUCTION, "--steps", 3, "--out", out, "--device", "cpu") == 0
    assert decode_frames(out.read_bytes()).shape == (4, 16, 16, 3)
    saved = json.loads(out.with_suffix(".json").read_text())
    policy = Policy.from_pretrained(on_disk["policy"], "cpu")
    laq, _ = load_trained_laq(str(on_disk["laq"]), torch.device("cpu"))
    first = np.asarray(Image.open(on_disk["png"]).convert("RGB"))
    _, latents = imagine_rollout(policy, laq, first, INSTRUCTION, 3)
    assert saved["latents"] == latents.tolist()
    assert saved["instruction"] == INSTRUCTION and saved["policy_image_size"] == POLICY_SIZE


def test_cli_from_a_clip_beside_the_real_frames(on_disk, tmp_path):
    out = tmp_path / "rollout.gif"
    assert cli("--policy", on_disk["policy"], "--laq", on_disk["laq"], "--shards", on_disk["shards"], "--clip", "b",
               "--start", 1, "--stride", 2, "--steps", 4, "--out", out, "--fps", 5, "--device", "cpu") == 0
    gif = expanded_gif(out, fps=5)
    assert len(gif) == 5 and gif[0].shape == (16, 32, 3)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["clip"] == "b" and saved["instruction"] == "instruction of b" and len(saved["latents"]) == 4
    assert saved["stride"] == 2 and saved["real_frames"] == 3  # frames 1, 3, 5 of 7
    real, _ = clip_frames(on_disk["shards"], "b", 1, 2, 5, 16)
    assert np.abs(gif[2][:, :16].astype(int) - real[2]).mean() < 8  # left: real frame 5 (grey level 38)
    assert gif[4][:, :16].max() <= 8  # the clip has ended: black


@pytest.mark.parametrize("change, message", [
    ({"--policy": "action_policy"}, "latent head"),
    ({"--laq": "laq16"}, "codebook_size: policy 8, LAQ 16"),
    ({"--policy": "missing"}, "no policy.json"),
    ({"--laq": "missing"}, "no config.json"),
    ({"--clip": "zzz"}, "--clip 'zzz': no such clip"),
])
def test_cli_refuses_unusable_inputs(on_disk, tmp_path, capsys, change, message):
    paths = {**on_disk, "missing": tmp_path / "missing"}
    args = {"--policy": "policy", "--laq": "laq", "--shards": "shards", "--clip": "a"}
    args.update(change)
    argv = [value for flag, name in args.items() for value in (flag, paths.get(name, name))]
    assert cli(*argv, "--steps", 1, "--out", tmp_path / "x.mp4", "--device", "cpu") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_refuses_a_missing_image_and_bad_arguments(on_disk, tmp_path, capsys):
    base = ("--policy", on_disk["policy"], "--laq", on_disk["laq"], "--steps", 1, "--device", "cpu")
    assert cli(*base, "--image", tmp_path / "no.png", "--instruction", "x", "--out", tmp_path / "x.gif") == 2
    assert "no such file" in capsys.readouterr().err
    for bad in (("--image", on_disk["png"], "--out", tmp_path / "x.gif"),  # no instruction
                ("--image", on_disk["png"], "--instruction", "x", "--out", tmp_path / "x.avi"),
                ("--image", on_disk["png"], "--shards", on_disk["shards"], "--instruction", "x", "--out", "x.gif")):
        with pytest.raises(SystemExit) as exit_info:
            cli(*base, *bad)
        assert exit_info.value.code == 2
