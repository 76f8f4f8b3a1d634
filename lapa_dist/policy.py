"""The trained VLA as a policy: a self-contained directory, and the object that acts from it.

    python tools/export.py RUN_DIR OUT_DIR          # write the directory from a training run
    policy = Policy.from_pretrained(OUT_DIR)        # CPU, or the GPU when there is one
    actions = policy.predict(images, instructions)  # uint8 [B, H, W, 3], list of B str -> float32 [B, D]

A policy directory holds:

    policy.json              format, head ("latent" after pretraining, "action" after finetuning), image size,
                             the model config (vision tower described inline: no path outside the directory),
                             the observation it was trained on (camera, frame size, instructions seen) and
                             where the weights came from
    model.safetensors        every weight of the VLA, the frozen vision tower included
    tokenizer/               the HF tokenizer of the instructions
    action_tokenizer.json    the action bins (action head only)

Images of any size are resized (shorter side) and centre-cropped to the training size, as the loader does
without augmentation. Decoding is greedy; action tokens are restricted to the bins their dimension has.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import iter_parsed_samples
from lapa_dist.data.transforms import crop_square, resized_size
from lapa_dist.models.action_tokenizer import ActionTokenizer
from lapa_dist.models.vit_tower import read_vision_config
from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.models.vla_sequence import build_prompt
from lapa_dist.train.run_dir import RunDir

FORMAT_NAME = "lapa_dist.policy"
FORMAT_VERSION = 1
CONFIG_FILE = "policy.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
OBSERVATION_CLIPS = 200


def self_contained(config: VLAConfig, model: VLA) -> VLAConfig:
    """``config`` with the vision tower described inline (its weights travel in the state dict)."""
    vision = config.vision
    if vision.tower == "vqgan" and vision.vqgan_path is not None:
        vision = vision.model_copy(update={"vqgan": model.vision.vqgan.config, "vqgan_path": None})
    elif vision.tower == "vit" and vision.vit.path is not None:
        hf_config = read_vision_config(vision.vit).to_dict()
        vision = vision.model_copy(update={"vit": vision.vit.model_copy(update={"path": None, "hf_config": hf_config})})
    return VLAConfig.model_validate({**config.model_dump(), "vision": vision.model_dump()})


def training_observation(datasets) -> dict:
    """Camera, stored frame size and instructions of the training data (from the first clips of each set's first
    shard: enough to tell a user what the policy expects, without reading the data set)."""
    metas = []
    for spec in datasets:
        first_shard = {Manifest.read(spec.path).shards[0].name}
        parsed = iter_parsed_samples(spec.path, Counter(), shards=first_shard)
        metas += [clip.meta for clip in itertools.islice(parsed, OBSERVATION_CLIPS)]
    if not metas:
        raise ValueError("the training data has no readable clip to describe the observation")
    first = metas[0]
    return {"camera": first.camera, "width": first.width, "height": first.height, "source": first.source,
            "instructions_sample": sorted({meta.instruction for meta in metas})[:100]}


def read_policy_description(directory: str | Path) -> dict:
    """The checked contents of ``directory/policy.json``."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; is it a directory written by tools/export.py?")
    description = json.loads(config_path.read_text())
    if description.get("format") != FORMAT_NAME or description.get("version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format {description.get('format')!r} version "
                         f"{description.get('version')!r}, expected {FORMAT_NAME!r} {FORMAT_VERSION}")
    return description


