"""Fused cross-attention from many queries to a few keys, LAQ's decoder case, as Triton kernels.

    out = softmax(scale * q @ k^T) @ v      q [B, H, Nq, dh], k and v [B, H, Nk, dh], Nk <= MAX_KEYS

The caller has already normalised and scaled q and k (LAQ l2-normalises them with a learned scale); the
kernel only applies the softmax scale. No mask, no dropout. The reference is torch SDPA.

All keys fit one tile (Nk and dh padded up to powers of two >= 16 with masks, the smallest shapes tl.dot
accepts on GPUs), so the forward is a single pass per block of queries: no online softmax. It saves the
row logsumexp [B, H, Nq] (fp32) for the flash-style backward, which recomputes the probabilities. dq is
written per query block; dk and dv reduce over all queries: each backward program loops over a contiguous
range of query blocks, keeps dk/dv in registers and writes one fp32 partial, and the partials are summed in
a fixed order, so the gradients are deterministic (no atomics; the split count depends on the shape and the
GPU's multiprocessor count only).

Precision: fp32, bf16 and fp16 inputs; softmax, logsumexp and all accumulation are fp32. On a GPU, bf16/fp16
operands go to tl.dot as they are (tensor cores, fp32 accumulate; probabilities and dS are rounded to the
input dtype first, as flash attention does) and fp32 operands use exact fp32 ("ieee") dots. Triton's
interpreter multiplies the raw bits of bf16 dot operands, so when interpreted the kernels cast the
(already rounded) operands to fp32 before every tl.dot: same roundings, fp32 products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lapa_dist.kernels import triton_runs_on

MAX_KEYS = 32  # the whole key/value set lives in one [<= 32, head_dim] tile
MAX_HEAD_DIM = 128
BLOCK_QUERIES = 64
PROGRAMS_PER_MULTIPROCESSOR = 4  # backward: enough programs to fill the GPU when B x H is small
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; with DOT_FP32 the operands are cast to fp32 and multiplied exactly."""
    if DOT_FP32:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _load_keys_values(k_ptr, v_ptr, batch_head, num_keys, head_dim, BLOCK_KEYS: tl.constexpr,
                      BLOCK_DIM: tl.constexpr):
    """k, v [B, H, Nk, dh] contiguous -> their [BLOCK_KEYS, BLOCK_DIM] tiles for one (batch, head), zero-padded."""
    keys = tl.arange(0, BLOCK_KEYS)
    cols = tl.arange(0, BLOCK_DIM)
    offsets = batch_head.to(tl.int64) * num_keys * head_dim + keys[:, None] * head_dim + cols[None, :]
    mask = (keys[:, None] < num_keys) & (cols[None, :] < head_dim)
    return tl.load(k_ptr + offsets, mask=mask, other=0.0), tl.load(v_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # q strided [B, H, Nq, dh]; k, v, out contiguous; lse [B, H, Nq] fp32
    stride_qb, stride_qh, stride_qn, stride_qd,
    num_heads, num_queries, num_keys, head_dim, scale,
    BLOCK_QUERIES: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_DIM: tl.constexpr, DOT_FP32: tl.constexpr,
):
    batch_head = tl.program_id(0)  # B x H on axis 0: its grid limit is 2^31 - 1, axis 1's only 65535
    batch, head = (batch_head // num_heads).to(tl.int64), (batch_head % num_heads).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
    keys = tl.arange(0, BLOCK_KEYS)
    cols = tl.arange(0, BLOCK_DIM)
    mask = (rows[:, None] < num_queries) & (cols[None, :] < head_dim)
    q_offsets = batch * stride_qb + head * stride_qh + rows[:, None] * stride_qn + cols[None, :] * stride_qd
    q = tl.load(q_ptr + q_offsets, mask=mask, other=0.0)  # [BLOCK_QUERIES, BLOCK_DIM]
    k, v = _load_keys_values(k_ptr, v_ptr, batch_head, num_keys, head_dim, BLOCK_KEYS, BLOCK_DIM)
    scores = _dot(q, tl.trans(k), DOT_FP32) * scale  # [BLOCK_QUERIES, BLOCK_KEYS]
    scores = tl.where(keys[None, :] < num_keys, scores, float("-inf"))
    row_max = tl.max(scores, axis=1)
    weights = tl.exp(scores - row_max[:, None])
    normaliser = tl.sum(weights, axis=1)
    out = _dot(weights.to(v.dtype), v, DOT_FP32) / normaliser[:, None]  # [BLOCK_QUERIES, BLOCK_DIM]
    row_offsets = batch_head.to(tl.int64) * num_queries + rows
    out_offsets = row_offsets[:, None] * head_dim + cols[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + row_offsets, row_max + tl.log(normaliser), mask=rows < num_queries)


@triton.jit
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, grad_out_ptr,  # q, grad_out strided; k, v, out contiguous; lse fp32
    grad_q_ptr, grad_k_partial_ptr, grad_v_partial_ptr,  # grad_q contiguous [B, H, Nq, dh]; partials below
    stride_qb, stride_qh, stride_qn, stride_qd, stride_gb, stride_gh, stride_gn, stride_gd,
    num_heads, num_queries, num_keys, head_dim, scale, blocks_per_split,
    BLOCK_QUERIES: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_DIM: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Partials: [B * H, splits, Nk, dh] fp32; this program covers query blocks
    # [split * blocks_per_split, (split + 1) * blocks_per_split) of one (batch, head).
    batch_head, split = tl.program_id(0), tl.program_id(1)
    batch, head = (batch_head // num_heads).to(tl.int64), (batch_head % num_heads).to(tl.int64)
    keys = tl.arange(0, BLOCK_KEYS)
    cols = tl.arange(0, BLOCK_DIM)
    k, v = _load_keys_values(k_ptr, v_ptr, batch_head, num_keys, head_dim, BLOCK_KEYS, BLOCK_DIM)
    grad_k = tl.zeros([BLOCK_KEYS, BLOCK_DIM], tl.float32)
    grad_v = tl.zeros([BLOCK_KEYS, BLOCK_DIM], tl.float32)
    for block in range(split * blocks_per_split, (split + 1) * blocks_per_split):
        rows = block * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
        row_mask = rows < num_queries
        mask = row_mask[:, None] & (cols[None, :] < head_dim)
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qn
                    + cols[None, :] * stride_qd, mask=mask, other=0.0)  # [BLOCK_QUERIES, BLOCK_DIM]
        grad_out = tl.load(grad_out_ptr + batch * stride_gb + head * stride_gh + rows[:, None] * stride_gn
                           + cols[None, :] * stride_gd, mask=mask, other=0.0)
        row_offsets = batch_head.to(tl.int64) * num_queries + rows
        out = tl.load(out_ptr + row_offsets[:, None] * head_dim + cols[None, :], mask=mask, other=0.0)
        lse = tl.load(lse_ptr + row_offsets, mask=row_mask, other=0.0)  # [BLOCK_QUERIES]
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=1)  # rowsum(dO * O)
        scores = _dot(q, tl.trans(k), DOT_FP32) * scale  # [BLOCK_QUERIES, BLOCK_KEYS]
        valid = row_mask[:, None] & (keys[None, :] < num_keys)
        probabilities = tl.where(valid, tl.exp(scores - lse[:, None]), 0.0)
        grad_v += _dot(tl.trans(probabilities.to(v.dtype)), grad_out, DOT_FP32)
        grad_probabilities = _dot(grad_out, tl.trans(v), DOT_FP32)  # [BLOCK_QUERIES, BLOCK_KEYS]
        grad_scores = (probabilities * (grad_probabilities - delta[:, None])).to(k.dtype)
        grad_q = _dot(grad_scores, k, DOT_FP32) * scale
        tl.store(grad_q_ptr + row_offsets[:, None] * head_dim + cols[None, :],
                 grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)
        grad_k += _dot(tl.trans(grad_scores), q, DOT_FP32)
    partial_offsets = ((batch_head.to(tl.int64) * tl.num_programs(1) + split) * num_keys + keys[:, None]) * head_dim
    partial_mask = (keys[:, None] < num_keys) & (cols[None, :] < head_dim)
    tl.store(grad_k_partial_ptr + partial_offsets + cols[None, :], grad_k * scale, mask=partial_mask)
    tl.store(grad_v_partial_ptr + partial_offsets + cols[None, :], grad_v, mask=partial_mask)


