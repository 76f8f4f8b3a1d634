"""Convert LWM's released JAX checkpoints (HF LargeWorldModel/LWM-Chat-1M-Jax: ``params``, ``vqgan``) to PyTorch.

No jax or flax is needed: the files are read with msgpack, numpy and torch alone.

**Reading** (``iter_flax_params``) accepts three layouts, told apart by the first byte:

  * tux/EasyLM ``StreamingCheckpointer`` files (the 13.6 GB ``params``): concatenated msgpack records
    ``[key path as an array of str, bytes]`` with no header or index, the bytes being flax ``to_bytes(array)``.
    They are streamed one record at a time: memory holds a few copies of one leaf (the largest, w1/w2/w3 of
    LWM-7B, is 2.9 GB in bf16; peak ~15 GB, estimated), never the whole model.
  * a whole tree written by flax ``to_bytes`` (one msgpack map);
  * a pickle of the (nested) params dict, as LWM's ``vqgan`` file is. It is read by a restricted unpickler
    that accepts only dicts, flax FrozenDicts, numpy arrays and jax Arrays (rebuilt as numpy), never code.

flax's msgpack encoding (flax/serialization.py): an array is msgpack ExtType 1 whose payload is the msgpack
of ``[shape, dtype name, C-order bytes]``; ExtType 2 is a Python complex ``[real, imag]``; ExtType 3 a numpy
scalar (payload as for an array, 0-d). Arrays over 2^30 bytes are stored as a map ``{'__msgpack_chunked_array__':
True, 'shape': {'0': ...}, 'chunks': {'0': flat array, ...}}`` to concatenate in index order. ``bfloat16``
bytes are read straight into torch.bfloat16. Keys are joined with '/'; a leading ``params/`` is dropped.

**LM** (``convert_lm``), LWM.md §1 and §4. The release is stacked by ``nn.scan``: every decoder-layer
kernel has a leading layer axis, ``transformer/h/scan_decoder/...`` (``transformer/h/{i}/...`` unstacked
checkpoints are accepted too). Kernels are [in, out] and are transposed to torch's [out, in]. LWM rotates
Meta's interleaved pairs (2i, 2i+1) in RoPE while our ``llama.py`` rotates HF's (i, i + Dh/2), so the output
rows of wq and wk are permuted per head (``permute_rotary``); since q and k get the same permutation,
q·k, and so the model, is unchanged. wv, wo, the MLP and the norms are unchanged. Written under ``out_dir``:

  lm/                        HF LLaMA: config.json, model-0000k-of-0000n.safetensors (one shard per JAX
                             leaf, written as it is read) and model.safetensors.index.json; the LM keys are
                             transformer/{wte,ln_f,h/...} and lm_head, readable by ``hf_llama``.
  vision_embed.safetensors   image_embed.weight [8448, D] = transformer/vte/embedding as is (``VLA.image_embed``;
                             ids 0..8191 codes, 8192 end of frame, 8193 end of vision, 8194..8447 unused as far
                             as LWM's code shows) and image_head.weight [8448, D] = vision_head/kernel transposed
                             (an nn.Linear(D, 8448)). ``image_rows=8194`` keeps the rows ``VLA``'s table has.
  latent_action.safetensors  only for LAPA checkpoints: latent_embed.weight / latent_head.weight from
                             transformer/dte/embedding / delta_head/kernel, action_embed.weight / action_head.weight
                             from transformer/ate/embedding / action_head/kernel (heads transposed).

**VQGAN** (``convert_vqgan``), LWM.md §3: Flax names map onto ``vqgan.VQGAN``'s (``vqgan_param_map``); conv
kernels (kh, kw, in, out) become (out, in, kh, kw), GroupNorm ``scale`` becomes ``weight``. Written as
``out_dir/vqgan`` by ``VQGAN.save_pretrained``.

A bad checkpoint fails with a ValueError naming the missing, unexpected or wrong-shaped key. Output
directories are written under a ``.partial`` name and renamed when complete; existing ones are never replaced.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lapa_dist.models.hf_llama import INDEX_FILE, config_to_hf, to_hf_name
from lapa_dist.models.llama import LlamaConfig
from lapa_dist.models.vqgan import VQGAN, VQGANConfig

LM_DIR = "lm"
VISION_EMBED_FILE = "vision_embed.safetensors"
LATENT_ACTION_FILE = "latent_action.safetensors"
VQGAN_DIR = "vqgan"
LWM_IMAGE_VOCAB = 8448
"""Rows of LWM's vision embedding and vision head: 8192 codes + 256 (8192/8193 are frame markers)."""

