"""Where the kernel tests run: interpreted kernels on CPU, or compiled ones on a GPU (TRITON_INTERPRET=0).

Import this only after TRITON_INTERPRET has been set for the session (the test modules do it first)."""

import torch

from lapa_dist.kernels.cross_attention import cross_attention_triton_available
from lapa_dist.kernels.nsvq import nsvq_triton_available


def kernel_test_device() -> torch.device:
    for device in (torch.device("cpu"), torch.device("cuda")):  # interpreted first, then compiled
        if nsvq_triton_available(device) and cross_attention_triton_available(device):
            return device
    raise RuntimeError("the kernels are compiled but there is no GPU: they were imported before TRITON_INTERPRET=1 "
                       "was set (run the kernel tests first or on their own) or TRITON_INTERPRET=0 was given")
