"""Throughput of one stage of the system, as one JSON object (and optionally a table in docs/perf.md).

    python tools/profile_throughput.py --stage laq --config configs/laq/metaworld.json [--steps 10]
        [--warmup 2] [--batch-size 32] [--with-data] [--peak-tflops T] [--markdown docs/perf.md] [--json OUT]
    python tools/profile_throughput.py --stage data --config CONFIG [--seconds 10] [--batch-size B]
    python tools/profile_throughput.py --stage kernels [--markdown docs/perf.md]
    python tools/profile_throughput.py --stage pretrain --config configs/vla/tiny_pretrain.json
        --set tokenizer=DIR [--set model.backbone.num_layers=4 ...] [--steps 10] [--warmup 2] [--batch-size B]
        [--instruction TEXT] [--with-data] [--count-flops] [--peak-tflops T] [--markdown docs/perf.md] [--json OUT]
    deepspeed --num_gpus 8 tools/profile_throughput.py --stage finetune --config CONFIG ...   # every rank profiles

laq: trains the config's LAQ (plain torch AdamW, single process) on a synthetic uint8 batch made on the
device, or with --with-data on the config's loader; reports samples/s, the step-time breakdown, peak memory,
parameters, FLOPs per sample (counted with FlopCounterMode) and MFU where the GPU's peak is known
(lapa_dist/profiling.py). data: the config's VideoLoader against bare PyAV (tools/profile_data.py). kernels:
the Triton kernels against their references (tools/bench_kernels.py; on a machine without a CUDA GPU its dry
run, which is labelled as such and is not a benchmark). pretrain, finetune: the VLA training step through the
config's DeepSpeed engine and tensor-parallel layout (a world of one as plain python, every rank under the
deepspeed launcher) on synthetic batches of the configured shape, or with --with-data on the config's loader;
reports tokens/s per rank, samples/s, the step-time breakdown, analytic model FLOPs per token (the vision
tower's per image), achieved TFLOP/s per rank and MFU (lapa_dist/profiling.py documents the formula). Rank 0
prints the JSON object as the last line of stdout (DeepSpeed logs before it) and writes --json/--markdown.

Each stage is a function of the parsed arguments returning its JSON object, registered in STAGES.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python tools/profile_throughput.py`: make `tools.*` importable
    sys.path.insert(0, str(REPO_ROOT))

from lapa_dist.config import ConfigError, add_config_arguments, config_from_args
from lapa_dist.data.format import Manifest
from lapa_dist.profiling import (
    DEFAULT_INSTRUCTION,
    LAQ_SECTION,
    VLA_SECTION,
    append_markdown,
    laq_markdown,
    profile_laq,
    profile_vla,
    vla_markdown,
)
from lapa_dist.train.laq import LAQRunConfig
from lapa_dist.train.vla import VLARunConfig
from tools import bench_kernels, profile_data

DATA_SECTION = "## Data loader throughput"


def load_stage_config(args: argparse.Namespace, config_class: type = LAQRunConfig):
    if args.config is None:
        raise ConfigError(f"--stage {args.stage} needs --config")
    if args.batch_size is not None:
        args.overrides.append(f"data.batch_size={args.batch_size}")
    return config_from_args(config_class, args)


def laq_stage(args: argparse.Namespace) -> dict:
    result = profile_laq(load_stage_config(args), args.steps, args.warmup, args.with_data, args.peak_tflops)
    result["config"] = args.config
    if args.markdown:
        append_markdown(args.markdown, LAQ_SECTION, laq_markdown(result, args.config, args.command, args.note))
    return result


def bare_reference(data, seconds: float) -> tuple[dict | None, str]:
    """Bare PyAV on the config's single dataset with as many processes as loader workers (at least 1)."""
    spec = data.datasets[0]
    if len(data.datasets) != 1 or spec.offset_frames is None:
        return None, "bare PyAV reference skipped: it needs exactly one dataset with offset_frames"
    shards = [str(Path(spec.path) / shard.name) for shard in Manifest.read(spec.path).shards]
    processes = max(1, data.num_workers)
    row = profile_data.measure_bare(shards, processes, spec.offset_frames, data.image_size, data.samples_per_clip,
                                    seconds)
    return row, f"bare PyAV reference: {processes} processes on the same shards"