Log = Callable[[str], None]

# ---------------------------------------------------------------------------------------------------------
# Reading flax-serialized trees


EXT_NDARRAY, EXT_NATIVE_COMPLEX, EXT_NPSCALAR = 1, 2, 3  # flax.serialization._MsgpackExtType
CHUNKED_ARRAY_MARK = "__msgpack_chunked_array__"
MAX_RECORD_BYTES = 32 * 2**30  # the Unpacker's limit (LWM passes 32 GiB; its largest record is ~2.9 GB)

_DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "uint16": torch.uint16,
    "int32": torch.int32, "uint32": torch.uint32, "int64": torch.int64, "uint64": torch.uint64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "complex64": torch.complex64, "complex128": torch.complex128,
}


def _array_from_payload(payload: bytes) -> torch.Tensor:
    """An ExtType-1/3 payload, msgpack [shape, dtype name, C-order bytes], as a tensor (read-only memory)."""
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=False)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode()
    if dtype_name not in _DTYPES:
        raise ValueError(f"unsupported array dtype {dtype_name!r}")
    dtype, shape = _DTYPES[dtype_name], tuple(shape)
    numel = math.prod(shape)
    if len(buffer) != numel * dtype.itemsize:
        raise ValueError(f"array of shape {shape} {dtype_name} has {len(buffer)} bytes, expected "
                         f"{numel * dtype.itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # the bytes are immutable; every conversion below copies before writing
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (EXT_NDARRAY, EXT_NPSCALAR):  # a numpy scalar is packed as a 0-d array
        return _array_from_payload(data)
    if code == EXT_NATIVE_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(value: dict, key: str) -> torch.Tensor:
    """A chunked array {'shape': {'0': n0, ...}, 'chunks': {'0': flat, ...}} as one tensor of that shape."""
    try:
        shape = tuple(value["shape"][str(i)] for i in range(len(value["shape"])))
        chunks = [value["chunks"][str(i)] for i in range(len(value["chunks"]))]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{key}: malformed chunked array (no {error})") from None
    if not chunks or not all(isinstance(chunk, torch.Tensor) and chunk.dim() == 1 for chunk in chunks):
        raise ValueError(f"{key}: the chunks of a chunked array must be flat arrays")
    flat = torch.cat(chunks)
    if flat.numel() != math.prod(shape):
        raise ValueError(f"{key}: chunks hold {flat.numel()} elements, shape {shape} needs {math.prod(shape)}")
    return flat.view(shape)


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, dict) and value.get(CHUNKED_ARRAY_MARK):
        return _unchunk(value, key)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        return torch.from_numpy(value if value.flags.c_contiguous and value.flags.writeable else value.copy())
    raise ValueError(f"{key}: expected an array, found {type(value).__name__}")


