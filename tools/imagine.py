"""Neural rollout (the paper's Figure 11): the pretrained VLA picks latent actions, the LAQ decoder renders them.

    python tools/imagine.py --policy POLICY_DIR --laq LAQ_RUN_DIR --image FRAME.png --instruction "..." \\
        --steps 16 --out rollout.mp4
    python tools/imagine.py --policy POLICY_DIR --laq LAQ_RUN_DIR --shards DIR [--clip KEY] [--start T] \\
        [--stride H] --steps 16 --out rollout.gif

POLICY_DIR is a policy directory with a latent head (tools/export.py of a latent-pretraining run) whose latent
vocabulary and length are the LAQ's codebook_size and code_seq_len. Frames are at the LAQ's image_size (S × S;
--upscale repeats pixels); from a clip the video shows the real frames start, start + H, ... on the left (H: the
clip's latent_offset unless --stride) and the imagined ones on the right, S × 2S. The latent action of every step
is written to a JSON next to the video (rollout.mp4 -> rollout.json). Exit 0 on success, 2 on unusable inputs.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapa_dist.eval.imagine import (
    VIDEO_FORMATS,
    check_compatible,
    clip_frames,
    imagine_rollout,
    read_image,
    save_rollout,
)
from lapa_dist.policy import Policy
from lapa_dist.train.laq import load_trained_laq


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="Policy directory with a latent head (tools/export.py).")
    parser.add_argument("--laq", required=True, help="LAQ run directory (its newest complete checkpoint is used).")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--image", help="First frame: an image file.")
    start.add_argument("--shards", help="First frame from a clip of this shard set (shown beside the rollout).")
    parser.add_argument("--clip", help="Clip key in --shards (default: the set's first clip).")
    parser.add_argument("--start", type=int, default=0, help="Frame of the clip the rollout starts from.")
    parser.add_argument("--stride", type=int, help="Real frames per imagined step (default: the clip's H).")
    parser.add_argument("--instruction", help="Task sentence (default with --shards: the clip's instruction).")
    parser.add_argument("--steps", type=int, required=True, help="Imagined steps (frames written: steps + 1).")
    parser.add_argument("--out", required=True, help=f"Video to write, one of {' '.join(VIDEO_FORMATS)}.")
    parser.add_argument("--fps", type=float, default=4.0, help="Frame rate of the video.")
    parser.add_argument("--upscale", type=int, default=1, help="Repeat every pixel this many times per side.")
    parser.add_argument("--device", help="torch device (default: CUDA when available).")
    args = parser.parse_args(argv)
    if args.clip is not None and args.shards is None:
        parser.error("--clip needs --shards")
    if args.image is not None and args.instruction is None:
        parser.error("--image needs --instruction")
    if args.steps < 1 or args.upscale < 1 or args.fps <= 0 or args.start < 0 or (args.stride or 1) < 1:
        parser.error("--steps, --upscale, --stride must be at least 1, --fps positive, --start not negative")
    if Path(args.out).suffix.lower() not in VIDEO_FORMATS:
        parser.error(f"--out {args.out}: must end in one of {' '.join(VIDEO_FORMATS)}")
    return args


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    laq, laq_source = load_trained_laq(args.laq, device)
    size = laq.config.image_size
    if Path(args.out).suffix.lower() == ".mp4" and size * args.upscale % 2:
        raise ValueError(f"an MP4 needs even sides, the LAQ renders {size} px: use --upscale 2 or a .gif")
    info, real = {}, None
    if args.shards is not None:
        real, info = clip_frames(args.shards, args.clip, args.start, args.stride, args.steps + 1, size)
        first = real[0]
    else:
        first = read_image(args.image)
    policy = Policy.from_pretrained(args.policy, device)
    check_compatible(policy, laq)
    instruction = args.instruction if args.instruction is not None else info["instruction"]
    frames, latents = imagine_rollout(policy, laq, first, instruction, args.steps)
    info.update(instruction=instruction, policy=str(args.policy), policy_source=policy.metadata.get("source"),
                policy_image_size=policy.image_size, laq=laq_source)
    video, record = save_rollout(args.out, frames, latents, args.fps, info, real, args.upscale)
    return f"{args.steps} imagined steps at {size}x{size} -> {video} (latents: {record})"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        message = run(args)
    except (OSError, ValueError) as error:  # missing or unreadable files, inputs that do not fit together
        print(f"imagine: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
