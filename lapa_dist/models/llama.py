"""The LLaMA-architecture language model used as the VLA backbone (LWM-Chat-1M is a LLaMA-2-7B shape).

Pre-norm blocks: h += o_proj(attention(RMSNorm(h))); h += down(silu(gate(x)) * up(x)) with x = RMSNorm(h);
a final RMSNorm and an LM head. Rotary position embeddings use HF's ``rotate_half`` pairing (dims i and
i + Dh/2 rotate together), so HF LLaMA checkpoints load as they are; LWM's JAX checkpoints use Meta's
interleaved pairing and need their wq/wk output rows permuted per head when converted.

The model is plain PyTorch. Tensor parallelism is applied from outside by
``lapa_dist.parallel.tensor_parallel.parallelize``, which swaps the projections, the embedding, the LM
head and ``cross_entropy`` for megatron-core's parallel versions; the code here works unchanged with
either because every reshape infers the (local) head count from the projection output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from lapa_dist.config import StrictModel

try:  # optional: used on CUDA in half precision
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class LlamaConfig(StrictModel):
    """Shape of the language model. The defaults are LWM-Chat-1M (LLaMA-2-7B shape, RoPE theta 5e7)."""

    vocab_size: int = Field(default=32000, ge=1)
    """Rows of the token embedding and outputs of the LM head."""
    hidden_size: int = Field(default=4096, ge=1)
    intermediate_size: int = Field(default=11008, ge=1)
    """Width of the SwiGLU feed-forward (gate and up projections)."""
    num_layers: int = Field(default=32, ge=1)
    num_heads: int = Field(default=32, ge=1)
    """Query heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: int = Field(default=32, ge=1)
    """Key/value heads (grouped-query attention when fewer than num_heads; LWM uses plain MHA)."""
    rope_theta: float = Field(default=5e7, gt=0)
    """RoPE base: 5e7 for LWM (LLaMA-2 uses 1e4)."""
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    max_position_embeddings: int = Field(default=1048576, ge=1)
    """Longest sequence the model accepts (LWM-Chat-1M: 2^20)."""
    tie_word_embeddings: bool = False
    """Share one matrix between the token embedding and the LM head."""
    recompute: bool = False
    """Activation recomputation: keep only each block's input and re-run the block in backward."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal init of projections and embeddings (norms start at 1)."""

    @model_validator(mode="after")
    def _check_heads(self) -> LlamaConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) computed in fp32, cast back to x's dtype, times a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, Dh] in fp32 for positions 0..T-1; the two halves of the last dim repeat the same angles."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, Dh]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, Dh] by the angles of cos/sin [T, Dh]: dims i and i + Dh/2 form a pair."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh + causal mask)·v. q [B, Hq, T, Dh], k/v [B, Hkv, T, Dh], Hq a multiple of Hkv."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        kv_width = config.num_kv_heads * config.head_dim
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [B, T, D] -> [B, T, D]; under TP the projections hold this rank's heads only.
        batch, seq_len, _ = x.shape
        q, k, v = (proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [B, Hq, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class CrossEntropy(nn.Module):
    """Per-token cross entropy in fp32: logits [B, T, V], targets [B, T] -> [B, T]."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return flat.view_as(targets)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cross_entropy = CrossEntropy()
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.init_std)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D] of input_ids [B, T]."""
        return self.embed_tokens(input_ids)

    def forward_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final norm on input embeddings h [B, T, D] -> hidden states [B, T, D].

        The entry for callers that build the input sequence themselves (e.g. splicing in image tokens).
        """
        seq_len = h.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = rope_tables(seq_len, self.config.head_dim, self.config.rope_theta, h.device)
        for layer in self.layers:
            if self.config.recompute and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits [B, T, V] (under TP: this rank's vocabulary slice [B, T, V/tp])."""
        return self.lm_head(hidden)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean cross entropy over the tokens where loss_mask [B, T] is set (all when None).

        targets [B, T] are the next-token ids, any value where the mask is 0. Under TP the vocab-parallel
        cross entropy overwrites ``logits`` in place.
        """
        mask = torch.ones_like(targets, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        per_token = self.cross_entropy(logits, targets.masked_fill(mask == 0, 0))  # [B, T]
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] or, given targets [B, T], the scalar loss."""
        logits = self.logits(self.forward_embeddings(self.embed(input_ids)))
        return logits if targets is None else self.loss(logits, targets, loss_mask)
