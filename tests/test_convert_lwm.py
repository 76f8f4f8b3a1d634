"""LWM JAX checkpoint conversion (lapa_dist.models.lwm_convert, tools/convert_lwm.py) on tiny random checkpoints.

The checkpoints are written here the way LWM's tools write them, independently of the converter: flax's
msgpack encoding (ExtType 1 = msgpack [shape, dtype name, bytes]; chunked arrays; ExtType 3 scalars),
tux StreamingCheckpointer records, a whole flax ``to_bytes`` tree, or a pickle of jax arrays in FrozenDicts
(made with stand-in jax/flax modules that are gone again when the converter reads it). The converted LM
must give the logits of a plain-torch reference of LWM's model with Meta's interleaved RoPE run on the raw
JAX arrays; the converted VQGAN must give the codes and images of an NHWC reference run on the Flax tree.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import sys
import types
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lapa_dist.models.hf_llama import config_from_hf, load_hf_checkpoint
from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.models.lwm_convert import (
    LATENT_ACTION_FILE,
    LM_DIR,
    SCAN_PREFIX,
    VISION_EMBED_FILE,
    VQGAN_DIR,
    convert_lm,
    convert_vqgan,
    lm_leaves,
    permute_rotary,
    read_flax_params,
)
from lapa_dist.models.vqgan import VQGAN, VQGANConfig
from tools.convert_lwm import main as convert_main

LM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
                 rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=64)
IMAGE_VOCAB = 40
VQ = VQGANConfig(resolution=16, hidden_channels=8, channel_mult=(1, 2, 3), num_res_blocks=1, z_channels=4,
                 embed_dim=4, codebook_size=32, norm_groups=4)
LAYER_KERNELS = ("attention/wq", "attention/wk", "attention/wv", "attention/wo",
                 "feed_forward/w1", "feed_forward/w2", "feed_forward/w3")

# ------------------------------------------------------------------------------------------------
# Writing flax-serialized files, as flax.serialization and tux's StreamingCheckpointer do

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int32: "int32"}


def flax_array(tensor: torch.Tensor, ext_code: int = 1) -> msgpack.ExtType:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return msgpack.ExtType(ext_code, msgpack.packb((list(tensor.shape), DTYPE_NAMES[tensor.dtype], raw)))


def flax_chunked(tensor: torch.Tensor, chunk: int) -> dict:
    flat = tensor.reshape(-1)
    pieces = [flat[i:i + chunk] for i in range(0, flat.numel(), chunk)]
    return {"__msgpack_chunked_array__": True, "shape": {str(i): n for i, n in enumerate(tensor.shape)},
            "chunks": {str(i): flax_array(piece) for i, piece in enumerate(pieces)}}


def write_records(path: Path, leaves: dict[str, object]) -> Path:
    """tux StreamingCheckpointer: one record [key path, to_bytes(leaf)] per leaf, concatenated."""
    packer = msgpack.Packer()
    with path.open("wb") as file:
        for key, leaf in leaves.items():
            encoded = flax_array(leaf) if isinstance(leaf, torch.Tensor) else leaf
            file.write(packer.pack((key.split("/"), msgpack.packb(encoded))))
    return path


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, last = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def write_tree(path: Path, flat: dict[str, torch.Tensor]) -> Path:
    """flax to_bytes of the whole params tree: one msgpack map."""
    path.write_bytes(msgpack.packb(nest({key: flax_array(t) for key, t in flat.items()})))
    return path


def write_jax_pickle(path: Path, flat: dict[str, torch.Tensor], monkeypatch) -> Path:
    """pickle.dump of a FrozenDict of jax Arrays, pickled as jax and flax pickle them (stand-in modules)."""
    def _reconstruct_array(fun, args, arr_state, aval_state):
        raise AssertionError("only pickled here, never called")

    class FrozenDict(dict):
        def __reduce__(self):
            return FrozenDict, (dict(self),)

    class JaxArray:
        def __init__(self, array: np.ndarray):
            self.array = array

        def __reduce__(self):
            fun, args, state = self.array.__reduce__()
            return _reconstruct_array, (fun, args, state, {"weak_type": False})

    modules = {name: types.ModuleType(name) for name in ("jax", "jax._src", "jax._src.array", "flax", "flax.core",
                                                           "flax.core.frozen_dict")}
    _reconstruct_array.__module__, _reconstruct_array.__qualname__ = "jax._src.array", "_reconstruct_array"
    FrozenDict.__module__, FrozenDict.__qualname__ = "flax.core.frozen_dict", "FrozenDict"
    modules["jax._src.array"]._reconstruct_array = _reconstruct_array
    modules["flax.core.frozen_dict"].FrozenDict = FrozenDict

    def freeze(node):
        return FrozenDict({k: freeze(v) for k, v in node.items()}) if isinstance(node, dict) else JaxArray(node)

    tree = freeze(nest({key: t.numpy() for key, t in flat.items()}))
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        path.write_bytes(pickle.dumps(tree))
    assert "jax" not in sys.modules
    return path


# ------------------------------------------------------------------------------------------------
# The LM: LWM-layout params and a reference forward with Meta's interleaved RoPE


def lwm_lm_params(seed: int = 0, stacked: bool = True) -> dict[str, torch.Tensor]:
    """Random bf16 params named and shaped like LWM's release (scan-stacked layers, kernels [in, out])."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v, n = LM.hidden_size, LM.intermediate_size, LM.vocab_size, LM.num_layers

    def normal(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    shapes = {"attention/wq": (d, d), "attention/wk": (d, d), "attention/wv": (d, d), "attention/wo": (d, d),
              "feed_forward/w1": (d, f), "feed_forward/w3": (d, f), "feed_forward/w2": (f, d)}
    params = {"transformer/wte/embedding": normal(v, d), "transformer/vte/embedding": normal(IMAGE_VOCAB, d),
              "transformer/ln_f/kernel": normal(d, scale=0.1, mean=1.0),
              "lm_head/kernel": normal(d, v, scale=d ** -0.5), "vision_head/kernel": normal(d, IMAGE_VOCAB)}
    layer = {f"{name}/kernel": normal(n, *shape, scale=shape[0] ** -0.5) for name, shape in shapes.items()}
    layer |= {f"{name}/kernel": normal(n, d, scale=0.1, mean=1.0) for name in ("attention_norm", "ffn_norm")}
    for name, value in layer.items():
        if stacked:
            params[f"transformer/h/scan_decoder/{name}"] = value
        else:
            params |= {f"transformer/h/{i}/{name}": value[i] for i in range(n)}
    return params


def layer_param(params: dict[str, torch.Tensor], i: int, name: str) -> torch.Tensor:
    stacked = params.get(f"transformer/h/scan_decoder/{name}")
    return (stacked[i] if stacked is not None else params[f"transformer/h/{i}/{name}"]).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + LM.rms_norm_eps) * weight.float()


