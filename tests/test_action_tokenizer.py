"""ActionTokenizer: equal-mass quantile bins, merging, binary dims, clipping, errors, save/load, numpy/torch."""

import json
import math

import numpy as np
import pytest
import torch

from lapa_dist.models.action_tokenizer import (
    TOKENIZER_FILENAME,
    ActionTokenizer,
    quantile_bin_edges,
)

NUM_SAMPLES = 5000
SEEDS = range(4)


def continuous_actions(rng: np.random.Generator, num_samples: int = NUM_SAMPLES) -> np.ndarray:
    """[N, 5]: normal, uniform, Cauchy (heavy tails), Student-t with 1.5 dof, log-normal (skewed)."""
    return np.stack(
        [
            rng.normal(0.0, 0.02, num_samples),
            rng.uniform(-1.0, 1.0, num_samples),
            rng.standard_cauchy(num_samples),
            rng.standard_t(1.5, num_samples),
            rng.lognormal(0.0, 2.0, num_samples),
        ],
        axis=1,
    )


def robot_actions(rng: np.random.Generator, num_samples: int = NUM_SAMPLES) -> np.ndarray:
    """[N, 7] float32 (as datasets store actions), like a 7-DoF delta end-effector action:
    continuous, mostly-zero, 3-valued, constant, gripper."""
    continuous = continuous_actions(rng, num_samples)[:, :3]
    mostly_zero = np.where(rng.random(num_samples) < 0.4, 0.0, rng.normal(0, 0.1, num_samples))
    three_values = rng.choice([-0.5, 0.0, 0.75], num_samples, p=[0.2, 0.5, 0.3])
    constant = np.full(num_samples, 0.125)
    gripper = rng.integers(0, 2, num_samples).astype(np.float64)
    return np.column_stack([continuous, mostly_zero, three_values, constant, gripper]).astype(np.float32)


NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def fit_robot(rng: np.random.Generator, **kwargs) -> tuple[ActionTokenizer, np.ndarray]:
    actions = robot_actions(rng)
    return ActionTokenizer.fit(actions, binary_dims=[6], dim_names=NAMES, **kwargs), actions


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_bins", [256, 100, 7])
def test_bins_hold_equal_mass(seed, num_bins):
    # Edges are order statistics at ranks floor(i (N-1) / B), so with distinct values bin j holds
    # rank(j+1) - rank(j) in {floor((N-1)/B), ceil((N-1)/B)} samples, the closed last bin one more:
    # the tolerance is exact rounding, not a statistical allowance, for every distribution.
    actions = continuous_actions(np.random.default_rng(seed))
    tokenizer = ActionTokenizer.fit(actions, num_bins=num_bins)
    assert tokenizer.bin_counts == (num_bins,) * 5
    assert tokenizer.vocab_size == num_bins and tokenizer.tokens_per_action == 5
    tokens = tokenizer.encode(actions)
    per_bin = (NUM_SAMPLES - 1) / num_bins
    for dim in range(5):
        counts = np.bincount(tokens[:, dim], minlength=num_bins)
        assert len(counts) == num_bins
        assert counts.min() >= math.floor(per_bin), (dim, counts.min())
        assert counts.max() <= math.ceil(per_bin) + 1, (dim, counts.max())
        assert tokenizer.bin_edges[dim][0] == actions[:, dim].min()
        assert tokenizer.bin_edges[dim][-1] == actions[:, dim].max()
    assert (tokenizer.out_of_range_counts == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_reconstruction_within_one_bin_width(seed):
    rng = np.random.default_rng(seed)
    tokenizer, actions = fit_robot(rng)
    fresh = rng.uniform(actions.min(axis=0), actions.max(axis=0), size=(2000, 7))  # in range, off the data
    for values in (actions, fresh):
        tokens = tokenizer.encode(values)
        decoded = tokenizer.decode(tokens)
        assert decoded.dtype == np.float32
        error = np.abs(decoded.astype(np.float64) - values)  # [M, 7], in float64
        for dim in range(6):  # quantile dims; the gripper decodes to its two states (tested below)
            edges = tokenizer.bin_edges[dim]
            lower, upper = edges[tokens[:, dim]], edges[tokens[:, dim] + 1]
            assert ((lower <= values[:, dim]) & (values[:, dim] <= upper)).all()  # the token's bin holds x
            # The mid-point is within half a width; float32 output adds at most one rounding step.
            rounding = np.abs(decoded[:, dim]) * np.finfo(np.float32).eps
            assert (error[:, dim] <= (upper - lower) / 2 + rounding).all()
        # Decoding lands in the same bin: encode(decode(encode(x))) == encode(x) (float32 edges).
        assert np.array_equal(tokenizer.encode(decoded), tokens)


def test_duplicate_edges_merged():
    tokenizer, actions = fit_robot(np.random.default_rng(0))
    mostly_zero, three_values = 3, 4
    for dim in range(6):
        assert (np.diff(tokenizer.bin_edges[dim])[:-1] > 0).all()  # merged: only the last edge may repeat
    # 40% zeros take ~40% of the 256 quantile edges, which merge into one.
    assert 150 < tokenizer.bin_counts[mostly_zero] < 170
    # Three distinct values get (at most) three bins, each value its own.
    assert tokenizer.bin_counts[three_values] == 3
    values = np.array([-0.5, 0.0, 0.75])
    batch = np.tile(actions[:1], (3, 1))
    batch[:, three_values] = values
    tokens = tokenizer.encode(batch)[:, three_values]
    assert list(tokens) == [0, 1, 2]
    decoded = tokenizer.decode(tokenizer.encode(batch))
    assert np.array_equal(tokenizer.encode(decoded)[:, three_values], tokens)
    assert decoded[2, three_values] == 0.75  # the repeated maximum has its zero-width top bin
    assert tokenizer.vocab_size == 256


@pytest.mark.parametrize("seed", SEEDS)
def test_few_distinct_values_give_at_most_that_many_bins(seed):
    rng = np.random.default_rng(seed)
    for distinct in (1, 2, 3, 10, 40):
        support = np.sort(rng.normal(size=distinct).astype(np.float32))
        values = rng.choice(support, NUM_SAMPLES, p=rng.dirichlet(np.ones(distinct)))
        edges = quantile_bin_edges(values, 256)
        assert 1 <= len(edges) - 1 <= distinct
        tokens = np.searchsorted(edges[1:-1], support, side="right")
        tokenizer = ActionTokenizer([edges])
        assert np.array_equal(tokenizer.encode(tokenizer.decode(tokens[:, None]))[:, 0], tokens)


def test_constant_dimension_is_one_bin():
    tokenizer, actions = fit_robot(np.random.default_rng(0))
    constant = 5
    assert tokenizer.bin_counts[constant] == 1
    assert list(tokenizer.bin_edges[constant]) == [0.125, 0.125]
    tokens = tokenizer.encode(actions)
    assert (tokens[:, constant] == 0).all()
    assert (tokenizer.decode(tokens)[:, constant] == 0.125).all()
    assert (tokenizer.out_of_range_counts == 0).all()
    off = actions[:2].copy()
    off[:, constant] = [0.0, 1.0]
    assert list(tokenizer.encode(off)[:, constant]) == [0, 0]
    assert tokenizer.out_of_range_counts[constant] == 2


def test_out_of_range_clipped_and_counted():
    tokenizer, actions = fit_robot(np.random.default_rng(1))
    low, high = actions.min(axis=0), actions.max(axis=0)
    batch = np.tile(actions[:1], (4, 1))
    batch[0, 0] = low[0] - 1.0
    batch[1, 0] = np.nextafter(high[0], np.float32(np.inf))  # the next float32 above the maximum
    batch[2, 1] = high[1] * 10
    batch[3, 6] = 2.0  # gripper above its fitted high
    tokens = tokenizer.encode(batch)
    assert tokens[0, 0] == 0 and tokens[1, 0] == tokenizer.bin_counts[0] - 1
    assert tokens[2, 1] == tokenizer.bin_counts[1] - 1 and tokens[3, 6] == 1
    assert list(tokenizer.out_of_range_counts) == [2, 1, 0, 0, 0, 0, 1]
    edge_values = tokenizer.decode(tokens[:2])[:, 0]  # edge bins decode from the fitted min/max
    assert edge_values[0] == np.float32((low[0] + tokenizer.bin_edges[0][1]) / 2)
    assert edge_values[1] == np.float32((tokenizer.bin_edges[0][-2] + high[0]) / 2)
    tokenizer.encode(batch[:1])
    assert list(tokenizer.out_of_range_counts) == [3, 1, 0, 0, 0, 0, 1]  # counts accumulate
    counts = tokenizer.out_of_range_counts
    counts[:] = 99  # a copy: the tokenizer's counters are unaffected
    assert tokenizer.out_of_range_counts[0] == 3
    tokenizer.reset_out_of_range_counts()
    assert (tokenizer.out_of_range_counts == 0).all()
    tokenizer.encode(np.stack([low, high]))  # the fitted extremes themselves are in range
    assert (tokenizer.out_of_range_counts == 0).all()


def test_strict_mode_raises_on_out_of_range():
    tokenizer, actions = fit_robot(np.random.default_rng(2), strict=True)
    tokenizer.encode(actions)  # in range: fine
    batch = actions[:3].copy()
    batch[1, 2] = actions[:, 2].max() + 1.0
    with pytest.raises(ValueError, match=r"dimension 2 \('z'\): 1 value\(s\) outside"):
        tokenizer.encode(batch)
    assert (tokenizer.out_of_range_counts == 0).all()
    tokenizer.strict = False
    tokenizer.encode(batch)
    assert tokenizer.out_of_range_counts[2] == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_actions_raise(bad):
    tokenizer, actions = fit_robot(np.random.default_rng(3))
    batch = actions[:4].copy()
    batch[2, 3] = bad
    with pytest.raises(ValueError, match=r"dimension 3 \('roll'\) holds a non-finite value"):
        tokenizer.encode(batch)
    with pytest.raises(ValueError, match="dimension 3 holds a non-finite value"):
        ActionTokenizer.fit(batch)
    assert (tokenizer.out_of_range_counts == 0).all()


def test_bad_tokens_raise():
    tokenizer, actions = fit_robot(np.random.default_rng(4))
    tokens = tokenizer.encode(actions[:5])
    for dim, bad_id in [(0, -1), (0, 256), (4, 3), (5, 1), (6, 2)]:  # (4, 3): < vocab_size, not a bin of dim 4
        corrupted = tokens.copy()
        corrupted[3, dim] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id} is not a bin of dimension {dim} \('{NAMES[dim]}'\)"):
            tokenizer.decode(corrupted)
    with pytest.raises(ValueError, match="tokens must be integer ids"):
        tokenizer.decode(tokens.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 7\]"):
        tokenizer.decode(tokens[:, :6])
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        tokenizer.decode(tokens.tolist())


