"""NSVQ: vector quantization by noise substitution, with usage counting and dead-code replacement.

In training the quantized vector is z + (‖z − q‖/‖r‖ + eps)·r with r ~ N(0, I): noise as large as
the quantization error, so gradients reach both the encoder (through z) and the codebook (through
‖z − q‖) with no straight-through estimator, commitment or codebook loss. In eval it is q itself.
The training formula is kernels.nsvq's, run by its PyTorch reference or its fused Triton kernels
(``backend``, chosen in the model config's ``kernels`` section).

Replacement is split so that data parallelism stays outside the model: forward counts code uses into
the ``usage`` buffer; the trainer sums the counts over ranks, calls the pure ``replacement`` with a
generator seeded identically on every rank, and installs the result with ``install_codebook``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from lapa_dist.config import StrictModel

REFERENCE_SCHEDULE = [(100, 10), (1000, 100), (5000, 500)]


class NSVQConfig(StrictModel):
    """Noise-substitution quantizer settings (codebook size and width live in the model config)."""

    eps: float = Field(default=1e-12, ge=0)
    """Added to the noise scale ‖z − q‖/‖r‖ (reference 1e-12)."""
    replace_threshold: float = Field(default=0.025, ge=0, lt=1)
    """A code is dead when its share of all code uses since the last replacement is below this.
    0.025 ≈ the reference's "used by fewer than 10% of the samples" at 4 codes per sample.
    Must be below 1/codebook_size, so some code is always alive."""
    replace_noise: float = Field(default=0.01, ge=0)
    """Standard deviation of the Gaussian noise added to the copy of a live code that replaces a dead one."""
    replace_schedule: list[tuple[int, int]] = Field(
        default_factory=lambda: [*REFERENCE_SCHEDULE, (1_000_000_000, 1000)]
    )
    """(until_step, every) pairs, until_step increasing: replacement is due at step s > 0 when
    s % every == 0 for the first pair with s < until_step; never after the last pair. The reference
    stops at 5000 (the first three pairs), after which codebooks collapse, so the default goes on
    every 1000 steps."""
    hard_code_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of the samples of a training batch whose vectors are replaced by their nearest codes, detached,
    instead of noise substitution. 0 is the reference (the decoder never sees an exact code in training, but
    labelling and the world model use exact codes); a fraction > 0 also trains the decoder on those inputs,
    while the encoder and codebook learn from the noise-substituted samples only, as in the reference (1 trains
    the decoder alone). A straight-through gradient to z instead collapsed the codebook (docs/results.md)."""

    @field_validator("replace_schedule")
    @classmethod
    def _increasing(cls, schedule: list[tuple[int, int]]) -> list[tuple[int, int]]:
        untils = [until for until, _ in schedule]
        if any(b <= a for a, b in itertools.pairwise(untils)):
            raise ValueError(f"until_step must increase from pair to pair (got {untils})")
        if any(every < 1 for _, every in schedule):
            raise ValueError("every must be >= 1")
        return schedule

    def replacement_due(self, step: int) -> bool:
        """Whether to replace dead codes after ``step`` optimizer steps."""
        for until_step, every in self.replace_schedule:
            if step < until_step:
                return step > 0 and step % every == 0
        return False


@dataclass
class NSVQOutput:
    quantized: torch.Tensor
    """[B, n, quant_dim]: noise-substituted z in training (the nearest codes, detached, for a
    ``hard_code_fraction`` of the samples), the nearest codes in eval."""
    code_indices: torch.Tensor
    """[B, n] long: index of the nearest code of each vector."""
    code_counts: torch.Tensor
    """[codebook_size] long: uses of each code in this batch."""
    quantization_error: torch.Tensor
    """[]: mean ‖z − q‖ over the batch (detached)."""