def export_policy(run_dir: str | Path, out_dir: str | Path, tag: str | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the policy directory of a VLA run's newest (or ``tag``) checkpoint; returns ``out_dir``."""
    from lapa_dist.train.vla import VLARunConfig, run_weights, stage_model_config

    run = RunDir(run_dir)
    config_path = run.path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json; is it a VLA run directory?")
    run_config = VLARunConfig.model_validate_json(config_path.read_text())
    action_tokenizer = ActionTokenizer.load(run.path) if run_config.stage == "finetune" else None
    model_config = stage_model_config(run_config, action_tokenizer)
    state, source = run_weights(run.path, tag)  # LoRA adapters folded in: the policy has plain weights
    model = VLA(model_config)
    model.load_state_dict(state)  # checks every key and shape before anything is written
    dtype = dtype or (torch.bfloat16 if run_config.deepspeed.precision == "bf16" else torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_config.tokenizer, local_files_only=True)
    observation = training_observation(run_config.data.datasets)
    return save_policy(out_dir, model, tokenizer, action_tokenizer, run_config.data.image_size, observation, source,
                       dtype)


def save_policy(out_dir: str | Path, model: VLA, tokenizer, action_tokenizer: ActionTokenizer | None,
                image_size: int, observation: dict, source: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write a policy directory (see the module doc) for ``model``; returns ``out_dir``.

    ``observation`` describes what the policy was trained to see: at least ``camera``, ``width``, ``height``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt", "source": source})
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    if action_tokenizer is not None:
        action_tokenizer.save(out)
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "head": "action" if action_tokenizer is not None else "latent",
        "image_size": image_size,
        "observation": observation,
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
        "model": self_contained(model.config, model).model_dump(mode="json"),
    }
    (out / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return out


def square_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, size, size, 3]: shorter side resized to ``size`` with swscale's default filter
    (as the loader's decoder does), then centre-cropped."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        if (height, width) != (size, size):
            new_width, new_height = resized_size(width, height, size)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            image = frame.reformat(width=new_width, height=new_height).to_ndarray()
        out[index] = crop_square(image, size, None)
    return out


class Policy:
    """A VLA with its tokenizers: ``predict`` (action head) and ``predict_latent`` (latent head), batched."""

    def __init__(self, model: VLA, tokenizer, action_tokenizer: ActionTokenizer | None, head: str,
                 image_size: int, metadata: dict):
        self.model, self.tokenizer, self.action_tokenizer = model.eval(), tokenizer, action_tokenizer
        self.head, self.image_size, self.metadata = head, image_size, metadata
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Policy:
        """Load a policy directory (see the module doc) onto ``device`` (default: CUDA when available) in
        ``dtype`` (default: the stored one)."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        description = read_policy_description(directory)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = VLA(VLAConfig.model_validate(description["model"]))
        state = load_file(directory / WEIGHTS_FILE)
        model.load_state_dict(state)
        dtype = dtype or next(iter(state.values())).dtype
        model = model.to(device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR), local_files_only=True)
        head = description["head"]
        action_tokenizer = ActionTokenizer.load(directory) if head == "action" else None
        sequence = model.config.sequence
        metadata = {
            "head": head,
            "image_size": description["image_size"],
            "tokens_per_prediction": sequence.latent_length,
            "token_vocab_size": sequence.latent_vocab_size,
            "action_dim": None if action_tokenizer is None else action_tokenizer.tokens_per_action,
            "source": description["source"],
            "observation": description["observation"],
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        return cls(model, tokenizer, action_tokenizer, head, description["image_size"], metadata)

    def _images(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float [B, 3, S, S] in [0, 1] on the model's device."""
        array = np.asarray(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [B, H, W, 3] (or one [H, W, 3]), got {array.dtype} "
                             f"{list(array.shape)}")
        square = torch.from_numpy(square_images(array, self.image_size))  # [B, S, S, 3]
        return square.permute(0, 3, 1, 2).to(self.device, self.dtype).div_(255)

    @torch.no_grad()
    def predict_tokens(self, images, instructions: list[str] | str) -> np.ndarray:
        """Greedy head tokens int64 [B, s] for a batch of images and instructions (one per image)."""
        pixels = self._images(images)
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        if len(instructions) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(instructions)} instructions")
        sequence = self.model.config.sequence
        prompts = [build_prompt(self.tokenizer, text, torch.zeros(sequence.num_image_tokens, dtype=torch.long),
                                sequence) for text in instructions]
        valid = None if self.action_tokenizer is None else self.action_tokenizer.valid_token_mask()
        tokens = torch.empty(len(prompts), sequence.latent_length, dtype=torch.long)
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):  # equal-length prompts decode together
            by_length.setdefault(len(prompt["input_ids"]), []).append(index)
        for indices in by_length.values():
            batch = {key: torch.stack([prompts[i][key] for i in indices]).to(self.device) for key in prompts[0]}
            tokens[indices] = self.model.predict_latent(batch, pixels[indices], valid).cpu()
        return tokens.numpy()

    def predict_latent(self, images, instructions: list[str] | str) -> np.ndarray:
        """Latent actions int64 [B, s] (a pretrained policy's latent head)."""
        if self.head != "latent":
            raise ValueError("this policy has an action head (finetuned); predict_latent needs a pretrained one")
        return self.predict_tokens(images, instructions)

    def predict(self, images, instructions: list[str] | str) -> np.ndarray:
        """Actions float32 [B, D] (a finetuned policy's action head), decoded to bin mid-points."""
        if self.action_tokenizer is None:
            raise ValueError("this policy has a latent head (pretrained); predict needs a finetuned one")
        return self.action_tokenizer.decode(self.predict_tokens(images, instructions))