def data_stage(args: argparse.Namespace) -> dict:
    data = load_stage_config(args).data
    rows = [profile_data.measure_loader(data, data.num_workers, args.seconds)]
    bare, note = bare_reference(data, args.seconds)
    rows += [bare] if bare else []
    result = {"stage": "data", "device": profile_data.machine(), "date": datetime.date.today().isoformat(),
              "config": args.config, "batch_size": data.batch_size, "seconds": args.seconds, "rows": rows,
              "note": note}
    if args.markdown:
        lines = ["", f"### {result['date']}, {result['device']}, `{args.config}`", "",
                 f"`{args.command}`: one {args.seconds:g} s measurement each; {note}.", "",
                 "| what | pairs/s | pairs per CPU-second |", "|---|---|---|"]
        lines += [f"| {row['what']} | {row['pairs_per_s']:.0f} | {row['pairs_per_cpu_s']:.0f} |" for row in rows]
        append_markdown(args.markdown, DATA_SECTION, lines)
    return result


def kernels_stage(args: argparse.Namespace) -> dict:
    dry_run = not torch.cuda.is_available()
    rows = [bench_kernels.measure(case, mode, dry_run, args.peak_tbps)
            for case in bench_kernels.cases(dry_run) for mode in bench_kernels.MODES]
    if args.markdown:
        bench_kernels.write_markdown(args.markdown, rows, dry_run, args.peak_tbps)
    note = ("no CUDA GPU: tools/bench_kernels.py --dry-run, tiny CPU shapes, a plumbing check and NOT a benchmark"
            if dry_run else "tools/bench_kernels.py on the GPU")
    return {"stage": "kernels", "device": bench_kernels.device_name(dry_run), "date": datetime.date.today().isoformat(),
            "dry_run": dry_run, "note": note, "rows": rows}


def vla_stage(args: argparse.Namespace) -> dict | None:
    """pretrain / finetune on every rank; the result on rank 0, None on the others."""
    if not args.instruction.strip():
        raise ConfigError("--instruction must not be empty")
    config = load_stage_config(args, VLARunConfig)
    if config.stage != args.stage:
        raise ConfigError(f"--stage {args.stage} but {args.config} is a {config.stage!r} config")
    result = profile_vla(config, args.steps, args.warmup, args.with_data, args.peak_tflops, args.instruction,
                         args.count_flops)
    if result is None:
        return None
    result["config"], result["overrides"] = args.config, args.overrides
    if args.markdown:
        append_markdown(args.markdown, VLA_SECTION, vla_markdown(result, args.config, args.command, args.note))
    return result


STAGES = {"data": data_stage, "laq": laq_stage, "kernels": kernels_stage, "pretrain": vla_stage,
          "finetune": vla_stage}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="laq, pretrain, finetune: measured training steps.")
    parser.add_argument("--warmup", type=int, default=2, help="laq, pretrain, finetune: unmeasured steps first "
                        "(>= 1; laq counts the FLOPs in the first, and so does --count-flops).")
    parser.add_argument("--batch-size", type=int, help="Per-process (micro-)batch (overrides data.batch_size).")
    parser.add_argument("--with-data", action="store_true", help="laq, pretrain, finetune: read batches with the "
                        "config's loader (finetune also fits the action tokenizer on the data).")
    parser.add_argument("--peak-tflops", type=float, help="Peak TFLOP/s per device for MFU (default: the GPU "
                        "table; required for MFU on CPU).")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="pretrain, finetune: the instruction "
                        "of the synthetic batches (its prompt sets the sequence length).")
    parser.add_argument("--count-flops", action="store_true", help="pretrain, finetune: also count the first "
                        "warm-up step with FlopCounterMode, a check of the analytic FLOPs.")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--seconds", type=float, default=10, help="data: length of each measurement.")
    parser.add_argument("--peak-tbps", type=float, default=3.35, help="kernels: memory roofline (H100 SXM HBM3).")
    parser.add_argument("--markdown", help="Append a results table to this file (e.g. docs/perf.md).")
    parser.add_argument("--note", help="A sentence for the markdown table (e.g. what else loaded the machine).")
    parser.add_argument("--json", help="Also write the result object to this file.")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first warm-up step counts the FLOPs)")
    args.command = shown_command(sys.argv[1:] if argv is None else argv)
    return args


def shown_command(argv: list[str]) -> str:
    """The command line for the markdown, less --note (printed on its own), --json (a local path) and the
    deepspeed launcher's --local_rank."""
    shown = []
    for arg, previous in zip(argv, [None, *argv]):
        if arg.startswith("--local_rank") or previous == "--local_rank":
            continue
        if arg not in ("--note", "--json") and previous not in ("--note", "--json"):
            shown.append(arg)
    return shlex.join(["python", "tools/profile_throughput.py", *shown])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = STAGES[args.stage](args)
    except ConfigError as error:
        print(f"profile_throughput: {error}", file=sys.stderr)
        return 2
    if result is None:  # a rank other than 0 of a multi-rank VLA profile
        return 0
    print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
