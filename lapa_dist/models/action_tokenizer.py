"""Action tokenizer: continuous robot actions [..., D] <-> discrete action tokens [..., D].

Action finetuning (REFERENCE.md) discretises each action dimension into quantile bins holding equal
amounts of the finetuning data (256 bins), keeps the gripper binary, and decodes a token to the
mid-point of its bin's edges. OpenVLA instead uses 256 uniform bins over the 1st-99th percentile.

Bins. The edges of a dimension are order statistics of its N fitting values: edge i is the sorted
value at rank floor(i (N - 1) / num_bins), i = 0..num_bins, so the first edge is the fitted minimum,
the last the fitted maximum, and every bin [edge_j, edge_j+1) holds (N - 1) / num_bins fitting values
up to rounding. Edges are data values, so a value carrying more than 1/num_bins of the data repeats
as an edge; repeated edges are merged and the dimension gets fewer bins (a dimension with k distinct
values gets at most k bins; a constant one gets one). Bins are half-open except the last, which is
closed; when the maximum itself repeats, the merged edges end in [..., max, max], a zero-width top
bin of its own, so the largest value is not lumped with the one below it.

Decoding. A token decodes to the mid-point of its bin's edges; the edge bins use the fitted min/max
as their outer edge, whatever value was clipped into them.

Binary dimensions (the gripper). Two bins split at threshold = (low + high) / 2, encoding
value < threshold -> 0 and value >= threshold -> 1, decoding to exactly ``low`` or ``high``. By default
low/high are the minimum and maximum the fitting data holds for that dimension: datasets disagree on
the convention (0/1, -1/+1, open=1 or open=0), and the extremes are the commands the robot's controller
was recorded with, so the policy emits the same ones; the mid-point threshold is equidistant from
both states and snaps in-between values (e.g. a slowly closing gripper) to the nearer one. Pass
``binary_values`` to pin the pair (e.g. (-1, 1)) when the fitting data lacks one state or has outliers.

Token layout. One shared vocabulary of ``vocab_size = max(bin_counts)`` ids, as in OpenVLA: token i
of an action is always dimension i (``tokens_per_action = D``), so dimension d uses ids
0..bin_counts[d] - 1 and the action head needs max(bins) logits, not their sum. Ids a dimension does
not have are errors at decode; ``valid_token_mask`` gives the per-position mask for the logits.

Out-of-range values are clipped to the edge bins and counted per dimension (``out_of_range_counts``);
with ``strict=True`` encode raises instead. Nothing is ever replaced by a default action: NaN/inf
actions and token ids a dimension does not have raise ValueError naming the dimension.

The fitted state is a small JSON file (``save``/``load``), stored next to a checkpoint or in an
exported policy directory; floats are written with Python's shortest round-trip repr, so edges load
back bit-exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TOKENIZER_FILENAME = "action_tokenizer.json"
FORMAT_NAME = "lapa_dist.action_tokenizer"
FORMAT_VERSION = 1


def quantile_bin_edges(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-mass bin edges of one dimension: values [N] -> merged edges [bins + 1] float64."""
    sorted_values = np.sort(values)
    ranks = np.arange(num_bins + 1) * (len(sorted_values) - 1) // num_bins  # exact integer ranks
    raw_edges = sorted_values[ranks]  # [num_bins + 1], non-decreasing
    bin_edges = np.unique(raw_edges)
    if raw_edges[-2] == raw_edges[-1]:  # the maximum repeats: keep it as a closed zero-width top bin
        bin_edges = np.append(bin_edges, raw_edges[-1])
    return bin_edges


def _to_numpy(data: np.ndarray | torch.Tensor, name: str) -> tuple[np.ndarray, torch.device | None]:
    """A numpy view of ``data`` and the torch device to return results on (None for numpy input)."""
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.double()  # bfloat16/half have no (exact) numpy counterpart
        return tensor.numpy(), data.device
    if isinstance(data, np.ndarray):
        return data, None
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(data).__name__}")


def _like_input(array: np.ndarray, device: torch.device | None) -> np.ndarray | torch.Tensor:
    return array if device is None else torch.from_numpy(array).to(device)


