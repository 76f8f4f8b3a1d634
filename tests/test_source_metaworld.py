"""Meta-World environment layer and scripted-demo source: rendering, orientation, round trip, seeds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")  # the "sim" extra

from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from lapa_dist.data.sources.metaworld import MetaWorldSource
from lapa_dist.envs.metaworld import (
    INSTRUCTIONS,
    MT10_TASKS,
    MetaWorldEnv,
    layout_seed,
    resolve_tasks,
)
from tests.video_helpers import convert_and_read, mean_abs_error

# H.264 4:2:0 on the 64 px wood texture: ~4 grey levels mean error even at crf 10 (chroma subsampling).
CODEC_TOLERANCE = 5.0


def gripper_pads_centroid(frame: np.ndarray) -> np.ndarray:
    """(row, column) centre of the cyan finger pads, the only cyan in the scene."""
    rgb = frame.astype(int)
    mask = (rgb[..., 0] < 110) & (rgb[..., 1] > 140) & (rgb[..., 2] > 140)
    assert mask.sum() >= 5, "gripper pads not visible"
    rows, columns = np.nonzero(mask)
    return np.array([rows.mean(), columns.mean()])


def pads_shift(env: MetaWorldEnv, action: list[float], steps: int = 20) -> np.ndarray:
    env.reset(layout_seed("train", 0, env.task, 0))
    before = gripper_pads_centroid(env.render())
    for _ in range(steps):
        env.step(np.array(action))
    return gripper_pads_centroid(env.render()) - before


def clips_of(source: MetaWorldSource, units) -> list:
    return [clip for unit in units for clip in source.clips(unit)]


@pytest.mark.parametrize("camera", ["corner", "topview", "gripperPOV"])
def test_env_renders_square_uint8_rgb(camera):
    with MetaWorldEnv("reach-v3", camera, 48) as env:
        env.reset(123)
        frame = env.render()
        assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8
        assert frame.std() > 10, "blank frame"
        assert env.control_fps == pytest.approx(80.0)


def test_corner_camera_is_upright_and_not_mirrored():
    # Seen from the corner camera, world +z is image-up, +x goes right and +y goes left.
    with MetaWorldEnv("reach-v3", "corner", 128) as env:
        up = pads_shift(env, [0, 0, 1, 0])
        along_x = pads_shift(env, [1, 0, 0, 0])
        along_y = pads_shift(env, [0, 1, 0, 0])
    assert up[0] < -8, f"hand moved up but the pads moved {up} (row, column)"
    assert along_x[1] > 5, f"hand moved +x but the pads moved {along_x}"
    assert along_y[1] < -5, f"hand moved +y but the pads moved {along_y}"


def test_task_tables():
    assert set(INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS)
    assert len(set(INSTRUCTIONS.values())) == 50 and all(INSTRUCTIONS.values())
    assert len(MT10_TASKS) == 10 and set(MT10_TASKS) <= set(INSTRUCTIONS)
    assert resolve_tasks("MT10") == list(MT10_TASKS)
    assert resolve_tasks("MT50") == list(INSTRUCTIONS)
    assert resolve_tasks(" push-v3,reach-v3 ") == ["push-v3", "reach-v3"]


def test_unknown_task_gives_clear_error():
    with pytest.raises(ValueError, match="unknown Meta-World task 'fly-v3'"):
        resolve_tasks("reach-v3,fly-v3")
    with pytest.raises(ValueError, match="'reach-v2'"):
        MetaWorldEnv("reach-v2")
    with pytest.raises(ValueError, match="'reach-v2'"):
        MetaWorldSource(["reach-v2"], episodes=1)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="resolution 63"):
        MetaWorldSource(["reach-v3"], episodes=1, resolution=63)
    with pytest.raises(ValueError, match="camera 'side'"):
        MetaWorldSource(["reach-v3"], episodes=1, camera="side")
    with pytest.raises(ValueError, match="--max-steps 501"):
        MetaWorldSource(["reach-v3"], episodes=1, max_steps=501)
    with pytest.raises(ValueError, match="split 'test'"):
        layout_seed("test", 0, "reach-v3", 0)
    with MetaWorldEnv("reach-v3", "corner", 32) as env:
        env.reset(0)
        with pytest.raises(ValueError, match="action"):
            env.step(np.zeros(3))


def test_conversion_round_trips(tmp_path):
    source = MetaWorldSource(["reach-v3"], episodes=2, resolution=64, success_tail=3)
    manifest, stored = convert_and_read(source, tmp_path)
    assert manifest.clips == 2 and manifest.skipped == {}
    expected = clips_of(MetaWorldSource(["reach-v3"], episodes=2, resolution=64, success_tail=3), source.work_units())
    assert sorted(stored) == ["metaworld-reach-v3-00000", "metaworld-reach-v3-00001"]
    for reference in expected:
        clip = stored[reference.key]
        meta = clip.meta
        assert meta.instruction == INSTRUCTIONS["reach-v3"] == "reach the goal position"
        assert meta.fps == pytest.approx(80.0) and meta.camera == "corner" and meta.action_dim == 4
        assert meta.extra["success"] is True and meta.extra["task"] == "reach-v3"
        assert meta.num_frames == meta.extra["success_step"] + 3 + 1
        assert clip.actions.dtype == np.float32 and np.abs(clip.actions).max() <= 1.0
        np.testing.assert_array_equal(clip.actions, reference.actions)
        assert clip.frames.shape == reference.frames.shape == (meta.num_frames, 64, 64, 3)
        error = mean_abs_error(clip.frames, reference.frames)
        assert error < CODEC_TOLERANCE, f"{clip.key}: mean codec error {error:.2f}"


def test_same_seed_same_clips_other_seed_other_layouts():
    units = [("push-v3", 0), ("push-v3", 1)]
    options = {"resolution": 32, "max_steps": 4}
    first = clips_of(MetaWorldSource(["push-v3"], 2, seed=0, **options), units)
    again = clips_of(MetaWorldSource(["push-v3"], 2, seed=0, **options), units[1:])  # fresh env, no history
    other = clips_of(MetaWorldSource(["push-v3"], 2, seed=1, **options), units)
    assert first[0].meta.extra["layout_seed"] != first[1].meta.extra["layout_seed"]
    np.testing.assert_array_equal(first[1].frames, again[0].frames)
    np.testing.assert_array_equal(first[1].actions, again[0].actions)
    assert first[1].meta == again[0].meta
    for mine, theirs in zip(first, other):
        assert mine.meta.extra["layout_seed"] != theirs.meta.extra["layout_seed"]
        assert not np.array_equal(mine.frames[0], theirs.frames[0]), "another seed gave the same layout"
    assert layout_seed("train", 0, "push-v3", 0) != layout_seed("eval", 0, "push-v3", 0)


def test_only_success_counts_failed_demos(tmp_path):
    source = MetaWorldSource(["reach-v3"], episodes=2, resolution=32, max_steps=5, only_success=True)
    manifest, _ = convert_and_read(source, tmp_path)
    assert manifest.clips == 0 and manifest.skipped == {"failed_demo": 2}
    kept = clips_of(MetaWorldSource(["reach-v3"], 1, resolution=32, max_steps=5), [("reach-v3", 0)])
    assert kept[0].meta.extra["success"] is False and kept[0].meta.num_frames == 6


@pytest.mark.slow
def test_mt10_experts_succeed(tmp_path):
    source = MetaWorldSource(list(MT10_TASKS), episodes=3, resolution=32)
    manifest, clips = convert_and_read(source, tmp_path, processes=2)
    successes = sum(clip.meta.extra["success"] for clip in clips.values())
    assert manifest.clips == 30 and successes >= 28, f"{successes}/30 successful demos"