class NSVQ(nn.Module):
    """Nearest-code quantizer of z [B, n, quant_dim] over ``codebook`` [codebook_size, quant_dim].

    ``backend``: kernels.nsvq's backend for the training forward, "torch" (the reference) or "triton"
    (the fused kernels where Triton can run, the reference elsewhere).
    """

    def __init__(self, codebook_size: int, quant_dim: int, config: NSVQConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.codebook = nn.Parameter(torch.randn(codebook_size, quant_dim))
        # uses of each code in training forwards since the last install_codebook (checkpointed)
        self.register_buffer("usage", torch.zeros(codebook_size, dtype=torch.long))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the L2-nearest code: [B, n, quant_dim] -> [B, n] long."""
        with torch.no_grad():
            codebook = self.codebook.to(z.dtype)
            # ‖z − c‖² = ‖z‖² − 2 z·c + ‖c‖²; ‖z‖² is the same for every code
            distances = codebook.square().sum(-1) - 2 * z @ codebook.T  # [B, n, K]
            return distances.argmin(dim=-1)

    def forward(self, z: torch.Tensor) -> NSVQOutput:
        if self.training:
            quantized, code_indices = self.substitute_noise(z)
        else:
            code_indices = self.nearest(z)
            quantized = self.codebook[code_indices].to(z.dtype)
        flat = code_indices.flatten()
        code_counts = torch.zeros_like(self.usage).index_add_(0, flat, torch.ones_like(flat))  # no host sync
        if self.training:
            self.usage += code_counts
        with torch.no_grad():
            quantization_error = (z - self.codebook[code_indices].to(z.dtype)).norm(dim=-1).mean()
        return NSVQOutput(quantized, code_indices, code_counts, quantization_error)

    def substitute_noise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z + (‖z − q‖/‖r‖ + eps)·r, r ~ N(0, I) from torch's RNG: [B, n, quant_dim] -> (same, indices [B, n]).

        A ``hard_code_fraction`` of the samples get their nearest codes q instead, detached: no gradient to z or
        the codebook."""
        # Imported on first use, not with this module: Triton makes a kernel compiled or interpreted when it is
        # defined (TRITON_INTERPRET), and a process may set TRITON_INTERPRET=1 after importing the model.
        from lapa_dist.kernels.nsvq import nsvq

        r = torch.randn_like(z)  # on z's device
        quantized, code_indices = nsvq(
            z.flatten(0, -2), self.codebook, r.flatten(0, -2), self.config.eps, backend=self.backend
        )
        quantized, code_indices = quantized.view(z.shape), code_indices.view(z.shape[:-1])
        if self.config.hard_code_fraction > 0:
            hard = self.codebook.detach()[code_indices].to(z.dtype)
            hard_samples = torch.rand(z.shape[0], 1, 1, device=z.device) < self.config.hard_code_fraction  # [B, 1, 1]
            quantized = torch.where(hard_samples, hard, quantized)
        return quantized, code_indices

    @torch.no_grad()
    def replacement(
        self, usage_counts: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A new codebook in which every dead code is a noisy copy of a live one; does not modify the module.

        ``usage_counts`` [codebook_size]: uses of each code, summed over all data-parallel ranks.
        Dead codes (share of uses < ``replace_threshold``) become a live code, drawn with probability
        proportional to its uses (so crowded codes are split), plus N(0, replace_noise²) noise.
        All randomness comes from ``generator`` and its draws have a fixed shape, so ranks holding the
        same counts, codebook and generator state compute the same result.
        Returns (new_codebook [codebook_size, quant_dim], replaced_mask [codebook_size] bool).
        """
        codebook = self.codebook.detach()
        size, quant_dim = codebook.shape
        counts = usage_counts.to(device=generator.device, dtype=torch.float64)
        if not counts.any():  # nothing counted: nothing to judge by
            return codebook.clone(), torch.zeros(size, dtype=torch.bool, device=codebook.device)
        dead = counts / counts.sum() < self.config.replace_threshold  # [K]
        source = torch.multinomial(torch.where(dead, 0.0, counts), size, replacement=True, generator=generator)
        noise = torch.randn(size, quant_dim, generator=generator, device=generator.device)  # [K, quant_dim]
        copies = codebook[source.to(codebook.device)] + self.config.replace_noise * noise.to(codebook)
        dead = dead.to(codebook.device)
        return torch.where(dead[:, None], copies, codebook), dead

    @torch.no_grad()
    def install_codebook(self, codebook: torch.Tensor) -> None:
        """Copy ``codebook`` (from ``replacement``) into the parameter and restart usage counting."""
        self.codebook.copy_(codebook)
        self.usage.zero_()

    def replacement_due(self, step: int) -> bool:
        """Whether to replace dead codes after ``step`` optimizer steps (the config's schedule)."""
        return self.config.replacement_due(step)

    @staticmethod
    def usage_metrics(counts: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """Health of a codebook from use counts [K], as tensors (no host sync), keys prefixed by ``prefix``.

        perplexity: exp(entropy of the usage shares), K when all codes are used equally, 1 when collapsed;
        codes_used: codes used at least once; usage_fraction [K]: each code's share of the uses.
        """
        counts = counts.to(torch.float64)
        share = counts / counts.sum().clamp_min(1)
        entropy = -torch.special.xlogy(share, share).sum()
        metrics = {"perplexity": entropy.exp(), "codes_used": (counts > 0).sum(), "usage_fraction": share}
        return {prefix + name: value for name, value in metrics.items()}
