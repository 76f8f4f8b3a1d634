import json

import pytest
import torch
import torch.nn.functional as F

from lapa_dist.config import load_config
from lapa_dist.models.laq import LAQ, KernelsConfig
from lapa_dist.profiling import (
    LAQ_SECTION,
    count_flops,
    countable_attention,
    peak_tflops,
    utilization,
)
from lapa_dist.train.laq import LAQRunConfig
from tests.shard_helpers import index_set
from tools.profile_throughput import main

TINY = "configs/laq/tiny.json"


def test_linear_flops_match_hand_count():
    batch, fan_in, fan_out = 5, 16, 24
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in)
    flops, _ = count_flops(lambda: layer(x).sum().backward())
    assert flops == 2 * (2 * batch * fan_in * fan_out)  # forward, grad_weight (the input needs no gradient)
    x.requires_grad_()
    flops, _ = count_flops(lambda: layer(x).sum().backward())
    assert flops == 3 * (2 * batch * fan_in * fan_out)  # and grad_input


def test_attention_flops_counted_on_the_cpu_flash_path():
    b, h, length, keys, d = 2, 3, 16, 6, 8
    q, k, v = torch.randn(b, h, length, d), torch.randn(b, h, keys, d), torch.randn(b, h, keys, d)
    hand = 2 * (2 * b * h * length * keys * d)  # q·kᵀ and p·v
    flash, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))  # CPU flash kernel
    math, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(length, keys)))
    assert flash == math == hand


def test_grouped_convolution_backward_counts_each_group_once():
    batch, channels, side = 2, 8, 5
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)  # depthwise, as the position convs
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    flops, _ = count_flops(lambda: conv(x).sum().backward())
    assert flops == 3 * (2 * batch * channels * 9 * side * side)  # forward, grad_input, grad_weight


def test_triton_cross_attention_is_counted_as_sdpa():
    config = load_config(LAQRunConfig, TINY).model
    triton_model = LAQ(config.model_copy(update={"kernels": KernelsConfig(nsvq="torch", cross_attention="triton")}))
    sdpa_model = LAQ(config.model_copy(update={"kernels": KernelsConfig(nsvq="torch", cross_attention="sdpa")}))
    sdpa_model.load_state_dict(triton_model.state_dict())
    x_t, x_next = torch.rand(2, 2, 3, config.image_size, config.image_size)
    with countable_attention(triton_model):  # without it, "triton" raises on a CPU without TRITON_INTERPRET
        counted, _ = count_flops(lambda: triton_model(x_t, x_next).loss.backward())
    reference, _ = count_flops(lambda: sdpa_model(x_t, x_next).loss.backward())
    assert counted == reference > 0
    assert {m.cross_attention for m in triton_model.modules() if getattr(m, "cross_attention", None)} == {"triton"}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_laq_profile_on_tiny_config(tmp_path, capsys):
    markdown, out = tmp_path / "perf.md", tmp_path / "laq.json"
    markdown.write_text("# Performance\n\n## Someone else's section\n\n| a |\n")
    code, stdout, _ = run_cli(["--stage", "laq", "--config", TINY, "--steps", "3", "--warmup", "1",
                               "--batch-size", "4", "--markdown", str(markdown), "--json", str(out)], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert json.loads(out.read_text()) == result
    assert result["batch_size"] == 4 and result["steps"] == 3 and result["samples_per_s"] > 0
    assert result["samples_per_s"] == pytest.approx(4 / result["step_s"])
    breakdown = result["breakdown_s"]
    assert breakdown["communication"] == 0 and "single process" in result["communication_note"]
    assert all(breakdown[phase] > 0 for phase in ("forward", "backward", "optimizer"))
    assert sum(breakdown.values()) == pytest.approx(result["step_s"], rel=0.05)
    model = LAQ(load_config(LAQRunConfig, TINY).model)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["flops_per_sample"] > 0 and result["peak_memory_bytes"] > 0
    assert result["mfu"] is None and "n/a" in result["peak_basis"]

    code, _, _ = run_cli(["--stage", "laq", "--config", TINY, "--steps", "1", "--warmup", "1",
                          "--markdown", str(markdown)], capsys)
    text = markdown.read_text()
    assert code == 0 and text.startswith("# Performance\n\n## Someone else's section\n\n| a |\n")
    assert text.count(LAQ_SECTION) == 1 and text.count("### ") == 2 and "| 4 | " in text and "| 8 | " in text


def test_laq_profile_with_loader_and_data_stage(tmp_path, capsys):
    shards = index_set(tmp_path / "shards", num_shards=2, clips_per_shard=2, num_frames=8, size=16)
    data = ["--set", f"data.datasets.0.path={shards}", "--set", "data.num_workers=0"]
    code, stdout, _ = run_cli(["--stage", "laq", "--config", TINY, "--steps", "2", "--warmup", "1", "--with-data",
                               *data], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["input"] == "VideoLoader (num_workers=0)" and result["breakdown_s"]["data_wait"] > 0
    code, stdout, _ = run_cli(["--stage", "data", "--config", TINY, "--seconds", "0.3", *data], capsys)
    result = json.loads(stdout)
    assert code == 0 and [row["what"].split(",")[0] for row in result["rows"]] == ["VideoLoader", "bare PyAV"]
    assert all(row["pairs_per_s"] > 0 for row in result["rows"])


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_vla_stages_say_not_implemented(stage, capsys):
    code, stdout, stderr = run_cli(["--stage", stage, "--config", TINY], capsys)
    assert code != 0 and stdout == ""
    assert f"--stage {stage}: not implemented yet: the VLA stages land with issue 4" in stderr


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak_tflops("NVIDIA H200 NVL", "bf16") is None
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    numbers = utilization(2e9, 100.0, torch.device("cpu"), torch.float32, peak_override=1.0)
    assert numbers["achieved_tflops"] == pytest.approx(0.2) and numbers["mfu"] == pytest.approx(0.2)
