"""Triton kernels for LAQ: the NSVQ quantizer (lapa_dist.kernels.nsvq) and the latent-action cross-attention
(lapa_dist.kernels.cross_attention). Each module has a PyTorch reference, an autograd.Function around the Triton
kernels and a dispatcher that falls back to the reference where Triton cannot run (see triton_runs_on).

This package depends on torch and triton only.
"""

import torch
import triton


def triton_runs_on(kernel, device: torch.device) -> bool:
    """Whether the @triton.jit function `kernel` can launch on tensors that live on `device`.

    Triton decides at decoration time (when the kernel module is imported) between compiling and
    interpreting: with TRITON_INTERPRET=1 set before that import the kernel is interpreted and runs on
    CPU tensors; otherwise it is compiled and needs a CUDA device ("0 active drivers" without one).
    """
    if isinstance(kernel, triton.runtime.JITFunction):
        return device.type == "cuda" and torch.cuda.is_available()
    return device.type == "cpu"
