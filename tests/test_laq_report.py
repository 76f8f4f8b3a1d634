"""LAQ diagnostics: the probes where the answer is known, and tools/laq_report.py end to end on a tiny trained LAQ."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lapa_dist.data.convert import convert
from lapa_dist.data.sources.sprites import DIRECTIONS, SpriteSource
from lapa_dist.eval.laq_report import (
    FIGURES,
    VERDICT_QUESTIONS,
    actions_over_offset,
    markdown_report,
    pooled_reconstruction_metrics,
    verdicts,
)
from lapa_dist.eval.probes import cluster_purity, linear_probe, purity_probe, split_by_clip
from lapa_dist.eval.reconstruction import reconstruction_metrics
from tests.launch_helpers import ROOT, environment
from tools.laq_report import main as laq_report_main

TINY = str(ROOT / "configs/laq/tiny.json")


def sprite_like_pairs(seed: int, clips: int = 40, pairs_per_clip: int = 20):
    """Pairs whose true action is one of the 8 sprite directions over H = 2 steps of 2 px, with clip ids."""
    rng = np.random.default_rng(seed)
    direction = rng.integers(8, size=clips * pairs_per_clip)  # [N]
    actions = DIRECTIONS[direction] * 4  # [N, 2]
    return direction, actions, np.repeat(np.arange(clips), pairs_per_clip), rng


def test_cluster_purity_by_hand():
    assert cluster_purity(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == 0.75
    assert cluster_purity(np.array([7, 7, 3]), np.array([5, 5, 9])) == 1.0
    assert cluster_purity(np.array([0, 0, 0, 0]), np.array([0, 1, 2, 2])) == 0.5


def test_probes_when_latent_is_a_function_of_the_action():
    direction, actions, clip_ids, rng = sprite_like_pairs(0)
    codes = np.stack([direction, (3 * direction) % 8, np.zeros_like(direction), direction // 2], axis=1)  # [N, 4]
    purity = purity_probe(codes, actions, bins=8, rng=rng)
    assert purity["purity"] == 1.0 and purity["bins"] == 8 and purity["clusters"] == 8
    assert purity["chance"]["mean"] < 0.3 and purity["above_chance"]
    probe = linear_probe(codes, actions, clip_ids, codebook_size=8, rng=rng)
    assert min(probe["r2_per_dim"]) > 0.95 and probe["above_chance"]
    assert abs(probe["chance"]["mean"]) < 0.1


@pytest.mark.parametrize("distinct_codes", [1, 4], ids=["8-latent-actions", "4096-latent-actions"])
def test_probes_at_chance_when_latent_ignores_the_action(distinct_codes):
    _, actions, clip_ids, rng = sprite_like_pairs(1)
    codes = np.zeros((len(actions), 4), np.int64)
    codes[:, :distinct_codes] = rng.integers(8, size=(len(actions), distinct_codes))
    purity = purity_probe(codes, actions, bins=8, rng=rng)
    assert abs(purity["purity"] - purity["chance"]["mean"]) < 0.02 + 3 * purity["chance"]["std"]
    assert not purity["above_chance"]
    probe = linear_probe(codes, actions, clip_ids, codebook_size=8, rng=rng)
    assert probe["r2_mean"] < 0.05 and not probe["above_chance"]


def test_linear_probe_per_dimension_when_latent_holds_only_the_horizontal_motion():
    _, actions, clip_ids, rng = sprite_like_pairs(2)
    codes = np.zeros((len(actions), 4), np.int64)
    codes[:, 2] = np.sign(actions[:, 0]).astype(np.int64) + 1  # left / still / right
    r2_x, r2_y = linear_probe(codes, actions, clip_ids, codebook_size=8, rng=rng)["r2_per_dim"]
    assert r2_x > 0.95 and r2_y < 0.05


def test_split_by_clip_keeps_clips_whole():
    clip_ids = np.repeat(np.arange(10), 7)
    train = split_by_clip(clip_ids, 0.8, np.random.default_rng(0))
    assert train.sum() == 8 * 7
    assert not set(clip_ids[train]) & set(clip_ids[~train])
    with pytest.raises(ValueError, match="at least 2 clips"):
        split_by_clip(np.zeros(5, np.int64), 0.8, np.random.default_rng(0))


def test_actions_over_offset_sums_the_h_steps():
    actions = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)  # [T - 1, d], T = 10
    summed = actions_over_offset(actions, 3)
    assert summed.shape == (7, 3)
    np.testing.assert_allclose(summed, [actions[t : t + 3].sum(axis=0) for t in range(7)], rtol=1e-5, atol=1e-6)


def test_pooled_reconstruction_metrics_equal_one_big_batch():
    generator = torch.Generator().manual_seed(0)
    x_t = torch.rand(23, 3, 8, 8, generator=generator)
    x_next = torch.where(
        torch.rand(23, 1, 8, 8, generator=generator) < 0.2, torch.rand(23, 3, 8, 8, generator=generator), x_t
    )
    prediction = x_next + 0.1 * torch.randn(23, 3, 8, 8, generator=generator)
    pooled = pooled_reconstruction_metrics(x_t, x_next, prediction, batch_size=5)
    whole = {name: float(value) for name, value in reconstruction_metrics(x_t, x_next, prediction).items()}
    assert pooled.keys() == whole.keys()
    for name, value in whole.items():
        assert pooled[name] == pytest.approx(value, abs=1e-3), name


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        check=False,
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def laq_and_shards(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny LAQ run trained 40 steps, its sprite shards, the shards labelled with H = 2)."""
    root = tmp_path_factory.mktemp("laq_report")
    sprites, run_dir, labelled = root / "sprites", root / "run", root / "labelled"
    convert(SpriteSource(clips=16, num_frames=16, size=32), sprites, units_per_shard=4, progress=False)
    run_python(
        "launch/train_laq.py",
        "--config",
        TINY,
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.datasets.0.path={sprites}",
        "--set",
        "train.steps=40",
    )
    run_python(
        "launch/label.py",
        "--laq",
        str(run_dir),
        "--input",
        str(sprites),
        "--output",
        str(labelled),
        "--set",
        "offset_frames=2",
    )
    return run_dir, sprites, labelled


