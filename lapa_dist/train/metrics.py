"""Metrics of a run: metrics.jsonl (rank 0), a console progress bar, and wandb (offline by default)."""

from __future__ import annotations

import json
import math
import os

from pydantic import Field
from tqdm import tqdm

from lapa_dist.config import StrictModel
from lapa_dist.train.run_dir import RunDir

TIMING_KEYS = ("samples_per_s", "step_time_s", "data_wait_s")  # wall-clock: differ between identical runs


class LoggingConfig(StrictModel):
    log_every: int = Field(default=10, ge=1)
    """Steps between metric lines (each one syncs the device once)."""
    wandb: bool = True
    """Log to wandb as well (mode from WANDB_MODE; offline unless set)."""
    wandb_project: str = "lapa_dist"
    progress: bool = True
    """Show a progress bar on rank 0."""


class MetricsLogger:
    def __init__(self, run_dir: RunDir, config: LoggingConfig, is_main: bool, total_steps: int, start_step: int,
                 run_config: dict, name: str):
        self.run_dir, self.is_main = run_dir, is_main
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, disable=not (is_main and config.progress),
                        dynamic_ncols=True)
        self.wandb = None
        if is_main and config.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=config.wandb_project, dir=str(run_dir.path), config=run_config,
                                    name=f"{name}-{run_dir.path.name}", resume="allow", id=_wandb_id(run_dir))

    def step(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.run_dir.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = {k: record[k] for k in ("loss", "samples_per_s") if k in record}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    """JSON-safe Python scalars (tensors become floats; NaN stays visible as a string)."""
    if hasattr(value, "tolist"):  # tensors and numpy values
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _wandb_id(run_dir: RunDir) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(run_dir.path.resolve()).encode()).hexdigest()[:12]