def rope(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, T, H, Dh]; Meta pairs (2i, 2i+1) as complex numbers, or (i, i + Dh/2) when not interleaved."""
    seq, dh = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / LM.rope_theta ** (torch.arange(0, dh, 2).float() / dh)
    rotation = torch.polar(torch.ones(seq, dh // 2), torch.arange(seq).float()[:, None] * inv_freq)  # [T, Dh/2]
    if interleaved:
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], dh // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2)
    pairs = torch.complex(x[..., : dh // 2], x[..., dh // 2:]) * rotation[None, :, None]
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def lwm_reference(params: dict[str, torch.Tensor], ids: torch.Tensor,
                  interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LWM's forward in fp32 on the raw JAX arrays: (text logits [B, T, V], vision logits [B, T, 8448-like])."""
    batch, seq = ids.shape
    heads, dh = LM.num_heads, LM.head_dim
    h = params["transformer/wte/embedding"].float()[ids]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(LM.num_layers):
        x = rms_norm(h, layer_param(params, i, "attention_norm/kernel"))
        q, k, v = (x @ layer_param(params, i, f"attention/{w}/kernel") for w in ("wq", "wk", "wv"))
        q, k = (rope(t.view(batch, seq, heads, dh), interleaved) for t in (q, k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v.view(batch, seq, heads, dh)).reshape(batch, seq, -1)
        h = h + attn @ layer_param(params, i, "attention/wo/kernel")
        x = rms_norm(h, layer_param(params, i, "ffn_norm/kernel"))
        gate, up = (x @ layer_param(params, i, f"feed_forward/{w}/kernel") for w in ("w1", "w3"))
        h = h + (F.silu(gate) * up) @ layer_param(params, i, "feed_forward/w2/kernel")
    h = rms_norm(h, params["transformer/ln_f/kernel"])
    return h @ params["lm_head/kernel"].float(), h @ params["vision_head/kernel"].float()


def load_converted_lm(lm_dir: Path) -> Llama:
    model = Llama(config_from_hf(lm_dir)).eval()
    load_hf_checkpoint(model, lm_dir)
    return model


# ------------------------------------------------------------------------------------------------
# The reader


def test_reader_decodes_flax_encodings(tmp_path):
    gen = torch.Generator().manual_seed(0)
    leaves = {"a/f32": torch.randn(3, 5, generator=gen), "a/bf16": torch.randn(4, 2, generator=gen).bfloat16(),
              "b/int": torch.arange(6, dtype=torch.int32).view(2, 3), "b/empty": torch.zeros(0, 4)}
    chunked = torch.randn(3, 7, generator=gen).bfloat16()
    scalar = torch.tensor(2.5)
    records = {**leaves, "c/chunked": flax_chunked(chunked, chunk=5), "c/scalar": flax_array(scalar, ext_code=3)}
    read = read_flax_params(write_records(tmp_path / "params", records))
    assert list(read) == list(records)
    for key, tensor in {**leaves, "c/chunked": chunked, "c/scalar": scalar}.items():
        assert read[key].dtype == tensor.dtype and read[key].shape == tensor.shape, key
        assert torch.equal(read[key], tensor), key
    tree = read_flax_params(write_tree(tmp_path / "tree", leaves))
    assert all(torch.equal(tree[key], tensor) for key, tensor in leaves.items())
    (tmp_path / "junk").write_bytes(b"\x01junk")
    with pytest.raises(ValueError, match="neither a flax msgpack"):
        read_flax_params(tmp_path / "junk")
    (tmp_path / "code.pkl").write_bytes(pickle.dumps({"a": collections.Counter()}))
    with pytest.raises(ValueError, match="collections.Counter is not a dict or an array"):
        read_flax_params(tmp_path / "code.pkl")
    write_records(tmp_path / "complex", {"x/y": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))})
    with pytest.raises(ValueError, match="x/y: expected an array"):
        read_flax_params(tmp_path / "complex")


