"""Neural rollouts (the paper's Figure 11): a pretrained VLA drives the LAQ decoder as a world model.

Closed loop, one step:

    latent  = policy.predict_latent(frame, instruction)   # int64 [code_seq_len], greedy
    frame'  = LAQ.decode(frame, latent)                    # the decoder renders the next frame
    frame   = frame'                                       # and the policy sees it next

Resolution. Every frame of a rollout is at the LAQ's ``config.image_size`` (S × S): the first frame is resized
(shorter side to S, swscale's default filter) and centre-cropped as the loader and labelling do; the policy is
handed the uint8 S × S frame and resizes it to its own ``image_size`` itself (so a policy trained at a larger size
sees upsampled LAQ renders). Each rendered frame is clamped to [0, 1] and rounded to uint8 before it becomes the
current frame, so the saved frames are exactly the states the loop ran on (``LAQ.imagine`` chains float frames
instead; the difference is at most half a grey level per step).

Outputs: an MP4 (H.264, via :func:`lapa_dist.data.video.encode_video`, S must be even) or a GIF (Pillow; it
merges identical consecutive frames into one longer frame, so a rollout that reaches a fixed point decodes to
fewer GIF frames with the same total duration), optionally with the real clip beside the imagined one, and a JSON
holding the latent action of every step.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import decode_sample_frames, iter_parsed_samples
from lapa_dist.models.laq import LAQ
from lapa_dist.policy import Policy, square_images

VIDEO_FORMATS = (".mp4", ".gif")


def check_compatible(policy: Policy, laq: LAQ) -> None:
    """ValueError unless ``policy`` has a latent head whose vocabulary and length are the LAQ's codebook's."""
    if policy.head != "latent":
        raise ValueError(f"the policy has an {policy.head!r} head; a rollout needs a pretrained policy with a "
                         "latent head (export the latent-pretraining run, not the finetuned one)")
    sequence = policy.model.config.sequence
    mismatches = [
        f"{name}: policy {ours}, LAQ {theirs}"
        for name, ours, theirs in (("latent vocabulary / codebook_size", sequence.latent_vocab_size,
                                    laq.config.codebook_size),
                                   ("latent length / code_seq_len", sequence.latent_length, laq.config.code_seq_len))
        if ours != theirs
    ]
    if mismatches:
        raise ValueError("the policy's latent actions do not fit the LAQ (was it pretrained on this LAQ's labels?): "
                         + "; ".join(mismatches))


def to_laq_input(frames: np.ndarray, laq: LAQ) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float [B, C, S, S] in [0, 1] on the LAQ's device and in its dtype."""
    parameter = next(laq.parameters())
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(parameter.device,
                                                                                 parameter.dtype).div_(255)


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """float [B, C, S, S] (any range) -> uint8 [B, S, S, C]: clamped to [0, 1], scaled and rounded."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def imagine_rollout(policy: Policy, laq: LAQ, first_frame: np.ndarray, instruction: str,
                    steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed-loop rollout of ``steps`` steps from ``first_frame`` (uint8 [H, W, 3], any size).

    Returns (frames uint8 [steps + 1, S, S, 3], latents int64 [steps, code_seq_len]) with S the LAQ's image size:
    frames[0] is the resized first frame, latents[i] the policy's latent action on frames[i] and frames[i + 1]
    the LAQ decoder's rendering of (frames[i], latents[i])."""
    check_compatible(policy, laq)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    first = np.asarray(first_frame)
    if first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
        raise ValueError(f"first_frame must be uint8 [H, W, 3], got {first.dtype} {list(first.shape)}")
    size = laq.config.image_size
    frames = np.empty((steps + 1, size, size, 3), dtype=np.uint8)
    frames[0] = square_images(first[None], size)[0]
    latents = np.empty((steps, laq.config.code_seq_len), dtype=np.int64)
    device = next(laq.parameters()).device
    for step in range(steps):
        latents[step] = policy.predict_latent(frames[step : step + 1], [instruction])[0]
        codes = torch.from_numpy(latents[step : step + 1]).to(device)  # [1, code_seq_len]
        frames[step + 1] = to_uint8_frames(laq.decode(to_laq_input(frames[step : step + 1], laq), codes))[0]
    return frames, latents


