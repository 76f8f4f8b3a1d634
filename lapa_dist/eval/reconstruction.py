"""How well a world model predicts x_next, overall and where the frame actually changes.

Reconstructions are blurry early on; what matters is that the motion is encoded: the prediction must
beat copying x_t on the pixels that change between x_t and x_next.
"""

from __future__ import annotations

import torch


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for images in [0, 1]."""
    return -10 * torch.log10(mse.clamp_min(1e-10))


def reconstruction_metrics(x_t: torch.Tensor, x_next: torch.Tensor, prediction: torch.Tensor,
                           change_threshold: float = 0.05) -> dict[str, torch.Tensor]:
    """Images [B, 3, S, S] in [0, 1]. Returns 0-dim tensors (no host sync until the caller reads them)."""
    x_t, x_next, prediction = x_t.float(), x_next.float(), prediction.float().clamp(0, 1)
    changed = ((x_next - x_t).abs().amax(dim=1, keepdim=True) > change_threshold).expand_as(x_next)  # [B, 3, S, S]
    num_changed = changed.sum().clamp_min(1)
    error_to_next = (prediction - x_next) ** 2
    error_to_t = (prediction - x_t) ** 2
    copy_error = (x_t - x_next) ** 2
    return {
        "psnr_next": psnr(error_to_next.mean()),
        "psnr_t": psnr(error_to_t.mean()),
        "psnr_copy": psnr(copy_error.mean()),
        "psnr_next_changed": psnr((error_to_next * changed).sum() / num_changed),
        "psnr_copy_changed": psnr((copy_error * changed).sum() / num_changed),
        "changed_fraction": changed.float().mean(),
    }
