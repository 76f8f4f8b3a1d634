"""Frame geometry and photometric augmentation, applied identically to every frame of a sample."""

from __future__ import annotations

import numpy as np

from lapa_dist.data.config import AugmentConfig


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``shorter_side``; sides kept even for swscale."""
    scale = shorter_side / min(width, height)
    return max(shorter_side, round(width * scale)), max(shorter_side, round(height * scale))


def decode_size(width: int, height: int, image_size: int, augment: AugmentConfig) -> tuple[int, int]:
    """The size to decode at: cropping ``crop_scale`` of the area must leave image_size pixels."""
    shorter = image_size
    if augment.enabled and augment.crop_scale < 1:
        shorter = int(np.ceil(image_size / np.sqrt(augment.crop_scale)))
    return resized_size(width, height, shorter)


def crop_square(frames: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Crop [..., H, W, 3] to [..., size, size, 3]: centred, or at a random place when ``rng``."""
    height, width = frames.shape[-3:-1]
    if rng is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    return frames[..., top : top + size, left : left + size, :]


def color_jitter(frames: np.ndarray, augment: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors drawn once and applied to all ``frames``."""
    brightness = 1 + rng.uniform(-augment.brightness, augment.brightness)
    contrast = 1 + rng.uniform(-augment.contrast, augment.contrast)
    saturation = 1 + rng.uniform(-augment.saturation, augment.saturation)
    x = frames.astype(np.float32) * brightness
    mean = x.mean(axis=(-3, -2, -1), keepdims=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(axis=-1, keepdims=True)
    x = (x - grey) * saturation + grey
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def square_frames(
    frames: np.ndarray, image_size: int, augment: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Decoded frames [k, H, W, 3] (shorter side >= image_size) -> [k, image_size, image_size, 3].
    Without augmentation the result is a view (collation copies it once, into the batch)."""
    if not augment.enabled:
        return crop_square(frames, image_size, None)
    cropped = crop_square(frames, image_size, rng)
    return color_jitter(cropped, augment, rng)
