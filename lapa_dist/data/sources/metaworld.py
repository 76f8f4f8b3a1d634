"""Scripted-expert demonstrations in Meta-World v3, rendered into clips with their actions.

One work unit is one (task, episode): the episode's layout comes from
``layout_seed("train", seed, task, episode)``, so a clip is a pure function of the options and
its unit, whichever process converts it. An episode runs the task's scripted expert until
``success_tail`` steps after the first success, or ``max_steps`` steps. Frames are the observation
before each action plus the last one; actions are the expert's, clipped to [-1, 1]; fps is the
control rate (80 steps per simulated second).

    python tools/make_shards.py --source metaworld --tasks MT10 --episodes 10 --output DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lapa_dist.data.convert import SkipClip, Source
from lapa_dist.data.format import Clip, ClipMeta
from lapa_dist.envs.metaworld import (
    CAMERAS,
    DEFAULT_CAMERA,
    MAX_EPISODE_STEPS,
    MetaWorldEnv,
    ScriptedExpert,
    check_camera,
    check_resolution,
    check_task,
    layout_seed,
    resolve_tasks,
)

SPLIT = "train"  # evaluation draws its layouts from the "eval" split


@dataclass
class Demo:
    frames: np.ndarray  # uint8 [steps + 1, H, W, 3]
    actions: np.ndarray  # float32 [steps, 4]
    success_step: int | None  # actions taken when info["success"] first held; None if never


def record_demo(
    env: MetaWorldEnv, expert: ScriptedExpert, seed_of_layout: int, max_steps: int, success_tail: int
) -> Demo:
    """Run ``expert`` from the layout of ``seed_of_layout``, rendering before and after each step."""
    observation = env.reset(seed_of_layout)
    frames, actions = [env.render()], []
    success_step = None
    for step in range(1, max_steps + 1):
        action = expert(observation)
        result = env.step(action)
        observation = result.observation
        actions.append(action)
        frames.append(env.render())
        if success_step is None and result.success:
            success_step = step
        if success_step is not None and step >= success_step + success_tail:
            break
    return Demo(np.stack(frames), np.stack(actions), success_step)


class MetaWorldSource(Source):
    name = "metaworld"
    default_units_per_shard = 25

    def __init__(
        self,
        tasks: list[str],
        episodes: int,
        resolution: int = 64,
        camera: str = DEFAULT_CAMERA,
        seed: int = 0,
        max_steps: int = 200,
        success_tail: int = 10,
        only_success: bool = False,
    ):
        if not tasks:
            raise ValueError("metaworld: no tasks given")
        if episodes < 1:
            raise ValueError(f"metaworld: --episodes {episodes}: need at least 1 per task")
        if not 1 <= max_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"metaworld: --max-steps {max_steps}: expected 1 to {MAX_EPISODE_STEPS}")
        if success_tail < 0:
            raise ValueError(f"metaworld: --success-tail {success_tail}: must be >= 0")
        if seed < 0:
            raise ValueError(f"metaworld: --seed {seed}: must be >= 0")
        self.tasks = [check_task(task) for task in tasks]
        self.episodes, self.resolution, self.camera = episodes, check_resolution(resolution), check_camera(camera)
        self.seed, self.max_steps, self.success_tail = seed, max_steps, success_tail
        self.only_success = only_success
        self._env: MetaWorldEnv | None = None  # one per process, kept while units stay on one task

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tasks", default="MT10", help="MT10, MT50, or comma-separated task names.")
        parser.add_argument("--episodes", type=int, default=10, help="Episodes per task.")
        parser.add_argument("--resolution", type=int, default=64, help="Square frame side in pixels.")
        parser.add_argument("--camera", choices=CAMERAS, default=DEFAULT_CAMERA)
        parser.add_argument("--seed", type=int, default=0, help="Layout seed (training split).")
        parser.add_argument("--max-steps", type=int, default=200, help="Episode cap in env steps.")
        parser.add_argument("--success-tail", type=int, default=10, help="Steps kept after the first success.")
        parser.add_argument("--only-success", action="store_true", help="Drop demos that never succeed.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MetaWorldSource:
        return cls(
            resolve_tasks(args.tasks), args.episodes, args.resolution, args.camera, args.seed,
            args.max_steps, args.success_tail, args.only_success,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None  # workers build their own simulator and GL context
        return state

    def work_units(self) -> list[tuple[str, int]]:
        return [(task, episode) for task in self.tasks for episode in range(self.episodes)]

    def clips(self, unit: tuple[str, int]) -> Iterator[Clip]:
        task, episode = unit
        key = f"metaworld-{task}-{episode:05d}"
        env = self._env_for(task)
        seed_of_layout = layout_seed(SPLIT, self.seed, task, episode)
        demo = record_demo(env, ScriptedExpert(task), seed_of_layout, self.max_steps, self.success_tail)
        success = demo.success_step is not None
        if self.only_success and not success:
            raise SkipClip(key, "failed_demo", f"no success in {self.max_steps} steps")
        num_frames, height, width, _ = demo.frames.shape
        meta = ClipMeta(
            instruction=env.instruction,
            fps=env.control_fps,
            num_frames=num_frames,
            width=width,
            height=height,
            source=self.name,
            episode_id=f"{task}-{episode:05d}",
            camera=self.camera,
            action_dim=demo.actions.shape[1],
            extra={
                "task": task,
                "episode": episode,
                "success": success,
                "success_step": demo.success_step,
                "layout_seed": seed_of_layout,
                "split": SPLIT,
            },
        )
        yield Clip(key=key, frames=demo.frames, meta=meta, actions=demo.actions)

    def _env_for(self, task: str) -> MetaWorldEnv:
        if self._env is None or self._env.task != task:
            if self._env is not None:
                self._env.close()
            self._env = MetaWorldEnv(task, self.camera, self.resolution)
        return self._env