def _flatten(tree: Any, prefix: str, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nested dicts -> {'a/b/c': tensor}; chunked-array maps are leaves."""
    if isinstance(tree, dict) and not tree.get(CHUNKED_ARRAY_MARK):
        for name, value in tree.items():
            _flatten(value, f"{prefix}/{name}" if prefix else str(name), out)
    else:
        out[prefix] = _as_tensor(tree, prefix or "<root>")
    return out


def _iter_records(file: BinaryIO, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """StreamingCheckpointer records [key path, to_bytes(array)], one at a time."""
    unpacker = msgpack.Unpacker(file, raw=False, max_buffer_size=MAX_RECORD_BYTES, read_size=64 * 2**20)
    for number, record in enumerate(unpacker):
        if not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], list)
                and isinstance(record[1], bytes)):
            raise ValueError(f"{path}: record {number} is not [key path, bytes] (a StreamingCheckpointer file?)")
        key = "/".join(str(part) for part in record[0])
        try:
            leaf = msgpack.unpackb(record[1], ext_hook=_ext_hook, raw=False)
        except (ValueError, msgpack.UnpackException) as error:
            raise ValueError(f"{path}: {key}: not a flax-serialized array ({error})") from None
        yield key, _as_tensor(leaf, key)


def _jax_array(fun: Callable, args: tuple, state: Any, *aval_state: Any) -> np.ndarray:
    """Stands in for jax._src.array._reconstruct_array: the pickled numpy value, left on the host."""
    array = fun(*args)
    array.__setstate__(state)
    return array


_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("flax.core.frozen_dict", "FrozenDict"): dict,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spellings
    _PICKLE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
    _PICKLE_GLOBALS[(f"{_core}.multiarray", "scalar")] = np.float32(0).__reduce__()[0]
    _PICKLE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]  # pickle protocol 5


class _ParamsUnpickler(pickle.Unpickler):
    """Unpickles (Frozen)dicts of numpy/jax arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a dict or an array")
        return _PICKLE_GLOBALS[(module, name)]


def _load_pickle(file: BinaryIO, path: Path) -> Any:
    try:
        return _ParamsUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
        raise ValueError(f"{path}: cannot read the pickled params ({error}); only (Frozen)dicts of float32/int "
                         "numpy or jax arrays are accepted (re-save others as numpy with jax installed)") from None


def iter_flax_params(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key 'a/b/c', tensor) for every leaf of a flax checkpoint: streaming records, a flax ``to_bytes``
    tree or a pickle of the params dict. Streaming records are read lazily, one leaf in memory at a time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as file:
        head = file.read(2)
        file.seek(0)
        if not head:
            raise ValueError(f"{path}: empty file")
        first = head[0]
        if first == 0x80 and len(head) == 2 and 2 <= head[1] <= 5:  # pickle PROTO opcode
            yield from _flatten(_load_pickle(file, path), "", {}).items()
        elif 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):  # msgpack array: a streaming record
            yield from _iter_records(file, path)
        elif 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):  # msgpack map: a whole tree
            tree = msgpack.unpackb(file.read(), ext_hook=_ext_hook, raw=False)
            yield from _flatten(tree, "", {}).items()
        else:
            raise ValueError(f"{path}: neither a flax msgpack checkpoint nor a pickle (first byte {first:#04x})")


def read_flax_params(path: str | Path) -> dict[str, torch.Tensor]:
    """All leaves of a flax checkpoint as {'a/b/c': tensor} (``iter_flax_params`` collected)."""
    return dict(iter_flax_params(path))


def _param_key(key: str) -> str:
    while key.startswith("params/"):
        key = key[len("params/"):]
    return key