def _block_sizes(num_keys: int, head_dim: int) -> tuple[int, int]:
    """Padded (keys, head_dim) tile sizes: powers of two, at least 16 (tl.dot's minimum on GPUs)."""
    return max(16, triton.next_power_of_2(num_keys)), max(16, triton.next_power_of_2(head_dim))


def backward_splits(batch_heads: int, num_queries: int, device: torch.device) -> int:
    """How many programs share one (batch, head)'s queries in the backward (each writes a dk/dv partial)."""
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, batch_heads)
    return max(1, min(triton.cdiv(num_queries, BLOCK_QUERIES), wanted))


# Whether TRITON_INTERPRET=1 was set when this module was imported (then the kernels above are interpreted).
INTERPRETED = not isinstance(_attention_forward_kernel, triton.runtime.JITFunction)


def _dot_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are cast to fp32: for fp32 inputs, and always when interpreted (bf16 dots are wrong
    in the interpreter)."""
    return dtype == torch.float32 or INTERPRETED


def cross_attention_triton_available(device: torch.device) -> bool:
    """Whether the attention kernels can run on tensors on `device` (see lapa_dist.kernels.triton_runs_on)."""
    return triton_runs_on(_attention_forward_kernel, device)


class CrossAttentionTriton(torch.autograd.Function):
    """Fused forward (saves the logsumexp) and flash-style backward; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        batch, heads, num_queries, head_dim = q.shape
        k, v = k.contiguous(), v.contiguous()
        block_keys, block_dim = _block_sizes(k.shape[2], head_dim)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, heads, num_queries, dtype=torch.float32, device=q.device)
        grid = (batch * heads, triton.cdiv(num_queries, BLOCK_QUERIES))
        _attention_forward_kernel[grid](
            q, k, v, out, lse, *q.stride(), heads, num_queries, k.shape[2], head_dim, scale,
            BLOCK_QUERIES=BLOCK_QUERIES, BLOCK_KEYS=block_keys, BLOCK_DIM=block_dim, DOT_FP32=_dot_fp32(q.dtype),
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        batch, heads, num_queries, head_dim = q.shape
        num_keys = k.shape[2]
        block_keys, block_dim = _block_sizes(num_keys, head_dim)
        splits = backward_splits(batch * heads, num_queries, q.device)
        blocks_per_split = triton.cdiv(triton.cdiv(num_queries, BLOCK_QUERIES), splits)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k_partial = torch.empty(batch, heads, splits, num_keys, head_dim, dtype=torch.float32, device=q.device)
        grad_v_partial = torch.empty_like(grad_k_partial)
        _attention_backward_kernel[(batch * heads, splits)](
            q, k, v, out, lse, grad_out, grad_q, grad_k_partial, grad_v_partial, *q.stride(), *grad_out.stride(),
            heads, num_queries, num_keys, head_dim, ctx.scale, blocks_per_split,
            BLOCK_QUERIES=BLOCK_QUERIES, BLOCK_KEYS=block_keys, BLOCK_DIM=block_dim, DOT_FP32=_dot_fp32(q.dtype),
        )
        grad_k = grad_k_partial.sum(dim=2).to(k.dtype)  # fixed-order reduction over splits: deterministic
        grad_v = grad_v_partial.sum(dim=2).to(v.dtype)
        return grad_q, grad_k, grad_v, None


def _unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return f"expected q [B, H, Nq, dh], k and v [B, H, Nk, dh]; got {tuple(q.shape)}, {tuple(k.shape)}, " \
               f"{tuple(v.shape)}"
    if not 1 <= k.shape[2] <= MAX_KEYS or not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        return f"needs 1 <= Nk <= {MAX_KEYS} and 1 <= dh <= {MAX_HEAD_DIM}; got Nk={k.shape[2]}, dh={q.shape[3]}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs q, k, v of one dtype among {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
    if not cross_attention_triton_available(q.device):
        return f"Triton cannot run on {q.device} (needs CUDA, or CPU tensors with TRITON_INTERPRET=1)"
    return None


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch SDPA: q [B, H, Nq, dh], k, v [B, H, Nk, dh] -> [B, H, Nq, dh]."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused Triton attention: q [B, H, Nq, dh], k, v [B, H, Nk <= MAX_KEYS, dh] -> [B, H, Nq, dh]."""
    reason = _unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"cross_attention_triton: {reason}")
    if q.shape[2] == 0:
        return cross_attention_reference(q, k, v, scale)
    return CrossAttentionTriton.apply(q, k, v, float(scale))


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    backend: str = "auto") -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v. backend: "triton" (raises where the kernels cannot run), "sdpa", or "auto":
    Triton for CUDA tensors the kernels support (Nk <= MAX_KEYS, dh <= MAX_HEAD_DIM), SDPA otherwise."""
    if backend == "auto":
        backend = "triton" if q.is_cuda and _unsupported_reason(q, k, v) is None else "sdpa"
    if backend == "sdpa":
        return cross_attention_reference(q, k, v, scale)
    if backend == "triton":
        return cross_attention_triton(q, k, v, scale)
    raise ValueError(f"unknown cross_attention backend {backend!r}: expected 'auto', 'triton' or 'sdpa'")
