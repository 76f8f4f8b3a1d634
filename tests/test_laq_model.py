"""LAQ model and NSVQ quantizer: shapes, the NSVQ formula, gradients, replacement, schedule, config."""

import json
from pathlib import Path

import pytest
import torch

from lapa_dist.config import ConfigError, build_config
from lapa_dist.models.attention import Attention, ContinuousPositionBias
from lapa_dist.models.laq import LAQ, GridReducer, LAQModelConfig, reducer_plan
from lapa_dist.models.nsvq import NSVQ, NSVQConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "laq"


def load(name: str, **changes) -> LAQModelConfig:
    tree = json.loads((CONFIGS / f"{name}.json").read_text())["model"]  # the model section of the run config
    return build_config(LAQModelConfig, {**tree, **changes}, name)


def tiny_model(seed: int = 0, **changes) -> LAQ:
    torch.manual_seed(seed)
    return LAQ(load("tiny", **changes))


def frames(batch: int = 4, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.rand(batch, 3, size, size, generator=generator)
    x_next = (x_t + 0.2 * torch.rand(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return x_t, x_next


def test_output_shapes():
    model = tiny_model()
    x_t, x_next = frames(batch=5)
    out = model(x_t, x_next)
    assert out.loss.shape == out.quantization_error.shape == out.copy_loss.shape == ()
    assert out.prediction.shape == (5, 3, 16, 16)
    assert out.code_indices.shape == (5, 4) and out.code_indices.dtype == torch.long
    assert out.code_counts.shape == (8,) and int(out.code_counts.sum()) == 5 * 4
    assert torch.equal(out.code_counts, torch.bincount(out.code_indices.flatten(), minlength=8))
    assert model.encode(x_t, x_next).shape == (5, 4)
    assert model.decode(x_t, out.code_indices).shape == (5, 3, 16, 16)
    assert torch.allclose(out.copy_loss, ((x_t - x_next) ** 2).mean())


def test_nsvq_training_output_is_the_noise_substitution_formula():
    config = NSVQConfig(eps=1e-3)
    nsvq = NSVQ(codebook_size=8, quant_dim=6, config=config).train()
    z = torch.randn(3, 4, 6)
    torch.manual_seed(123)
    out = nsvq(z)
    torch.manual_seed(123)
    r = torch.randn_like(z)
    expected_indices = torch.cdist(z, nsvq.codebook.detach()[None].expand(3, -1, -1)).argmin(-1)
    assert torch.equal(out.code_indices, expected_indices)
    q = nsvq.codebook.detach()[expected_indices]
    scale = (z - q).norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True) + config.eps
    assert torch.allclose(out.quantized, z + scale * r, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out.quantization_error, (z - q).norm(dim=-1).mean())


def test_nsvq_eval_returns_hard_codes_and_does_not_count():
    nsvq = NSVQ(codebook_size=8, quant_dim=6, config=NSVQConfig()).eval()
    z = torch.randn(3, 4, 6)
    out = nsvq(z)
    assert torch.equal(out.quantized, nsvq.codebook.detach()[out.code_indices])
    assert torch.equal(nsvq(z).quantized, out.quantized)
    assert int(nsvq.usage.sum()) == 0


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_nsvq_hard_code_fraction_gives_detached_exact_codes(fraction):
    config = NSVQConfig(eps=1e-3, hard_code_fraction=fraction)
    nsvq = NSVQ(codebook_size=8, quant_dim=6, config=config).train()
    z = torch.randn(64, 4, 6, requires_grad=True)
    torch.manual_seed(7)
    out = nsvq(z)
    q = nsvq.codebook.detach()[out.code_indices]
    hard = torch.isclose(out.quantized, q, atol=1e-6).all(-1)  # [64, 4]
    # one decision per sample: all of its vectors are exact codes, or none is
    assert torch.equal(hard.all(-1), hard.any(-1))
    hard_samples = hard.all(-1)
    weights = torch.randn_like(z)
    if fraction == 1.0:  # nothing left to train the encoder or the codebook
        (out.quantized * weights).sum().backward()
        assert hard_samples.all() and not z.grad.any() and not nsvq.codebook.grad.any()
        return
    assert 16 < int(hard_samples.sum()) < 48  # ~Binomial(64, 0.5)
    reference = NSVQ(codebook_size=8, quant_dim=6, config=NSVQConfig(eps=1e-3)).train()
    reference.codebook.data.copy_(nsvq.codebook.data)
    torch.manual_seed(7)  # the same noise r, drawn before the hard/noisy choice
    noisy = reference(z)
    assert torch.allclose(out.quantized[~hard_samples], noisy.quantized[~hard_samples])
    # gradients come from the noisy samples alone: z's as in the reference, none to the hard samples' z
    (out.quantized * weights).sum().backward()
    assert not z.grad[hard_samples].any()
    noisy_only = torch.where(hard_samples[:, None, None], 0.0, weights)
    z_reference = z.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    (reference(z_reference).quantized * noisy_only).sum().backward()
    assert torch.allclose(z.grad, z_reference.grad)
    assert torch.allclose(nsvq.codebook.grad, reference.codebook.grad)


def test_usage_buffer_counts_every_use_of_every_training_forward():
    nsvq = NSVQ(codebook_size=8, quant_dim=6, config=NSVQConfig()).train()
    expected = torch.zeros(8, dtype=torch.long)
    for _ in range(3):
        out = nsvq(torch.randn(5, 4, 6))
        expected += torch.bincount(out.code_indices.flatten(), minlength=8)
    assert torch.equal(nsvq.usage, expected) and int(nsvq.usage.sum()) == 3 * 5 * 4
    assert "usage" in nsvq.state_dict()


def test_gradients_reach_encoder_and_codebook():
    model = tiny_model().train()
    model(*frames()).loss.backward()
    for name in ["patch_embed.net.1.weight", "spatial.blocks.0.self_attn.to_kv.weight", "position_bias.mlp.0.weight",
                 "temporal.blocks.0.ff.proj_in.weight", "to_quant.weight", "reducer.convs.0.weight",
                 "quantizer.codebook", "from_quant.weight", "decoder.blocks.0.cross_attn.null_kv"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_eval_forward_is_deterministic_and_matches_encode_decode():
    model = tiny_model().eval()
    x_t, x_next = frames()
    first, second = model(x_t, x_next), model(x_t, x_next)
    assert torch.equal(first.prediction, second.prediction)
    codes = model.encode(x_t, x_next)
    assert torch.equal(codes, first.code_indices)
    assert torch.allclose(model.decode(x_t, codes), first.prediction, atol=1e-6)
    assert int(model.quantizer.usage.sum()) == 0


def test_decoder_reads_codes_in_order():
    model = tiny_model().eval()
    x_t, _ = frames(batch=1)
    codes = torch.tensor([[0, 1, 2, 3]])
    assert not torch.allclose(model.decode(x_t, codes), model.decode(x_t, codes.flip(1)))


def test_imagine_rolls_out_closed_loop():
    model = tiny_model().eval()
    x_t, _ = frames(batch=2)
    codes = torch.randint(0, 8, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rollout = model.imagine(x_t, codes)
        first = model.decode(x_t, codes[:, 0]).clamp(0, 1)
        second = model.decode(first, codes[:, 1]).clamp(0, 1)
    assert rollout.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(rollout[:, 0], first, atol=1e-6) and torch.allclose(rollout[:, 1], second, atol=1e-6)


def test_predict_residual_starts_at_the_copy_baseline_and_learns():
    model = tiny_model(predict_residual=True).train()
    x_t, x_next = frames()
    out = model(x_t, x_next)
    assert torch.equal(out.prediction, x_t) and torch.allclose(out.loss, out.copy_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        optimizer.zero_grad()
        model(x_t, x_next).loss.backward()
        optimizer.step()
    assert model(x_t, x_next).loss < 0.9 * out.copy_loss


def test_adam_steps_lower_the_loss():
    model = tiny_model().train()
    x_t, x_next = frames(batch=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(x_t, x_next).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_replacement_revives_dead_codes_with_near_copies_of_used_ones():
    torch.manual_seed(0)
    nsvq = NSVQ(codebook_size=8, quant_dim=4, config=NSVQConfig(replace_threshold=0.05, replace_noise=0.01))
    before = nsvq.codebook.detach().clone()
    counts = torch.tensor([500, 300, 0, 0, 100, 10, 0, 90])  # shares .5 .3 0 0 .1 .01 0 .09
    new_codebook, replaced = nsvq.replacement(counts, torch.Generator().manual_seed(7))
    assert replaced.tolist() == [False, False, True, True, False, True, True, False]
    assert torch.equal(nsvq.codebook.detach(), before), "replacement must not modify the module"
    assert torch.equal(new_codebook[~replaced], before[~replaced])
    live = before[~replaced]  # [4, 4]
    for code in new_codebook[replaced]:
        distances = (live - code).norm(dim=-1)
        assert distances.min() < 0.1 and distances.min() > 0, "a near-copy (with noise) of a live code"
    nsvq.install_codebook(new_codebook)
    assert torch.equal(nsvq.codebook.detach(), new_codebook) and int(nsvq.usage.sum()) == 0


def test_replacement_is_a_function_of_the_generator_state():
    nsvq = NSVQ(codebook_size=8, quant_dim=4, config=NSVQConfig())
    counts = torch.tensor([90, 0, 0, 0, 10, 0, 0, 0])
    a = nsvq.replacement(counts, torch.Generator().manual_seed(3))
    torch.manual_seed(999)  # the global RNG must not matter
    b = nsvq.replacement(counts, torch.Generator().manual_seed(3))
    c = nsvq.replacement(counts, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_replacement_without_counts_changes_nothing():
    nsvq = NSVQ(codebook_size=8, quant_dim=4, config=NSVQConfig())
    new_codebook, replaced = nsvq.replacement(torch.zeros(8, dtype=torch.long), torch.Generator())
    assert torch.equal(new_codebook, nsvq.codebook.detach()) and not replaced.any()


def test_usage_metrics():
    uniform = NSVQ.usage_metrics(torch.full((8,), 5))
    assert torch.isclose(uniform["perplexity"], torch.tensor(8.0, dtype=torch.float64))
    collapsed = NSVQ.usage_metrics(torch.tensor([0, 0, 40, 0, 0, 0, 0, 0]), prefix="batch_")
    assert torch.isclose(collapsed["batch_perplexity"], torch.tensor(1.0, dtype=torch.float64))
    assert int(collapsed["batch_codes_used"]) == 1 and collapsed["batch_usage_fraction"][2] == 1
    two = NSVQ.usage_metrics(torch.tensor([30, 0, 10, 0]))
    expected = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert torch.isclose(two["perplexity"], torch.exp(-(expected * expected.log()).sum()))


def test_replacement_schedule():
    config = NSVQConfig()
    due = [s for s in range(12001) if config.replacement_due(s)]
    assert due[:10] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert 150 not in due and 900 in due and 1000 in due and 1100 not in due and 4500 in due
    assert 5000 in due and 5500 not in due and due[-3:] == [10000, 11000, 12000]
    assert NSVQ(8, 4, config).replacement_due(4500) and not NSVQ(8, 4, config).replacement_due(4501)
    reference = NSVQConfig(replace_schedule=[(100, 10), (1000, 100), (5000, 500)])
    assert reference.replacement_due(4500) and not any(reference.replacement_due(s) for s in range(5000, 20000))
    with pytest.raises(ConfigError, match="replace_schedule"):
        build_config(NSVQConfig, {"replace_schedule": [[1000, 100], [100, 10]]})


def test_position_bias_is_computed_once_per_forward_and_depends_on_offset_only():
    model = tiny_model(spatial_depth=2, decoder_depth=2)
    calls = []
    model.position_bias.register_forward_hook(lambda *args: calls.append(1))
    model(*frames())
    assert len(calls) == 1
    bias = ContinuousPositionBias(dim=8, heads=2, grid=(3, 4))()  # [2, 12, 12]
    assert bias.shape == (2, 12, 12)
    # (0,0)->(1,1) and (1,2)->(2,3) have the same offset; (0,0)->(1,2) does not
    assert torch.equal(bias[:, 0, 5], bias[:, 6, 11]) and not torch.equal(bias[:, 0, 5], bias[:, 0, 6])


def test_temporal_transformer_sees_both_frames_of_one_patch():
    model = tiny_model()
    seen = {}
    model.spatial.register_forward_hook(lambda module, args, output: seen.update(spatial=output))
    model.temporal.register_forward_pre_hook(lambda module, args: seen.update(temporal=args[0]))
    batch = 3
    model(*frames(batch=batch))
    spatial, temporal = seen["spatial"], seen["temporal"]  # [2B, N, D] frame-major, [(B N), 2, D]
    patches = spatial.shape[1]
    for b, patch, frame in [(0, 0, 0), (2, 5, 1), (1, patches - 1, 0)]:
        assert torch.equal(temporal[b * patches + patch, frame], spatial[frame * batch + b, patch])


def test_self_attention_keys_and_values_come_from_the_normalised_input():
    torch.manual_seed(0)
    attention = Attention(dim=16, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)
    # LayerNorm removes the input's offset and scale; the output does not see them only if q, k and v all use it
    assert torch.allclose(attention(x), attention(10 * x + 3), atol=1e-4)
    assert attention.scale.shape == (2, 1, 1) and torch.all(attention.scale == 8)


@pytest.mark.parametrize("grid, code_side", [(8, 2), (16, 2), (4, 2), (2, 2), (8, 1), (12, 3)])
def test_grid_reducer_reaches_the_code_grid(grid, code_side):
    reducer = GridReducer(quant_dim=5, grid=grid, code_side=code_side)
    assert reducer(torch.randn(2, grid * grid, 5)).shape == (2, code_side**2, 5)


def test_reference_reducer_is_one_strided_and_one_unpadded_conv():
    assert reducer_plan(8, 2) == (1, 0)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"image_size": 18}, "patch_size"),
        ({"code_seq_len": 3}, "code_seq_len"),
        ({"image_size": 20, "patch_size": 4, "code_seq_len": 16}, "code_seq_len"),
        ({"nsvq": {"replace_threshold": 0.2}}, "nsvq"),
        ({"nsvq": {"hard_code_fraction": 1.5}}, "nsvq.hard_code_fraction"),
        ({"codebook_size": 64}, "nsvq"),
        ({"heads": 0}, "heads"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError) as error:
        load("tiny", **changes)
    assert f"\n{field}" in str(error.value), str(error.value)
    if "dropout" not in changes:  # also when the checked field keeps its default
        with pytest.raises(ConfigError, match=f"\n{field}"):
            build_config(LAQModelConfig, changes)


def test_json_configs():
    assert load("paper") == LAQModelConfig(), "the paper config is the defaults"
    with torch.device("meta"):
        paper = sum(p.numel() for p in LAQ(load("paper")).parameters())
        metaworld = sum(p.numel() for p in LAQ(load("metaworld")).parameters())
    assert 330e6 < paper < 360e6, paper  # reference: about 344M
    assert metaworld < 2e6 and load("metaworld").image_size == 64