@pytest.fixture(scope="module")
def report_dir(laq_and_shards, tmp_path_factory) -> Path:
    run_dir, _, labelled = laq_and_shards
    out = tmp_path_factory.mktemp("report")
    result = run_python("tools/laq_report.py", "--laq", str(run_dir), "--shards", str(labelled), "--out", str(out))
    assert "report.md" in result.stdout and result.stdout.count("?") == len(VERDICT_QUESTIONS)
    return out


def test_report_files_and_numbers(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report) == {"laq", "data", "reconstruction", "codebook", "actions", "verdicts", "figures"}
    assert report["figures"] == FIGURES
    for file in FIGURES.values():
        assert (report_dir / file).read_bytes().startswith(b"\x89PNG")
    r = report["reconstruction"]
    assert r["pairs"] == 16 * 14 and 0 < r["changed_fraction"] < 1
    assert all(0 < r[name] < 100 for name in r if name.startswith("psnr"))
    assert r["labels_match_model"] >= 0.95  # the shards were labelled by this very LAQ
    c = report["codebook"]
    assert c["pairs"] == 16 * 14 and 1 <= c["codes_used"] <= c["codebook_size"] == 8 and len(c["top"]) <= 8
    assert len(c["codes_used_per_position"]) == report["laq"]["code_seq_len"] == 4


def test_report_probes_and_verdicts(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    a = report["actions"]
    assert a["action_dim"] == 2 and a["pairs"] == 16 * 14 and a["clips"] == 16
    assert 0 < a["purity"]["purity"] <= 1 and 0 < a["purity"]["chance"]["mean"] <= 1
    probe = a["linear_probe"]
    assert len(probe["r2_per_dim"]) == 2 and all(r2 <= 1 for r2 in probe["r2_per_dim"])
    assert probe["train_pairs"] + probe["test_pairs"] == 16 * 14 and probe["test_pairs"] % 14 == 0  # whole clips
    assert set(report["verdicts"]) == set(VERDICT_QUESTIONS)
    assert all(verdict["pass"] in (True, False) for verdict in report["verdicts"].values())
    r = report["reconstruction"]
    assert report["verdicts"]["closer_to_next_than_to_t"]["pass"] == (r["psnr_next"] > r["psnr_t"])
    assert report["verdicts"]["purity_above_chance"]["pass"] == a["purity"]["above_chance"]
    markdown = (report_dir / "report.md").read_text()
    assert "## Verdicts" in markdown and all(f"]({file})" in markdown for file in FIGURES.values())


def test_report_without_true_actions(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    report["actions"] = None
    report["verdicts"] = verdicts(report["reconstruction"], report["codebook"], None)
    assert report["verdicts"]["linear_probe_above_chance"]["pass"] is None
    assert "no probes" in markdown_report(report)


def test_cli_refuses_unlabelled_or_missing_shards(laq_and_shards, tmp_path, capsys):
    run_dir, sprites, _ = laq_and_shards
    for shards in (sprites, tmp_path / "missing"):
        assert laq_report_main(["--laq", str(run_dir), "--shards", str(shards), "--out", str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err
    assert "no labelled clips" in errors and "no manifest" in errors