def _new_dir(path: Path) -> Path:
    """``path`` + '.partial', emptied, refusing to replace a finished ``path``."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it or choose another output directory")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


# ---------------------------------------------------------------------------------------------------------
# Language model


def permute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection weight [H*Dh, in] from Meta's interleaved RoPE pairs to HF's.

    Per head, row 2i (first of pair i) goes to row i and row 2i + 1 to row i + Dh/2, so the pair that LWM
    rotates by frequency i is the pair that ``llama.apply_rope`` rotates by frequency i.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_LAYER_LEAVES = {  # LWM path inside one decoder layer -> (our name inside layers.{i}, transform)
    "attention/wq/kernel": ("attn.q_proj.weight", "q"),
    "attention/wk/kernel": ("attn.k_proj.weight", "k"),
    "attention/wv/kernel": ("attn.v_proj.weight", "transpose"),
    "attention/wo/kernel": ("attn.o_proj.weight", "transpose"),
    "feed_forward/w1/kernel": ("mlp.gate_proj.weight", "transpose"),
    "feed_forward/w3/kernel": ("mlp.up_proj.weight", "transpose"),
    "feed_forward/w2/kernel": ("mlp.down_proj.weight", "transpose"),
    "attention_norm/kernel": ("attn_norm.weight", "copy"),
    "ffn_norm/kernel": ("mlp_norm.weight", "copy"),
}
SCAN_PREFIX = "transformer/h/scan_decoder/"
_REQUIRED = ("transformer/wte/embedding", "transformer/ln_f/kernel", "lm_head/kernel", "transformer/vte/embedding",
             "vision_head/kernel")
_LAPA_PAIRS = (  # (embedding key, our name, head key, our name): LAPA's delta (latent action) and action tables
    ("transformer/dte/embedding", "latent_embed.weight", "delta_head/kernel", "latent_head.weight"),
    ("transformer/ate/embedding", "action_embed.weight", "action_head/kernel", "action_head.weight"),
)


@dataclass(frozen=True)
class LMLeaf:
    """Where one LWM leaf goes: ``destination`` file, our tensor ``names`` (one per layer of a stacked leaf),
    the expected JAX ``shape`` (None = any size), the ``transform`` to torch layout and, for decoder-layer
    leaves, ``group`` = the path inside a layer (a group is stored stacked or per layer, not both)."""

    destination: str  # "lm", "vision" or "latent_action"
    names: tuple[str, ...]
    shape: tuple[int | None, ...]
    transform: str  # "copy", "transpose", "q" or "k"
    group: str | None = None
    stacked: bool = False


def lm_leaves(config: LlamaConfig, image_vocab_size: int = LWM_IMAGE_VOCAB) -> dict[str, LMLeaf]:
    """Every key an LWM (or LAPA) params file may hold, for this LM shape."""
    d, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    kv = config.num_kv_heads * config.head_dim
    layer_shapes = {"attention/wq/kernel": (d, d), "attention/wk/kernel": (d, kv), "attention/wv/kernel": (d, kv),
                    "attention/wo/kernel": (d, d), "feed_forward/w1/kernel": (d, f),
                    "feed_forward/w3/kernel": (d, f), "feed_forward/w2/kernel": (f, d),
                    "attention_norm/kernel": (d,), "ffn_norm/kernel": (d,)}
    leaves = {
        "transformer/wte/embedding": LMLeaf("lm", ("embed_tokens.weight",), (v, d), "copy"),
        "transformer/ln_f/kernel": LMLeaf("lm", ("norm.weight",), (d,), "copy"),
        "lm_head/kernel": LMLeaf("lm", ("lm_head.weight",), (d, v), "transpose"),
        "transformer/vte/embedding": LMLeaf("vision", ("image_embed.weight",), (image_vocab_size, d), "copy"),
        "vision_head/kernel": LMLeaf("vision", ("image_head.weight",), (d, image_vocab_size), "transpose"),
    }
    for embed_key, embed_name, head_key, head_name in _LAPA_PAIRS:
        leaves[embed_key] = LMLeaf("latent_action", (embed_name,), (None, d), "copy")
        leaves[head_key] = LMLeaf("latent_action", (head_name,), (d, None), "transpose")
    for group, (name, transform) in _LAYER_LEAVES.items():
        names = tuple(f"layers.{i}.{name}" for i in range(layers))
        leaves[SCAN_PREFIX + group] = LMLeaf("lm", names, (layers, *layer_shapes[group]), transform, group, True)
        for i in range(layers):
            leaves[f"transformer/h/{i}/{group}"] = LMLeaf("lm", (names[i],), layer_shapes[group], transform, group)
    return leaves


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    if tensor.dim() != len(expected) or any(e is not None and e != s for s, e in zip(tensor.shape, expected)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{key}: shape {tuple(tensor.shape)} in the checkpoint, the config needs {shown}")


def _torch_layout(tensor: torch.Tensor, transform: str, config: LlamaConfig) -> torch.Tensor:
    """One (unstacked) JAX leaf in torch layout, as a fresh contiguous tensor of its own."""
    if transform != "copy":
        tensor = tensor.T  # JAX kernels are [in, out]
    if transform == "q":
        tensor = permute_rotary(tensor, config.num_heads)
    elif transform == "k":
        tensor = permute_rotary(tensor, config.num_kv_heads)
    return tensor.clone(memory_format=torch.contiguous_format)


def _convert_leaf(key: str, tensor: torch.Tensor, leaf: LMLeaf, config: LlamaConfig,
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """{our name: torch tensor} for one checkpoint leaf (a stacked leaf gives one tensor per layer)."""
    _check_shape(key, tensor, leaf.shape)
    pieces = tensor.unbind(0) if leaf.stacked else (tensor,)
    return {name: _torch_layout(piece if dtype is None else piece.to(dtype), leaf.transform, config)
            for name, piece in zip(leaf.names, pieces)}


class _Coverage:
    """Which LM keys were read: duplicates, mixed stacked/per-layer storage and missing keys are errors."""

    def __init__(self, config: LlamaConfig):
        self.num_layers = config.num_layers
        self.seen: set[str] = set()
        self.stacked: dict[str, bool] = {}  # layer group -> stored stacked?

    def add(self, key: str, leaf: LMLeaf) -> None:
        if key in self.seen:
            raise ValueError(f"{key} appears twice in the checkpoint")
        if leaf.group is not None and self.stacked.setdefault(leaf.group, leaf.stacked) != leaf.stacked:
            raise ValueError(f"{key}: the checkpoint holds {leaf.group} both stacked ({SCAN_PREFIX}...) "
                             "and per layer (transformer/h/<i>/...)")
        self.seen.add(key)

    def missing(self) -> list[str]:
        missing = [key for key in _REQUIRED if key not in self.seen]
        for group in _LAYER_LEAVES:
            if group not in self.stacked:
                missing.append(SCAN_PREFIX + group)
            elif not self.stacked[group]:
                missing += [key for i in range(self.num_layers)
                            if (key := f"transformer/h/{i}/{group}") not in self.seen]
        return missing


@dataclass
class ConvertedLM:
    lm_dir: Path
    """HF LLaMA directory (``hf_llama.load_hf_checkpoint`` / ``config_from_hf`` read it)."""
    vision_file: Path
    """image_embed.weight and image_head.weight."""
    latent_action_file: Path | None
    """LAPA's delta/action embeddings and heads, when the checkpoint has them."""
    num_params: int
    dtype: torch.dtype


