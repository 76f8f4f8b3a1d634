"""Transformer parts of LAQ: cosine-similarity attention, GEGLU feed-forward, continuous position
bias, depthwise-conv position generator, pre-norm blocks.

Tokens are [B, N, D]; every transformer works on a fixed token grid given at construction
((rows, cols) for spatial transformers, (frames,) for the temporal one), N = prod(grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: used on CUDA for half-precision attention without a bias
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ + bias)·v with no extra scale. q [B, H, L, Dh], k/v [B, H, S, Dh], bias [H, L, S]."""
    if flash_attn_func is not None and bias is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0)
        return out.transpose(1, 2)
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(q·kᵀ)·v with no extra scale by kernels.cross_attention: Triton ("triton", or "auto" on CUDA) or
    SDPA. q [B, H, L, Dh], k/v [B, H, S, Dh], S at most the kernel's MAX_KEYS for Triton."""
    # Imported on first use, not with this module: Triton makes a kernel compiled or interpreted when it is
    # defined (TRITON_INTERPRET), and a process may set TRITON_INTERPRET=1 after importing the model.
    from lapa_dist.kernels.cross_attention import cross_attention

    return cross_attention(q, k, v, scale=1.0, backend=backend)


class Attention(nn.Module):
    """Pre-norm multi-head attention with l2-normalised queries and keys and a learned per-head scale.

    Self-attention: keys and values come from the normalised input. Cross-attention (``cross=True``):
    keys and values come from the normalised ``context``, with ``num_null_kv`` learned key/value pairs
    prepended so a query can attend to nothing; it runs on ``cross_attention``, a kernels.cross_attention
    backend ("auto", "triton" or "sdpa"), when it gets no bias.
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, cross: bool = False, num_null_kv: int = 0,
        cross_attention: str = "auto",
    ):
        super().__init__()
        if num_null_kv and not cross:
            raise ValueError("null key/values are for cross-attention only")
        inner = heads * dim_head
        self.heads = heads
        self.cross_attention = cross_attention if cross else None
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim) if cross else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, num_null_kv, dim_head))
        self.scale = nn.Parameter(torch.full((heads, 1, 1), 8.0))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        # x [B, L, D], context [B, S, D], bias [H, L, S] -> [B, L, D]
        x = self.norm(x)
        source = x if self.context_norm is None else self.context_norm(context)
        q = self._split_heads(self.to_q(x))  # [B, H, L, Dh]
        k, v = (self._split_heads(t) for t in self.to_kv(source).chunk(2, dim=-1))  # [B, H, S, Dh]
        if self.null_kv.shape[2]:
            null_k, null_v = self.null_kv.unsqueeze(1).expand(-1, x.shape[0], -1, -1, -1)  # [B, H, null, Dh]
            k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
        q = F.normalize(q, dim=-1) * self.scale
        k = F.normalize(k, dim=-1)
        if self.cross_attention is not None and bias is None:
            out = cross_attend(q, k, v, self.cross_attention)  # [B, H, L, Dh]
        else:
            out = attend(q, k, v, bias)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, L, H*Dh] -> [B, H, L, Dh]
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class FeedForward(nn.Module):
    """Pre-norm GEGLU feed-forward; hidden width mult·(2/3)·dim keeps the size of a plain mult× MLP."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        hidden = int(mult * 2 / 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class PositionGenerator(nn.Module):
    """Depthwise 3-wide convolution over the token grid (1-D or 2-D, not causal): a position
    encoding generated from each token's neighbourhood (PEG), added to the tokens by the block."""

    def __init__(self, dim: int, grid: tuple[int, ...]):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(grid)]
        self.grid = grid
        self.conv = conv(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, N, D] -> [B, D, *grid] -> conv -> [B, N, D]
        x = x.transpose(1, 2).unflatten(2, self.grid)
        return self.conv(x).flatten(2).transpose(1, 2)


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias on a (rows, cols) grid: an MLP of the log-spaced relative 2-D offset.

    The MLP runs on the (2·rows−1)(2·cols−1) distinct offsets and the result is gathered into
    [heads, N, N]. Compute it once per forward and hand it to every layer that uses it.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        rows, cols = grid
        self.mlp = nn.Sequential(
            nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, heads)
        )
        dy, dx = torch.meshgrid(torch.arange(1 - rows, rows), torch.arange(1 - cols, cols), indexing="ij")
        offsets = torch.stack([dy, dx], dim=-1).flatten(0, 1).float()  # [(2r-1)(2c-1), 2]
        self.register_buffer("offsets", offsets.sign() * torch.log1p(offsets.abs()), persistent=False)
        y, x = (t.flatten() for t in torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"))
        row_offset = y[:, None] - y[None, :] + rows - 1  # [N, N], in [0, 2r-2]
        col_offset = x[:, None] - x[None, :] + cols - 1
        self.register_buffer("table_index", row_offset * (2 * cols - 1) + col_offset, persistent=False)

    def forward(self) -> torch.Tensor:
        table = self.mlp(self.offsets)  # [(2r-1)(2c-1), H]
        return table[self.table_index].permute(2, 0, 1)  # [H, N, N]


class Block(nn.Module):
    """Pre-norm block: x += PEG(x); x += self-attn(x, bias); [x += cross-attn(x, context)]; x += FF(x)."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, ff_mult: int, grid: tuple[int, ...],
        cross: bool = False, num_null_kv: int = 0, cross_attention: str = "auto",
    ):
        super().__init__()
        self.position = PositionGenerator(dim, grid)
        self.self_attn = Attention(dim, heads, dim_head)
        self.cross_attn = (
            Attention(dim, heads, dim_head, cross=True, num_null_kv=num_null_kv, cross_attention=cross_attention)
            if cross else None
        )
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.position(x)
        x = x + self.self_attn(x, bias=bias)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context=context)
        return x + self.ff(x)


class Transformer(nn.Module):
    """``depth`` blocks on a fixed token grid, then a LayerNorm. ``bias`` [H, N, N] is shared by all
    blocks; ``context`` [B, S, D] is attended to by every block when ``cross``, on the ``cross_attention``
    backend."""

    def __init__(
        self, depth: int, dim: int, heads: int, dim_head: int, ff_mult: int, grid: tuple[int, ...],
        cross: bool = False, num_null_kv: int = 0, cross_attention: str = "auto",
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, ff_mult, grid, cross, num_null_kv, cross_attention) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, N, D] -> [B, N, D]
        for block in self.blocks:
            x = block(x, bias, context)
        return self.norm_out(x)
