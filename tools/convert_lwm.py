"""Convert LWM's JAX checkpoints (HF LargeWorldModel/LWM-Chat-1M-Jax: ``params``, ``vqgan``) to PyTorch.

    python tools/convert_lwm.py --lm PARAMS --vqgan VQGAN_PARAMS --out DIR [--lm-config 7b|CONFIG.json]

Either input may be left out, not both. Writes DIR/lm (HF LLaMA), DIR/vision_embed.safetensors
(image_embed.weight, image_head.weight), DIR/latent_action.safetensors for LAPA checkpoints, and DIR/vqgan
(VQGAN.save_pretrained); lapa_dist/models/lwm_convert.py says what each holds. No jax is needed.
Exit 0 when everything was written, 2 when an input cannot be converted.
"""

import argparse
import sys

import torch

from lapa_dist.config import ConfigError, load_config
from lapa_dist.models.llama import LlamaConfig
from lapa_dist.models.lwm_convert import LWM_IMAGE_VOCAB, convert_lm, convert_vqgan
from lapa_dist.models.vqgan import VQGANConfig

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def log(message: str) -> None:
    print(message, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", help="LWM/LAPA LM params file (tux StreamingCheckpointer msgpack).")
    parser.add_argument("--vqgan", help="LWM VQGAN params file (pickle or flax msgpack).")
    parser.add_argument("--out", required=True, help="Output directory (created; existing lm/ or vqgan/ refused).")
    parser.add_argument("--lm-config", default="7b",
                        help="'7b' (LWM-Chat-1M: LlamaConfig defaults) or a LlamaConfig JSON file.")
    parser.add_argument("--vqgan-config", default=None, help="VQGANConfig JSON file (default: LWM's VQGAN).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep",
                        help="dtype of the LM tensors written (keep: the checkpoint's, bf16 for LWM).")
    parser.add_argument("--image-vocab", type=int, default=LWM_IMAGE_VOCAB,
                        help="Rows of vte and vision_head in the checkpoint (LWM: 8448).")
    parser.add_argument("--image-rows", type=int, default=None,
                        help="Keep only the first rows of the image embedding and head (e.g. 8194); default all.")
    args = parser.parse_args(argv)
    if args.lm is None and args.vqgan is None:
        parser.error("give --lm, --vqgan or both")
    try:
        if args.lm is not None:
            config = LlamaConfig() if args.lm_config == "7b" else load_config(LlamaConfig, args.lm_config)
            log(f"LM: {args.lm} ({config.num_layers} layers, hidden {config.hidden_size}, "
                f"RoPE theta {config.rope_theta:g})")
            result = convert_lm(args.lm, args.out, config, DTYPES[args.dtype], args.image_vocab, args.image_rows,
                                log=log)
            log(f"LM done: {result.num_params:,} parameters ({str(result.dtype).removeprefix('torch.')})")
        if args.vqgan is not None:
            vqgan_config = load_config(VQGANConfig, args.vqgan_config)
            log(f"VQGAN: {args.vqgan}")
            convert_vqgan(args.vqgan, args.out, vqgan_config, log=log)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"convert_lwm: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