def convert_lm(params_path: str | Path, out_dir: str | Path, config: LlamaConfig | None = None,
               dtype: torch.dtype | None = None, image_vocab_size: int = LWM_IMAGE_VOCAB,
               image_rows: int | None = None, log: Log = lambda message: None) -> ConvertedLM:
    """Convert an LWM/LAPA ``params`` file (see the module docstring) into ``out_dir``.

    ``config`` is the LM's shape (default: LWM-Chat-1M, i.e. ``LlamaConfig()``); it cannot be read from the
    checkpoint (heads, RoPE theta). ``dtype`` casts every tensor (None keeps the checkpoint's, bf16 for
    LWM). ``image_vocab_size`` is the row count vte and vision_head must have; ``image_rows`` keeps only
    the first rows of both (e.g. 8194 = codes + the two markers, ``VLA``'s default table), None all.
    """
    config = config or LlamaConfig()
    if config.tie_word_embeddings:
        raise ValueError("LWM's embeddings are untied: use a config with tie_word_embeddings false")
    if image_rows is not None and not 0 < image_rows <= image_vocab_size:
        raise ValueError(f"image_rows {image_rows} must be in 1..{image_vocab_size}")
    out_dir = Path(out_dir)
    lm_final = out_dir / LM_DIR
    lm_dir = _new_dir(lm_final)
    leaves, coverage = lm_leaves(config, image_vocab_size), _Coverage(config)
    shards: list[list[str]] = []  # HF names per shard; the tensors are written and dropped
    extras: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "latent_action": {}}
    lm_dtype, num_params = None, 0
    for number, (raw_key, tensor) in enumerate(iter_flax_params(params_path), start=1):
        key = _param_key(raw_key)
        if key not in leaves:
            raise ValueError(f"{params_path}: unexpected key {key!r} (not an LWM/LAPA LM parameter of this config)")
        leaf = leaves[key]
        coverage.add(key, leaf)
        converted = _convert_leaf(key, tensor, leaf, config, dtype)
        del tensor
        first = converted[leaf.names[0]]
        num_params += sum(t.numel() for t in converted.values())
        log(f"[{number}] {key} -> {len(converted)} x {tuple(first.shape)} "
            f"{str(first.dtype).removeprefix('torch.')} ({leaf.destination})")
        if leaf.destination != "lm":
            extras[leaf.destination].update(converted)
            continue
        hf = {to_hf_name(name): t for name, t in converted.items()}
        lm_dtype = lm_dtype or first.dtype
        save_file(hf, lm_dir / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shards.append(list(hf))
        del converted, hf, first
    missing = coverage.missing()
    if missing:
        raise ValueError(f"{params_path}: missing {len(missing)} LM keys: {', '.join(missing[:6])}"
                         + (" ..." if len(missing) > 6 else ""))
    _finish_hf_dir(lm_dir, shards, config, lm_dtype)
    vision = extras["vision"]
    if image_rows is not None:
        vision = {name: t[:image_rows].clone() for name, t in vision.items()}
    rows = str(vision["image_embed.weight"].shape[0])
    save_file(vision, out_dir / VISION_EMBED_FILE, metadata={
        "format": "pt", "rows": rows, "end_of_frame_id": "8192", "end_of_vision_id": "8193",
        "source": "transformer/vte/embedding, vision_head/kernel (transposed)"})
    latent_file = _save_latent_action(extras["latent_action"], out_dir)
    lm_dir.rename(lm_final)
    log(f"{lm_final}: {len(shards)} shards; {out_dir / VISION_EMBED_FILE}: {rows} image rows")
    return ConvertedLM(lm_final, out_dir / VISION_EMBED_FILE, latent_file, num_params, lm_dtype)


def _finish_hf_dir(lm_dir: Path, shards: list[list[str]], config: LlamaConfig, dtype: torch.dtype) -> None:
    """Rename part-k to model-0000k-of-0000n, write the index and config.json."""
    weight_map, total = {}, 0
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (lm_dir / f"part-{index}.safetensors").rename(lm_dir / file)
        weight_map.update(dict.fromkeys(names, file))
        total += (lm_dir / file).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (lm_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (lm_dir / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")


def _save_latent_action(tensors: dict[str, torch.Tensor], out_dir: Path) -> Path | None:
    """LAPA's tables, when present; an embedding and its head must come together with the same row count."""
    if not tensors:
        return None
    for embed_key, embed, head_key, head in _LAPA_PAIRS:
        if (embed in tensors) != (head in tensors):
            raise ValueError(f"the checkpoint has only one of {embed_key} and {head_key}")
        if embed in tensors and tensors[embed].shape[0] != tensors[head].shape[0]:
            raise ValueError(f"{embed_key} has {tensors[embed].shape[0]} rows but {head_key} "
                             f"{tensors[head].shape[0]} outputs")
    save_file(tensors, out_dir / LATENT_ACTION_FILE, metadata={"format": "pt"})
    return out_dir / LATENT_ACTION_FILE


# ---------------------------------------------------------------------------------------------------------
# VQGAN


def _resnet_names(flax: str, ours: str) -> dict[str, str]:
    return {f"{flax}/GroupNorm_0": f"{ours}.norm1", f"{flax}/Conv_0": f"{ours}.conv1",
            f"{flax}/GroupNorm_1": f"{ours}.norm2", f"{flax}/Conv_1": f"{ours}.conv2",
            f"{flax}/Conv_2": f"{ours}.shortcut"}


def _vqgan_module_names(config: VQGANConfig) -> dict[str, str]:
    """Flax module path -> our module name. Flax's nn.compact numbers submodules per class in creation order,
    so the decoder's UpsamplingBlock_k is level (levels - 1 - k)."""
    levels = len(config.channel_mult)
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv", "quantize": "quantize.embedding"}
    for part in ("encoder", "decoder"):
        names |= {f"{part}/Conv_0": f"{part}.conv_in", f"{part}/GroupNorm_0": f"{part}.norm_out",
                  f"{part}/Conv_1": f"{part}.conv_out"}
        for j in range(2):
            names |= _resnet_names(f"{part}/MidBlock_0/ResnetBlock_{j}", f"{part}.mid.{j}")
    for i in range(levels):
        for j in range(config.num_res_blocks):
            names |= _resnet_names(f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}", f"encoder.down.{i}.blocks.{j}")
        names[f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0"] = f"encoder.down.{i}.resample.conv"
        k = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            names |= _resnet_names(f"decoder/UpsamplingBlock_{k}/ResnetBlock_{j}", f"decoder.up.{i}.blocks.{j}")
        names[f"decoder/UpsamplingBlock_{k}/Upsample_0/Conv_0"] = f"decoder.up.{i}.resample.conv"
    return names


def vqgan_param_map(model: VQGAN) -> dict[str, tuple[str, bool]]:
    """Flax leaf path -> (our parameter name, is a conv kernel) for every parameter of ``model``."""
    mapping = {}
    for flax, ours in _vqgan_module_names(model.config).items():
        try:
            module = model.get_submodule(ours)
        except AttributeError:
            continue  # no such module here (e.g. the last level's downsample)
        if isinstance(module, nn.Conv2d):
            mapping |= {f"{flax}/kernel": (f"{ours}.weight", True), f"{flax}/bias": (f"{ours}.bias", False)}
        elif isinstance(module, nn.GroupNorm):
            mapping |= {f"{flax}/scale": (f"{ours}.weight", False), f"{flax}/bias": (f"{ours}.bias", False)}
        elif isinstance(module, nn.Embedding):
            mapping[f"{flax}/embeddings"] = (f"{ours}.weight", False)
    names = {name for name, _ in model.named_parameters()}
    unmapped = names - {ours for ours, _ in mapping.values()}
    if unmapped:
        raise AssertionError(f"VQGAN parameters without a Flax name: {sorted(unmapped)[:3]}")
    return mapping


def convert_vqgan(params_path: str | Path, out_dir: str | Path, config: VQGANConfig | None = None,
                  log: Log = lambda message: None) -> Path:
    """Convert LWM's ``vqgan`` params (pickle or flax msgpack) to ``out_dir/vqgan`` (``VQGAN.save_pretrained``)."""
    config = config or VQGANConfig()
    final = Path(out_dir) / VQGAN_DIR
    partial = _new_dir(final)
    with torch.device("meta"):
        model = VQGAN(config)
    mapping = vqgan_param_map(model)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for raw_key, tensor in iter_flax_params(params_path):
        key = _param_key(raw_key)
        if key not in mapping:
            raise ValueError(f"{params_path}: unexpected key {key!r} (not a VQGAN parameter of this config)")
        name, is_kernel = mapping[key]
        if name in state:
            raise ValueError(f"{params_path}: {key} appears twice in the checkpoint")
        expected = params[name].shape
        flax_shape = tuple(expected[i] for i in (2, 3, 1, 0)) if is_kernel else tuple(expected)
        _check_shape(key, tensor, flax_shape)
        state[name] = (tensor.permute(3, 2, 0, 1) if is_kernel else tensor).clone(memory_format=torch.contiguous_format)
    missing = sorted(key for key, (name, _) in mapping.items() if name not in state)
    if missing:
        raise ValueError(f"{params_path}: missing {len(missing)} VQGAN keys: {', '.join(missing[:6])}"
                         + (" ..." if len(missing) > 6 else ""))
    model.load_state_dict(state, assign=True)
    model.save_pretrained(partial)
    partial.rename(final)
    log(f"{final}: {sum(t.numel() for t in state.values()):,} parameters, "
        f"{model.num_tokens} codes per {config.resolution}x{config.resolution} image")
    return final
