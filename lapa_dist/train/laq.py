"""Stage 1: training the latent action quantizer (LAQ) with DeepSpeed.

    deepspeed launch/train_laq.py --config configs/laq/metaworld.json --run-dir runs/laq

The loop: one optimizer step per ``deepspeed.gradient_accumulation`` micro-batches; after the step,
dead codes are replaced when the quantizer's schedule says so (usage summed over all ranks, new codes
drawn from a generator seeded by (seed, step), so every rank computes the same codebook); metrics are
accumulated on the device and read once per ``logging.log_every`` steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from pydantic import model_validator

from lapa_dist.config import StrictModel
from lapa_dist.data.config import DataConfig
from lapa_dist.data.loader import VideoLoader
from lapa_dist.eval.reconstruction import reconstruction_metrics
from lapa_dist.models.laq import LAQ, LAQModelConfig
from lapa_dist.parallel.distributed import (
    DistributedContext,
    all_reduce_sum,
    gather_objects,
    init_distributed,
    seed_everything,
)
from lapa_dist.train.checkpoint import load_checkpoint, prepare_resume, save_checkpoint
from lapa_dist.train.config import RESUMABLE_CHANGES, DeepSpeedConfig, OptimConfig, TrainConfig
from lapa_dist.train.engine import build_engine, engine_dtype
from lapa_dist.train.metrics import LoggingConfig, MetricsLogger
from lapa_dist.train.run_dir import RunDir
from lapa_dist.train.weights import trained_state_dict
from lapa_dist.train.zero_params import set_full_param


class LAQRunConfig(StrictModel):
    """Everything that defines an LAQ training run (saved as RUN_DIR/config.json)."""

    model: LAQModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _ema_needs_whole_parameters(self) -> LAQRunConfig:
        if self.train.ema_decay and self.deepspeed.zero_stage == 3:
            raise ValueError("train.ema_decay needs whole parameters: use deepspeed.zero_stage <= 2 or no EMA")
        return self


def load_trained_laq(
    run_dir: str, device: torch.device, tag: str | None = None, prefer_ema: bool = True
) -> tuple[LAQ, str]:
    """The LAQ of a run directory in eval mode, with its newest (or ``tag``) checkpoint's weights."""
    directory = RunDir(run_dir)
    config_path = directory.path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--laq {run_dir}: no config.json; is it an LAQ run directory?")
    config = LAQRunConfig.model_validate_json(config_path.read_text())
    state, source = trained_state_dict(directory, tag, prefer_ema)
    model = LAQ(config.model)
    model.load_state_dict(state)
    return model.to(device).eval(), source


