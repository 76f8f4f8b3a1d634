"""The run directory every launcher writes:

    RUN_DIR/config.json        the resolved config (a re-run must agree with it)
    RUN_DIR/metrics.jsonl      one JSON object per logged step (rank 0)
    RUN_DIR/checkpoints/       step-NNNNNNNN/ (DeepSpeed shards + per-rank extra state + COMPLETE)
    RUN_DIR/checkpoints/latest the tag of the newest complete checkpoint

Re-running the same command on the same directory resumes from the newest complete checkpoint; a
checkpoint without its COMPLETE marker (a crash during the save) is ignored, so the previous one stays
usable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from lapa_dist.config import ConfigError, save_config

COMPLETE_MARKER = "COMPLETE"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"

    def prepare(self, config: BaseModel, is_main: bool, resume_keys_may_differ: tuple[str, ...] = ()) -> None:
        """Create the directory and write config.json; on a re-run check the config is the same run's."""
        saved = self.path / "config.json"
        if saved.is_file():
            old = json.loads(saved.read_text())
            new = json.loads(config.model_dump_json())
            changed = sorted(_diff(old, new, resume_keys_may_differ))
            if changed:
                raise ConfigError(
                    f"{saved}: this run directory holds a run with a different config ({', '.join(changed)}); "
                    "use a new run directory, or the same config to resume"
                )
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            save_config(config, self.path)
            if self.latest_checkpoint() is None:
                self.truncate_metrics(0)  # a run restarted before its first checkpoint logs its steps again

    def latest_checkpoint(self) -> str | None:
        """Tag of the newest checkpoint that has its COMPLETE marker, or None."""
        complete = [p.name for p in self.checkpoints.glob("step-*") if (p / COMPLETE_MARKER).is_file()]
        return max(complete) if complete else None

    def truncate_metrics(self, step: int) -> None:
        """Drop logged lines of steps after ``step``: they are logged again by the resumed run."""
        if not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"


def _diff(old, new, ignored: tuple[str, ...], prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return [d for k in keys for d in _diff(old.get(k), new.get(k), ignored, f"{prefix}{k}.")]
    path = prefix.rstrip(".")
    if any(path == key or path.startswith(key + ".") for key in ignored):
        return []
    return [] if old == new else [path]
