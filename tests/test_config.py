import json
from pathlib import Path

import pytest

from lapa_dist.config import ConfigError, load_config, save_config
from lapa_dist.data.config import DataConfig

VALID = {"datasets": [{"name": "a", "path": "/data/a", "offset_frames": 3}], "batch_size": 8}


def write(tmp_path, tree) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tree))
    return str(path)


def test_load_with_overrides(tmp_path):
    config = load_config(DataConfig, write(tmp_path, VALID), ["batch_size=32", "augment.enabled=true",
                                                              "datasets.0.weight=2.5"])
    assert config.batch_size == 32 and config.augment.enabled and config.datasets[0].weight == 2.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_sise=3"], "batch_sise: unknown key"),
        (["batch_size=many"], "batch_size: Input should be a valid integer"),
        (["batch_size=0"], "batch_size: Input should be greater than or equal to 1 (got 0)"),
        (["datasets.0.offset_seconds=0.5"], "datasets.0: Value error, set exactly one of offset_frames"),
        (["datasets.3.weight=1"], "datasets.3: index '3' out of range"),
        (["augment.crop_scale=1.5"], "augment.crop_scale: Input should be less than or equal to 1"),
        (["decoder=ffmpeg"], "decoder: Input should be 'pyav' or 'dali'"),
        (["batch_size"], "expected KEY.PATH=VALUE"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(DataConfig, write(tmp_path, VALID), overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(DataConfig, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(DataConfig, str(bad))
    with pytest.raises(ConfigError, match="datasets: Field required"):
        load_config(DataConfig, write(tmp_path, {}))


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(DataConfig, write(tmp_path, VALID), ["seed=7"])
    path = save_config(config, tmp_path / "run")
    assert load_config(DataConfig, str(path)) == config


def test_laq_run_configs_load_and_cross_field_errors():
    from lapa_dist.train.laq import LAQRunConfig

    configs = Path(__file__).resolve().parent.parent / "configs" / "laq"
    for name in ("tiny", "metaworld", "paper"):
        load_config(LAQRunConfig, configs / f"{name}.json")
    with pytest.raises(ConfigError, match="ema_decay needs whole parameters"):
        load_config(LAQRunConfig, configs / "metaworld.json", ["deepspeed.zero_stage=3"])