def to_unit_float(frames: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> dtype in [0, 1] on ``device``."""
    return frames.to(device, non_blocking=True).to(dtype).div_(255)


def replace_dead_codes(engine, step: int, seed: int, zero_stage: int) -> int:
    """Replace dead codes if the schedule says so; returns how many were replaced (0 if none)."""
    quantizer = engine.module.quantizer
    if not quantizer.replacement_due(step):
        return 0
    usage = all_reduce_sum(quantizer.usage.detach().clone())
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
    new_codebook, replaced = quantizer.replacement(usage.cpu(), generator)
    set_full_param(engine, quantizer.codebook, new_codebook, zero_stage, reset_rows=replaced)
    quantizer.usage.zero_()
    checksums = gather_objects(float(new_codebook.double().sum()))
    if len(set(checksums)) != 1:
        raise RuntimeError(f"step {step}: codebooks differ across data-parallel ranks after replacement: {checksums}")
    return int(replaced.sum())


class EMA:
    """Exponential moving average of the module's parameters (ZeRO stages 0-2: parameters are whole)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, parameter in module.named_parameters():
            self.shadow[name].lerp_(parameter.detach().float(), 1 - self.decay)


class LAQTrainer:
    def __init__(self, config: LAQRunConfig, run_dir: str):
        self.config = config
        self.ctx: DistributedContext = init_distributed()
        self.run_dir = RunDir(run_dir)
        self.run_dir.prepare(config, self.ctx.is_main, RESUMABLE_CHANGES)
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        model = LAQ(config.model)
        self.resume_tag, self.resume_universal = prepare_resume(self.run_dir, self.ctx.world_size, self.ctx.rank)
        self.engine = build_engine(
            model,
            config.optim,
            config.deepspeed,
            config.data.batch_size,
            self.ctx.world_size,
            config.train.steps,
            self.resume_universal,
        )
        self.dtype = engine_dtype(config.deepspeed)
        self.ema = EMA(self.engine.module, config.train.ema_decay) if config.train.ema_decay else None
        self.loader = VideoLoader(config.data, self.ctx.rank, self.ctx.world_size)
        self.step = 0
        self.replaced_since_log = 0
        self.code_counts_since_log = torch.zeros(config.model.codebook_size, dtype=torch.long, device=self.ctx.device)
        seed_everything(config.train.seed, self.ctx.rank)
        self._resume()

    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is None:
            return
        extra = load_checkpoint(
            self.engine, self.run_dir, tag, self.ctx.rank, self.ctx.world_size, self.resume_universal
        )
        self.step = extra["step"]
        self.loader.load_state_dict(extra["loader"])
        self.engine.module.quantizer.usage.copy_(extra["usage"])
        self.replaced_since_log = extra["replaced_since_log"]
        self.code_counts_since_log.copy_(extra["code_counts_since_log"])
        if self.ema is not None and "ema" in extra:
            self.ema.shadow = extra["ema"]
        if self.ctx.is_main:
            self.run_dir.truncate_metrics(self.step)
            print(f"resumed from {tag} (step {self.step})", flush=True)

    def _extra_state(self) -> dict:
        extra = {
            "loader": self.loader.state_dict(),
            "usage": self.engine.module.quantizer.usage.clone(),
            "replaced_since_log": self.replaced_since_log,
            "code_counts_since_log": self.code_counts_since_log.clone(),
        }
        if self.ema is not None:
            extra["ema"] = copy.deepcopy(self.ema.shadow)
        return extra

    def train_step(self, batches: Iterator[dict]) -> tuple[dict, float]:
        """One optimizer step over gradient_accumulation micro-batches; returns the last micro-batch's
        outputs for metrics and the seconds spent waiting for data."""
        data_wait = 0.0
        for _ in range(self.config.deepspeed.gradient_accumulation):
            start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - start
            x_t = to_unit_float(batch["x_t"], self.ctx.device, self.dtype)
            x_next = to_unit_float(batch["x_next"], self.ctx.device, self.dtype)
            output = self.engine(x_t, x_next)
            self.engine.backward(output.loss)
            self.engine.step()
            self.code_counts_since_log += output.code_counts
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return {"x_t": x_t, "x_next": x_next, "output": output}, data_wait

    def metrics(self, last: dict) -> dict:
        output = last["output"]
        quantizer = self.engine.module.quantizer
        values = {
            "loss": output.loss.detach().float(),
            "lr": self.engine.get_lr()[0],
            "codes_replaced": self.replaced_since_log,
        }
        values.update(reconstruction_metrics(last["x_t"], last["x_next"], output.prediction.detach()))
        values.update(quantizer.usage_metrics(all_reduce_sum(self.code_counts_since_log.clone())))
        values.update(quantizer.usage_metrics(output.code_counts, "batch_"))
        return values

    def train(self) -> None:
        config = self.config
        logger = MetricsLogger(
            self.run_dir, config.logging, self.ctx.is_main, config.train.steps, self.step, config.model_dump(), "laq"
        )
        batches = iter(self.loader)
        samples_per_step = config.data.batch_size * config.deepspeed.gradient_accumulation * self.ctx.world_size
        interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
        while self.step < config.train.steps:
            last, wait = self.train_step(batches)
            self.step += 1
            interval_steps, data_wait = interval_steps + 1, data_wait + wait
            self.replaced_since_log += replace_dead_codes(
                self.engine, self.step, config.train.seed, config.deepspeed.zero_stage
            )
            logger.step(self.step)
            if self.step % config.logging.log_every == 0 or self.step == config.train.steps:
                values = self.metrics(last)
                elapsed = time.perf_counter() - interval_start
                values.update(
                    samples_per_s=samples_per_step * interval_steps / elapsed,
                    step_time_s=elapsed / interval_steps,
                    data_wait_s=data_wait / interval_steps,
                )
                logger.log(self.step, values)
                interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                self.replaced_since_log = 0
                self.code_counts_since_log.zero_()
            if self.step % config.train.save_every == 0 or self.step == config.train.steps:
                save_checkpoint(
                    self.engine,
                    self.run_dir,
                    self.step,
                    self._extra_state(),
                    self.ctx.rank,
                    config.train.keep_checkpoints,
                )
        logger.close()
