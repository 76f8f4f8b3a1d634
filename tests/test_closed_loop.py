"""Closed-loop evaluation: expert/random baselines, Wilson intervals, eval layouts, videos, CLI errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld")  # the "sim" extra

from lapa_dist.data.video import decode_frames
from lapa_dist.envs.metaworld import INSTRUCTIONS, MetaWorldEnv, layout_seed
from lapa_dist.eval.closed_loop import (
    ActionPolicy,
    ScriptedExpertPolicy,
    UniformRandomPolicy,
    evaluate,
    wilson_interval,
)
from tests.vla_helpers import tiny_metaworld_policy

ROOT = Path(__file__).resolve().parent.parent
EXPERT_TASKS = ["reach-v3", "button-press-topdown-v3"]


def test_expert_succeeds_in_parallel_on_eval_layouts():
    results = evaluate(ScriptedExpertPolicy, EXPERT_TASKS, episodes_per_task=2, seed=3, max_steps=150, processes=2)
    assert [task.task for task in results.tasks] == EXPERT_TASKS
    assert sum(task.successes for task in results.tasks) >= 3
    for task in results.tasks:
        assert task.layout_seeds == [layout_seed("eval", 3, task.task, episode) for episode in range(2)]
        assert not set(task.layout_seeds) & {layout_seed("train", 3, task.task, e) for e in range(2)}
        assert all(1 <= length <= 150 for length in task.lengths)
        assert task.ci95[0] <= task.success_rate <= task.ci95[1]
    assert results.mean_success_rate == pytest.approx(np.mean([t.success_rate for t in results.tasks]))
    table = results.to_markdown()
    assert "| reach-v3 |" in table and "**mean**" in table


def test_random_policy_mostly_fails_and_is_reproducible():
    factory = functools.partial(UniformRandomPolicy, seed=1)
    first = evaluate(factory, ["pick-place-v3", "push-v3"], episodes_per_task=2, seed=0, max_steps=60)
    assert sum(task.successes for task in first.tasks) <= 1
    assert all(task.lengths == [60, 60] or task.successes for task in first.tasks)
    again = evaluate(factory, ["pick-place-v3"], episodes_per_task=2, seed=0, max_steps=60, processes=2)
    assert again.tasks[0].lengths == first.tasks[0].lengths


def random_policy_noting_threads(directory: Path) -> UniformRandomPolicy:
    import torch

    (directory / str(os.getpid())).write_text(str(torch.get_num_threads()))
    return UniformRandomPolicy(seed=0)


def test_workers_share_the_cores_instead_of_taking_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as for a user who never set it: torch's default
    factory = functools.partial(random_policy_noting_threads, tmp_path)
    evaluate(factory, ["reach-v3"], episodes_per_task=2, seed=0, max_steps=5, processes=2)
    threads = [int(path.read_text()) for path in tmp_path.iterdir()]
    assert threads == [max(1, os.cpu_count() // 2)] * 2


def test_policies_implement_the_protocol_and_the_expert_refuses_images_only():
    assert isinstance(UniformRandomPolicy(), ActionPolicy) and isinstance(ScriptedExpertPolicy(), ActionPolicy)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    actions = UniformRandomPolicy().predict(images, ["a", "b"])
    assert actions.shape == (2, 4) and np.abs(actions).max() <= 1.0
    with pytest.raises(ValueError, match="simulator states"):
        ScriptedExpertPolicy().predict(images, [INSTRUCTIONS["reach-v3"]] * 2)
    with pytest.raises(ValueError, match="no Meta-World task"):
        ScriptedExpertPolicy().predict(images[:1], ["fly to the moon"], states=np.zeros((1, 39)))


@pytest.mark.parametrize("successes,trials", [(0, 1), (3, 10), (5, 10), (9, 10), (10, 10), (1, 1000)])
def test_wilson_interval_contains_the_rate(successes, trials):
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0
    assert low < high


def test_wilson_interval_shrinks_with_trials_and_handles_edges():
    widths = [np.subtract(*wilson_interval(7 * n, 10 * n)[::-1]) for n in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.0 < high < 0.2  # 0/20: 95% upper bound ~0.161
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and 0.8 < low < 1.0
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_eval_layouts_differ_from_train_layouts_for_the_same_seed():
    with MetaWorldEnv("pick-place-v3") as env:
        for episode in range(3):
            train = env.reset(layout_seed("train", 0, "pick-place-v3", episode))
            evaluation = env.reset(layout_seed("eval", 0, "pick-place-v3", episode))
            assert not np.allclose(train[4:7], evaluation[4:7]) or not np.allclose(train[-3:], evaluation[-3:])


def test_rollout_video_is_written_and_decodable(tmp_path):
    results = evaluate(ScriptedExpertPolicy, ["reach-v3"], episodes_per_task=2, seed=0, resolution=32, max_steps=40,
                       video_dir=tmp_path / "videos")
    assert len(results.videos) == 1  # first episode of the task only
    frames = decode_frames(Path(results.videos[0]).read_bytes())
    assert frames.shape == (results.tasks[0].lengths[0] + 1, 32, 32, 3)
    assert frames.std() > 5  # a rendered scene, not a blank clip
    results.write(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["split"] == "eval" and saved["tasks"][0]["task"] == "reach-v3"
    assert (tmp_path / "results.md").read_text() == results.to_markdown()


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v9'"):
        evaluate(ScriptedExpertPolicy, ["reach-v9"], episodes_per_task=1, seed=0)
    with pytest.raises(ValueError, match="max_steps"):
        evaluate(ScriptedExpertPolicy, ["reach-v3"], episodes_per_task=1, seed=0, max_steps=501)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MUJOCO_GL="egl")
    return subprocess.run([sys.executable, "launch/evaluate.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_evaluates_a_policy_directory(tmp_path):
    policy = tiny_metaworld_policy(tmp_path)
    out = tmp_path / "out"
    result = run_cli("--policy", str(policy), "--tasks", "reach-v3,push-v3", "--episodes", "1", "--max-steps", "8",
                     "--processes", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [task["task"] for task in results["tasks"]] == ["reach-v3", "push-v3"]
    assert all(task["episodes"] == 1 for task in results["tasks"])
    assert len(list((out / "videos").glob("*.mp4"))) == 2
    result = run_cli("--policy", str(policy), "--tasks", "reach-v3", "--episodes", "1", "--resolution", "128")
    assert result.returncode == 2 and "--resolution 128: the policy was trained on 64" in result.stderr


def test_cli_refuses_bad_policies_and_tasks(tmp_path):
    result = run_cli("--policy", str(tmp_path), "--tasks", "reach-v3", "--episodes", "1")
    assert result.returncode == 2 and "no policy.json" in result.stderr
    result = run_cli("--policy", "expert", "--tasks", "reach-v3,nope-v3", "--episodes", "1")
    assert result.returncode == 2 and "unknown Meta-World task 'nope-v3'" in result.stderr
    out = tmp_path / "out"
    result = run_cli("--policy", "expert", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "60",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| reach-v3 | 1/1 |" in result.stdout
    assert len(list((out / "videos").glob("*.mp4"))) == 1 and (out / "results.json").is_file()
