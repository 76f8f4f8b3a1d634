"""Closed-loop evaluation of action policies on Meta-World's "eval" layouts.

A policy is anything with ``predict(images, instructions) -> actions`` (:class:`ActionPolicy`); it
sees exactly what training data holds: the ``camera`` render at ``resolution`` (uint8 [B, H, W, 3])
and the task's instruction sentence. Episodes run on ``layout_seed("eval", seed, task, episode)``,
a layout stream disjoint from the training split's for every seed.

Work unit = one (task, episode). With ``processes > 1`` units go to a spawn pool; each worker builds
its own policy from the picklable ``policy_factory`` (a zero-argument callable) and one env per task.
An episode ends at the first ``info["success"]`` or after ``max_steps`` actions.

Privileged policies: a policy with ``needs_state = True`` is also handed the simulator observation
(float [B, 39]: hand, gripper, object and goal positions) as ``states=``. Only
:class:`ScriptedExpertPolicy` does this; its success rate is an oracle reference for the harness
and the tasks, not a number comparable to an image-only policy's.

    python launch/evaluate.py --policy expert --env metaworld --tasks MT10 --episodes 10 --seed 0
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lapa_dist.data.video import encode_video
from lapa_dist.envs.metaworld import (
    ACTION_DIM,
    INSTRUCTIONS,
    MAX_EPISODE_STEPS,
    MetaWorldEnv,
    ScriptedExpert,
    check_camera,
    check_resolution,
    check_task,
    layout_seed,
)

SPLIT = "eval"  # never "train": training demos come from the other layout stream
WILSON_Z_95 = 1.959963984540054  # two-sided 95% normal quantile
TASK_OF_INSTRUCTION = {sentence: task for task, sentence in INSTRUCTIONS.items()}


@runtime_checkable
class ActionPolicy(Protocol):
    """What the evaluator drives. ``reset(episode_seed)`` is optional and called before each episode
    (stochastic policies seed themselves from it, so results do not depend on process scheduling)."""

    def predict(self, images: np.ndarray, instructions: list[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] + B instructions -> float actions [B, ACTION_DIM] in [-1, 1]."""
        ...


PolicyFactory = Callable[[], ActionPolicy]


class ScriptedExpertPolicy:
    """Meta-World's scripted experts behind :class:`ActionPolicy`. Privileged: it ignores the images
    and acts on the simulator state (``needs_state``), picking the task's expert from the instruction."""

    needs_state = True

    def __init__(self):
        self._experts: dict[str, ScriptedExpert] = {}

    def predict(self, images: np.ndarray, instructions: list[str], states: np.ndarray | None = None) -> np.ndarray:
        if states is None:
            raise ValueError("the scripted expert acts on simulator states; pass states= (it cannot use images)")
        return np.stack([self._expert(text)(state) for text, state in zip(instructions, states, strict=True)])

    def _expert(self, instruction: str) -> ScriptedExpert:
        if instruction not in TASK_OF_INSTRUCTION:
            raise ValueError(f"no Meta-World task has the instruction {instruction!r}")
        task = TASK_OF_INSTRUCTION[instruction]
        if task not in self._experts:
            self._experts[task] = ScriptedExpert(task)
        return self._experts[task]


