"""NSVQ (noise-substitution vector quantization), LAQ's quantizer, as fused Triton kernels.

Definition (the reference and the kernels implement exactly this, computing in fp32):
    z [N, d], codebook [K, d], noise r [N, d] (r ~ N(0, I), treated as a constant: it gets no gradient)
    indices[n] = argmin_k ||z[n] - codebook[k]||^2        (first index on exact ties, like torch.argmin)
    q = codebook[indices]
    out = z + (||z - q|| / ||r|| + eps) * r               (row-wise L2 norms; eps OUTSIDE the ratio, as in
                                                           the published NSVQ code)
Gradients are autograd through that formula: to z directly and through ||z - q||, to the codebook through
q inside the norm; the argmin is not differentiated. At ||z - q|| = 0 the norm's gradient is taken as 0
(torch.linalg.vector_norm's convention). out has z's dtype; the codebook gradient has the codebook's.

Kernels: the forward fuses distances, argmin and noise substitution (one pass over z and r, the codebook
re-read from cache) and saves ||z - q|| and ||r|| per row. The backward writes dz and, per program, a
partial codebook gradient [K, d] over its rows; the partials are summed over programs in a fixed order, so
the codebook gradient is deterministic (no atomics). Sized for LAQ's small codebooks (K = 8): each program
loops over the K codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lapa_dist.kernels import triton_runs_on

TILE_ELEMENTS = 4096  # rows x padded dim held by one program
MAX_ROWS_PER_PROGRAM = 128


def nsvq_reference(z: torch.Tensor, codebook: torch.Tensor, noise: torch.Tensor, eps: float):
    """PyTorch NSVQ: z [N, d], codebook [K, d], noise [N, d] -> (out [N, d] in z's dtype, indices [N] int64)."""
    z32, codebook32, noise32 = z.float(), codebook.float(), noise.detach().float()
    distances = (z32[:, None, :] - codebook32[None, :, :]).square().sum(dim=2)  # [N, K]
    indices = distances.argmin(dim=1)
    residual_norm = torch.linalg.vector_norm(z32 - codebook32[indices], dim=1, keepdim=True)  # [N, 1]
    noise_norm = torch.linalg.vector_norm(noise32, dim=1, keepdim=True)  # [N, 1]
    out = z32 + (residual_norm / noise_norm + eps) * noise32
    return out.to(z.dtype), indices


def rows_per_program(dim: int) -> int:
    """Rows of z one kernel program handles (a power of two, so the tile is [rows, next_pow2(dim)])."""
    return max(1, min(MAX_ROWS_PER_PROGRAM, TILE_ELEMENTS // triton.next_power_of_2(dim)))


@triton.jit
def _nsvq_forward_kernel(
    z_ptr, codebook_ptr, noise_ptr,  # [N, d], [K, d], [N, d], contiguous
    out_ptr, indices_ptr, residual_norm_ptr, noise_norm_ptr,  # [N, d], [N] int64, [N] fp32, [N] fp32
    num_rows, dim, num_codes, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_DIM)
    row_mask = rows < num_rows
    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_ROWS, BLOCK_DIM]
    best_distance = tl.full([BLOCK_ROWS], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_ROWS], tl.int32)
    for code in range(num_codes):
        centre = tl.load(codebook_ptr + code * dim + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_DIM]
        difference = z - centre[None, :]
        distance = tl.sum(difference * difference, axis=1)  # [BLOCK_ROWS]
        closer = distance < best_distance  # strict: the first code wins exact ties
        best_distance = tl.where(closer, distance, best_distance)
        best_index = tl.where(closer, code, best_index)
    noise = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    residual_norm = tl.sqrt(best_distance)  # ||z - q||: best_distance is exactly sum((z - q)^2)
    noise_norm = tl.where(row_mask, tl.sqrt(tl.sum(noise * noise, axis=1)), 1.0)  # 1: no 0/0 in padding rows
    out = z + (residual_norm / noise_norm + eps)[:, None] * noise
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + rows, best_index.to(tl.int64), mask=row_mask)
    tl.store(residual_norm_ptr + rows, residual_norm, mask=row_mask)
    tl.store(noise_norm_ptr + rows, noise_norm, mask=row_mask)


