"""The Llama backbone: tensor parallelism against TP=1, ZeRO-1 with TP x DP against single-process training,
HF checkpoints in and out, the 7B parameter count and the layout's errors.

Multi-rank checks run tests/scripts/llama_tp_check.py under the real deepspeed launcher (gloo, CPU ranks):
one 2-rank launch (TP=2) and one 4-rank launch (TP=2 x DP=2); see that script for what each does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lapa_dist.models.hf_llama import (
    config_from_hf,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.parallel.distributed import DistributedContext
from lapa_dist.parallel.layout import ParallelLayout, data_parallel_size
from lapa_dist.parallel.tensor_parallel import check_divisible
from tests.launch_helpers import ROOT, run_deepspeed

SCRIPT = "tests/scripts/llama_tp_check.py"
LLAMA2_7B_PARAMS = 6_738_415_616
HF_CHECKPOINTS = {"single_tied": {"tie_word_embeddings": True, "max_shard_size": "5GB"},
                  "sharded_untied": {"tie_word_embeddings": False, "max_shard_size": "40KB"}}


def tiny_config(**changes) -> LlamaConfig:
    return LlamaConfig(**{**json.loads((ROOT / "configs/vla/backbone_tiny.json").read_text()), **changes})


def write_hf_checkpoint(path: Path, tie_word_embeddings: bool, max_shard_size: str) -> None:
    """A tiny LlamaForCausalLM saved by transformers (safetensors, offline), with transformers' own logits."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    hf_config = HFLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, rope_theta=5e7, rms_norm_eps=1e-6,
                              max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings)
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones by default: make a norm that is not loaded visible
                param.copy_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    input_ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": model(input_ids).logits}, path / "reference.pt")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    for name, options in HF_CHECKPOINTS.items():
        write_hf_checkpoint(root / name, **options)
    return {name: root / name for name in HF_CHECKPOINTS}


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory, hf_checkpoints) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("tp")
    run_deepspeed(SCRIPT, ["--check", "tp", "--out", str(out), "--hf-dirs", *map(str, hf_checkpoints.values())],
                  ranks=2)
    return json.loads((out / "tp.json").read_text()), out


@pytest.mark.parametrize("variant", ["untied_gqa", "tied_recompute"])
def test_tp2_matches_tp1(tp_run, variant):
    result = tp_run[0][variant]
    assert result["grads_compared"] == result["reference_grads"]  # every parameter, gathered to full shape
    assert result["loss_diff"] < 1e-6 * result["loss"]
    assert result["max_relative_grad_diff"] < 1e-5
    assert result["state_dict_keys_plain"]  # megatron's _extra_state entries kept out
    assert result["tied"] == (variant == "tied_recompute")


@pytest.mark.parametrize("name", HF_CHECKPOINTS)
def test_hf_checkpoint_as_tp2_slices(tp_run, hf_checkpoints, name):
    result, out = tp_run[0]["hf"][name], tp_run[1]
    assert result["logits_diff"] < 1e-5
    full_params = sum(p.numel() for p in Llama(config_from_hf(hf_checkpoints[name])).parameters())
    replicated = 64 * (2 * 2 + 1)  # RMSNorm weights: 2 per layer and the final one
    assert result["local_params"] == (full_params - replicated) // 2 + replicated
    exported, original = read_tensors(out / f"export_{name}"), read_tensors(hf_checkpoints[name])
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[key], original[key]) for key in original)
    assert (out / f"export_{name}" / "model.safetensors.index.json").is_file()  # the small shard limit


@pytest.mark.parametrize("name", HF_CHECKPOINTS)
def test_hf_checkpoint_tp1_round_trip(hf_checkpoints, tmp_path, name):
    from transformers import LlamaForCausalLM

    path = hf_checkpoints[name]
    model = Llama(config_from_hf(path))
    load_hf_checkpoint(model, path)
    expected = torch.load(path / "reference.pt")
    with torch.no_grad():
        assert (model(expected["input_ids"]) - expected["logits"]).abs().max().item() < 1e-6
    save_hf_checkpoint(model.state_dict(), model.config, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    exported, original = read_tensors(tmp_path), read_tensors(path)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[key], original[key]) for key in original)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # transformers reads our config.json
    with torch.no_grad():
        assert torch.equal(reloaded(expected["input_ids"]).logits, expected["logits"])


def test_hf_checkpoint_errors(hf_checkpoints, tmp_path):
    path = hf_checkpoints["sharded_untied"]
    hf = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "rope_parameters": {"rope_type": "llama3"}}))
    with pytest.raises(ValueError, match="rope_type 'llama3' is not supported"):
        config_from_hf(tmp_path)
    with pytest.raises(ValueError, match="checkpoint shape"):
        load_hf_checkpoint(Llama(config_from_hf(path).model_copy(update={"intermediate_size": 64})), path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json and no"):
        load_hf_checkpoint(Llama(config_from_hf(path)), tmp_path)


def test_zero1_tp2_dp2_matches_single_process(tmp_path):
    run_deepspeed(SCRIPT, ["--check", "zero", "--out", str(tmp_path)], ranks=4)
    result = json.loads((tmp_path / "zero.json").read_text())
    losses, reference = torch.tensor(result["losses"]), torch.tensor(result["reference_losses"])
    assert ((losses - reference).abs() / reference).max() < 1e-5
    assert losses[-1] < losses[0] - 0.5
    norms, reference_norms = torch.tensor(result["grad_norms"]), torch.tensor(result["reference_grad_norms"])
    assert (reference_norms > result["clip"]).all()  # clipping acts on every step
    assert ((norms - reference_norms).abs() / reference_norms).max() < 1e-5  # the global norm over TP slices
    assert result["weights_compared"] == 21 and result["max_weight_diff"] < 1e-4


def test_7b_parameter_count(tp_run):
    config = LlamaConfig(**json.loads((ROOT / "configs/vla/backbone_7b.json").read_text()))
    with torch.device("meta"):
        untied = sum(p.numel() for p in Llama(config).parameters())
        tied = sum(p.numel() for p in Llama(config.model_copy(update={"tie_word_embeddings": True})).parameters())
    # Per layer 4 * 4096^2 attention + 3 * 4096 * 11008 SwiGLU + 2 * 4096 norms; 2 * 32000 * 4096 embed + head.
    by_hand = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 2 * 32000 * 4096
    assert untied == by_hand == LLAMA2_7B_PARAMS
    assert tied == LLAMA2_7B_PARAMS - 32000 * 4096
    replicated = (2 * 32 + 1) * 4096
    assert tp_run[0]["meta_7b_local_params"] == (LLAMA2_7B_PARAMS - replicated) // 2 + replicated


def test_layout_and_divisibility_errors():
    with pytest.raises(ValueError, match=r"^world size 3 is not divisible by tensor-parallel size 2 .*") as error:
        ParallelLayout.create(DistributedContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")), tp=2)
    assert "\n" not in str(error.value)
    assert data_parallel_size(8, 2) == 4
    with pytest.raises(ValueError, match="num_kv_heads 2 is not divisible by tensor-parallel size 4"):
        check_divisible(tiny_config(), 4)
    with pytest.raises(ValueError, match="num_heads 4 is not divisible by num_kv_heads 3"):
        tiny_config(num_kv_heads=3)
