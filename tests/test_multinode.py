"""Multi-node launching, tested as two "nodes" on this machine (gloo CPU ranks).

Two DeepSpeed launchers started with ``--no_ssh --node_rank 0/1`` and launch/hostfile.example train latent
pretraining under ZeRO-3 as one world of two ranks, with the losses of a single launcher's two-rank run; then
launch/slurm.sbatch, run with stand-ins for srun (one task per "node", SLURM_NODEID set) and scontrol, resumes
that run as a requeued job would and finishes with the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lapa_dist.parallel.distributed import deepspeed_launcher
from lapa_dist.train.metrics import TIMING_KEYS
from tests.launch_helpers import ROOT, bounded, deepspeed_command, environment, free_port
from tests.tiny_tokenizer import save_tiny_tokenizer
from tests.vla_helpers import PRETRAIN, labelled_sprites

HOSTFILE = ROOT / "launch/hostfile.example"
SBATCH = ROOT / "launch/slurm.sbatch"
SCRIPT = "launch/pretrain.py"
# DeepSpeed 0.19.8 runner options a no-ssh multi-node launch needs (deepspeed/launcher/runner.py)
RUNNER_FLAGS = ("--hostfile", "--num_nodes", "--num_gpus", "--node_rank", "--master_addr", "--master_port",
                "--no_ssh")
STEPS = ("train.steps=10", "train.save_every=5")
HALF = ("train.steps=5", "train.save_every=5")
TIMEOUT = 120
# both "nodes" give their one rank CUDA_VISIBLE_DEVICES=0: on a GPU machine NCCL would get two ranks on one device
cpu_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="two 'nodes' on one machine need CPU (gloo) ranks")

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drops srun's options, runs the command once per "node" here, with SLURM_NODEID set
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" > "$FAKE_SRUN_LOGS/node$node.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || exit 2
printf '127.0.0.1\\nnode2\\n'
"""


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS + ("tokens_per_s",)} for r in records]