class UniformRandomPolicy:
    """Actions drawn uniformly from [-1, 1]^ACTION_DIM; ignores its inputs (a floor baseline)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self, episode_seed: int) -> None:
        self._rng = np.random.default_rng([self.seed, episode_seed])

    def predict(self, images: np.ndarray, instructions: list[str]) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, size=(len(images), ACTION_DIM)).astype(np.float32)


def wilson_interval(successes: int, trials: int, z: float = WILSON_Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes ({successes}) must lie in [0, trials ({trials})]")
    if trials == 0:
        return 0.0, 1.0
    rate = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    low, high = max(0.0, centre - half_width), min(1.0, centre + half_width)
    # Exact at the edges (the formula gives them up to rounding).
    return (0.0 if successes == 0 else low), (1.0 if successes == trials else high)


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    episode: int
    layout_seed: int
    camera: str
    resolution: int
    max_steps: int
    record_video: bool


@dataclass
class EpisodeResult:
    task: str
    episode: int
    layout_seed: int
    success: bool
    length: int  # actions taken: up to and including the first success, else max_steps
    video: bytes | None = field(default=None, repr=False)


_WORKER: dict = {}  # per process: the policy and one env per (task, camera, resolution)


def _init_worker(policy_factory: PolicyFactory, threads: int | None = None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _release_worker()
    _WORKER["policy"], _WORKER["envs"] = policy_factory(), {}


def _release_worker() -> None:
    for env in _WORKER.get("envs", {}).values():
        env.close()
    _WORKER.clear()


def _env_for(spec: EpisodeSpec) -> MetaWorldEnv:
    key = (spec.task, spec.camera, spec.resolution)
    if key not in _WORKER["envs"]:
        _WORKER["envs"][key] = MetaWorldEnv(spec.task, spec.camera, spec.resolution)
    return _WORKER["envs"][key]


def _act(policy: ActionPolicy, frame: np.ndarray, instruction: str, state: np.ndarray) -> np.ndarray:
    if getattr(policy, "needs_state", False):
        actions = policy.predict(frame[None], [instruction], states=state[None])
    else:
        actions = policy.predict(frame[None], [instruction])
    actions = np.asarray(actions, dtype=np.float64)
    if actions.shape != (1, ACTION_DIM) or not np.isfinite(actions).all():
        raise ValueError(f"policy returned {actions.shape} actions (finite expected): need [1, {ACTION_DIM}]")
    return actions[0]


def run_episode(spec: EpisodeSpec) -> EpisodeResult:
    """One episode in this process's env with this process's policy (see :func:`_init_worker`)."""
    policy, env = _WORKER["policy"], _env_for(spec)
    if hasattr(policy, "reset"):
        policy.reset(spec.layout_seed)
    state = env.reset(spec.layout_seed)
    frame = env.render()
    frames = [frame] if spec.record_video else None
    success, length = False, 0
    while length < spec.max_steps and not success:
        result = env.step(_act(policy, frame, env.instruction, state))
        state, success, length = result.observation, result.success, length + 1
        frame = env.render()
        if frames is not None:
            frames.append(frame)
    video = encode_video(np.stack(frames), env.control_fps) if frames is not None else None
    return EpisodeResult(spec.task, spec.episode, spec.layout_seed, success, length, video)


@dataclass
class TaskResult:
    task: str
    instruction: str
    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_length: float
    lengths: list[int]
    layout_seeds: list[int]

    @classmethod
    def from_episodes(cls, task: str, episodes: list[EpisodeResult]) -> TaskResult:
        episodes = sorted(episodes, key=lambda result: result.episode)
        successes = sum(result.success for result in episodes)
        lengths = [result.length for result in episodes]
        return cls(task, INSTRUCTIONS[task], len(episodes), successes, successes / len(episodes),
                   wilson_interval(successes, len(episodes)), float(np.mean(lengths)), lengths,
                   [result.layout_seed for result in episodes])


@dataclass
class EvalResults:
    config: dict
    tasks: list[TaskResult]
    videos: list[str]  # files written under video_dir

    @property
    def mean_success_rate(self) -> float:
        """Mean of the per-task rates (equal episodes per task, so also the pooled rate)."""
        return float(np.mean([task.success_rate for task in self.tasks]))

    @property
    def mean_ci95(self) -> tuple[float, float]:
        """Wilson interval of the pooled episodes (all tasks together)."""
        return wilson_interval(sum(t.successes for t in self.tasks), sum(t.episodes for t in self.tasks))

    def to_json(self) -> dict:
        return {"config": self.config, "mean_success_rate": self.mean_success_rate, "mean_ci95": list(self.mean_ci95),
                "tasks": [asdict(task) for task in self.tasks], "videos": self.videos}

    def to_markdown(self) -> str:
        rows = ["| task | success | rate | 95% CI (Wilson) | mean length |", "|---|---|---|---|---|"]
        for t in self.tasks:
            rows.append(f"| {t.task} | {t.successes}/{t.episodes} | {t.success_rate:.1%} | "
                        f"[{t.ci95[0]:.1%}, {t.ci95[1]:.1%}] | {t.mean_length:.1f} |")
        total, low_high = sum(t.episodes for t in self.tasks), self.mean_ci95
        rows.append(f"| **mean** | {sum(t.successes for t in self.tasks)}/{total} | {self.mean_success_rate:.1%} | "
                    f"[{low_high[0]:.1%}, {low_high[1]:.1%}] | "
                    f"{np.mean([t.mean_length for t in self.tasks]):.1f} |")
        return "\n".join(rows) + "\n"

    def write(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(self.to_json(), indent=1))
        (out_dir / "results.md").write_text(self.to_markdown())


def episode_specs(tasks: list[str], episodes_per_task: int, seed: int, camera: str, resolution: int,
                  max_steps: int, videos_per_task: int) -> list[EpisodeSpec]:
    """The work units, validated; layouts from the "eval" split only."""
    if not tasks:
        raise ValueError("tasks: expected at least one task")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if not 1 <= max_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_steps {max_steps}: expected 1..{MAX_EPISODE_STEPS} (Meta-World's limit)")
    camera, resolution = check_camera(camera), check_resolution(resolution)
    return [EpisodeSpec(check_task(task), episode, layout_seed(SPLIT, seed, task, episode), camera, resolution,
                        max_steps, episode < videos_per_task)
            for task in tasks for episode in range(episodes_per_task)]


def _run_all(policy_factory: PolicyFactory, specs: list[EpisodeSpec], processes: int) -> list[EpisodeResult]:
    if processes > 1 and len(specs) > 1:
        workers = min(processes, len(specs))
        # torch's default of one thread per core in every worker oversubscribes the cores (measured on 2 cores,
        # 2 workers: a 200-episode evaluation of the reproduction was still running after 29 min; ~7 min this way)
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, _init_worker, (policy_factory, threads)) as pool:
            return pool.map(run_episode, specs, chunksize=1)
    _init_worker(policy_factory)
    try:
        return [run_episode(spec) for spec in specs]
    finally:
        _release_worker()


def evaluate(policy_factory: PolicyFactory, tasks: list[str], episodes_per_task: int, seed: int,
             camera: str = "corner", resolution: int = 64, max_steps: int = 200, processes: int = 1,
             video_dir: str | Path | None = None, videos_per_task: int = 1) -> EvalResults:
    """Run every (task, episode) on its eval layout; mp4s of the first ``videos_per_task`` episodes
    of each task go to ``video_dir`` (none when it is None)."""
    specs = episode_specs(list(tasks), episodes_per_task, seed, camera, resolution, max_steps,
                          videos_per_task if video_dir is not None else 0)
    episodes = _run_all(policy_factory, specs, processes)
    videos = []
    for result in episodes:
        if result.video is not None:
            path = Path(video_dir) / f"{result.task}-{result.episode:05d}-{'success' if result.success else 'fail'}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(result.video)
            videos.append(str(path))
    config = {"split": SPLIT, "tasks": list(tasks), "episodes_per_task": episodes_per_task, "seed": seed,
              "camera": camera, "resolution": resolution, "max_steps": max_steps, "processes": processes}
    per_task = [TaskResult.from_episodes(task, [r for r in episodes if r.task == task]) for task in tasks]
    return EvalResults(config, per_task, videos)
