"""Small VLA runs for tests: sprite shards carrying both true actions and latent labels, and the tiny configs.

The latent labels are written directly (a test does not need a trained LAQ to exercise the VLA stages): the
latent of frame t is a fixed function of the sprite's true motion from t to t + 1, so it is learnable from the
instruction and the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lapa_dist.data.sources.sprites import DIRECTIONS, make_sprite_clip
from tests.launch_helpers import ROOT
from tests.shard_helpers import write_set

PRETRAIN = ROOT / "configs/vla/tiny_pretrain.json"
FINETUNE = ROOT / "configs/vla/tiny_finetune.json"


def latents_from_actions(actions: np.ndarray) -> np.ndarray:
    """int16 [T, 4] latent codes in [0, 8) determined by each step's motion direction [T, 2]."""
    unit = np.sign(actions)  # [T, 2] in {-1, 0, 1}
    direction = np.argmax((unit[:, None, :] == DIRECTIONS[None, :, :]).all(-1), axis=1)  # [T]
    return np.stack([direction, (direction + 1) % 8, 7 - direction, (3 * direction) % 8], axis=1).astype(np.int16)


def labelled_sprites(directory: Path, num_shards: int = 2, clips_per_shard: int = 4, num_frames: int = 12,
                     size: int = 32) -> Path:
    """A shard set whose clips hold actions.npy and latents.npy (latent_offset 1)."""
    shards = []
    for shard in range(num_shards):
        clips = []
        for index in range(shard * clips_per_shard, (shard + 1) * clips_per_shard):
            clip = make_sprite_clip(index, num_frames, size)
            clip.latents = latents_from_actions(clip.actions)
            clip.meta = clip.meta.model_copy(update={"latent_offset": 1})
            clips.append(clip)
        shards.append(clips)
    return write_set(directory, shards, source="sprites")


def vla_args(config: Path, run_dir: Path, data: Path, tokenizer: Path, *overrides: str) -> list[str]:
    args = ["--config", str(config), "--run-dir", str(run_dir), "--set", f"data.datasets.0.path={data}",
            "--set", f"tokenizer={tokenizer}"]
    for override in overrides:
        args += ["--set", override]
    return args


def tiny_metaworld_policy(directory: Path, seed: int = 0) -> Path:
    """An untrained but complete Meta-World policy directory (tiny VLA, 4-D action bins, word tokenizer), built
    in-process in about a second: for tests of what consumes policies (evaluation, serving)."""
    import torch

    from lapa_dist.envs.metaworld import ACTION_DIM, DEFAULT_CAMERA, INSTRUCTIONS
    from lapa_dist.models.action_tokenizer import ActionTokenizer
    from lapa_dist.models.vla import VLA, VLAConfig
    from lapa_dist.policy import save_policy
    from lapa_dist.word_tokenizer import save_word_tokenizer

    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (500, ACTION_DIM)).astype(np.float32)
    action_tokenizer = ActionTokenizer.fit(actions, num_bins=16, binary_dims=[ACTION_DIM - 1])
    model_config = json.loads(FINETUNE.read_text())["model"]
    model_config["sequence"].update(latent_length=action_tokenizer.tokens_per_action,
                                    latent_vocab_size=action_tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = VLA(VLAConfig.model_validate(model_config))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(save_word_tokenizer(directory / "_tokenizer",
                                                                      INSTRUCTIONS.values())))
    observation = {"camera": DEFAULT_CAMERA, "width": 64, "height": 64, "source": "metaworld"}
    return save_policy(directory / "policy", model, tokenizer, action_tokenizer, model.image_size, observation,
                       "tests.vla_helpers.tiny_metaworld_policy (untrained)")