def clip_frames(shards: str | Path, key: str | None, start: int, stride: int | None, count: int, size: int
                ) -> tuple[np.ndarray, dict]:
    """Real frames start, start + H, ... (at most ``count``, fewer where the clip ends) of clip ``key`` (default:
    the set's first clip) as uint8 [n, size, size, 3], and a description (key, instruction, stride, fps, ...).

    H is ``stride``, else the clip's ``latent_offset`` (the H its latent labels were made with), else 1."""
    manifest = Manifest.read(shards)
    shard = next((s for s in manifest.shards if (key in s.keys if key is not None else s.keys)), None)
    if shard is None:
        known = [k for s in manifest.shards for k in s.keys]
        raise ValueError(f"--clip {key!r}: no such clip in {shards} ({len(known)} clips, e.g. {known[:5]})")
    key = key if key is not None else shard.keys[0]
    num_frames = shard.clip_frames[shard.keys.index(key)]
    if not 0 <= start < num_frames:
        raise ValueError(f"--start {start}: clip {key} has {num_frames} frames")
    problems: Counter = Counter()
    for parsed in iter_parsed_samples(shards, problems, shards={shard.name}, keys={key}):
        stride = stride or parsed.meta.latent_offset or 1
        indices = list(range(start, num_frames, stride))[:count]
        frames = square_images(decode_sample_frames(parsed.sample, indices), size)
        info = {"clip": key, "shard": shard.name, "instruction": parsed.meta.instruction, "start_frame": start,
                "stride": stride, "clip_fps": parsed.meta.fps, "real_frames": len(indices)}
        return frames, info
    raise ValueError(f"--clip {key!r}: listed in {shard.name}'s manifest entry but not readable from the shard "
                     f"(problems: {dict(problems) or 'none: the clip is missing'})")


def side_by_side(real: np.ndarray, imagined: np.ndarray) -> np.ndarray:
    """[T, S, S, 3] imagined and [n <= T, S, S, 3] real -> [T, S, 2S, 3]: real left, imagined right; black where
    the real clip has ended."""
    left = np.zeros_like(imagined)
    left[: len(real)] = real[: len(imagined)]
    return np.concatenate([left, imagined], axis=2)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """[T, H, W, 3] -> [T, factor·H, factor·W, 3] by pixel repetition (keeps the LAQ's pixels visible)."""
    if factor < 1:
        raise ValueError(f"upscale factor must be at least 1, got {factor}")
    return frames if factor == 1 else frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 [T, H, W, 3] as MP4 (H.264; H and W even) or GIF (Pillow, looping), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"{path}: the video must end in one of {VIDEO_FORMATS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        from lapa_dist.data.video import encode_video

        path.write_bytes(encode_video(frames, fps))
    else:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    return path


def latents_path(video_path: str | Path) -> Path:
    """The JSON next to the video: rollout.mp4 -> rollout.json."""
    return Path(video_path).with_suffix(".json")


def write_latents(path: str | Path, latents: np.ndarray, info: dict) -> Path:
    """JSON with ``info`` and ``latents``: one list per step, latents[i] taking frame i to frame i + 1."""
    path = Path(path)
    head = json.dumps({**info, "steps": len(latents)}, indent=1)[:-2]  # without the closing "\n}"
    rows = ",\n".join(f"  {json.dumps(row)}" for row in np.asarray(latents).tolist())  # one step per line
    path.write_text(f'{head},\n "latents": [\n{rows}\n ]\n}}\n')
    return path


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, ...) as uint8 RGB [H, W, 3]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def save_rollout(out: str | Path, frames: np.ndarray, latents: np.ndarray, fps: float, info: dict,
                 real: np.ndarray | None = None, scale: int = 1) -> tuple[Path, Path]:
    """Write the rollout video (real clip beside it when ``real`` is given, ``scale``× pixel repetition) and its
    latents JSON (:func:`latents_path`); returns both paths."""
    video = frames if real is None else side_by_side(real, frames)
    size = frames.shape[1]
    info = {**info, "image_size": size, "video_size": [video.shape[1] * scale, video.shape[2] * scale],
            "layout": "imagined" if real is None else "real | imagined", "fps": fps, "upscale": scale}
    video_path = write_video(out, upscale(video, scale), fps)
    return video_path, write_latents(latents_path(video_path), latents, info)
