"""Running launch/ scripts under the real deepspeed launcher with several CPU ranks (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from lapa_dist.parallel.distributed import deepspeed_launcher

ROOT = Path(__file__).resolve().parent.parent
_next_port = [29700 + os.getpid() % 200]


def free_port() -> int:
    _next_port[0] += 1
    return _next_port[0]


def deepspeed_command(script: str, args: list[str], ranks: int, port: int) -> list[str]:
    return [*deepspeed_launcher(ranks, port), str(ROOT / script), *args]


def environment() -> dict:
    # PYTHONFAULTHANDLER: a rank that gets SIGABRT (see stop_with_stacks) prints every thread's Python stack.
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    # In-process tests that initialise torch.distributed set these in this process (and hold its port): a child
    # that inherited them would rendezvous on that port (EADDRINUSE) or as that rank.
    for name in ("CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def bounded(command: list[str], limit: float) -> list[str]:
    """``command`` under coreutils' timeout, for a process started in a session of its own: at ``limit`` seconds
    its whole process group gets SIGABRT, then SIGKILL 10 s later, even if this process is stuck or gone; without
    it a hung launch outlives a killed pytest and CI waits for it until its own limit."""
    return ["timeout", "--signal=ABRT", "--kill-after=10", str(int(limit)), *command]


def start_launcher(script: str, args: list[str], ranks: int, port: int, output: int,
                   limit: float) -> subprocess.Popen:
    """The launcher in a session of its own, so that killing its process group also ends its ranks; bounded at
    ``limit`` seconds."""
    return subprocess.Popen(bounded(deepspeed_command(script, args, ranks, port), limit), cwd=ROOT,
                            env=environment(), stdout=output, stderr=output, text=True, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``, in pid order (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return sorted(members)


def stop_with_stacks(process: subprocess.Popen, grace: float = 5.0, gap: float = 0.5) -> None:
    """End a hung launch: SIGABRT to the launcher and each rank, one at a time, so each prints its Python stack
    (where a hang in C code was entered from) without interleaving with the others' on the shared pipe; then
    SIGKILL the whole group. The timeout wrapper (``process`` itself) is skipped: on SIGABRT it would pass the
    signal to the whole group at once."""
    for pid in group_members(process.pid):
        if pid != process.pid:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
            time.sleep(gap)
    time.sleep(grace)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # every process had already ended
        pass


def run_deepspeed(script: str, args: list[str], ranks: int, timeout: float = 420) -> subprocess.CompletedProcess:
    process = start_launcher(script, args, ranks, free_port(), subprocess.PIPE, limit=timeout + 30)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_with_stacks(process)
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(f"{script} did not finish within {timeout} s; the stacks of its processes end "
                             f"stderr:\n{stdout[-4000:]}\n{stderr[-20000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"{script} failed ({process.returncode}):\n{stdout[-4000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_until_then_kill(script: str, args: list[str], ranks: int, ready: Path, timeout: float = 600) -> None:
    """Start the launcher, wait until ``ready`` exists, then kill -9 the whole process group."""
    process = start_launcher(script, args, ranks, free_port(), subprocess.DEVNULL, limit=timeout + 30)
    deadline = time.time() + timeout
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"{script} exited ({process.returncode}) before {ready} appeared")
            if time.time() > deadline:
                raise AssertionError(f"{ready} did not appear within {timeout} s")
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