@triton.jit
def _nsvq_backward_kernel(
    grad_out_ptr, z_ptr, codebook_ptr, noise_ptr,  # [N, d], [N, d], [K, d], [N, d], contiguous
    indices_ptr, residual_norm_ptr, noise_norm_ptr,  # [N] int64, [N] fp32, [N] fp32 (saved by the forward)
    grad_z_ptr, grad_codebook_partial_ptr,  # [N, d] in z's dtype, [programs, K, d] fp32
    num_rows, dim, num_codes,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    program = tl.program_id(0)
    rows = program * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_DIM)
    row_mask = rows < num_rows
    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_ROWS, BLOCK_DIM]
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    indices = tl.load(indices_ptr + rows, mask=row_mask, other=-1)  # [BLOCK_ROWS]; -1 matches no code
    residual_norm = tl.load(residual_norm_ptr + rows, mask=row_mask, other=0.0)
    noise_norm = tl.load(noise_norm_ptr + rows, mask=row_mask, other=1.0)
    quantized = tl.load(codebook_ptr + indices[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # d out / d ||z - q|| = r / ||r||, and d ||z - q|| / d z = (z - q) / ||z - q|| (0 where the norm is 0).
    grad_residual_norm = tl.sum(grad_out * noise, axis=1) / noise_norm  # [BLOCK_ROWS]
    safe_norm = tl.where(residual_norm > 0, residual_norm, 1.0)
    scale = tl.where(residual_norm > 0, grad_residual_norm / safe_norm, 0.0)
    grad_residual = scale[:, None] * (z - quantized)  # gradient of the norm term w.r.t. z; minus it w.r.t. q
    tl.store(grad_z_ptr + offsets, (grad_out + grad_residual).to(grad_z_ptr.dtype.element_ty), mask=mask)
    partial_base = grad_codebook_partial_ptr + program.to(tl.int64) * num_codes * dim
    for code in range(num_codes):
        chosen = indices == code
        partial = -tl.sum(tl.where(chosen[:, None], grad_residual, 0.0), axis=0)  # [BLOCK_DIM]
        tl.store(partial_base + code * dim + cols, partial, mask=col_mask)


def _check_shapes(z: torch.Tensor, codebook: torch.Tensor, noise: torch.Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2 or codebook.shape[1] != z.shape[1] or noise.shape != z.shape:
        raise ValueError(f"nsvq expects z [N, d], codebook [K, d], noise [N, d]; got {tuple(z.shape)}, "
                         f"{tuple(codebook.shape)}, {tuple(noise.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("nsvq needs a non-empty codebook")


class NSVQTriton(torch.autograd.Function):
    """Fused NSVQ forward and backward (see the module docstring for the exact definition)."""

    @staticmethod
    def forward(ctx, z, codebook, noise, eps):
        z, codebook, noise = z.contiguous(), codebook.contiguous(), noise.detach().contiguous()
        num_rows, dim = z.shape
        block_rows = rows_per_program(dim)
        out = torch.empty_like(z)
        indices = torch.empty(num_rows, dtype=torch.int64, device=z.device)
        residual_norm = torch.empty(num_rows, dtype=torch.float32, device=z.device)
        noise_norm = torch.empty_like(residual_norm)
        grid = (triton.cdiv(num_rows, block_rows),)
        _nsvq_forward_kernel[grid](
            z, codebook, noise, out, indices, residual_norm, noise_norm, num_rows, dim, codebook.shape[0], eps,
            BLOCK_ROWS=block_rows, BLOCK_DIM=triton.next_power_of_2(dim),
        )
        ctx.save_for_backward(z, codebook, noise, indices, residual_norm, noise_norm)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, grad_indices):
        z, codebook, noise, indices, residual_norm, noise_norm = ctx.saved_tensors
        num_rows, dim = z.shape
        num_codes = codebook.shape[0]
        block_rows = rows_per_program(dim)
        programs = triton.cdiv(num_rows, block_rows)
        grad_z = torch.empty_like(z)
        partials = torch.empty(programs, num_codes, dim, dtype=torch.float32, device=z.device)
        _nsvq_backward_kernel[(programs,)](
            grad_out.contiguous(), z, codebook, noise, indices, residual_norm, noise_norm, grad_z, partials,
            num_rows, dim, num_codes, BLOCK_ROWS=block_rows, BLOCK_DIM=triton.next_power_of_2(dim),
        )
        grad_codebook = partials.sum(dim=0).to(codebook.dtype)  # fixed-order reduction: deterministic
        return grad_z, grad_codebook, None, None


def nsvq_triton_available(device: torch.device) -> bool:
    """Whether the NSVQ kernels can run on tensors on `device` (see lapa_dist.kernels.triton_runs_on)."""
    return triton_runs_on(_nsvq_forward_kernel, device)


def nsvq_triton(z: torch.Tensor, codebook: torch.Tensor, noise: torch.Tensor, eps: float):
    """Triton NSVQ: z [N, d], codebook [K, d], noise [N, d] -> (out [N, d], indices [N] int64)."""
    _check_shapes(z, codebook, noise)
    if not nsvq_triton_available(z.device):
        raise RuntimeError(f"Triton cannot run on {z.device}: it needs a CUDA device, or CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton is imported")
    if z.shape[0] == 0:
        return nsvq_reference(z, codebook, noise, eps)
    return NSVQTriton.apply(z, codebook, noise, float(eps))


def nsvq(z: torch.Tensor, codebook: torch.Tensor, noise: torch.Tensor, eps: float, backend: str = "triton"):
    """NSVQ on the chosen backend: "triton" runs the fused kernels where Triton can run (triton_runs_on:
    a CUDA device, or CPU tensors under TRITON_INTERPRET=1) and the PyTorch reference elsewhere; "torch" always
    runs the reference. Returns (out [N, d], indices [N] int64)."""
    if backend == "torch":
        return nsvq_reference(z, codebook, noise, eps)
    if backend != "triton":
        raise ValueError(f"unknown nsvq backend {backend!r}: expected 'triton' or 'torch'")
    if nsvq_triton_available(z.device):
        return nsvq_triton(z, codebook, noise, eps)
    return nsvq_reference(z, codebook, noise, eps)
