"""Meta-World v3 tasks with fresh seeded layouts, a fast headless renderer and scripted experts.

Used by the Meta-World demo source (lapa_dist/data/sources/metaworld.py) and by closed-loop
evaluation. The goal is part of the observation (the MT setting), which the scripted experts need.

Layouts: every reset draws object and goal positions from the env's own generator, re-seeded with
:func:`layout_seed` first, so a layout is a pure function of (split, seed, task, episode) and
training data ("train") and evaluation ("eval") never share a layout stream.

Rendering goes through ``mujoco.Renderer`` with MSAA and shadows off (~80 frames/s on one CPU core
through Mesa EGL instead of 4-5 with Meta-World's defaults). ``MUJOCO_GL`` defaults to ``egl``
when this module is imported before mujoco; set it yourself if something imports mujoco earlier.
The corner cameras are mounted upside down in Meta-World's model (their image-up axis points at
the floor); their frames are rotated by 180 degrees, which rights them without mirroring.

Import order: Mesa's llvmpipe (behind EGL on CPU) and Triton (imported by torch / transformers / our kernels)
each bring their own LLVM; importing Triton after an EGL context exists segfaults (measured: render, then
``import triton``). This module imports Triton, when installed, before mujoco can create a context.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import warnings
import weakref
import zlib
from dataclasses import dataclass
from typing import Self

try:  # before any EGL context: see "Import order" above
    import triton  # noqa: F401
except ImportError:
    pass

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, MT10_V3
from metaworld.policies import ENV_POLICY_MAP
from metaworld.sawyer_xyz_env import SawyerXYZEnv

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and fit it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "pick up the cube and move it into the other bin",
    "box-close-v3": "pick up the lid and put it on the box",
    "button-press-topdown-v3": "press the button down from above",
    "button-press-topdown-wall-v3": "press the button down from above, behind the wall",
    "button-press-v3": "push the button in from the front",
    "button-press-wall-v3": "reach past the wall and push the button in",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "lift the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the lock to lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "turn the lock to unlock the door",
    "hand-insert-v3": "move the gripper down into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "hammer-v3": "pick up the hammer and hit the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pull the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "peg-unplug-side-v3": "pull the peg sideways out of the socket",
    "soccer-v3": "push the ball into the goal",
    "stick-push-v3": "grasp the stick and push the bottle with it to the goal",
    "stick-pull-v3": "grasp the stick and pull the bottle with it to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
MT50_TASKS: tuple[str, ...] = tuple(INSTRUCTIONS)
MT10_TASKS: tuple[str, ...] = tuple(MT10_V3)
TASK_SETS: dict[str, tuple[str, ...]] = {"MT10": MT10_TASKS, "MT50": MT50_TASKS}

CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})
DEFAULT_CAMERA = "corner"
SPLITS: tuple[str, ...] = ("train", "eval")
ACTION_DIM = 4  # [dx, dy, dz, gripper], each in [-1, 1]
MAX_EPISODE_STEPS: int = SawyerXYZEnv.max_path_length  # the env refuses to step further without a reset


def check_task(task: str) -> str:
    """Return ``task`` if it is a Meta-World v3 task name, else raise naming the known tasks."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {task!r}; expected one of: {', '.join(MT50_TASKS)}")
    return task


def check_camera(camera: str) -> str:
    if camera not in CAMERAS:
        raise ValueError(f"camera {camera!r}: expected one of {', '.join(CAMERAS)}")
    return camera


def check_resolution(resolution: int) -> int:
    if resolution < 16 or resolution % 2:
        raise ValueError(f"resolution {resolution}: expected an even number of pixels >= 16 (video needs even sides)")
    return resolution


def resolve_tasks(spec: str) -> list[str]:
    """Tasks named by ``spec``: "MT10", "MT50", or a comma-separated list of task names."""
    if spec in TASK_SETS:
        return list(TASK_SETS[spec])
    tasks = [name.strip() for name in spec.split(",") if name.strip()]
    if not tasks:
        raise ValueError(f"tasks {spec!r}: expected MT10, MT50 or comma-separated task names")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {spec!r}: a task is listed twice")
    return [check_task(task) for task in tasks]


def layout_seed(split: str, seed: int, task: str, episode: int) -> int:
    """The seed of one episode's layout, a pure function of its arguments (32 bits)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if seed < 0 or episode < 0:
        raise ValueError(f"seed ({seed}) and episode ({episode}) must be >= 0")
    entropy = [SPLITS.index(split), seed, zlib.crc32(check_task(task).encode()), episode]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass(frozen=True)
class StepResult:
    observation: np.ndarray  # float64 [39]: hand, gripper, objects, previous frame's, goal
    reward: float
    success: bool  # info["success"] of this step


class ScriptedExpert:
    """Meta-World's hand-written policy for a task; actions clipped to [-1, 1], float32 [4]."""

    def __init__(self, task: str):
        self._policy = ENV_POLICY_MAP[check_task(task)]()

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # the policies warn whenever an action needs clipping
            warnings.simplefilter("ignore", UserWarning)
            action = self._policy.get_action(observation)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def _release(renderer: mujoco.Renderer, env) -> None:
    renderer.close()
    env.close()


class MetaWorldEnv:
    """One Meta-World v3 task: ``reset(layout_seed)``, ``step(action)``, ``render()``, ``close()``."""

    def __init__(self, task: str, camera: str = DEFAULT_CAMERA, resolution: int = 64):
        self.task = check_task(task)
        self.camera, self.resolution = check_camera(camera), check_resolution(resolution)
        # A seed makes the constructor restore numpy's global generator after its own first reset.
        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=0)
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        model = self._env.model
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, resolution)
        model.vis.global_.offheight = max(model.vis.global_.offheight, resolution)
        self._renderer = mujoco.Renderer(model, resolution, resolution)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._finalizer = weakref.finalize(self, _release, self._renderer, self._env)

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.task]

    @property
    def control_fps(self) -> float:
        """Actions per simulated second: 1 / (frame_skip * timestep) = 80 for every v3 task."""
        return 1.0 / (self._env.frame_skip * self._env.model.opt.timestep)

    def reset(self, layout_seed: int) -> np.ndarray:
        """Start an episode on the layout drawn from ``layout_seed``; returns the observation."""
        self._env.seed(layout_seed)
        observation, _ = self._env.reset()
        return observation

    def step(self, action: np.ndarray) -> StepResult:
        """Apply a [dx, dy, dz, gripper] action (clipped to [-1, 1])."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,) or not np.isfinite(action).all():
            raise ValueError(f"action: expected {ACTION_DIM} finite numbers, got {action.shape} {action}")
        observation, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        return StepResult(observation, float(reward), bool(info["success"]))

    def render(self) -> np.ndarray:
        """The current scene from ``camera``: uint8 RGB [resolution, resolution, 3], upright."""
        self._renderer.update_scene(self._env.data, camera=self.camera)
        frame = self._renderer.render()
        if self.camera in UPSIDE_DOWN_CAMERAS:
            frame = np.ascontiguousarray(frame[::-1, ::-1])
        return frame

    def close(self) -> None:
        """Free the renderer's GL context and the simulation; runs at most once (also at exit)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
