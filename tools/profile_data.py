"""Loader throughput against bare PyAV decoding of the same clips, on the same cores, in one run.

    python tools/profile_data.py --shards DIR [--offset-frames 3] [--image-size 64] [--seconds 20]

Measures, for 0, 1 and 2 loader workers, pairs/s of lapa_dist's VideoLoader (PyAV decoder), and as
the reference, pairs/s and decoded frames/s of N plain processes that read the tars, decode each clip
once with PyAV up to its last needed frame and cut the same number of pairs (no framework). Prints a
JSON line per measurement and, with --markdown FILE, appends a table with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import multiprocessing
import os
import platform
import tarfile
import time
from pathlib import Path

import av
import numpy as np

from lapa_dist.data.config import DataConfig
from lapa_dist.data.format import Manifest
from lapa_dist.data.loader import VideoLoader


def bare_worker(args) -> tuple[int, int, float, float]:
    """Reference: decode each clip once and cut pairs with nothing but tarfile, json, PyAV and numpy."""
    shard_paths, offset, size, pairs_per_clip, deadline, seed = args
    rng = np.random.default_rng(seed)
    reformatter = av.video.reformatter.VideoReformatter()  # reused: it caches its swscale context
    pairs = frames_decoded = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for path in itertools.cycle(shard_paths):
        for members in tar_samples(path):
            num_frames = json.loads(members["json"])["num_frames"]
            starts = rng.choice(num_frames - offset, min(pairs_per_clip, num_frames - offset), replace=False)
            last = int(starts.max()) + offset
            wanted = set(starts.tolist()) | set((starts + offset).tolist())
            frames = {}
            with av.open(io.BytesIO(members["mp4"])) as container:
                container.streams.video[0].thread_type = "NONE"  # the loader's setting: same decoder work
                for index, frame in enumerate(container.decode(video=0)):
                    if index in wanted:
                        frames[index] = reformatter.reformat(
                            frame, width=size, height=size, format="rgb24"
                        ).to_ndarray()
                    if index >= last:
                        break
            frames_decoded += last + 1
            pairs += len(np.stack([np.stack([frames[t], frames[t + offset]]) for t in starts.tolist()]))
            if time.perf_counter() > deadline:
                return pairs, frames_decoded, time.perf_counter() - start, time.process_time() - cpu_start
    raise AssertionError("unreachable")


def tar_samples(path):
    """Members of each sample of a tar, as {extension: bytes}."""
    current_key, members = None, {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, extension = info.name.partition(".")
            if key != current_key and members:
                yield members
                members = {}
            current_key = key
            members[extension] = tar.extractfile(info).read()
    if members:
        yield members


def measure_bare(shard_paths, processes, offset, size, pairs_per_clip, seconds) -> dict:
    deadline = time.perf_counter() + seconds
    jobs = [
        (shard_paths[i::processes] or shard_paths, offset, size, pairs_per_clip, deadline, i) for i in range(processes)
    ]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(bare_worker, jobs)
    elapsed = max(r[2] for r in results)
    pairs = sum(r[0] for r in results)
    return {
        "what": f"bare PyAV, {processes} processes",
        "pairs_per_s": pairs / elapsed,
        "frames_per_s": sum(r[1] for r in results) / elapsed,
        "pairs_per_cpu_s": pairs / sum(r[3] for r in results),
    }


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_loader(config: DataConfig, workers: int, seconds: float) -> dict:
    loader = VideoLoader(config.model_copy(update={"num_workers": workers}))
    iterator = iter(loader)
    next(iterator)  # start-up (worker fork, first block) is not throughput
    worker_pids = loader.worker_pids
    cpu_start = time.process_time() + sum(process_cpu_seconds(pid) for pid in worker_pids)
    pairs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pairs += len(next(iterator)["key"])
    elapsed = time.perf_counter() - start
    cpu = time.process_time() + sum(process_cpu_seconds(pid) for pid in worker_pids) - cpu_start
    return {"what": f"VideoLoader, {workers} workers", "pairs_per_s": pairs / elapsed, "pairs_per_cpu_s": pairs / cpu}


def median_row(runs: list[dict]) -> dict:
    row = {"what": runs[0]["what"]}
    for key in ("pairs_per_s", "frames_per_s", "pairs_per_cpu_s"):
        if key in runs[0]:
            row[key] = float(np.median([r[key] for r in runs]))
            row[key.replace("_per_s", "_range")] = (min(r[key] for r in runs), max(r[key] for r in runs))
    return row


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--offset-frames", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pairs-per-clip", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="Per-rank batch (the reference LAQ uses 64).")
    parser.add_argument("--seconds", type=float, default=10, help="Length of each measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved repetitions; medians are reported.")
    parser.add_argument("--markdown", help="Append a results table to this file (e.g. docs/perf.md).")
    args = parser.parse_args(argv)
    manifest = Manifest.read(args.shards)
    shard_paths = [str(Path(args.shards) / s.name) for s in manifest.shards]
    config = DataConfig(
        datasets=[{"name": "profile", "path": args.shards, "offset_frames": args.offset_frames}],
        image_size=args.image_size,
        samples_per_clip=args.pairs_per_clip,
        batch_size=args.batch_size,
    )
    # This VM's single-core speed drifts between runs (seen: 2,700 vs 4,500 pairs/s for the same code), so
    # the configurations are interleaved over several rounds and each is reported by its median.
    measurements: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for workers in (0, 1, 2):
            row = measure_loader(config, workers, args.seconds)
            measurements.setdefault(row["what"], []).append(row)
            print(json.dumps({"round": round_index, **row}), flush=True)
        for processes in (1, 2):
            row = measure_bare(
                shard_paths, processes, args.offset_frames, args.image_size, args.pairs_per_clip, args.seconds
            )
            measurements.setdefault(row["what"], []).append(row)
            print(json.dumps({"round": round_index, **row}), flush=True)
    rows = [median_row(runs) for runs in measurements.values()]
    ratio = rows[2]["pairs_per_s"] / rows[4]["pairs_per_s"]
    print(f"median over {args.rounds} rounds: loader with 2 workers / bare PyAV with 2 processes: {ratio:.2f}")
    if args.markdown:
        write_markdown(args, manifest, rows, ratio)
    return 0


def write_markdown(args, manifest: Manifest, rows: list[dict], ratio: float) -> None:
    lines = [
        f"\n### Loader throughput, {datetime.date.today()}, {machine()}\n",
        f"`python tools/profile_data.py --shards {args.shards} --offset-frames {args.offset_frames} "
        f"--image-size {args.image_size} --pairs-per-clip {args.pairs_per_clip} --batch-size {args.batch_size} "
        f"--seconds {args.seconds} --rounds {args.rounds}` "
        f"({manifest.clips} clips, {manifest.frames} frames, source {manifest.source})\n",
        f"Medians of {args.rounds} interleaved rounds of {args.seconds:g} s (min-max in brackets).\n",
        "| what | pairs/s | decoded frames/s |",
        "|---|---|---|",
    ]
    for row in rows:
        low, high = row["pairs_range"]
        frames = f"{row['frames_per_s']:.0f}" if "frames_per_s" in row else "-"
        lines.append(f"| {row['what']} | {row['pairs_per_s']:.0f} ({low:.0f}-{high:.0f}) | {frames} |")
    lines.append(f"\nLoader (2 workers) / bare PyAV (2 processes): **{ratio:.2f}**\n")
    with open(args.markdown, "a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