def _check_bin_edges(label: str, edges: np.ndarray, binary: bool) -> None:
    """Raise ValueError unless ``edges`` [bins + 1] is a valid edge list for one dimension."""
    if edges.ndim != 1 or len(edges) < 2:
        raise ValueError(f"{label}: bin edges must be a list of at least 2 numbers, got shape {edges.shape}")
    if not np.isfinite(edges).all():
        raise ValueError(f"{label}: bin edges must be finite, got {edges[~np.isfinite(edges)][0]}")
    steps = np.diff(edges)
    if binary and (len(edges) != 3 or (steps <= 0).any()):
        raise ValueError(f"{label}: a binary dimension needs edges [low, threshold, high] increasing, got {edges}")
    # Strictly increasing, except a repeated last edge (zero-width top bin, or a constant dimension).
    if (steps < 0).any() or (steps[:-1] == 0).any():
        raise ValueError(f"{label}: bin edges must increase (only the last edge may repeat), got {edges}")


def _dim_label(dim: int, dim_names: Sequence[str] | None) -> str:
    """'dimension 3' or "dimension 3 ('yaw')" for error messages."""
    return f"dimension {dim}" if dim_names is None else f"dimension {dim} ({dim_names[dim]!r})"


def _check_dim_config(num_dims: int, binary_dims: Sequence[int], dim_names: Sequence[str] | None) -> None:
    if num_dims == 0:
        raise ValueError("an action needs at least one dimension, got none")
    if dim_names is not None and len(dim_names) != num_dims:
        raise ValueError(f"dim_names has {len(dim_names)} names for {num_dims} action dimensions")
    if any(not 0 <= dim < num_dims for dim in binary_dims) or len(set(binary_dims)) != len(binary_dims):
        raise ValueError(f"binary_dims {list(binary_dims)} must be distinct indices in 0..{num_dims - 1}")


def _check_last_dim(array: np.ndarray, num_dims: int, name: str) -> None:
    if array.ndim == 0 or array.shape[-1] != num_dims:
        raise ValueError(
            f"{name} must have shape [..., {num_dims}] (one per action dimension), got shape {tuple(array.shape)}"
        )


