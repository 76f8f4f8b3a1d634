"""LoRA adapters (lapa_dist.models.lora) on the tiny backbone: single-process behaviour, and TP=2 against TP=1.

The multi-rank part is one 2-rank deepspeed launch of tests/scripts/lora_tp_check.py (TP=2 with TP=1 on rank 0:
init, gradients, ZeRO-1 training with clipping, merge); see that script for what each entry measures.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.models.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    adapted_modules,
    apply_lora,
    merge_lora,
    merge_lora_state_dict,
    planned_partition_dim_with_lora,
)
from tests.launch_helpers import ROOT, run_deepspeed

SCRIPT = "tests/scripts/lora_tp_check.py"
NUM_LAYERS = 2  # configs/vla/backbone_tiny.json


def tiny_config(**changes) -> LlamaConfig:
    return LlamaConfig(**{**json.loads((ROOT / "configs/vla/backbone_tiny.json").read_text()), **changes})


def lora(**changes) -> LoRAConfig:
    return LoRAConfig(**{"enabled": True, "rank": 4, "alpha": 8.0, **changes})


def tiny_model(**changes) -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config(**changes))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]  # inputs, targets [B, T]


def set_lora_b(model: torch.nn.Module, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, module in adapted_modules(model):
            module.lora_b.weight.copy_(std * torch.randn(module.lora_b.weight.shape, generator=generator))


def test_output_unchanged_at_init():
    model = tiny_model()
    inputs, targets = batch()
    with torch.no_grad():
        logits, loss = model(inputs), model(inputs, targets)
        apply_lora(model, lora())
        assert torch.equal(model(inputs), logits)
        assert torch.equal(model(inputs, targets), loss)


def test_only_lora_trainable_and_keys():
    model = tiny_model()
    plain_keys = set(model.state_dict())
    apply_lora(model, lora())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    expected = {f"layers.{i}.{part}.{leaf}.lora_{m}.weight" for i in range(NUM_LAYERS) for m in "ab"
                for part, leaves in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     ("mlp", ("gate_proj", "up_proj", "down_proj"))) for leaf in leaves}
    assert trainable == expected and len(expected) == 2 * NUM_LAYERS * len(DEFAULT_TARGETS)
    assert set(model.state_dict()) == plain_keys | expected  # base keys unchanged
    q, down = model.layers[0].attn.q_proj, model.layers[0].mlp.down_proj
    assert list(q.lora_a.weight.shape) == [4, 64] and list(q.lora_b.weight.shape) == [64, 4]
    assert list(down.lora_a.weight.shape) == [4, 128] and list(down.lora_b.weight.shape) == [64, 4]
    assert not q.lora_b.weight.any() and q.lora_a.weight.abs().max() <= 1 / 64**0.5
    assert not torch.equal(q.lora_a.weight, model.layers[1].attn.q_proj.lora_a.weight)  # seeded per layer name
    torch.manual_seed(123)
    again = apply_lora(Llama(tiny_config()), lora())
    assert torch.equal(again.layers[0].attn.q_proj.lora_a.weight, q.lora_a.weight)  # not from the global RNG
    reseeded = apply_lora(Llama(tiny_config()), lora(seed=1))
    assert not torch.equal(reseeded.layers[0].attn.q_proj.lora_a.weight, q.lora_a.weight)


@pytest.fixture(scope="module")
def trained() -> dict:
    """The tiny backbone with LoRA after a few AdamW steps on one batch, and what it started from."""
    model = tiny_model()
    base = {name: param.detach().clone() for name, param in model.named_parameters()}
    apply_lora(model, lora())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, targets = batch()
    losses = []
    for _ in range(8):
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"model": model, "base": base, "losses": losses}


def test_adamw_steps_lower_the_loss(trained):
    losses, model = trained["losses"], trained["model"]
    assert losses[-1] < losses[0] - 0.2
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(param, trained["base"][name]), name  # frozen base weights did not move
    assert all(module.lora_b.weight.abs().max() > 1e-3 for _, module in adapted_modules(model))


def test_merge_matches_unmerged(trained):
    model = copy.deepcopy(trained["model"])
    inputs, _ = batch()
    unmerged_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        before = model(inputs)
        merge_lora(model)
        after = model(inputs)
    assert (after - before).abs().max().item() < 1e-5
    assert set(model.state_dict()) == set(Llama(tiny_config()).state_dict())
    assert not list(adapted_modules(model)) and not any(module._forward_hooks for module in model.modules())
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, unmerged_state[name])}
    assert len(changed) == NUM_LAYERS * len(DEFAULT_TARGETS) and all(name.endswith("_proj.weight") for name in changed)
    from_state = merge_lora_state_dict(unmerged_state, lora())
    assert set(from_state) == set(model.state_dict())
    assert all(torch.equal(from_state[name], tensor) for name, tensor in model.state_dict().items())
    exported = tiny_model()  # what an export does: the merged state into a plain model
    exported.load_state_dict(from_state)
    with torch.no_grad():
        assert torch.equal(exported(inputs), after)


def test_recompute_and_dropout():
    inputs, targets = batch()
    grads = []
    for recompute in (False, True):
        model = apply_lora(tiny_model(recompute=recompute), lora())
        set_lora_b(model)
        model(inputs, targets).backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * NUM_LAYERS * len(DEFAULT_TARGETS)
    assert all(torch.allclose(grads[0][name], grads[1][name], atol=1e-7) for name in grads[0])
    plain = apply_lora(tiny_model(), lora())
    dropped = apply_lora(tiny_model(), lora(dropout=0.5))
    set_lora_b(plain)
    set_lora_b(dropped)
    with torch.no_grad():
        assert not torch.equal(dropped(inputs), plain(inputs))  # training mode: the LoRA input is dropped out
        assert torch.equal(dropped.eval()(inputs), plain(inputs))


def test_disabled_changes_nothing():
    model = tiny_model()
    assert apply_lora(model, LoRAConfig()) is model
    assert not list(adapted_modules(model)) and all(param.requires_grad for param in model.parameters())


def test_errors():
    with pytest.raises(ValidationError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValidationError, match=r"duplicate target names \['q_proj'\]"):
        LoRAConfig(targets=["q_proj", "q_proj"])
    with pytest.raises(ValidationError, match="leaf module names without dots"):
        LoRAConfig(targets=["attn.q_proj"])
    with pytest.raises(ValidationError, match="targets"):
        LoRAConfig(targets=[])
    with pytest.raises(ValueError, match=r"no module named \['qkv'\]"):
        apply_lora(tiny_model(), lora(targets=["q_proj", "qkv"]))
    with pytest.raises(TypeError, match="lora target embed_tokens is a Embedding"):
        apply_lora(tiny_model(), lora(targets=["embed_tokens"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(apply_lora(tiny_model(), lora()), lora())
    with torch.device("meta"):
        meta = Llama(tiny_config())
    with pytest.raises(ValueError, match="meta device: materialize"):
        apply_lora(meta, lora())
    state = apply_lora(tiny_model(), lora()).state_dict()
    with pytest.raises(ValueError, match="LoRA rank 4 in the state dict, config rank 8"):
        merge_lora_state_dict(state, lora(rank=8))
    del state["layers.1.mlp.up_proj.lora_b.weight"]
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj: missing \['layers.1.mlp.up_proj.lora_b.weight'\]"):
        merge_lora_state_dict(state, lora())


def test_planned_partition_dim_with_lora():
    assert planned_partition_dim_with_lora("layers.0.attn.q_proj.lora_b.weight") == 0
    assert planned_partition_dim_with_lora("layers.0.attn.q_proj.lora_a.weight") is None
    assert planned_partition_dim_with_lora("layers.3.mlp.down_proj.lora_a.weight") == 1
    assert planned_partition_dim_with_lora("layers.3.mlp.down_proj.lora_b.weight") is None
    assert planned_partition_dim_with_lora("layers.0.mlp.down_proj.weight") == 1  # the plan's own answer
    assert planned_partition_dim_with_lora("norm.weight") is None


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lora_tp")
    run_deepspeed(SCRIPT, ["--out", str(out)], ranks=2)
    return json.loads((out / "lora_tp.json").read_text())


def test_tp2_init_matches_tp1(tp_run):
    result = tp_run["init"]
    assert result["a_compared"] == NUM_LAYERS * len(DEFAULT_TARGETS)
    assert result["a_max_diff"] == 0.0  # sliced from the same full init
    assert result["b_max_abs"] == 0.0 and result["loss_diff"] == 0.0


def test_tp2_gradients_match_tp1(tp_run):
    result = tp_run["gradients"]
    assert result["grads_compared"] == result["reference_lora_params"] == result["trainable_reference"]
    assert len(result["grads_compared"]) == 2 * NUM_LAYERS * len(DEFAULT_TARGETS)
    assert result["loss_diff"] < 1e-6 * result["loss"]
    assert result["max_relative_grad_diff"] < 1e-5
    assert result["replicated_grad_spread"] == 0.0  # replicated A (column) and B (row) agree across TP ranks
    assert result["base_params_with_grad"] == []


def test_tp2_zero1_training_matches_tp1(tp_run):
    result = tp_run["training"]
    losses, reference = torch.tensor(result["losses"]), torch.tensor(result["reference_losses"])
    assert ((losses - reference).abs() / reference).max() < 1e-5
    assert losses[-1] < losses[0] - 0.1
    norms, reference_norms = torch.tensor(result["grad_norms"]), torch.tensor(result["reference_grad_norms"])
    assert (reference_norms > result["clip"]).all()  # clipping acts on every step
    assert ((norms - reference_norms).abs() / reference_norms).max() < 5e-5  # split ones counted on both ranks
    assert result["lora_params_compared"] == 2 * NUM_LAYERS * len(DEFAULT_TARGETS)
    assert result["max_lora_param_diff"] < 1e-4


def test_tp2_merge_matches_tp1(tp_run):
    result = tp_run["merge"]
    assert result["keys_match"] and result["plain_keys"]
    assert result["max_merged_weight_diff"] < 1e-6  # gathered merged TP slices against TP=1's merged weights
    assert result["max_state_dict_merge_diff"] < 1e-6  # merge_lora_state_dict on the gathered state: the same
    assert len(result["weights_changed_by_merge"]) == NUM_LAYERS * len(DEFAULT_TARGETS)
    assert result["unmerged_logits_vs_tp1"] < 1e-5 and result["merged_logits_vs_tp1"] < 1e-5
    assert result["merged_vs_unmerged_logits"] < 1e-5
    assert result["partition_plan_mismatch"] == []  # planned_partition_dim_with_lora agrees with the attributes
