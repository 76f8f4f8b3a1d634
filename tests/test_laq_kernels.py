"""LAQ with its Triton kernels switched on trains like LAQ on the PyTorch references (tiny config).

The kernels run ("nsvq": "triton", "cross_attention": "triton") and the reference run ("torch", "sdpa") start
from the same weights and see the same batches and the same NSVQ noise, so they differ only by the rounding of
the fused kernels' fp32 arithmetic.

Like tests/test_kernels.py, TRITON_INTERPRET=1 is set before the kernels are defined, so they are interpreted on
CPU tensors; TRITON_INTERPRET=0 on a GPU machine runs the same tests compiled on CUDA. The model imports the
kernels on first use, so modules that import lapa_dist earlier in the session do not fix the mode.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels: they interpret from here

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch

from lapa_dist.config import ConfigError, build_config
from lapa_dist.models.laq import LAQ, LAQModelConfig
from tests.kernel_device import kernel_test_device

CPU = torch.device("cpu")
DEVICE = kernel_test_device()  # CPU when interpreted, CUDA when compiled (TRITON_INTERPRET=0 on a GPU machine)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "laq"
TINY = json.loads((CONFIGS / "tiny.json").read_text())
KERNELS = {"nsvq": "triton", "cross_attention": "triton"}
REFERENCES = {"nsvq": "torch", "cross_attention": "sdpa"}
TRITON_NODES = {"NSVQTritonBackward", "CrossAttentionTritonBackward"}
STEPS = 25  # five dead-code replacements on the tiny schedule (every 5 steps)
NOISE_SEED = 100  # step s draws its NSVQ noise after torch.manual_seed(NOISE_SEED + s), in both runs
# Per-step loss agreement. Measured on CPU (interpreter): at most 2e-7 relative over the 25 steps, fp32 rounding
# that AdamW does not amplify at this length; 1e-5 leaves a 50x margin for other devices' reduction orders.
LOSS_RTOL = 1e-5
# Step-0 gradients: measured differences use at most 1/24 of this allowance, and a kernel dq off by a factor
# 1.0001 exceeds it 6x. Relative error alone is meaningless for gradients that are zero in exact arithmetic (the
# position-bias MLP's last bias is a per-head constant the softmax ignores: ~1e-10 from rounding), hence an
# absolute floor scaled by the largest gradient entry.
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-5, 1e-6


def tiny_model(kernels: dict, device: torch.device = DEVICE) -> LAQ:
    torch.manual_seed(0)  # the same initial weights for every kernel choice
    return LAQ(build_config(LAQModelConfig, {**TINY["model"], "kernels": kernels}, "tiny")).to(device).train()


def batches(count: int = 4, device: torch.device = DEVICE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (x_t, x_next) pairs [B, 3, 16, 16] at the tiny config's batch size; x_next is x_t plus a change."""
    generator = torch.Generator().manual_seed(1)
    shape = (TINY["data"]["batch_size"], 3, 16, 16)
    pairs = []
    for _ in range(count):
        x_t = torch.rand(shape, generator=generator)
        x_next = (x_t + 0.2 * torch.rand(shape, generator=generator)).clamp(0, 1)
        pairs.append((x_t.to(device), x_next.to(device)))
    return pairs


def autograd_nodes(tensor: torch.Tensor) -> set[str]:
    """Type names of every node in the autograd graph behind `tensor`."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def train(kernels: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain AdamW on the fixed batches, with the trainer's dead-code replacement: (losses [STEPS], codes)."""
    model = tiny_model(kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TINY["optim"]["lr"])
    replacement_generator = torch.Generator().manual_seed(2)
    data = batches()
    losses, codes = [], []
    for step in range(STEPS):
        torch.manual_seed(NOISE_SEED + step)
        out = model(*data[step % len(data)])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        codes.append(out.code_indices.cpu())
        if model.quantizer.replacement_due(step + 1):
            new_codebook, _ = model.quantizer.replacement(model.quantizer.usage, replacement_generator)
            model.quantizer.install_codebook(new_codebook)
    return torch.tensor(losses, dtype=torch.float64), torch.stack(codes)


def test_step_zero_gradients_match_the_references():
    x_t, x_next = batches(count=1)[0]
    gradients, losses = {}, {}
    for name, kernels in (("kernels", KERNELS), ("references", REFERENCES)):
        model = tiny_model(kernels)
        torch.manual_seed(NOISE_SEED)
        loss = model(x_t, x_next).loss
        used = autograd_nodes(loss) & TRITON_NODES
        assert used == (TRITON_NODES if name == "kernels" else set()), f"{name} ran {used}"
        loss.backward()
        losses[name] = loss.item()
        gradients[name] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert gradients["kernels"].keys() == gradients["references"].keys()
    assert losses["kernels"] == pytest.approx(losses["references"], rel=LOSS_RTOL)
    largest = max(grad.abs().max().item() for grad in gradients["references"].values())
    for key, reference in gradients["references"].items():
        torch.testing.assert_close(gradients["kernels"][key], reference, rtol=GRAD_RTOL,
                                   atol=GRAD_ATOL_OF_MAX * largest, msg=lambda m, key=key: f"{key}: {m}")


def test_training_loss_curve_matches_the_references():
    kernel_losses, kernel_codes = train(KERNELS)
    reference_losses, reference_codes = train(REFERENCES)
    assert reference_losses[-1] < 0.5 * reference_losses[0], reference_losses  # it does train
    relative = ((kernel_losses - reference_losses).abs() / reference_losses).max().item()
    assert relative <= LOSS_RTOL, f"largest per-step relative loss difference {relative:.2e}"
    # The same latent actions at every step: the smallest gap between a vector's nearest and second-nearest code
    # over this run is 6e-5 of the squared distance (measured), far above the kernels' ~1e-7 rounding, so no
    # argmin flips here; a flip would also show as diverging losses.
    assert torch.equal(kernel_codes, reference_codes)


def test_auto_cross_attention_is_sdpa_on_cpu():
    """"auto" picks SDPA for CPU tensors, even where the interpreter could run the kernel on them."""
    x_t, x_next = batches(count=1, device=CPU)[0]
    losses = {}
    for backend in ("auto", "sdpa"):
        model = tiny_model({"nsvq": "torch", "cross_attention": backend}, device=CPU)
        torch.manual_seed(NOISE_SEED)
        loss = model(x_t, x_next).loss
        assert "CrossAttentionTritonBackward" not in autograd_nodes(loss)
        losses[backend] = loss
    assert torch.equal(losses["auto"], losses["sdpa"])


def test_kernels_config_section():
    sections = {name: json.loads((CONFIGS / f"{name}.json").read_text())["model"]["kernels"]
                for name in ("tiny", "metaworld", "paper")}
    assert sections["tiny"] == REFERENCES  # the tests' model runs the references unless a test says otherwise
    assert sections["paper"] == sections["metaworld"] == {"nsvq": "triton", "cross_attention": "auto"}
    assert LAQModelConfig().kernels.model_dump() == sections["paper"]
    with pytest.raises(ConfigError, match="kernels.cross_attention"):
        build_config(LAQModelConfig, {"kernels": {"cross_attention": "flash"}})