def test_valid_token_mask_matches_bin_counts():
    tokenizer, _ = fit_robot(np.random.default_rng(5))
    mask = tokenizer.valid_token_mask()
    assert mask.shape == (7, tokenizer.vocab_size) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == list(tokenizer.bin_counts)
    for dim, count in enumerate(tokenizer.bin_counts):
        assert mask[dim, :count].all()
        last_valid = np.zeros((1, 7), dtype=np.int64)
        last_valid[0, dim] = count - 1
        tokenizer.decode(last_valid)


def test_binary_gripper():
    rng = np.random.default_rng(6)
    tokenizer, actions = fit_robot(rng)
    gripper = 6
    assert tokenizer.bin_counts[gripper] == 2
    assert list(tokenizer.bin_edges[gripper]) == [0.0, 0.5, 1.0]  # threshold: mid-point of the two states
    batch = np.tile(actions[:1], (5, 1))
    batch[:, gripper] = [0.0, 0.49, 0.5, 0.9, 1.0]
    tokens = tokenizer.encode(batch)
    assert list(tokens[:, gripper]) == [0, 0, 1, 1, 1]
    assert list(tokenizer.decode(tokens)[:, gripper]) == [0.0, 0.0, 1.0, 1.0, 1.0]  # the states, not mid-points
    # Pinned states, e.g. -1/+1: the threshold moves to 0.
    signed = actions.copy()
    signed[:, gripper] = 2 * actions[:, gripper] - 1
    pinned = ActionTokenizer.fit(signed, binary_dims=[gripper], binary_values=(-1, 1))
    batch[:, gripper] = [-1.0, -0.1, 0.0, 0.3, 1.0]
    tokens = pinned.encode(batch)
    assert list(tokens[:, gripper]) == [0, 0, 1, 1, 1]
    assert list(pinned.decode(tokens)[:, gripper]) == [-1.0, -1.0, 1.0, 1.0, 1.0]
    single_state = actions.copy()
    single_state[:, gripper] = 1.0
    with pytest.raises(ValueError, match=r"binary dimension 6 \('gripper'\) holds the single value 1.0"):
        ActionTokenizer.fit(single_state, binary_dims=[6], dim_names=NAMES)
    assert ActionTokenizer.fit(single_state, binary_dims=[6], binary_values=(0, 1)).bin_counts[6] == 2
    with pytest.raises(ValueError, match="binary_values must be finite"):
        ActionTokenizer.fit(actions, binary_dims=[6], binary_values=(1, 0))
    with pytest.raises(ValueError, match="binary_dims is empty"):
        ActionTokenizer.fit(actions, binary_values=(0, 1))