def test_permute_rotary_moves_pairs_to_halves():
    weight = torch.arange(2 * 8).float()[:, None].repeat(1, 3)  # 2 heads of Dh 8; row r holds r
    rows = permute_rotary(weight, num_heads=2)[:, 0].long().tolist()
    assert rows == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


# ------------------------------------------------------------------------------------------------
# The LM


def test_lwm_7b_layout_has_the_released_parameter_count():
    leaves = lm_leaves(LlamaConfig())  # LWM-Chat-1M
    released = [key for key, leaf in leaves.items() if leaf.destination != "latent_action"
                and (leaf.stacked or not key.startswith("transformer/h/"))]
    assert len(released) == 14  # 9 stacked layer leaves + wte, vte, ln_f, lm_head, vision_head
    assert sum(math.prod(leaves[key].shape) for key in released) == 6_807_621_632  # LWM.md: 13.6 GB in bf16
    assert leaves[SCAN_PREFIX + "feed_forward/w1/kernel"].shape == (32, 4096, 11008)


@pytest.mark.parametrize("stacked", [True, False], ids=["scan_stacked", "per_layer"])
def test_lm_logits_match_lwm_interleaved_rope(tmp_path, stacked):
    params = lwm_lm_params(stacked=stacked)
    records = dict(params)
    chunk_key = "transformer/h/scan_decoder/feed_forward/w1/kernel" if stacked else "lm_head/kernel"
    records[chunk_key] = flax_chunked(params[chunk_key], chunk=1000)  # as flax stores leaves over 2^30 bytes
    result = convert_lm(write_records(tmp_path / "params", records), tmp_path / "out", LM,
                        image_vocab_size=IMAGE_VOCAB)
    assert result.dtype == torch.bfloat16 and result.latent_action_file is None
    model = load_converted_lm(result.lm_dir)
    assert model.config.model_dump() == LM.model_dump()
    ids = torch.randint(0, LM.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    ref_text, ref_vision = lwm_reference(params, ids)
    with torch.no_grad():
        hidden = model.forward_embeddings(model.embed(ids))
        logits = model.logits(hidden)
    torch.testing.assert_close(logits, ref_text, rtol=1e-4, atol=1e-4)
    wrong_pairing, _ = lwm_reference(params, ids, interleaved=False)
    assert (wrong_pairing - ref_text).abs().max() > 1e-2  # the check above tells the two RoPE pairings apart
    vision = load_file(result.vision_file)
    assert torch.equal(vision["image_embed.weight"], params["transformer/vte/embedding"])
    torch.testing.assert_close(hidden @ vision["image_head.weight"].float().T, ref_vision, rtol=1e-4, atol=1e-4)
    assert result.num_params == sum(t.numel() for t in params.values())


def test_lm_options_lapa_tables_and_params_prefix(tmp_path):
    params = lwm_lm_params(seed=2)
    dte, delta_head = torch.randn(8, LM.hidden_size).bfloat16(), torch.randn(LM.hidden_size, 8).bfloat16()
    records = {f"params/{key}": value for key, value in params.items()}
    records |= {"params/transformer/dte/embedding": dte, "params/delta_head/kernel": delta_head}
    result = convert_lm(write_records(tmp_path / "params", records), tmp_path / "out", LM, dtype=torch.float32,
                        image_vocab_size=IMAGE_VOCAB, image_rows=34)
    assert result.dtype == torch.float32
    assert json.loads((result.lm_dir / "config.json").read_text())["dtype"] == "float32"
    vision = load_file(result.vision_file)
    assert vision["image_embed.weight"].shape == vision["image_head.weight"].shape == (34, LM.hidden_size)
    assert torch.equal(vision["image_embed.weight"], params["transformer/vte/embedding"][:34].float())
    latent = load_file(result.latent_action_file)
    assert torch.equal(latent["latent_embed.weight"], dte) and torch.equal(latent["latent_head.weight"], delta_head.T)


def lm_error(tmp_path: Path, records: dict) -> str:
    tmp_path.mkdir(parents=True)
    with pytest.raises(ValueError) as error:
        convert_lm(write_records(tmp_path / "params", records), tmp_path / "out", LM, image_vocab_size=IMAGE_VOCAB)
    assert not (tmp_path / "out" / LM_DIR).exists()  # only the .partial directory
    return str(error.value)


def test_bad_lm_checkpoints_name_the_key(tmp_path):
    params = lwm_lm_params()
    missing = {k: v for k, v in params.items() if k != "transformer/ln_f/kernel"}
    assert "missing 1 LM keys: transformer/ln_f/kernel" in lm_error(tmp_path / "a", missing)
    key = "transformer/h/scan_decoder/attention/wq/kernel"
    message = lm_error(tmp_path / "b", {**params, key: params[key][:, :, :16]})
    assert key in message and "(2, 32, 16)" in message and "(2, 32, 32)" in message
    assert "'transformer/foo/kernel'" in lm_error(tmp_path / "c", {**params, "transformer/foo/kernel": params[key]})
    mixed = {**params, "transformer/h/0/attention/wq/kernel": params[key][0]}
    assert "both stacked" in lm_error(tmp_path / "d", mixed)
    partial = {k: v for k, v in lwm_lm_params(stacked=False).items() if k != "transformer/h/1/ffn_norm/kernel"}
    assert "transformer/h/1/ffn_norm/kernel" in lm_error(tmp_path / "e", partial)
    (tmp_path / "f" / "out" / LM_DIR).mkdir(parents=True)  # a finished conversion is never replaced
    with pytest.raises(FileExistsError, match="already exists"):
        convert_lm(write_records(tmp_path / "f" / "params", params), tmp_path / "f" / "out", LM,
                   image_vocab_size=IMAGE_VOCAB)


# ------------------------------------------------------------------------------------------------
# The VQGAN: LWM-layout Flax params and an NHWC reference


def lwm_vqgan_params(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 params named as Flax names LWM's VQGAN modules (LWM.md §3), kernels (kh, kw, in, out)."""
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, torch.Tensor] = {}

    def conv(path, cin, cout, size=3):
        params[f"{path}/kernel"] = torch.randn(size, size, cin, cout, generator=gen) / math.sqrt(size * size * cin)
        params[f"{path}/bias"] = 0.1 * torch.randn(cout, generator=gen)

    def norm(path, channels):
        params[f"{path}/scale"] = 1 + 0.1 * torch.randn(channels, generator=gen)
        params[f"{path}/bias"] = 0.1 * torch.randn(channels, generator=gen)

    def resnet(path, cin, cout):
        norm(f"{path}/GroupNorm_0", cin), conv(f"{path}/Conv_0", cin, cout)
        norm(f"{path}/GroupNorm_1", cout), conv(f"{path}/Conv_1", cout, cout)
        if cin != cout:
            conv(f"{path}/Conv_2", cin, cout, size=1)

    widths = [VQ.hidden_channels * m for m in VQ.channel_mult]
    levels = len(widths)
    conv("encoder/Conv_0", 3, VQ.hidden_channels)
    cin = VQ.hidden_channels
    for i, width in enumerate(widths):
        for j in range(VQ.num_res_blocks):
            resnet(f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}", cin, width)
            cin = width
        if i < levels - 1:
            conv(f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0", width, width)
    for part in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"{part}/MidBlock_0/ResnetBlock_{j}", widths[-1], widths[-1])
    norm("encoder/GroupNorm_0", cin), conv("encoder/Conv_1", cin, VQ.z_channels)
    conv("quant_conv", VQ.z_channels, VQ.embed_dim, size=1)
    conv("post_quant_conv", VQ.embed_dim, VQ.z_channels, size=1)
    params["quantize/embeddings"] = torch.randn(VQ.codebook_size, VQ.embed_dim, generator=gen)
    conv("decoder/Conv_0", VQ.z_channels, widths[-1])
    for k in range(levels):  # creation order: UpsamplingBlock_k is level levels - 1 - k
        width = widths[levels - 1 - k]
        for j in range(VQ.num_res_blocks + 1):
            resnet(f"decoder/UpsamplingBlock_{k}/ResnetBlock_{j}", cin, width)
            cin = width
        if k < levels - 1:
            conv(f"decoder/UpsamplingBlock_{k}/Upsample_0/Conv_0", width, width)
    norm("decoder/GroupNorm_0", cin), conv("decoder/Conv_1", cin, 3)
    return params


def ref_conv(p: dict, path: str, x: torch.Tensor, stride: int = 1, same: bool = True) -> torch.Tensor:
    """Flax nn.Conv on NHWC x with an HWIO kernel, as a sum of shifted matmuls."""
    kernel, bias = p[f"{path}/kernel"], p[f"{path}/bias"]
    kh, kw = kernel.shape[:2]
    if same:
        x = F.pad(x, (0, 0, kw // 2, kw // 2, kh // 2, kh // 2))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = bias.expand(x.shape[0], out_h, out_w, -1).clone()
    for i in range(kh):
        for j in range(kw):
            window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            out = out + window @ kernel[i, j]
    return out


def ref_norm(p: dict, path: str, x: torch.Tensor) -> torch.Tensor:
    """Flax nn.GroupNorm(32 groups here VQ.norm_groups, eps 1e-6) on NHWC."""
    b, h, w, c = x.shape
    groups = x.reshape(b, h, w, VQ.norm_groups, c // VQ.norm_groups)
    mean = groups.mean(dim=(1, 2, 4), keepdim=True)
    var = groups.var(dim=(1, 2, 4), keepdim=True, unbiased=False)
    normed = ((groups - mean) / torch.sqrt(var + 1e-6)).reshape(b, h, w, c)
    return normed * p[f"{path}/scale"] + p[f"{path}/bias"]


def ref_resnet(p: dict, path: str, x: torch.Tensor) -> torch.Tensor:
    h = ref_conv(p, f"{path}/Conv_0", F.silu(ref_norm(p, f"{path}/GroupNorm_0", x)))
    h = ref_conv(p, f"{path}/Conv_1", F.silu(ref_norm(p, f"{path}/GroupNorm_1", h)))
    return h + (ref_conv(p, f"{path}/Conv_2", x) if f"{path}/Conv_2/kernel" in p else x)


def ref_codes(p: dict, z: torch.Tensor) -> torch.Tensor:
    """LWM's quantizer: argmin |z|^2 + |e|^2 - 2 z.e over the codebook; z [B, h, w, D] -> [B, h*w] row-major."""
    flat, book = z.reshape(-1, z.shape[-1]), p["quantize/embeddings"]
    distances = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.T
    return distances.argmin(1).view(z.shape[0], -1)


def ref_encode(p: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, R, R] in [0, 1] -> (latents [B, h, w, D], codes [B, h*w]), on NHWC like LWM."""
    h = ref_conv(p, "encoder/Conv_0", images.permute(0, 2, 3, 1) * 2 - 1)
    levels = len(VQ.channel_mult)
    for i in range(levels):
        for j in range(VQ.num_res_blocks):
            h = ref_resnet(p, f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}", h)
        if i < levels - 1:  # pad bottom/right by one, VALID stride-2 conv
            h = ref_conv(p, f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0", F.pad(h, (0, 0, 0, 1, 0, 1)),
                         stride=2, same=False)
    for j in range(2):
        h = ref_resnet(p, f"encoder/MidBlock_0/ResnetBlock_{j}", h)
    h = ref_conv(p, "encoder/Conv_1", F.silu(ref_norm(p, "encoder/GroupNorm_0", h)))
    z = ref_conv(p, "quant_conv", h)
    return z, ref_codes(p, z)


def ref_decode(p: dict, codes: torch.Tensor) -> torch.Tensor:
    side = int(math.isqrt(codes.shape[1]))
    h = p["quantize/embeddings"][codes].view(codes.shape[0], side, side, -1)
    h = ref_conv(p, "decoder/Conv_0", ref_conv(p, "post_quant_conv", h))
    for j in range(2):
        h = ref_resnet(p, f"decoder/MidBlock_0/ResnetBlock_{j}", h)
    levels = len(VQ.channel_mult)
    for k in range(levels):
        for j in range(VQ.num_res_blocks + 1):
            h = ref_resnet(p, f"decoder/UpsamplingBlock_{k}/ResnetBlock_{j}", h)
        if k < levels - 1:  # nearest x2, then a conv
            h = h.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
            h = ref_conv(p, f"decoder/UpsamplingBlock_{k}/Upsample_0/Conv_0", h)
    h = ref_conv(p, "decoder/Conv_1", F.silu(ref_norm(p, "decoder/GroupNorm_0", h)))
    return ((h.clamp(-1, 1) + 1) / 2).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["jax_pickle", "numpy_pickle", "flax_tree", "records"])
def test_vqgan_matches_lwm_reference(tmp_path, monkeypatch, layout):
    params = lwm_vqgan_params()
    path = tmp_path / "vqgan"
    if layout == "jax_pickle":
        write_jax_pickle(path, params, monkeypatch)
    elif layout == "numpy_pickle":
        path.write_bytes(pickle.dumps(nest({key: t.numpy() for key, t in params.items()}), protocol=5))
    elif layout == "flax_tree":
        write_tree(path, params)
    else:
        write_records(path, params)
    model = VQGAN.from_pretrained(convert_vqgan(path, tmp_path / "out", VQ))
    assert model.config == VQ
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ref_z, ref_c = ref_encode(params, images)
    with torch.no_grad():
        z = model.latents(images)
    torch.testing.assert_close(z.permute(0, 2, 3, 1), ref_z, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.quantize.codes(ref_z.permute(0, 3, 1, 2)), ref_c)  # codes of given latents
    assert torch.equal(model.encode(images), ref_c)
    assert len(ref_c.unique()) > 1
    codes = torch.randint(0, VQ.codebook_size, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(codes), ref_decode(params, codes), rtol=1e-4, atol=1e-4)


def vqgan_error(tmp_path: Path, params: dict[str, torch.Tensor]) -> str:
    tmp_path.mkdir(parents=True)
    with pytest.raises(ValueError) as error:
        convert_vqgan(write_records(tmp_path / "vqgan", params), tmp_path / "out", VQ)
    return str(error.value)


def test_bad_vqgan_checkpoints_name_the_key(tmp_path):
    params = lwm_vqgan_params()
    missing = {k: v for k, v in params.items() if k != "quantize/embeddings"}
    assert "missing 1 VQGAN keys: quantize/embeddings" in vqgan_error(tmp_path / "a", missing)
    key = "decoder/UpsamplingBlock_1/ResnetBlock_0/Conv_2/kernel"  # level 1: 24 -> 16 channels
    message = vqgan_error(tmp_path / "b", {**params, key: params[key].transpose(2, 3)})
    assert key in message and "(1, 1, 16, 24)" in message and "(1, 1, 24, 16)" in message
    extra = {**params, "encoder/DownsamplingBlock_2/Downsample_0/Conv_0/kernel": torch.zeros(3, 3, 24, 24)}
    assert "'encoder/DownsamplingBlock_2/Downsample_0/Conv_0/kernel'" in vqgan_error(tmp_path / "c", extra)


# ------------------------------------------------------------------------------------------------
# The command line


def test_cli_converts_both_and_reports_errors(tmp_path, capsys):
    lm_path = write_records(tmp_path / "params", lwm_lm_params())
    vqgan_path = write_records(tmp_path / "vqgan", lwm_vqgan_params())
    (tmp_path / "lm.json").write_text(LM.model_dump_json())
    (tmp_path / "vq.json").write_text(VQ.model_dump_json())
    out = tmp_path / "out"
    assert convert_main(["--lm", str(lm_path), "--vqgan", str(vqgan_path), "--out", str(out),
                         "--lm-config", str(tmp_path / "lm.json"), "--vqgan-config", str(tmp_path / "vq.json"),
                         "--image-vocab", str(IMAGE_VOCAB)]) == 0
    printed = capsys.readouterr().out
    assert "transformer/h/scan_decoder/attention/wq/kernel" in printed and "LM done" in printed
    assert (out / LM_DIR / "config.json").is_file() and (out / VISION_EMBED_FILE).is_file()
    assert (out / VQGAN_DIR / "model.safetensors").is_file() and not (out / LATENT_ACTION_FILE).exists()
    assert convert_main(["--vqgan", str(lm_path), "--out", str(tmp_path / "bad"),
                         "--vqgan-config", str(tmp_path / "vq.json")]) == 2
    assert "unexpected key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main(["--out", str(tmp_path / "none")])
