"""Triton NSVQ and cross-attention kernels against their PyTorch references, under Triton's CPU interpreter.

By default TRITON_INTERPRET=1 is set before triton is imported and everything runs on CPU tensors. On a GPU
machine, TRITON_INTERPRET=0 in the environment runs the same tests on CUDA with the compiled kernels.

bf16: the kernels load bf16 and, when interpreted, cast tl.dot operands to fp32 (the interpreter multiplies the
raw bits of bf16 operands); the roundings a GPU applies (probabilities and dS rounded to bf16, bf16 outputs and
gradients) happen here too, so bf16 inputs go through the kernels as they are and are compared with fp32 truth.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels decorated from here interpret

import json

import pytest

pytest.importorskip("triton")

import torch
import triton

from lapa_dist.kernels.cross_attention import (
    MAX_KEYS,
    backward_splits,
    cross_attention,
    cross_attention_reference,
    cross_attention_triton,
)
from lapa_dist.kernels.nsvq import (
    nsvq,
    nsvq_reference,
    nsvq_triton,
    nsvq_triton_available,
    rows_per_program,
)
from tests.kernel_device import kernel_test_device
from tools import bench_kernels

CPU = torch.device("cpu")
DEVICE = kernel_test_device()  # CPU when interpreted, CUDA when compiled (TRITON_INTERPRET=0 on a GPU machine)

EPS = 1e-12


def leaves(*tensors, dtype):
    """Fresh leaf copies in `dtype` that require grad."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def forward_backward(function, inputs, grad_out):
    """Run function(*inputs), backpropagate grad_out through its first output; (output, input grads) in fp32."""
    result = function(*inputs)
    out = result[0] if isinstance(result, tuple) else result
    out.backward(grad_out)
    return result, [out.float()] + [t.grad.float() for t in inputs]


def nsvq_inputs(rows, dim, codes, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((rows, dim), (codes, dim), (rows, dim), (rows, dim))  # z, codebook, noise, grad_out
    return [torch.randn(shape, generator=generator).to(DEVICE) for shape in shapes]


@pytest.mark.parametrize("rows, dim, codes, dtype", [
    (37, 24, 8, torch.float32),
    (37, 32, 5, torch.float32),
    (150, 48, 8, torch.float32),  # several programs: the codebook gradient sums partials
    (37, 32, 8, torch.bfloat16),
])
def test_nsvq_matches_reference(rows, dim, codes, dtype):
    z, codebook, noise, grad_out = nsvq_inputs(rows, dim, codes, seed=rows + dim + codes)
    noise = noise.to(dtype)
    (out, indices), triton_values = forward_backward(
        lambda z, c: nsvq_triton(z, c, noise, EPS), leaves(z, codebook, dtype=dtype), grad_out.to(dtype))
    (_, reference_indices), reference_values = forward_backward(
        lambda z, c: nsvq_reference(z, c, noise, EPS), leaves(z, codebook, dtype=dtype), grad_out.to(dtype))
    assert out.dtype == dtype and indices.dtype == torch.int64
    assert torch.equal(indices, reference_indices)
    assert indices.unique().numel() > 1
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    for name, value, reference in zip(("out", "grad_z", "grad_codebook"), triton_values, reference_values):
        torch.testing.assert_close(value, reference, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    if rows == 150:
        assert triton.cdiv(rows, rows_per_program(dim)) > 1


def test_nsvq_eps_outside_ratio():
    """out = z + (||z - q|| / ||r|| + eps) * r, with eps large enough to tell it from ||z - q|| / (||r|| + eps)."""
    z, codebook, noise, _ = nsvq_inputs(37, 32, 8, seed=1)
    eps = 0.5
    out, indices = nsvq_triton(z, codebook, noise, eps)
    ratio = (z - codebook[indices]).norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z + (ratio + eps) * noise)


def test_nsvq_ties_and_zero_residual():
    """A duplicated code: the first copy wins (torch.argmin's rule). Rows equal to a code: ||z - q|| = 0, whose
    gradient is taken as 0, so dz = grad_out and the code gets nothing from them."""
    z, codebook, noise, grad_out = nsvq_inputs(20, 32, 6, seed=2)
    codebook[4] = codebook[1]
    z[:3] = codebook[[1, 4, 2]]
    (_, indices), triton_values = forward_backward(
        lambda z, c: nsvq_triton(z, c, noise, EPS), leaves(z, codebook, dtype=torch.float32), grad_out)
    (_, reference_indices), reference_values = forward_backward(
        lambda z, c: nsvq_reference(z, c, noise, EPS), leaves(z, codebook, dtype=torch.float32), grad_out)
    assert indices[:3].tolist() == [1, 1, 2]
    assert torch.equal(indices, reference_indices) and not (indices == 4).any()
    for value, reference in zip(triton_values, reference_values):
        assert value.isfinite().all()
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(triton_values[1][:3], grad_out[:3])


def test_nsvq_dispatcher():
    z, codebook, noise, _ = nsvq_inputs(10, 24, 8, seed=3)
    z.requires_grad_()
    assert type(nsvq(z, codebook, noise, EPS)[0].grad_fn).__name__ == "NSVQTritonBackward"
    assert type(nsvq(z, codebook, noise, EPS, backend="torch")[0].grad_fn).__name__ != "NSVQTritonBackward"
    meta = [t.detach().to("meta") for t in (z, codebook, noise)]
    assert not nsvq_triton_available(torch.device("meta"))
    out, indices = nsvq(*meta, EPS)  # Triton cannot run on meta tensors: the reference does
    assert out.shape == (10, 24) and indices.shape == (10,)
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        nsvq_triton(*meta, EPS)
    with pytest.raises(ValueError, match="backend"):
        nsvq(z, codebook, noise, EPS, backend="cuda")
    with pytest.raises(ValueError, match="noise"):
        nsvq(z, codebook, noise[:5], EPS)


def attention_inputs(batch, heads, queries, keys, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=generator).to(DEVICE)
            for n in (queries, keys, keys, queries)]  # q, k, v, grad_out


