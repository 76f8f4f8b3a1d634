"""Hugging Face LLaMA checkpoints (config.json + *.safetensors, with or without an index) in and out.

Loading reads each tensor through safetensors' ``get_slice``, taking only this TP rank's slice, and copies
it straight into the model's parameter, so no rank ever holds a whole sharded weight nor a second copy of
the model. Our parameter names are HF's without the ``model.`` prefix, with ``self_attn`` -> ``attn``,
``input_layernorm`` -> ``attn_norm`` and ``post_attention_layernorm`` -> ``mlp_norm``; RoPE uses HF's pairing,
so no tensor is permuted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lapa_dist.models.llama import LlamaConfig
from lapa_dist.parallel.tensor_parallel import partition_dim

INDEX_FILE = "model.safetensors.index.json"
_LAYER_NAMES = {  # HF name inside model.layers.{i} -> ours inside layers.{i}
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
}
_TOP_NAMES = {"model.embed_tokens": "embed_tokens", "model.norm": "norm", "lm_head": "lm_head"}
_HF_LAYER_NAMES = {ours: hf for hf, ours in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {ours: hf for hf, ours in _TOP_NAMES.items()}
_SKIPPED = ("rotary_emb.inv_freq",)  # a buffer old transformers versions saved; we compute it


def from_hf_name(hf_name: str) -> str | None:
    """Our parameter name for an HF tensor name (None for tensors we do not keep)."""
    if hf_name.endswith(_SKIPPED):
        return None
    module, _, kind = hf_name.rpartition(".")
    parts = module.split(".", 3)
    if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{kind}"
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    raise ValueError(f"unexpected tensor {hf_name!r} in a LLaMA checkpoint")


def to_hf_name(name: str) -> str:
    module, _, kind = name.rpartition(".")
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"model.layers.{index}.{_HF_LAYER_NAMES[inner]}.{kind}"
    return f"{_HF_TOP_NAMES[module]}.{kind}"


def config_from_hf(path: str | Path) -> LlamaConfig:
    """Our LlamaConfig from an HF checkpoint's config.json (transformers 4.x or 5.x layout)."""
    hf = json.loads((Path(path) / "config.json").read_text())
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "model_type": (hf.get("model_type"), "llama"), "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False), "mlp_bias": (hf.get("mlp_bias", False), False),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "head_dim": (hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
                     hf["hidden_size"] // hf["num_attention_heads"]),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"{path}/config.json: {key} {value!r} is not supported (need {expected!r})")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rms_norm_eps=hf["rms_norm_eps"],
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def config_to_hf(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM (rope_theta in both the 4.x and 5.x places)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": config.init_std, "bos_token_id": 1, "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
    }


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors files")
    return files


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, path: str | Path, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy an HF checkpoint into ``model`` (plain, or parallelized over ``tp_size`` ranks), every tensor
    sliced for ``tp_rank`` as it is read. Every parameter must be covered; shapes must match."""
    params = dict(model.named_parameters())  # a tied LM head appears once, as embed_tokens.weight
    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as reader:
            for hf_name in reader.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = from_hf_name(hf_name)
                if name is None or (name == "lm_head.weight" and name not in params):
                    continue  # a tied checkpoint may still store the head
                if name not in params:
                    raise ValueError(f"{file.name}: {hf_name} has no parameter {name} in the model")
                params[name].copy_(_read_slice(reader.get_slice(hf_name), params[name], tp_rank, tp_size, hf_name))
                loaded.add(name)
    missing = sorted(params.keys() - loaded)
    if missing:
        raise ValueError(f"{path}: no tensors for {len(missing)} parameters, e.g. {missing[:3]}")


def _read_slice(tensor_slice, param: torch.Tensor, tp_rank: int, tp_size: int, hf_name: str) -> torch.Tensor:
    full_shape = list(tensor_slice.get_shape())
    dim = partition_dim(param)
    expected = list(param.shape)
    if dim is not None:
        expected[dim] *= tp_size
    if full_shape != expected:
        raise ValueError(f"{hf_name}: checkpoint shape {full_shape}, model expects {expected} (tp {tp_size})")
    if dim is None:
        return tensor_slice[:]
    size = param.shape[dim]
    span = slice(tp_rank * size, (tp_rank + 1) * size)
    return tensor_slice[span] if dim == 0 else tensor_slice[:, span]


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: LlamaConfig, path: str | Path,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a full (gathered) state dict of ours as an HF checkpoint: config.json, and one model.safetensors
    or, above ``max_shard_bytes``, numbered shards with model.safetensors.index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {to_hf_name(name): tensor.detach().contiguous() for name, tensor in state_dict.items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    dtype = next(iter(tensors.values())).dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    shards = _shards(tensors.items(), max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _shards(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