def set_args(assets: dict, *overrides: str) -> list[str]:
    """The ``--set`` arguments of the tiny pretraining run (the template adds --config and --run-dir itself)."""
    pairs = (f"data.datasets.0.path={assets['data']}", f"tokenizer={assets['tokenizer']}", *overrides)
    return [arg for pair in pairs for arg in ("--set", pair)]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(bounded(command, TIMEOUT + 30), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(processes: list[subprocess.Popen], logs: list[Path], timeout: float = TIMEOUT) -> None:
    """Wait for every process; on a failure or the timeout kill all their process groups and show the logs."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.time() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    codes = [p.returncode for p in processes]
    if codes != [0] * len(processes):
        tails = "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs if log.exists())
        raise AssertionError(f"exit codes {codes} (timeout {timeout} s)\n{tails}")


def node_command(node: int, port: int, args: list[str]) -> list[str]:
    return [*deepspeed_launcher(1, port), "--hostfile", str(HOSTFILE), "--num_nodes", "2", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--no_ssh", str(ROOT / SCRIPT), *args]


def assert_two_node_launch(logs: list[Path], mapping: str) -> None:
    for node, log in enumerate(logs):
        text = log.read_text()
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text, text[-3000:]
        assert "dist_world_size=2" in text and mapping in text, text[-3000:]


def assert_checkpoint_of_two_ranks(checkpoint: Path) -> None:
    names = sorted(p.name for p in checkpoint.iterdir())
    assert [n for n in names if n.startswith("extra_rank")] == ["extra_rank0.pt", "extra_rank1.pt"], names
    assert "COMPLETE" in names and "zero_pp_rank_1_mp_rank_00_model_states.pt" in names, names


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode_assets")
    return {"data": labelled_sprites(root / "data"), "tokenizer": save_tiny_tokenizer(root / "tokenizer")}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict:
    """Started together: 10 steps on two ranks of one launcher (the reference), and 5 steps on two launchers,
    one per "node", with the example hostfile."""
    root = tmp_path_factory.mktemp("runs")
    single, two_nodes, port, single_port = root / "single", root / "two_nodes", free_port(), free_port()
    logs = [root / "single.log", root / "node0.log", root / "node1.log"]
    half = ["--config", str(PRETRAIN), "--run-dir", str(two_nodes), *set_args(assets, *HALF)]
    processes = [start(deepspeed_command(SCRIPT, ["--config", str(PRETRAIN), "--run-dir", str(single),
                                                  *set_args(assets, *STEPS)], ranks=2, port=single_port),
                       environment(), logs[0])]
    processes += [start(node_command(node, port, half), environment(), logs[1 + node]) for node in range(2)]
    wait_all(processes, logs)
    assert_checkpoint_of_two_ranks(single / "checkpoints" / "step-00000010")
    return {"reference": metrics(single), "run_dir": two_nodes, "logs": logs[1:]}


def test_hostfile_example_is_two_nodes_of_eight_gpus():
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(HOSTFILE)) == {"node1": 8, "node2": 8}


def test_slurm_template_is_bash_with_the_runner_flags_deepspeed_accepts(monkeypatch):
    from deepspeed.launcher import runner

    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "scontrol show hostnames" in text and '\nsrun "${SRUN_OPTIONS[@]}" bash -c \'' in text
    per_node = text.split("bash -c '", 1)[1].split("'", 1)[0]  # what srun runs on every node
    for flag in RUNNER_FLAGS:
        assert f"{flag} " in per_node, flag
    assert '--node_rank "$SLURM_NODEID"' in per_node and '--num_nodes "$SLURM_NNODES"' in per_node
    args = runner.parse_args(["--hostfile", "h", "--num_nodes", "2", "--num_gpus", "8", "--node_rank", "1",
                              "--master_addr", "node1", "--master_port", "29600", "--no_ssh", SCRIPT, "--config", "c"])
    assert (args.no_ssh, args.node_rank, args.num_nodes, args.num_gpus) == (True, 1, 2, 8)
    assert args.user_script == SCRIPT and args.user_args == ["--config", "c"]
    # why the template writes a hostfile: without one the runner refuses more than one node
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match="no extra nodes available via hostfile"):
        runner.main(["--hostfile", "/nonexistent", "--num_nodes", "2", "--num_gpus", "1", "--node_rank", "1",
                     "--master_addr", "127.0.0.1", "--no_ssh", SCRIPT])


@cpu_ranks
def test_two_launchers_with_node_ranks_train_as_one_world_of_two(runs):
    run_dir, reference = runs["run_dir"], runs["reference"]
    assert_two_node_launch(runs["logs"], "{'node1': [0], 'node2': [1]}")  # ranks placed by the example hostfile
    assert_checkpoint_of_two_ranks(run_dir / "checkpoints" / "step-00000005")
    assert json.loads((run_dir / "config.json").read_text())["deepspeed"]["zero_stage"] == 3
    assert metrics(run_dir) == [r for r in reference if r["step"] <= 5]


@cpu_ranks
def test_requeued_slurm_job_resumes_the_two_node_run(runs, assets, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["run_dir"], run_dir)
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = environment()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SRUN_LOGS=str(log_dir), SLURM_JOB_ID="4242",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT="1",
               RUN_DIR=str(run_dir), CONFIG=str(PRETRAIN), VENV=str(Path(sys.executable).parent.parent),
               GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    env.pop("SLURM_CPUS_PER_TASK", None)
    batch_log = tmp_path / "batch.log"
    logs = [log_dir / f"node{node}.log" for node in range(2)]
    wait_all([start(["bash", str(SBATCH), *set_args(assets, *STEPS)], env, batch_log)], [batch_log, *logs])

    assert "job 4242 (restart 1): 2 nodes x 1 ranks, master 127.0.0.1" in batch_log.read_text()
    assert (run_dir / "hostfile").read_text() == "127.0.0.1 slots=1\nnode2 slots=1\n"
    assert_two_node_launch(logs, "{'127.0.0.1': [0], 'node2': [1]}")
    assert "resumed from step-00000005" in logs[0].read_text()
    assert_checkpoint_of_two_ranks(run_dir / "checkpoints" / "step-00000010")
    assert metrics(run_dir) == runs["reference"]