def _as_float_actions(array: np.ndarray, dim_names: Sequence[str] | None, name: str) -> np.ndarray:
    """Check a real dtype and finite values of ``array`` [..., D]; return it as float64 [..., D]."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    values = array.astype(np.float64)
    not_finite = ~np.isfinite(values).reshape(-1, values.shape[-1])  # [M, D]
    if not_finite.any():
        dim = int(np.flatnonzero(not_finite.any(axis=0))[0])
        bad = values[..., dim].reshape(-1)[not_finite[:, dim]][0]
        raise ValueError(f"{name} {_dim_label(dim, dim_names)} holds a non-finite value ({bad})")
    return values


def _binary_edges(values: np.ndarray, binary_values: tuple[float, float] | None, label: str) -> np.ndarray:
    """[low, threshold, high] of a binary dimension from its fitting values [N] or the given pair."""
    if binary_values is None:
        low, high = float(values.min()), float(values.max())
        if low == high:
            raise ValueError(
                f"binary {label} holds the single value {low} in the fitting data; pass binary_values=(low, high)"
            )
    else:
        low, high = (float(value) for value in binary_values)
        if not (np.isfinite([low, high]).all() and low < high):
            raise ValueError(f"binary_values must be finite (low, high) with low < high, got {binary_values}")
    return np.array([low, (low + high) / 2, high])


class ActionTokenizer:
    """Per-dimension quantile discretisation of actions [..., D] into tokens [..., D] (see module doc).

    Build with ``fit`` (from finetuning actions) or ``load`` (from a saved directory); the constructor
    takes already-fitted edges and validates them.
    """

    def __init__(
        self,
        bin_edges: Sequence[np.ndarray],
        binary_dims: Sequence[int] = (),
        dim_names: Sequence[str] | None = None,
        strict: bool = False,
    ):
        self.binary_dims = tuple(int(dim) for dim in binary_dims)
        self.dim_names = None if dim_names is None else tuple(str(name) for name in dim_names)
        self.strict = strict
        _check_dim_config(len(bin_edges), self.binary_dims, self.dim_names)
        self.bin_edges = tuple(np.array(edges, dtype=np.float64) for edges in bin_edges)  # [bins_d + 1] each
        for dim, edges in enumerate(self.bin_edges):
            _check_bin_edges(self.dim_label(dim), edges, dim in self.binary_dims)
            edges.setflags(write=False)
        num_dims = len(self.bin_edges)
        self.bin_counts = tuple(len(edges) - 1 for edges in self.bin_edges)
        self.bin_values = tuple(self._bin_values(dim) for dim in range(num_dims))  # what each bin decodes to
        self._range_low = np.array([edges[0] for edges in self.bin_edges])  # [D] fitted minimum
        self._range_high = np.array([edges[-1] for edges in self.bin_edges])  # [D] fitted maximum
        self._out_of_range_counts = np.zeros(num_dims, dtype=np.int64)  # [D]

    def _bin_values(self, dim: int) -> np.ndarray:
        """What each bin of ``dim`` decodes to: [bins_d] float32."""
        edges = self.bin_edges[dim]
        if dim in self.binary_dims:
            bin_values = edges[[0, 2]].astype(np.float32)  # [low, high]
        else:
            bin_values = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)  # bin mid-points
        bin_values.setflags(write=False)
        return bin_values

    @classmethod
    def fit(
        cls,
        actions: np.ndarray | torch.Tensor,
        num_bins: int = 256,
        binary_dims: Sequence[int] = (),
        binary_values: tuple[float, float] | None = None,
        dim_names: Sequence[str] | None = None,
        strict: bool = False,
    ) -> ActionTokenizer:
        """Fit bins to ``actions`` [N, D]: ``num_bins`` equal-mass bins per dimension (fewer where
        edges merge); ``binary_dims`` get two bins decoding to ``binary_values`` = (low, high), by
        default the dimension's fitted (min, max)."""
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        if binary_values is not None and not binary_dims:
            raise ValueError("binary_values was given but binary_dims is empty")
        array, _ = _to_numpy(actions, "actions")
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"fit needs actions of shape [N, D] with N, D >= 1, got shape {tuple(array.shape)}")
        binary_dims = tuple(int(dim) for dim in binary_dims)
        _check_dim_config(array.shape[1], binary_dims, dim_names)
        values = _as_float_actions(array, dim_names, "actions")  # [N, D] float64
        bin_edges = [
            _binary_edges(values[:, dim], binary_values, _dim_label(dim, dim_names))
            if dim in binary_dims
            else quantile_bin_edges(values[:, dim], num_bins)
            for dim in range(values.shape[1])
        ]
        return cls(bin_edges, binary_dims=binary_dims, dim_names=dim_names, strict=strict)

    @property
    def tokens_per_action(self) -> int:
        """D: one token per action dimension."""
        return len(self.bin_edges)

    @property
    def vocab_size(self) -> int:
        """Size of the shared token vocabulary: max(bin_counts)."""
        return max(self.bin_counts)

    @property
    def out_of_range_counts(self) -> np.ndarray:
        """[D] int64: values encoded since the last reset that lay outside the fitted range (clipped)."""
        return self._out_of_range_counts.copy()

    def reset_out_of_range_counts(self) -> None:
        self._out_of_range_counts[:] = 0

    def dim_label(self, dim: int) -> str:
        """'dimension 3' or "dimension 3 ('yaw')" for error messages."""
        return _dim_label(dim, self.dim_names)

    def valid_token_mask(self) -> torch.Tensor:
        """[D, vocab_size] bool: True where the id is a bin of that dimension (to mask the logits)."""
        ids = torch.arange(self.vocab_size)  # [vocab_size]
        return ids[None, :] < torch.tensor(self.bin_counts)[:, None]

    def encode(self, actions: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """actions [..., D] real -> tokens [..., D] int64, same kind (numpy/torch, device) as the input.

        Values outside the fitted [min, max] go to the edge bins and are counted per dimension;
        with ``strict`` they raise ValueError instead (and nothing is counted)."""
        array, device = _to_numpy(actions, "actions")
        _check_last_dim(array, self.tokens_per_action, "actions")
        values = _as_float_actions(array, self.dim_names, "actions")  # [..., D] float64
        outside = ((values < self._range_low) | (values > self._range_high)).reshape(-1, self.tokens_per_action)
        out_of_range = outside.sum(axis=0)  # [D]
        if self.strict and out_of_range.any():
            problems = [
                f"{self.dim_label(dim)}: {count} value(s) outside "
                f"[{self._range_low[dim]!r}, {self._range_high[dim]!r}]"
                for dim, count in enumerate(out_of_range)
                if count
            ]
            raise ValueError("actions outside the fitted range (strict mode): " + "; ".join(problems))
        self._out_of_range_counts += out_of_range
        tokens = np.empty(values.shape, dtype=np.int64)  # [..., D]
        for dim, edges in enumerate(self.bin_edges):
            # Inner edges only: below the minimum -> bin 0, above the maximum -> the last bin.
            tokens[..., dim] = np.searchsorted(edges[1:-1], values[..., dim], side="right")
        return _like_input(tokens, device)

    def decode(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """tokens [..., D] integer -> actions [..., D] float32, same kind (numpy/torch, device) as the input.

        A token id outside 0..bin_counts[d] - 1 raises ValueError naming the dimension and the id.
        The float32 result re-encodes to the same tokens when the edges are float32 numbers (fitted on
        float32 actions) and bins are wider than float32 spacing; float64 edges may round across."""
        token_ids, device = _to_numpy(tokens, "tokens")
        _check_last_dim(token_ids, self.tokens_per_action, "tokens")
        if token_ids.dtype == np.bool_ or not np.issubdtype(token_ids.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {token_ids.dtype}")
        actions = np.empty(token_ids.shape, dtype=np.float32)  # [..., D]
        for dim, bin_values in enumerate(self.bin_values):
            ids = token_ids[..., dim]
            invalid = (ids < 0) | (ids >= len(bin_values))
            if invalid.any():
                raise ValueError(
                    f"token id {int(ids[invalid].reshape(-1)[0])} is not a bin of {self.dim_label(dim)} "
                    f"(valid ids 0..{len(bin_values) - 1})"
                )
            actions[..., dim] = bin_values[ids]
        return _like_input(actions, device)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/action_tokenizer.json`` (creating the directory); returns the file path."""
        dims = [
            {
                "name": None if self.dim_names is None else self.dim_names[dim],
                "kind": "binary" if dim in self.binary_dims else "quantile",
                "num_bins": self.bin_counts[dim],
                "bin_edges": edges.tolist(),  # Python floats: json writes the shortest exact repr
            }
            for dim, edges in enumerate(self.bin_edges)
        ]
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": self.vocab_size, "dims": dims}
        path = Path(directory) / TOKENIZER_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_name(TOKENIZER_FILENAME + ".partial")
        partial_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        os.replace(partial_path, path)  # never leave a half-written file under the real name
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, strict: bool = False) -> ActionTokenizer:
        """Read ``directory/action_tokenizer.json`` written by ``save``."""
        path = Path(directory) / TOKENIZER_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no action tokenizer at {path} (expected a {TOKENIZER_FILENAME} from save)")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not an action tokenizer file (format is not {FORMAT_NAME!r})")
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has version {payload.get('version')!r}; this code reads version {FORMAT_VERSION}")
        try:
            dims = payload["dims"]
            bin_edges = [np.array(dim["bin_edges"], dtype=np.float64) for dim in dims]
            kinds = [dim["kind"] for dim in dims]
            if not set(kinds) <= {"binary", "quantile"}:
                raise ValueError(f"unknown dimension kind in {kinds} (expected 'binary' or 'quantile')")
            binary_dims = [index for index, kind in enumerate(kinds) if kind == "binary"]
            names = [dim["name"] for dim in dims]
            tokenizer = cls(
                bin_edges,
                binary_dims=binary_dims,
                dim_names=None if all(name is None for name in names) else names,
                strict=strict,
            )
            stored_counts = [dim["num_bins"] for dim in dims]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is corrupt: {error}") from error
        if stored_counts != list(tokenizer.bin_counts) or payload.get("vocab_size") != tokenizer.vocab_size:
            raise ValueError(f"{path} is corrupt: num_bins/vocab_size disagree with the stored bin edges")
        return tokenizer