@pytest.mark.parametrize("batch, heads, queries, keys, head_dim", [
    (1, 2, 50, 3, 24),
    (2, 1, 50, 7, 64),
    (1, 1, 20, 1, 16),
    (1, 1, 20, MAX_KEYS, 32),
    (1, 1, 150, 5, 64),  # three query blocks, one per backward program
    (1, 2, 300, 4, 24),  # five query blocks; on CPU two backward splits of three blocks (the last one empty)
])
def test_cross_attention_fp32_matches_sdpa(batch, heads, queries, keys, head_dim):
    q, k, v, grad_out = attention_inputs(batch, heads, queries, keys, head_dim, seed=queries + keys + head_dim)
    scale = head_dim ** -0.5
    _, triton_values = forward_backward(lambda *t: cross_attention_triton(*t, scale),
                                        leaves(q, k, v, dtype=torch.float32), grad_out)
    _, reference_values = forward_backward(lambda *t: cross_attention_reference(*t, scale),
                                           leaves(q, k, v, dtype=torch.float32), grad_out)
    for name, value, reference in zip(("out", "dq", "dk", "dv"), triton_values, reference_values):
        torch.testing.assert_close(value, reference, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    if queries == 300:
        assert backward_splits(batch * heads, queries, DEVICE) > 1


def test_cross_attention_strided_inputs():
    """q and grad_out as [B, Nq, H, dh] memory viewed as [B, H, Nq, dh] (LAQ's head split): no copies needed."""
    q, k, v, grad_out = attention_inputs(2, 3, 40, 6, 32, seed=4)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    grad_strided = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_strided.is_contiguous() and not grad_strided.is_contiguous()
    _, triton_values = forward_backward(lambda *t: cross_attention_triton(*t, 0.7),
                                        [q_strided] + leaves(k, v, dtype=torch.float32), grad_strided)
    _, reference_values = forward_backward(lambda *t: cross_attention_reference(*t, 0.7),
                                           leaves(q, k, v, dtype=torch.float32), grad_out)
    for value, reference in zip(triton_values, reference_values):
        torch.testing.assert_close(value, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch, heads, queries, keys, head_dim", [(1, 2, 50, 6, 64), (2, 1, 150, 3, 24)])
def test_cross_attention_bf16_error_within_sdpa_bf16(batch, heads, queries, keys, head_dim):
    """bf16 inputs: the kernels' error against fp32 truth stays within 3x that of SDPA on the same bf16 inputs."""
    q, k, v, grad_out = attention_inputs(batch, heads, queries, keys, head_dim, seed=5 + queries)
    _, truth = forward_backward(lambda *t: cross_attention_reference(*t, 0.4), leaves(q, k, v, dtype=torch.float32),
                                grad_out)
    results = {}
    for name, function in (("triton", cross_attention_triton), ("sdpa", cross_attention_reference)):
        inputs = leaves(q, k, v, dtype=torch.bfloat16)
        output, results[name] = forward_backward(lambda *t, f=function: f(*t, 0.4), inputs, grad_out.to(torch.bfloat16))
        assert output.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in inputs)
    for name, value, sdpa, exact in zip(("out", "dq", "dk", "dv"), results["triton"], results["sdpa"], truth):
        error, sdpa_error = (value - exact).abs().max().item(), (sdpa - exact).abs().max().item()
        assert error <= 3 * sdpa_error + 1e-3, f"{name}: bf16 error {error:.4f} vs SDPA bf16 {sdpa_error:.4f}"


def test_cross_attention_dispatcher():
    q, k, v, _ = attention_inputs(1, 2, 30, 6, 32, seed=6)
    q.requires_grad_()
    assert type(cross_attention(q, k, v, 0.5, backend="triton").grad_fn).__name__ == "CrossAttentionTritonBackward"
    auto_triton = type(cross_attention(q, k, v, 0.5).grad_fn).__name__ == "CrossAttentionTritonBackward"
    assert auto_triton == q.is_cuda  # auto: Triton on CUDA, SDPA elsewhere (including the interpreter)
    long_keys = torch.randn(1, 2, MAX_KEYS + 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="Nk"):
        cross_attention(q, long_keys, long_keys, 0.5, backend="triton")
    torch.testing.assert_close(cross_attention(q, long_keys, long_keys, 0.5),
                               cross_attention_reference(q, long_keys, long_keys, 0.5))
    with pytest.raises(ValueError, match="dtype"):
        cross_attention(q, k.double(), v, 0.5, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        cross_attention(q, k, v, 0.5, backend="flash")


def test_bench_dry_run_writes_json_and_table(tmp_path, capsys):
    table = tmp_path / "perf.md"
    assert bench_kernels.main(["--dry-run", "--markdown", str(table)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(row["kernel"], row["mode"]) for row in rows} == {
        (kernel, mode) for kernel in ("nsvq", "cross_attention") for mode in bench_kernels.MODES}
    assert all(row["dry_run"] and row["reference_ms"] > 0 for row in rows)
    assert all((row["triton_ms"] is not None) == (DEVICE == CPU) for row in rows)  # CPU rows: Triton if interpreted
    text = table.read_text()
    assert "DRY RUN" in text and "NOT a benchmark" in text and text.count("\n| ") == 1 + len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_bench_without_gpu_exits_with_message(capsys):
    assert bench_kernels.main([]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
