"""VLA stages through the real launchers (gloo CPU ranks): latent pretraining under ZeRO-3, kill -9 and exact
resume, resume on another data-parallel size, action finetuning with TP=2 x DP=2, export and the Policy API;
and the whole model's loss, gradient norms and weights under ZeRO-3 and TP x DP against one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lapa_dist.models.action_tokenizer import ActionTokenizer
from lapa_dist.policy import Policy, export_policy
from lapa_dist.train.metrics import TIMING_KEYS
from lapa_dist.train.vla import run_stage, run_weights
from tests.launch_helpers import run_deepspeed, run_until_then_kill
from tests.tiny_tokenizer import save_tiny_tokenizer
from tests.vla_helpers import FINETUNE, PRETRAIN, labelled_sprites, vla_args

PARITY_SCRIPT = "tests/scripts/vla_parallel_check.py"
INSTRUCTIONS = ["move the square left", "move the square up", "move the square down-right"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vla_assets")
    return {"data": labelled_sprites(root / "data"), "tokenizer": save_tiny_tokenizer(root / "tokenizer")}


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS + ("tokens_per_s",)} for r in records]


def pretrain(run_dir: Path, assets: dict, *overrides: str) -> list[str]:
    return vla_args(PRETRAIN, run_dir, assets["data"], assets["tokenizer"], *overrides)


@pytest.fixture(scope="module")
def pretrain_run(assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_deepspeed("launch/pretrain.py", pretrain(run_dir, assets), ranks=2)
    return run_dir


def test_pretraining_on_two_zero3_ranks_lowers_the_latent_loss(pretrain_run):
    records = metrics(pretrain_run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["token_loss"] < 0.6 * records[0]["token_loss"], records
    assert records[-1]["token_accuracy"] > records[0]["token_accuracy"]
    saved = json.loads((pretrain_run / "config.json").read_text())
    assert saved["stage"] == "pretrain" and saved["deepspeed"]["zero_stage"] == 3


def test_kill_9_then_resume_is_bitwise_exact(pretrain_run, assets, tmp_path):
    interrupted = tmp_path / "interrupted"
    run_until_then_kill("launch/pretrain.py", pretrain(interrupted, assets), ranks=2,
                        ready=interrupted / "checkpoints" / "step-00000020" / "COMPLETE")
    result = run_deepspeed("launch/pretrain.py", pretrain(interrupted, assets), ranks=2)
    assert "resumed from step-00000020" in result.stdout
    assert metrics(interrupted) == metrics(pretrain_run)


def test_resume_on_another_data_parallel_size(pretrain_run, assets, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pretrain_run, run_dir)
    result = run_deepspeed("launch/pretrain.py", pretrain(run_dir, assets, "train.steps=40"), ranks=1)
    assert "resumed from step-00000030" in result.stdout
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert records[-1]["token_loss"] < records[0]["token_loss"]


# 4 ranks (TP=2 x DP=2) on this 2-core machine: in the full suite its ranks once spun for an hour (two busy-waiting,
# two idle) in set-up of DeepSpeed's shm comm op, which init_distributed no longer builds; it passes on its own
# (164 s). Slow until full suites with it have passed here and in CI.
@pytest.mark.slow
def test_lora_finetune_with_tensor_and_data_parallelism_then_export_and_act(pretrain_run, assets, tmp_path):
    run_dir = tmp_path / "finetune"
    args = vla_args(FINETUNE, run_dir, assets["data"], assets["tokenizer"], f"init.run={pretrain_run}",
                    "parallel.tensor_parallel=2", "deepspeed.zero_stage=1", "lora.enabled=true", "lora.rank=4")
    result = run_deepspeed("launch/finetune.py", args, ranks=4)
    assert "init: run" in result.stdout and "new latent/action head" in result.stdout
    records = metrics(run_dir)
    assert records[-1]["token_loss"] < 0.7 * records[0]["token_loss"], records
    assert all(r["actions_out_of_range"] == 0 for r in records)
    checkpoint = run_dir / "checkpoints" / "step-00000030"
    assert len(list(checkpoint.glob("mp_rank_*_model_states.pt"))) == 2

    state, source = run_weights(run_dir)  # TP slices gathered, adapters folded into the base weights
    assert "LoRA merged" in source and not any("lora_" in name for name in state)
    pretrained, _ = run_weights(pretrain_run)
    moved = {name for name in pretrained if name.startswith("llm.")
             and not torch.equal(state[name], pretrained[name].to(state[name].dtype))}
    assert moved and all(name.endswith("_proj.weight") for name in moved), moved  # only adapted projections

    policy_dir = export_policy(run_dir, tmp_path / "policy")
    policy = Policy.from_pretrained(policy_dir, device="cpu")
    tokenizer = ActionTokenizer.load(run_dir)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)  # any size: resized
    actions = policy.predict(images, INSTRUCTIONS)
    assert actions.shape == (3, 2) and actions.dtype == np.float32
    for dim in range(2):  # every action decodes to one of that dimension's bin values
        assert set(actions[:, dim].tolist()) <= set(tokenizer.bin_values[dim].tolist())
    np.testing.assert_array_equal(policy.predict(images[1], INSTRUCTIONS[1]), actions[1:2])  # batched == single
    with pytest.raises(ValueError, match="action head"):
        policy.predict_latent(images, INSTRUCTIONS)

    latent_policy = Policy.from_pretrained(export_policy(pretrain_run, tmp_path / "latent_policy"))
    latents = latent_policy.predict_latent(images, INSTRUCTIONS)
    assert latents.shape == (3, 4) and latents.min() >= 0 and latents.max() < 8
    with pytest.raises(ValueError, match="latent head"):
        latent_policy.predict(images, INSTRUCTIONS)


def test_bf16_pretraining_trains_and_exports_bf16_weights(assets, tmp_path):
    run_dir = tmp_path / "bf16"
    run_deepspeed("launch/pretrain.py", pretrain(run_dir, assets, "deepspeed.precision=bf16", "deepspeed.zero_stage=2",
                                                 "train.steps=20", "optim.lr=0.01"), ranks=1)
    records = metrics(run_dir)
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["token_loss"] < 0.8 * records[0]["token_loss"], records
    policy = Policy.from_pretrained(export_policy(run_dir, tmp_path / "policy"))
    assert policy.dtype == torch.bfloat16 and policy.metadata["dtype"] == "bfloat16"
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert policy.predict_latent(images, INSTRUCTIONS[:2]).shape == (2, 4)


def test_launcher_rejects_a_config_of_the_other_stage(assets, tmp_path, capsys):
    args = vla_args(FINETUNE, tmp_path / "run", assets["data"], assets["tokenizer"], "init.run=null")
    assert run_stage("pretrain", "", args) == 2
    assert "this launcher runs 'pretrain', the config says 'finetune'" in capsys.readouterr().err


def test_missing_init_weights_stop_the_launcher_with_a_message(assets, tmp_path):
    import subprocess
    import sys

    from tests.launch_helpers import ROOT, environment

    args = vla_args(FINETUNE, tmp_path / "run", assets["data"], assets["tokenizer"], f"init.run={tmp_path / 'nope'}")
    result = subprocess.run([sys.executable, "launch/finetune.py", *args], cwd=ROOT, env=environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"init.run: {tmp_path / 'nope'} does not exist" in result.stderr


def test_bad_inputs_get_clear_errors(pretrain_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_policy(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="tools/export.py"):
        Policy.from_pretrained(tmp_path)


def parity(tmp_path: Path, assets: dict, name: str, model: dict, zero: int, tp: int, ranks: int,
           accumulation: int = 1) -> dict:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"model": model}))
    run_deepspeed(PARITY_SCRIPT, ["--name", name, "--config", str(config), "--tokenizer", str(assets["tokenizer"]),
                                  "--zero", str(zero), "--tp", str(tp), "--accumulation", str(accumulation),
                                  "--out", str(tmp_path)], ranks=ranks)
    return json.loads((tmp_path / f"{name}.json").read_text())


def assert_matches_one_process(result: dict) -> None:
    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5)
    np.testing.assert_allclose(result["grad_norms"], result["reference_grad_norms"], rtol=1e-4)
    # Adam divides by sqrt(v): a last-bit difference in a tiny gradient moves a weight by a fraction of lr (3e-3)
    assert result["max_weight_diff"] < 1e-4, result


def test_zero3_with_gradient_accumulation_on_two_ranks_matches_one_process_with_the_vit_tower(assets, tmp_path):
    model = json.loads(PRETRAIN.read_text())["model"]
    vit = {"family": "siglip", "image_size": 32, "freeze": True,
           "hf_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
                         "image_size": 32, "intermediate_size": 64}}
    model["vision"] = {"tower": "vit", "vit": vit}
    model["sequence"]["end_of_vision_id"] = None
    # each rank's 2 rows as 2 micro-batches of 1: the same global batch of 4 per optimizer step
    assert_matches_one_process(parity(tmp_path, assets, "zero3_vit", model, zero=3, tp=1, ranks=2, accumulation=2))


def test_tp2_by_dp2_zero2_matches_one_process_with_the_vqgan_tower(assets, tmp_path):
    model = json.loads(PRETRAIN.read_text())["model"]
    assert_matches_one_process(parity(tmp_path, assets, "tp2_dp2", model, zero=2, tp=2, ranks=4))
