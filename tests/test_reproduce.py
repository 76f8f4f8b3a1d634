"""tools/reproduce.py --pool: results of several training seeds in one table (the runs themselves are long;
tests/test_demo.py covers the pipeline steps they are made of)."""

import json

import pytest

from lapa_dist.eval.closed_loop import wilson_interval
from tools import reproduce


def write_results(run_dir, successes: dict[str, list[int]], episodes: int = 10) -> None:
    results = {method: {"tasks": [{"task": f"task-{index}", "successes": count, "episodes": episodes}
                                  for index, count in enumerate(counts)]}
               for method, counts in successes.items()}
    run_dir.mkdir(parents=True)
    (run_dir / "results_in_domain.json").write_text(json.dumps(results))


def test_pool_sums_episodes_over_runs_and_shows_each_seed(tmp_path, capsys):
    write_results(tmp_path / "seed0", {"SCRATCH": [1, 2], "LAPA": [5, 5], "VPT": [0, 0]})
    write_results(tmp_path / "seed1", {"SCRATCH": [3, 0], "LAPA": [7, 4]})  # no VPT: left out of the table
    out = tmp_path / "pooled"
    assert reproduce.main(["--pool", f"{tmp_path / 'seed0'},{tmp_path / 'seed1'}", "--split", "in_domain",
                           "--out", str(out)]) == 0
    table = (out / "report_in_domain_pooled.md").read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    low, high = wilson_interval(21, 40)
    assert f"| LAPA | 50.0% | 55.0% | 21/40 | 52.5% | [{low:.1%}, {high:.1%}] |" in table
    assert "| SCRATCH | 15.0% | 15.0% | 6/40 | 15.0% |" in table
    assert "VPT" not in table
    assert table.index("SCRATCH") < table.index("LAPA")  # the fixed method order
    assert (out / "success_in_domain_pooled.png").stat().st_size > 0


def test_pool_names_a_run_without_results(tmp_path):
    write_results(tmp_path / "seed0", {"SCRATCH": [1]})
    with pytest.raises(SystemExit, match="seed1/results_in_domain.json does not exist"):
        reproduce.main(["--pool", f"{tmp_path / 'seed0'},{tmp_path / 'seed1'}", "--out", str(tmp_path / "p")])


def test_offset_frames_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--offset-frames", "0"])
    assert "--offset-frames must be >= 1" in capsys.readouterr().err


def test_the_training_seed_reaches_every_training_stage(tmp_path, monkeypatch):
    """--seed S must seed the LAQ, the VPT inverse-dynamics model, every pretraining and every finetuning: the
    stages' commands are recorded instead of run (each is a real launcher tested elsewhere)."""
    trained, commands = {}, []
    monkeypatch.setattr(reproduce.pipeline, "train",
                        lambda script, config, run_dir, *args, **kwargs: trained.setdefault(run_dir.name, args[-1]))
    monkeypatch.setattr(reproduce.pipeline, "label", lambda *args: tmp_path / "labelled")
    monkeypatch.setattr(reproduce.pipeline, "metaworld_shards", lambda output, *args, **kwargs: output)
    monkeypatch.setattr(reproduce.pipeline, "export", lambda run_dir, out: out)
    monkeypatch.setattr(reproduce.pipeline, "evaluate", lambda *args, **kwargs: {"tasks": []})
    monkeypatch.setattr(reproduce, "run", lambda *command: commands.append(command))
    args = reproduce.parse_args(["--seed", "3", "--out", str(tmp_path)])
    reproduce.finetune_and_evaluate(args, tmp_path, tmp_path / "videos", tmp_path / "tokenizer")
    assert set(trained) == {"laq", "pretrain_lapa", "pretrain_actionvla", "pretrain_vpt", "finetune_scratch",
                            "finetune_vpt", "finetune_lapa", "finetune_actionvla"}
    assert all("train.seed=3" in settings for settings in trained.values()), trained
    idm_training = [command for command in commands if command[:2] == ("tools/vpt.py", "train")]
    assert len(idm_training) == 1 and "seed=3" in idm_training[0]