def test_save_load_round_trip_is_exact(tmp_path):
    tokenizer, actions = fit_robot(np.random.default_rng(7))
    path = tokenizer.save(tmp_path / "export" / "policy")
    assert path.name == TOKENIZER_FILENAME
    payload = json.loads(path.read_text())
    assert payload["version"] == 1 and payload["vocab_size"] == 256
    assert [dim["name"] for dim in payload["dims"]] == NAMES
    assert [dim["kind"] for dim in payload["dims"]] == ["quantile"] * 6 + ["binary"]
    assert [dim["num_bins"] for dim in payload["dims"]] == list(tokenizer.bin_counts)
    loaded = ActionTokenizer.load(path.parent)
    assert loaded.bin_counts == tokenizer.bin_counts and loaded.binary_dims == (6,)
    assert loaded.dim_names == tuple(NAMES) and loaded.vocab_size == tokenizer.vocab_size
    for saved_edges, loaded_edges in zip(tokenizer.bin_edges, loaded.bin_edges):
        assert saved_edges.tobytes() == loaded_edges.tobytes()  # bit-exact
    probe = robot_actions(np.random.default_rng(8), 3000)
    assert np.array_equal(loaded.encode(probe), tokenizer.encode(probe))
    tokens = tokenizer.encode(actions)
    assert np.array_equal(loaded.decode(tokens), tokenizer.decode(tokens))
    # float64 edges (heavy tails, values no float32 holds) survive the JSON text bit-exact too.
    float64_tokenizer = ActionTokenizer.fit(continuous_actions(np.random.default_rng(8)))
    reloaded = ActionTokenizer.load(float64_tokenizer.save(tmp_path / "float64").parent)
    assert reloaded.dim_names is None
    for saved_edges, loaded_edges in zip(float64_tokenizer.bin_edges, reloaded.bin_edges):
        assert saved_edges.tobytes() == loaded_edges.tobytes()
    assert not list(path.parent.glob("*.partial"))


def corrupt(path, edit):
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


