import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from lapa_dist.config import load_config
from lapa_dist.data.actions import read_actions
from lapa_dist.models.action_tokenizer import ActionTokenizer
from lapa_dist.models.laq import LAQ, KernelsConfig
from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.models.vla_sequence import build_example, collate_examples
from lapa_dist.profiling import (
    DEFAULT_INSTRUCTION,
    LAQ_SECTION,
    VLA_SECTION,
    count_flops,
    countable_attention,
    peak_tflops,
    utilization,
    vision_flops_per_image,
    vla_flops,
)
from lapa_dist.train.laq import LAQRunConfig
from lapa_dist.train.vla import VLARunConfig
from tests.launch_helpers import run_deepspeed
from tests.shard_helpers import index_set
from tests.tiny_tokenizer import save_tiny_tokenizer
from tests.vla_helpers import FINETUNE, PRETRAIN, labelled_sprites
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


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak_tflops("NVIDIA H200 NVL", "bf16") is None
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    numbers = utilization(2e9, 100.0, torch.device("cpu"), torch.float32, peak_override=1.0)
    assert numbers["achieved_tflops"] == pytest.approx(0.2) and numbers["mfu"] == pytest.approx(0.2)


# ---- VLA stages ----

TINY_VIT = {"tower": "vit", "vit": {"family": "siglip", "image_size": 32, "hf_config": {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8, "image_size": 32,
    "intermediate_size": 64}}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def tiny_model_config(path: Path = PRETRAIN, **update) -> VLAConfig:
    model = json.loads(path.read_text())["model"]
    model.update(update)
    if model["vision"]["tower"] == "vit":
        model["sequence"]["end_of_vision_id"] = None
    return VLAConfig.model_validate(model)


def test_closed_form_when_everything_trains():
    model = VLA(tiny_model_config())
    b = model.config.backbone  # hidden 64, SwiGLU 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 128; |C| = 8
    d, d_kv, f, layers, vocab, latent = 64, 32, 128, 2, 128, 8
    assert (b.hidden_size, b.num_kv_heads * b.head_dim, b.intermediate_size, b.num_layers) == (d, d_kv, f, layers)
    n = layers * (2 * d * d + 2 * d * d_kv + 3 * d * f) + d * (vocab + latent)
    flops, seq_len = vla_flops(model), 65
    assert flops.matmul_params == n
    assert flops.forward(seq_len) == 2 * n + 4 * layers * seq_len * d
    assert flops.per_token(seq_len) == 6 * n + 12 * layers * seq_len * d


FLOP_CASES = {
    "pretrain": (PRETRAIN, {}),
    "finetune": (FINETUNE, {"freeze": ["text_embed"]}),
    "frozen-backbone": (PRETRAIN, {"freeze": ["backbone", "image_embed"]}),  # latent embedding trains: dL/dx only
    "head-only": (PRETRAIN, {"freeze": ["backbone", "image_embed", "latent_embed"]}),  # only the latent head trains
    "vit": (PRETRAIN, {"vision": TINY_VIT}),  # frozen ViT, trained projector: gradients reach the tower
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_analytic_flops_match_flop_counter(case, tokenizer_dir):
    """The analytic count against torch's FlopCounterMode on the tiny VLA's forward + backward. They agree
    exactly once two things are accounted for: the embedding lookups are 0 FLOPs in both (neither counts a
    gather as a matmul), and FlopCounterMode counts the flash-attention backward as 5 matmuls, not 4: it
    recomputes q.k^T (2 T d per token and layer where attention has a backward), hardware work that model
    FLOPs leave out. The vision tower is counted by FlopCounterMode alone, per image."""
    path, update = FLOP_CASES[case]
    torch.manual_seed(0)
    model = VLA(tiny_model_config(path, **update))
    sequence, count = model.config.sequence, 3
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    latents = torch.randint(0, sequence.latent_vocab_size, (count, sequence.latent_length))
    placeholder = torch.zeros(sequence.num_image_tokens, dtype=torch.long)
    batch = collate_examples([build_example(tokenizer, DEFAULT_INSTRUCTION, placeholder, latent, sequence)
                              for latent in latents])
    batch["images"] = torch.rand(count, 3, 32, 32)
    counted, _ = count_flops(lambda: model(batch).loss.backward())
    flops, seq_len = vla_flops(model), batch["input_ids"].shape[1]
    recompute = flops.attention_backward(seq_len) // 4  # the extra q.k^T of the flash backward, per token
    expected = count * (flops.per_sequence(seq_len) + seq_len * recompute + vision_flops_per_image(model, "cpu"))
    assert counted == expected
    if case == "head-only":  # no gradient enters the backbone: dL/dW of the latent head is the whole backward
        assert flops.backward(seq_len) == 2 * 64 * sequence.latent_vocab_size
    if case == "frozen-backbone":  # every input gradient, the latent head's weight gradient, all the attention
        assert flops.backward(seq_len) == 2 * flops.matmul_params + 2 * 64 * 8 + flops.attention_backward(seq_len)


def vla_cli(stage_config: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    stage = json.loads(stage_config.read_text())["stage"]
    return ["--stage", stage, "--config", str(stage_config), "--set", f"tokenizer={tokenizer_dir}", "--steps", "2",
            "--warmup", "1", "--peak-tflops", "1", *extra]


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])  # DeepSpeed logs to stdout before it


def check_vla_result(result: dict, stage: str) -> None:
    assert result["stage"] == stage and result["steps"] == 2 and result["warmup"] == 1
    tokens, step_s = result["tokens_per_step_per_replica"], result["step_s"]
    assert result["tokens_per_s_per_rank"] == pytest.approx(tokens / step_s / result["tensor_parallel"], rel=0.01)
    samples = result["micro_batch"] * result["gradient_accumulation"]
    assert result["samples_per_s"] == pytest.approx(samples / step_s * result["data_parallel"], rel=0.05)
    flops = result["flops"]
    assert result["achieved_tflops_per_rank"] == pytest.approx(
        flops["per_step_per_replica"] / step_s / result["tensor_parallel"] / 1e12, rel=0.01)
    assert result["peak_tflops"] == 1 and result["mfu"] == pytest.approx(result["achieved_tflops_per_rank"])
    assert sum(result["breakdown_s"].values()) == pytest.approx(step_s, rel=0.05)
    assert len(result["per_rank"]) == result["world_size"] == result["tensor_parallel"] * result["data_parallel"]


def test_pretrain_profile_on_the_cpu_path(tokenizer_dir, tmp_path, capsys):
    out, markdown = tmp_path / "pretrain.json", tmp_path / "perf.md"
    code, stdout, _ = run_cli(vla_cli(PRETRAIN, tokenizer_dir, "--count-flops", "--json", str(out), "--markdown",
                                      str(markdown), "--set", "deepspeed.gradient_accumulation=2"), capsys)
    result = json.loads(out.read_text())
    assert code == 0 and last_json_line(stdout) == result
    check_vla_result(result, "pretrain")
    config = load_config(VLARunConfig, PRETRAIN, [f"tokenizer={tokenizer_dir}"])
    example = build_example(AutoTokenizer.from_pretrained(str(tokenizer_dir)), DEFAULT_INSTRUCTION,
                            torch.zeros(16, dtype=torch.long), torch.zeros(4, dtype=torch.long), config.model.sequence)
    seq_len = example["input_ids"].numel()
    assert result["sequence_length"] == seq_len and result["tokens_per_step_per_replica"] == 2 * 4 * seq_len
    assert result["input"].startswith("synthetic") and result["micro_batch"] == 4
    flops = result["flops"]
    assert flops["per_step_per_replica"] == 8 * (seq_len * flops["per_token"] + flops["vision_per_image"])
    recompute = 8 * seq_len * (2 * 2 * seq_len * 64)  # the first step's extra q.k^T under FlopCounterMode
    assert flops["counted_first_step_rank0"] == flops["model_first_step_per_rank"] + recompute
    text = markdown.read_text()
    assert VLA_SECTION in text and "| 1 (1 x 1) | 4 x 2 | " in text


def test_finetune_profile_with_the_loader(tokenizer_dir, tmp_path, capsys):
    data = labelled_sprites(tmp_path / "data", num_shards=1, clips_per_shard=2, num_frames=8)
    args = vla_cli(FINETUNE, tokenizer_dir, "--with-data", "--set", f"data.datasets.0.path={data}", "--set",
                   "data.num_workers=0")
    code, stdout, _ = run_cli(args, capsys)
    result = last_json_line(stdout)
    assert code == 0 and result["input"].startswith("VideoLoader")
    check_vla_result(result, "finetune")
    assert result["breakdown_s"]["data_wait"] > 0 and result["breakdown_s"]["to_device"] > 0
    # The action tokenizer is fitted on the sprites' actions, as the trainer fits it: their dimension sets the
    # action tokens and their bins the action head; synthetic batches use sequence.action_tokens_per_action (7)
    # and actions.num_bins (16).
    fitted = ActionTokenizer.fit(read_actions(load_config(VLARunConfig, FINETUNE, [
        f"tokenizer={tokenizer_dir}", f"data.datasets.0.path={data}"]).data.datasets)[0], num_bins=16)
    code, stdout, _ = run_cli(vla_cli(FINETUNE, tokenizer_dir), capsys)
    synthetic = last_json_line(stdout)
    assert code == 0 and synthetic["sequence_length"] == result["sequence_length"] + 7 - fitted.tokens_per_action
    assert synthetic["flops"]["matmul_params"] - result["flops"]["matmul_params"] == 64 * (16 - fitted.vocab_size)


def test_vla_errors_are_clear(tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--stage", "train", "--config", str(PRETRAIN)])
    assert "invalid choice: 'train'" in capsys.readouterr().err
    cases = [
        (["--stage", "pretrain"], "--stage pretrain needs --config"),
        (["--stage", "pretrain", "--config", str(tmp_path / "none.json")], "no such file"),
        (vla_cli(PRETRAIN, tokenizer_dir)[2:] + ["--stage", "finetune"], "is a 'pretrain' config"),
        (vla_cli(PRETRAIN, tmp_path / "no_tokenizer"), "tokenizer: cannot load a tokenizer"),
        (vla_cli(PRETRAIN, tokenizer_dir, "--set", "data.image_size=64"), "data.image_size is 64"),
        (vla_cli(PRETRAIN, tokenizer_dir, "--instruction", " "), "--instruction must not be empty"),
        (vla_cli(PRETRAIN, tokenizer_dir, "--set", "parallel.tensor_parallel=2", "--set", "deepspeed.zero_stage=1"),
         "world size 1 is not divisible by tensor-parallel size 2"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_cli(args, capsys)
        assert code == 2 and message in stderr, (args, stderr)


@pytest.mark.slow  # ~45 s on 2 CPU cores: two ranks start torch, DeepSpeed and megatron-core
def test_tensor_parallel_profile_under_the_deepspeed_launcher(tokenizer_dir, tmp_path):
    out = tmp_path / "tp2.json"
    args = vla_cli(PRETRAIN, tokenizer_dir, "--set", "parallel.tensor_parallel=2", "--set", "deepspeed.zero_stage=1",
                   "--json", str(out))
    run_deepspeed("tools/profile_throughput.py", args, ranks=2)
    result = json.loads(out.read_text())
    check_vla_result(result, "pretrain")
    assert (result["tensor_parallel"], result["data_parallel"]) == (2, 1)
    assert [(rank["rank"], rank["tp_rank"]) for rank in result["per_rank"]] == [(0, 0), (1, 1)]
    assert result["tokens_per_s_per_rank"] == pytest.approx(result["tokens_per_s_per_replica"] / 2)
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_s_per_replica"])  # one replica
