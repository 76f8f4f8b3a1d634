"""`make demo` at its smallest size: every stage of the pipeline runs end to end, and a re-run skips them all."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lapa_dist.models.action_tokenizer import ActionTokenizer
from tests.launch_helpers import ROOT, environment, free_port


@pytest.mark.timeout(1500)  # six launches on 2 cores: about 4 minutes alone, much longer on a loaded machine
def test_demo_runs_end_to_end_then_resumes_without_work(tmp_path):
    port = free_port()
    for _ in range(4):
        free_port()  # the demo uses port .. port + 3
    command = [sys.executable, "tools/demo.py", "--out", str(tmp_path / "demo"), "--episodes", "1", "--laq-steps", "10",
               "--vla-steps", "50", "--finetune-episodes", "1", "--eval-episodes", "1", "--eval-max-steps", "3",
               "--port", str(port)]
    first = subprocess.run(command, cwd=ROOT, env=dict(environment(), MUJOCO_GL="egl"), capture_output=True,
                           text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "demo"
    assert "demo done" in first.stdout and "closed loop (MT10 eval layouts" in first.stdout
    results = json.loads((out / "eval" / "results.json").read_text())
    assert len(results["tasks"]) == 10 and all(task["episodes"] == 1 for task in results["tasks"])
    assert (out / "policy" / "policy.json").is_file() and (out / "labelled" / "label_stats.json").is_file()
    # latent pretraining and finetuning on Meta-World lower their loss below chance (uniform over the head's
    # vocabulary, where a fresh head starts): the 10-step LAQ labels nearly every pair with one latent action
    pretrain, finetune = ([json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
                          for stage in ("vla_pretrain", "vla_finetune"))
    assert [r["step"] for r in pretrain] == [25, 50] and pretrain[-1]["token_loss"] < 0.5 * math.log(8)
    action_vocab = ActionTokenizer.load(out / "vla_finetune").vocab_size
    assert [r["step"] for r in finetune] == [25, 50] and finetune[-1]["token_loss"] < math.log(action_vocab) - 0.3
    again = subprocess.run(command, cwd=ROOT, env=dict(environment(), MUJOCO_GL="egl"), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "deepspeed" not in " ".join(line for line in again.stdout.splitlines() if line.startswith("+ "))