def test_load_errors(tmp_path):
    tokenizer, _ = fit_robot(np.random.default_rng(9))
    with pytest.raises(FileNotFoundError, match="no action tokenizer at"):
        ActionTokenizer.load(tmp_path / "missing")
    path = tokenizer.save(tmp_path)
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ValueError, match="is not valid JSON"):
        ActionTokenizer.load(tmp_path)
    edits = {
        "version 2; this code reads version 1": lambda p: p.update(version=2),
        "not an action tokenizer file": lambda p: p.update(format="something else"),
        r"dimension 1 \('y'\): bin edges must increase": lambda p: p["dims"][1]["bin_edges"].reverse(),
        "corrupt: .*must be finite": lambda p: p["dims"][0]["bin_edges"].__setitem__(3, 1e400),
        "corrupt: 'bin_edges'": lambda p: p["dims"][2].pop("bin_edges"),
        "corrupt: num_bins/vocab_size disagree": lambda p: p["dims"][2].update(num_bins=3),
        "corrupt: .*unknown dimension kind": lambda p: p["dims"][2].update(kind="uniform"),
        "corrupt: .*binary dimension needs edges": lambda p: p["dims"][6]["bin_edges"].append(2.0),
    }
    for message, edit in edits.items():
        tokenizer.save(tmp_path)
        corrupt(path, edit)
        with pytest.raises(ValueError, match=message):
            ActionTokenizer.load(tmp_path)


@pytest.mark.parametrize("leading", [(), (3,), (2, 3, 4), (0,), (1, 1)])
def test_arbitrary_leading_dims(leading):
    rng = np.random.default_rng(10)
    tokenizer, _ = fit_robot(rng)
    flat = robot_actions(rng, int(np.prod(leading, dtype=np.int64)))  # [M, 7]
    batch = flat.reshape(*leading, 7)
    tokens = tokenizer.encode(batch)
    assert tokens.shape == (*leading, 7) and tokens.dtype == np.int64
    assert np.array_equal(tokens.reshape(-1, 7), tokenizer.encode(flat))
    decoded = tokenizer.decode(tokens)
    assert decoded.shape == (*leading, 7) and decoded.dtype == np.float32
    assert np.array_equal(decoded.reshape(-1, 7), tokenizer.decode(tokens.reshape(-1, 7)))
    with pytest.raises(ValueError, match=r"actions must have shape \[\.\.\., 7\]"):
        tokenizer.encode(np.zeros((*leading, 6)))


def test_torch_and_numpy_in_and_out():
    rng = np.random.default_rng(11)
    actions = robot_actions(rng)
    from_numpy = ActionTokenizer.fit(actions, binary_dims=[6])
    from_torch = ActionTokenizer.fit(torch.from_numpy(actions), binary_dims=[6])
    assert all(np.array_equal(a, b) for a, b in zip(from_numpy.bin_edges, from_torch.bin_edges))
    probe = actions[:64].astype(np.float32).reshape(4, 16, 7)
    numpy_tokens = from_numpy.encode(probe)
    torch_tokens = from_numpy.encode(torch.from_numpy(probe))
    assert isinstance(numpy_tokens, np.ndarray) and isinstance(torch_tokens, torch.Tensor)
    assert torch_tokens.dtype == torch.int64 and torch_tokens.shape == (4, 16, 7)
    assert np.array_equal(torch_tokens.numpy(), numpy_tokens)
    decoded = from_numpy.decode(torch_tokens)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32
    assert np.array_equal(decoded.numpy(), from_numpy.decode(numpy_tokens))
    assert from_numpy.encode(torch.from_numpy(probe).bfloat16()).dtype == torch.int64  # no numpy bfloat16
    assert from_numpy.decode(torch_tokens.int()).dtype == torch.float32  # int32 ids work too


def test_fit_rejects_bad_arguments():
    actions = robot_actions(np.random.default_rng(12), 100)
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        ActionTokenizer.fit(actions[:, 0])
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        ActionTokenizer.fit(actions[:0])
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        ActionTokenizer.fit(actions, num_bins=0)
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        ActionTokenizer.fit(actions, num_bins=2.5)
    with pytest.raises(ValueError, match=r"binary_dims \[7\] must be distinct indices in 0..6"):
        ActionTokenizer.fit(actions, binary_dims=[7])
    with pytest.raises(ValueError, match="dim_names has 2 names for 7"):
        ActionTokenizer.fit(actions, dim_names=["x", "y"])
    with pytest.raises(ValueError, match="must be real numbers"):
        ActionTokenizer.fit(actions.astype(np.complex128))
