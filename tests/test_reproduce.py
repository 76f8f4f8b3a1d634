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
